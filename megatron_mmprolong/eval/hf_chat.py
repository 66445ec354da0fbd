"""A model in this process behind the same `ChatBackend` protocol as a served endpoint
(serving/runner.py), so `run_jobs` drives either: transformers' Qwen2.5-VL (`synth-qa --generator
hf:DIR`, `eval mmlongbench --hf-dir`) or this project's model on a Megatron checkpoint
(`MegatronGenerator`, the same `generate` interface; `eval mmlongbench --mcore-dir`).

A chat-completions request becomes the Qwen2.5-VL chat format with this project's tokenizer code
(data/chat.py) and image pipeline (smart_resize, patches: data/images.py, data/pixels.py), so a
page reaches the model exactly as build-data would store it. One `generate` runs at a time; the
reply stops at <|im_end|> ("stop") or at max_tokens ("length"); `temperature` > 0 samples with the
request's `seed`. A request with `continue_final_message` (vLLM's and transformers' name) ends in
an assistant message that the reply continues ("Answer:"), instead of opening a new turn.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from megatron_mmprolong.convert.hf_checkpoint import CheckpointError
from megatron_mmprolong.convert.parity import hf_token_types
from megatron_mmprolong.data.chat import DEFAULT_SYSTEM_PROMPT, ChatTokenizer, ImageSlot, encode_conversation
from megatron_mmprolong.data.images import ImageError, ImageParams, prepare_image
from megatron_mmprolong.data.pixels import PilDecoder, pixel_values
from megatron_mmprolong.serving.chat import ChatReply, ChatRequest


class LocalChatBackend:
    """`model`: anything with transformers' `generate(input_ids, ..., pixel_values, image_grid_thw)`.
    `in_thread=False` runs `generate` in the event loop's own thread: a Megatron model's
    collectives and CUDA device belong to the thread that set them up."""

    def __init__(self, model, tokenizer: ChatTokenizer, image: ImageParams, name: str, device: str = "cpu",
                 in_thread: bool = True):
        self.model, self.tokenizer, self.image, self.name, self.device = model, tokenizer, image, name, device
        self.in_thread = in_thread
        self._lock = threading.Lock()

    async def complete(self, request: ChatRequest) -> ChatReply:
        return await asyncio.to_thread(self._complete, request) if self.in_thread else self._complete(request)

    def _complete(self, request: ChatRequest) -> ChatReply:
        import torch

        try:
            inputs = self.prompt(request)
        except (ValueError, ImageError) as err:
            return ChatReply(text="", error=f"request refused: {err}")
        sampling = {"do_sample": request.temperature > 0}
        if request.temperature > 0:
            sampling["temperature"] = request.temperature
        with self._lock, torch.no_grad():
            torch.manual_seed(int(request.extra.get("seed", 0)))
            out = self.model.generate(**inputs, max_new_tokens=request.max_tokens, eos_token_id=self.tokenizer.im_end,
                                      pad_token_id=self.tokenizer.im_end, **sampling)
        prompt_length = inputs["input_ids"].shape[1]
        new = out[0, prompt_length:].tolist()
        stopped = self.tokenizer.im_end in new
        text = self.tokenizer.decode(new[:new.index(self.tokenizer.im_end)] if stopped else new)
        return ChatReply(text=text, finish_reason="stop" if stopped else "length", prompt_tokens=prompt_length,
                         completion_tokens=len(new))

    def prompt(self, request: ChatRequest) -> dict:
        """The model's inputs for the request: `encode_request`'s tokens, pixels and grids as tensors."""
        import torch

        ids, images, grids = encode_request(self.tokenizer, request, self.image)
        input_ids = torch.tensor([ids], device=self.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if images:
            pixels = pixel_values(images, grids, PilDecoder(), self.image)
            dtype = next(self.model.parameters()).dtype
            inputs |= {"pixel_values": torch.from_numpy(pixels).to(self.device, dtype),
                       "image_grid_thw": torch.tensor(grids, device=self.device),
                       **hf_token_types(self.model, input_ids)}
        return inputs


class TransformersChatBackend(LocalChatBackend):
    """transformers' model (Qwen2.5-VL or Qwen3-VL) from a checkpoint directory with its tokenizer: on the GPU in bf16
    when there is one (or `dtype`), else on the CPU in fp32. Images follow the model family's processor,
    within `min_pixels`..`max_pixels` when given."""

    def __init__(self, hf_dir: str | Path, min_pixels: int | None = None, max_pixels: int | None = None, dtype=None):
        import torch

        from megatron_mmprolong.config import VLConfig
        from megatron_mmprolong.convert.transformers_model import hf_model_class

        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise CheckpointError(f"{hf_dir}: no config.json there (a Qwen2.5-VL or Qwen3-VL checkpoint directory)")
        if not (hf_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"{hf_dir}: no tokenizer.json there; the checkpoint needs its tokenizer")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
        config = VLConfig.from_hf_dir(hf_dir)
        model = hf_model_class(config).from_pretrained(hf_dir, dtype=dtype).to(device).eval()
        image = ImageParams.for_model(config.vision, min_pixels, max_pixels)
        super().__init__(model, ChatTokenizer(hf_dir), image, hf_dir.resolve().name, device)


def encode_request(tokenizer: ChatTokenizer, request: ChatRequest, image: ImageParams):
    """(token ids, encoded images, their grids) of a chat request: the chat format up to the open
    assistant turn (the default system prompt when the request has none), or up to the end of the
    final assistant message with `continue_final_message`."""
    turns, images, grids = _conversation(request.messages, image)
    prefill = None
    if request.extra.get("continue_final_message") and turns and turns[-1][0] == "assistant":
        prefill = turns.pop()[1]
    ids, _ = encode_conversation(tokenizer, turns, DEFAULT_SYSTEM_PROMPT)
    ids = [*ids.tolist(), tokenizer.im_start, *tokenizer.text("assistant\n")]
    for part in prefill or ():
        if isinstance(part, ImageSlot):
            raise ValueError("an image in the message that the reply continues")
        ids += tokenizer.text(part)
    return ids, images, grids


def _conversation(messages: list[dict[str, Any]], image: ImageParams):
    """(turns for encode_conversation, encoded images, their grids) of chat-completions messages."""
    turns, images, grids = [], [], []
    for message in messages:
        content = message.get("content")
        parts = []
        for part in ([{"type": "text", "text": content}] if isinstance(content, str) else content or []):
            if part.get("type") == "text":
                parts.append(part["text"])
            elif part.get("type") == "image_url":
                data, grid = prepare_image(_data_url_image(part["image_url"]["url"]), image)
                images.append(data)
                grids.append(grid)
                parts.append(ImageSlot(grid[1] * grid[2] // image.merge_size ** 2))
            else:
                raise ValueError(f"unsupported content part {part.get('type')!r}")
        turns.append((message["role"], parts))
    return turns, images, grids


def _data_url_image(url: str) -> Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("images must be base64 data URLs (this backend fetches nothing)")
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageError(f"an image cannot be decoded ({err})") from None
