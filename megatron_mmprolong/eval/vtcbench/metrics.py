"""containsAll, as the benchmark's `src/vtcbench/metric.py` (`calc_metrics`) computes it: the
reply with every <think>...</think> removed, stripped and lower-cased; each gold string stripped
and lower-cased; the score is the fraction of gold strings found in the reply (0.5 when one of
two is there).

VLMEvalKit (`utils/vtcbench.py`, `calc_vtc_metrics`) compares case-sensitively without removing
<think>, and scores Retrieval by `contains` (1 when any gold string is in the reply) instead of
containsAll; `vlmevalkit_score` gives its figure, reported beside ours where they differ.
"""

from __future__ import annotations

import re

_THINK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


def without_think(text: str) -> str:
    return _THINK.sub("", text)


def contains_all(reply: str, answers: list[str] | tuple[str, ...]) -> float:
    """The official containsAll in [0, 1]."""
    text = without_think(reply).strip().lower()
    golds = [str(a).strip().lower() for a in answers]
    return sum(g in text for g in golds) / len(golds)


def vlmevalkit_score(split: str, reply: str, answers: list[str] | tuple[str, ...]) -> float:
    """VLMEvalKit's rule for Retrieval (contains any) and Reasoning (contains all), case-sensitive."""
    text = str(reply).strip()
    golds = [str(a).strip() for a in answers]
    found = [g in text for g in golds]
    return float(any(found)) if split == "Retrieval" else sum(found) / len(golds)
