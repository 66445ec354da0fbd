"""Outputs that appear only when complete: write into a sibling '.partial' directory, then
rename. An interrupted run leaves the previous output untouched and its partial directory is
cleared by the next run."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path


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
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    previous = out.with_name(f".{out.name}.previous")
    if out.exists():
        out.rename(previous)
    partial.rename(out)
    if previous.exists():
        shutil.rmtree(previous)
