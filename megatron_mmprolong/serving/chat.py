"""Chat-completions requests and replies, and the content parts of a multimodal message."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

# vLLM's and transformers' fields for a reply that continues the final assistant message
# ("Answer:") instead of opening a new assistant turn; strict servers refuse them.
PREFILL_FIELDS = ("continue_final_message", "add_generation_prompt")


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completions call, less the model name (the backend adds it). Greedy by default."""

    messages: list[dict[str, Any]]
    max_tokens: int = 512
    temperature: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # other body fields: seed, stop, response_format

    def body(self, model: str) -> dict[str, Any]:
        return {"model": model, "messages": self.messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, **self.extra}


@dataclass(frozen=True)
class ChatReply:
    """The first choice of a completion. `error` is set (and `text` empty) when the server
    refused this request for good (a 4xx other than 408/429: an image it cannot read, a prompt
    over its length limit; `status` is the HTTP status); callers count those instead of failing."""

    text: str
    finish_reason: str | None = None  # "stop", or "length" when cut at max_tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int | None = None  # of a refusal

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatReply":
        return cls(**{k: data.get(k) for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "error",
                                               "status")})


def closed_prefill(request: ChatRequest) -> ChatRequest:
    """The request without PREFILL_FIELDS: its final assistant message becomes a closed turn and
    the server's chat template opens a new one after it (MMLongBench's vLLM requests)."""
    return dataclasses.replace(request, extra={k: v for k, v in request.extra.items() if k not in PREFILL_FIELDS})


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    """An image as a base64 data URL, the form every OpenAI-compatible VLM server accepts."""
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def image_mime(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    raise ValueError("image bytes are neither PNG nor JPEG")


def request_key(*parts: Any) -> str:
    """A journal key from what identifies a request (ids, settings, model): JSON, then SHA-256,
    so a key can be made without building the request (rendering its pages)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
