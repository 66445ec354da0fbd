"""Document-QA contexts beyond the released 128K (256K, 512K), as the paper built them with the
MMLongBench method: each selected 128K sample keeps its own page list (its document and the
negative pages already in it) intact and in order, and whole other documents of the same file
are inserted around it, alternately on the left and on the right, until the prompt reaches the
target; the last one is cut at the page that reaches it. Every inserted page keeps its own path,
so its label names its own document; `ans_page_list` counts pages of the original document, so
it stays as it is.

Tokens are counted as the evaluated model counts them (Qwen2.5-VL's rule for a served model): the
prompt's text with its tokenizer, each image as its smart_resize size over 28x28 px (32x32 for
Qwen3-VL) plus the vision start and end tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from megatron_mmprolong.data.chat import DEFAULT_SYSTEM_PROMPT, ChatTokenizer, encode_conversation
from megatron_mmprolong.data.images import ImageError, ImageParams, image_size, smart_resize, vision_tokens
from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.eval.documents import pages_until
from megatron_mmprolong.eval.mmlongbench.data import DataRoot, Sample
from megatron_mmprolong.eval.mmlongbench.prompts import IMAGE, PREFILL, Prompt, build_prompt, page_document, page_label
from megatron_mmprolong.files import write_text_whole


@dataclass
class PromptTokens:
    """Tokens of a prompt in the chat format, images included; image sizes are read once per path."""

    tokenizer: ChatTokenizer
    root: DataRoot
    image: ImageParams = ImageParams()
    _images: dict[str, int] = field(default_factory=dict)
    _texts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        t = self.tokenizer
        chat, _ = encode_conversation(t, [("user", [])], DEFAULT_SYSTEM_PROMPT)
        self.chat = len(chat) + 1 + len(t.text("assistant\n")) + len(t.text(PREFILL))

    def image_tokens(self, path: str) -> int:
        if path not in self._images:
            try:
                height, width = smart_resize(*image_size(str(self.root.image(path))), self.image)
            except ImageError as err:
                raise EvalError(str(err)) from None
            self._images[path] = vision_tokens(height, width, self.image) + 2
        return self._images[path]

    def text_tokens(self, texts: list[str]) -> int:
        new = sorted({t for t in texts if t and t not in self._texts})
        if new:
            ids = self.tokenizer.hf(new, add_special_tokens=False, split_special_tokens=True).input_ids
            self._texts.update(zip(new, map(len, ids)))
        return sum(self._texts[t] for t in texts if t)

    def __call__(self, prompt: Prompt) -> int:
        return self.chat + self.text_tokens(prompt.text.split(IMAGE)) + sum(map(self.image_tokens, prompt.images))

    def page(self, path: str, labels: str) -> int:
        """What one more page adds to a document-QA context: its label after a blank line, and its image."""
        return self.text_tokens(["\n\n" + page_label(path, labels).removesuffix(IMAGE)]) + self.image_tokens(path)


def documents_of(samples: list[Sample]) -> dict[str, list[str]]:
    """Each document's pages in a file: the longest run of them in any one record, in its order."""
    documents: dict[str, list[str]] = {}
    for sample in samples:
        runs: dict[str, list[str]] = {}
        for path in sample.record["page_list"]:
            runs.setdefault(page_document(path), []).append(path)
        for document, pages in runs.items():
            if len(pages) > len(documents.get(document, [])):
                documents[document] = pages
    return documents


def extend(sample: Sample, documents: dict[str, list[str]], length: int, count: PromptTokens, labels: str,
           seed: int) -> Sample:
    """The sample with other documents of its file around its pages up to `length` K tokens."""
    record, target = sample.record, length * 1024
    own = {page_document(p) for p in record["page_list"]}
    others = sorted(d for d in documents if d not in own)
    random.Random(f"{seed}/{sample.dataset}/{sample.line}/{length}").shuffle(others)
    pool = [page for d in others for page in documents[d]]
    tokens = count(build_prompt(sample, labels))
    room = sum(count.page(p, labels) for p in pool)
    if tokens + room < target:
        raise EvalError(f"{sample.dataset} 128K sample {sample.id}: the file's other documents hold {room:,} tokens, "
                        f"too few to pad {tokens:,} tokens to {target:,}")
    padding = pages_until(pool, 0, tokens, target, lambda p: count.page(p, labels))
    left, right, side = [], [], 0
    for index, page in enumerate(padding):
        if index and page_document(page) != page_document(padding[index - 1]):
            side = 1 - side  # the next document goes on the other side
        if side:
            right.append(page)
        else:
            left.append(page)
    left = _documents_reversed(left)  # each document inserted further out than the one before
    extended = {**record, "page_list": left + list(record["page_list"]) + right,
                "extended": {"from_length": sample.length, "length": length, "pages_before": len(left),
                             "pages_after": len(right)}}
    result = Sample(sample.dataset, length, sample.line, extended)
    extended["extended"]["tokens"] = count(build_prompt(result, labels))
    return result


def _documents_reversed(pages: list[str]) -> list[str]:
    runs: list[list[str]] = []
    for page in pages:
        if runs and page_document(runs[-1][-1]) == page_document(page):
            runs[-1].append(page)
        else:
            runs.append([page])
    return [page for run in reversed(runs) for page in run]


def extended_samples(selected: list[Sample], released: list[Sample], length: int, count: PromptTokens, labels: str,
                     seed: int, cache: Path, write: bool) -> list[Sample]:
    """The selected 128K samples extended to `length`, kept in `cache` (JSON lines): the writer
    builds it once, every reader (and a rerun) reads it."""
    if not selected:
        return []
    if write and not cache.is_file():
        documents = documents_of(released)
        built = [extend(s, documents, length, count, labels, seed) for s in selected]
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(cache, "".join(json.dumps({"line": s.line, "record": s.record}) + "\n" for s in built))
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    return [Sample(selected[0].dataset, length, entry["line"], entry["record"]) for entry in lines]
