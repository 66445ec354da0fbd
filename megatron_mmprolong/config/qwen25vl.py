"""Qwen2.5-VL (3B/7B/32B/72B): its transformers config.json and its presets.

Qwen2 language model with QKV bias and M-RoPE sections [16, 24, 24] in contiguous chunks;
vision encoder with 14 px patches, window attention (112 px windows, full attention in four
blocks), RMSNorm and SwiGLU MLPs; one language token per 28x28 px.
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
    int_if_whole,
)


@dataclass(frozen=True)
class Qwen25VLConfig(VLConfig):
    family = "qwen2_5_vl"
    hf_architecture = "Qwen2_5_VLForConditionalGeneration"
    display_name = "Qwen2.5-VL"

    @classmethod
    def read_hf_dict(cls, data: dict[str, Any]) -> "Qwen25VLConfig":
        """The nested `text_config` layout (transformers >= 4.52) or the flat one of the
        published checkpoints."""
        text_src = dict(data.get("text_config") or {})
        # Flat layout: language fields live at the top level.
        for key, value in data.items():
            if key not in ("text_config", "vision_config"):
                text_src.setdefault(key, value)
        vision_src = data.get("vision_config")
        if not isinstance(vision_src, dict):
            raise ConfigError("vision_config is missing")

        rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", text_src.get("rope_theta", TextConfig.rope_theta))
        mrope_section = tuple(rope.get("mrope_section", TextConfig.mrope_section))
        try:
            text = TextConfig(
                vocab_size=int(text_src["vocab_size"]),
                hidden_size=int(text_src["hidden_size"]),
                num_layers=int(text_src["num_hidden_layers"]),
                num_attention_heads=int(text_src["num_attention_heads"]),
                num_key_value_heads=int(
                    text_src.get("num_key_value_heads") or text_src["num_attention_heads"]
                ),
                intermediate_size=int(text_src["intermediate_size"]),
                rms_norm_eps=float(text_src.get("rms_norm_eps", TextConfig.rms_norm_eps)),
                rope_theta=float(rope_theta),
                mrope_section=tuple(int(s) for s in mrope_section),
                max_position_embeddings=int(
                    text_src.get("max_position_embeddings", TextConfig.max_position_embeddings)
                ),
                tie_word_embeddings=bool(
                    data.get("tie_word_embeddings") or text_src.get("tie_word_embeddings", False)
                ),
                hidden_act=text_src.get("hidden_act", "silu"),
            )
        except KeyError as err:
            raise ConfigError(f"language model field {err.args[0]!r} is missing") from None

        vision_rope = vision_src.get("rope_parameters") or {}
        try:
            vision = VisionConfig(
                depth=int(vision_src["depth"]),
                hidden_size=int(vision_src["hidden_size"]),
                num_heads=int(vision_src["num_heads"]),
                intermediate_size=int(vision_src["intermediate_size"]),
                out_hidden_size=int(vision_src.get("out_hidden_size", text.hidden_size)),
                patch_size=int(vision_src.get("patch_size", vision_src.get("spatial_patch_size", 14))),
                temporal_patch_size=int(vision_src.get("temporal_patch_size", 2)),
                spatial_merge_size=int(vision_src.get("spatial_merge_size", 2)),
                in_channels=int(vision_src.get("in_channels", vision_src.get("in_chans", 3))),
                window_size=int(vision_src.get("window_size", 112)),
                fullatt_block_indexes=tuple(
                    int(i) for i in vision_src.get("fullatt_block_indexes", (7, 15, 23, 31))
                ),
                tokens_per_second=float(vision_src.get("tokens_per_second", 2)),
                rope_theta=float(vision_rope.get("rope_theta", VisionConfig.rope_theta)),
                rms_norm_eps=1e-6,  # hard-coded in the reference vision blocks and merger
                hidden_act=vision_src.get("hidden_act", "silu"),
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
        """The flat layout of the published checkpoints; every transformers release with
        Qwen2.5-VL (and vLLM) reads it."""
        t, v, k = self.text, self.vision, self.tokens
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0,
            "bos_token_id": k.bos,
            "eos_token_id": k.eos,
            "vision_start_token_id": k.vision_start,
            "vision_end_token_id": k.vision_end,
            "image_token_id": k.image,
            "video_token_id": k.video,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "sliding_window": None,
            "use_sliding_window": False,
            "tie_word_embeddings": t.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": t.vocab_size,
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "spatial_patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": int_if_whole(v.tokens_per_second),
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }


# ---- presets ------------------------------------------------------------------------------

_TINY_TEXT = TextConfig(
    vocab_size=151936,  # the Qwen2.5 tokenizer's ids fit, so the CPU demo uses real text
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    mrope_section=(2, 3, 3),
    max_position_embeddings=32768,
)
_TINY_VISION = VisionConfig(
    depth=4,
    hidden_size=64,
    num_heads=4,
    intermediate_size=96,
    out_hidden_size=64,
    fullatt_block_indexes=(1, 3),
)

Qwen25VLConfig.register_presets({
    "3b": Qwen25VLConfig(
        text=TextConfig(
            vocab_size=151936, hidden_size=2048, num_layers=36, num_attention_heads=16,
            num_key_value_heads=2, intermediate_size=11008, tie_word_embeddings=True,
        ),
        vision=VisionConfig(out_hidden_size=2048),
    ),
    "7b": Qwen25VLConfig(),
    "32b": Qwen25VLConfig(
        text=TextConfig(
            hidden_size=5120, num_layers=64, num_attention_heads=40, num_key_value_heads=8,
            intermediate_size=27648,
        ),
        vision=VisionConfig(intermediate_size=3456, out_hidden_size=5120),
    ),
    "72b": Qwen25VLConfig(
        text=TextConfig(
            hidden_size=8192, num_layers=80, num_attention_heads=64, num_key_value_heads=8,
            intermediate_size=29568,
        ),
        vision=VisionConfig(intermediate_size=3456, out_hidden_size=8192),
    ),
    "tiny": Qwen25VLConfig(text=_TINY_TEXT, vision=_TINY_VISION),
    "tiny-tied": Qwen25VLConfig(text=dataclasses.replace(_TINY_TEXT, tie_word_embeddings=True), vision=_TINY_VISION),
    # 1K vocabulary with the special tokens on top (data/tiny_tokenizer.py): fast CPU training
    "tiny-1k": Qwen25VLConfig(
        text=dataclasses.replace(_TINY_TEXT, vocab_size=1024),
        vision=_TINY_VISION,
        tokens=TokenIds(vision_start=1016, vision_end=1017, image=1019, video=1020, bos=1021, eos=1022),
    ),
})


