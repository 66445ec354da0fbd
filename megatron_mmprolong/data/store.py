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
    PREFIX.sequence_checksums.npy  uint32 CRC-32 of every sequence of the .bin files and every
                                 metadata row (data/checksums.py), checked as the readers read them
    PREFIX.manifest.json         written last: format, model family, tokenizer, image parameters, counts,
                                 histograms, build arguments, each file's size (checked on
                                 opening), the CRC-32 of the small files (checked on opening), each
                                 file's SHA-256 (checked by inspect-data --verify) and a SHA-256 of
                                 its own content (checked on opening)

Format 2 added the checksums read by (issue 28). A format 1 dataset still opens, with one warning
that its samples are not verified as they are read.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_mmprolong.config import VLConfig
from megatron_mmprolong.data import checksums
from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.errors import BadInput

FORMAT = "megatron-mmprolong/multimodal-store"
FORMAT_VERSION = 2  # 2: checksums read by (sequence_checksums.npy, manifest "integrity" and its own checksum)
READABLE_VERSIONS = (1, 2)

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
ARRAYS = ("image_grids.npy", "samples.npy", "ids.json", "rejects.jsonl", checksums.SEQUENCES_FILE)


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
        self._sums = {"tokens": [], "loss_spans": [], "images": []}  # CRC-32 of the bytes each sequence writes

    def add(self, sample: EncodedSample, record: int) -> None:
        b = self._builders
        tokens = np.ascontiguousarray(sample.tokens, dtype=INDEXED["tokens"])
        spans = np.ascontiguousarray(sample.loss_spans.reshape(-1), dtype=INDEXED["loss_spans"])
        b["tokens"].add_item(torch.from_numpy(tokens))
        b["tokens"].end_document()
        b["loss_spans"].add_item(torch.from_numpy(spans))
        b["loss_spans"].end_document()
        self._sums["tokens"].append(checksums.crc32(tokens))
        self._sums["loss_spans"].append(checksums.crc32(spans))
        for data in sample.images:
            b["images"].add_item(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            b["images"].end_document()
            self._sums["images"].append(checksums.crc32(data))
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
        samples = np.array(self._rows, dtype=SAMPLE_DTYPE)
        grids = np.array(self._grids, dtype=np.int32).reshape(-1, 3)
        np.save(f"{self.prefix}.samples.npy", samples)
        np.save(f"{self.prefix}.image_grids.npy", grids)
        Path(f"{self.prefix}.ids.json").write_text(json.dumps(self._ids))
        Path(f"{self.prefix}.rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self._rejects))
        _save_sequence_checksums(self.prefix, self._sums, samples, grids)


def _save_sequence_checksums(prefix: str, sums: dict, samples: np.ndarray, grids: np.ndarray) -> None:
    rows = {"samples": checksums.row_crc32(samples), "image_grids": checksums.row_crc32(grids)}
    np.save(f"{prefix}.{checksums.SEQUENCES_FILE}", checksums.join_segments({**sums, **rows}))


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
    sums = {"tokens": [], "loss_spans": [], "images": []}
    for part in parts:
        samples = np.load(f"{part}.samples.npy")
        part_grids = np.load(f"{part}.image_grids.npy")
        # the CRCs of the part's sequences as its builder computed them, not of what is read back now
        part_sums = checksums.split_segments(np.load(f"{part}.{checksums.SEQUENCES_FILE}"), len(samples), len(part_grids))
        for name in sums:
            sums[name].append(part_sums[name])
        samples["first_image"] += images
        rows.append(samples)
        grids.append(part_grids)
        images += len(part_grids)
        ids += json.loads(Path(f"{part}.ids.json").read_text())
        rejects.append(Path(f"{part}.rejects.jsonl").read_text())
    samples = np.concatenate(rows) if rows else np.zeros(0, SAMPLE_DTYPE)
    grids = np.concatenate(grids) if grids else np.zeros((0, 3), np.int32)
    np.save(f"{prefix}.samples.npy", samples)
    np.save(f"{prefix}.image_grids.npy", grids)
    Path(f"{prefix}.ids.json").write_text(json.dumps(ids))
    Path(f"{prefix}.rejects.jsonl").write_text("".join(rejects))
    _save_sequence_checksums(prefix, {k: np.concatenate(v) if v else np.zeros(0, np.uint32) for k, v in sums.items()},
                             samples, grids)


class StoreError(BadInput, ValueError):
    pass


def read_manifest(prefix: str | Path) -> dict:
    manifest = Path(f"{prefix}.manifest.json")
    if not manifest.is_file():
        raise StoreError(f"{manifest} is missing: not a finished dataset (build it with mmprolong build-data)")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{manifest}: not readable JSON ({err}); the dataset is damaged, rebuild it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(f"{manifest}: not a dataset manifest of {FORMAT} v{FORMAT_VERSION}")
    recorded = data.get(checksums.MANIFEST_KEY)
    if data["format_version"] >= 2 or recorded is not None:
        if recorded is None:
            raise StoreError(f"{manifest} has no checksum of itself (format {data['format_version']} has one): the "
                             "manifest was edited or damaged; rebuild the dataset or restore the manifest")
        if recorded != checksums.manifest_digest(data):
            raise StoreError(f"{manifest}: the content differs from its own checksum (the manifest was edited or "
                             "damaged after the build); rebuild the dataset or restore the manifest")
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


_warned: set[str] = set()  # datasets without checksums this process has warned about


def _warn_unverified(prefix: str) -> None:
    """Once per dataset and process, and not from loader workers or ranks other than 0 (the
    process that planned the data or rank 0 has said it)."""
    if prefix in _warned:
        return
    _warned.add(prefix)
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    print(f"mmprolong: warning: dataset {prefix} was built before per-sample checksums (format 1): its samples "
          "are not verified as they are read; rebuild it with mmprolong build-data to have them checked "
          "(inspect-data --verify still checks its files whole)", file=sys.stderr, flush=True)


class CheckedSequences:
    """An `IndexedDataset` of a store whose sequences are checked against the build's CRC-32 as
    they are read (`sums` None: a dataset without checksums, read as is). Everything else
    (`index`, `sequence_lengths`, ...) is the dataset's."""

    def __init__(self, store: "MultimodalStore", name: str, dataset, sums: np.ndarray | None):
        self._store, self._name, self._dataset, self._sums = store, name, dataset, sums

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        data = self._dataset[index]
        if self._sums is not None:
            if isinstance(index, slice):
                for i, sequence in zip(range(*index.indices(len(self))), data):
                    self._check(i, sequence)
            else:
                self._check(int(index), data)
        return data

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """A part of a sequence (the whole sequence is read and checked)."""
        data = self[index]
        return data[offset:] if length is None else data[offset:offset + length]

    def _check(self, index: int, data: np.ndarray) -> None:
        if checksums.crc32(data) != self._sums[index]:
            index %= len(self)
            what = self._store._sample_of_image(index) if self._name == "images" else self._store._sample(index)
            raise self._store._damaged(f"{what} in", f"{self._name}.bin")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def __reduce__(self):  # in a loader worker: the store opened again there, checks included
        return getattr, (self._store, self._name)


class MultimodalStore:
    """Random access to a finished dataset (memory-mapped). What the readers use is checked
    against the build's checksums (data/checksums.py): the small files whole on opening, each
    sequence of the `.bin` files as `tokens`, `loss_spans` and `images` give it. `verify=False`
    skips both (for measuring what they cost)."""

    def __init__(self, prefix: str | Path, verify: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix, self.verify = str(prefix), verify
        self.manifest = read_manifest(self.prefix)
        check_sizes(self.prefix, self.manifest)
        integrity = self.manifest.get("integrity")
        if integrity is None:
            _warn_unverified(self.prefix)
        elif verify:
            self._check_files(integrity)
        self.ids = self._open("ids.json", lambda p: json.loads(Path(p).read_text()))
        self.samples = self._open("samples.npy", lambda p: np.load(p, mmap_mode="r"))
        self.grids = self._open("image_grids.npy", lambda p: np.load(p, mmap_mode="r"))
        sums = {}
        if integrity is not None and verify:
            sums = checksums.split_segments(np.load(f"{self.prefix}.{checksums.SEQUENCES_FILE}", mmap_mode="r"),
                                            len(self.samples), len(self.grids))
        for name in INDEXED:
            dataset = self._open(f"{name}.idx", lambda p: IndexedDataset(p[:-len(".idx")]))
            setattr(self, name, CheckedSequences(self, name, dataset, sums.get(name)))

    def _open(self, suffix: str, read):
        path = f"{self.prefix}.{suffix}"
        try:
            return read(path)
        except Exception as err:  # whatever a reader makes of damaged bytes of the right size
            raise StoreError(f"{path} cannot be read ({type(err).__name__}: {err}); the file is damaged: "
                             "mmprolong inspect-data --verify names every changed file") from None

    def __reduce__(self):
        return MultimodalStore, (self.prefix, self.verify)

    # ---- checks ------------------------------------------------------------------------------

    def _check_files(self, integrity: dict) -> None:
        """The small files whole (a few bytes per sample and per image); a changed one is named
        with the sample its change belongs to where the checksums can tell."""
        if integrity.get("algorithm") != checksums.ALGORITHM:
            raise StoreError(f"{self.prefix}.manifest.json: checksum algorithm {integrity.get('algorithm')!r} is not "
                             f"{checksums.ALGORITHM!r}: a newer mmprolong built this dataset; upgrade, or rebuild it")
        expected = integrity.get("files", {})
        missing = [f for f in checksums.OPEN_FILES if f not in expected]
        if missing:
            raise StoreError(f"{self.prefix}.manifest.json has no checksum of {missing[0]}: the manifest is damaged; "
                             "rebuild the dataset")
        self._checked: set[str] = set()
        for suffix in checksums.OPEN_FILES:
            if checksums.file_crc32(f"{self.prefix}.{suffix}") != expected[suffix]:
                raise self._damaged(*self._locate(suffix))
            self._checked.add(suffix)
        del self._checked

    def _locate(self, suffix: str) -> tuple[str, str]:
        """(what changed, the file) for a small file that fails its checksum; the files before it
        in OPEN_FILES are intact and say which sample it is."""
        from megatron.core.datasets.indexed_dataset import DType

        if suffix in (checksums.SEQUENCES_FILE, "ids.json"):
            return "", suffix
        samples = np.load(f"{self.prefix}.samples.npy", mmap_mode="r") if "samples.npy" in self._checked else None
        counts = self.manifest["counts"]
        sums = checksums.split_segments(np.load(f"{self.prefix}.{checksums.SEQUENCES_FILE}"), counts["samples"],
                                        counts["images"])
        if suffix == "samples.npy":
            where, row = checksums.row_damage(f"{self.prefix}.{suffix}", sums["samples"], SAMPLE_DTYPE,
                                              (counts["samples"],))
        elif suffix == "image_grids.npy":
            where, row = checksums.row_damage(f"{self.prefix}.{suffix}", sums["image_grids"], np.dtype(np.int32),
                                              (counts["images"], 3))
        else:
            name = suffix[:-len(".idx")]
            dtype = INDEXED[name]
            where, row = checksums.index_damage(f"{self.prefix}.{suffix}", len(sums[name]), np.dtype(dtype).itemsize,
                                                DType.code_from_dtype(dtype),
                                                Path(f"{self.prefix}.{name}.bin").stat().st_size)
        if row is None:
            return f"{where} of", suffix
        self.samples, self.ids = samples, json.loads(Path(f"{self.prefix}.ids.json").read_text())
        what = self._sample(row) if suffix in ("samples.npy", "tokens.idx", "loss_spans.idx") else self._sample_of_image(row)
        return f"{where} of {what} in", suffix

    def _sample(self, index: int) -> str:
        return f"sample {index} ({self.ids[index]})"

    def _sample_of_image(self, row: int) -> str:
        first = np.asarray(self.samples["first_image"])
        return f"image {row} of {self._sample(int(np.searchsorted(first, row, side='right')) - 1)}"

    def _damaged(self, what: str, suffix: str) -> StoreError:
        path = f"{self.prefix}.{suffix}"
        return StoreError(f"dataset {self.prefix}: {what + ' ' if what else ''}{path} differs from the build's "
                          "checksum (the file changed after the build); rebuild the dataset or restore the file "
                          "(mmprolong inspect-data --verify checks every file)")

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
