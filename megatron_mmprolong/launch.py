"""`python -m megatron_mmprolong.launch [torchrun options] -m megatron_mmprolong.train ...`:
torchrun, for runs that are stopped by a signal.

Sent SIGTERM, plain torchrun (its elastic agent) forwards the signal to the ranks, waits 30 s
(`--shutdown-timeout`), SIGKILLs any rank still running and then re-raises the signal as a
`SignalException`: a traceback and exit status 1 even when every rank saved its checkpoint and
exited 0; a rank whose save takes longer than 30 s is killed in the middle of it. This launcher
is torchrun with three differences:

- the shutdown timeout defaults to 30 minutes (a save must fit; `--shutdown-timeout` or
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT still set it);
- SIGUSR1 (Slurm's warning before the time limit) is forwarded too, like SIGTERM;
- after a stop signal its exit status is the ranks' verdict: 0 when every rank of this node
  exited 0 (they saved and stopped), else 1 naming the ranks, in one line without a traceback.

Everything else (rendezvous, multi-node, a failed rank's ChildFailedError summary) is torchrun's.
"""

from __future__ import annotations

import os
import signal
import sys

DEFAULT_SHUTDOWN_TIMEOUT_S = 1800
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"  # torchrun's default --signals-to-handle
PROG = "mmprolong launch"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.launcher import api as launcher

    argv = sys.argv[1:] if argv is None else argv
    args = torchrun.parse_args(argv)
    if getattr(args, "shutdown_timeout", None) is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT_S
    if getattr(args, "signals_to_handle", None) == TORCHRUN_SIGNALS:  # not chosen by the user
        args.signals_to_handle += ",SIGUSR1"

    agents = []

    class Agent(launcher.LocalElasticAgent):
        """torchrun's agent, remembered so that the ranks' exit codes can be read after a signal."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            agents.append(self)

    @record
    def launch() -> int:
        real, launcher.LocalElasticAgent = launcher.LocalElasticAgent, Agent
        try:
            torchrun.run(args)
        except SignalException as stop:
            return _after_signal(stop.sigval, agents)
        finally:
            launcher.LocalElasticAgent = real
        return 0

    return launch()


def _exit_codes(agents) -> dict[int, int | None]:
    """Local rank -> exit code of the last worker group (None: unknown)."""
    context = getattr(agents[-1], "_pcontext", None) if agents else None
    handlers = getattr(context, "subprocess_handlers", None) or {}
    return {rank: getattr(getattr(h, "proc", None), "returncode", None) for rank, h in sorted(handlers.items())}


def _after_signal(sigval, agents) -> int:
    name = signal.Signals(sigval).name
    codes = _exit_codes(agents)
    if codes and all(code == 0 for code in codes.values()):
        print(f"{PROG}: {name}: every rank stopped and exited 0 ({len(codes)} on this node)", file=sys.stderr,
              flush=True)
        return 0
    failed = ", ".join(f"local rank {r}: {_status(c)}" for r, c in codes.items() if c != 0) or "exit codes unknown"
    print(f"{PROG}: error: {name}: not every rank stopped cleanly ({failed})", file=sys.stderr, flush=True)
    return 1


def _status(code: int | None) -> str:
    if code is None:
        return "still running or unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


if __name__ == "__main__":
    sys.exit(main())
