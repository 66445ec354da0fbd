"""Files that appear only when complete (written under a '.partial' sibling, then renamed), and
YAML settings files read whole."""

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


def read_yaml_mapping(path: str | Path) -> tuple[bytes, dict]:
    """A YAML file's bytes (to hash) and its mapping; ValueError saying why not."""
    import yaml

    try:
        raw = Path(path).read_bytes()
        data = yaml.safe_load(raw)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise ValueError("not a YAML mapping")
    return raw, data
