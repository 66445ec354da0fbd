"""Qwen3-VL dense (2B/4B/8B/32B): its transformers config.json and its presets.

What differs from Qwen2.5-VL (the fields are in config/base.py):
- language model (Qwen3): per-head RMSNorm of q and k before the rotary, no QKV bias, an
  explicit head_dim, rope theta 5e6, M-RoPE sections [24, 20, 20] interleaved T,H,W,T,H,W,...;
- vision: 16 px patches (one language token per 32x32 px), Conv3d patch embedding with bias, a
  learned 48x48 position grid resampled to each image, no window attention, LayerNorm,
  fc1 -> gelu(tanh) -> fc2 MLPs, processor mean = std = 0.5;
- deepstack: the outputs of the blocks in `deepstack_visual_indexes` go through mergers of their
  own and are added at the visual tokens to the outputs of language layers 0, 1, 2;
- videos: each frame is its own item after a "<t seconds>" text timestamp, so positions treat
  frames as images (no tokens_per_second scaling).
MoE (30B-A3B, 235B-A22B) is not covered: its layers would be another language layer spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron_mmprolong.config.base import (
    ConfigError,
    TextConfig,
    TokenIds,
    VisionConfig,
    VLConfig,
    first_value,
)

_TEXT = TextConfig(
    vocab_size=151936,
    hidden_size=4096,
    num_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=12288,
    rope_theta=5e6,
    mrope_section=(24, 20, 20),
    max_position_embeddings=262144,
    explicit_head_dim=128,
    qkv_bias=False,
    qk_norm=True,
    mrope_interleaved=True,
)
_VISION = VisionConfig(
    depth=27,
    hidden_size=1152,
    num_heads=16,
    intermediate_size=4304,
    out_hidden_size=4096,
    patch_size=16,
    window_size=None,
    fullatt_block_indexes=(),
    hidden_act="gelu_pytorch_tanh",
    normalization="LayerNorm",
    gated_mlp=False,
    patch_embed_bias=True,
    num_position_embeddings=2304,
    deepstack_visual_indexes=(8, 16, 24),
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    min_pixels=32 * 32 * 64,  # preprocessor_config.json: 64 to 16384 tokens of 32x32 px
    max_pixels=32 * 32 * 16384,
)


@dataclass(frozen=True)
class Qwen3VLConfig(VLConfig):
    text: TextConfig = _TEXT
    vision: VisionConfig = _VISION
    tokens: TokenIds = dataclasses.field(default_factory=TokenIds)

    family = "qwen3_vl"
    hf_architecture = "Qwen3VLForConditionalGeneration"
    display_name = "Qwen3-VL"
    video_frames_as_items = True

    @classmethod
    def read_hf_dict(cls, data: dict[str, Any]) -> "Qwen3VLConfig":
        text_src = data.get("text_config")
        vision_src = data.get("vision_config")
        if not isinstance(text_src, dict):
            raise ConfigError("text_config is missing")
        if not isinstance(vision_src, dict):
            raise ConfigError("vision_config is missing")
        rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            raise ConfigError(f"text_config rope type {rope.get('rope_type')!r} is not supported (default M-RoPE only)")
        if not rope.get("mrope_interleaved", True):
            raise ConfigError("text_config has mrope_interleaved false; Qwen3-VL interleaves the M-RoPE sections")
        if "num_experts" in text_src:
            raise ConfigError("Qwen3-VL MoE checkpoints (num_experts in text_config) are not supported; dense only")
        try:
            heads = int(text_src["num_attention_heads"])
            text = TextConfig(
                vocab_size=int(text_src["vocab_size"]),
                hidden_size=int(text_src["hidden_size"]),
                num_layers=int(text_src["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(text_src.get("num_key_value_heads") or heads),
                intermediate_size=int(text_src["intermediate_size"]),
                rms_norm_eps=float(text_src.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", text_src.get("rope_theta", _TEXT.rope_theta))),
                mrope_section=tuple(int(s) for s in rope.get("mrope_section", _TEXT.mrope_section)),
                max_position_embeddings=int(text_src.get("max_position_embeddings", _TEXT.max_position_embeddings)),
                tie_word_embeddings=bool(data.get("tie_word_embeddings") or text_src.get("tie_word_embeddings", False)),
                hidden_act=text_src.get("hidden_act", "silu"),
                explicit_head_dim=int(text_src.get("head_dim") or int(text_src["hidden_size"]) // heads),
                qkv_bias=bool(text_src.get("attention_bias", False)),
                qk_norm=True,
                mrope_interleaved=True,
            )
        except KeyError as err:
            raise ConfigError(f"text_config field {err.args[0]!r} is missing") from None
        vision_rope = vision_src.get("rope_parameters") or {}
        try:
            vision = dataclasses.replace(
                _VISION,
                depth=int(vision_src["depth"]),
                hidden_size=int(vision_src["hidden_size"]),
                num_heads=int(vision_src["num_heads"]),
                intermediate_size=int(vision_src["intermediate_size"]),
                out_hidden_size=int(vision_src.get("out_hidden_size", text.hidden_size)),
                patch_size=int(vision_src.get("patch_size", 16)),
                temporal_patch_size=int(vision_src.get("temporal_patch_size", 2)),
                spatial_merge_size=int(vision_src.get("spatial_merge_size", 2)),
                in_channels=int(vision_src.get("in_channels", 3)),
                rope_theta=float(vision_rope.get("rope_theta", _VISION.rope_theta)),
                hidden_act=vision_src.get("hidden_act", "gelu_pytorch_tanh"),
                num_position_embeddings=int(vision_src.get("num_position_embeddings", 2304)),
                deepstack_visual_indexes=tuple(int(i) for i in vision_src.get("deepstack_visual_indexes", (8, 16, 24))),
            )
        except KeyError as err:
            raise ConfigError(f"vision_config field {err.args[0]!r} is missing") from None
        defaults = TokenIds()
        tokens = TokenIds(
            image=int(data.get("image_token_id", defaults.image)),
            video=int(data.get("video_token_id", defaults.video)),
            vision_start=int(data.get("vision_start_token_id", defaults.vision_start)),
            vision_end=int(data.get("vision_end_token_id", defaults.vision_end)),
            bos=int(text_src.get("bos_token_id") or defaults.bos),
            eos=int(first_value(text_src.get("eos_token_id")) or defaults.eos),
        )
        return cls(text=text, vision=vision, tokens=tokens)

    def to_hf_dict(self) -> dict[str, Any]:
        """The layout of the published checkpoints (rope_scaling and rope_theta in text_config),
        which transformers >= 4.57 and vLLM read."""
        t, v, k = self.text, self.vision, self.tokens
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.family,
            "image_token_id": k.image,
            "video_token_id": k.video,
            "vision_start_token_id": k.vision_start,
            "vision_end_token_id": k.vision_end,
            "tie_word_embeddings": t.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "attention_bias": t.qkv_bias,
                "attention_dropout": 0.0,
                "bos_token_id": k.bos,
                "eos_token_id": k.eos,
                "head_dim": t.head_dim,
                "hidden_act": t.hidden_act,
                "hidden_size": t.hidden_size,
                "initializer_range": 0.02,
                "intermediate_size": t.intermediate_size,
                "max_position_embeddings": t.max_position_embeddings,
                "num_attention_heads": t.num_attention_heads,
                "num_hidden_layers": t.num_layers,
                "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_scaling": {"rope_type": "default", "mrope_interleaved": True,
                                 "mrope_section": list(t.mrope_section)},
                "rope_theta": t.rope_theta,
                "tie_word_embeddings": t.tie_word_embeddings,
                "use_cache": True,
                "vocab_size": t.vocab_size,
            },
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "in_channels": v.in_channels,
                "initializer_range": 0.02,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "num_position_embeddings": v.num_position_embeddings,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }


# ---- presets ------------------------------------------------------------------------------

_SMALL_VISION = dataclasses.replace(_VISION, depth=24, hidden_size=1024, intermediate_size=4096,
                                    deepstack_visual_indexes=(5, 11, 17))


def _dense(vision: VisionConfig, **text: Any) -> Qwen3VLConfig:
    language = dataclasses.replace(_TEXT, **text)
    return Qwen3VLConfig(text=language, vision=dataclasses.replace(vision, out_hidden_size=language.hidden_size))


_TINY_TEXT = dataclasses.replace(
    _TEXT, hidden_size=48, num_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
    explicit_head_dim=16,  # heads x head_dim = 64 differs from the hidden size, as in 4B and 32B
    mrope_section=(4, 2, 2), max_position_embeddings=32768,
)
_TINY_VISION = dataclasses.replace(
    _VISION, depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48,
    num_position_embeddings=64,  # an 8x8 grid: test images are resampled both up and down
    deepstack_visual_indexes=(0, 2, 3),
)

Qwen3VLConfig.register_presets({
    "qwen3vl-2b": _dense(_SMALL_VISION, hidden_size=2048, num_layers=28, num_attention_heads=16,
                         intermediate_size=6144, tie_word_embeddings=True),
    "qwen3vl-4b": _dense(_SMALL_VISION, hidden_size=2560, num_layers=36, num_attention_heads=32,
                         intermediate_size=9728, tie_word_embeddings=True),
    "qwen3vl-8b": _dense(_VISION),
    "qwen3vl-32b": _dense(_VISION, hidden_size=5120, num_layers=64, num_attention_heads=64,
                          intermediate_size=25600),
    "qwen3vl-tiny": Qwen3VLConfig(text=_TINY_TEXT, vision=_TINY_VISION),
    "qwen3vl-tiny-tied": Qwen3VLConfig(text=dataclasses.replace(_TINY_TEXT, tie_word_embeddings=True),
                                       vision=_TINY_VISION),
    # the tiny tokenizer's 1K vocabulary (data/tiny_tokenizer.py), as Qwen2.5-VL's tiny-1k
    "qwen3vl-tiny-1k": Qwen3VLConfig(
        text=dataclasses.replace(_TINY_TEXT, vocab_size=1024),
        vision=_TINY_VISION,
        tokens=TokenIds(vision_start=1016, vision_end=1017, image=1019, video=1020, bos=1021, eos=1022),
    ),
})
