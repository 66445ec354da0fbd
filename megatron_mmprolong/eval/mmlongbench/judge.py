"""The LLM judge of document-QA replies (MMLongBench v1.1's default metric): any
OpenAI-compatible endpoint grades each parsed reply against the reference, binary for single
answers, coverage F1 for lists, with this project's prompts (judge_prompts_v1.yaml) or the
user's. Every verdict is journaled (OUT/judge.jsonl): a rerun or a rescore sends only new cases.

The verdict is read as the harness reads it: the "[Score]: N point(s)" line, else the
"answer_score" value, else 0; for lists F1 of precision = covered / the student's items and
recall = covered / the reference's items, clamped to [0, 1], 0 when nothing is covered or the
counts are missing. The harness leaves the judge's temperature to the server; here it is 0 (a
rerun gets the same verdicts). A judge request that fails after the endpoint's retries leaves its
case without a verdict and unjournaled (a rerun asks again); more than `max_failed` stop the judging.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.files import read_yaml_mapping
from megatron_mmprolong.serving.chat import ChatReply, ChatRequest, request_key
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import Job, run_jobs

DEFAULT_PROMPTS = Path(__file__).with_name("judge_prompts_v1.yaml")
JUDGE_MAX_TOKENS = 256  # the harness's


@dataclass(frozen=True)
class JudgePrompts:
    version: str
    sha256: str
    single: str
    list: str
    case: str

    def message(self, question: str, reference: str, prediction: str, is_list: bool) -> str:
        case = Template(self.case).substitute(question=question, reference=reference, prediction=prediction)
        return (self.list if is_list else self.single) + case


def load_judge_prompts(path: str | Path | None = None) -> JudgePrompts:
    path = Path(path or DEFAULT_PROMPTS)
    try:
        raw, data = read_yaml_mapping(path)
    except ValueError as err:
        raise EvalError(f"judge prompt file {path}: {err}") from None
    keys = ("version", "single", "list", "case")
    if any(not isinstance(data.get(k), str) or not data[k] for k in keys):
        raise EvalError(f"judge prompt file {path}: needs the texts {', '.join(keys)}")
    prompts = JudgePrompts(data["version"], hashlib.sha256(raw).hexdigest(), data["single"], data["list"], data["case"])
    try:
        prompts.message("q", "r", "p", False)
    except (KeyError, ValueError) as err:
        raise EvalError(f"judge prompt file {path}: case has an unknown or malformed placeholder ({err}); "
                        "it may use $question, $reference and $prediction") from None
    return prompts


def _number(key: str, text: str) -> float | None:
    match = re.search(rf'"{key}"\s*:\s*(-?\d+(?:\.\d+)?)', text)
    return float(match.group(1)) if match else None


def single_verdict(text: str) -> float:
    match = re.search(r"\[Score\]:\s*(\d+)\s*points?", text)
    if match:
        return float(match.group(1))
    value = _number("answer_score", text)
    return value if value is not None else 0.0


def list_verdict(text: str, reference: str) -> float:
    given, covered = _number("student_answer_count", text), _number("covered_count", text)
    try:
        wanted = len(json.loads(reference))
    except (ValueError, TypeError):
        wanted = 0
    if given is None or covered is None or covered <= 0 or given <= 0 or wanted == 0:
        return 0.0
    precision, recall = covered / given, covered / wanted
    return max(0.0, min(1.0, 2 * precision * recall / (precision + recall)))


@dataclass(frozen=True)
class JudgeCase:
    key: str  # the prediction's journal key
    question: str
    reference: str
    prediction: str  # the parsed reply
    is_list: bool


def judge(cases: list[JudgeCase], backend, prompts: JudgePrompts, journal_path: Path, concurrency: int = 8,
          progress: bool = True, max_failed: int = 0, failed: dict[str, str] | None = None) -> dict[str, float | None]:
    """A verdict per case key (None when the judge refused the request, or it failed: then the
    case key and the error go into `failed`)."""
    messages = {c.key: prompts.message(c.question, c.reference, c.prediction, c.is_list) for c in cases}
    keys = {c.key: request_key("mmlongbench-judge", backend.name, messages[c.key], JUDGE_MAX_TOKENS) for c in cases}
    verdicts: dict[str, float | None] = {}
    sharing: dict[str, list[JudgeCase]] = {}  # the same message for several replies is sent once
    for case in cases:
        sharing.setdefault(keys[case.key], []).append(case)

    def record(job: Job, reply: ChatReply) -> None:
        for case in sharing[job.key]:
            if reply.error:
                verdicts[case.key] = None
            elif case.is_list:
                verdicts[case.key] = list_verdict(reply.text, case.reference)
            else:
                verdicts[case.key] = single_verdict(reply.text)

    def job(key: str, case: JudgeCase) -> Job:
        request = ChatRequest([{"role": "user", "content": messages[case.key]}], max_tokens=JUDGE_MAX_TOKENS)
        return Job(key, lambda: request)

    def lost(job: Job, error: str) -> None:
        for case in sharing[job.key]:
            verdicts[case.key] = None
            if failed is not None:
                failed[case.key] = error

    with Journal(journal_path) as journal:
        run_jobs(backend, [job(k, group[0]) for k, group in sharing.items()], journal, concurrency, record,
                 "judge" if progress else None, max_failed, lost)
    return verdicts
