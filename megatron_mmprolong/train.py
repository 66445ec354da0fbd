"""`mmprolong train ...` and `torchrun ... -m megatron_mmprolong.train ...`.

Exit status: 0 when the run finished, was already finished, or stopped on SIGTERM/SIGUSR1 (having
saved, or before it had anything to save); 2 when it was refused (arguments, inputs, the --save
lock, a --preflight-world-size that does not fit); 1 when it failed. training/signals.py says what
a batch script can rely on. A failure names the rank and host it happened on; faulthandler dumps
every thread's stack on a fatal signal (SIGSEGV, SIGABRT, ...) and on SIGUSR2 (a hung rank:
`scancel --signal=USR2 JOB`), never on the stop signals.
"""

from __future__ import annotations

import faulthandler
import signal
import socket
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    from megatron_mmprolong.training import signals

    signals.install()  # before the imports below: a signal during start-up stops the process cleanly
    try:
        return _main(argv)
    except signals.StopRequested as stop:
        print(f"mmprolong train: {stop}", file=sys.stderr, flush=True)
        return 0


def _main(argv: list[str] | None) -> int:
    _enable_faulthandler()
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_mmprolong import errors, runtime
    from megatron_mmprolong.training import signals
    from megatron_mmprolong.training.arguments import parse_command

    try:
        args, preflight_world_size = parse_command(argv)
        if preflight_world_size is not None:
            from megatron_mmprolong.training.preflight import preflight

            print(f"mmprolong train: pre-flight: {preflight(args, preflight_world_size)}", flush=True)
            return 0
        from megatron_mmprolong.training.loop import train

        train(args)
    except errors.expected_errors() as err:
        return errors.report("mmprolong train", err)
    except signals.StopRequested:
        raise
    except BaseException as err:
        if not isinstance(err, (KeyboardInterrupt, SystemExit)):
            print(f"mmprolong train: {where_this_runs()} failed: {type(err).__name__}: {err}", file=sys.stderr,
                  flush=True)
        raise
    finally:
        runtime.shutdown()
    return 0


def _enable_faulthandler() -> None:
    """Stacks of every thread on the process's real stderr (not a replaced sys.stderr)."""
    stream = sys.__stderr__ or sys.stderr
    try:
        faulthandler.enable(file=stream, all_threads=True)
        faulthandler.register(signal.SIGUSR2, file=stream, all_threads=True, chain=False)
    except (AttributeError, ValueError, OSError):  # no file descriptor behind it
        pass


def where_this_runs() -> str:
    """'rank R of N on host H' (the launcher's rank where the process group is not there yet)."""
    import torch.distributed as dist

    from megatron_mmprolong.runtime import launch_env

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        try:
            env = launch_env()
            rank, world = env.rank, env.world_size
        except (RuntimeError, ValueError):
            rank, world = "?", "?"
    return f"rank {rank} of {world} on host {socket.gethostname()}"


if __name__ == "__main__":
    sys.exit(main())
