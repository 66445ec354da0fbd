"""A stand-in for a served VLM, for the CPU demo and tests: `TextLayerOracle` answers synth-qa's
requests about PDFs made by `synth-docs --format pdf` from the facts printed on their pages.

It is not a model. It recognises each page image of a request among the pages of the PDFs it
was given (rendered as synth-qa renders them, so the bytes are equal), reads the fact printed on
each of those pages from the text layer (an archive's access code or a shipment's weight), and
writes the page-anchored question of the requested task about them, in the JSON the project's
prompt asks for; asked to verify, it answers the question from the facts of the pages it is
shown. Served over HTTP by `ScriptedChatServer`, it lets `make demo` run the whole pipeline
(requests, retries, journal, validation, records, build-data) without a GPU. Where its pages do
not hold what a task needs (a reasoning question wants two weights), it says so in words, which
synth-qa rejects as `bad-json`, as it would a real model's refusal.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.data.pdf import open_pdf
from megatron_mmprolong.data.synth import Fact, single_question
from megatron_mmprolong.data.synth_qa.workers import render_pages

_FACT = re.compile(r"The access code of the (.+?) archive is ([A-Z]{2}-\d{4})\.|The (.+?) shipment weighs (\d+) kg\.")


class TextLayerOracle:
    def __init__(self, pdfs: list[str], dpi: int = 144, image: ImageParams = ImageParams(), backend: str = "auto"):
        self.facts: dict[str, Fact] = {}  # SHA-256 of a page's encoded image -> the fact on the page
        for pdf in pdfs:
            doc = open_pdf(pdf, backend)
            try:
                texts = [doc.text(i) for i in range(doc.page_count)]
            finally:
                doc.close()
            for number, (data, text) in enumerate(zip(render_pages(pdf, list(range(1, len(texts) + 1)), dpi, image,
                                                                   backend), texts), start=1):
                match = _FACT.search(" ".join(text.split()))
                if match:
                    code_entity, code, weight_entity, weight = match.groups()
                    fact = Fact(number, "code", code_entity, code) if code else \
                        Fact(number, "weight", weight_entity, weight)
                    self.facts[hashlib.sha256(data).hexdigest()] = fact

    def __call__(self, body: dict[str, Any]) -> str:
        content = body["messages"][-1]["content"]
        text = "\n".join(part["text"] for part in content if part["type"] == "text")
        facts = [self._fact(part["image_url"]["url"]) for part in content if part["type"] == "image_url"]
        facts = [f for f in facts if f is not None]
        task = re.search(r"Task type: ([\w-]+)", text)
        if task is None:
            question = text[text.rindex("Question:") + len("Question:"):].strip()
            return json.dumps({"answer": answer_from(question, facts)})
        choice = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)  # varies with the segment
        return write_question(task.group(1), facts, choice)

    def _fact(self, url: str) -> Fact | None:
        return self.facts.get(hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest())


def write_question(task: str, facts: list[Fact], choice: int) -> str:
    codes = [f for f in facts if f.kind == "code"]
    weights = [f for f in facts if f.kind == "weight"]
    if task == "extract-single" and facts:
        fact = facts[choice % len(facts)]
        return _reply(single_question(fact), fact.value, "String" if fact.kind == "code" else "Integer", [fact])
    if task == "extract-multi" and len(codes) >= 2:
        first = choice % (len(codes) - 1)
        chosen = codes[first:first + 2 + choice % 2]
        names = " and ".join(f.entity for f in chosen)
        return _reply(f"According to {_pages(chosen)}, what are the access codes of the {names} archives? Answer in "
                      f"that order, separated by commas.", [f.value for f in chosen], "List", chosen)
    if task == "reasoning" and len(weights) >= 2:
        a, b = weights[choice % len(weights)], weights[(choice + 1) % len(weights)]
        a, b = sorted((a, b), key=lambda f: f.page)
        return _reply(f"According to {_pages([a, b])}, what is the combined weight, in kg, of the {a.entity} and "
                      f"{b.entity} shipments?", str(int(a.value) + int(b.value)), "Integer", [a, b])
    return f"These pages do not hold what a {task} question needs."


def answer_from(question: str, facts: list[Fact]) -> str:
    """The answer to one of `write_question`'s questions from the facts of the pages shown."""
    named = sorted((f for f in facts if f.entity.lower() in question.lower()),
                   key=lambda f: question.lower().index(f.entity.lower()))
    if "combined weight" in question:
        return str(sum(int(f.value) for f in named if f.kind == "weight"))
    return ", ".join(f.value for f in named) or "Not answerable"


def _pages(facts: list[Fact]) -> str:
    numbers = [str(f.page) for f in facts]
    return "pages " + ", ".join(numbers[:-1]) + " and " + numbers[-1]


def _reply(question: str, answer, answer_format: str, facts: list[Fact]) -> str:
    return json.dumps({"question": question, "answer": answer, "answer_format": answer_format,
                       "evidence_pages": [f.page for f in facts], "evidence": " ".join(f.sentence() for f in facts)})
