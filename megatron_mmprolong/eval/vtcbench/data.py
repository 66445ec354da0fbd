"""VTCBench-Wild's released files (`hf download --repo-type dataset MLLM-CL/VTCBench`): one
parquet split per category, Retrieval, Reasoning and Memory, each row a question (`problem`), its
gold strings (`answers`) and the rendered pages of its context (`images`: JPEG bytes in order).

The split's files are found as `datasets.load_dataset` finds them: through the `configs` of the
dataset card (README.md front matter; `data/<Split>-*` in the card we read), else in the two
layouts the repository has had (`data/<Split>-*.parquet`, `<Split>/*.parquet`). Every row of
every file read is checked before a model loads (a question, at least one non-empty gold string,
at least one image whose bytes are JPEG or PNG); an error names the file, the row and the reason.
Images are not kept: a request reads its row group's images when it is built (`ImageReader`).
"""

from __future__ import annotations

import glob
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_mmprolong.eval.dataset_qa import EvalError

SPLITS = ("Retrieval", "Reasoning", "Memory")  # the paper's table order
COLUMNS = ("problem", "answers", "images")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG


def _parquet():
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:  # a dependency of the package; a trimmed environment may lack it
        raise EvalError("VTCBench's parquet files need pyarrow: pip install pyarrow") from None
    return pq, pc


@dataclass(frozen=True)
class Sample:
    split: str
    index: int  # 0-based over the split's rows in file order (VLMEvalKit's per-split index)
    file: Path
    row: int  # 1-based row in its file
    row_group: int
    in_group: int  # 0-based row within its row group
    problem: str
    answers: tuple[str, ...]
    images: int  # number of page images

    @property
    def name(self) -> str:
        return f"{self.split} #{self.index} ({self.file.name} row {self.row})"


@dataclass(frozen=True)
class DataRoot:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> DataRoot:
        root = cls(Path(path))
        if not root.path.is_dir():
            raise EvalError(f"--data-root {root.path} is not a folder (the download of MLLM-CL/VTCBench)")
        return root

    def split_files(self, split: str) -> list[Path]:
        """The split's parquet files in name order, as the card's configs (or the known layouts) name them."""
        patterns = _card_patterns(self.path / "README.md").get(split) or [f"data/{split}-*.parquet",
                                                                         f"{split}/*.parquet"]
        files = sorted({Path(f) for p in patterns for f in glob.glob(str(self.path / p)) if Path(f).is_file()})
        if not files:
            raise EvalError(f"{self.path}: no parquet file of split {split} (looked for "
                            f"{', '.join(patterns)}); --data-root is the folder `hf download --repo-type dataset "
                            "MLLM-CL/VTCBench --local-dir DIR` fills")
        return files


def _card_patterns(card: Path) -> dict[str, list[str]]:
    """split -> path patterns of the card's default config ({} without a card or configs)."""
    import yaml

    if not card.is_file():
        return {}
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError as err:
        raise EvalError(f"{card}: the front matter is not YAML ({err})") from None
    found: dict[str, list[str]] = {}
    for config in (meta or {}).get("configs") or []:
        if not isinstance(config, dict) or config.get("config_name", "default") != "default":
            continue
        for entry in config.get("data_files") or []:
            if isinstance(entry, dict) and entry.get("split") in SPLITS:
                paths = entry.get("path")
                found[entry["split"]] = [paths] if isinstance(paths, str) else list(paths or [])
    return found


def read_split(root: DataRoot, split: str, max_samples: int | None = None) -> list[Sample]:
    """The split's samples (the first `max_samples`), every row of the files read checked."""
    if split not in SPLITS:
        raise EvalError(f"unknown VTCBench split {split!r}; the splits are {', '.join(SPLITS)}")
    samples: list[Sample] = []
    for path in root.split_files(split):
        if max_samples is not None and len(samples) >= max_samples:
            break
        samples += _read_file(path, split, len(samples))
    return samples[:max_samples] if max_samples is not None else samples


def _read_file(path: Path, split: str, first_index: int) -> list[Sample]:
    pq, _ = _parquet()
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:  # not a parquet file, cut short
        raise EvalError(f"{path}: not a readable parquet file ({err})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise EvalError(f"{path}: no column {', '.join(missing)} (a VTCBench split has {', '.join(COLUMNS)})")
    samples, row = [], 0
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=list(COLUMNS))
        except (pa.ArrowException, OSError, ValueError) as err:
            raise EvalError(f"{path}: row group {group} cannot be read ({err})") from None
        counts = _check_images(table.column("images"), path, row)
        for i, (problem, answers) in enumerate(zip(table.column("problem").to_pylist(),
                                                   table.column("answers").to_pylist())):
            where = f"{path}: row {row + i + 1}"
            if not isinstance(problem, str) or not problem.strip():
                raise EvalError(f"{where}: no question (problem is {problem!r})")
            if not isinstance(answers, list) or not answers:
                raise EvalError(f"{where}: no gold answer (answers is {answers!r})")
            if any(not isinstance(a, str) or not a.strip() for a in answers):
                raise EvalError(f"{where}: an empty gold answer in {answers!r} (every reply would contain it)")
            samples.append(Sample(split, first_index + len(samples), path, row + i + 1, group, i, problem,
                                  tuple(answers), int(counts[i])))
        row += table.num_rows
    return samples


def _check_images(column, path: Path, first_row: int) -> np.ndarray:
    """Images per row; raises naming the first row without images or with an image that is not
    JPEG or PNG bytes. Checked on the column as a whole (no Python loop over the images)."""
    import pyarrow as pa

    _, pc = _parquet()
    lists = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_list(lists.type) and not pa.types.is_large_list(lists.type):
        raise EvalError(f"{path}: column images is {lists.type}, not a list of images")
    counts = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise EvalError(f"{path}: row {first_row + empty[0] + 1}: no page image")
    values = pc.list_flatten(lists)
    data = values.field("bytes") if pa.types.is_struct(values.type) else values
    if not (pa.types.is_binary(data.type) or pa.types.is_large_binary(data.type)):
        raise EvalError(f"{path}: column images holds {values.type}, not image bytes")
    good = np.zeros(len(data), dtype=bool)
    for magic in _MAGIC:
        head = pc.binary_slice(pc.fill_null(data, b""), 0, len(magic))
        good |= pc.equal(head, pa.scalar(magic, head.type)).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~good)
    if bad.size:
        row = int(np.searchsorted(np.cumsum(counts), bad[0], side="right"))
        image = int(bad[0] - (np.cumsum(counts)[row - 1] if row else 0))
        raise EvalError(f"{path}: row {first_row + row + 1}: image {image + 1} is not JPEG or PNG bytes")
    return counts


class ImageReader:
    """A sample's page images (bytes, in order), read a row group at a time; the last few groups
    are kept, as requests are built in file order (several at once with an endpoint)."""

    def __init__(self, keep: int = 2):
        self._groups: OrderedDict[tuple[Path, int], object] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep

    def images(self, sample: Sample) -> list[bytes]:
        key = (sample.file, sample.row_group)
        with self._lock:
            column = self._groups.get(key)
            if column is None:
                pq, _ = _parquet()
                column = pq.ParquetFile(sample.file).read_row_group(sample.row_group, columns=["images"])["images"]
                self._groups[key] = column
                while len(self._groups) > self._keep:
                    self._groups.popitem(last=False)
            self._groups.move_to_end(key)
        pages = column[sample.in_group].as_py()
        return [p["bytes"] if isinstance(p, dict) else p for p in pages]
