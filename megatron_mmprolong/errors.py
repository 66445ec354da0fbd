"""How the entry points (`mmprolong VERB`, `torchrun -m megatron_mmprolong.train`) answer bad
input: one line on stderr naming the file or argument and what to do, exit status 2; a failure
found while running (a loss gone NaN, a build that kept no sample, a full disk) exits 1. Any other
exception escaping is a bug and keeps its traceback.

Each module's error class subclasses `BadInput` or `RunFailed` (below); the entry points report
by these bases, so a new error type needs no registration here. This module imports nothing from
the package, so that every module can use it."""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path

BAD_INPUT, RUN_FAILED = 2, 1


class MMProLongError(Exception):
    """An error the entry points report in one line; `status` is the exit status it calls for."""

    status = RUN_FAILED


class BadInput(MMProLongError):
    """The input is wrong (a file, an argument, a dataset, a server's answer to our request)."""

    status = BAD_INPUT


class RunFailed(MMProLongError):
    """A failure found while running: the inputs were accepted, the run could not finish."""

    status = RUN_FAILED


class ReportedElsewhere(MMProLongError):
    """On the other ranks of a distributed run: rank 0 reports the error; this rank exits with
    its status and says nothing, so the user reads the reason once."""

    def __init__(self, status: int):
        super().__init__(f"rank 0 reported the error (exit status {status})")
        self.status = status


class OutputError(RunFailed, RuntimeError):
    """Writing an output failed (a full disk, a quota, an I/O error): one line naming the path and
    the free space there. A run failure (exit status 1), not bad input."""


# errno values that mean the storage refused a write, not that the path was wrong
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# what torch's zip writer (torch.save) raises when its file's write failed; the OSError is lost
# when it wrote through a C++ stream (a path), kept as __context__ when through a Python file
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _chain(err: BaseException):
    """`err`, its causes and contexts, and the per-rank failures a torch CheckpointException holds."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values() if isinstance(f, (tuple, BaseException))]


def write_failure(err: BaseException) -> tuple[OSError | None, str] | None:
    """(the OSError, or None where torch lost it; its text) if `err` is a refused write, else None."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e, e.strerror or os.strerror(e.errno)
    for e in _chain(err):
        text = str(e)
        if "No space left on device" in text or "[Errno 28]" in text:
            return None, os.strerror(errno.ENOSPC)
        for marker in _TORCH_WRITE_FAILURES:
            if marker in text:
                return None, f"the write failed (torch: {text[text.index(marker):].splitlines()[0].strip()})"
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def free_space(path: str | Path) -> str:
    """'N free of M' on the file system that holds `path` (its nearest existing folder)."""
    try:
        stat = os.statvfs(_existing(path))
    except OSError:
        return "free space unknown"
    return f"{_size(stat.f_bavail * stat.f_frsize)} free of {_size(stat.f_blocks * stat.f_frsize)}"


def output_error(err: BaseException, path: str | Path, what: str, after: str = "") -> OutputError | None:
    """The one-line OutputError for `err` if it is a refused write of `what` at `path`, else None.
    `after` says what became of the output (for example that nothing partial was kept)."""
    found = write_failure(err)
    if found is None:
        return None
    oserror, reason = found
    named = oserror.filename if oserror is not None and oserror.filename else path
    if oserror is None and "No space" not in reason:  # torch's writer lost the errno: the disk says why
        try:
            stat = os.statvfs(_existing(named))
            if stat.f_bavail * stat.f_frsize < 1 << 20:
                reason = os.strerror(errno.ENOSPC)
        except OSError:
            pass
    text = f"cannot write {what} {named}: {reason} ({free_space(named)} there)"
    return OutputError(f"{text}; {after}" if after else text)


def _existing(path: str | Path) -> Path:
    """`path`, or its nearest folder that exists."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


@contextmanager
def writing(path: str | Path, what: str, after: str = ""):
    """Turn a refused write inside the block into an OutputError naming `path` and the free space."""
    try:
        yield
    except OutputError:
        raise
    except (Exception, _checkpoint_exception()) as err:
        translated = output_error(err, path, what, after)
        if translated is None:
            raise
        raise translated from err


def _checkpoint_exception() -> type[BaseException]:
    """torch.distributed.checkpoint's CheckpointException (a BaseException), if torch is loaded."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    return getattr(api, "CheckpointException", Exception)


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types an entry point reports in words: this package's errors, and OSError
    (a file that is missing, unreadable or in the way, named by the error itself)."""
    return (MMProLongError, OSError)


def one_line(err: BaseException) -> str:
    """The error's message on one line; an OSError as 'PATH: reason'."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
        if err.errno in WRITE_ERRNOS:
            text += f" ({free_space(err.filename)} there)"
    else:
        text = str(err) or type(err).__name__
    if "Original Traceback" in text:  # raised in a DataLoader worker: torch appends the worker's traceback
        text = text.strip().splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]
    return " ".join(text.split())


def status(err: BaseException) -> int:
    """The exit status an error calls for (an unexpected one, a bug, is a run failure)."""
    if isinstance(err, MMProLongError):
        return err.status
    if isinstance(err, OSError):
        return RUN_FAILED if err.errno in WRITE_ERRNOS else BAD_INPUT
    return RUN_FAILED


def report(prog: str, err: BaseException) -> int:
    """Print `err` for the user and return the exit status it calls for."""
    if not isinstance(err, ReportedElsewhere):
        _close_progress_bars()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return status(err)


def _close_progress_bars() -> None:
    """End the line of a progress bar the error interrupted, so that the error starts its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:
            pass
