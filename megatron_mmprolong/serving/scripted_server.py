"""A chat-completions server on loopback that answers from a Python function: not a model
server, but the real protocol over real HTTP (aiohttp's server), for tests (faults included),
benchmarks and the CPU demo. `GET /v1/models` lists its model; `POST /v1/chat/completions` calls
`answer(body)` in a worker thread; it returns the reply text or a `Fault` (an HTTP error status
with the error body a real server sends, a delay before answering, or a reply cut at the length
limit). An exception in `answer` is answered with HTTP 500, as a broken server would.

Strict servers wrap an answer: `fastapi_strict` validates the body's fields as `transformers serve`
does (FastAPI: an unknown field is a 422 whose body is {"detail": ...}; known fields it does not
implement, response_format among them, are accepted and ignored), `hosted_reasoning_model` as
OpenAI's reasoning models do (an unknown field or `max_tokens` is a 400 `invalid_request_error`),
and `INTERNAL_SERVER_ERROR` is the plain-text 500 of a FastAPI handler that raised (an image it
cannot decode).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web


@dataclass(frozen=True)
class Fault:
    status: int = 200  # an HTTP error status to answer with instead
    delay: float = 0.0  # seconds before answering (longer than the client's timeout: a timeout)
    text: str = ""  # the reply text when status is 200
    finish_reason: str = "stop"  # "length": a reply cut at max_tokens
    body: str | dict | None = None  # the error body: JSON (a dict), plain text (a str), or {"error": {"message": ...}}


Answer = Callable[[dict[str, Any]], "str | Fault"]


class ScriptedChatServer:
    """Use as a context manager; `url` is the base URL (…/v1); `bodies` holds every request body
    received and `headers` their headers, in arrival order."""

    def __init__(self, answer: Answer, model: str = "scripted", port: int = 0):
        self.answer, self.model, self.port = answer, model, port
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(256, thread_name_prefix="scripted-answer")
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "ScriptedChatServer":
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ScriptedChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1 << 30)  # prompts of hundreds of page images
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "the body is not JSON")
        with self._lock:
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
        try:
            result = await self._loop.run_in_executor(self._workers, self.answer, body)
        except Exception as err:
            return _error(500, f"{type(err).__name__}: {err}")
        fault = result if isinstance(result, Fault) else Fault(text=result)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status != 200:
            if isinstance(fault.body, str):
                return web.Response(text=fault.body, status=fault.status, content_type="text/plain")
            if fault.body is not None:
                return web.json_response(fault.body, status=fault.status)
            return _error(fault.status, f"scripted HTTP {fault.status}")
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])) // 4
        completion = max(1, len(fault.text) // 4)
        return web.json_response({
            "id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": fault.text},
                         "finish_reason": fault.finish_reason}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        })


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


# The request fields of OpenAI's chat-completions API (openai-python's CompletionCreateParams), which
# `transformers serve` validates a request against, with its own generation_config.
OPENAI_CHAT_FIELDS = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})

# What a FastAPI (starlette) server answers when its handler raises: HTTP 500, text/plain.
INTERNAL_SERVER_ERROR = Fault(status=500, body="Internal Server Error")


def fastapi_strict(answer: Answer, allowed: frozenset[str] = OPENAI_CHAT_FIELDS | {"generation_config"}) -> Answer:
    """`answer` behind `transformers serve`'s check of the body: a field outside `allowed` is
    refused with HTTP 422 and FastAPI's HTTPException body, the unexpected fields as a Python set."""

    def strict(body: dict[str, Any]) -> "str | Fault":
        unexpected = set(body) - allowed
        if unexpected:
            return Fault(status=422, body={"detail": f"Unexpected fields in the request: {unexpected}"})
        return answer(body)

    return strict


def hosted_reasoning_model(answer: Answer) -> Answer:
    """`answer` behind a hosted reasoning model's checks (OpenAI): an unknown field, or
    `max_tokens` (it wants `max_completion_tokens`), is refused with HTTP 400."""

    def hosted(body: dict[str, Any]) -> "str | Fault":
        unknown = sorted(set(body) - OPENAI_CHAT_FIELDS)
        if unknown:
            return Fault(status=400, body={"error": {
                "message": f"Unrecognized request argument supplied: {', '.join(unknown)}",
                "type": "invalid_request_error", "param": None, "code": None}})
        if "max_tokens" in body:
            return Fault(status=400, body={"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                           "Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}})
        return answer(body)

    return hosted
