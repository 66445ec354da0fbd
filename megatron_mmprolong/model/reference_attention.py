"""Core attention of the local backend: torch SDPA with explicit masks.

A numerical reference for machines without Transformer Engine (CPU tests, parity checks), not a
fast path: packed (THD) batches get a [tokens, tokens] block-diagonal mask from cu_seqlens. On
GPUs the TE backend runs the same segments with fused variable-length kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


class ReferenceCoreAttention(MegatronModule):
    """Same constructor and call signature as Megatron's DotProductAttention. Masks come from
    `attn_mask_type` and `packed_seq_params` only; the model never passes `attention_mask`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp_size)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp_size)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # [t, heads, dim] -> [1, heads, t, dim]
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
            allowed = _segment_mask(packed_seq_params.cu_seqlens_q, q.shape[2], causal)
        else:
            # [s, b, heads, dim] -> [b, heads, s, dim]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            allowed = _causal_mask(q.shape[2], q.device) if causal else None
        if self.groups != self.heads:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
        )
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return out.squeeze(0).transpose(0, 1).reshape(out.shape[2], -1)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


def _causal_mask(length: int, device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def _segment_mask(cu_seqlens: torch.Tensor, length: int, causal: bool) -> torch.Tensor:
    positions = torch.arange(length, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    allowed = segment.unsqueeze(0) == segment.unsqueeze(1)
    if causal:
        allowed &= _causal_mask(length, cu_seqlens.device)
    return allowed
