"""OCR targets from a PDF's text layer (`build-data --task ocr-full | ocr-needle` on a folder).

`ocr-full` transcribes every page; `ocr-needle` names 1-3 pages, chosen per document from the
build seed, and the other pages are distractors. Questions and answers are made when the
document is opened (in the worker), so building a folder reads each PDF once.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from megatron_mmprolong.data.records import DocumentRecord, RecordError, Source

OCR_TASKS = ("ocr-full", "ocr-needle")


class NoTextError(RecordError):
    pass


def pdf_folder_records(folder: str | Path, task: str) -> list[tuple[Source, DocumentRecord]]:
    if task not in OCR_TASKS:
        raise ValueError(f"a PDF folder builds {' or '.join(OCR_TASKS)} samples, not {task!r}")
    paths = sorted(Path(folder).rglob("*.pdf"))
    return [
        (Source(str(path), 0), DocumentRecord(id=str(path.relative_to(folder)), task=task, question="-",
                                              answer="-", pdf=str(path.resolve()), meta={"text_layer": True}))
        for path in paths
    ]


def ocr_target(record: DocumentRecord, page_numbers: list[int], page_text, seed: int) -> tuple[str, str, tuple[int, ...]]:
    """(question, answer, evidence pages) from `page_text(number)`."""
    if record.task == "ocr-full":
        chosen = list(page_numbers)
        question = "Transcribe the text of every page of this document."
    else:
        rng = random.Random(f"{seed}:{record.id}")
        chosen = sorted(rng.sample(page_numbers, rng.randint(1, min(3, len(page_numbers)))))
        named = ", ".join(str(p) for p in chosen[:-1]) + (" and " if len(chosen) > 1 else "") + str(chosen[-1])
        question = f"Transcribe the text of page{'s' if len(chosen) > 1 else ''} {named}."
    texts = {p: _clean(page_text(p)) for p in chosen}
    empty = [p for p, text in texts.items() if not text]
    if empty and (record.task == "ocr-needle" or len(empty) == len(texts)):
        raise NoTextError(f"page {empty[0]} has no text layer to transcribe")
    if len(chosen) == 1:
        answer = texts[chosen[0]]
    else:
        answer = "\n\n".join(f"Page {p}:\n{texts[p]}" for p in chosen if texts[p])
    return question, answer, tuple(chosen)


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
