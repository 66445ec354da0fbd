"""Core attention of the local backend: torch SDPA, no Transformer Engine.

A numerical reference for machines without TE (CPU tests, parity checks). Packed (THD) batches
are attended segment by segment without any [tokens, tokens] mask: segments of equal length
(the many same-sized vision windows, the packed samples) are stacked into one SDPA batch, so
the loop runs over distinct lengths, never over windows, and the grouping is computed once per
micro-batch from host boundaries (model/packed.py), so no layer reads the device back. With context parallelism each rank
all-gathers keys and values and attends its zigzag share of queries to them under a mask built
from global positions (what TE's ring attention computes, without its overlap). On GPUs the TE
backend runs the same segments with its fused variable-length kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from megatron_mmprolong.model.packed import PackedSegments, as_packed_segments, host_cu_seqlens
from megatron_mmprolong.parallel.context_parallel import local_token_index

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
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None

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
        if self.cp_group is not None:
            return self._context_parallel(query, key, value, packed_seq_params, causal)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            out = self._packed(query, key, value, as_packed_segments(packed_seq_params), causal)
            return out.reshape(out.shape[0], -1)  # [t, heads * dim]
        # [s, b, heads, dim] -> [b, heads, s, dim]
        out = self._sdpa(*(x.permute(1, 2, 0, 3) for x in (query, key, value)), causal)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False, mask: Tensor | None = None) -> Tensor:
        """[batch, heads, seq, dim] attention with query groups expanded."""
        if self.groups != self.heads:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def _context_parallel(self, q: Tensor, k: Tensor, v: Tensor, packed_seq_params, causal: bool) -> Tensor:
        """Local queries against all keys and values of the CP group."""
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        total = q.shape[0] * cp_size
        cu = host_cu_seqlens(packed_seq_params) if thd else torch.tensor([0, total])
        k = gather_from_sequence_parallel_region(k, True, group=self.cp_group)
        v = gather_from_sequence_parallel_region(v, True, group=self.cp_group)
        mine = local_token_index(cu, cp_size, cp_rank).to(q.device, non_blocking=True)
        every = torch.cat([local_token_index(cu, cp_size, r) for r in range(cp_size)]).to(q.device, non_blocking=True)
        boundaries = cu[1:].to(q.device, torch.int64, non_blocking=True)
        same = torch.bucketize(mine, boundaries, right=True)[:, None] == torch.bucketize(every, boundaries, right=True)[None]
        mask = same & (every[None] <= mine[:, None]) if causal else same
        if thd:  # [t, heads, dim] -> [1, heads, t, dim]
            out = self._sdpa(*(x.unsqueeze(0).transpose(1, 2) for x in (q, k, v)), mask=mask)
            return out.squeeze(0).transpose(0, 1).reshape(out.shape[2], -1)
        out = self._sdpa(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), mask=mask)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def _packed(self, q: Tensor, k: Tensor, v: Tensor, segments: PackedSegments, causal: bool) -> Tensor:
        """[t, heads, dim] tokens of back-to-back segments -> attention within each segment."""
        covered = int(segments.cu_seqlens_host[-1])
        if covered != q.shape[0]:
            raise ValueError(f"cu_seqlens cover {covered} tokens, the batch has {q.shape[0]}")
        parts, order = [], []
        for length, index in segments.segment_groups(q.device):
            stacked = [x[index].view(-1, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v)]
            parts.append(self._sdpa(*stacked, causal).transpose(1, 2).reshape(index.numel(), self.heads, -1))
            order.append(index)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]
