"""Outputs that appear only when complete: write into a sibling '.partial' directory, then
rename. An interrupted run leaves the previous output untouched and its partial directory is
cleared by the next run; a write the disk refuses (full, quota, I/O error) removes it at once and
is reported in one line naming the output and the free space there."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from megatron_mmprolong.errors import output_error


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False):
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run
    after = "nothing was written (the partial output was removed)" + (
        f"; {out} is unchanged" if out.exists() else "")
    try:
        partial.mkdir(parents=True)
        yield partial
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        refused = output_error(err, out, "the converted checkpoint", after)
        if refused is not None:
            raise refused from err
        raise
    previous = out.with_name(f".{out.name}.previous")
    if out.exists():
        out.rename(previous)
    partial.rename(out)
    if previous.exists():
        shutil.rmtree(previous)
