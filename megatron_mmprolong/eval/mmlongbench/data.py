"""The released MMLongBench files (the unpacked `mmlb_data/` and `mmlb_image/` under one data
root) and the harness's choice of samples from them.

Document QA: `mmlb_data/documentQA/{dataset}_K{8,16,32,64,128}.jsonl`, each record a question on
one document with `page_list` (image paths relative to `mmlb_image/`, the parent folder naming
the page's document) and `answer_format`. MM-NIAH: `mmlb_data/NIAH/{task}_test_K{L}_dep{d}.jsonl`
with the depth each task's harness config names. The harness evaluates 100 document-QA samples
per file (a seed-42 shuffle, as `datasets.Dataset.shuffle` draws it: numpy's default_rng
permutation) and 50 MM-NIAH samples per file (Python's `random.sample` of the sorted ids after
seeding 42, kept in file order).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_mmprolong.eval.dataset_qa import EvalError

DOC_DATASETS = ("longdocurl", "mmlongdoc", "slidevqa")  # the order of the harness's docqa_all.yaml
NIAH_DEPTHS = {"retrieval-text": 6, "counting-text": 3, "reasoning-text": 3,  # mm_niah_text_all.yaml
               "retrieval-image": 6, "counting-image": 3, "reasoning-image": 6}  # mm_niah_image_all.yaml
NIAH_DATASETS = tuple(NIAH_DEPTHS)
RELEASED_LENGTHS = (8, 16, 32, 64, 128)  # K tokens
EXTENDED_LENGTHS = (256, 512)  # built from the 128K files (contexts.py)
HARNESS_SAMPLES = {"docqa": 100, "niah": 50}  # max_test_samples of the harness's configs
HARNESS_SEED = 42
ANSWER_FORMATS = ("Integer", "Float", "String", "List", "None")

_DOC_FIELDS = ("id", "doc_name", "question", "answer", "answer_format", "page_list")
_NIAH_FIELDS = ("id", "ctxs", "image_list", "question", "answer")
_NIAH_EXTRA_IMAGES = {"retrieval-image": "choices_image", "reasoning-image": "choices_image",
                      "counting-image": "needle_image_list"}


def category(dataset: str) -> str:
    if dataset in DOC_DATASETS:
        return "docqa"
    if dataset in NIAH_DEPTHS:
        return "niah"
    raise EvalError(f"unknown MMLongBench dataset {dataset!r}; known: {', '.join(DOC_DATASETS + NIAH_DATASETS)}")


@dataclass(frozen=True)
class Sample:
    dataset: str
    length: int  # K tokens: 8 ... 128, or 256 / 512 for contexts built from the 128K file
    line: int  # 1-based line of the record in its released file
    record: dict[str, Any]

    @property
    def category(self) -> str:
        return category(self.dataset)

    @property
    def id(self) -> str:
        return str(self.record["id"])


@dataclass(frozen=True)
class DataRoot:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "DataRoot":
        root = cls(Path(path))
        for folder in (root.data, root.images):
            if not folder.is_dir():
                raise EvalError(f"{folder} is not there: --data-root is the folder holding the unpacked "
                                "mmlb_data/ and mmlb_image/ of MMLongBench (see the README)")
        return root

    @property
    def data(self) -> Path:
        return self.path / "mmlb_data"

    @property
    def images(self) -> Path:
        return self.path / "mmlb_image"

    def file(self, dataset: str, length: int) -> Path:
        if category(dataset) == "docqa":
            return self.data / "documentQA" / f"{dataset}_K{length}.jsonl"
        return self.data / "NIAH" / f"{dataset}_test_K{length}_dep{NIAH_DEPTHS[dataset]}.jsonl"

    def image(self, relative: str) -> Path:
        return self.images / relative


def read_released(root: DataRoot, dataset: str, length: int) -> list[Sample]:
    """Every record of a released file, checked: a missing file or field, bad JSON or an image
    count that does not match the prompt's placeholders is an error naming the file and line."""
    path = root.file(dataset, length)
    if not path.is_file():
        raise EvalError(f"{path}: no such file (is --data-root the unpacked MMLongBench data, with its "
                        f"{path.parent.name}/ files?)")
    samples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise EvalError(f"{path}:{number}: not JSON ({err})") from None
            _check(record, dataset, f"{path}:{number}")
            samples.append(Sample(dataset, length, number, record))
    if not samples:
        raise EvalError(f"{path}: no records")
    return samples


def _check(record: Any, dataset: str, where: str) -> None:
    doc = category(dataset) == "docqa"
    fields = _DOC_FIELDS if doc else (*_NIAH_FIELDS, *filter(None, [_NIAH_EXTRA_IMAGES.get(dataset)]))
    if not isinstance(record, dict):
        raise EvalError(f"{where}: a record must be a JSON object")
    missing = [f for f in fields if f not in record]
    if missing:
        raise EvalError(f"{where}: the record lacks {', '.join(missing)}")
    if doc:
        if record["answer_format"] not in ANSWER_FORMATS:
            raise EvalError(f"{where}: answer_format {record['answer_format']!r} is not one of {', '.join(ANSWER_FORMATS)}")
        pages = record["page_list"]
        if not pages or not all(isinstance(p, str) and "/" in p for p in pages):
            raise EvalError(f"{where}: page_list must list image paths of the form <document id>/<page image>")
    else:
        if not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in record["ctxs"]):
            raise EvalError(f"{where}: ctxs must be a list of {{\"text\": ...}} paragraphs")
        images = len(record["image_list"]) + len(record.get(_NIAH_EXTRA_IMAGES.get(dataset, ""), []))
        placeholders = sum(c["text"].count("<image>") for c in record["ctxs"]) + record["question"].count("<image>")
        if dataset in ("retrieval-image", "reasoning-image"):
            placeholders += len(record["choices_image"])  # the harness writes a placeholder per choice
        if images != placeholders:
            raise EvalError(f"{where}: {placeholders} <image> placeholders but {images} images")


def harness_selection(samples: list[Sample], limit: int | None = None, seed: int = HARNESS_SEED) -> list[Sample]:
    """The samples the harness evaluates from one file (see the module docstring); `limit`
    replaces its number of samples per file."""
    if not samples:
        return []
    kind = samples[0].category
    count = HARNESS_SAMPLES[kind] if limit is None else limit
    if kind == "docqa":
        order = np.random.default_rng(seed).permutation(len(samples))[:count]
        return [samples[i] for i in order]
    ids = sorted({s.record["id"] for s in samples})
    chosen = set(random.Random(seed).sample(ids, min(count, len(ids))))
    return [s for s in samples if s.record["id"] in chosen]


def image_paths(sample: Sample) -> list[str]:
    """The sample's images, relative to the image root, in prompt order."""
    record = sample.record
    if sample.category == "docqa":
        return list(record["page_list"])
    return [*record["image_list"], *record.get(_NIAH_EXTRA_IMAGES.get(sample.dataset, ""), [])]


def check_images(root: DataRoot, samples: list[Sample]) -> None:
    """Every image the samples need exists, before a model loads; the error names the paths."""
    missing = sorted({str(root.image(p)) for s in samples for p in image_paths(s) if not root.image(p).is_file()})
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise EvalError(f"{len(missing)} image(s) are missing under {root.images}: {', '.join(missing[:3])}{more} "
                        "(unpack every *_image.tar.gz of MMLongBench there)")
