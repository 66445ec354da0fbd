"""`mmprolong train ...` and `torchrun ... -m megatron_mmprolong.train ...`."""

from __future__ import annotations

import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_mmprolong import errors, runtime
    from megatron_mmprolong.training.arguments import parse_args
    from megatron_mmprolong.training.loop import train

    try:
        args = parse_args(argv)
        train(args)
    except errors.expected_errors() as err:
        return errors.report("mmprolong train", err)
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
