"""`mmprolong eval mmlongbench`: the harness's samples of each requested dataset and length, one
greedy request each to the backend (a served model, transformers, or this project's model on a
Megatron checkpoint at TP x CP x PP), every reply journaled in OUT/predictions.jsonl with what
scoring needs (a rerun sends only what is missing; `eval score` rescores the file alone), then the
judge (optional) and the scores (scores.py).

A folder holds one model's evaluation under one protocol (OUT/mmlongbench_config.json): reruns
may add datasets and lengths, and the scores cover every reply in the folder. With a Megatron
model every rank runs this with the same arguments, one request at a time in the same order;
rank 0 writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.eval.mmlongbench.contexts import PromptTokens, extended_samples
from megatron_mmprolong.eval.mmlongbench.data import (
    EXTENDED_LENGTHS, HARNESS_SEED, RELEASED_LENGTHS, DataRoot, Sample, category, check_images, harness_selection,
    read_released,
)
from megatron_mmprolong.eval.mmlongbench.judge import JudgeCase, JudgePrompts, judge
from megatron_mmprolong.eval.mmlongbench.metrics import parsed_reply
from megatron_mmprolong.eval.mmlongbench.prompts import DEFAULT_PAGE_LABELS, MAX_NEW_TOKENS, build_prompt, chat_request
from megatron_mmprolong.eval.mmlongbench.scores import excluded, score_predictions, write_scores
from megatron_mmprolong.eval.output_dir import check_same_settings
from megatron_mmprolong.serving.chat import request_key
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import Job, run_jobs

SETTINGS = "mmlongbench_config.json"
PREDICTIONS = "predictions.jsonl"


@dataclass(frozen=True)
class MMLongBenchConfig:
    """What the replies depend on; a folder keeps one."""

    model: str  # the evaluated model's name
    page_labels: str = DEFAULT_PAGE_LABELS
    max_new_tokens: int = MAX_NEW_TOKENS
    max_samples: int | None = None  # per file; None: the harness's 100 (document QA) and 50 (MM-NIAH)
    seed: int = HARNESS_SEED
    min_pixels: int = ImageParams.min_pixels
    max_pixels: int = ImageParams.max_pixels
    model_family: str = "qwen2_5_vl"  # whose image processor sizes the pages (served models: as Qwen2.5-VL)

    @property
    def image(self) -> ImageParams:
        return ImageParams.for_family(self.model_family, min_pixels=self.min_pixels, max_pixels=self.max_pixels)


@dataclass(frozen=True)
class Judge:
    backend: object  # a ChatBackend (an endpoint)
    prompts: JudgePrompts
    concurrency: int = 8

    def describe(self) -> dict:
        return {"model": self.backend.name, "endpoint": getattr(self.backend, "base_url", None),
                "prompts": self.prompts.version, "prompts_sha256": self.prompts.sha256}


def pairs(datasets: list[str], lengths: list[int], tokenizer: str | None) -> list[tuple[str, int]]:
    """(dataset, length) to evaluate: MM-NIAH only at the released lengths."""
    for length in lengths:
        if length not in RELEASED_LENGTHS + EXTENDED_LENGTHS:
            raise EvalError(f"--lengths {length}: MMLongBench has {', '.join(map(str, RELEASED_LENGTHS))} (K tokens), "
                            f"and {', '.join(map(str, EXTENDED_LENGTHS))} are built from the 128K files")
    chosen = [(d, n) for d in datasets for n in lengths if n in RELEASED_LENGTHS or category(d) == "docqa"]
    if not chosen:
        raise EvalError("nothing to evaluate: MM-NIAH is released up to 128K; contexts beyond are built for document QA")
    if any(n in EXTENDED_LENGTHS for _, n in chosen) and not tokenizer:
        raise EvalError("contexts beyond 128K are counted with a Qwen2.5-VL tokenizer: pass --tokenizer DIR")
    return chosen


def released(root: DataRoot, work: list[tuple[str, int]], config: MMLongBenchConfig) -> dict[tuple[str, int], tuple]:
    """(every record, the harness's selection) of each released file the work reads, images
    checked: bad data fails here, before a model loads."""
    files = {}
    for dataset, length in work:
        key = (dataset, min(length, 128))
        if key not in files:
            source = read_released(root, *key)
            files[key] = (source, harness_selection(source, config.max_samples, config.seed))
            check_images(root, files[key][1])
    return files


def plan(root: DataRoot, work: list[tuple[str, int]], config: MMLongBenchConfig, out: Path, write: bool,
         tokenizer: str | None = None) -> list[Sample]:
    """The samples to answer, in order; contexts beyond 128K are built (when `write`, counting
    with `tokenizer`) or read from OUT/contexts/."""
    files = released(root, work, config)
    count, samples = None, []
    for dataset, length in work:
        source, chosen = files[dataset, min(length, 128)]
        if length > 128:
            from megatron_mmprolong.data.chat import ChatTokenizer

            count = count or (PromptTokens(ChatTokenizer(tokenizer), root, config.image) if write else None)
            chosen = extended_samples(chosen, source, length, count, config.page_labels, config.seed,
                                      out / "contexts" / f"{dataset}_K{length}.jsonl", write)
            check_images(root, chosen)
        samples += chosen
    return samples


def jobs(samples: list[Sample], root: DataRoot, config: MMLongBenchConfig) -> list[Job]:
    def job(sample: Sample) -> Job:
        prompt = build_prompt(sample, config.page_labels)
        record = sample.record
        extra = {"dataset": sample.dataset, "category": sample.category, "length": sample.length, "line": sample.line,
                 "id": sample.id, "question": prompt.question, "answer": record["answer"],
                 "answer_format": record.get("answer_format")}
        key = request_key("mmlongbench", config.model, sample.dataset, sample.length, sample.line, sample.id,
                          config.page_labels, config.max_new_tokens)
        return Job(key, lambda: chat_request(prompt, root, config.max_new_tokens), extra)

    return [job(s) for s in samples]


def run_mmlongbench(backend, root: DataRoot, work: list[tuple[str, int]], config: MMLongBenchConfig,
                    out_dir: str | Path, tokenizer: str | None = None, judge_with: Judge | None = None,
                    concurrency: int = 1, writer: bool = True,
                    barrier: Callable[[], None] = lambda: None, train_length: int | None = None,
                    compare: str | None = None) -> dict | None:
    """Answer what the folder lacks, then (the writer) judge and score; returns the report."""
    out = Path(out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        check_same_settings(out / SETTINGS, config, write=True)
        plan(root, work, config, out, True, tokenizer)
    barrier()
    check_same_settings(out / SETTINGS, config, write=False)
    todo = jobs(plan(root, work, config, out, write=False), root, config)
    answered = set(e["key"] for e in Journal(out / PREDICTIONS, read_only=True).entries())
    barrier()
    unsent: list[str] = []

    def note(job: Job, reply) -> None:
        if reply.error and job.key not in journal:
            unsent.append(reply.error)

    if writer:
        with Journal(out / PREDICTIONS) as journal:
            stats = run_jobs(backend, todo, journal, concurrency, note, "mmlongbench")
    else:
        run_jobs(backend, [j for j in todo if j.key not in answered], None, 1)
        return None
    if unsent:
        print(f"mmlongbench: {len(unsent)} sample(s) not sent, e.g. {unsent[0]}")
    run = {"sent": stats.sent, "journaled": stats.journaled, "refused": stats.refused, "unsent": len(unsent),
           "truncated": stats.truncated, "seconds": round(stats.seconds, 1)}
    return rescore(out / PREDICTIONS, out, judge_with, train_length, compare, model=config.model, run=run)


def rescore(predictions: str | Path, out_dir: str | Path, judge_with: Judge | None = None,
            train_length: int | None = None, compare: str | None = None, **about) -> dict:
    """Score a predictions journal (judging what the judge's journal lacks); write scores.json and
    scores.png in `out_dir` and print the table."""
    path, out = Path(predictions), Path(out_dir)
    if not path.is_file():
        raise EvalError(f"{path}: no such predictions file (eval mmlongbench writes OUT/{PREDICTIONS})")
    try:
        entries = list(Journal(path, read_only=True).entries())
    except ValueError as err:
        raise EvalError(str(err)) from None
    if not entries or any("category" not in e for e in entries):
        raise EvalError(f"{path}: not an eval mmlongbench predictions file")
    verdicts = {}
    if judge_with is not None:
        cases = [JudgeCase(e["key"], e["question"], str(e["answer"]), parsed_reply(e["reply"]["text"]),
                           e.get("answer_format") == "List")
                 for e in entries if e["category"] == "docqa" and excluded(e) is None]
        verdicts = judge(cases, judge_with.backend, judge_with.prompts, out / "judge.jsonl", judge_with.concurrency)
    report = {**about, **score_predictions(entries, verdicts, judge_with.describe() if judge_with else None)}
    print(write_scores(report, out, train_length, compare))
    return report
