"""What every model family's configuration shares: the language, vision and token fields, the
parallel layout and precision, validation, and the Megatron-Core TransformerConfigs of the vision
encoder, the merger and the language model."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from packaging.version import Version

from megatron_mmprolong.errors import BadInput


class ConfigError(BadInput, ValueError):
    """A configuration that cannot describe a working model or layout."""


@dataclass(frozen=True)
class VisionConfig:
    """The vision encoder. Defaults are Qwen2.5-VL-7B's; the fields after `hidden_act` are the
    ones the families differ in (config/qwen3vl.py sets them for Qwen3-VL)."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int | None = 112  # px; None: no window attention (every block sees its frame)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # of every vision norm, RMSNorm or LayerNorm
    hidden_act: str = "silu"
    normalization: str = "RMSNorm"  # or "LayerNorm" (with bias), Megatron-Core's names
    gated_mlp: bool = True  # SwiGLU (gate/up/down); False: fc1 -> act -> fc2
    patch_embed_bias: bool = False
    num_position_embeddings: int = 0  # learned square grid resampled to each image; 0: none
    deepstack_visual_indexes: tuple[int, ...] = ()  # blocks whose output feeds language layers 0, 1, ...
    # the image processor's: normalisation (CLIP) and pixels per image (4 to 16384 LM tokens)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384

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
    def merged_token_px(self) -> int:
        """Side in pixels of the square one language-model token covers (28 or 32)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def window_merged_tokens(self) -> int | None:
        """Side of an attention window in merged (LM) tokens: 112 px -> 4; None without windows."""
        if self.window_size is None:
            return None
        return self.window_size // (self.spatial_merge_size * self.patch_size)

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclass(frozen=True)
class TextConfig:
    """The language model. Defaults are Qwen2.5-VL-7B's (a Qwen2 decoder)."""

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
    explicit_head_dim: int | None = None  # None: hidden_size / num_attention_heads
    qkv_bias: bool = True
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before the rotary (Qwen3)
    mrope_interleaved: bool = False  # frequencies T,H,W,T,H,W,... instead of T..T,H..H,W..W

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TokenIds:
    image: int = 151655
    video: int = 151656
    vision_start: int = 151652
    vision_end: int = 151653
    bos: int = 151643
    eos: int = 151645


# Transformer Engine's context-parallel attention for packed (THD) sequences, the only kind this
# project trains on: the ring (p2p), all-to-all over heads (a2a), all-gather of K/V (all_gather)
# and hierarchical a2a within groups of hierarchical_context_parallel_sizes[0] ranks, p2p across
# them (a2a+p2p).
CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")
# The TE release from which each trains on THD, forward and backward, read in TE's
# attention/dot_product_attention/context_parallel.py: until then it asserts qkv_format != 'thd'
# (a2a: 2.10; all_gather: 2.18, TE PR 2829; a2a+p2p: 2.19, TE PR 3290). The ring always has.
CP_COMM_THD_MIN_TE = {"a2a": "2.10", "all_gather": "2.18", "a2a+p2p": "2.19"}


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
    cp_comm_type: str = "p2p"  # Transformer Engine CP, one of CP_COMM_TYPES
    # a2a+p2p only: (a2a group size, p2p group size), their product the CP size (Megatron's name)
    hierarchical_context_parallel_sizes: tuple[int, int] | None = None

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
class VLConfig:
    """A vision-language model of one family: its language model, vision encoder and special
    tokens. Each family (config/qwen25vl.py, config/qwen3vl.py) is a subclass that reads and
    writes its transformers config.json and names its presets; everything else (validation,
    layouts, Megatron-Core configs) is shared and reads the fields below."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tokens: TokenIds = field(default_factory=TokenIds)

    family: ClassVar[str] = ""  # transformers' model_type
    hf_architecture: ClassVar[str] = ""  # its ...ForConditionalGeneration class
    display_name: ClassVar[str] = ""
    video_frames_as_items: ClassVar[bool] = False  # M-RoPE: each video frame placed as an image
    _families: ClassVar[dict[str, type["VLConfig"]]] = {}
    _presets: ClassVar[dict[str, "VLConfig"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        VLConfig._families[cls.family] = cls

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def register_presets(cls, presets: dict[str, "VLConfig"]) -> None:
        for name, config in presets.items():
            if name in VLConfig._presets:
                raise ValueError(f"preset {name!r} is defined twice")
            config.validate()
            VLConfig._presets[name] = config

    @classmethod
    def preset(cls, name: str) -> "VLConfig":
        """A preset of any family (`VLConfig.preset`) or of this one (`Qwen3VLConfig.preset`)."""
        config = VLConfig._presets.get(name)
        if config is None or not isinstance(config, cls):
            names = sorted(n for n, c in VLConfig._presets.items() if isinstance(c, cls))
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
        return config

    @classmethod
    def preset_names(cls) -> list[str]:
        return [n for n, c in VLConfig._presets.items() if isinstance(c, cls)]

    @classmethod
    def families(cls) -> dict[str, type["VLConfig"]]:
        return dict(VLConfig._families)

    @classmethod
    def from_preset_or_dir(cls, name: str) -> "VLConfig":
        """A preset by name, or the config.json of a checkpoint directory."""
        if name in VLConfig._presets:
            return cls.preset(name)
        if not Path(name).is_dir():
            raise ConfigError(f"{name!r} is neither a preset ({', '.join(cls.preset_names())}) nor a checkpoint "
                              "directory")
        return cls.from_hf_dir(name)

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> "VLConfig":
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
    def from_hf_dict(cls, data: dict[str, Any]) -> "VLConfig":
        """Read a transformers config of the family its `model_type` names (of `cls`'s family
        only, when called on a family's class)."""
        model_type = data.get("model_type")
        family = VLConfig._families.get(model_type)
        if family is None or not issubclass(family, cls):
            expected = " or ".join(repr(f) for f, c in VLConfig._families.items() if issubclass(c, cls))
            raise ConfigError(f"model_type is {model_type!r}, expected {expected}")
        config = family.read_hf_dict(data)
        config.validate()
        return config

    @classmethod
    def read_hf_dict(cls, data: dict[str, Any]) -> "VLConfig":
        raise NotImplementedError

    def to_hf_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_hf(self, hf_dir: str | Path) -> None:
        path = Path(hf_dir) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def with_rotary_base(self, base: float) -> "VLConfig":
        """The recipe's `--rotary-base`: the language model's M-RoPE base (1e6 -> 4e6 for
        Qwen2.5-VL at 128K)."""
        if not base > 0:
            raise ConfigError(f"rotary base must be positive, got {base}")
        return dataclasses.replace(self, text=dataclasses.replace(self.text, rope_theta=float(base)))

    def mrope_rule(self) -> dict[str, Any]:
        """The family's keyword arguments of positions.mrope_position_ids (besides the grids)."""
        return dict(image_token_id=self.tokens.image, video_token_id=self.tokens.video,
                    spatial_merge_size=self.vision.spatial_merge_size,
                    tokens_per_second=self.vision.tokens_per_second,
                    video_frames_as_items=self.video_frames_as_items)

    @property
    def deepstack_levels(self) -> int:
        """Language layers (the first ones) that receive intermediate vision features."""
        return len(self.vision.deepstack_visual_indexes)

    # ---- validation ---------------------------------------------------------------------

    def validate(self) -> None:
        t, v = self.text, self.vision
        if t.explicit_head_dim is None and t.hidden_size % t.num_attention_heads:
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
        if v.window_size is not None and (v.window_size % v.merged_token_px or v.window_merged_tokens < 1):
            raise ConfigError(
                f"vision window_size {v.window_size} px must be a positive multiple of "
                f"patch_size * spatial_merge_size = {v.patch_size * v.spatial_merge_size} px"
            )
        if list(v.deepstack_visual_indexes) != sorted(set(v.deepstack_visual_indexes)):
            raise ConfigError(f"deepstack_visual_indexes {list(v.deepstack_visual_indexes)} must be increasing")
        for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            bad = [i for i in getattr(v, name) if not 0 <= i < v.depth]
            if bad:
                raise ConfigError(f"{name} {bad} are outside the {v.depth} vision blocks")
        if self.deepstack_levels > t.num_layers:
            raise ConfigError(f"{self.deepstack_levels} deepstack levels need as many language layers, "
                              f"the model has {t.num_layers}")
        if v.num_position_embeddings and v.position_grid_side**2 != v.num_position_embeddings:
            raise ConfigError(f"vision num_position_embeddings {v.num_position_embeddings} is not a square grid")
        if v.normalization not in ("RMSNorm", "LayerNorm"):
            raise ConfigError(f"vision normalization must be RMSNorm or LayerNorm, got {v.normalization!r}")
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
        _validate_cp_comm_type(parallel, t.num_key_value_heads)
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
        levels = self.deepstack_levels
        if levels and pp > 1:
            # deepstack features are added to the outputs of language layers 0..levels-1, on
            # the stage that runs the vision encoder: the first (virtual) pipeline stage
            chunks = parallel.virtual_pipeline_parallel or 1
            on_first = (first if first is not None else t.num_layers // pp) // chunks
            if on_first < levels:
                raise ConfigError(
                    f"the first pipeline stage holds {on_first} language layers, but deepstack adds vision features to "
                    f"the first {levels}: they must run with the vision encoder on stage 0; use "
                    f"--decoder-first-pipeline-num-layers >= {levels * chunks} or fewer pipeline stages"
                )


def _validate_cp_comm_type(parallel: ParallelConfig, kv_heads: int) -> None:
    """What any Transformer Engine refuses or cannot shard; the TE version's own limits are
    checked where TE is (model/builder.py, check_cp_comm_type_for_te)."""
    comm, cp, tp = parallel.cp_comm_type, parallel.context_parallel, parallel.tensor_parallel
    sizes = parallel.hierarchical_context_parallel_sizes
    if comm == "allgather":
        raise ConfigError("cp_comm_type allgather: Transformer Engine calls it all_gather")
    if comm not in CP_COMM_TYPES:
        raise ConfigError(f"cp_comm_type must be one of {', '.join(CP_COMM_TYPES)}, got {comm!r}")
    if comm != "a2a+p2p" and sizes is not None:
        raise ConfigError(f"hierarchical_context_parallel_sizes {list(sizes)} is for cp_comm_type a2a+p2p, "
                          f"not {comm}")
    if comm == "a2a+p2p":
        if sizes is None or len(sizes) != 2 or sizes[0] * sizes[1] != cp:
            raise ConfigError(f"cp_comm_type a2a+p2p needs hierarchical_context_parallel_sizes (a2a size, p2p size) "
                              f"whose product is the CP size {cp}, got {None if sizes is None else list(sizes)}")
    a2a_ranks = cp if comm == "a2a" else sizes[0] if comm == "a2a+p2p" else 1
    if (kv_heads // tp) % a2a_ranks:
        raise ConfigError(f"cp_comm_type {comm} splits attention heads over {a2a_ranks} CP ranks: {kv_heads} KV "
                          f"heads / TP {tp} do not divide over {a2a_ranks}; use p2p")


def check_cp_comm_type_for_te(parallel: ParallelConfig, te_version: str) -> None:
    """Refuse a CP communication type that this Transformer Engine does not train on packed
    sequences, naming the version it needs."""
    needed = CP_COMM_THD_MIN_TE.get(parallel.cp_comm_type)
    if parallel.context_parallel > 1 and needed and Version(te_version) < Version(needed):
        usable = [c for c in CP_COMM_TYPES if Version(te_version) >= Version(CP_COMM_THD_MIN_TE.get(c, "0"))]
        raise ConfigError(f"cp_comm_type {parallel.cp_comm_type} on packed sequences needs Transformer Engine >= "
                          f"{needed}, this is {te_version}; use {' or '.join(usable)}, or upgrade Transformer Engine")


def _require_divides(size: int, dims: dict[str, int], what: str) -> None:
    for name, dim in dims.items():
        if dim % size:
            valid = [d for d in range(1, math.gcd(*dims.values()) + 1) if math.gcd(*dims.values()) % d == 0]
            raise ConfigError(
                f"{what} {size} does not divide {name} {dim}; sizes that divide every sharded "
                f"dimension ({', '.join(f'{k}={d}' for k, d in dims.items())}): {valid}"
            )


def first_value(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def int_if_whole(value: float):
    return int(value) if float(value).is_integer() else value


def torch_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"dtype {name!r} is not one of {sorted(table)}")
    return table[name]
