"""Checks of a generated question-answer pair; each failure is a reject with a reason.

Reasons, in the order they are checked: `refused` (the server refused the request), `unrenderable`
(a page of the segment did not render), `truncated` (the reply was cut at --max-tokens),
`bad-json` (no JSON object in the reply), `missing-fields` (a field absent, empty or of the
wrong type), `empty-answer`, `answer-too-long`, `evidence-outside-segment`,
`evidence-page-count` (extract-single needs one evidence page, extract-multi and reasoning two
or more), `no-anchor` (the question names no page and no section), `anchor-outside-segment` (it
names a page the generator did not see), then per document `duplicate-question`, and with
--verify `verify-refused` and `verify-disagrees`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

from megatron_mmprolong.data.synth_qa.documents import PageRange, Section

ANSWER_FORMATS = ("String", "Integer", "Float", "List")
FIELDS = ("question", "answer", "answer_format", "evidence_pages", "evidence")


class Reject(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class QA:
    question: str
    answer: str | list  # a list for List answers given as JSON arrays
    answer_format: str
    evidence_pages: tuple[int, ...]
    evidence: str

    @property
    def answer_text(self) -> str:
        return ", ".join(map(str, self.answer)) if isinstance(self.answer, list) else str(self.answer)


def json_object(text: str) -> dict:
    """The reply's JSON object: the whole reply, or inside a ``` fence, or from its first '{' to
    its last '}' (models often wrap the object in a sentence)."""
    candidates = [text.strip()]
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fence:
        candidates.append(fence.group(1).strip())
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{"):text.rindex("}") + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise Reject("bad-json", f"no JSON object in the reply: {text[:120]!r}")


def check_qa(data: dict, task: str, segment: PageRange, sections: tuple[Section, ...], max_answer_chars: int) -> QA:
    """The pair, or a Reject: fields, answer, evidence pages and the question's anchor."""
    qa = _fields(data)
    if not qa.answer_text.strip():
        raise Reject("empty-answer", "the answer is empty")
    if len(qa.answer_text) > max_answer_chars:
        raise Reject("answer-too-long", f"the answer has {len(qa.answer_text)} characters, more than "
                                        f"--max-answer-chars {max_answer_chars}")
    outside = [p for p in qa.evidence_pages if not segment.first <= p <= segment.last]
    if outside:
        raise Reject("evidence-outside-segment", f"evidence page {outside[0]} is outside the segment {segment}")
    distinct = len(set(qa.evidence_pages))
    if task == "extract-single" and distinct != 1:
        raise Reject("evidence-page-count", f"extract-single needs one evidence page, got {distinct}")
    if task != "extract-single" and distinct < 2:
        raise Reject("evidence-page-count", f"{task} needs evidence on 2 or more pages, got {distinct}")
    pages = anchored_pages(qa.question)
    if not pages and not names_a_section(qa.question, sections):
        raise Reject("no-anchor", "the question names no page and no section")
    wrong = [p for p in pages if not segment.first <= p <= segment.last]
    if wrong:
        raise Reject("anchor-outside-segment", f"the question names page {wrong[0]}, outside the segment {segment}")
    return qa


def _fields(data: dict) -> QA:
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise Reject("missing-fields", f"the reply lacks {', '.join(missing)}")
    question, answer, answer_format, evidence = (data[f] for f in ("question", "answer", "answer_format", "evidence"))
    if not isinstance(question, str) or not question.strip():
        raise Reject("missing-fields", "question must be a non-empty string")
    if not isinstance(evidence, str) or not evidence.strip():
        raise Reject("missing-fields", "evidence must be a non-empty string")
    formats = {f.lower(): f for f in ANSWER_FORMATS}
    if not isinstance(answer_format, str) or answer_format.strip().lower() not in formats:
        raise Reject("missing-fields",
                     f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    if isinstance(answer, list):
        if not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answer):
            raise Reject("missing-fields", "a list answer must hold strings or numbers")
        answer = [a.strip() if isinstance(a, str) else a for a in answer if not (isinstance(a, str) and not a.strip())]
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    elif answer is None:
        answer = ""
    elif not isinstance(answer, str):
        raise Reject("missing-fields", f"answer must be a string, a number or a list, got {type(answer).__name__}")
    pages = data["evidence_pages"]
    if isinstance(pages, (int, str)):
        pages = [pages]
    try:
        numbers = tuple(int(p) for p in pages if not isinstance(p, bool))
    except (TypeError, ValueError):
        raise Reject("missing-fields", f"evidence_pages must be page numbers, got {pages!r}") from None
    if not numbers:
        raise Reject("missing-fields", "evidence_pages is empty")
    return QA(question.strip(), answer.strip() if isinstance(answer, str) else answer,
              formats[answer_format.strip().lower()], numbers, evidence.strip())


_PAGES = re.compile(r"\b(?:pages?|pp?\.)\s*(\d+(?:\s*(?:-|–|to|through|,|and|&|or)\s*\d+)*)", re.IGNORECASE)
_SECTION = re.compile(r"\b(?:section|chapter|appendix|part)\s+[\dIVXLC]+(?:\.\d+)*\b|§\s*\d", re.IGNORECASE)


def anchored_pages(question: str) -> list[int]:
    """Page numbers the question names: "page 39", "pages 20-25" (every page of the range),
    "pages 6, 13 and 19", "p. 4", "pp. 3-5"."""
    pages = []
    for match in _PAGES.finditer(question):
        for part in re.split(r"\s*(?:,|and|&|or)\s*", match.group(1)):
            bounds = [int(n) for n in re.findall(r"\d+", part)]
            if len(bounds) == 2 and 0 <= bounds[1] - bounds[0] <= 500:
                pages += range(bounds[0], bounds[1] + 1)
            else:
                pages += bounds
    return pages


def names_a_section(question: str, sections: tuple[Section, ...]) -> bool:
    """A numbered section ("Section 3.2", "Chapter IV", "§ 4") or the title of one of the
    segment's sections ("in the Methods section")."""
    if _SECTION.search(question):
        return True
    text = normalize(question)
    for section in sections:
        title = normalize(re.sub(r"^[\dIVXLC.]+\s+", "", section.title))  # "2.1 Methods" is named as "Methods"
        if len(title) >= 4 and re.search(rf"\b{re.escape(title)}\b", text):
            return True
    return False


def normalize(text: str) -> str:
    """Lower case, accents and punctuation dropped (but not inside numbers), single spaces."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(?<!\d)[.,](?!\d)|[^\w\s.,%-]", " ", text)
    return re.sub(r"\s+", " ", text).strip(" .,")


def question_key(question: str) -> str:
    """Questions equal up to case, spacing and punctuation are duplicates."""
    return normalize(question)


def _numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


def _items(text: str) -> list[str]:
    words = [normalize(item) for item in re.split(r",|;|\band\b|\n", str(text))]
    return sorted(" ".join(w for w in item.split() if w not in ("a", "an", "the")) for item in words if item)


def answers_agree(generated: QA, verified: str) -> bool:
    """The verifier's answer says the same: numbers as numbers for Integer and Float answers (its
    first number equals the answer's, within 1e-6 relative), otherwise the same items (a list in
    any order) after normalising."""
    if generated.answer_format in ("Integer", "Float"):
        want, got = _numbers(generated.answer_text), _numbers(verified)
        return bool(want and got) and abs(want[0] - got[0]) <= 1e-6 * max(1.0, abs(want[0]))
    answer = generated.answer if isinstance(generated.answer, list) else [generated.answer]
    return sorted(i for a in answer for i in _items(a)) == _items(verified)


def verifier_answer(text: str) -> str:
    """The verifier's reply: the `answer` of its JSON object, else the whole reply."""
    try:
        value = json_object(text).get("answer", "")
    except Reject:
        return text.strip()
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
