"""`mmprolong train ...` and `torchrun ... -m megatron_mmprolong.train ...`."""

from __future__ import annotations

import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import ConfigError
    from megatron_mmprolong.convert.hf_checkpoint import CheckpointError
    from megatron_mmprolong.data.plan import PlanError
    from megatron_mmprolong.data.store import StoreError
    from megatron_mmprolong.training.arguments import parse_args
    from megatron_mmprolong.training.loop import TrainingError, train

    try:
        args = parse_args(argv)
        train(args)
    except (ConfigError, CheckpointError, PlanError) as err:
        print(f"mmprolong train: error: {err}", file=sys.stderr)
        return 2
    except StoreError as err:  # raised in a loader worker, its message ends with the worker's traceback
        reason = str(err).strip().splitlines()[-1]
        print(f"mmprolong train: error: {reason.split('StoreError: ', 1)[-1]}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"mmprolong train: {err}", file=sys.stderr)
        return 1
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
