"""Qwen2.5-VL model configuration: HF config.json in and out, presets, validation, and the
Megatron-Core TransformerConfigs of the vision encoder, the merger and the language model."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig


class ConfigError(ValueError):
    """A configuration that cannot describe a working model or layout."""


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Flattened size of one patch as the image processor emits it (C * T * P * P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merger_hidden_size(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def window_merged_tokens(self) -> int:
        """Side of an attention window in merged (LM) tokens: 112 px -> 4."""
        return self.window_size // (self.spatial_merge_size * self.patch_size)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    intermediate_size: int = 18944
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TokenIds:
    image: int = 151655
    video: int = 151656
    vision_start: int = 151652
    vision_end: int = 151653
    bos: int = 151643
    eos: int = 151645


# Transformer Engine's context-parallel attention for packed (THD) sequences, the only kind this
# project trains on, at the TE range Megatron-Core 0.16 accepts (2.9-2.11): the ring (p2p) always,
# all-to-all over heads (a2a) from TE 2.10.
CP_COMM_TYPES = ("p2p", "a2a")
A2A_THD_MIN_TE = (2, 10)
UNPACKED_CP_COMM_TYPES = {
    "allgather": "Transformer Engine calls it all_gather, and that does not take packed (THD) sequences",
    "all_gather": "Transformer Engine's all-gather CP asserts qkv_format != 'thd' (no packed sequences)",
    "a2a+p2p": "hierarchical CP asserts qkv_format != 'thd' in Transformer Engine <= 2.11 (no packed "
               "sequences) and needs hierarchical_context_parallel_sizes",
}


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout, with Megatron-LM's meanings."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    vision_tensor_parallel: int | None = None  # None: same as tensor_parallel
    sequence_parallel: bool = False
    virtual_pipeline_parallel: int | None = None
    decoder_first_pipeline_num_layers: int | None = None
    cp_comm_type: str = "p2p"  # Transformer Engine CP: p2p (ring) or a2a (see CP_COMM_TYPES)

    @property
    def vision_tp(self) -> int:
        return self.vision_tensor_parallel or self.tensor_parallel


@dataclass(frozen=True)
class PrecisionConfig:
    """Parameter dtype and the FP8 policy (Transformer Engine, H100).

    FP8 GEMMs use the `hybrid` (E4M3 forward, E5M2 gradients) or `e4m3` format with `delayed`
    or `tensorwise` (current) scaling; `blockwise` and `mxfp8` need Blackwell. FP8 attention
    (`fp8_attention`, TE's fp8_dpa) has a backward pass on H100 only for unpacked (sbhd/bshd)
    sequences, with or without CP; for packed (THD) batches it is forward-only, so training on
    packed data refuses it. The vision encoder stays BF16:
    TE's FP8 GEMMs need dimensions that are multiples of 16, which its MLP (3420 at 3B/7B) and
    the patch rows of a pack are not.
    """

    params_dtype: str = "bf16"
    fp8: str | None = None  # None, "hybrid" or "e4m3"
    fp8_recipe: str = "delayed"
    fp8_attention: bool = False

    def validate(self, backend: str, packed: bool = True, training: bool = True) -> None:
        torch_dtype(self.params_dtype)
        if self.fp8 is None:
            if self.fp8_attention:
                raise ConfigError("fp8 attention needs FP8 (--fp8-format hybrid or e4m3)")
            return
        if self.fp8 not in ("hybrid", "e4m3"):
            raise ConfigError(f"fp8 format must be hybrid or e4m3, got {self.fp8!r}")
        if backend != "te":
            raise ConfigError("FP8 needs the Transformer Engine backend (a GPU with TE installed)")
        if self.fp8_recipe in ("blockwise", "mxfp8"):
            raise ConfigError(f"fp8 recipe {self.fp8_recipe} needs Blackwell GPUs; on H100 use delayed or tensorwise")
        if self.fp8_recipe not in ("delayed", "tensorwise"):
            raise ConfigError(f"fp8 recipe must be delayed or tensorwise, got {self.fp8_recipe!r}")
        if self.fp8_attention and packed and training:
            raise ConfigError(
                "FP8 attention on packed (THD) sequences is forward-only in Transformer Engine on H100: "
                "train without --fp8-dot-product-attention, or on unpacked sequences"
            )

    def transformer_overrides(self, vision: bool = False) -> dict[str, Any]:
        """TransformerConfig fields of this policy for the language model or the vision encoder."""
        dtype = torch_dtype(self.params_dtype)
        values: dict[str, Any] = dict(params_dtype=dtype, pipeline_dtype=dtype,
                                      bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
        if self.fp8 is not None and not vision:
            values.update(fp8=self.fp8, fp8_recipe=self.fp8_recipe,
                          fp8_dot_product_attention=self.fp8_attention and not vision)
        return values


@dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tokens: TokenIds = field(default_factory=TokenIds)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> "Qwen25VLConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
            ) from None

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> "Qwen25VLConfig":
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json in the checkpoint directory")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:  # not JSON, or not UTF-8
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        try:
            return cls.from_hf_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> "Qwen25VLConfig":
        """Read a transformers config: the nested `text_config` layout (transformers >= 4.52)
        or the flat one of the published checkpoints."""
        model_type = data.get("model_type")
        if model_type != "qwen2_5_vl":
            raise ConfigError(f"model_type is {model_type!r}, expected 'qwen2_5_vl'")
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
            eos=int(_first(text_src.get("eos_token_id")) or defaults.eos),
        )
        config = cls(text=text, vision=vision, tokens=tokens)
        config.validate()
        return config

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
                "tokens_per_second": _int_if_whole(v.tokens_per_second),
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }

    def save_hf(self, hf_dir: str | Path) -> None:
        path = Path(hf_dir) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def with_rotary_base(self, base: float) -> "Qwen25VLConfig":
        """The recipe's `--rotary-base`: M-RoPE base 1e6 -> 4e6 for 128K training."""
        if not base > 0:
            raise ConfigError(f"rotary base must be positive, got {base}")
        return dataclasses.replace(self, text=dataclasses.replace(self.text, rope_theta=float(base)))

    # ---- validation ---------------------------------------------------------------------

    def validate(self) -> None:
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ConfigError(
                f"hidden_size {t.hidden_size} is not a multiple of num_attention_heads "
                f"{t.num_attention_heads}"
            )
        if t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {t.num_key_value_heads}"
            )
        if len(t.mrope_section) != 3 or sum(t.mrope_section) != t.head_dim // 2:
            raise ConfigError(
                f"mrope_section {list(t.mrope_section)} must have 3 entries summing to "
                f"head_dim/2 = {t.head_dim // 2}"
            )
        if v.hidden_size % v.num_heads:
            raise ConfigError(
                f"vision hidden_size {v.hidden_size} is not a multiple of vision num_heads "
                f"{v.num_heads}"
            )
        if v.head_dim % 4:
            raise ConfigError(
                f"vision head_dim {v.head_dim} must be a multiple of 4 (2D rotary over h and w)"
            )
        if v.window_size % (v.patch_size * v.spatial_merge_size) or v.window_merged_tokens < 1:
            raise ConfigError(
                f"vision window_size {v.window_size} px must be a positive multiple of "
                f"patch_size * spatial_merge_size = {v.patch_size * v.spatial_merge_size} px"
            )
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ConfigError(
                f"fullatt_block_indexes {bad} are outside the {v.depth} vision blocks"
            )
        if v.out_hidden_size != t.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size {v.out_hidden_size} differs from the language "
                f"hidden_size {t.hidden_size}"
            )
        ids = self.tokens
        for name in ("image", "video", "vision_start", "vision_end"):
            token = getattr(ids, name)
            if not 0 <= token < t.vocab_size:
                raise ConfigError(f"{name} token id {token} is outside the vocabulary ({t.vocab_size})")

    def validate_parallel(self, parallel: ParallelConfig) -> None:
        """Errors in words for layouts that cannot shard this model."""
        t, v = self.text, self.vision
        tp, vtp = parallel.tensor_parallel, parallel.vision_tp
        for name, size in (
            ("tensor_model_parallel_size", tp),
            ("pipeline_model_parallel_size", parallel.pipeline_parallel),
            ("context_parallel_size", parallel.context_parallel),
            ("vision tensor parallel size", vtp),
        ):
            if size < 1:
                raise ConfigError(f"{name} must be >= 1, got {size}")
        _require_divides(
            tp,
            {
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "intermediate_size": t.intermediate_size,
                "vocab_size": t.vocab_size,
            },
            "tensor_model_parallel_size",
        )
        _require_divides(
            vtp,
            {
                "vision num_heads": v.num_heads,
                "vision intermediate_size": v.intermediate_size,
                "merger hidden size": v.merger_hidden_size,
            },
            "vision tensor parallel size",
        )
        if tp % vtp:
            raise ConfigError(f"vision tensor parallel size {vtp} must divide tensor_model_parallel_size {tp}")
        comm, cp = parallel.cp_comm_type, parallel.context_parallel
        if comm in UNPACKED_CP_COMM_TYPES:
            raise ConfigError(f"cp_comm_type {comm}: {UNPACKED_CP_COMM_TYPES[comm]}; use p2p or a2a")
        if comm not in CP_COMM_TYPES:
            raise ConfigError(f"cp_comm_type must be p2p or a2a, got {comm!r}")
        if comm == "a2a" and (t.num_key_value_heads // tp) % cp:
            raise ConfigError(
                f"cp_comm_type a2a splits attention heads over CP: {t.num_key_value_heads} KV heads / TP {tp} "
                f"do not divide over CP {cp}; use p2p"
            )
        if parallel.sequence_parallel and tp == 1:
            raise ConfigError("sequence parallelism needs tensor_model_parallel_size > 1")
        pp = parallel.pipeline_parallel
        first = parallel.decoder_first_pipeline_num_layers
        if first is not None:
            if pp < 2:
                raise ConfigError(
                    "decoder_first_pipeline_num_layers needs pipeline_model_parallel_size >= 2"
                )
            rest = t.num_layers - first
            if not 0 < first < t.num_layers or rest % (pp - 1):
                raise ConfigError(
                    f"decoder_first_pipeline_num_layers {first} leaves {rest} layers, which "
                    f"do not split evenly over the other {pp - 1} pipeline stages"
                )
        elif t.num_layers % pp:
            raise ConfigError(
                f"pipeline_model_parallel_size {pp} does not divide num_layers {t.num_layers}; "
                f"use decoder_first_pipeline_num_layers (--decoder-first-pipeline-num-layers) for an uneven first stage"
            )


def _require_divides(size: int, dims: dict[str, int], what: str) -> None:
    for name, dim in dims.items():
        if dim % size:
            valid = [d for d in range(1, math.gcd(*dims.values()) + 1) if math.gcd(*dims.values()) % d == 0]
            raise ConfigError(
                f"{what} {size} does not divide {name} {dim}; sizes that divide every sharded "
                f"dimension ({', '.join(f'{k}={d}' for k, d in dims.items())}): {valid}"
            )


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _int_if_whole(value: float):
    return int(value) if float(value).is_integer() else value


# ---- presets ------------------------------------------------------------------------------

def _preset(text: TextConfig, vision: VisionConfig) -> Qwen25VLConfig:
    config = Qwen25VLConfig(text=text, vision=vision)
    config.validate()
    return config


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

PRESETS: dict[str, Qwen25VLConfig] = {
    "3b": _preset(
        TextConfig(
            vocab_size=151936, hidden_size=2048, num_layers=36, num_attention_heads=16,
            num_key_value_heads=2, intermediate_size=11008, tie_word_embeddings=True,
        ),
        VisionConfig(out_hidden_size=2048),
    ),
    "7b": _preset(TextConfig(), VisionConfig()),
    "32b": _preset(
        TextConfig(
            hidden_size=5120, num_layers=64, num_attention_heads=40, num_key_value_heads=8,
            intermediate_size=27648,
        ),
        VisionConfig(intermediate_size=3456, out_hidden_size=5120),
    ),
    "72b": _preset(
        TextConfig(
            hidden_size=8192, num_layers=80, num_attention_heads=64, num_key_value_heads=8,
            intermediate_size=29568,
        ),
        VisionConfig(intermediate_size=3456, out_hidden_size=8192),
    ),
    "tiny": _preset(_TINY_TEXT, _TINY_VISION),
    "tiny-tied": _preset(dataclasses.replace(_TINY_TEXT, tie_word_embeddings=True), _TINY_VISION),
    # 1K vocabulary with the special tokens on top (data/tiny_tokenizer.py): fast CPU training
    "tiny-1k": Qwen25VLConfig(
        text=dataclasses.replace(_TINY_TEXT, vocab_size=1024),
        vision=_TINY_VISION,
        tokens=TokenIds(vision_start=1016, vision_end=1017, image=1019, video=1020, bos=1021, eos=1022),
    ),
}


# ---- Megatron-Core configs ----------------------------------------------------------------

# Shared by the vision blocks and the language model: pre-norm RMSNorm blocks with SwiGLU MLPs,
# QKV bias, no dropout. Fusions default off; the model builder enables what its backend has.
_QWEN_BLOCK = dict(
    normalization="RMSNorm",
    gated_linear_unit=True,
    add_qkv_bias=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    cuda_graph_scope=[],
    # No MoE here, but megatron-core refuses variable_seq_lengths (packed pipelines) with the
    # default "allgather" token dispatcher.
    moe_token_dispatcher_type="alltoall",
)


def language_transformer_config(
    config: Qwen25VLConfig, parallel: ParallelConfig, **overrides: Any
) -> "TransformerConfig":
    from megatron.core.transformer.transformer_config import TransformerConfig

    t = config.text
    values = dict(
        _QWEN_BLOCK,
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        num_attention_heads=t.num_attention_heads,
        num_query_groups=t.num_key_value_heads,
        kv_channels=t.head_dim,
        ffn_hidden_size=t.intermediate_size,
        layernorm_epsilon=t.rms_norm_eps,
        activation_func=_activation(t.hidden_act),
        add_bias_linear=False,
        mrope_section=list(t.mrope_section),
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
        cp_comm_type=parallel.cp_comm_type,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def vision_transformer_config(
    config: Qwen25VLConfig, parallel: ParallelConfig, **overrides: Any
) -> "TransformerConfig":
    """The vision blocks run whole on the first pipeline stage, without sequence or context
    parallelism: each context-parallel rank encodes its own images."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    v = config.vision
    values = dict(
        _QWEN_BLOCK,
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads,
        kv_channels=v.head_dim,
        ffn_hidden_size=v.intermediate_size,
        layernorm_epsilon=v.rms_norm_eps,
        activation_func=_activation(v.hidden_act),
        add_bias_linear=True,
        tensor_model_parallel_size=parallel.vision_tp,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=False,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def merger_transformer_config(
    config: Qwen25VLConfig, parallel: ParallelConfig, **overrides: Any
) -> "TransformerConfig":
    """RMSNorm(1280) -> Linear(4*1280, 4*1280) -> GELU (exact) -> Linear(-> LM hidden)."""
    v = config.vision
    values = dict(
        num_layers=1,
        hidden_size=v.out_hidden_size,
        num_attention_heads=v.num_heads,
        ffn_hidden_size=v.merger_hidden_size,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
    )
    values.update(overrides)
    return vision_transformer_config(config, parallel, **values)


def _activation(name: str):
    table = {"silu": F.silu, "gelu": F.gelu}
    if name not in table:
        raise ConfigError(f"hidden_act {name!r} is not supported (expected one of {list(table)})")
    return table[name]


def torch_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"dtype {name!r} is not one of {sorted(table)}")
    return table[name]
