"""`mmprolong eval mmlongbench`: the harness's samples of each requested dataset and length, one
greedy request each to the backend (a served model, transformers, or this project's model on a
Megatron checkpoint at TP x CP x PP), every reply journaled in OUT/predictions.jsonl with what
scoring needs (a rerun sends only what is missing; `eval score` rescores the file alone), then the
judge (optional) and the scores (scores.py).

A folder holds one model's evaluation under one protocol (OUT/mmlongbench_config.json): reruns
may add datasets and lengths, and the scores cover every reply in the folder. With a Megatron
model every rank runs this with the same arguments, one request at a time in the same order;
rank 0 writes.

The assistant turn "Answer:" is continued by the reply (`continue_final_message`, as the harness's
transformers runner does). A served model whose server refuses those fields (`transformers serve`)
gets the harness's vLLM request instead: "Answer:" as a closed assistant turn, the server's
generation prompt after it. The folder records which (`assistant_prefill`), once, before its
first reply; a folder with replies in one form is not continued in the other. A sample whose
request fails after the retries is named and not journaled (a rerun sends it again); the run goes
on up to `max_failed` of them and ends with `FailedSamples`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from tqdm import tqdm

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
from megatron_mmprolong.files import write_text_whole
from megatron_mmprolong.serving.chat import PREFILL_FIELDS, closed_prefill, request_key
from megatron_mmprolong.serving.endpoint import RequestRefused
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import Job, TooManyFailures, run_jobs

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
    # "continue": the reply continues the assistant turn "Answer:" (continue_final_message); "closed":
    # "Answer:" is a closed assistant turn (the harness's vLLM requests), for servers refusing the former
    assistant_prefill: str = "continue"

    @property
    def image(self) -> ImageParams:
        return ImageParams.for_family(self.model_family, min_pixels=self.min_pixels, max_pixels=self.max_pixels)


class FailedSamples(Exception):
    """Samples (or judge verdicts) whose requests failed after the retries, named; what was
    answered is journaled and scored, and a rerun sends the failed ones again."""


@dataclass(frozen=True)
class Judge:
    backend: object  # a ChatBackend (an endpoint)
    prompts: JudgePrompts
    concurrency: int = 8
    max_failed: int = 10  # judge requests failing after retries before the judging stops

    def describe(self) -> dict:
        return {"model": self.backend.name, "endpoint": getattr(self.backend, "base_url", None),
                "prompts": self.prompts.version, "prompts_sha256": self.prompts.sha256}


def recorded_form(out: str | Path, config: MMLongBenchConfig) -> MMLongBenchConfig:
    """`config` with the assistant_prefill the folder recorded (a folder from before it was
    recorded has its replies in the "continue" form, which is written in)."""
    path = Path(out) / SETTINGS
    if not path.is_file():
        return config
    found = json.loads(path.read_text())
    if "assistant_prefill" not in found:
        found["assistant_prefill"] = "continue"
        write_text_whole(path, json.dumps(found, indent=1) + "\n")
    return replace(config, assistant_prefill=found["assistant_prefill"])


def sample_name(entry: dict) -> str:
    """A sample as the user finds it: its file, line and id."""
    return f"{entry['dataset']} {entry['length']}K line {entry['line']} (id {entry['id']})"


def _names(extras: list[dict], most: int = 10) -> str:
    names = ", ".join(sample_name(e) for e in extras[:most])
    return names + (f" and {len(extras) - most} more" if len(extras) > most else "")


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

        def build():
            request = chat_request(prompt, root, config.max_new_tokens)
            return closed_prefill(request) if config.assistant_prefill == "closed" else request

        return Job(key, build, extra)

    return [job(s) for s in samples]


def run_mmlongbench(backend, root: DataRoot, work: list[tuple[str, int]], config: MMLongBenchConfig,
                    out_dir: str | Path, tokenizer: str | None = None, judge_with: Judge | None = None,
                    concurrency: int = 1, writer: bool = True,
                    barrier: Callable[[], None] = lambda: None, train_length: int | None = None,
                    compare: str | None = None, max_failed: int = 10) -> dict | None:
    """Answer what the folder lacks, then (the writer) judge and score; returns the report.
    Raises FailedSamples, after scoring, when samples failed."""
    out = Path(out_dir)
    config = recorded_form(out, config)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        check_same_settings(out / SETTINGS, config, write=True)
        plan(root, work, config, out, True, tokenizer)
    barrier()
    check_same_settings(out / SETTINGS, config, write=False)
    todo = jobs(plan(root, work, config, out, write=False), root, config)
    answered = set(e["key"] for e in Journal(out / PREDICTIONS, read_only=True).entries())
    barrier()
    if not writer:
        run_jobs(backend, [j for j in todo if j.key not in answered], None, 1)
        return None
    unsent: list[str] = []
    refused: list[tuple[dict, str]] = []
    failed: dict[str, tuple[dict, str]] = {}
    form = {"assistant_prefill": config.assistant_prefill}
    made_in_other_form: list[int] = []

    def note(job: Job, reply) -> None:
        if reply.error and reply.status is not None and job.key in journal and job.key not in answered:
            refused.append((job.extra, reply.error))
        elif reply.error and job.key not in journal:
            unsent.append(reply.error)

    def prefill_refused(problem: str) -> bool:
        """The server refuses continue_final_message: the harness's vLLM form, unless the folder
        has replies in the other form."""
        made = sum(not e["reply"].get("error") for e in journal.entries())
        if made:
            made_in_other_form.append(made)
            return False
        write_text_whole(out / SETTINGS, json.dumps(asdict(replace(config, assistant_prefill="closed")), indent=1)
                         + "\n")
        form["assistant_prefill"] = "closed"
        tqdm.write(f"mmlongbench: {backend.base_url} refuses {' and '.join(PREFILL_FIELDS)} ({problem}); sending "
                   "the harness's vLLM form instead, \"Answer:\" as a closed assistant turn (recorded in "
                   f"{out / SETTINGS})", file=sys.stderr)
        return True

    with Journal(out / PREDICTIONS) as journal:
        if hasattr(backend, "on_prefill_refused") and config.assistant_prefill == "continue":
            backend.on_prefill_refused = prefill_refused
        try:
            stats = run_jobs(backend, todo, journal, concurrency, note, "mmlongbench", max_failed,
                             lambda job, error: failed.setdefault(job.key, (job.extra, error)))
        except TooManyFailures:
            extras = [extra for extra, _ in failed.values()]
            raise FailedSamples(f"mmlongbench stopped: {len(failed)} sample{'s' if len(failed) > 1 else ''} failed "
                                f"after retries, more than --max-failed {max_failed}: {_names(extras)}; "
                                f"{list(failed.values())[-1][1]}; a rerun sends them again") from None
        except RequestRefused as err:
            if not made_in_other_form:
                raise
            raise RequestRefused(f"{err}; this folder holds {made_in_other_form[0]} replies made with "
                                 "continue_final_message: to send the harness's vLLM form (\"Answer:\" as a closed "
                                 "assistant turn) evaluate into another --out") from None
    if unsent:
        print(f"mmlongbench: {len(unsent)} sample(s) not sent, e.g. {unsent[0]}")
    if refused:
        print(f"mmlongbench: {len(refused)} sample(s) refused by the backend, e.g. {sample_name(refused[0][0])}: "
              f"{refused[0][1]}")
    run = {"sent": stats.sent, "journaled": stats.journaled, "refused": stats.refused, "unsent": len(unsent),
           "truncated": stats.truncated, "failed": len(failed), "seconds": round(stats.seconds, 1),
           "request_form": {**form, "max_tokens_field": getattr(backend, "max_tokens_field", "max_tokens")}}
    problem = None
    if failed:
        extras = [extra for extra, _ in failed.values()]
        problem = (f"{len(failed)} sample{'s' if len(failed) > 1 else ''} failed after retries and "
                   f"{'are' if len(failed) > 1 else 'is'} not scored: {_names(extras)}; "
                   f"{list(failed.values())[-1][1]}; a rerun sends {'them' if len(failed) > 1 else 'it'} again")
        if not any(True for _ in Journal(out / PREDICTIONS, read_only=True).entries()):
            raise FailedSamples(problem)
    try:
        report = rescore(out / PREDICTIONS, out, judge_with, train_length, compare, model=config.model, run=run)
    except FailedSamples as err:
        raise FailedSamples(f"{problem}; {err}" if problem else str(err)) from None
    if problem:
        raise FailedSamples(problem)
    return report


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
    verdicts, failed = {}, {}
    if judge_with is not None:
        cases = [JudgeCase(e["key"], e["question"], str(e["answer"]), parsed_reply(e["reply"]["text"]),
                           e.get("answer_format") == "List")
                 for e in entries if e["category"] == "docqa" and excluded(e) is None]
        by_key = {e["key"]: e for e in entries}
        try:
            verdicts = judge(cases, judge_with.backend, judge_with.prompts, out / "judge.jsonl",
                             judge_with.concurrency, max_failed=judge_with.max_failed, failed=failed)
        except TooManyFailures:
            raise FailedSamples(f"the judge stopped: it failed after retries on {len(failed)} replies, more than "
                                f"--max-failed {judge_with.max_failed}: {_names([by_key[k] for k in failed])}; "
                                f"{list(failed.values())[-1]}; a rerun asks again") from None
    report = {**about, **score_predictions(entries, verdicts, judge_with.describe() if judge_with else None)}
    print(write_scores(report, out, train_length, compare))
    if failed:
        raise FailedSamples(f"the judge failed after retries on {len(failed)} replies, which have no verdict: "
                            f"{_names([by_key[k] for k in failed])}; {list(failed.values())[-1]}; a rerun asks "
                            "again")
    return report
