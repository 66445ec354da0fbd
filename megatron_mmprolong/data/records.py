"""Input records, one JSON object per line (schema: record.schema.json beside this file).

Document QA:  {"id", "pdf" (+ "page_range") | "pages", "task", "question", "answer",
               "evidence_pages"?, "meta"?}
Chat:         {"id", "messages": [{"role", "content"}], "images"?, "task"?, "meta"?}
Paths are relative to the JSONL file. Pages are numbered from 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from megatron_mmprolong.errors import BadInput

PAPER_TASKS = ("extract-single", "extract-multi", "reasoning", "ocr-full", "ocr-needle")
IMAGE_PLACEHOLDER = "<image>"


class RecordError(BadInput, ValueError):
    """A record that cannot become a sample; the message is the reject reason."""


@dataclass(frozen=True)
class Source:
    """Where a record came from, for reject reports: 'records.jsonl:17'."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class DocumentRecord:
    id: str
    task: str
    question: str
    answer: str
    pdf: str | None = None
    page_range: tuple[int, int] | None = None  # inclusive, 1-based
    pages: tuple[str, ...] = ()
    evidence_pages: tuple[int, ...] = ()  # 1-based within the document
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class ChatRecord:
    id: str
    task: str
    messages: tuple[tuple[str, str], ...]  # (role, content with <image> placeholders)
    images: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


Record = DocumentRecord | ChatRecord


def read_jsonl(
    path: str | Path, allowed_tasks: tuple[str, ...] = (*PAPER_TASKS, "chat")
) -> Iterator[tuple[Source, Record | RecordError]]:
    """Records of a JSONL file, or the error of each line that is not one (never raises on
    bad lines). Task labels outside `allowed_tasks` are rejected."""
    path = Path(path)
    base = path.parent
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = Source(str(path), number)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield source, RecordError(f"line is not UTF-8 ({err.reason} at byte {err.start})")
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                yield source, RecordError(f"invalid JSON ({err.msg} at column {err.colno})")
                continue
            try:
                record = parse_record(data, base, default_id=f"{path.stem}-{number}")
                if record.task not in allowed_tasks:
                    raise RecordError(f"unknown task {record.task!r} (allowed: {', '.join(allowed_tasks)})")
                yield source, record
            except RecordError as err:
                yield source, err


def parse_record(data: Any, base: Path, default_id: str) -> Record:
    if not isinstance(data, dict):
        raise RecordError("record is not a JSON object")
    record_id = _string(data.get("id", default_id), "id")
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise RecordError("meta must be an object")
    if "messages" in data:
        return _chat(data, base, record_id, meta)
    task = _string(data.get("task"), "task")
    question = _string(data.get("question"), "question")
    answer = data.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise RecordError("answer is missing")
    if isinstance(answer, list):
        answer = ", ".join(str(a) for a in answer)
    answer = str(answer)
    evidence = data.get("evidence_pages") or []
    if not isinstance(evidence, list) or not all(isinstance(p, int) and p >= 1 for p in evidence):
        raise RecordError("evidence_pages must be a list of page numbers >= 1")
    has_pdf, has_pages = "pdf" in data, "pages" in data
    if has_pdf == has_pages:
        raise RecordError("a document record needs exactly one of 'pdf' or 'pages'")
    if has_pdf:
        page_range = data.get("page_range")
        if page_range is not None:
            if (not isinstance(page_range, list) or len(page_range) != 2
                    or not all(isinstance(p, int) for p in page_range) or not 1 <= page_range[0] <= page_range[1]):
                raise RecordError("page_range must be [first, last] with 1 <= first <= last")
            page_range = tuple(page_range)
        return DocumentRecord(
            id=record_id, task=task, question=question, answer=answer,
            pdf=_path(data["pdf"], base, "pdf"), page_range=page_range,
            evidence_pages=tuple(evidence), meta=meta,
        )
    pages = data["pages"]
    if not isinstance(pages, list) or not pages:
        raise RecordError("pages must be a non-empty list of image paths")
    return DocumentRecord(
        id=record_id, task=task, question=question, answer=answer,
        pages=tuple(_path(p, base, "page") for p in pages), evidence_pages=tuple(evidence), meta=meta,
    )


def _chat(data: dict, base: Path, record_id: str, meta: dict) -> ChatRecord:
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError("messages must be a non-empty list")
    parsed = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RecordError("each message needs a role of system, user or assistant")
        parsed.append((message["role"], _string(message.get("content"), "content")))
    if not any(role == "assistant" for role, _ in parsed):
        raise RecordError("answer is missing (no assistant message)")
    images = data.get("images") or []
    if not isinstance(images, list):
        raise RecordError("images must be a list of paths")
    placeholders = sum(content.count(IMAGE_PLACEHOLDER) for _, content in parsed)
    if placeholders != len(images):
        raise RecordError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    task = _string(data.get("task", "chat"), "task")
    return ChatRecord(
        id=record_id, task=task, messages=tuple(parsed),
        images=tuple(_path(p, base, "image") for p in images), meta=meta,
    )


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{name} must be a non-empty string")
    return value


def _path(value: Any, base: Path, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecordError(f"{name} path must be a non-empty string")
    return str((base / value).resolve())
