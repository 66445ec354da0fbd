"""An OpenAI-compatible chat-completions endpoint over HTTP (aiohttp), with retries.

Timeouts, connection errors, 408, 429 and 5xx are retried with exponential backoff (the server's
Retry-After when it sends one); a request that still fails raises `RequestFailed` (the runner
records its job as failed and goes on). Other 4xx replies are final: one that refuses the request's
form rather than its content (an unknown or unsupported field, a key, a model or a path the server
does not take) raises `RequestRefused`, since every request would get it; the rest come back as a
`ChatReply` with `error` set, so one refused image or over-long prompt is counted, not fatal. The
server's own words are quoted: OpenAI's {"error": {"message"}}, FastAPI's {"detail"} (a string
or pydantic's list), or plain text.

The endpoint adapts where a server has another name for the same request, and says so once:
`max_tokens` becomes `max_completion_tokens` when a server refuses the former as hosted reasoning
models do (`max_tokens_field="auto"`), and the prefill fields (chat.PREFILL_FIELDS) are dropped
when a server refuses them and the caller's `on_prefill_refused` agrees. With `response_format`
JSON requested, it warns once when most replies are not JSON (a server that ignores the field).
The API key is read from the environment variable the user names and never appears in messages or
outputs. aiohttp rather than httpx: at 64 requests in flight httpx's async pool managed ~70
requests/s on loopback, aiohttp ~3,000 (benchmarks/bench_chat_client.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import aiohttp
from tqdm import tqdm

from megatron_mmprolong.errors import BadInput
from megatron_mmprolong.serving.chat import PREFILL_FIELDS, ChatReply, ChatRequest

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
FORM_STATUS = frozenset({401, 403, 404, 405, 415})  # about the request's form or the server, never one sample
MAX_TOKENS_FIELDS = ("auto", "max_tokens", "max_completion_tokens")
JSON_MODE_EARLY = 16  # JSON-mode replies after which a server that ignores response_format is named at once
# how servers say that a field of the request is not theirs: transformers serve (FastAPI), pydantic
# models that forbid extra fields, OpenAI ("Unrecognized request argument", "Unsupported parameter")
_FORM_WORDS = re.compile(r"unexpected (?:fields|keys) in the request|unused fields in the request|"
                         r"extra inputs are not permitted|unrecognized request argument|unsupported parameter|"
                         r"unknown (?:field|parameter|argument)", re.IGNORECASE)


class EndpointError(BadInput, RuntimeError):
    """The endpoint cannot be used: unreachable, wrong model, missing key; said in words."""


class RequestRefused(EndpointError):
    """The server refuses the request's form (the same for every request): the run stops, in one
    line quoting the server, and nothing is journaled as an answer."""


class RequestFailed(EndpointError):
    """A request still failed after the retries (timeouts, connection errors, 408, 429, 5xx)."""


def refuses_the_form(status: int | None, message: str) -> bool:
    """Whether a refusal is about the request's form rather than one sample's content."""
    return status in FORM_STATUS or bool(_FORM_WORDS.search(message))


def journaled_form_refusal(error: str | None) -> bool:
    """Whether a journaled error ("HTTP 422: ...") is a refusal of the request's form: journaled
    as an answer by versions before RequestRefused, and sent again now."""
    match = re.match(r"HTTP (\d+): (.*)", error or "", re.DOTALL)
    return bool(match) and refuses_the_form(int(match.group(1)), match.group(2))


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
    max_tokens_field: str = "auto"  # the reply's token limit as max_tokens, max_completion_tokens, or auto

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
    failed: int = 0  # requests that failed after the retries
    prompt_tokens: int = 0
    completion_tokens: int = 0
    json_mode_replies: int = 0  # replies to requests asking for a JSON object (response_format)
    json_mode_not_json: int = 0  # ... that are not one


class ChatEndpoint:
    """`await complete(request)` from any number of tasks of one event loop. `say` prints a
    note (once per kind) for the user; `on_prefill_refused(problem)`, when set, is asked (in the
    event loop) whether to drop PREFILL_FIELDS from every request once a server refuses them."""

    def __init__(self, config: EndpointConfig, max_connections: int = 64,
                 say: Callable[[str], None] | None = None):
        if config.max_tokens_field not in MAX_TOKENS_FIELDS:
            raise EndpointError(f"max_tokens_field {config.max_tokens_field!r}: expected one of "
                                f"{', '.join(MAX_TOKENS_FIELDS)}")
        self.config = config
        self.name = config.model
        self.base_url = config.base_url
        self.stats = EndpointStats()
        self.max_tokens_field = "max_tokens" if config.max_tokens_field == "auto" else config.max_tokens_field
        self.closed_prefill = False  # PREFILL_FIELDS are dropped from every request
        self.on_prefill_refused: Callable[[str], bool] | None = None
        self.say = say or _to_stderr
        self._said: set[str] = set()
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
        for _ in range(3):  # each adaptation at most once per request
            body = self._body(request)
            status, text = await self._post(body)
            if status < 400:
                return self._reply(text, body)
            message, param, code = _refusal(text)
            problem = f"HTTP {status}: {message}"
            if self._adapted(body, status, message, param, code, problem):
                continue
            if refuses_the_form(status, message):
                hint = ("; --max-tokens-field auto switches to max_completion_tokens"
                        if _refuses_max_tokens(message, param, code) else "")
                raise RequestRefused(f"{self.base_url}/chat/completions refused the request's form ({problem}); "
                                     f"stopped with nothing journaled for it{hint}")
            self.stats.refused += 1
            return ChatReply(text="", error=problem, status=status)
        self.stats.refused += 1
        return ChatReply(text="", error=problem, status=status)

    def _body(self, request: ChatRequest) -> dict:
        body = request.body(self.config.model)
        if self.closed_prefill:
            for name in PREFILL_FIELDS:
                body.pop(name, None)
        if self.max_tokens_field != "max_tokens" and "max_tokens" in body:
            body[self.max_tokens_field] = body.pop("max_tokens")
        return body

    def _adapted(self, body: dict, status: int, message: str, param, code, problem: str) -> bool:
        """Whether the request is to be sent again in another form (this refusal's, or one that
        another request's refusal switched to while this one was in flight)."""
        if status not in (400, 422):
            return False
        if any(name in body for name in PREFILL_FIELDS) and any(name in message for name in PREFILL_FIELDS):
            if not self.closed_prefill:
                if self.on_prefill_refused is None or not self.on_prefill_refused(problem):
                    return False
                self.closed_prefill = True
            return True
        if "max_tokens" in body and _refuses_max_tokens(message, param, code):
            if self.max_tokens_field == "max_tokens":
                if self.config.max_tokens_field != "auto":
                    return False
                self.max_tokens_field = "max_completion_tokens"
                self.note("max_tokens", f"note: {self.base_url} refuses max_tokens ({problem}); sending "
                                        "max_completion_tokens instead (--max-tokens-field auto)")
            return True
        return False

    async def _post(self, body: dict) -> tuple[int, str]:
        """(status, text) of an answer or a final refusal; RequestFailed after the retries."""
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
                if status not in RETRIED_STATUS:
                    return status, text
                problem = f"HTTP {status}: {_refusal(text)[0]}"
            if attempt == self.config.max_retries:
                self.stats.failed += 1
                times = f"{attempt + 1} time{'s' if attempt else ''}"
                raise RequestFailed(f"{self.base_url}/chat/completions failed {times}; last: {problem}")
            self.stats.retries += 1
            delay = retry_after if retry_after is not None else wait * (1 + 0.25 * random.random())
            await asyncio.sleep(min(delay, self.config.max_backoff))
            wait *= 2
        raise AssertionError("unreachable")

    def _reply(self, raw: str, body: dict) -> ChatReply:
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
        wanted = body.get("response_format")
        if isinstance(wanted, dict) and wanted.get("type") in ("json_object", "json_schema"):
            self.stats.json_mode_replies += 1
            self.stats.json_mode_not_json += not _is_json(text)
            if self.stats.json_mode_replies >= JSON_MODE_EARLY:
                self._check_json_mode()
        return ChatReply(text=text, finish_reason=choice.get("finish_reason"),
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0))

    def _check_json_mode(self) -> None:
        replies, not_json = self.stats.json_mode_replies, self.stats.json_mode_not_json
        if replies and 2 * not_json > replies:
            self.note("json_mode", f"warning: {self.base_url} seems to ignore response_format (--json-mode): "
                                   f"{not_json} of {replies} replies were not a JSON object (transformers serve, "
                                   "for one, accepts the field and ignores it)")

    def note(self, kind: str, line: str) -> None:
        """Say `line` unless a note of this kind was said."""
        if kind not in self._said:
            self._said.add(kind)
            self.say(line)

    async def aclose(self) -> None:
        """Close this loop's connections (the runner does, when its jobs are done)."""
        self._check_json_mode()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "timed out"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _refusal(raw: str) -> tuple[str, str | None, str | None]:
    """(message on one line, param, code) of an error reply: OpenAI's {"error": {...}} (or a
    string), FastAPI's {"detail": ...} (a string, or pydantic's list of errors), or plain text."""
    param = code = None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    message = None
    if isinstance(data, dict):
        error, detail = data.get("error"), data.get("detail")
        if isinstance(error, dict):
            message, param, code = error.get("message"), error.get("param"), error.get("code")
        elif isinstance(error, str):
            message = error
        elif isinstance(detail, list) and detail:
            message = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" if isinstance(d, dict)
                                else str(d) for d in detail)
        elif detail:
            message = str(detail)
        message = message or data.get("message")
    text = " ".join(str(message if message else raw).split())
    return (text[:300] or "no message"), param, code


def _refuses_max_tokens(message: str, param, code) -> bool:
    """A hosted reasoning model's refusal of max_tokens (not vLLM's per-request "'max_tokens' or
    'max_completion_tokens' is too large")."""
    if param == "max_tokens" and code == "unsupported_parameter":
        return True
    return bool(re.search(r"unsupported parameter\W+max_tokens|max_tokens\W+is not supported", message, re.IGNORECASE))


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (dict, list))
    except ValueError:
        return False


def _to_stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # above the progress bars


def _retry_after(headers) -> float | None:
    try:
        return max(0.0, float(headers["Retry-After"]))
    except (KeyError, ValueError):
        return None
