"""`mmprolong eval video`: every question of the requested benchmarks, its video sampled by the
protocol (sampling.py) and decoded once into the frame cache (decode.py), one greedy request to
the backend, each reply journaled in OUT/predictions.jsonl with what scoring needs (a rerun sends
only what is missing), then the scores (scores.py).

A folder holds one model's evaluation under one protocol (OUT/video_config.json). With a Megatron
model every rank runs this with the same arguments, one request at a time in the same order:
rank 0 decodes into the cache while the others wait, and writes.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.eval.output_dir import check_same_settings
from megatron_mmprolong.eval.video.data import BENCHMARKS, VideoQuestion, read_benchmark
from megatron_mmprolong.eval.video.decode import FrameCache, probe
from megatron_mmprolong.eval.video.judge import judge_letters
from megatron_mmprolong.eval.video.prompts import build_prompt
from megatron_mmprolong.eval.video.requests import video_request
from megatron_mmprolong.eval.video.sampling import FramePlan, SamplingConfig, SamplingError, plan_frames
from megatron_mmprolong.eval.video.scores import score_entries, write_scores
from megatron_mmprolong.serving.chat import request_key
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import Job, TooManyFailures, run_jobs

SETTINGS = "video_config.json"
PREDICTIONS = "predictions.jsonl"


class FailedQuestions(Exception):
    """Questions whose requests failed after the retries; a rerun sends them again."""


@dataclass(frozen=True)
class VideoEvalConfig:
    """What the replies depend on; a folder keeps one."""

    model: str
    model_family: str = "qwen2_5_vl"  # whose processor sizes the frames (served models: as given)
    sampling: SamplingConfig = SamplingConfig()
    max_new_tokens: int = 128

    @property
    def image(self) -> ImageParams:
        return ImageParams.for_family(self.model_family)


def read_questions(roots: dict[str, str], max_samples: int | None = None) -> list[VideoQuestion]:
    """The questions of each benchmark given a root (its first `max_samples`), checked."""
    questions = []
    for name in BENCHMARKS:
        if roots.get(name):
            questions += read_benchmark(name, roots[name])[:max_samples]
    if not questions:
        raise EvalError("no benchmark to evaluate: give --videomme-root, --mlvu-root or --lvb-root")
    return questions


def plan_videos(questions: list[VideoQuestion], config: VideoEvalConfig) -> dict[Path, tuple[FramePlan, float]]:
    """Each video's frame plan and average fps, from its headers (a bad video is named here)."""
    plans = {}
    for question in questions:
        if question.video not in plans:
            meta = probe(question.video)
            try:
                plans[question.video] = (plan_frames(meta, config.sampling, config.image), meta.avg_fps)
            except SamplingError as err:
                raise EvalError(f"{question.source}: {question.video}: {err}") from None
    return plans


def jobs(questions: list[VideoQuestion], plans, cache: FrameCache, config: VideoEvalConfig, served: bool) -> list[Job]:
    def job(question: VideoQuestion) -> Job:
        plan, fps = plans[question.video]
        prompt = build_prompt(question)
        extra = {"benchmark": question.benchmark, "id": question.id, "source": question.source,
                 "question": question.question,
                 "group": question.group, "options": list(question.options), "answer": question.answer,
                 "video": str(question.video), "frames": len(plan.indices), "frame_size": [plan.height, plan.width],
                 "video_tokens": plan.tokens, "sample_fps": plan.sample_fps}
        key = request_key("video", config.model, question.benchmark, question.id, str(question.video),
                          config.sampling, config.model_family, config.max_new_tokens)
        return Job(key, lambda: video_request(prompt, cache.frames(question.video, plan, fps), plan,
                                              config.max_new_tokens, served), extra)

    return [job(q) for q in questions]


def run_video_eval(backend, questions: list[VideoQuestion], config: VideoEvalConfig, out_dir: str | Path,
                   cache_dir: str | Path | None = None, served: bool = False, concurrency: int = 1,
                   writer: bool = True, barrier: Callable[[], None] = lambda: None, max_failed: int = 10,
                   decode_workers: int = 2, judge=None) -> dict | None:
    """Answer what the folder lacks, then (the writer) score, with the MLVU judge fallback when
    `judge` (a chat backend) is given; returns the report."""
    out = Path(out_dir)
    cache = FrameCache(cache_dir or out / "frames")
    plans = plan_videos(questions, config)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        check_same_settings(out / SETTINGS, config, write=True)
        answered = set(e["key"] for e in Journal(out / PREDICTIONS, read_only=True).entries())
        todo = [q for q, j in zip(questions, jobs(questions, plans, cache, config, served)) if j.key not in answered]
        cache.fill([(q.video, *plans[q.video]) for q in dict((q.video, q) for q in todo).values()], decode_workers)
    barrier()
    check_same_settings(out / SETTINGS, config, write=False)
    work = jobs(questions, plans, cache, config, served)
    answered = set(e["key"] for e in Journal(out / PREDICTIONS, read_only=True).entries())
    barrier()
    if not writer:
        run_jobs(backend, [j for j in work if j.key not in answered], None, 1)
        return None
    failed: dict[str, str] = {}
    with Journal(out / PREDICTIONS) as journal:
        try:
            stats = run_jobs(backend, work, journal, concurrency, None, "video", max_failed,
                             lambda job, error: failed.setdefault(job.extra["source"], error))
        except TooManyFailures:
            raise FailedQuestions(f"eval video stopped: {len(failed)} questions failed after retries, more than "
                                  f"--max-failed {max_failed}: {', '.join(list(failed)[:5])}; "
                                  f"{list(failed.values())[-1]}; a rerun sends them again") from None
    keys = {j.key for j in work}
    entries = [e for e in Journal(out / PREDICTIONS, read_only=True).entries() if e["key"] in keys]
    judged = judge_letters(judge, entries, out, max_failed=max_failed) if judge is not None else {}
    report = score_entries(entries, judged)
    report |= {"model": config.model, "sampling": asdict(config.sampling),
               "judge": None if judge is None else {"model": judge.name, "benchmarks": ["mlvu"]},
               "run": {"sent": stats.sent, "journaled": stats.journaled, "failed": len(failed),
                       "seconds": round(stats.seconds, 1)}}
    print(write_scores(report, out, config.model))
    if failed:
        raise FailedQuestions(f"{len(failed)} question(s) failed after retries and are not scored: "
                              f"{', '.join(list(failed)[:5])}; a rerun sends them again")
    return report


def report_failure(err: FailedQuestions) -> int:
    print(f"mmprolong eval: error: {err}", file=sys.stderr)
    return 1
