"""One writer per output: an exclusive lock on a training `--save` folder (held by rank 0 for the
whole run) and on a `build-data` output prefix.

The lock is a file (`SAVE/.mmprolong-writer.lock`, `PREFIX.lock`) locked with `flock` and holding
one JSON line about its holder: host, pid, the pid's start time, the command, the Slurm job.

- Held: the second writer is refused in one line naming the holder's host and pid (exit 2).
- A holder that died releases its `flock` with it (the kernel does that, kill -9 included); its
  line stays. A later writer that finds the line of a process no longer running on this host takes
  the lock over and says so.
- A clean release clears the line and removes the file (the inode is checked after locking, so a
  writer that opened the file just before it went away retries on the new one).

Shared file systems. `flock` is coherent across nodes on NFSv4 (the client maps it to NFS byte
range locks), on GPFS and on Lustre mounted with `-o flock` (the default since Lustre 2.12); it is
node-local on Lustre `-o localflock` and NFS `-o local_lock=flock|all`, and fails (ENOSYS/ENOLCK/
EOPNOTSUPP) on Lustre `-o noflock` or NFSv3 without lockd. So the line is checked even when
`flock` succeeds: a holder on this host must be dead (pid gone, or reused by a process started
later); a holder on another host cannot be checked from here, so the holder refreshes the lock
file's modification time every 30 s (a heartbeat) and a line from another host is taken over only
once that heartbeat is more than 5 minutes old (a crashed node, a node-local flock). Where `flock`
fails, the line alone is the lock (a small race between two writers starting in the same second is
narrowed by writing, pausing, and re-reading the line).

A Slurm job that is requeued may start again while its previous run still exits; a holder in the
same Slurm job is waited for (up to `MMPROLONG_LOCK_WAIT` seconds, default 120) instead of refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_mmprolong.errors import BadInput

HEARTBEAT_S = 30
STALE_S = 300
SAVE_LOCK = ".mmprolong-writer.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class OutputLocked(BadInput):
    """Another run is writing this output (bad input: exit status 2)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    command: str
    started: str  # local time the lock was taken, for people
    pid_start: int | None = None  # /proc/PID/stat start time (clock ticks): tells a reused pid apart
    slurm_job: str | None = None

    @classmethod
    def this_process(cls, command: str) -> Holder:
        return cls(socket.gethostname(), os.getpid(), command, time.strftime("%Y-%m-%d %H:%M:%S"),
                   _pid_start(os.getpid()), os.environ.get("SLURM_JOB_ID"))

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"`{self.command}` pid {self.pid} on host {self.host}{job}, since {self.started}"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def running(self) -> bool:
        """On this host: is that process still there (and not a later one under a reused pid)?"""
        state = _proc_state(self.pid)
        if state is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        status, start = state
        return status not in "ZX" and (self.pid_start is None or start == self.pid_start)


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, None where /proc is not there."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ("X", 0) if Path("/proc/self/stat").exists() else None
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _pid_start(pid: int) -> int | None:
    state = _proc_state(pid)
    return state[1] if state else None


class OutputLock:
    """Held by this process until `release()` (or its death). Use `OutputLock.acquire`."""

    def __init__(self, path: Path, fd: int, holder: Holder, flock: bool):
        self.path, self.fd, self.holder, self.flock = path, fd, holder, flock
        self.created: list[Path] = []  # folders made for the lock, removed on release if still empty
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="output-lock-heartbeat", daemon=True)
        self._beat.start()

    @classmethod
    def acquire(cls, path: str | Path, target: str, command: str, option: str,
                wait_s: float | None = None) -> OutputLock:
        """Lock `path` for writing `target` (named in messages with the `option` that chose it)."""
        path = Path(path)
        me = Holder.this_process(command)
        if wait_s is None:
            wait_s = float(os.environ.get("MMPROLONG_LOCK_WAIT", "120"))
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                return cls._try(path, me, target, option)
            except _SameJob as busy:
                if time.monotonic() > deadline:
                    raise OutputLocked(busy.message) from None
                if not said:
                    print(f"{command}: {target} is still held by the previous run of this Slurm job "
                          f"({busy.holder.describe()}); waiting up to {wait_s:.0f} s for it to exit",
                          file=sys.stderr, flush=True)
                    said = True
                time.sleep(1)

    @classmethod
    def _try(cls, path: Path, me: Holder, target: str, option: str) -> OutputLock:
        for _ in range(50):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flocked = _flock(fd)
                record = _read(fd)
                if flocked is False:  # someone holds it: name them (a holder writes its line right after locking)
                    for _ in range(20):
                        if record is not None:
                            break
                        time.sleep(0.1)
                        record = _read(fd)
                    raise _refusal(path, record, target, option)
                if not _same_file(fd, path):  # released (and removed) between our open and flock
                    os.close(fd)
                    continue
                if record is not None and record != me:
                    _check_stale(path, fd, record, target, option, me.command)
                _write(fd, me)
                if flocked is None:  # no flock here: the line is the lock; a writer racing us overwrites it
                    time.sleep(0.2)
                    if _read(fd) != me:
                        raise _refusal(path, _read(fd), target, option)
                return cls(path, fd, me, flocked is True)
            except BaseException:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                raise
        raise OutputLocked(f"{target}: could not lock {path} (it keeps being replaced)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except OSError:
                pass

    def release(self) -> None:
        if self.fd < 0:
            return
        self._stop.set()
        try:
            if _same_file(self.fd, self.path) and _read(self.fd) == self.holder:
                self.path.unlink()
                os.ftruncate(self.fd, 0)
        except OSError:
            pass
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = -1
        _remove_empty(self.created)  # a run refused before it wrote anything leaves nothing behind

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _SameJob(OutputLocked):
    def __init__(self, message: str, holder: Holder):
        super().__init__(message)
        self.message, self.holder = message, holder


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in _UNSUPPORTED:
            return None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _read(fd: int) -> Holder | None:
    """The holder's line, or None for an empty (released, or just created) or unreadable one."""
    try:
        raw = os.pread(fd, 4096, 0).decode()
        return Holder(**json.loads(raw)) if raw.strip() else None
    except (ValueError, TypeError, OSError):
        return None


def _write(fd: int, holder: Holder) -> None:
    data = (json.dumps(asdict(holder)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _refusal(path: Path, holder: Holder | None, target: str, option: str) -> OutputLocked:
    if holder is None:
        return OutputLocked(f"{target} is being written by another run (it holds {path}); "
                            f"wait for it to finish or choose another {option}")
    message = (f"{target} is being written by another run: {holder.describe()}; wait for it to finish, stop it, "
               f"or choose another {option}")
    if holder.slurm_job and holder.slurm_job == os.environ.get("SLURM_JOB_ID"):
        return _SameJob(message, holder)
    return OutputLocked(message)


def _check_stale(path: Path, fd: int, holder: Holder, target: str, option: str, command: str) -> None:
    """We hold the flock but a line names a holder: take over from a dead one, refuse a live one."""
    if holder.on_this_host():
        if holder.running():  # its flock did not stop us: it runs without one (or elsewhere in a container)
            raise _refusal(path, holder, target, option)
        print(f"{command}: taking over {path}: its holder, {holder.describe()}, is no longer running",
              file=sys.stderr, flush=True)
        return
    age = time.time() - os.fstat(fd).st_mtime
    if age < STALE_S:
        raise OutputLocked(
            f"{target} is being written by another run: {holder.describe()} (last heartbeat {age:.0f} s ago); "
            f"wait for it to finish or choose another {option}; if it is no longer running, its lock is taken "
            f"over {STALE_S // 60} minutes after its last heartbeat, or delete {path}")
    print(f"{command}: taking over {path}: its holder, {holder.describe()}, has not refreshed it for "
          f"{age / 60:.0f} minutes", file=sys.stderr, flush=True)


def lock_save_dir(save: str | Path, command: str = "mmprolong train") -> OutputLock:
    """The lock of a training `--save` folder (created if missing)."""
    save = Path(save)
    created = _make_folders(save)
    try:
        lock = OutputLock.acquire(save / SAVE_LOCK, str(save), command, "--save")
    except BaseException:
        _remove_empty(created)
        raise
    lock.created = created
    return lock


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p; the folders it made, deepest first."""
    missing, at = [], folder
    while not at.exists() and at != at.parent:
        missing.append(at)
        at = at.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def prefix_lock_path(prefix: str | Path, part: tuple[int, int] | None = None) -> Path:
    """`PREFIX.lock` for a whole build; `PREFIX.build/part-I-of-N.lock` for one part of an array build
    (the parts of one build run at the same time, each on its own shards)."""
    if part is None:
        return Path(f"{prefix}.lock")
    return Path(f"{prefix}.build") / f"part-{part[0]}-of-{part[1]}.lock"


def lock_prefix(prefix: str | Path, part: tuple[int, int] | None = None,
                command: str = "mmprolong build-data") -> OutputLock:
    """The lock of a `build-data` output prefix (or of one `--part` of it). A whole build also
    refuses to start while parts of an array build hold their locks, and a part while a whole
    build holds the prefix's."""
    path = prefix_lock_path(prefix, part)
    created = _make_folders(path.parent)
    target = str(prefix) if part is None else f"{prefix} (part {part[0]} of {part[1]})"
    try:
        lock = OutputLock.acquire(path, target, command, "output prefix")
    except BaseException:
        _remove_empty(created)
        raise
    lock.created = created
    try:
        others = ([prefix_lock_path(prefix)] if part is not None
                  else sorted(Path(f"{prefix}.build").glob("part-*-of-*.lock")))
        for other in others:
            holder = held_by(other)
            if holder is not None:
                raise OutputLocked(f"{prefix} is being written by another run: {holder.describe()} "
                                   f"(holds {other}); wait for it to finish or choose another output prefix")
    except BaseException:
        lock.release()
        raise
    return lock


def held_by(path: str | Path) -> Holder | None:
    """The holder of a lock file that a live process holds (its flock taken), else None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        flocked = _flock(fd)
        record = _read(fd)
        if flocked is False:
            return record or Holder("?", 0, "another run", "?")
        if flocked is None and record is not None and record.on_this_host() and record.running():
            return record
        return None
    finally:
        os.close(fd)  # a probe that got the flock drops it here
