"""Every MMLongBench metric is total: on 10,000 seeded random and adversarial replies each (random
unicode, huge, infinite and NaN numbers, deep and unbalanced brackets, stray quotes, lists of
numbers, empty and very long strings) it returns a finite score in [0, 1] and never raises, and
the counting and option parsers return what their scores compare. `eval score` rests on this: one
odd reply must not stop a whole table."""

import functools
import math
import random

from megatron_mmprolong.eval.mmlongbench.metrics import chosen_option, listed_counts, rule_score
from megatron_mmprolong.eval.mmlongbench.scores import score_predictions

SEED = 26
REPLIES = 10_000

DOCQA = {  # answer format: a typical answer of it
    "Integer": "12", "Float": "12.5", "String": "Amber Gecko", "None": "Not answerable",
    "List": '["apple", "banana", 12, 2.5, "page 3"]',
}
NIAH = {"retrieval-text": "blue cat", "reasoning-text": [["blue cat", "bluecat"]], "counting-text": [1, 2],
        "counting-image": [0, 3, 1], "retrieval-image": 1, "reasoning-image": "C"}
METRICS = {f"docqa {f}": (lambda r, f=f, a=a: rule_score("mmlongdoc", "docqa", r, a, f)) for f, a in DOCQA.items()} | {
    d: (lambda r, d=d, a=a: rule_score(d, "niah", r, a)) for d, a in NIAH.items()}

FRAGMENTS = ["[", "]", "[[", "]]", "(", ")", "{", "}", '"', "'", ",", ", ", " ", "\n", "\t", ".", "-", "+", "%", "$",
             "£", ":", "\\", "\\u", "\x00", "Answer:", "answer is ", "answer is (", "A", "B", "J", "K", "a", "an",
             "the", "page", "Not answerable", "amber", "Gecko", "blue cat", "https://", "a.m.", "kg", "million",
             "true", "null", "NaN", "Infinity", "e", "E", "٣", "½", "²", "\u200b", "\ud800"]
ADVERSARIAL = ["", " ", "\n", "Answer:", "Answer: Answer:", "1e400", "-1e400", "[2, 1e400]", "[1e400]", "[-1e400, 3]",
               "inf", "-inf", "nan", "[NaN]", "[Infinity, 2]", "[-Infinity]", "[1,,2]", "[01, 2]", "[1, [2, 3]]",
               '[{"a": 1}, "3", true, null, 2.5]', '["', '"]', "[" * 3000, "]" * 3000, "[" * 2000 + "1" + "]" * 2000,
               "[" * 999 + "]" * 999, "9" * 5000, "[" + "9" * 5000 + "]", "[1, " + "9" * 5000 + "]", "-" + "9" * 5000,
               "[-" + "9" * 5000 + ", " + "9" * 5000 + ", 3]", "1" + "0" * 400 + ".5", "A " * 10000, "x" * 100000,
               "answer is (K)", "Answer: J", "٣", "[٣, 4]", "\ud800\udfff", "12.5%", "$1,234.5 million"]


def _number(rng: random.Random) -> str:
    if rng.random() < 0.0005:  # over int()'s 4,300 digits
        return "9" * rng.randint(4000, 6000)
    return rng.choice([
        lambda: str(rng.randint(-10 ** 6, 10 ** 6)),
        lambda: f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 8)}f}",
        lambda: f"{rng.randint(-9, 9)}e{rng.randint(-500, 500)}",
        lambda: rng.choice(["1e400", "-1e400", "inf", "-inf", "nan", "NaN", "Infinity", "-Infinity", "1e-400", "-0"]),
    ])()


def _reply(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.1:  # random code points, surrogates included
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 60)))
    if kind < 0.3:  # a list of numbers, sometimes not closed or among words
        items = ", ".join(_number(rng) for _ in range(rng.randint(0, 8)))
        return rng.choice(["", "Answer: ", "the counts are "]) + "[" + items + rng.choice(["]", "", "]]", "]."])
    if kind < 0.305:  # nesting deep enough for json's recursion limit, balanced or not
        depth = rng.randint(900, 1500)
        return "[" * depth + _number(rng) + "]" * rng.randint(0, depth)
    pieces = rng.randint(0, 400 if kind < 0.31 else 30)
    return "".join(rng.choice([lambda: rng.choice(FRAGMENTS), lambda: _number(rng),
                               lambda: chr(rng.randrange(0x110000))])() for _ in range(pieces))


@functools.cache
def _replies() -> list[str]:
    rng = random.Random(SEED)
    return ADVERSARIAL + [_reply(rng) for _ in range(REPLIES - len(ADVERSARIAL))]


def _failures(function, check) -> list[str]:
    failures = []
    for reply in _replies():
        try:
            value = function(reply)
            if not check(value):
                failures.append(f"{reply[:60]!r} -> {value!r}")
        except Exception as err:  # noqa: BLE001 - any exception is the failure under test
            failures.append(f"{reply[:60]!r} raised {type(err).__name__}: {err}"[:200])
    return failures


def _is_score(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_every_metric_scores_every_reply_in_0_1():
    failures = {name: _failures(metric, _is_score) for name, metric in METRICS.items()}
    assert {name: f[:3] for name, f in failures.items() if f} == {}


def test_the_parsers_return_counts_and_an_option_on_every_reply():
    counts = _failures(listed_counts, lambda v: isinstance(v, list) and all(type(n) is int for n in v))
    options = _failures(chosen_option, lambda v: type(v) is int and -1 <= v <= 9)
    assert (counts[:3], options[:3]) == ([], [])


def test_a_predictions_file_of_such_replies_is_scored():
    """scores.py parses replies too (empty ones are left out): every cell's mean stays in [0, 100]."""
    datasets = [("mmlongdoc", "docqa", "Amber Gecko", "String"), ("longdocurl", "docqa", "12.5", "Float"),
                ("slidevqa", "docqa", '["a", 2]', "List"), *((d, "niah", a, None) for d, a in NIAH.items())]
    entries = [{"key": str(i), "dataset": d, "category": c, "length": 8, "answer": a, "answer_format": f,
                "reply": {"text": reply, "error": None, "finish_reason": "stop"}}
               for i, reply in enumerate(_replies()) for d, c, a, f in [datasets[i % len(datasets)]]]
    report = score_predictions(entries)
    rules = [cell["rule"] for cat in report["categories"].values() for ds in cat["datasets"].values()
             for cell in ds.values()]
    assert len(rules) == len(datasets) and all(math.isfinite(r) and 0 <= r <= 100 for r in rules)
    assert report["replies"]["samples"] == REPLIES and report["replies"]["empty"] > 0


def test_replies_the_harness_crashes_on_are_read_as_written():
    """Its extract_cnt_list raises on a list nested past json's depth limit (RecursionError) and on
    integers over int()'s 4,300 digits (ValueError): here the first is no list (it has one "]"),
    so every integer counts, and the second keeps its exact value."""
    assert listed_counts("[" * 1200 + "1, x] and 2") == [1, 2]
    assert listed_counts("[" + "9" * 5000 + "]") == [10 ** 5000 - 1]
    assert sum(listed_counts("[-" + "9" * 5000 + ", " + "9" * 5000 + ", 3]")) == 3
    assert listed_counts("9" * 5000 + " and 7") == [10 ** 5000 - 1, 7]
    assert rule_score("counting-text", "niah", "[" * 1200 + "1, x] and 2", [3]) == 1.0
