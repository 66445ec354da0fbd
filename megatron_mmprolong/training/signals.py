"""Stop signals of a training run: SIGTERM (scancel, preemption, torchrun passing one on) and
SIGUSR1 (Slurm's warning before the time limit, `--signal=B:USR1@SECONDS`).

Either one asks the run to stop: save if it can, exit 0. The contract a batch script relies on:

- exit status 0 after a stop signal, whether a checkpoint was saved (after the current step) or
  the signal came before the first step (nothing to save; the next start begins where the last
  complete checkpoint is);
- a finished run (its checkpoint at --train-iters) writes SAVE/training_finished.txt and exits 0;
  a stopped one does not, so "exit 0 and no marker" means "stopped, resume it";
- 2: the run was refused (arguments, inputs, the --save lock): do not requeue; 1 or a signal's
  status: it failed.

Before the process group exists a signal ends the process at once (`StopRequested` from the
handler: nothing has started that could be saved or would wait for this rank). After it, the
handler only records the signal, and the ranks agree on it at safe points (`any_rank`), so every
rank stops after the same step. The time of the signal is kept: the stop line says how long the
step and the save took after it, the figures that size Slurm's --signal lead time and KillWait.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """A stop signal before this run had anything to save: the entry point exits 0."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} before the first step: stopped; nothing to save")
        self.signum = signum


class StopSignals:
    def __init__(self):
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first stop signal
        self.failed = False  # a rank failed to write its logs (then every rank stops, without a save)
        self._agreeing = False

    def install(self) -> StopSignals:
        self.signum, self.received_at, self.failed, self._agreeing = None, None, False, False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
        if not self._agreeing:
            raise StopRequested(signum)

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop signal"

    def agree_from_now(self) -> None:
        """The process group exists: from here the ranks agree on a signal instead of each exiting."""
        self._agreeing = True

    def any_rank(self, failed: bool = False, group=None) -> bool:
        """Whether any rank received a stop signal; sets `failed` if any rank says it failed. A
        collective over `group` (host tensors: runtime.host_group())."""
        import torch  # here: the handlers are installed before the first heavy import
        import torch.distributed as dist

        flags = torch.tensor([0 if self.signum is None else int(self.signum), 1 if failed else 0])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        self.failed = bool(flags[1].item())
        if flags[0].item() and self.signum is None:  # another rank's signal: stop for the same reason
            self.signum, self.received_at = int(flags[0].item()), time.monotonic()
        return bool(flags[0].item())

    def stop_before_start(self, group=None) -> None:
        """At a safe point of start-up: every rank raises StopRequested if any rank was signalled."""
        if self.any_rank(group=group):
            raise StopRequested(self.signum)

    def seconds_since(self) -> float:
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at


SIGNALS = StopSignals()


@contextmanager
def ignored_by_helper_processes():
    """Stop signals ignored while helper processes start (an ignored signal stays ignored across
    their exec): Slurm delivers a stop signal to every process of a task, and a helper must outlive
    it for the run to save and stop. This process misses a signal only in this short window."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def install() -> StopSignals:
    """The process's stop signals, handled from now on (idempotent)."""
    return SIGNALS.install()
