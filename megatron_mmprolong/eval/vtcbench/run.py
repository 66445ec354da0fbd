"""`mmprolong eval vtcbench`: every sample of the requested VTCBench-Wild splits, one greedy
request each to the backend (a served model, transformers, or this project's model on a Megatron
checkpoint at TP x CP x PP), every reply journaled in OUT/predictions.jsonl with what scoring
needs (a rerun sends only what is missing; `eval vtcbench-score` rescores the file alone), then
the judge of Memory replies (optional) and the scores (scores.py).

A folder holds one model's evaluation under one protocol (OUT/vtcbench_config.json); reruns may
add splits. With a Megatron model every rank runs this with the same arguments, one request at a
time in the same order; rank 0 writes. A sample whose request fails after the retries is named
and not journaled (a rerun sends it again); the run goes on up to `max_failed` of them and ends
with `FailedSamples` after scoring the rest. Journaling, the request runner, the endpoint client
and the folder's settings check are `eval mmlongbench`'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.eval.mmlongbench.run import FailedSamples
from megatron_mmprolong.eval.output_dir import check_same_settings
from megatron_mmprolong.eval.vtcbench.data import DataRoot, ImageReader, Sample, read_split
from megatron_mmprolong.eval.vtcbench.judge import JudgeCase, JudgePrompt, judge
from megatron_mmprolong.eval.vtcbench.prompts import DEFAULT_PROMPTS, MAX_NEW_TOKENS, chat_request, prompt_text
from megatron_mmprolong.eval.vtcbench.scores import score_predictions, write_scores
from megatron_mmprolong.serving.chat import request_key
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import Job, TooManyFailures, run_jobs

SETTINGS = "vtcbench_config.json"
PREDICTIONS = "predictions.jsonl"
JUDGE_JOURNAL = "judge.jsonl"


# VLMEvalKit's Qwen2.5-VL configs (vlmeval/config.py) size every page within these, for VTCBench too;
# other families: their processor's range
VLMEVALKIT_PIXELS = {"qwen2_5_vl": (1280 * 28 * 28, 16384 * 28 * 28)}


@dataclass(frozen=True)
class VTCBenchConfig:
    """What the replies depend on; a folder keeps one."""

    model: str  # the evaluated model's name
    prompts: str = DEFAULT_PROMPTS  # "vlmevalkit" or "official" (prompts.py)
    max_new_tokens: int = MAX_NEW_TOKENS
    max_samples: int | None = None  # per split, the first ones; None: all
    min_pixels: int = ImageParams.min_pixels
    max_pixels: int = ImageParams.max_pixels
    model_family: str = "qwen2_5_vl"  # whose image processor sizes the pages (served models: the server's own)


@dataclass(frozen=True)
class Judge:
    backend: object  # a ChatBackend (an endpoint)
    prompt: JudgePrompt
    concurrency: int = 8
    max_failed: int = 10

    def describe(self) -> dict:
        return {"model": self.backend.name, "endpoint": getattr(self.backend, "base_url", None),
                "prompt": self.prompt.name, "prompt_sha256": self.prompt.sha256}


def _names(extras: list[dict], most: int = 10) -> str:
    names = ", ".join(f"{e['split']} #{e['index']} ({e['file']} row {e['row']})" for e in extras[:most])
    return names + (f" and {len(extras) - most} more" if len(extras) > most else "")


def plan(root: DataRoot, splits: list[str], config: VTCBenchConfig) -> list[Sample]:
    """The samples to answer, in order, every row of the files read checked (bad data fails here,
    before a model loads)."""
    if not splits:
        raise EvalError("nothing to evaluate: name at least one of --splits")
    return [s for split in dict.fromkeys(splits) for s in read_split(root, split, config.max_samples)]


def jobs(samples: list[Sample], root: DataRoot, config: VTCBenchConfig) -> list[Job]:
    reader = ImageReader()

    def job(sample: Sample) -> Job:
        extra = {"split": sample.split, "index": sample.index, "file": str(sample.file.relative_to(root.path)),
                 "row": sample.row, "question": sample.problem, "answers": list(sample.answers),
                 "images": sample.images}
        key = request_key("vtcbench", config.model, sample.split, extra["file"], sample.row,
                          prompt_text(sample, config.prompts), config.max_new_tokens)
        return Job(key, lambda: chat_request(sample, reader.images(sample), config.prompts, config.max_new_tokens),
                   extra)

    return [job(s) for s in samples]


def run_vtcbench(backend, root: DataRoot, samples: list[Sample], config: VTCBenchConfig, out_dir: str | Path,
                 judge_with: Judge | None = None, concurrency: int = 1, writer: bool = True,
                 barrier: Callable[[], None] = lambda: None, compare: str | None = None,
                 max_failed: int = 10) -> dict | None:
    """Answer what the folder lacks of `samples` (`plan`'s), then (the writer) judge and score;
    returns the report."""
    out = Path(out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        check_same_settings(out / SETTINGS, config, write=True)
    barrier()
    check_same_settings(out / SETTINGS, config, write=False)
    todo = jobs(samples, root, config)
    answered = set(e["key"] for e in Journal(out / PREDICTIONS, read_only=True).entries())
    barrier()
    if not writer:
        run_jobs(backend, [j for j in todo if j.key not in answered], None, 1)
        return None
    splits = ", ".join(f"{n} {split}" for split, n in Counter(s.split for s in samples).items())
    print(f"vtcbench: {len(samples)} samples ({splits}), up to {max((s.images for s in samples), default=0)} "
          "page images each")
    failed: dict[str, tuple[dict, str]] = {}
    unbuilt: list[str] = []

    def note(job: Job, reply) -> None:
        if reply.error and job.key not in journal:
            unbuilt.append(reply.error)  # an image that cannot be sent: counted, not journaled

    with Journal(out / PREDICTIONS) as journal:
        try:
            stats = run_jobs(backend, todo, journal, concurrency, note, "vtcbench", max_failed,
                             lambda job, error: failed.setdefault(job.key, (job.extra, error)))
        except TooManyFailures:
            raise FailedSamples(f"vtcbench stopped: {len(failed)} samples failed after retries, more than "
                                f"--max-failed {max_failed}: {_names([e for e, _ in failed.values()])}; "
                                f"{list(failed.values())[-1][1]}; a rerun sends them again") from None
    if unbuilt:
        print(f"vtcbench: {len(unbuilt)} sample(s) not sent, e.g. {unbuilt[0]}")
    run = {"sent": stats.sent, "journaled": stats.journaled, "refused": stats.refused, "unsent": len(unbuilt),
           "truncated": stats.truncated, "failed": len(failed), "seconds": round(stats.seconds, 1)}
    problem = None
    if failed:
        problem = (f"{len(failed)} sample(s) failed after retries and are not scored: "
                   f"{_names([e for e, _ in failed.values()])}; {list(failed.values())[-1][1]}; a rerun sends "
                   "them again")
        if not any(True for _ in Journal(out / PREDICTIONS, read_only=True).entries()):
            raise FailedSamples(problem)
    try:
        report = rescore(out / PREDICTIONS, out, judge_with, compare, model=config.model, run=run)
    except FailedSamples as err:
        raise FailedSamples(f"{problem}; {err}" if problem else str(err)) from None
    if problem:
        raise FailedSamples(problem)
    return report


def rescore(predictions: str | Path, out_dir: str | Path, judge_with: Judge | None = None,
            compare: str | None = None, **about) -> dict:
    """Score a predictions journal (judging the Memory replies the judge's journal lacks); write
    scores.json and scores.png in `out_dir` and print the table."""
    path, out = Path(predictions), Path(out_dir)
    if not path.is_file():
        raise EvalError(f"{path}: no such predictions file (eval vtcbench writes OUT/{PREDICTIONS})")
    try:
        entries = list(Journal(path, read_only=True).entries())
    except ValueError as err:
        raise EvalError(str(err)) from None
    if not entries or any("split" not in e or "answers" not in e for e in entries):
        raise EvalError(f"{path}: not an eval vtcbench predictions file")
    judged, failed = None, {}
    if judge_with is not None:
        cases = [JudgeCase(e["key"], e["question"], tuple(e["answers"]), e["reply"]["text"]) for e in entries
                 if e["split"] == "Memory" and not e["reply"].get("error")]
        try:
            judged = judge(cases, judge_with.backend, judge_with.prompt, out / JUDGE_JOURNAL,
                           judge_with.concurrency, max_failed=judge_with.max_failed, failed=failed) if cases else {}
        except TooManyFailures:
            by_key = {e["key"]: e for e in entries}
            raise FailedSamples(f"the judge stopped: it failed after retries on {len(failed)} replies, more than "
                                f"--max-failed {judge_with.max_failed}: {_names([by_key[k] for k in failed])}; "
                                f"{list(failed.values())[-1]}; a rerun asks again") from None
    report = score_predictions(entries, judged, judge_with.describe() if judge_with else None)
    report |= {"predictions": str(path.resolve()), **about}
    print(write_scores(report, out, compare))
    if failed:
        by_key = {e["key"]: e for e in entries}
        raise FailedSamples(f"the judge failed after retries on {len(failed)} replies, which have no verdict: "
                            f"{_names([by_key[k] for k in failed])}; {list(failed.values())[-1]}; a rerun asks "
                            "again")
    return report
