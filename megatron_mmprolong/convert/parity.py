"""Numerical parity between this model and transformers' model of its family
(Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration) on the same multimodal inputs: several images of different sizes, a video clip, and the same
samples packed into one THD sequence (compared with each sample run alone)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_mmprolong.config import VLConfig
from megatron_mmprolong.model.packed import packed_segments


@dataclass
class Sample:
    input_ids: Tensor  # [1, seq]
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    pixel_values_videos: Tensor | None = None
    video_grid_thw: Tensor | None = None
    second_per_grid_ts: Tensor | None = None

    def vision_inputs(self) -> dict[str, Tensor | None]:
        """Keyword arguments shared by this model's and transformers' forward."""
        return dict(
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
            pixel_values_videos=self.pixel_values_videos,
            video_grid_thw=self.video_grid_thw,
            second_per_grid_ts=self.second_per_grid_ts,
        )


def make_sample(
    config: VLConfig,
    generator: torch.Generator,
    images: list[tuple[int, int, int]] = (),
    videos: list[tuple[int, int, int]] = (),
    seconds_per_grid: float = 0.5,
    text_tokens: int = 6,
) -> Sample:
    """Random text around each image/video (grids in patch units), vision_start/end markers.
    Where the family places video frames as items of their own (Qwen3-VL), each frame gets its
    markers after a stand-in for its "<t seconds>" timestamp text."""
    ids = config.tokens
    special = min(ids.image, ids.video, ids.vision_start, ids.vision_end)
    merge2 = config.vision.spatial_merge_size**2

    def text(n):
        return torch.randint(0, special, (n,), generator=generator).tolist()

    def item(pad, frames, h, w):
        return [ids.vision_start] + [pad] * (frames * h * w // merge2) + [ids.vision_end]

    tokens = text(text_tokens)
    for t, h, w in images:
        tokens += item(ids.image, t, h, w) + text(text_tokens)
    for t, h, w in videos:
        if config.video_frames_as_items:
            for _ in range(t):
                tokens += text(2) + item(ids.video, 1, h, w)
            tokens += text(text_tokens)
        else:
            tokens += item(ids.video, t, h, w) + text(text_tokens)

    def pixels(grids):
        if not grids:
            return None, None
        patches = sum(t * h * w for t, h, w in grids)
        values = torch.randn(patches, config.vision.patch_dim, generator=generator)
        return values, torch.tensor(grids, dtype=torch.long)

    pixel_values, image_grid = pixels(list(images))
    video_values, video_grid = pixels(list(videos))
    return Sample(
        input_ids=torch.tensor([tokens]),
        pixel_values=pixel_values,
        image_grid_thw=image_grid,
        pixel_values_videos=video_values,
        video_grid_thw=video_grid,
        second_per_grid_ts=(torch.full((len(videos),), seconds_per_grid)
                            if videos and not config.video_frames_as_items else None),
    )


def default_samples(config: VLConfig, seed: int = 0) -> list[Sample]:
    """Two samples: text + two images of different sizes (windows that do not divide the grid)
    + a 4-frame video; and text + one image."""
    generator = torch.Generator().manual_seed(seed)
    return [
        make_sample(config, generator, images=[(1, 12, 20), (1, 6, 10)], videos=[(4, 8, 12)]),
        make_sample(config, generator, images=[(1, 10, 8)]),
    ]


def pack(samples: list[Sample]) -> tuple[Sample, PackedSeqParams]:
    """Concatenate samples into one packed sequence with its cu_seqlens."""

    def cat(field):
        parts = [getattr(s, field) for s in samples if getattr(s, field) is not None]
        return torch.cat(parts) if parts else None

    lengths = torch.tensor([s.input_ids.shape[1] for s in samples])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    params = packed_segments(cu, "cpu", int(lengths.max()))
    packed = Sample(
        input_ids=torch.cat([s.input_ids for s in samples], dim=1),
        pixel_values=cat("pixel_values"),
        image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos"),
        video_grid_thw=cat("video_grid_thw"),
        second_per_grid_ts=cat("second_per_grid_ts"),
    )
    return packed, params


def our_logits(model, sample: Sample, packed_seq_params: PackedSeqParams | None = None) -> Tensor:
    return model(sample.input_ids, **sample.vision_inputs(), packed_seq_params=packed_seq_params)


def hf_token_types(hf_model, input_ids: Tensor) -> dict[str, Tensor]:
    """transformers >= 5 places image and video tokens in M-RoPE only when told which they are
    (`mm_token_type_ids`: 1 image, 2 video); without it they get text positions."""
    if "mm_token_type_ids" not in inspect.signature(hf_model.forward).parameters:
        return {}
    config = hf_model.config
    return {"mm_token_type_ids": (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()}


def hf_logits(hf_model, sample: Sample) -> Tensor:
    inputs = dict(input_ids=sample.input_ids, **sample.vision_inputs())
    return hf_model(**inputs, **hf_token_types(hf_model, sample.input_ids)).logits


def known_difference(config: VLConfig, samples: list[Sample]) -> str | None:
    """Why the logits may differ although both models are right: text after a video resumes at
    max(t, h, w) + 1 here (as in the original Qwen2.5-VL code and vLLM) but at max(h, w) + 1 in
    transformers >= 5, which differs when a video's temporal positions outrun its grid."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5 or config.video_frames_as_items:
        return None
    merge, rate = config.vision.spatial_merge_size, config.vision.tokens_per_second
    for sample in samples:
        if sample.video_grid_thw is None:
            continue
        for (t, h, w), seconds in zip(sample.video_grid_thw.tolist(), sample.second_per_grid_ts.tolist()):
            if int((t - 1) * rate * seconds) > max(h, w) // merge - 1:
                return (f"vision tokens_per_second {rate:g}: the test video's {t} frames span more M-RoPE "
                        f"positions than its {h // merge}x{w // merge} grid, where transformers >= 5 places the "
                        "text after a video differently from Qwen2.5-VL (README, Numerics notes); the logits of "
                        "that text differ by design, not from a conversion error")
    return None


def compare(ours: Tensor, reference: Tensor) -> dict[str, float]:
    ours, reference = ours.float(), reference.float()
    return {
        "max_abs_logit_diff": (ours - reference).abs().max().item(),
        "top1_agreement": (ours.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


@torch.no_grad()
def run_parity(model, hf_model, config: VLConfig, seed: int = 0) -> dict:
    """Logit differences for each sample alone and for the packed batch of both."""
    samples = default_samples(config, seed)
    reference = [hf_logits(hf_model, s) for s in samples]
    report = {"samples": []}
    for sample, ref in zip(samples, reference):
        report["samples"].append(compare(our_logits(model, sample), ref))
    packed, params = pack(samples)
    report["packed"] = compare(our_logits(model, packed, params), torch.cat(reference, dim=1))
    everything = report["samples"] + [report["packed"]]
    report["max_abs_logit_diff"] = max(r["max_abs_logit_diff"] for r in everything)
    report["top1_agreement"] = min(r["top1_agreement"] for r in everything)
    report["tokens"] = int(packed.input_ids.shape[1])
    report["known_difference"] = known_difference(config, samples)
    return report
