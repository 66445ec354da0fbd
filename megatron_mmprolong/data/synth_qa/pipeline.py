"""`mmprolong synth-qa`: real PDFs -> long-document VQA records, the recipe's short-to-long
generator (recipe.md §1.3).

For each document (documents.py) and each of its questions: the segment's pages go to the
generator with the task's prompt (prompts.py); the reply is checked (validate.py); an accepted
pair is put back into the whole run of pages as a record that build-data reads
(`DIR/records.jsonl`), a failed one goes to `DIR/rejects.jsonl` with its reason, and
`DIR/summary.json` counts everything. With `verify`, each accepted pair is asked again from its
evidence pages alone and kept only if the answers agree.

Every answer is journaled as it arrives (`DIR/answers.jsonl`, keyed by what decides the request),
so a killed run resumes and a rerun sends only what was not answered; the outputs are made from
the journal, in input order, so they do not depend on the order of replies or on the number of
requests in flight. A `part=(i, n)` run (one task of a Slurm array) takes every n-th PDF from the
i-th and writes into `DIR/parts/`; a run without `part` then adopts the parts' answers and writes
the whole outputs, sending only what no part answered (or nothing: an offline run, `JournalOnly`,
writes the outputs from the answers there are).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.data.pdf import PdfError
from megatron_mmprolong.data.synth_qa.documents import (
    DocumentSettings,
    Filtered,
    QuestionPlan,
    SynthQAError,
    file_sha256,
    list_pdfs,
    plan_document,
)
from megatron_mmprolong.data.synth_qa.prompts import Prompts, generation_messages, load_prompts, verification_messages
from megatron_mmprolong.data.synth_qa.validate import (
    QA,
    Reject,
    answers_agree,
    check_qa,
    json_object,
    question_key,
    verifier_answer,
)
from megatron_mmprolong.data.synth_qa.workers import PdfWorkers, render_pages
from megatron_mmprolong.files import write_text_whole
from megatron_mmprolong.serving.chat import ChatReply, ChatRequest, request_key
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import ChatBackend, Job, UnbuildableJob, run_jobs


@dataclass(frozen=True)
class SynthQAConfig:
    documents: DocumentSettings = field(default_factory=DocumentSettings)
    dpi: int = 144
    image: ImageParams = field(default_factory=ImageParams)
    prompt_file: str | None = None  # default: the project's prompts_v1.yaml
    max_tokens: int = 1024  # per generated reply
    temperature: float = 0.7  # with a per-request seed, so a rerun of a server that honours it agrees
    json_mode: bool = False  # ask for response_format json_object (vLLM, SGLang, OpenAI support it)
    max_answer_chars: int = 400
    verify: bool = False
    verify_max_tokens: int = 256
    concurrency: int = 8  # requests in flight
    workers: int = 4  # processes planning documents and rendering pages (0: this process)
    part: tuple[int, int] | None = None  # (index, count): every count-th PDF from the index-th

    def __post_init__(self):
        if self.part is not None and not 0 <= self.part[0] < self.part[1]:
            raise SynthQAError(f"--part {self.part[0]} {self.part[1]}: the index must be in [0, {self.part[1]})")
        if self.concurrency < 1 or self.workers < 0:
            raise SynthQAError("--concurrency must be at least 1 and --workers at least 0")


@dataclass
class _Outcome:
    plan: QuestionPlan
    key: str
    reply: ChatReply
    error_reason: str  # the reject reason when `reply` carries an error: refused, unrenderable, unanswered
    qa: QA | None = None
    reject: Reject | None = None
    verify: ChatReply | None = None


def run_synth_qa(inputs: list[str | Path], out_dir: str | Path, config: SynthQAConfig, backend: ChatBackend,
                 progress: bool = True) -> dict[str, Any]:
    """Run (or resume) synth-qa into `out_dir`; returns the summary it writes."""
    began = time.perf_counter()
    out = Path(out_dir)
    work = out if config.part is None else out / "parts" / "{:05d}-of-{:05d}".format(*config.part)
    prompts = load_prompts(config.prompt_file)
    paths = list_pdfs(inputs)
    work.mkdir(parents=True, exist_ok=True)  # the inputs are readable: the run starts
    if config.part is not None:
        paths = paths[config.part[0]::config.part[1]]
    with PdfWorkers(config.workers) as workers, Journal(work / "answers.jsonl") as journal:
        if config.part is None:
            _adopt_part_answers(out, journal)
        documents = _plan_documents(paths, config.documents, workers, progress)
        plans = [plan for plans in documents["plans"] for plan in plans]
        requests = _Requests(backend, journal, workers, config, progress)
        outcomes = _generate(plans, prompts, requests)
        if config.verify:
            _verify([o for o in outcomes if o.qa is not None], prompts, requests)
    records = [_record(o, prompts, backend.name) for o in outcomes if o.qa is not None]
    rejects = [_reject(o) for o in outcomes if o.reject is not None]
    summary = _summary(documents, outcomes, requests.stats, backend, prompts, config, time.perf_counter() - began)
    write_text_whole(work / "records.jsonl", "".join(_json_line(r) for r in records))
    write_text_whole(work / "rejects.jsonl", "".join(_json_line(r) for r in rejects))
    write_text_whole(work / "summary.json", _json(summary, indent=1) + "\n")
    return summary


# ---- documents ---------------------------------------------------------------------------------

def _plan_documents(paths: list[str], settings: DocumentSettings, workers: PdfWorkers, progress: bool) -> dict:
    """Hash every file, keep the first of each content, plan the kept ones."""
    with tqdm(total=len(paths), unit="doc", desc="synth-qa documents", disable=not progress) as bar:
        hashes = []
        for sha in workers.map(file_sha256, paths):
            hashes.append(sha)
            bar.update()
    first: dict[str, str] = {}
    kept, duplicates, filtered = [], [], []
    for path, sha in zip(paths, hashes):
        if sha is None:
            filtered.append(Filtered(path, "unreadable", f"PDF {path} cannot be read"))
        elif sha in first:
            duplicates.append({"pdf": path, "same_as": first[sha]})
        else:
            first[sha] = path
            kept.append((path, sha))
    plans = []
    for planned in workers.map(plan_document, [p for p, _ in kept], [s for _, s in kept], repeat(settings)):
        if isinstance(planned, Filtered):
            filtered.append(planned)
        else:
            plans.append(planned)
    return {"seen": len(paths), "duplicates": duplicates, "filtered": filtered, "plans": plans}


# ---- requests ----------------------------------------------------------------------------------

class JournalOnly:
    """The backend of an `offline` run: nothing is sent; the outputs come from the journal (and the
    parts' journals) and a question without an answer is rejected as `unanswered`. `name` must be
    the model name the answers were journaled under."""

    def __init__(self, name: str):
        self.name = name

    async def complete(self, request: ChatRequest) -> ChatReply:
        raise AssertionError("an offline run sends nothing")


class _Requests:
    """Jobs of one run against `backend`: their builds render pages in the workers; `not_sent`
    maps the key of each job answered without a request to the reject reason of its reply."""

    def __init__(self, backend: ChatBackend, journal: Journal, workers: PdfWorkers, config: SynthQAConfig,
                 progress: bool):
        self.backend, self.journal, self.workers, self.config = backend, journal, workers, config
        self.progress = progress
        self.not_sent: dict[str, str] = {}
        self.stats = Counter()

    def job(self, key: str, pdf: str, pages: list[int], messages, max_tokens: int, temperature: float) -> Job:
        config = self.config

        def build() -> ChatRequest:
            try:
                images = self.workers.call(render_pages, pdf, pages, config.dpi, config.image,
                                           config.documents.pdf_backend)
            except PdfError as err:
                self.not_sent[key] = "unrenderable"
                raise UnbuildableJob(str(err)) from None
            extra: dict[str, Any] = {"seed": int(key[:8], 16)}
            if config.json_mode:
                extra["response_format"] = {"type": "json_object"}
            return ChatRequest(messages(images), max_tokens=max_tokens, temperature=temperature, extra=extra)

        return Job(key, build)

    def run(self, jobs: list[Job], on_reply, desc: str, postfix) -> None:
        """run_jobs with a bar showing this run's requests/s and `postfix()`."""
        bar = tqdm(total=len(jobs), unit="req", desc=desc, disable=not self.progress, dynamic_ncols=True)
        answered, began = sum(job.key in self.journal for job in jobs), time.perf_counter()

        def reply_and_show(job: Job, reply: ChatReply) -> None:
            on_reply(job, reply)
            bar.update()
            sent, elapsed = bar.n - answered, time.perf_counter() - began
            bar.set_postfix(**postfix(), req_s=f"{sent / elapsed:.2f}" if sent > 0 else "-", refresh=False)

        if isinstance(self.backend, JournalOnly):
            missing = ChatReply(text="", error="no answer in the journal; an offline run sends nothing")
            for job in jobs:
                if job.key not in self.journal:
                    self.not_sent[job.key] = "unanswered"
                    reply_and_show(job, missing)
            jobs = [job for job in jobs if job.key in self.journal]
        try:
            stats = run_jobs(self.backend, jobs, self.journal, self.config.concurrency, reply_and_show)
        finally:
            bar.close()
        self.stats.update(sent=stats.sent, from_journal=stats.journaled, not_built=stats.unbuilt)


def _generate(plans: list[QuestionPlan], prompts: Prompts, requests: _Requests) -> list[_Outcome]:
    config, name = requests.config, requests.backend.name
    jobs, plan_of = [], {}
    for plan in plans:
        key = request_key("synth-qa/generate", plan.sha256, plan.index, plan.task, str(plan.segment),
                          [asdict(s) for s in plan.sections], plan.document_pages, prompts.sha256, name, config.dpi,
                          asdict(config.image), config.max_tokens, config.temperature, config.json_mode,
                          config.documents.pdf_backend)
        plan_of[key] = plan
        jobs.append(requests.job(key, plan.pdf, plan.segment.pages,
                                 lambda images, plan=plan: generation_messages(prompts, plan, images),
                                 config.max_tokens, config.temperature))
    outcomes: dict[str, _Outcome] = {}
    keys_of: dict[str, list[str]] = {}
    for job in jobs:
        keys_of.setdefault(plan_of[job.key].sha256, []).append(job.key)
    remaining = {sha: len(keys) for sha, keys in keys_of.items()}
    shown = Counter()

    def on_reply(job: Job, reply: ChatReply) -> None:
        plan = plan_of[job.key]
        outcomes[job.key] = _Outcome(plan, job.key, reply, requests.not_sent.get(job.key, "refused"))
        remaining[plan.sha256] -= 1
        if not remaining[plan.sha256]:  # the document's questions are all answered: check them in order
            checked = _check_document([outcomes[k] for k in keys_of[plan.sha256]], config)
            shown.update(documents=1, accepted=sum(o.qa is not None for o in checked))

    requests.run(jobs, on_reply, "synth-qa generate",
                 lambda: {"docs": f"{shown['documents']}/{len(keys_of)}", "accepted": shown["accepted"]})
    return [outcomes[job.key] for job in jobs]


def _verify(candidates: list[_Outcome], prompts: Prompts, requests: _Requests) -> None:
    """Ask each candidate's question from its evidence pages alone; reject it unless the answers agree."""
    config = requests.config
    jobs, outcome_of = [], {}
    for outcome in candidates:
        question, pages = outcome.qa.question, sorted(set(outcome.qa.evidence_pages))
        key = request_key("synth-qa/verify", outcome.key, question, pages, config.verify_max_tokens)
        outcome_of[key] = outcome
        jobs.append(requests.job(key, outcome.plan.pdf, pages,
                                 lambda images, q=question, p=pages: verification_messages(prompts, q, p, images),
                                 config.verify_max_tokens, 0.0))
    shown = Counter()

    def on_reply(job: Job, reply: ChatReply) -> None:
        outcome = outcome_of[job.key]
        outcome.verify = reply
        answer = verifier_answer(reply.text)
        if reply.error is not None:
            reason = "verify-refused" if job.key not in requests.not_sent else requests.not_sent[job.key]
            outcome.reject = Reject(reason, f"the verification request: {reply.error}")
        elif not answers_agree(outcome.qa, answer):
            outcome.reject = Reject("verify-disagrees", f"from the evidence pages alone the answer is "
                                                        f"{answer[:200]!r}, not {outcome.qa.answer_text[:200]!r}")
        else:
            shown.update(agreed=1)
            return
        outcome.qa = None

    requests.run(jobs, on_reply, "synth-qa verify", lambda: {"agreed": shown["agreed"]})


# ---- checks ------------------------------------------------------------------------------------

def _check_document(outcomes: list[_Outcome], config: SynthQAConfig) -> list[_Outcome]:
    """Each reply's checks, then duplicates among the document's questions in question order."""
    seen = set()
    for outcome in outcomes:
        try:
            outcome.qa = _check_reply(outcome, config)
            duplicate = question_key(outcome.qa.question)
            if duplicate in seen:
                raise Reject("duplicate-question", "an earlier question of this document is the same")
            seen.add(duplicate)
        except Reject as reject:
            outcome.qa, outcome.reject = None, reject
    return outcomes


def _check_reply(outcome: _Outcome, config: SynthQAConfig) -> QA:
    plan, reply = outcome.plan, outcome.reply
    if reply.error is not None:
        raise Reject(outcome.error_reason, reply.error)
    if reply.truncated:
        raise Reject("truncated", f"the reply was cut at --max-tokens {config.max_tokens}")
    return check_qa(json_object(reply.text), plan.task, plan.segment, plan.sections, config.max_answer_chars)


# ---- outputs -----------------------------------------------------------------------------------

def _record(outcome: _Outcome, prompts: Prompts, generator: str) -> dict:
    plan, qa = outcome.plan, outcome.qa
    verifier = None
    if outcome.verify is not None:
        verifier = {"model": generator, "answer": verifier_answer(outcome.verify.text), "agrees": True}
    return {
        "id": plan.id, "pdf": plan.pdf, "page_range": [plan.run.first, plan.run.last], "task": plan.task,
        "question": qa.question, "answer": qa.answer, "evidence_pages": sorted(set(qa.evidence_pages)),
        "meta": {
            "source": "synth-qa", "generator": generator, "prompt_version": prompts.version,
            "prompt_sha256": prompts.sha256, "answer_format": qa.answer_format, "evidence": qa.evidence,
            "segment": {"first": plan.segment.first, "last": plan.segment.last, "method": plan.segment_method,
                        "sections": [asdict(s) for s in plan.sections]},
            "document": {"sha256": plan.sha256, "pages": plan.document_pages, "question": plan.index},
            "verifier": verifier,
        },
    }


def _reject(outcome: _Outcome) -> dict:
    plan = outcome.plan
    return {"id": plan.id, "pdf": plan.pdf, "task": plan.task,
            "segment": {"first": plan.segment.first, "last": plan.segment.last, "method": plan.segment_method},
            "reason": outcome.reject.reason, "message": str(outcome.reject),
            "reply": outcome.reply.text[:4000],
            "verifier_reply": outcome.verify.text[:1000] if outcome.verify is not None else None}


def _summary(documents: dict, outcomes: list[_Outcome], stats: Counter, backend, prompts: Prompts,
             config: SynthQAConfig, seconds: float) -> dict:
    replies = [o.reply for o in outcomes] + [o.verify for o in outcomes if o.verify is not None]
    endpoint = getattr(backend, "stats", None)
    accepted = Counter(o.plan.task for o in outcomes if o.qa is not None)
    return {
        "generator": backend.name,
        "prompt_version": prompts.version,
        "part": list(config.part) if config.part else None,
        "documents": {
            "seen": documents["seen"], "duplicates": len(documents["duplicates"]),
            "filtered": dict(Counter(f.reason for f in documents["filtered"])), "used": len(documents["plans"]),
        },
        "questions": len(outcomes),
        "requests": {
            "generate": len(outcomes), "verify": sum(o.verify is not None for o in outcomes),
            "sent": stats["sent"], "from_journal": stats["from_journal"], "not_built": stats["not_built"],
            "http_attempts": getattr(endpoint, "requests", stats["sent"]), "retries": getattr(endpoint, "retries", 0),
        },
        "accepted": {task: accepted[task] for task in sorted(accepted)},
        "accepted_total": sum(accepted.values()),
        "rejects": dict(sorted(Counter(o.reject.reason for o in outcomes if o.reject is not None).items())),
        "tokens": {"prompt": sum(r.prompt_tokens or 0 for r in replies),
                   "completion": sum(r.completion_tokens or 0 for r in replies)},
        "seconds": round(seconds, 2),
        "duplicate_files": documents["duplicates"],
        "filtered_files": [asdict(f) for f in documents["filtered"]],
    }


def _adopt_part_answers(out: Path, journal: Journal) -> None:
    """Answers of finished `part` runs (a Slurm array) into this run's journal."""
    for path in sorted(out.glob("parts/*/answers.jsonl")):
        with Journal(path) as part:
            for entry in part.entries():
                if entry["key"] not in journal:
                    journal.put(entry["key"], ChatReply.from_dict(entry["reply"]))


def _json(value, **kwargs) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


def _json_line(value) -> str:
    return _json(value) + "\n"
