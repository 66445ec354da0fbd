"""The Qwen2.5-VL chat format, tokenized piecewise so that image placeholders and the answer
spans are exact:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nPage 1:<|vision_start|><|image_pad|>*N<|vision_end|>...question<|im_end|>\\n
    <|im_start|>assistant\\nanswer<|im_end|>\\n

Special tokens are inserted by id and user text is tokenized with special tokens split, so text
that spells "<|im_end|>" cannot forge structure. Loss covers each assistant reply and its
<|im_end|>. (The text equals what the tokenizer's Qwen2-VL chat template renders.)
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_mmprolong.errors import BadInput

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class TokenizerError(BadInput, ValueError):
    pass


@dataclass(frozen=True)
class ImageSlot:
    """An image in a message: `tokens` placeholder tokens after the 2x2 merge."""

    tokens: int


class ChatTokenizer:
    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = str(Path(path).resolve())
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as err:
            raise TokenizerError(f"{path}: cannot load a tokenizer ({err})") from None
        ids = {}
        for token in SPECIAL_TOKENS:
            token_id = self.hf.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.hf.unk_token_id:
                raise TokenizerError(f"{path}: tokenizer has no {token} token (not a Qwen2.5-VL tokenizer)")
            ids[token] = token_id
        self.im_start, self.im_end = ids["<|im_start|>"], ids["<|im_end|>"]
        self.vision_start, self.vision_end = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.image_pad = ids["<|image_pad|>"]

    def text(self, text: str) -> list[int]:
        if not text:
            return []
        return self.hf(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def identity(self) -> dict:
        """What the manifest records about the tokenizer: path, size and a hash of its files."""
        digest = hashlib.sha256()
        for name in sorted(p.name for p in Path(self.path).iterdir() if p.is_file()):
            digest.update(name.encode())
            digest.update((Path(self.path) / name).read_bytes())
        pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.convert_tokens_to_ids("<|endoftext|>")
        return {
            "path": self.path, "vocab_size": len(self.hf), "sha256": digest.hexdigest(),
            "special_tokens": {"im_start": self.im_start, "im_end": self.im_end, "vision_start": self.vision_start,
                               "vision_end": self.vision_end, "image_pad": self.image_pad,
                               "video_pad": self.hf.convert_tokens_to_ids("<|video_pad|>"), "pad": pad},
        }

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> ChatTokenizer:
    """One tokenizer per directory and process (loading one takes seconds)."""
    return ChatTokenizer(path)


Turn = tuple[str, list["str | ImageSlot"]]


def encode_conversation(
    tokenizer: ChatTokenizer, turns: list[Turn], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and loss spans [n, 2] (start, end) of the assistant replies."""
    t = tokenizer
    if system_prompt and turns[0][0] != "system":
        turns = [("system", [system_prompt]), *turns]
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for role, parts in turns:
        ids.append(t.im_start)
        ids += t.text(f"{role}\n")
        start = len(ids)
        for part in parts:
            if isinstance(part, ImageSlot):
                ids += [t.vision_start, *[t.image_pad] * part.tokens, t.vision_end]
            else:
                ids += t.text(part)
        ids.append(t.im_end)
        if role == "assistant":
            spans.append((start, len(ids)))
        ids += t.text("\n")
    return np.asarray(ids, dtype=np.int32), np.asarray(spans, dtype=np.int32).reshape(-1, 2)
