"""Write sharded safetensors files tensor by tensor (even row block by row block).

The header of a safetensors file lists every tensor's offsets up front; since conversion knows
all names, shapes and dtypes before reading any data, the headers are written first and the
bytes streamed after them, so memory holds one piece at a time.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class StreamingSafetensorsWriter:
    """Tensors must arrive in the planned order; a tensor may arrive in several row blocks."""

    def __init__(self, directory: str | Path, planned: list[PlannedTensor], max_shard_bytes: int = 5 << 30):
        self.dir = Path(directory)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in planned:
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        count = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._queue = [(file, t) for file, shard in zip(self.files, shards) for t in shard]
        self._shards = dict(zip(self.files, shards))
        self._position = 0
        self._remaining = 0
        self._stream = None
        self._open_file = None
        self.total_bytes = sum(t.nbytes for t in planned)

    def write(self, name: str, piece: Tensor) -> None:
        """Append `piece` (the whole tensor or its next row block) of tensor `name`."""
        if self._remaining == 0:
            file, planned = self._queue[self._position]
            if planned.name != name:
                raise RuntimeError(f"expected tensor {planned.name!r} next, got {name!r}")
            if file != self._open_file:
                self._start_file(file)
            self._remaining = planned.nbytes
            self._position += 1
        planned = self._queue[self._position - 1][1]
        if planned.name != name or piece.dtype != planned.dtype:
            raise RuntimeError(f"{name}: piece of {piece.dtype} does not continue {planned.name}")
        data = piece.contiguous().view(-1).view(torch.uint8).numpy()
        if data.nbytes > self._remaining:
            raise RuntimeError(f"{name}: more data than its planned shape {planned.shape}")
        self._stream.write(memoryview(data))
        self._remaining -= data.nbytes

    def close(self) -> dict:
        """Finish and return the index (weight_map) that transformers reads."""
        if self._position != len(self._queue) or self._remaining:
            missing = [t.name for _, t in self._queue[self._position:]]
            raise RuntimeError(f"conversion ended before writing {len(missing)} tensors, e.g. {missing[:3]}")
        if self._stream is not None:
            self._stream.close()
        return {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {t.name: file for file, t in self._queue},
        }

    def _start_file(self, file: str) -> None:
        if self._stream is not None:
            self._stream.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in self._shards[file]:
            header[t.name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._stream = open(self.dir / file, "wb")
        self._stream.write(struct.pack("<Q", len(encoded)))
        self._stream.write(encoded)
        self._open_file = file
