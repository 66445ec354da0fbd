"""Greedy answers from a Megatron checkpoint at TP x CP x PP, behind transformers' `generate`
interface, so that `answer_questions` (and so `eval qa`, `needle` and `extend`) run on either kind
of checkpoint; and per-position scores for `eval position-loss`.

Long inputs need context parallelism, so the whole prompt runs through the model once as one
packed sample (THD), split over the CP ranks in the training layout, through Megatron-Core's
pipeline schedule (forward only); its keys and values stay in a cache (model/kv_cache.py) and
each new token then runs alone against it. The rank that holds the last position on the last
stage picks the token and every rank agrees on it. Every rank of the TP x CP x PP world calls
`generate` with the same inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_mmprolong.config import ConfigError, ParallelConfig, PrecisionConfig
from megatron_mmprolong.model.kv_cache import KVCache
from megatron_mmprolong.model.packed import packed_segments

# fp32 attention scores Transformer Engine's unfused backend may hold for one prompt
UNFUSED_SCORES_LIMIT = 8 * 2**30


class MegatronGenerator(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    @classmethod
    def from_checkpoint(cls, mcore_dir: str | Path, parallel: ParallelConfig, dtype: str = "bf16") -> "MegatronGenerator":
        """The checkpoint's model at `parallel`, its parameters in `dtype`: bf16 by default, as
        Transformer Engine's flash and cuDNN attention need; fp32 falls back to TE's unfused
        attention, which holds [heads, s, s] scores and has no context parallelism."""
        from megatron_mmprolong import runtime
        from megatron_mmprolong.convert.checkpoint_info import checkpoint_config
        from megatron_mmprolong.convert.mcore_checkpoint import load_mcore_checkpoint
        from megatron_mmprolong.model.builder import build_model
        from megatron_mmprolong.model.specs import default_backend

        if dtype == "fp32" and parallel.context_parallel > 1 and default_backend() == "te":
            raise ConfigError("fp32 evaluation runs Transformer Engine's unfused attention, which has no context "
                              "parallelism: evaluate in bf16 (the default) or without --cp")
        runtime.initialize(parallel)
        config = checkpoint_config(mcore_dir)
        # the prompt grows by one token per step: pipeline stages exchange shapes each time
        model = build_model(config, parallel, precision=PrecisionConfig(params_dtype=dtype),
                            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                            variable_seq_lengths=True, training=False)
        load_mcore_checkpoint(model, mcore_dir)
        return cls(model.eval())

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int, pad_token_id: int, pixel_values=None,
                 image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                 **_) -> torch.Tensor:
        """[1, prompt] -> [1, prompt + reply], greedy, stopping after `eos_token_id`. Videos are
        video items on the model's time axis (`second_per_grid_ts` for Qwen2.5-VL)."""
        model = self.model
        device = next(model.parameters()).device
        ids = input_ids[0].tolist()
        length = len(ids)
        grids = image_grid_thw.cpu() if image_grid_thw is not None else None
        vision = {} if pixel_values is None else {"pixel_values": pixel_values.to(device), "image_grid_thw": grids}
        video = {}
        if pixel_values_videos is not None:
            video = {"video_grid_thw": video_grid_thw.cpu(),
                     "second_per_grid_ts": None if second_per_grid_ts is None else second_per_grid_ts.cpu()}
            vision |= {"pixel_values_videos": pixel_values_videos.to(device), **video}
        tokens, packed, cp_index = self._prompt(input_ids[0], pad_token_id)
        # new tokens continue from the prompt's largest M-RoPE position, in all three sections
        next_position = int(model.position_ids(input_ids.cpu(), grids, **video).max()) + 1
        cache = KVCache(model.pg_collection.cp)
        attention = [layer.self_attention for layer in model.language_model.decoder.layers]
        for module in attention:
            module.kv_cache = cache
        try:
            hidden = self._forward(tokens, packed, cp_index.to(device) if model.cp_size > 1 else None, vision)
            here = (cp_index == length - 1).nonzero()
            ids.append(self._agreed_token(hidden, int(here[0, 0]) if len(here) else None))
            cache.keep_prompt_tokens((cp_index < length).to(device), room=max_new_tokens)
            one = torch.zeros(1, dtype=torch.long, device=device)  # every CP rank keeps the new token
            while len(ids) - length < max_new_tokens and ids[-1] != eos_token_id:
                position = torch.full((3, 1, 1), next_position + len(ids) - 1 - length, device=device)
                hidden = self._forward(torch.tensor([[ids[-1]]], device=device), None,
                                       one if model.cp_size > 1 else None, {}, position)
                ids.append(self._agreed_token(hidden, 0))
        finally:
            for module in attention:
                module.kv_cache = None
        return torch.tensor(ids)[None]

    @torch.no_grad()
    def token_scores(self, input_ids, pixels, grids, chunk: int = 4096):
        """Per-position (loss, correct) for predicting token p + 1 from tokens <= p, on every rank:
        float64 [n - 1] and bool [n - 1] (`eval position-loss`). Each CP rank scores its own
        positions, `chunk` of them at a time (their logits in fp32), and one all-reduce assembles
        the sequence."""
        model = self.model
        device = next(model.parameters()).device
        length = input_ids.shape[1]
        tokens, packed, cp_index = self._prompt(input_ids[0], 0)
        ids = tokens[0].cpu()
        vision = {}
        if len(grids):
            dtype = next(model.parameters()).dtype
            vision = {"pixel_values": torch.from_numpy(pixels).to(device, dtype), "image_grid_thw": torch.tensor(grids)}
        hidden = self._forward(tokens, packed, cp_index.to(device) if model.cp_size > 1 else None, vision)
        scores = torch.zeros(2, len(ids), dtype=torch.float64)  # loss, hit; by position
        writes = ps.get_tensor_model_parallel_rank() == 0  # TP ranks compute the same logits
        if hidden is not None:
            keep = (cp_index < length - 1).nonzero()[:, 0]
            for part in keep.split(chunk):
                positions = cp_index[part]
                logits = model.language_model.logits(hidden[part.to(device)])[0].float()
                target = ids[positions + 1].to(device)
                if writes:
                    scores[0, positions] = torch.nn.functional.cross_entropy(logits, target, reduction="none").double().cpu()
                    scores[1, positions] = (logits.argmax(-1) == target).double().cpu()
        dist.all_reduce(scores)
        return scores[0, :length - 1], scores[1, :length - 1].bool()

    def _prompt(self, ids, pad: int):
        """The prompt as one packed sample padded for the zigzag CP split (padding after the last
        token cannot change it: attention is causal): tokens [1, padded] on the model's device,
        its PackedSeqParams, and this rank's positions of it (CPU; all of them without CP)."""
        device = next(self.model.parameters()).device
        align = 2 * self.model.cp_size if self.model.cp_size > 1 else 1
        padded = align * math.ceil(len(ids) / align)
        self._check_unfused_attention(padded)
        tokens = torch.cat([ids.cpu(), torch.full((padded - len(ids),), pad, dtype=ids.dtype)])[None].to(device)
        cu = torch.tensor([0, padded], dtype=torch.int32)
        packed = packed_segments(cu, device, padded)
        cp_index = self.model.cp_token_index(padded, cu) if self.model.cp_size > 1 else torch.arange(padded)
        return tokens, packed, cp_index

    def _check_unfused_attention(self, length: int) -> None:
        """fp32 on Transformer Engine runs its unfused attention: [heads / TP, s, s] fp32 scores."""
        model = self.model
        if model.backend != "te" or next(model.parameters()).dtype != torch.float32:
            return
        heads = model.model_config.text.num_attention_heads // model.pg_collection.tp.size()
        if heads * length * length * 4 > UNFUSED_SCORES_LIMIT:
            raise ConfigError(f"a {length}-token prompt in fp32 needs {heads * length * length * 4 / 2**30:.0f} GiB of "
                              f"attention scores (Transformer Engine's unfused attention): evaluate in bf16")

    def _forward(self, tokens, packed, cp_index, vision, position_ids=None):
        """Final hidden states [local tokens, 1, hidden] on the last pipeline stage, None on the
        others; logits are made only where they are used."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iterator, model):
            output = model(tokens, position_ids, packed_seq_params=packed, cp_index=cp_index, return_hidden=True,
                           **vision)
            return output, lambda out, non_loss_data=True: out

        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([None]), model=[self.model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
        return outputs[0] if self.model.post_process else None

    def _agreed_token(self, hidden, index: int | None) -> int:
        """The greedy token at local position `index` of the ranks that hold it (last stage, all
        of its TP group): the logits of that one row; one all-reduce over the model's TP x CP x PP
        world gives the token to every rank."""
        choice = torch.tensor([-1])
        if hidden is not None and index is not None:
            choice[0] = int(self.model.language_model.logits(hidden[index:index + 1])[0, 0].argmax())
        dist.all_reduce(choice, op=dist.ReduceOp.MAX)
        return int(choice)
