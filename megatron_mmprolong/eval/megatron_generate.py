"""Greedy answers from a Megatron checkpoint at TP x CP, behind transformers' `generate` interface,
so that `answer_questions` (and so `eval qa` and `eval needle`) run on either kind of checkpoint.

Long inputs need context parallelism, so the whole prompt runs through the model as one packed
sample (THD), split over the CP ranks in the training layout; each new token re-runs the
sequence (no KV cache: answers are a few tokens, prompts are long). The rank that holds the last
position picks the token and the CP group agrees on it. Every rank of the TP x CP world calls
`generate` with the same inputs. Pipeline parallelism is not supported here: export to HF.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_mmprolong.config import ParallelConfig


class MegatronGenerator(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    @classmethod
    def from_checkpoint(cls, mcore_dir: str | Path, parallel: ParallelConfig) -> "MegatronGenerator":
        from megatron_mmprolong import runtime
        from megatron_mmprolong.convert.checkpoint_info import checkpoint_config
        from megatron_mmprolong.convert.mcore_checkpoint import load_mcore_checkpoint
        from megatron_mmprolong.model.builder import build_model

        if parallel.pipeline_parallel != 1:
            raise ValueError("evaluation on a Megatron checkpoint runs at TP x CP; for pipeline parallel "
                             "models export to HF (mmprolong convert mcore-to-hf)")
        runtime.initialize(parallel)
        config = checkpoint_config(mcore_dir)
        model = build_model(config, parallel)
        load_mcore_checkpoint(model, mcore_dir)
        return cls(model.eval())

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int, pad_token_id: int, pixel_values=None,
                 image_grid_thw=None, **_) -> torch.Tensor:
        """[1, prompt] -> [1, prompt + reply], greedy, stopping after `eos_token_id`."""
        model = self.model
        device = next(model.parameters()).device
        align = 2 * model.cp_size if model.cp_size > 1 else 1  # the zigzag split needs 2*CP chunks
        ids = input_ids[0].tolist()
        vision = {}
        if pixel_values is not None:
            vision = {"pixel_values": pixel_values.to(device), "image_grid_thw": image_grid_thw}
        for _ in range(max_new_tokens):
            length = len(ids)
            padded = align * math.ceil(length / align)  # padding after the last token cannot change it (causal)
            tokens = torch.tensor(ids + [pad_token_id] * (padded - length), device=device)[None]
            cu = torch.tensor([0, padded], dtype=torch.int32)
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.to(device), cu_seqlens_kv=cu.to(device),
                                     max_seqlen_q=padded, max_seqlen_kv=padded)
            cp_index = model.cp_token_index(padded, cu) if model.cp_size > 1 else None
            logits = model(tokens, packed_seq_params=packed, cp_index=None if cp_index is None else cp_index.to(device),
                           **vision)[0]
            if cp_index is None:
                token = int(logits[length - 1].argmax())
            else:
                here = (cp_index == length - 1).nonzero()
                choice = torch.tensor([int(logits[int(here[0, 0])].argmax()) if len(here) else -1])
                dist.all_reduce(choice, op=dist.ReduceOp.MAX, group=model.pg_collection.cp)
                token = int(choice)
            ids.append(token)
            if token == eos_token_id:
                break
        return torch.tensor(ids)[None]
