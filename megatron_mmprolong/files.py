"""Files that appear only when complete: written under a '.partial' sibling, then renamed."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(path: str | Path):
    """Yield the temporary path to write; it replaces `path` only if the block completes."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    yield partial
    partial.replace(path)


def write_text_whole(path: str | Path, text: str) -> None:
    with written_whole(path) as partial:
        partial.write_text(text)
