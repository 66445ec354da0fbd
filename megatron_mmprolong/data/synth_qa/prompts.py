"""The generator's and the verifier's messages, from a versioned prompt file.

The project's prompts are `prompts_v1.yaml` beside this module; `--prompt-file` gives another
file with the same keys. Its `version` and the SHA-256 of its text go into every record's meta
and into the journal keys, so a changed prompt never reuses answers to the old one. Page images
go as base64 `image_url` parts, each after its label with the page's number in the whole document.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from megatron_mmprolong.data.synth_qa.documents import QA_TASKS, QuestionPlan, Section, SynthQAError
from megatron_mmprolong.files import read_yaml_mapping
from megatron_mmprolong.serving.chat import image_mime, image_part, text_part

DEFAULT_PROMPTS = Path(__file__).with_name("prompts_v1.yaml")
_TEXTS = ("system", "page_label", "generate_intro", "generate", "verify_intro", "verify")
_PLACEHOLDERS = {
    "page_label": ("n",),
    "generate_intro": ("first_page", "last_page", "segment_pages", "document_pages"),
    "generate": ("task", "task_instructions", "first_page", "last_page", "segment_pages", "document_pages", "sections"),
    "verify_intro": ("pages",),
    "verify": ("question", "pages"),
}


@dataclass(frozen=True)
class Prompts:
    version: str
    sha256: str
    texts: dict[str, str]
    tasks: dict[str, str]  # task -> its instructions

    def fill(self, name: str, **values: Any) -> str:
        return Template(self.texts[name]).substitute(values).strip()


def load_prompts(path: str | Path | None = None) -> Prompts:
    """The prompt file, checked: every key present, no unknown placeholder, all three tasks."""
    path = Path(path or DEFAULT_PROMPTS)
    try:
        raw, data = read_yaml_mapping(path)
    except ValueError as err:
        raise SynthQAError(f"prompt file {path}: {err}") from None
    missing = [k for k in ("version", *_TEXTS, "tasks") if not data.get(k)]
    if missing:
        raise SynthQAError(f"prompt file {path}: missing {', '.join(missing)}")
    tasks = data["tasks"]
    if not isinstance(tasks, dict) or any(not isinstance(tasks.get(t), str) for t in QA_TASKS):
        raise SynthQAError(f"prompt file {path}: tasks must give instructions for {', '.join(QA_TASKS)}")
    prompts = Prompts(str(data["version"]), hashlib.sha256(raw).hexdigest(), {k: str(data[k]) for k in _TEXTS},
                      {t: tasks[t].strip() for t in QA_TASKS})
    for name, fields in _PLACEHOLDERS.items():
        try:
            prompts.fill(name, **{f: "x" for f in fields})
        except (KeyError, ValueError) as err:
            raise SynthQAError(f"prompt file {path}: {name} has an unknown or malformed placeholder ({err}); "
                               f"it may use ${', $'.join(fields)}") from None
    return prompts


def generation_messages(prompts: Prompts, plan: QuestionPlan, images: list[bytes]) -> list[dict[str, Any]]:
    """System prompt, then the segment's labelled pages between the intro and the instructions."""
    segment = plan.segment
    values = dict(first_page=segment.first, last_page=segment.last, segment_pages=len(segment),
                  document_pages=plan.document_pages)
    content = [text_part(prompts.fill("generate_intro", **values)), *_pages(prompts, segment.pages, images),
               text_part(prompts.fill("generate", task=plan.task, task_instructions=prompts.tasks[plan.task],
                                      sections=sections_sentence(plan.sections), **values))]
    return [{"role": "system", "content": prompts.fill("system")}, {"role": "user", "content": content}]


def verification_messages(prompts: Prompts, question: str, pages: list[int],
                          images: list[bytes]) -> list[dict[str, Any]]:
    named = ", ".join(map(str, pages))
    content = [text_part(prompts.fill("verify_intro", pages=named)), *_pages(prompts, pages, images),
               text_part(prompts.fill("verify", question=question, pages=named))]
    return [{"role": "system", "content": prompts.fill("system")}, {"role": "user", "content": content}]


def sections_sentence(sections: tuple[Section, ...]) -> str:
    if not sections:
        return ""
    named = "; ".join(f'"{s.title}" (starts on page {s.page})' for s in sections)
    return f"Sections of the document on these pages: {named}."


def _pages(prompts: Prompts, numbers: list[int], images: list[bytes]) -> list[dict[str, Any]]:
    parts = []
    for number, data in zip(numbers, images, strict=True):
        parts += [text_part(prompts.fill("page_label", n=number)), image_part(data, image_mime(data))]
    return parts
