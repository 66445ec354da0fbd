"""A question's chat request with its video, in the form each backend takes, and the local
backend that turns it into the model's inputs.

Served models (vLLM) get vLLM's `video_url` content part holding the sampled frames themselves,
"data:video/jpeg;base64,<frame>,<frame>,..." (vLLM's VideoMediaIO reads this media type as a
list of JPEG frames), already at the planned size, with `mm_processor_kwargs` {"fps": the
sampled fps, "do_sample_frames": false, "min_pixels" = "max_pixels": the frame's pixels} so the
server's processor neither samples again, nor misplaces them in time, nor resizes them (the
journal keeps the server's prompt_tokens, to check that it counted the planned tokens).

Local models (transformers, or this project's model on a Megatron checkpoint) get the decoded
frames as they are (a "video_frames" part, never sent anywhere) with their times. The video
becomes video items on the model's time axis, as the family's processor writes them:
Qwen2.5-VL: <|vision_start|><|video_pad|> x groups*h*w/4 <|vision_end|>, second_per_grid_ts =
2 / sampled fps (M-RoPE time = tokens_per_second x seconds); Qwen3-VL: for each 2-frame group
"<t seconds>" (t the mean time of its frames, one decimal) then <|vision_start|>, its tokens,
<|vision_end|>.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from megatron_mmprolong.data.chat import DEFAULT_SYSTEM_PROMPT, ChatTokenizer
from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.eval.hf_chat import LocalChatBackend
from megatron_mmprolong.eval.video.prompts import VideoPrompt
from megatron_mmprolong.eval.video.sampling import FramePlan
from megatron_mmprolong.serving.chat import ChatRequest, text_part

JPEG_QUALITY = 95


def video_url_part(frames: np.ndarray) -> dict[str, Any]:
    """vLLM's video_url part of JPEG frames (uint8 [n, h, w, 3])."""
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(encoded)}}


def frames_part(frames: np.ndarray, plan: FramePlan) -> dict[str, Any]:
    """The decoded frames for a model in this process."""
    return {"type": "video_frames", "frames": frames, "times": list(plan.times), "sample_fps": plan.sample_fps}


def video_request(prompt: VideoPrompt, frames: np.ndarray, plan: FramePlan, max_tokens: int,
                  served: bool) -> ChatRequest:
    video = video_url_part(frames) if served else frames_part(frames, plan)
    content = [*([text_part(prompt.before)] if prompt.before else []), video, text_part(prompt.after)]
    pixels = plan.height * plan.width  # the server's processor keeps the planned size
    extra = {"mm_processor_kwargs": {"fps": plan.sample_fps, "do_sample_frames": False, "min_pixels": pixels,
                                     "max_pixels": pixels}} if served else {}
    return ChatRequest([{"role": "user", "content": content}], max_tokens=max_tokens, extra=extra)


def video_pixel_values(frames: np.ndarray, image: ImageParams, device: str = "cpu") -> torch.Tensor:
    """uint8 frames [n, H, W, 3] (n even; H, W multiples of patch x merge) -> the processor's
    pixel_values_videos [n/2 * H/p * W/p, 3 * 2 * p * p] on `device`: normalised, 2 frames a
    temporal patch, patches in merge-group order. The frames travel as uint8 (4x smaller)."""
    n, height, width, _ = frames.shape
    p, m, t = image.patch_size, image.merge_size, image.temporal_patch_size
    x = torch.from_numpy(np.array(frames)).to(device)  # a copy: cached frames are read-only maps
    mean, std = (torch.tensor(v).to(device) for v in (image.mean, image.std))
    x = (x.float().div_(255) - mean) / std
    x = x.permute(0, 3, 1, 2).reshape(n // t, t, 3, height // (p * m), m, p, width // (p * m), m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # groups, rows, cols, row in merge, col in merge, C, t, p, p
    return x.reshape(n // t * (height // p) * (width // p), 3 * t * p * p)


class LocalVideoBackend(LocalChatBackend):
    """`LocalChatBackend` for requests with a "video_frames" part (and text), in the family's format."""

    def __init__(self, model, tokenizer: ChatTokenizer, image: ImageParams, name: str, family: str,
                 device: str = "cpu", in_thread: bool = True):
        super().__init__(model, tokenizer, image, name, device, in_thread)
        self.family = family
        self.video_pad = tokenizer.hf.convert_tokens_to_ids("<|video_pad|>")

    def prompt(self, request: ChatRequest) -> dict:
        from megatron_mmprolong.convert.parity import hf_token_types

        tokenizer, image = self.tokenizer, self.image
        ids = [tokenizer.im_start, *tokenizer.text("system\n"), *tokenizer.text(DEFAULT_SYSTEM_PROMPT),
               tokenizer.im_end, *tokenizer.text("\n")]
        videos = []
        for message in request.messages:
            ids += [tokenizer.im_start, *tokenizer.text(f"{message['role']}\n")]
            content = message["content"]
            for part in [text_part(content)] if isinstance(content, str) else content:
                if part["type"] == "text":
                    ids += tokenizer.text(part["text"])
                elif part["type"] == "video_frames":
                    ids += self._video_tokens(part)
                    videos.append(part)
                else:
                    raise ValueError(f"unsupported content part {part['type']!r} (a local model takes text and "
                                     "video_frames)")
            ids += [tokenizer.im_end, *tokenizer.text("\n")]
        ids += [tokenizer.im_start, *tokenizer.text("assistant\n")]
        input_ids = torch.tensor([ids], device=self.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if videos:
            dtype = next(self.model.parameters()).dtype
            pixels = torch.cat([video_pixel_values(v["frames"], image, self.device) for v in videos])
            grids = [self._grid(v["frames"]) for v in videos]
            inputs |= {"pixel_values_videos": pixels.to(self.device, dtype),
                       "video_grid_thw": torch.tensor(grids, device=self.device), **hf_token_types(self.model, input_ids)}
            if self.family == "qwen2_5_vl":
                seconds = [image.temporal_patch_size / v["sample_fps"] for v in videos]
                inputs["second_per_grid_ts"] = torch.tensor(seconds, device=self.device)
        return inputs

    def _grid(self, frames: np.ndarray) -> tuple[int, int, int]:
        p = self.image.patch_size
        return len(frames) // self.image.temporal_patch_size, frames.shape[1] // p, frames.shape[2] // p

    def _video_tokens(self, part: dict) -> list[int]:
        t = self.tokenizer
        groups, rows, cols = self._grid(part["frames"])
        per_group = rows * cols // self.image.merge_size ** 2
        if self.family != "qwen3_vl":
            return [t.vision_start, *[self.video_pad] * (groups * per_group), t.vision_end]
        times = np.asarray(part["times"]).reshape(groups, -1).mean(1)
        ids = []
        for seconds in times:  # one text timestamp per group: a few tokens each, not per frame pixel
            ids += [*t.text(f"<{seconds:.1f} seconds>"), t.vision_start, *[self.video_pad] * per_group, t.vision_end]
        return ids
