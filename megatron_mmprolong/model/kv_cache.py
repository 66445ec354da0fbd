"""Key/value cache of the language model's attention layers for greedy decoding at TP x CP x PP.

The prompt runs once through the normal (packed, context-parallel) forward while each layer
stores its rotated keys and values: every CP rank keeps those of its own share of the prompt.
Each new token then runs alone, the same on every CP rank: its query attends to the rank's
cached keys (the token's own key and value are kept on CP rank 0 only, so they count once),
and the ranks' partial results are merged with their log-sum-exp weights, two all-reduces per
layer instead of a forward over the whole sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class KVCache:
    def __init__(self, cp_group=None):
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        self.decoding = False
        self._keys: dict[int, Tensor] = {}  # layer number -> [tokens + room, KV heads, head dim]
        self._values: dict[int, Tensor] = {}
        self._filled: dict[int, int] = {}  # layer number -> tokens cached

    def store_prompt(self, layer: int, key: Tensor, value: Tensor) -> None:
        """Keys and values [tokens, KV heads, head dim] of this rank's prompt tokens."""
        self._keys[layer], self._values[layer] = _own_storage(key.detach()), _own_storage(value.detach())

    def keep_prompt_tokens(self, keep: Tensor, room: int) -> None:
        """Drop the cached padding after the prompt (`keep`: bool per local token) and make room
        for `room` new tokens, so that decoding writes in place; decode next."""
        for layer in self._keys:
            for cache in (self._keys, self._values):
                kept = cache[layer][keep]
                cache[layer] = torch.cat([kept, kept.new_empty(room, *kept.shape[1:])])
            self._filled[layer] = int(keep.sum())
        self.decoding = True

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """Attention of one new token over the cache: query [heads, dim], key/value [KV heads,
        dim] of the same token -> [heads, dim]; the token joins the cache."""
        filled = self._filled[layer]
        if self.cp_group is None or self.cp_group.rank() == 0:
            self._keys[layer][filled], self._values[layer][filled] = key, value
            filled = self._filled[layer] = filled + 1
        keys, values = self._keys[layer][:filled], self._values[layer][:filled]
        groups = keys.shape[1]
        grouped = query.reshape(groups, -1, query.shape[-1])  # query heads by the KV head they share
        # fp32 scores, as the prompt's fused attention keeps them: bf16 scores of tens round by
        # a tenth and greedy decoding drifts from the prompt's forward (and from transformers)
        scores = torch.einsum("gqd,ngd->gqn", grouped.float(), keys.float()) * scale
        lse = torch.logsumexp(scores, dim=-1)  # -inf on a rank with nothing cached
        probs = torch.softmax(scores, dim=-1).nan_to_num().to(values.dtype)
        out = torch.einsum("gqn,ngd->gqd", probs, values).float().reshape(query.shape)
        lse = lse.reshape(-1)
        if self.cp_group is not None:
            top = lse.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.cp_group)
            weight = torch.exp(lse - top)
            parts = torch.cat([out * weight[:, None], weight[:, None]], dim=1)
            dist.all_reduce(parts, group=self.cp_group)
            out = parts[:, :-1] / parts[:, -1:]
        return out.to(query.dtype)


def _own_storage(tensor: Tensor) -> Tensor:
    """`tensor`, copied where it is a view into a larger tensor: megatron-core and TE split the
    fused QKV projection with views, and a cached view of the values would keep the whole
    projection of every layer alive (at a 128K prompt, tens of GB)."""
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()
