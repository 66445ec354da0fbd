"""The harness's rule-based metrics (EdinburghNLP/MMLongBench `utils.py`), re-implemented.

The harness prepends "Answer:" to every reply and parses it (`parse_output`: the text after the
first "Answer:", one more leading "Answer:" dropped). Document QA scores the parsed reply by
`answer_format`:
- Integer: some integer in the reply equals the answer;
- Float: some number in the reply is within 1% (relative) of the answer, x100 or /100 of it;
- String and None ("Not answerable"): token F1 after normalising (lower case, no punctuation, no
  articles), except that answers shaped like URLs, file names, "page ...", numbers or number
  ranges, times, dates and e-mail addresses must appear verbatim in the reply;
- List (a JSON list): the mean of its items' scores, each by its own type, the plain-text items
  merged into one string first (F1 over their words: better recall).
Numbers are read after dropping commas, one unit or magnitude word at the end, quotes and $, £, %.
MM-NIAH scores the raw and the parsed reply and keeps the better: substring exact match for the
text retrieval and reasoning tasks, equal sums of the counts listed for the counting tasks, and
the option letter for the image retrieval and reasoning tasks.
Every metric scores any reply in [0, 1] without raising: where the harness itself crashes (a
[...] nested past json's depth limit, an integer of over 4,300 digits), the reply is read as
written (no list; the integer's exact value).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from typing import Any

from megatron_mmprolong.eval.mmlongbench.prompts import PREFILL

_UNITS = ("kg", "meters", "acres", "minutes", "miles", "mile", "feet", "million", "thousand", "billion", "mm", "m")
_UNIT_ENDS = [re.compile(re.escape(unit) + "$") for unit in _UNITS]  # compiled once: _clean runs per answer item
_VERBATIM = [re.compile(p) for p in (
    r"https://", r".*\.(py|ipynb)$", r"^page", r"^\d+(-\d+|\s\d+)?$", r"(a\.m\.|p\.m\.)",
    r"^\d{4}[-/\s]\d{1,2}[-/\s]\d{1,2}$", r"^\d{1,2}[-/\s]\d{1,2}[-/\s]\d{2,4}$", r"^\d{4}[-/\s]\d{1,2}$",
    r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$")]
_NUMBER = re.compile(r"(-?\d+(\.\d*)?|-?\.\d+)")
NIAH_METRICS = {"retrieval-text": "sub_em", "reasoning-text": "sub_em", "counting-text": "soft_acc",
                "counting-image": "soft_acc", "retrieval-image": "mc_acc", "reasoning-image": "mc_acc"}


def parsed_reply(reply: str) -> str:
    """The harness's parse of "Answer:" + reply."""
    text = reply.strip()
    return re.sub(f"^{re.escape(PREFILL)}", "", text, flags=re.IGNORECASE).strip()


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, truth: str) -> float:
    predicted, wanted = normalize(prediction).split(), normalize(truth).split()
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if not same:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def _clean(value: Any) -> str:
    text = str(value).lower().strip().replace(",", "")
    for unit_end in _UNIT_ENDS:
        text = unit_end.sub("", text).strip()
    text = re.sub(r"^['\"]|['\"]$", "", text).strip()
    for symbol in "$£%":
        text = text.strip().strip(symbol).strip()
    return text


def _numbers(text: str) -> list[float]:
    values = []
    for match in _NUMBER.findall(text.replace(",", "")):
        value = float(match[0])
        if math.isfinite(value):
            values.append(value)
    return values


def _verbatim(answer: str) -> bool:
    return any(p.search(answer) for p in _VERBATIM)


def value_type(text: str) -> str:
    """Integer, Float or String: what a list item written as text holds."""
    try:
        value = float(_clean(text))
        return "Integer" if value == int(value) and "%" not in text else "Float"
    except (ValueError, OverflowError):
        return "String"


def docqa_score(answer: Any, reply: str, answer_format: str) -> float:
    """The harness's `eval_docqa_score` of a parsed reply (see the module docstring)."""
    if answer_format in ("Integer", "Float"):
        try:
            truth = float(_clean(answer))
        except ValueError:  # a number the harness would fail on: scored as text
            return docqa_score(answer, reply, "String")
        found = _numbers(_clean(reply))
        if answer_format == "Integer":
            return float(any(int(n) == n and int(n) == truth for n in found))
        return float(any(math.isclose(t, n, rel_tol=0.01) for n in found for t in (truth / 100, truth, truth * 100)))
    if answer_format in ("String", "None"):
        answer = str(answer)
        return float(answer in reply) if _verbatim(answer) else token_f1(reply, answer)
    if answer_format == "List":
        items = json.loads(answer) if isinstance(answer, str) else answer
        items = items if isinstance(items, list) else [items]
        merge = [isinstance(i, str) and value_type(i) == "String" and not _verbatim(i) for i in items]
        merged = " ".join(i for i, m in zip(items, merge) if m).strip()
        if merged:
            items = [merged, *(i for i, m in zip(items, merge) if not m)]
        scores = [docqa_score(i, reply, "Integer" if isinstance(i, int) else "Float" if isinstance(i, float)
                              else value_type(i)) for i in items]
        return sum(scores) / len(items) if items else 0.0
    raise ValueError(f"unknown answer_format {answer_format!r}")


def substring_match(reply: str, answer: Any) -> float:
    truths = [answer] if isinstance(answer, str) else [t for a in answer for t in (a if isinstance(a, list) else [a])]
    return float(any(normalize(str(t)) in normalize(reply) for t in truths))


def _integer(digits: str) -> int:
    """int(digits) past int()'s 4,300-digit limit (Python 3.11+), which would crash scoring (the
    harness's too): 4,000 digits at a time."""
    sign, digits = (-1, digits[1:]) if digits.startswith("-") else (1, digits)
    value = 0
    for start in range(0, len(digits), 4000):
        chunk = digits[start:start + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return sign * value


def listed_counts(reply: str) -> list[int]:
    """The harness's `extract_cnt_list`: the last [n, m, ...] list, else the last [...] list's
    integers, else every integer in the reply."""
    text = " ".join(re.sub(r"\b(a|an|the)\b", " ", reply.lower()).split())
    for pattern, numbers_only in ((r"\[[\d\s,]+\]", True), (r"\[.*?\]", False)):
        found = re.findall(pattern, text, re.DOTALL)
        if found:
            try:
                values = json.loads(found[-1], parse_int=_integer)
            except (ValueError, RecursionError):  # json nests "[[[...[1]" past its depth limit: no list (one "]")
                continue
            if numbers_only:
                return values
            kept = []
            for value in values:
                try:
                    kept.append(int(value))
                except (TypeError, ValueError, OverflowError):  # the harness's bare except: 1e400 (inf) is dropped
                    pass
            return kept
    return [_integer(n) for n in re.findall(r"\d+", text)]


def chosen_option(reply: str) -> int:
    """The harness's `extract_choice_letter`: "answer is X", "Answer: X", or the last standalone
    letter A-J; -1 when there is none. 0 is A."""
    text = " ".join(reply.split())
    for pattern, flags in ((r"answer is \(?([A-J])\)?", 0), (r"[aA]nswer:\s*([A-J])", 0)):
        match = re.search(pattern, text, flags)
        if match:
            return ord(match.group(1)) - ord("A")
    match = re.search(r"\b[A-J]\b(?!.*\b[A-J]\b)", text, re.DOTALL)
    return ord(match.group(0)) - ord("A") if match else -1


def niah_score(dataset: str, reply: str, answer: Any) -> float:
    metric = NIAH_METRICS[dataset]

    def one(text: str) -> float:
        if metric == "sub_em":
            return substring_match(text, answer)
        if metric == "soft_acc":
            counts = listed_counts(text)
            return float(sum(counts) == sum(answer if isinstance(answer, list) else [answer]))
        option = answer if isinstance(answer, int) else ord(str(answer).strip()[:1] or "?") - ord("A")
        return float(chosen_option(text) == option)

    return max(one(PREFILL + reply), one(parsed_reply(reply)))


def rule_score(dataset: str, category: str, reply: str, answer: Any, answer_format: str | None = None) -> float:
    if category == "docqa":
        return docqa_score(answer, parsed_reply(reply), answer_format)
    return niah_score(dataset, reply, answer)
