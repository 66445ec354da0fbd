"""Read and write the files of a Megatron-Core `torch_dist` checkpoint, one chunk at a time.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint: data files holding one
`torch.save`d tensor per chunk, a pickled `.metadata` naming every chunk (key, global offsets,
file, byte range), plus Megatron's `metadata.json` and `common.pt`. Tensors are stored whole
(global shapes, per-layer tensors stacked on a leading layer axis), so any tensor/pipeline layout
loads them. Megatron's own `dist_checkpointing.save` needs the whole state dict in memory; this
writer streams chunks to disk as they are produced, and the reader returns any box of a tensor,
so conversion memory is bounded by the largest chunk, not by the model.
"""

from __future__ import annotations

import io
import json
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_mmprolong.convert.hf_checkpoint import CheckpointError

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def chunk_id(offsets) -> str:
    return ",".join(str(int(o)) for o in offsets)


@dataclass(frozen=True)
class SerializedChunk:
    """A chunk as stored: its torch.save bytes and digest, made off the writer's thread."""

    data: memoryview
    digest: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, chunk: Tensor) -> "SerializedChunk":
        chunk = chunk.detach().cpu()
        if not chunk.is_contiguous() or chunk.untyped_storage().nbytes() != chunk.nbytes:
            chunk = chunk.clone()  # torch.save writes a view's whole storage otherwise
        buffer = io.BytesIO()
        torch.save(chunk, buffer)
        return cls(buffer.getbuffer(), tensor_digest(chunk), chunk.dtype, tuple(chunk.shape), chunk.nbytes)


class TorchDistWriter:
    """Append chunks of global tensors; `close()` writes the index files."""

    def __init__(self, directory: str | Path, file_bytes: int = 4 << 30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file_bytes = file_bytes
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self.checksums: dict[str, dict[str, str]] = {}
        self._file_index = -1
        self._stream: BinaryIO | None = None
        self.bytes_written = 0

    def write(
        self, key: str, global_shape: tuple[int, ...], offsets: tuple[int, ...], chunk: Tensor | SerializedChunk
    ) -> None:
        if isinstance(chunk, Tensor):
            chunk = SerializedChunk.of(chunk)
        if len(chunk.shape) != len(global_shape) or len(offsets) != len(global_shape):
            raise ValueError(f"{key}: chunk {chunk.shape} at {offsets} does not fit {global_shape}")
        entry = self._tensors.setdefault(
            key,
            TensorStorageMetadata(
                properties=TensorProperties(dtype=chunk.dtype),
                size=torch.Size(global_shape),
                chunks=[],
            ),
        )
        if entry.size != torch.Size(global_shape) or entry.properties.dtype != chunk.dtype:
            raise ValueError(f"{key}: chunks disagree on shape or dtype")
        stream = self._current_stream()
        start = stream.tell()
        stream.write(chunk.data)
        name = self._file_name(self._file_index)
        entry.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(chunk.shape)))
        self._storage[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(name, start, len(chunk.data))
        self.checksums.setdefault(key, {})[chunk_id(offsets)] = chunk.digest
        self.bytes_written += chunk.nbytes

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        metadata = Metadata(state_dict_metadata=self._tensors, storage_data=self._storage)
        with open(self.dir / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
        (self.dir / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        torch.save({}, self.dir / "common.pt")

    def _current_stream(self) -> BinaryIO:
        if self._stream is None or self._stream.tell() >= self.file_bytes:
            if self._stream is not None:
                self._stream.close()
            self._file_index += 1
            self._stream = open(self.dir / self._file_name(self._file_index), "wb")
        return self._stream

    @staticmethod
    def _file_name(index: int) -> str:
        return f"__0_{index}.distcp"


def tensor_digest(tensor: Tensor) -> str:
    """CRC32 of a tensor's bytes: catches corrupted or mixed-up chunks at ~4 GB/s."""
    flat = tensor.contiguous().view(-1).view(torch.uint8)
    return f"{zlib.crc32(memoryview(flat.numpy())):08x}"


# Classes a torch_dist `.metadata` pickle may construct; anything else is refused.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    # Megatron adds the savers' plans (`all_local_plans`) to the metadata.
    ("torch.distributed.checkpoint.planner", name)
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
} | {("torch", name) for name in ("float32", "bfloat16", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    storage: _StorageInfo


class TorchDistReader:
    """Random access to the tensors of a torch_dist checkpoint, without unpickling code."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / ".metadata"
        if not path.is_file():
            raise CheckpointError(f"{self.dir}: no .metadata; not a torch_dist checkpoint")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({err})") from None
        self._meta: dict[str, TensorStorageMetadata] = {}
        self._chunks: dict[str, list[_Chunk]] = {}
        for key, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                continue
            self._meta[key] = entry
            chunks = []
            for chunk in entry.chunks:
                storage = metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
                if storage is None:
                    raise CheckpointError(f"{path}: no storage entry for {key} at {list(chunk.offsets)}")
                if getattr(storage, "transform_descriptors", None):
                    raise CheckpointError(f"{path}: {key} is stored with transforms {storage.transform_descriptors}")
                chunks.append(_Chunk(tuple(chunk.offsets), tuple(chunk.sizes), storage))
            self._chunks[key] = chunks
        missing = sorted({c.storage.relative_path for cs in self._chunks.values() for c in cs
                          if not (self.dir / c.storage.relative_path).is_file()})
        if missing:
            raise CheckpointError(f"{self.dir}: data files named in .metadata are missing: {missing}")
        self._files: dict[str, BinaryIO] = {}

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).properties.dtype

    def read(
        self,
        key: str,
        offsets: tuple[int, ...] | None = None,
        sizes: tuple[int, ...] | None = None,
        checksums: dict[str, str] | None = None,
    ) -> Tensor:
        """The box [offsets, offsets + sizes) of a global tensor (the whole tensor by default).
        With `checksums` (chunk id -> digest), every chunk read is verified."""
        shape = self.shape(key)
        offsets = offsets or (0,) * len(shape)
        sizes = sizes or shape
        out = torch.empty(sizes, dtype=self.dtype(key))
        covered = 0
        for chunk in self._chunks[key]:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            data = self._load(key, chunk)
            if checksums is not None:
                expected = checksums.get(chunk_id(chunk.offsets))
                if expected is not None and tensor_digest(data) != expected:
                    raise CheckpointError(
                        f"{self.dir / chunk.storage.relative_path}: {key} chunk at "
                        f"{list(chunk.offsets)} does not match its checksum"
                    )
            src = tuple(slice(low - c, h - c) for low, h, c in zip(lo, hi, chunk.offsets))
            dst = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offsets))
            out[dst] = data[src]
            covered += int(torch.tensor([h - low for low, h in zip(lo, hi)]).prod())
        if covered != out.numel():
            raise CheckpointError(f"{self.dir}: the chunks of {key} do not cover {list(offsets)}+{list(sizes)}")
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "TorchDistReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _entry(self, key: str) -> TensorStorageMetadata:
        try:
            return self._meta[key]
        except KeyError:
            raise CheckpointError(f"{self.dir}: checkpoint has no tensor {key!r}") from None

    def _load(self, key: str, chunk: _Chunk) -> Tensor:
        storage = chunk.storage
        f = self._files.get(storage.relative_path)
        if f is None:
            f = self._files[storage.relative_path] = open(self.dir / storage.relative_path, "rb")
        f.seek(storage.offset)
        data = f.read(storage.length)
        try:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{self.dir / storage.relative_path}: cannot read {key} at {list(chunk.offsets)} ({err})"
            ) from None
        if tuple(tensor.shape) != chunk.sizes:
            raise CheckpointError(f"{self.dir / storage.relative_path}: {key} chunk has shape "
                                  f"{tuple(tensor.shape)}, metadata says {chunk.sizes}")
        return tensor
