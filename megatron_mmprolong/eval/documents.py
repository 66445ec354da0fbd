"""The user's document records (page images or PDFs) as pages for evaluation prompts: reading
them, rendering PDF pages once, and counting each page's tokens in a prompt. Shared by
`eval extend` (padding) and `eval needle --haystack` (needles in the user's own pages)."""

from __future__ import annotations

import re
from pathlib import Path

from megatron_mmprolong.data.images import ImageParams, image_size, vision_tokens
from megatron_mmprolong.data.pdf import open_pdf
from megatron_mmprolong.data.records import DocumentRecord, RecordError, read_jsonl
from megatron_mmprolong.eval.dataset_qa import EvalError

PROMPT_TOKENS = 80  # system prompt, chat markers and the question, roughly
PAGE_LABEL_TOKENS = 6  # "Page N:" and the vision start/end markers


class _AnyTask(tuple):
    """Every task label is welcome here: the records are evaluated, not trained on."""

    def __contains__(self, task) -> bool:
        return True


def read_documents(paths) -> list[DocumentRecord]:
    """Document records of the JSONL files; a bad line or a chat record is an error naming it."""
    documents = []
    for path in paths:
        for source, record in read_jsonl(path, allowed_tasks=_AnyTask()):
            if isinstance(record, RecordError):
                raise EvalError(f"{source}: {record}")
            if not isinstance(record, DocumentRecord):
                raise EvalError(f"{source}: evaluation needs document records (pages or pdf), not chats")
            documents.append(record)
    return documents


def page_images(record: DocumentRecord, pages_dir: Path, dpi: int) -> list[str]:
    """The record's page image paths; PDF pages are rendered to PNG once."""
    if record.pages:
        return list(record.pages)
    pdf = open_pdf(record.pdf)
    try:
        first, last = record.page_range or (1, pdf.page_count)
        folder = pages_dir / re.sub(r"[^\w.-]", "_", record.id)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for number in range(first, last + 1):
            path = folder / f"page_{number:04d}.png"
            if not path.is_file():
                pdf.render(number - 1, dpi).save(path)
            paths.append(str(path))
        return paths
    finally:
        pdf.close()


class PageTokens:
    """Tokens a page image takes in a prompt (its vision tokens and label), read once per path."""

    def __init__(self, image: ImageParams):
        self.image = image
        self._sizes: dict[str, int] = {}

    def __call__(self, path: str) -> int:
        if path not in self._sizes:
            self._sizes[path] = vision_tokens(*image_size(path), self.image) + PAGE_LABEL_TOKENS
        return self._sizes[path]


def pages_until(pool: list[str], start: int, tokens: int, length: int, page_tokens) -> list[str]:
    """Pages of `pool` from index `start` on, wrapping around, until a prompt of `tokens` tokens
    plus these pages reaches `length`."""
    pages = []
    while tokens < length:
        pages.append(pool[(start + len(pages)) % len(pool)])
        tokens += page_tokens(pages[-1])
    return pages
