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
    """Every parameter of the full (unpipelined) model."""
    t, v = config.text, config.vision
    lm, vis = layout.language, layout.vision

    def qkv_rules(mcore: str, names: tuple[str, str, str], heads: int, groups: int, vision: bool):
        return TensorRule(
            mcore,
            names,
            lambda x: interleave_qkv(*x, heads=heads, groups=groups),
            lambda x: split_qkv(x, heads, groups),
            "column",
            vision,
        )

    def fused_vision_qkv(mcore: str, name: str):
        heads = v.num_heads
        return TensorRule(
            mcore,
            (name,),
            lambda x: interleave_qkv(*x[0].chunk(3, dim=0), heads=heads, groups=heads),
            lambda x: [torch.cat(split_qkv(x, heads, heads), dim=0)],
            "column",
            True,
        )

    def plain(mcore: str, name: str, shard: Shard, vision: bool):
        return TensorRule(mcore, (name,), _same, _one, shard, vision)

    def glu(mcore: str, gate: str, up: str, vision: bool):
        return TensorRule(mcore, (gate, up), _concat, _halves, "glu", vision)

    rules = [plain("vision_model.patch_embed.weight", f"{vis}patch_embed.proj.weight", "replicated", True)]
    for i in range(v.depth):
        m, h = f"vision_model.decoder.layers.{i}.", f"{vis}blocks.{i}."
        rules += [
            plain(m + "self_attention.linear_qkv.layer_norm_weight", h + "norm1.weight", "replicated", True),
            fused_vision_qkv(m + "self_attention.linear_qkv.weight", h + "attn.qkv.weight"),
            fused_vision_qkv(m + "self_attention.linear_qkv.bias", h + "attn.qkv.bias"),
            plain(m + "self_attention.linear_proj.weight", h + "attn.proj.weight", "row", True),
            plain(m + "self_attention.linear_proj.bias", h + "attn.proj.bias", "replicated", True),
            plain(m + "mlp.linear_fc1.layer_norm_weight", h + "norm2.weight", "replicated", True),
            glu(m + "mlp.linear_fc1.weight", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight", True),
            glu(m + "mlp.linear_fc1.bias", h + "mlp.gate_proj.bias", h + "mlp.up_proj.bias", True),
            plain(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight", "row", True),
            plain(m + "mlp.linear_fc2.bias", h + "mlp.down_proj.bias", "replicated", True),
        ]
    merger = "vision_model.merger."
    rules += [
        plain(merger + "norm.weight", f"{vis}merger.ln_q.weight", "replicated", True),
        plain(merger + "projector.encoder.linear_fc1.weight", f"{vis}merger.mlp.0.weight", "column", True),
        plain(merger + "projector.encoder.linear_fc1.bias", f"{vis}merger.mlp.0.bias", "column", True),
        plain(merger + "projector.encoder.linear_fc2.weight", f"{vis}merger.mlp.2.weight", "row", True),
        plain(merger + "projector.encoder.linear_fc2.bias", f"{vis}merger.mlp.2.bias", "replicated", True),
        plain("language_model.embedding.word_embeddings.weight", f"{lm}embed_tokens.weight", "column", False),
    ]
    for i in range(t.num_layers):
        m, h = f"language_model.decoder.layers.{i}.", f"{lm}layers.{i}."
        attn = h + "self_attn."
        rules += [
            plain(m + "self_attention.linear_qkv.layer_norm_weight", h + "input_layernorm.weight", "replicated", False),
            qkv_rules(
                m + "self_attention.linear_qkv.weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                t.num_attention_heads, t.num_key_value_heads, False,
            ),
            qkv_rules(
                m + "self_attention.linear_qkv.bias",
                (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                t.num_attention_heads, t.num_key_value_heads, False,
            ),
            plain(m + "self_attention.linear_proj.weight", attn + "o_proj.weight", "row", False),
            plain(m + "mlp.linear_fc1.layer_norm_weight", h + "post_attention_layernorm.weight", "replicated", False),
            glu(m + "mlp.linear_fc1.weight", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight", False),
            plain(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight", "row", False),
        ]
    rules.append(plain("language_model.decoder.final_layernorm.weight", f"{lm}norm.weight", "replicated", False))
    # Tied checkpoints carry no lm_head; a last pipeline stage still holds its own copy.
    head = f"{lm}embed_tokens.weight" if t.tie_word_embeddings else f"{layout.lm_head}weight"
    rules.append(plain("language_model.output_layer.weight", head, "column", False))
    return rules


def stored_rules(config: VLConfig, layout: HFLayout = NESTED) -> list[TensorRule]:
    """The tensors a checkpoint stores: a tied output layer is stored once, as the embedding
    (as Megatron saves it and as transformers writes tied checkpoints)."""
    tied = config.text.tie_word_embeddings
    return [r for r in tensor_rules(config, layout) if not (tied and r.mcore == "language_model.output_layer.weight")]


_LOCAL_NORM_NAMES = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
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
