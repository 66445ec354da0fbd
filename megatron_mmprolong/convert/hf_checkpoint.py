"""Lazy, safe reading of a Hugging Face safetensors checkpoint (one file or an index of shards).

Tensors are read one at a time from memory-mapped files; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file or tensor."""


class HFCheckpoint:
    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
            self._file_of = {name: self.dir / f for name, f in weight_map.items()}
        elif single.is_file():
            with self._open(single) as handle:
                self._file_of = {name: single for name in handle.keys()}
        else:
            pickled = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {pickled}; pickle checkpoints are not loaded, convert them to safetensors)" if pickled else ""
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> Path:
        try:
            return self._file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: checkpoint has no tensor {name!r}") from None

    def get(self, name: str) -> Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except Exception as err:  # truncated or corrupt shard
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({err})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file header; no data is read."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of a tensor, reading only those bytes."""
        try:
            return self._handle(name).get_slice(name)[start:stop]
        except Exception as err:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({err})") from None

    def _handle(self, name: str):
        path = self.file_of(name)
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._open(path).__enter__()
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
