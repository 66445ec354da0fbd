"""Answer a built dataset's questions with a Hugging Face checkpoint and score exact match.

Each sample of a dataset (`mmprolong build-data`) is a prompt followed by its answer, the answer
being the span with loss. The prompt is given to transformers' `generate` exactly as training saw
it (same tokens, same pixels), the reply is decoded greedily until its end token (or twice the
answer's length), and the two are compared after normalising case and whitespace. With synthetic documents
(`mmprolong synth-docs`) the questions are page-anchored needles: the answer sits on one page.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_mmprolong.data.pixels import decoder, pixel_values
from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.files import write_text_whole


@dataclass(frozen=True)
class QAResult:
    sample: int
    id: str
    task: str
    context_tokens: int
    expected: str
    answer: str
    correct: bool


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def prompt_and_answer(store: MultimodalStore, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens before the first loss span, and the tokens of that span (the reply and its end token)."""
    tokens = np.asarray(store.tokens[index], dtype=np.int64)
    spans = store.loss_spans[index].reshape(-1, 2)
    if not len(spans):
        raise ValueError(f"{store.prefix}: sample {index} has no answer span")
    start, end = (int(x) for x in spans[0])
    return tokens[:start], tokens[start:end]


@torch.no_grad()
def answer_questions(model, store: MultimodalStore, tokenizer, indices, progress=None):
    """Yield a `QAResult` per sample index; `model` is a transformers Qwen2.5-VL in eval mode."""
    image = store.manifest["image"]
    decode = decoder("pil")
    dtype = next(model.parameters()).dtype
    for index in indices:
        prompt, expected = prompt_and_answer(store, index)
        grids = store.image_grids(index)
        pixels = pixel_values(store.image_bytes(index), grids, decode, image["patch_size"], image["merge_size"],
                              image["temporal_patch_size"])
        inputs = {"input_ids": torch.from_numpy(prompt)[None], "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
        if len(grids):
            inputs |= {"pixel_values": torch.from_numpy(pixels).to(dtype), "image_grid_thw": torch.tensor(grids)}
        # Room beyond the reference length: the same text may tokenize longer (a leading space).
        out = model.generate(**inputs, max_new_tokens=2 * len(expected) + 8, do_sample=False,
                             eos_token_id=tokenizer.im_end, pad_token_id=tokenizer.im_end)
        answer, truth = (tokenizer.decode(_until(ids, tokenizer.im_end)).strip()
                         for ids in (out[0, len(prompt):].tolist(), expected.tolist()))
        yield QAResult(int(index), store.ids[index], store.task(index), len(prompt), truth, answer,
                       normalize(answer) == normalize(truth))
        if progress is not None:
            progress.update(1)


def _until(ids: list[int], end: int) -> list[int]:
    return ids[:ids.index(end)] if end in ids else ids


def score(results: list[QAResult]) -> dict:
    """Exact-match accuracy overall and per task."""
    tasks = sorted({r.task for r in results})
    by_task = {t: [r.correct for r in results if r.task == t] for t in tasks}
    return {
        "samples": len(results),
        "exact_match": float(np.mean([r.correct for r in results])) if results else 0.0,
        "by_task": {t: {"samples": len(c), "exact_match": float(np.mean(c))} for t, c in by_task.items()},
    }


def write_results(results: list[QAResult], path: str | Path) -> dict:
    """Write the score and every answer as JSON (to a temporary name, then renamed); return the score."""
    report = {**score(results), "results": [asdict(r) for r in results]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, json.dumps(report, indent=1) + "\n")
    return {k: v for k, v in report.items() if k != "results"}
