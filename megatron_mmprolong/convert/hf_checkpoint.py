"""Safe reading of a Hugging Face safetensors checkpoint (one file or an index of shards).

The safetensors format is a JSON header of names, dtypes, shapes and byte offsets, then raw
bytes; nothing is unpickled. Tensors (or row ranges of them) are read with positioned reads
into fresh buffers rather than memory-mapped, so a streaming converter's resident memory is the
pieces it holds, not every page of the checkpoint it has touched.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

from megatron_mmprolong.errors import BadInput

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(BadInput, ValueError):
    """A checkpoint that cannot be read as asked; the message names the file or tensor."""


class _Entry:
    __slots__ = ("path", "dtype", "shape", "begin", "end")

    def __init__(self, path: Path, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.path, self.dtype, self.shape, self.begin, self.end = path, dtype, shape, begin, end


class HFCheckpoint:
    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:  # not UTF-8 JSON, or no weight_map
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
            files = sorted({self.dir / f for f in weight_map.values()})
        elif single.is_file():
            weight_map, files = None, [single]
        else:
            pickled = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {pickled}; pickle checkpoints are not loaded, convert them to safetensors)" if pickled else ""
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self._entries: dict[str, _Entry] = {}
        for path in files:
            self._entries.update(_read_header(path))
        if weight_map is not None:
            for name, file in weight_map.items():
                entry = self._entries.get(name)
                if entry is None or entry.path.name != Path(file).name:
                    raise CheckpointError(f"{self.dir / file}: the index places {name!r} here but the file lacks it")
        self._fds: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def file_of(self, name: str) -> Path:
        return self._entry(name).path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> Tensor:
        entry = self._entry(name)
        return self.read_rows(name, 0, entry.shape[0]) if entry.shape else self._read(entry, entry.begin, entry.end).view(())

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of a tensor, reading only those bytes."""
        entry = self._entry(name)
        rows = entry.shape[0]
        if not 0 <= start <= stop <= rows:
            raise CheckpointError(f"{entry.path}: rows {start}:{stop} of {name!r} are outside its {rows} rows")
        row_bytes = (entry.end - entry.begin) // rows if rows else 0
        data = self._read(entry, entry.begin + start * row_bytes, entry.begin + stop * row_bytes)
        return data.view(stop - start, *entry.shape[1:])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: checkpoint has no tensor {name!r}") from None

    def _read(self, entry: _Entry, begin: int, end: int) -> Tensor:
        fd = self._fds.get(entry.path)
        if fd is None:
            fd = self._fds[entry.path] = os.open(entry.path, os.O_RDONLY)
        buffer = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled, unlike bytearray
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], begin + done)
            if n <= 0:
                raise CheckpointError(f"{entry.path}: file ends inside its tensor data (truncated?)")
            done += n
        return buffer.view(entry.dtype)


def _read_header(path: Path) -> dict[str, _Entry]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    data_start = 8 + length
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (data_start + int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed header entry for {name!r} ({err})") from None
        expected = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            expected *= s
        if end - begin != expected:
            raise CheckpointError(f"{path}: {name!r} has {end - begin} bytes, its shape {shape} needs {expected}")
        if end > size:
            raise CheckpointError(f"{path}: file ends inside the data of {name!r} (truncated?)")
        entries[name] = _Entry(path, dtype, shape, begin, end)
    return entries
