"""The letter a reply means, by rule. The reference (VLMEvalKit) strips answer prefixes and takes
the first capital A-D (A-E) anywhere; two commas missing from its prefix list leave "Best answer:"
and "The best option is" unstripped, so "Best answer: C" scores as B, and "Based on ..." as B.
Those are parsing bugs, not the protocol: here every prefix is stripped and a letter counts only
where it stands as an answer, in this order:

1. the reply (prefixes stripped) starts with the letter: "C", "C.", "(C)", "C)", "C:" or "C,";
2. a letter in parentheses anywhere: "... is (C) Berries";
3. a letter standing alone before ".", ")", ":", "," or the end: "I choose C.";
4. the text of exactly one option inside the reply (as the reference's MLVU fallback does):
   "1->2->3->4" for an option "1->2->3->4";
else none (scored wrong, as the reference's "Z"). Replies of more than 10 words without any
letter are none at once, as in the reference.
"""

from __future__ import annotations

import re

PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
            "The correct option is", "Best answer:", "Best option:", "Answer:", "Option:")
_OPTION_PREFIX = re.compile(r"^\(?[A-E][.)]\s*")


def option_text(option: str) -> str:
    """An option without its "A. " prefix (Video-MME's options carry one)."""
    return _OPTION_PREFIX.sub("", option).strip()


def extract_letter(reply: str, options: tuple[str, ...] | list[str]) -> str:
    """The letter the reply means among len(options) letters, or "" when it means none."""
    letters = "ABCDE"[:len(options)]
    text = reply.strip()
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()
    for prefix in PREFIXES:
        text = text.replace(prefix, "")
    text = text.strip()
    allowed = f"[{letters}]"
    if len(text.split()) > 10 and not re.search(allowed, text):
        return ""
    for pattern in (rf"^\(?({allowed})(?:[.):,]|$)", rf"\(({allowed})\)", rf"(?<![A-Za-z])({allowed})(?=[.):,]|$)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    lowered = text.lower()
    inside = [letters[i] for i, o in enumerate(options) if option_text(o) and option_text(o).lower() in lowered]
    return inside[0] if len(inside) == 1 else ""
