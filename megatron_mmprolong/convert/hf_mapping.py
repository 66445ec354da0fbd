"""How each Megatron-Core parameter of VisionLanguageModel is made from Hugging Face tensors, how it
goes back, and how tensor parallelism splits it.

Names are canonical Megatron names with global layer numbers and Transformer Engine norm names
(`...linear_qkv.layer_norm_weight`), as in distributed checkpoints; `canonical_name` maps the
local backend's module names onto them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from megatron_mmprolong.config import VLConfig

# column: split dim 0 | row: split dim 1 | glu: split gate and up halves of dim 0 separately
Shard = Literal["column", "row", "glu", "replicated"]


@dataclass(frozen=True)
class TensorRule:
    mcore: str
    hf: tuple[str, ...]
    to_mcore: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]
    shard: Shard
    vision: bool  # sharded over the vision tensor-parallel group

    @property
    def plain(self) -> bool:
        """One HF tensor stored unchanged: it can be streamed in row blocks."""
        return self.to_mcore is _same


@dataclass(frozen=True)
class HFLayout:
    """Key prefixes of a HF checkpoint: transformers >= 4.52 nests the language model."""

    language: str
    vision: str
    lm_head: str = "lm_head."

    @classmethod
    def detect(cls, names) -> "HFLayout":
        if any(n.startswith("model.language_model.") for n in names):
            return NESTED
        return FLAT


NESTED = HFLayout(language="model.language_model.", vision="model.visual.")
FLAT = HFLayout(language="model.", vision="visual.")


def export_layout(config: VLConfig) -> HFLayout:
    """The layout transformers itself writes for the family (and its published checkpoints use)."""
    return {"qwen2_5_vl": FLAT, "qwen3_vl": NESTED}[config.family]


def _same(tensors: list[Tensor]) -> Tensor:
    return tensors[0]


def _one(tensor: Tensor) -> list[Tensor]:
    return [tensor]


def _concat(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors, dim=0)


def _halves(tensor: Tensor) -> list[Tensor]:
    return list(tensor.chunk(2, dim=0))


def interleave_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """[q; k; v] -> Megatron's per-query-group layout [q_g0, k_g0, v_g0, q_g1, ...], so that a
    contiguous tensor-parallel slice holds whole groups."""
    rest = q.shape[1:]
    head_dim = q.shape[0] // heads
    q = q.reshape(groups, heads // groups * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, heads: int, groups: int) -> list[Tensor]:
    rest = qkv.shape[1:]
    per_group = qkv.shape[0] // groups
    head_dim = per_group // (heads // groups + 2)
    grouped = qkv.reshape(groups, per_group, *rest)
    q, k, v = grouped.split([per_group - 2 * head_dim, head_dim, head_dim], dim=1)
    return [x.reshape(-1, *rest) for x in (q, k, v)]


def tensor_rules(config: VLConfig, layout: HFLayout = NESTED) -> list[TensorRule]:
    """Every parameter of the full (unpipelined) model: the family's vision encoder, then the
    language model."""
    vision_rules = {"qwen2_5_vl": _qwen25_vision_rules, "qwen3_vl": _qwen3_vision_rules}[config.family]
    return vision_rules(config, layout.vision) + _language_rules(config, layout)


def _plain(mcore: str, name: str, shard: Shard, vision: bool) -> TensorRule:
    return TensorRule(mcore, (name,), _same, _one, shard, vision)


def _glu(mcore: str, gate: str, up: str, vision: bool) -> TensorRule:
    return TensorRule(mcore, (gate, up), _concat, _halves, "glu", vision)


def _vision_plain(mcore: str, name: str, shard: Shard = "replicated") -> TensorRule:
    return _plain(mcore, name, shard, True)


def _fused_vision_qkv(mcore: str, name: str, heads: int) -> TensorRule:
    """transformers' vision qkv is [q; k; v] with every head a group of its own."""
    return TensorRule(
        mcore,
        (name,),
        lambda x: interleave_qkv(*x[0].chunk(3, dim=0), heads=heads, groups=heads),
        lambda x: [torch.cat(split_qkv(x, heads, heads), dim=0)],
        "column",
        True,
    )


def _vision_attention_rules(m: str, h: str, heads: int) -> list[TensorRule]:
    return [
        _fused_vision_qkv(m + "self_attention.linear_qkv.weight", h + "attn.qkv.weight", heads),
        _fused_vision_qkv(m + "self_attention.linear_qkv.bias", h + "attn.qkv.bias", heads),
        _vision_plain(m + "self_attention.linear_proj.weight", h + "attn.proj.weight", "row"),
        _vision_plain(m + "self_attention.linear_proj.bias", h + "attn.proj.bias"),
    ]


def _merger_rules(m: str, h: str, norm: str, fc1: str, fc2: str, norm_bias: bool) -> list[TensorRule]:
    rules = [_vision_plain(m + "norm.weight", h + norm + ".weight")]
    if norm_bias:
        rules.append(_vision_plain(m + "norm.bias", h + norm + ".bias"))
    return rules + [
        _vision_plain(m + "projector.encoder.linear_fc1.weight", h + fc1 + ".weight", "column"),
        _vision_plain(m + "projector.encoder.linear_fc1.bias", h + fc1 + ".bias", "column"),
        _vision_plain(m + "projector.encoder.linear_fc2.weight", h + fc2 + ".weight", "row"),
        _vision_plain(m + "projector.encoder.linear_fc2.bias", h + fc2 + ".bias"),
    ]


def _qwen25_vision_rules(config: VLConfig, vis: str) -> list[TensorRule]:
    """RMSNorm blocks with SwiGLU MLPs, no patch-embedding bias, merger ln_q -> mlp.0 -> mlp.2."""
    v = config.vision
    rules = [_vision_plain("vision_model.patch_embed.weight", f"{vis}patch_embed.proj.weight")]
    for i in range(v.depth):
        m, h = f"vision_model.decoder.layers.{i}.", f"{vis}blocks.{i}."
        rules += [_vision_plain(m + "self_attention.linear_qkv.layer_norm_weight", h + "norm1.weight")]
        rules += _vision_attention_rules(m, h, v.num_heads)
        rules += [
            _vision_plain(m + "mlp.linear_fc1.layer_norm_weight", h + "norm2.weight"),
            _glu(m + "mlp.linear_fc1.weight", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight", True),
            _glu(m + "mlp.linear_fc1.bias", h + "mlp.gate_proj.bias", h + "mlp.up_proj.bias", True),
            _vision_plain(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight", "row"),
            _vision_plain(m + "mlp.linear_fc2.bias", h + "mlp.down_proj.bias"),
        ]
    return rules + _merger_rules("vision_model.merger.", f"{vis}merger.", "ln_q", "mlp.0", "mlp.2", norm_bias=False)


def _qwen3_vision_rules(config: VLConfig, vis: str) -> list[TensorRule]:
    """LayerNorm blocks with fc1 -> fc2 MLPs, a patch-embedding bias, the position grid, the
    merger norm -> linear_fc1 -> linear_fc2 and one such merger per deepstack level."""
    v = config.vision
    rules = [
        _vision_plain("vision_model.patch_embed.weight", f"{vis}patch_embed.proj.weight"),
        _vision_plain("vision_model.patch_embed.bias", f"{vis}patch_embed.proj.bias"),
        _vision_plain("vision_model.position_grid.weight", f"{vis}pos_embed.weight"),
    ]
    for i in range(v.depth):
        m, h = f"vision_model.decoder.layers.{i}.", f"{vis}blocks.{i}."
        rules += [
            _vision_plain(m + "self_attention.linear_qkv.layer_norm_weight", h + "norm1.weight"),
            _vision_plain(m + "self_attention.linear_qkv.layer_norm_bias", h + "norm1.bias"),
        ]
        rules += _vision_attention_rules(m, h, v.num_heads)
        rules += [
            _vision_plain(m + "mlp.linear_fc1.layer_norm_weight", h + "norm2.weight"),
            _vision_plain(m + "mlp.linear_fc1.layer_norm_bias", h + "norm2.bias"),
            _vision_plain(m + "mlp.linear_fc1.weight", h + "mlp.linear_fc1.weight", "column"),
            _vision_plain(m + "mlp.linear_fc1.bias", h + "mlp.linear_fc1.bias", "column"),
            _vision_plain(m + "mlp.linear_fc2.weight", h + "mlp.linear_fc2.weight", "row"),
            _vision_plain(m + "mlp.linear_fc2.bias", h + "mlp.linear_fc2.bias"),
        ]
    rules += _merger_rules("vision_model.merger.", f"{vis}merger.", "norm", "linear_fc1", "linear_fc2", norm_bias=True)
    for k in range(config.deepstack_levels):
        rules += _merger_rules(f"vision_model.deepstack_mergers.{k}.", f"{vis}deepstack_merger_list.{k}.",
                               "norm", "linear_fc1", "linear_fc2", norm_bias=True)
    return rules


def _language_rules(config: VLConfig, layout: HFLayout) -> list[TensorRule]:
    """The Qwen2 / Qwen3 decoder: QKV bias or not, per-head q/k norms or not."""
    t = config.text
    lm = layout.language

    def qkv(mcore: str, kind: str, attn: str) -> TensorRule:
        names = tuple(f"{attn}{x}_proj.{kind}" for x in "qkv")
        heads, groups = t.num_attention_heads, t.num_key_value_heads
        return TensorRule(
            mcore,
            names,
            lambda x: interleave_qkv(*x, heads=heads, groups=groups),
            lambda x: split_qkv(x, heads, groups),
            "column",
            False,
        )

    rules = [_plain("language_model.embedding.word_embeddings.weight", f"{lm}embed_tokens.weight", "column", False)]
    for i in range(t.num_layers):
        m, h = f"language_model.decoder.layers.{i}.", f"{lm}layers.{i}."
        attn = h + "self_attn."
        rules += [
            _plain(m + "self_attention.linear_qkv.layer_norm_weight", h + "input_layernorm.weight", "replicated", False),
            qkv(m + "self_attention.linear_qkv.weight", "weight", attn),
        ]
        if t.qkv_bias:
            rules.append(qkv(m + "self_attention.linear_qkv.bias", "bias", attn))
        if t.qk_norm:
            rules += [
                _plain(m + "self_attention.q_layernorm.weight", attn + "q_norm.weight", "replicated", False),
                _plain(m + "self_attention.k_layernorm.weight", attn + "k_norm.weight", "replicated", False),
            ]
        rules += [
            _plain(m + "self_attention.linear_proj.weight", attn + "o_proj.weight", "row", False),
            _plain(m + "mlp.linear_fc1.layer_norm_weight", h + "post_attention_layernorm.weight", "replicated", False),
            _glu(m + "mlp.linear_fc1.weight", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight", False),
            _plain(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight", "row", False),
        ]
    rules.append(_plain("language_model.decoder.final_layernorm.weight", f"{lm}norm.weight", "replicated", False))
    # Tied checkpoints carry no lm_head; a last pipeline stage still holds its own copy.
    head = f"{lm}embed_tokens.weight" if t.tie_word_embeddings else f"{layout.lm_head}weight"
    rules.append(_plain("language_model.output_layer.weight", head, "column", False))
    return rules


def stored_rules(config: VLConfig, layout: HFLayout = NESTED) -> list[TensorRule]:
    """The tensors a checkpoint stores: a tied output layer is stored once, as the embedding
    (as Megatron saves it and as transformers writes tied checkpoints)."""
    tied = config.text.tie_word_embeddings
    return [r for r in tensor_rules(config, layout) if not (tied and r.mcore == "language_model.output_layer.weight")]


_LOCAL_NORM_NAMES = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    ("pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
)
_LAYER = re.compile(r"(.*\.decoder\.layers\.)(\d+)(\..*)")


def canonical_name(name: str, layer_offset: int = 0) -> str:
    """Module parameter name -> canonical name: TE norm names and global layer numbers."""
    for local, te in _LOCAL_NORM_NAMES:
        if name.endswith(local):
            name = name[: -len(local)] + te
    match = _LAYER.match(name)
    if match and name.startswith("language_model."):
        name = f"{match.group(1)}{int(match.group(2)) + layer_offset}{match.group(3)}"
    return name


def shard(tensor: Tensor, kind: Shard, rank: int, size: int) -> Tensor:
    """This tensor-parallel rank's slice of a full tensor."""
    if size == 1 or kind == "replicated":
        return tensor
    if kind == "column":
        return tensor.chunk(size, dim=0)[rank]
    if kind == "row":
        return tensor.chunk(size, dim=1)[rank]
    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)


def checkpoint_key(canonical: str) -> tuple[str, int | None]:
    """Megatron's sharded key of a parameter and its layer index: the layers of a block are
    stacked on a leading axis ('...decoder.layers.5.x' -> ('...decoder.layers.x', 5))."""
    match = _LAYER.match(canonical)
    if not match:
        return canonical, None
    return f"{match.group(1)[:-1]}{match.group(3)}", int(match.group(2))
