"""Keep up to N requests in flight against a chat backend, skipping what the journal answered.

A job is a key and a function that builds its request; the function runs (in a worker thread,
overlapping the requests in flight) only for keys the journal lacks, so a resumed run neither
re-renders pages nor resends anything. Answers reach `on_reply` as they arrive, in completion
order, and are journaled (with the job's `extra` fields) before it is called. A build that raises `UnbuildableJob` (a page that
does not render) answers its job with a reply whose `error` says why: not sent, not journaled.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from tqdm import tqdm

from megatron_mmprolong.serving.chat import ChatReply, ChatRequest
from megatron_mmprolong.serving.journal import Journal


class UnbuildableJob(Exception):
    """Raised by a job's `build` when its request cannot be made; the message is the reason."""


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
    seconds: float = 0.0

    @property
    def requests_per_second(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def run_jobs(backend: ChatBackend, jobs: Iterable[Job], journal: Journal | None = None, concurrency: int = 8,
             on_reply: Callable[[Job, ChatReply], None] | None = None, progress: str | None = None) -> RunStats:
    """Answer every job (from the journal or the backend); see the module docstring."""
    return asyncio.run(run_jobs_async(backend, jobs, journal, concurrency, on_reply, progress))


async def run_jobs_async(backend: ChatBackend, jobs: Iterable[Job], journal: Journal | None = None,
                         concurrency: int = 8, on_reply: Callable[[Job, ChatReply], None] | None = None,
                         progress: str | None = None) -> RunStats:
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    jobs = list(jobs)
    stats = RunStats()
    bar = tqdm(total=len(jobs), desc=progress, unit="req", disable=progress is None, dynamic_ncols=True)
    began = time.perf_counter()

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
        bar.update()
        elapsed = time.perf_counter() - began
        bar.set_postfix(sent=stats.sent, req_s=f"{stats.sent / elapsed:.1f}" if elapsed else "-", refresh=False)

    pending: list[Job] = []
    seen: set[str] = set()
    for job in jobs:
        if job.key in seen:
            raise ValueError(f"two jobs share the key {job.key}")
        seen.add(job.key)
        reply = journal.reply(job.key) if journal is not None else None
        if reply is not None:
            finish(job, reply, fresh=False)
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
                bar.update()
                continue
            finish(job, await backend.complete(request), fresh=True)

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(pending)))]
    try:
        await asyncio.gather(*workers)
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
