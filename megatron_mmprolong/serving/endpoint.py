"""An OpenAI-compatible chat-completions endpoint over HTTP (aiohttp), with retries.

Timeouts, connection errors, 408, 429 and 5xx are retried with exponential backoff (the server's
Retry-After when it sends one); other 4xx replies are final and come back as a `ChatReply` with
`error` set, so one refused image or over-long prompt is counted, not fatal. The API key is read
from the environment variable the user names and never appears in messages or outputs.
aiohttp rather than httpx: at 64 requests in flight httpx's async pool managed ~70 requests/s on
loopback, aiohttp ~3,000 (benchmarks/bench_chat_client.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from megatron_mmprolong.serving.chat import ChatReply, ChatRequest

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """The endpoint cannot be used: unreachable, wrong model, missing key; said in words."""


@dataclass(frozen=True)
class EndpointConfig:
    url: str  # base URL: http://host:8000/v1 (a bare http://host:8000 gets /v1; /chat/completions is dropped)
    model: str
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout: float = 600.0  # seconds per request (a 128K-token prompt takes a while to prefill)
    connect_timeout: float = 10.0
    max_retries: int = 5
    backoff: float = 1.0  # first wait in seconds, doubled per retry
    max_backoff: float = 60.0

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/").removesuffix("/chat/completions")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise EndpointError(f"endpoint {self.url!r} is not an http(s) URL such as http://localhost:8000/v1")
        return url if parts.path not in ("", "/") else url + "/v1"


@dataclass
class EndpointStats:
    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    refused: int = 0  # final 4xx replies
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatEndpoint:
    """`await complete(request)` from any number of tasks of one event loop."""

    def __init__(self, config: EndpointConfig, max_connections: int = 64):
        self.config = config
        self.name = config.model
        self.base_url = config.base_url
        self.stats = EndpointStats()
        self._headers = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise EndpointError(f"the environment variable {config.api_key_env} (--api-key-env) is not set")
            self._headers["Authorization"] = f"Bearer {key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._loop = None

    def _http(self) -> aiohttp.ClientSession:
        """The connection pool of the running event loop (each `asyncio.run` has its own)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout, sock_connect=self.config.connect_timeout),
                connector=aiohttp.TCPConnector(limit=self._max_connections),
            )
            self._loop = loop
        return self._session

    def check(self) -> list[str]:
        """`check_async` from synchronous code."""

        async def check_and_close():
            try:
                return await self.check_async()
            finally:
                await self.aclose()

        return asyncio.run(check_and_close())

    async def check_async(self) -> list[str]:
        """Fail fast: the server answers and serves the model (GET /models, which vLLM, SGLang
        and hosted APIs implement). Returns the served model names."""
        try:
            async with self._http().get(self.base_url + "/models",
                                        timeout=aiohttp.ClientTimeout(total=self.config.connect_timeout * 3)) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise EndpointError(f"cannot reach the endpoint {self.base_url}: {_describe(err)}") from None
        if status in (401, 403):
            raise EndpointError(f"{self.base_url} refused the credentials (HTTP {status}); "
                                "check the key in the variable named by --api-key-env")
        if status == 404:
            return []  # a server without the listing; the first request will tell
        if status >= 400:
            raise EndpointError(f"{self.base_url}/models answered HTTP {status}")
        try:
            served = [m["id"] for m in json.loads(text).get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EndpointError(f"{self.base_url}/models did not answer with an OpenAI model list") from None
        if served and self.config.model not in served:
            raise EndpointError(f"{self.base_url} does not serve model {self.config.model!r}; it serves "
                                f"{', '.join(served)}")
        return served

    async def complete(self, request: ChatRequest) -> ChatReply:
        body = request.body(self.config.model)
        wait = self.config.backoff
        for attempt in range(self.config.max_retries + 1):
            self.stats.requests += 1
            retry_after = None
            try:
                async with self._http().post(self.base_url + "/chat/completions", json=body) as response:
                    status, text = response.status, await response.text()
                    retry_after = _retry_after(response.headers)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                problem = _describe(err)
            else:
                if status < 400:
                    return self._reply(text)
                problem = f"HTTP {status}: {_error_text(text)}"
                if status not in RETRIED_STATUS:
                    self.stats.refused += 1
                    return ChatReply(text="", error=problem)
            if attempt == self.config.max_retries:
                raise EndpointError(f"{self.base_url}/chat/completions failed {attempt + 1} times; last: {problem}")
            self.stats.retries += 1
            delay = retry_after if retry_after is not None else wait * (1 + 0.25 * random.random())
            await asyncio.sleep(min(delay, self.config.max_backoff))
            wait *= 2
        raise AssertionError("unreachable")

    def _reply(self, raw: str) -> ChatReply:
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"{self.base_url}/chat/completions answered something that is not a chat "
                                f"completion: {raw[:200]!r}") from None
        usage = data.get("usage") or {}
        self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return ChatReply(text=text, finish_reason=choice.get("finish_reason"),
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0))

    async def aclose(self) -> None:
        """Close this loop's connections (the runner does, when its jobs are done)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "timed out"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _error_text(raw: str) -> str:
    try:
        error = json.loads(raw).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return raw[:300] or "no message"


def _retry_after(headers) -> float | None:
    try:
        return max(0.0, float(headers["Retry-After"]))
    except (KeyError, ValueError):
        return None
