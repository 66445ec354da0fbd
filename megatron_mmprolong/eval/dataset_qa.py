"""Answer a built dataset's questions with a Hugging Face checkpoint; exact match and F1.

Each sample of a dataset (`mmprolong build-data`) is a prompt followed by its answer, the answer
being the span with loss. The prompt is given to transformers' `generate` exactly as training saw
it (same tokens, same pixels), the reply is decoded greedily until its end token (or twice the
answer's length), and the two are compared after normalising case and whitespace (exact match)
and with `answer_f1` (lists by item, numbers as numbers, "Not answerable"), so records in the
dataset's JSONL form from MMLongBench-Doc-style data can be scored too. With synthetic documents
(`mmprolong synth-docs`) the questions are page-anchored needles: the answer sits on one page.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_mmprolong.convert.parity import hf_token_types
from megatron_mmprolong.data.pixels import decoder, sample_pixels
from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.errors import BadInput
from megatron_mmprolong.files import write_text_whole


class EvalError(BadInput, ValueError):
    """Bad evaluation settings or inputs, said in words."""


@dataclass(frozen=True)
class QAResult:
    sample: int
    id: str
    task: str
    context_tokens: int
    expected: str
    answer: str
    correct: bool  # exact match after normalising
    f1: float  # item F1 for lists; 1/0 otherwise (see answer_f1)


NOT_ANSWERABLE = {"not answerable", "unanswerable", "not answerable.", "none", "n/a"}


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").removesuffix("kg").strip())
    except ValueError:
        return None


def _items(text: str) -> list[str]:
    return [item.strip(" .") for item in re.split(r",|;|\band\b", normalize(text)) if item.strip(" .")]


def answer_f1(answer: str, expected: str) -> float:
    """MMLongBench-Doc-style credit: "Not answerable" must be said as such, numbers compare as
    numbers, lists ("A, B and C") score the F1 of their items, anything else must match exactly."""
    answer_n, expected_n = normalize(answer), normalize(expected)
    if expected_n in NOT_ANSWERABLE:
        return float(answer_n in NOT_ANSWERABLE)
    a, e = _number(answer_n), _number(expected_n)
    if a is not None and e is not None:
        return float(abs(a - e) <= 1e-6 * max(1.0, abs(e)))
    want = _items(expected)
    if len(want) > 1:
        got = _items(answer)
        common = sum(min(got.count(x), want.count(x)) for x in set(want))
        return 0.0 if not common else 2 * common / (len(got) + len(want))
    return float(answer_n == expected_n)


def select_samples(store: MultimodalStore, tasks: list[str] | None, limit: int | None) -> list[int]:
    """The sample indices `eval qa` answers: of `tasks` (all when None), at most `limit`."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit {limit}: give the number of samples to answer, at least 1 (leave it out for all)")
    indices = [i for i in range(len(store)) if not tasks or store.task(i) in tasks]
    if not indices:
        present = sorted({store.task(i) for i in range(len(store))})
        raise EvalError(f"{store.prefix} has no samples of --tasks {' '.join(tasks or [])}; its tasks are "
                        f"{', '.join(present) or 'none (the dataset is empty)'}")
    return indices[:limit]


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
    """Yield a `QAResult` per sample index; `model` is a transformers Qwen2.5-VL in eval mode or
    a `MegatronGenerator` (the same `generate` interface)."""
    decode = decoder("pil")
    dtype = next(model.parameters()).dtype
    for index in indices:
        prompt, expected = prompt_and_answer(store, index)
        pixels, grids = sample_pixels(store, index, decode)
        inputs = {"input_ids": torch.from_numpy(prompt)[None], "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
        if len(grids):
            inputs |= {"pixel_values": torch.from_numpy(pixels).to(dtype), "image_grid_thw": torch.tensor(grids),
                       **hf_token_types(model, inputs["input_ids"])}
        # Room beyond the reference length: the same text may tokenize longer (a leading space).
        out = model.generate(**inputs, max_new_tokens=2 * len(expected) + 8, do_sample=False,
                             eos_token_id=tokenizer.im_end, pad_token_id=tokenizer.im_end)
        answer, truth = (tokenizer.decode(_until(ids, tokenizer.im_end)).strip()
                         for ids in (out[0, len(prompt):].tolist(), expected.tolist()))
        yield QAResult(int(index), store.ids[index], store.task(index), len(prompt), truth, answer,
                       normalize(answer) == normalize(truth), answer_f1(answer, truth))
        if progress is not None:
            progress.update(1)


def answer_resumably(model, store: MultimodalStore, tokenizer, indices, log: str | Path, desc: str,
                     progress: bool = True, writer: bool = True, barrier=lambda: None) -> list[QAResult]:
    """`answer_questions` with every result appended to `log` (JSON lines) as it comes: a rerun
    after a kill asks only what the log lacks. With a Megatron model every rank calls this with
    the same arguments; only the `writer` appends, and `barrier` keeps the others from reading
    the log after the writer has started to append."""
    from tqdm import tqdm

    log = Path(log)
    done = {r["id"]: QAResult(**r) for r in map(json.loads, log.read_text().splitlines())} if log.is_file() else {}
    todo = [i for i in indices if store.ids[i] not in done]
    barrier()
    with open(log if writer else os.devnull, "a") as sink, tqdm(
            total=len(indices), initial=len(indices) - len(todo), unit="sample", desc=desc,
            disable=not (progress and writer) or None) as bar:
        for result in answer_questions(model, store, tokenizer, todo, bar):
            sink.write(json.dumps(asdict(result)) + "\n")
            sink.flush()
            done[result.id] = result
    return [done[store.ids[i]] for i in indices]


def _until(ids: list[int], end: int) -> list[int]:
    return ids[:ids.index(end)] if end in ids else ids


def score(results: list[QAResult]) -> dict:
    """Exact match and F1, overall and per task."""

    def summary(rs):
        return {"samples": len(rs), "exact_match": float(np.mean([r.correct for r in rs])) if rs else 0.0,
                "f1": float(np.mean([r.f1 for r in rs])) if rs else 0.0}

    return {**summary(results),
            "by_task": {t: summary([r for r in results if r.task == t]) for t in sorted({r.task for r in results})}}


def write_results(results: list[QAResult], path: str | Path) -> dict:
    """Write the score and every answer as JSON (to a temporary name, then renamed); return the score."""
    report = {**score(results), "results": [asdict(r) for r in results]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, json.dumps(report, indent=1) + "\n")
    return {k: v for k, v in report.items() if k != "results"}
