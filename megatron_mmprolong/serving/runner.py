"""Keep up to N requests in flight against a chat backend, skipping what the journal answered.

A job is a key and a function that builds its request; the function runs (in a worker thread,
overlapping the requests in flight) only for keys the journal lacks, so a resumed run neither
re-renders pages nor resends anything. Answers reach `on_reply` as they arrive, in completion
order, and are journaled (with the job's `extra` fields) before it is called. A build that raises
`UnbuildableJob` (a page that does not render) answers its job with a reply whose `error` says why:
not sent, not journaled.

Refusals are final answers only when they are about one request. Until a request of this run is
answered, refused requests are held back (not journaled, not passed on): the same refusal for the
first SAME_REFUSALS requests, or for every request of a run that has nothing answered in its
journal either, stops the run (`RequestRefused`, the server quoted); an answer releases them. A
request that fails after the endpoint's retries (`RequestFailed`) is recorded in `failed`, not
journaled, so a rerun sends it again; the run goes on until more than `max_failed` have failed
(`TooManyFailures`). Refusals of the request's form that an earlier version journaled are sent
again.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from tqdm import tqdm

from megatron_mmprolong.serving.chat import ChatReply, ChatRequest
from megatron_mmprolong.serving.endpoint import RequestFailed, RequestRefused, journaled_form_refusal
from megatron_mmprolong.serving.journal import Journal

SAME_REFUSALS = 3  # the same refusal for this many requests, and no answer: the request's form is refused


class UnbuildableJob(Exception):
    """Raised by a job's `build` when its request cannot be made; the message is the reason."""


class TooManyFailures(RequestFailed):
    """More requests failed after their retries than the run allows; `failed` maps their job
    keys to the last error."""

    def __init__(self, message: str, failed: dict[str, str]):
        super().__init__(message)
        self.failed = failed


class ChatBackend(Protocol):
    name: str  # the model's name, part of every journal key a caller makes

    async def complete(self, request: ChatRequest) -> ChatReply: ...


@dataclass(frozen=True)
class Job:
    key: str
    build: Callable[[], ChatRequest]
    extra: dict[str, Any] = field(default_factory=dict)  # journaled beside the reply


@dataclass
class RunStats:
    sent: int = 0  # requests answered in this run
    journaled: int = 0  # answered by an earlier run
    refused: int = 0
    truncated: int = 0
    unbuilt: int = 0  # jobs whose build raised UnbuildableJob
    failed: dict[str, str] = field(default_factory=dict)  # job key -> the error, of requests that kept failing
    seconds: float = 0.0

    @property
    def requests_per_second(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def run_jobs(backend: ChatBackend, jobs: Iterable[Job], journal: Journal | None = None, concurrency: int = 8,
             on_reply: Callable[[Job, ChatReply], None] | None = None, progress: str | None = None,
             max_failed: int = 0, on_failed: Callable[[Job, str], None] | None = None) -> RunStats:
    """Answer every job (from the journal or the backend); see the module docstring."""
    return asyncio.run(run_jobs_async(backend, jobs, journal, concurrency, on_reply, progress, max_failed, on_failed))


async def run_jobs_async(backend: ChatBackend, jobs: Iterable[Job], journal: Journal | None = None,
                         concurrency: int = 8, on_reply: Callable[[Job, ChatReply], None] | None = None,
                         progress: str | None = None, max_failed: int = 0,
                         on_failed: Callable[[Job, str], None] | None = None) -> RunStats:
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    jobs = list(jobs)
    stats = RunStats()
    bar = tqdm(total=len(jobs), desc=progress, unit="req", disable=progress is None, dynamic_ncols=True)
    began = time.perf_counter()
    held: list[tuple[Job, ChatReply]] = []  # refusals before this run's first answer
    answered = [False]  # a request of this run was answered
    answered_before = journal is not None and any(not e["reply"].get("error") for e in journal.entries())

    def show() -> None:
        bar.update()
        elapsed = time.perf_counter() - began
        bar.set_postfix(sent=stats.sent, req_s=f"{stats.sent / elapsed:.1f}" if elapsed else "-", refresh=False)

    def finish(job: Job, reply: ChatReply, fresh: bool) -> None:
        if fresh:
            stats.sent += 1
            if journal is not None:
                journal.put(job.key, reply, **job.extra)
        else:
            stats.journaled += 1
        stats.refused += reply.error is not None
        stats.truncated += reply.truncated
        if on_reply is not None:
            on_reply(job, reply)

    def answer(job: Job, reply: ChatReply) -> None:
        """A reply to a request of this run: a refusal waits until one is answered."""
        if reply.error is not None and reply.status is not None and not answered[0]:
            held.append((job, reply))
            if len(held) >= SAME_REFUSALS and _all_alike(held):
                raise _refused(backend, held)
        else:
            if reply.error is None and not answered[0]:
                answered[0] = True
                for waiting in held:
                    finish(*waiting, fresh=True)
                held.clear()
            finish(job, reply, fresh=True)
        show()

    pending: list[Job] = []
    seen: set[str] = set()
    for job in jobs:
        if job.key in seen:
            raise ValueError(f"two jobs share the key {job.key}")
        seen.add(job.key)
        reply = journal.reply(job.key) if journal is not None else None
        if reply is not None and not journaled_form_refusal(reply.error):
            finish(job, reply, fresh=False)
            show()
        else:
            pending.append(job)

    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in pending:
        queue.put_nowait(job)

    async def worker() -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                request = await asyncio.to_thread(job.build)
            except UnbuildableJob as err:
                stats.unbuilt += 1
                if on_reply is not None:
                    on_reply(job, ChatReply(text="", error=str(err)))
                show()
                continue
            try:
                reply = await backend.complete(request)
            except RequestFailed as err:
                stats.failed[job.key] = str(err)
                if on_failed is not None:
                    on_failed(job, str(err))
                show()
                if len(stats.failed) > max_failed:
                    count = len(stats.failed)
                    raise TooManyFailures(f"{count} request{'s' if count > 1 else ''} failed after retries, more "
                                          f"than {max_failed} allowed; last: {err}", dict(stats.failed)) from None
                continue
            answer(job, reply)

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(pending)))]
    try:
        await asyncio.gather(*workers)
        if held:  # nothing of this run was answered
            if _all_alike(held) and (len(held) >= SAME_REFUSALS or not answered_before):
                raise _refused(backend, held)
            for waiting in held:  # refusals of single requests in a folder answered before
                finish(*waiting, fresh=True)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    finally:
        stats.seconds = time.perf_counter() - began
        bar.close()
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()
    return stats


def _alike(reply: ChatReply) -> tuple:
    """A refusal's status and words, numbers aside (token counts, request ids)."""
    return reply.status, re.sub(r"\d+", "#", reply.error or "")


def _all_alike(held: list[tuple[Job, ChatReply]]) -> bool:
    return len({_alike(reply) for _, reply in held}) == 1


def _refused(backend, held: list[tuple[Job, ChatReply]]) -> RequestRefused:
    where = getattr(backend, "base_url", None)
    where = f"{where}/chat/completions" if where else backend.name
    count = len(held)
    every = f"all {count} requests of this run alike" if count > 1 else "the only request of this run"
    return RequestRefused(f"{where} refused {every} ({held[0][1].error}), none answered; stopped with nothing "
                          "journaled for them")
