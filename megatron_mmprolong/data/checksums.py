"""Checksums a dataset is read by (issue 28): what training and eval read is checked as they read it.

The root is the manifest, which carries a SHA-256 of its own canonical content. It records the
CRC-32 of every small file the readers use (`OPEN_FILES`: the three `.idx` files, samples.npy,
image_grids.npy, ids.json and the per-sequence checksums), checked each time a dataset is opened:
a few bytes per sample and per image, so opening reads them whole. The large files (`.bin`) are
checked one sequence at a time as they are read: PREFIX.sequence_checksums.npy holds the CRC-32 of
every sequence of tokens.bin, loss_spans.bin and images.bin, computed by the builder from the bytes
it wrote. Megatron's MMIDIDX files stay as Megatron writes and reads them.

PREFIX.sequence_checksums.npy: uint32, one segment after the other (`SEGMENTS`): a CRC per sample
of its tokens, of its loss spans and of its samples.npy row, then a CRC per image of its encoded
bytes and of its image_grids.npy row. The row CRCs name the sample of a damaged metadata row; the
whole files are checked at opening.

CRC-32 (zlib, in the standard library) finds every flipped byte and every burst of up to 32 bits;
at ~1 GB/s per core it costs well under 1% of a loader that decodes the pages it checks
(benchmarks/bench_checksum.py). It guards against damage, not against an adversary: the manifest,
which an editor is most likely to touch, has a SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np

ALGORITHM = "crc32"
SEQUENCES_FILE = "sequence_checksums.npy"
# Checked whole at every opening, in this order: each may name the samples of the ones after it.
OPEN_FILES = (SEQUENCES_FILE, "ids.json", "samples.npy", "tokens.idx", "loss_spans.idx", "images.idx",
              "image_grids.npy")
SEGMENTS = (("tokens", "samples"), ("loss_spans", "samples"), ("samples", "samples"), ("images", "images"),
            ("image_grids", "images"))
MANIFEST_KEY = "manifest_checksum"
_BLOCK = 8 << 20


def crc32(data) -> int:
    """CRC-32 of bytes or of a C-contiguous array's memory."""
    return zlib.crc32(data)


def file_crc32(path: str | Path) -> int:
    value = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            value = zlib.crc32(block, value)
    return value


def row_crc32(array: np.ndarray) -> np.ndarray:
    """uint32 CRC of each row's bytes (a structured 1-D array or a 2-D one)."""
    rows = np.ascontiguousarray(array)
    raw = rows.view(np.uint8).reshape(len(rows), -1) if len(rows) else np.zeros((0, 0), np.uint8)
    return np.fromiter((zlib.crc32(row) for row in raw), dtype=np.uint32, count=len(raw))


def join_segments(segments: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(segments[name], dtype=np.uint32) for name, _ in SEGMENTS])


def split_segments(sums: np.ndarray, samples: int, images: int) -> dict[str, np.ndarray]:
    """The segments of a sequence-checksum array of `samples` samples and `images` images."""
    counts = {"samples": samples, "images": images}
    expected = sum(counts[per] for _, per in SEGMENTS)
    if len(sums) != expected:
        raise ValueError(f"{len(sums)} sequence checksums, {expected} expected")
    out, start = {}, 0
    for name, per in SEGMENTS:
        out[name] = sums[start:start + counts[per]]
        start += counts[per]
    return out


# ---- the manifest -------------------------------------------------------------------------------

def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's content without its own checksum: sorted keys, no whitespace, so
    that reformatting the file (indentation, key order) does not change it."""
    content = {k: v for k, v in manifest.items() if k != MANIFEST_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ---- finding what a changed small file changed ------------------------------------------------

MMIDIDX_HEADER = 34  # magic 9 bytes, version 8, dtype code 1, sequence count 8, document count 8


def index_damage(path: str | Path, count: int, itemsize: int, dtype_code: int, bin_size: int) -> tuple[str, int | None]:
    """Where an MMIDIDX `.idx` file of `count` sequences that fails its checksum was changed:
    ("the recorded length" | "the recorded offset" | "the document boundary", sequence) or ("the header", None).
    The builder's files are contiguous (each pointer is the sum of the lengths before it, the
    last sequence ends at the end of the `.bin`, document i ends at sequence i), so a changed
    entry breaks that rule at its own sequence."""
    data = Path(path).read_bytes()
    expected_size = MMIDIDX_HEADER + 12 * count + 8 * (count + 1)
    if (len(data) != expected_size or data[:9] != b"MMIDIDX\x00\x00" or struct.unpack("<Q", data[9:17])[0] != 1
            or data[17] != dtype_code or struct.unpack("<QQ", data[18:34]) != (count, count + 1)):
        return "the header", None
    lengths = np.frombuffer(data, np.int32, count, MMIDIDX_HEADER).astype(np.int64)
    pointers = np.frombuffer(data, np.int64, count, MMIDIDX_HEADER + 4 * count)
    documents = np.frombuffer(data, np.int64, count + 1, MMIDIDX_HEADER + 12 * count)
    ends = np.cumsum(lengths * itemsize)
    starts = np.concatenate([[0], ends[:-1]]) if count else ends
    wrong = np.nonzero(pointers != starts)[0]
    if count and ends[-1] != bin_size:  # a length changed: every later pointer is off, or it is the last
        return "the recorded length", int(wrong[0]) - 1 if len(wrong) else count - 1
    if len(wrong):
        return "the recorded offset", int(wrong[0])
    wrong = np.nonzero(documents != np.arange(count + 1))[0]
    if len(wrong):
        return "the document boundary", max(int(wrong[0]) - 1, 0)
    return "the header", None


def row_damage(path: str | Path, sums: np.ndarray, dtype: np.dtype, shape: tuple) -> tuple[str, int | None]:
    """("the row", index) of the first row of a `.npy` file that differs from its checksum, or
    ("the header", None) where the array cannot be read as built."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # whatever numpy makes of a changed header
        return "the header", None
    if array.dtype != dtype or array.shape != shape:
        return "the header", None
    wrong = np.nonzero(row_crc32(array) != sums)[0]
    return ("the row", int(wrong[0])) if len(wrong) else ("the header", None)
