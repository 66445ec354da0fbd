"""Self-attention with per-token rotary angles, for the language model and the vision blocks.

Megatron's SelfAttention applies rotary embeddings to packed (THD) batches one segment at a
time, reading each segment offset back to the host, and re-slices them for context
parallelism. Qwen2.5-VL's angles are already given per token (M-RoPE restarts per packed sample;
the CP split is applied to the positions), so here the rotation is a single elementwise op on
[tokens, batch, heads, dim], right after the QKV projection; Transformer Engine's fused kernel
takes over when `apply_rope_fusion` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention


class TokenRotarySelfAttention(SelfAttention):
    """SelfAttention whose `rotary_pos_emb` holds per-token angles [tokens, batch, 1, dim].

    With a `kv_cache` (model/kv_cache.py, set for generation) the prompt's forward stores the
    rotated keys and values, and a new token's forward attends over the cache instead of
    running core attention."""

    _token_angles = None
    kv_cache = None

    def forward(self, hidden_states, attention_mask=None, *, rotary_pos_emb=None, **kwargs):
        self._token_angles = rotary_pos_emb
        try:
            if self.kv_cache is not None and self.kv_cache.decoding:
                return self._decode(hidden_states)
            return super().forward(hidden_states, attention_mask, rotary_pos_emb=None, **kwargs)
        finally:
            self._token_angles = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, value = super().get_query_key_value_tensors(*args, **kwargs)
        if self._token_angles is not None:
            query = apply_rotary_pos_emb(query, self._token_angles, config=self.config)
            key = apply_rotary_pos_emb(key, self._token_angles, config=self.config)
        if self.kv_cache is not None and not self.kv_cache.decoding:
            self.kv_cache.store_prompt(self.layer_number, key.reshape(-1, *key.shape[-2:]),
                                       value.reshape(-1, *value.shape[-2:]))
        return query, key, value

    def _decode(self, hidden_states):
        """One new token [1, 1, hidden] -> (output, bias) of the projection."""
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        scale = self.config.softmax_scale or query.shape[-1] ** -0.5
        context = self.kv_cache.attend(self.layer_number, query[0, 0], key[0, 0], value[0, 0], scale)
        return self.linear_proj(context.reshape(1, 1, -1))


@dataclass
class BlockSegments:
    """Packed segments of the vision blocks: windows, or whole frames in full-attention blocks."""

    window: PackedSeqParams
    frame: PackedSeqParams
    full_attention_layers: frozenset[int]  # 1-based layer numbers

    def for_layer(self, layer_number: int) -> PackedSeqParams:
        return self.frame if layer_number in self.full_attention_layers else self.window


class WindowedSelfAttention(TokenRotarySelfAttention):
    """Vision self-attention: picks window or frame segments by its layer number, so one
    TransformerBlock (with its recompute and checkpointing) runs all vision blocks."""

    def forward(self, hidden_states, attention_mask=None, *, packed_seq_params=None, **kwargs):
        if isinstance(packed_seq_params, BlockSegments):
            packed_seq_params = packed_seq_params.for_layer(self.layer_number)
        return super().forward(
            hidden_states, attention_mask, packed_seq_params=packed_seq_params, **kwargs
        )
