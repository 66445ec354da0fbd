"""The on-disk multimodal dataset: a prefix and a few memory-mapped files, readable without the
builder (numpy, JSON and Megatron's IndexedDataset).

    PREFIX.tokens.{bin,idx}      Megatron MMIDIDX, int32: one sequence per sample, image
                                 placeholders already expanded (vision_start, N x image_pad, vision_end)
    PREFIX.loss_spans.{bin,idx}  int32 (start, end) pairs per sample: loss on answer tokens only
    PREFIX.images.{bin,idx}      uint8: one encoded image (PNG/JPEG) per sequence, at model size
    PREFIX.image_grids.npy       int32 [images, 3]: (t, h, w) in patches (manifest image.patch_size px)
    PREFIX.samples.npy           one row per sample (SAMPLE_DTYPE): lengths, image range, task, bin
    PREFIX.ids.json              source id of every sample
    PREFIX.rejects.jsonl         inputs that did not become samples, with location and reason
    PREFIX.manifest.json         written last: format, model family, tokenizer, image parameters, counts,
                                 histograms, build arguments, each file's size (checked on
                                 opening) and checksum (checked by inspect-data --verify)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_mmprolong.config import VLConfig
from megatron_mmprolong.data.images import ImageParams

FORMAT = "megatron-mmprolong/multimodal-store"
FORMAT_VERSION = 1

SAMPLE_DTYPE = np.dtype([
    ("tokens", "<i4"),         # sequence length, vision tokens included
    ("loss_tokens", "<i4"),
    ("first_image", "<i8"),    # row of the first image in image_grids / images
    ("num_images", "<i4"),
    ("vision_tokens", "<i4"),
    ("task", "<i2"),           # index into manifest["tasks"]
    ("length_bin", "<i2"),     # index into manifest["length_bins"]
    ("pages_dropped", "<i2"),  # by the overflow policy
    ("record", "<i8"),         # position of the input record in the build's input order
])

INDEXED = {"tokens": np.int32, "loss_spans": np.int32, "images": np.uint8}
ARRAYS = ("image_grids.npy", "samples.npy", "ids.json", "rejects.jsonl")


def file_names(prefix: str | Path) -> list[Path]:
    """Every data file of a store (the manifest not included)."""
    prefix = str(prefix)
    names = [Path(f"{prefix}.{name}.{ext}") for name in INDEXED for ext in ("bin", "idx")]
    return names + [Path(f"{prefix}.{name}") for name in ARRAYS]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class EncodedSample:
    id: str
    task: str
    tokens: np.ndarray  # int32
    loss_spans: np.ndarray  # int32 [n, 2]
    images: list[bytes]
    grids: list[tuple[int, int, int]]
    vision_tokens: int
    pages_dropped: int = 0

    @property
    def loss_tokens(self) -> int:
        return int((self.loss_spans[:, 1] - self.loss_spans[:, 0]).sum())


class StoreWriter:
    """Appends samples and rejects; `close()` finalizes the files (no manifest)."""

    def __init__(self, prefix: str | Path, tasks: list[str], bin_edges: list[int]):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        self.tasks, self.bin_edges = tasks, np.asarray(bin_edges)
        self._builders = {
            name: IndexedDatasetBuilder(f"{self.prefix}.{name}.bin", dtype=dtype) for name, dtype in INDEXED.items()
        }
        self._rows, self._grids, self._ids, self._rejects = [], [], [], []
        self._images = 0

    def add(self, sample: EncodedSample, record: int) -> None:
        b = self._builders
        b["tokens"].add_item(torch.from_numpy(sample.tokens))
        b["tokens"].end_document()
        b["loss_spans"].add_item(torch.from_numpy(sample.loss_spans.reshape(-1)))
        b["loss_spans"].end_document()
        for data in sample.images:
            b["images"].add_item(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            b["images"].end_document()
        length = len(sample.tokens)
        self._rows.append((
            length, sample.loss_tokens, self._images, len(sample.images), sample.vision_tokens,
            self.tasks.index(sample.task), int(np.searchsorted(self.bin_edges, length, side="right")) - 1,
            sample.pages_dropped, record,
        ))
        self._grids += sample.grids
        self._ids.append(sample.id)
        self._images += len(sample.images)

    def reject(self, source: str, record_id: str | None, kind: str, reason: str) -> None:
        self._rejects.append({"input": source, "id": record_id, "kind": kind, "reason": reason})

    def close(self) -> None:
        for name, builder in self._builders.items():
            builder.finalize(f"{self.prefix}.{name}.idx")
        np.save(f"{self.prefix}.samples.npy", np.array(self._rows, dtype=SAMPLE_DTYPE))
        np.save(f"{self.prefix}.image_grids.npy", np.array(self._grids, dtype=np.int32).reshape(-1, 3))
        Path(f"{self.prefix}.ids.json").write_text(json.dumps(self._ids))
        Path(f"{self.prefix}.rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self._rejects))


def merge_stores(parts: list[str], prefix: str | Path) -> None:
    """Concatenate stores in order into `prefix` (image rows renumbered)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    for name, dtype in INDEXED.items():
        builder = IndexedDatasetBuilder(f"{prefix}.{name}.bin", dtype=dtype)
        for part in parts:
            builder.add_index(f"{part}.{name}")
        builder.finalize(f"{prefix}.{name}.idx")
    rows, grids, ids, rejects, images = [], [], [], [], 0
    for part in parts:
        samples = np.load(f"{part}.samples.npy")
        samples["first_image"] += images
        rows.append(samples)
        part_grids = np.load(f"{part}.image_grids.npy")
        grids.append(part_grids)
        images += len(part_grids)
        ids += json.loads(Path(f"{part}.ids.json").read_text())
        rejects.append(Path(f"{part}.rejects.jsonl").read_text())
    np.save(f"{prefix}.samples.npy", np.concatenate(rows) if rows else np.zeros(0, SAMPLE_DTYPE))
    np.save(f"{prefix}.image_grids.npy", np.concatenate(grids) if grids else np.zeros((0, 3), np.int32))
    Path(f"{prefix}.ids.json").write_text(json.dumps(ids))
    Path(f"{prefix}.rejects.jsonl").write_text("".join(rejects))


class StoreError(ValueError):
    pass


def read_manifest(prefix: str | Path) -> dict:
    manifest = Path(f"{prefix}.manifest.json")
    if not manifest.is_file():
        raise StoreError(f"{manifest} is missing: not a finished dataset (build it with mmprolong build-data)")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{manifest}: not readable JSON ({err}); the dataset is damaged, rebuild it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{manifest}: not a dataset manifest of {FORMAT} v{FORMAT_VERSION}")
    return data


def check_sizes(prefix: str | Path, manifest: dict) -> None:
    """Every file as long as the build left it: a truncated or replaced file is named now, not
    met as a short read in the middle of a run. Datasets built before the manifest recorded
    sizes have no "sizes" entry; they open unchecked, as they always did."""
    for suffix, size in manifest.get("sizes", {}).items():
        path = Path(f"{prefix}.{suffix}")
        if not path.is_file():
            raise StoreError(f"{path} is missing: the dataset is incomplete; rebuild it or restore the file")
        actual = path.stat().st_size
        if actual != size:
            raise StoreError(f"{path} has {actual:,} bytes, the build wrote {size:,}: the file is damaged "
                             "(truncated or replaced); rebuild the dataset or restore the file")


def verify_checksums(prefix: str | Path) -> list[Path]:
    """Every file whose checksum the manifest records, read whole and compared (without opening
    the dataset, which damaged contents can break); StoreError naming the files that differ.
    Returns the files checked."""
    checked, damaged = [], []
    for suffix, expected in read_manifest(prefix).get("checksums", {}).items():
        path = Path(f"{prefix}.{suffix}")
        checked.append(path)
        if not path.is_file() or file_sha256(path) != expected:
            damaged.append(str(path))
    if damaged:
        raise StoreError(f"{', '.join(damaged)}: the content differs from the build's checksum (the file "
                         "changed after the build); rebuild the dataset or restore the file")
    return checked


class MultimodalStore:
    """Random access to a finished dataset (memory-mapped)."""

    def __init__(self, prefix: str | Path):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        self.manifest = read_manifest(self.prefix)
        check_sizes(self.prefix, self.manifest)
        self.tokens = self._open("tokens.idx", lambda p: IndexedDataset(p[:-len(".idx")]))
        self.loss_spans = self._open("loss_spans.idx", lambda p: IndexedDataset(p[:-len(".idx")]))
        self.images = self._open("images.idx", lambda p: IndexedDataset(p[:-len(".idx")]))
        self.samples = self._open("samples.npy", lambda p: np.load(p, mmap_mode="r"))
        self.grids = self._open("image_grids.npy", lambda p: np.load(p, mmap_mode="r"))
        self.ids = self._open("ids.json", lambda p: json.loads(Path(p).read_text()))

    def _open(self, suffix: str, read):
        path = f"{self.prefix}.{suffix}"
        try:
            return read(path)
        except Exception as err:  # whatever a reader makes of damaged bytes of the right size
            raise StoreError(f"{path} cannot be read ({type(err).__name__}: {err}); the file is damaged: "
                             "mmprolong inspect-data --verify names every changed file") from None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def model_family(self) -> str:
        """The family whose image processor the pages follow (datasets built before it was recorded: Qwen2.5-VL)."""
        return self.manifest.get("model_family", "qwen2_5_vl")

    @property
    def image_params(self) -> ImageParams:
        return ImageParams.from_manifest(self.manifest["image"])

    def check_fits(self, config: VLConfig) -> None:
        """Pages cut and normalised for another family's image processor would feed the model wrong pixels."""
        mismatch = self.image_params.processor_mismatch(config.vision)
        if mismatch:
            raise StoreError(f"dataset {self.prefix} was built for {self.model_family} ({'; '.join(mismatch)}), the "
                             f"model is {config.display_name} ({config.family}): rebuild it with mmprolong build-data "
                             "--model set to this model")

    def task(self, index: int) -> str:
        return self.manifest["tasks"][int(self.samples[index]["task"])]

    def loss_mask(self, index: int) -> np.ndarray:
        mask = np.zeros(int(self.samples[index]["tokens"]), dtype=bool)
        for start, end in self.loss_spans[index].reshape(-1, 2):
            mask[start:end] = True
        return mask

    def image_rows(self, index: int) -> range:
        row = self.samples[index]
        return range(int(row["first_image"]), int(row["first_image"]) + int(row["num_images"]))

    def image_bytes(self, index: int) -> list[bytes]:
        return [self.images[i].tobytes() for i in self.image_rows(index)]

    def image_grids(self, index: int) -> np.ndarray:
        rows = self.image_rows(index)
        return np.asarray(self.grids[rows.start:rows.stop])
