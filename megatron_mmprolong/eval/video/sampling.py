"""Which frames of a video the model sees, and at what size: the paper's protocol (1 fps, at most
768 frames, at most 24,576 video tokens in all) as pure functions of the video's frame count,
frame rate and size.

Frame count (qwen-vl-utils' `smart_nframes`, fps given): n = frames / avg_fps * fps, clamped to
[min_frames rounded up to 2, min(max_frames, frames) rounded down to 2], then made even by the
rule: "floor" (qwen-vl-utils >= 0.0.10 and the Qwen3-VL copy: floor to 2, at most the video's
frames) or "round" (qwen-vl-utils 0.0.8: round to 2). 95.5 s of 2 fps video at 1 fps: 94 vs 96.
Frame indices: round(linspace(0, frames - 1, n)) in float32, as the reference's torch code; a
frame's time is its index / avg_fps.

Frame size: every frame of a video has one size, the family's `smart_resize` of the video's size
within a per-frame pixel cap that spends the token budget: a temporal group of 2 frames gives
(h / f) x (w / f) tokens (f = patch x merge: 28 for Qwen2.5-VL, 32 for Qwen3-VL), so the cap is
floor(budget / groups) tokens per group (at most the family's 768). smart_resize floors when it
shrinks, so the total stays within the budget; by default nothing is raised back to the family's
128-token floor (`token_floor=False`), which at 768 frames would give 49,152 tokens. With
`token_floor=True` the reference's rule holds instead (the floor wins over the budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_mmprolong.data.images import ImageParams, smart_resize

FRAME_RULES = ("floor", "round")
MIN_GROUP_TOKENS = 128  # qwen-vl-utils' VIDEO_MIN_PIXELS / VIDEO_MIN_TOKEN_NUM: a floor per 2-frame group
MAX_GROUP_TOKENS = 768  # VIDEO_MAX_PIXELS / VIDEO_MAX_TOKEN_NUM: a cap per 2-frame group


class SamplingError(ValueError):
    pass


@dataclass(frozen=True)
class SamplingConfig:
    """The protocol: the paper's 1 fps, 768 frames and 24,576 tokens by default."""

    fps: float = 1.0
    max_frames: int = 768
    max_video_tokens: int = 24576
    min_frames: int = 4  # qwen-vl-utils' FPS_MIN_FRAMES
    frame_rule: str = "floor"
    token_floor: bool = False  # True: the reference's 128 tokens per group win over the budget

    def __post_init__(self):
        if self.frame_rule not in FRAME_RULES:
            raise SamplingError(f"frame rule must be one of {', '.join(FRAME_RULES)}, got {self.frame_rule!r}")
        if self.fps <= 0 or self.max_frames < 2 or self.max_video_tokens < 1:
            raise SamplingError(f"need fps > 0, max frames >= 2 and a token budget >= 1, got {self.fps}, "
                                f"{self.max_frames}, {self.max_video_tokens}")


@dataclass(frozen=True)
class VideoMeta:
    """What the decoder says of a video before any frame is decoded."""

    frames: int
    avg_fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        return self.frames / self.avg_fps


@dataclass(frozen=True)
class FramePlan:
    """The frames one video contributes: their indices and times, their common size, its tokens."""

    indices: tuple[int, ...]
    times: tuple[float, ...]  # seconds: index / avg_fps
    height: int
    width: int
    tokens: int  # language-model tokens of the whole video, as the family counts them
    sample_fps: float  # frames sampled per second of video (n / frames * avg_fps)
    temporal_patch: int = 2

    def grid(self, patch: int) -> tuple[int, int, int]:
        return len(self.indices) // self.temporal_patch, self.height // patch, self.width // patch

    @property
    def seconds_per_group(self) -> float:
        """Qwen2.5-VL's `second_per_grid_ts`: one temporal patch of frames in seconds."""
        return self.temporal_patch / self.sample_fps

    @property
    def group_times(self) -> tuple[float, ...]:
        """Qwen3-VL's timestamp of each temporal group: the mean time of its frames."""
        t = np.asarray(self.times).reshape(-1, self.temporal_patch)
        return tuple(float(x) for x in t.mean(1))


def _floor2(x: float) -> int:
    return int(math.floor(x / 2) * 2)


def _ceil2(x: float) -> int:
    return int(math.ceil(x / 2) * 2)


def _round2(x: float) -> int:
    return int(round(x / 2) * 2)


def frame_count(frames: int, avg_fps: float, config: SamplingConfig) -> int:
    """How many frames a video of `frames` frames at `avg_fps` gives (even, >= 2)."""
    if frames < 2 or avg_fps <= 0:
        raise SamplingError(f"a video of {frames} frames at {avg_fps} fps cannot be sampled (need 2 frames or more)")
    low, high = _ceil2(config.min_frames), _floor2(min(config.max_frames, frames))
    wanted = min(max(frames / avg_fps * config.fps, low), high)
    n = _round2(wanted) if config.frame_rule == "round" else _floor2(min(wanted, frames))
    if not 2 <= n <= frames:
        raise SamplingError(f"a video of {frames} frames at {avg_fps} fps gives {n} frames by the "
                            f"{config.frame_rule} rule (need 2..{frames})")
    return n


def frame_indices(frames: int, n: int) -> np.ndarray:
    """torch.linspace(0, frames - 1, n).round() in float32 (halves to even): the reference's."""
    import torch

    return torch.linspace(0, frames - 1, n, dtype=torch.float32).round().long().numpy()


def frame_size(height: int, width: int, n: int, config: SamplingConfig, image: ImageParams) -> tuple[int, int]:
    """The size every sampled frame is resized to: within floor(budget / groups) tokens a group."""
    factor = image.factor
    groups = n // image.temporal_patch_size
    per_group = min(MAX_GROUP_TOKENS, config.max_video_tokens // groups)
    if per_group < 1:
        raise SamplingError(f"{n} frames make {groups} groups of at least one token each, over the budget "
                            f"of {config.max_video_tokens} tokens")
    if config.token_floor:  # qwen-vl-utils: max(min(768, budget share), 1.05 x 128) tokens, at least 128
        low = MIN_GROUP_TOKENS * factor ** 2
        high = max(min(MAX_GROUP_TOKENS * factor ** 2, config.max_video_tokens * factor ** 2 / groups),
                   int(1.05 * low))
    else:
        low, high = factor ** 2, per_group * factor ** 2
    params = ImageParams(min_pixels=int(low), max_pixels=int(high), patch_size=image.patch_size,
                         merge_size=image.merge_size, temporal_patch_size=image.temporal_patch_size)
    return smart_resize(height, width, params)


def video_tokens(n: int, height: int, width: int, image: ImageParams) -> int:
    """Language-model tokens of n frames at height x width: one per factor^2 px per group."""
    return n // image.temporal_patch_size * (height // image.factor) * (width // image.factor)


def plan_frames(meta: VideoMeta, config: SamplingConfig, image: ImageParams) -> FramePlan:
    n = frame_count(meta.frames, meta.avg_fps, config)
    indices = frame_indices(meta.frames, n)
    height, width = frame_size(meta.height, meta.width, n, config, image)
    return FramePlan(tuple(int(i) for i in indices), tuple(float(i) / meta.avg_fps for i in indices), height, width,
                     video_tokens(n, height, width, image), n / meta.frames * meta.avg_fps,
                     image.temporal_patch_size)
