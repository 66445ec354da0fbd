"""How the entry points (`mmprolong VERB`, `torchrun -m megatron_mmprolong.train`) answer bad
input: one line on stderr naming the file or argument and what to do, exit status 2; a failure
found while running (a loss gone NaN, a build that kept no sample) exits 1. Any other exception
escaping is a bug and keeps its traceback."""

from __future__ import annotations

import sys

BAD_INPUT, RUN_FAILED = 2, 1


class ReportedElsewhere(Exception):
    """On the other ranks of a distributed run: rank 0 reports the error; this rank exits with
    its status and says nothing, so the user reads the reason once."""

    def __init__(self, status: int):
        super().__init__(f"rank 0 reported the error (exit status {status})")
        self.status = status


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types an entry point reports in words: bad input and run failures."""
    return (ReportedElsewhere, *_bad_input_errors(), *_run_failures())


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean the input is wrong (imported here, not at start-up)."""
    from megatron_mmprolong.config import ConfigError
    from megatron_mmprolong.convert.hf_checkpoint import CheckpointError
    from megatron_mmprolong.data.build import BuildError
    from megatron_mmprolong.data.chat import TokenizerError
    from megatron_mmprolong.data.plan import PlanError
    from megatron_mmprolong.data.records import RecordError
    from megatron_mmprolong.data.store import StoreError
    from megatron_mmprolong.data.synth import SynthError
    from megatron_mmprolong.data.synth_qa.documents import SynthQAError
    from megatron_mmprolong.eval.dataset_qa import EvalError
    from megatron_mmprolong.serving.endpoint import EndpointError

    # OSError last: a file that is missing, unreadable or in the way, named by the error itself
    return (ConfigError, CheckpointError, BuildError, TokenizerError, StoreError, PlanError, RecordError,
            EvalError, SynthError, SynthQAError, EndpointError, OSError)


def _run_failures() -> tuple[type[BaseException], ...]:
    from megatron_mmprolong.data.build import NoSamplesError
    from megatron_mmprolong.training.loop import TrainingError

    return (NoSamplesError, TrainingError)


def one_line(err: BaseException) -> str:
    """The error's message on one line; an OSError as 'PATH: reason'."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    if "Original Traceback" in text:  # raised in a DataLoader worker: torch appends the worker's traceback
        text = text.strip().splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]
    return " ".join(text.split())


def status(err: BaseException) -> int:
    """The exit status an error calls for (an unexpected one, a bug, is a run failure)."""
    if isinstance(err, ReportedElsewhere):
        return err.status
    if isinstance(err, _run_failures()):
        return RUN_FAILED
    return BAD_INPUT if isinstance(err, _bad_input_errors()) else RUN_FAILED


def report(prog: str, err: BaseException) -> int:
    """Print `err` for the user and return the exit status it calls for."""
    if not isinstance(err, ReportedElsewhere):
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return status(err)
