"""Training checkpoints: Megatron distributed checkpoints of model and optimizer, plus what an
exact resume needs.

    SAVE/iter_0000020/            torch_dist: model and optimizer (sharded), common.pt with the
                                  iteration, scheduler state and arguments; per-rank RNG states;
                                  mmprolong_checkpoint.json (so `convert mcore-to-hf` reads it)
    SAVE/latest_checkpointed_iteration.txt   written last, atomically

A checkpoint is written under `iter_NNNNNNN.partial` and renamed when every rank has finished,
so "latest" only ever names complete checkpoints. The data position is not stored separately:
the plan is fixed, so the iteration says exactly which micro-batches come next.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_mmprolong.config import VLConfig
from megatron_mmprolong.convert.checkpoint_info import LATEST, iteration_dir, latest_iteration, write_info
from megatron_mmprolong.convert.mcore_checkpoint import apply_model_state, load_sharded
from megatron_mmprolong.files import write_text_whole

def _rng_state() -> dict:
    """Plain containers and tensors only, so that loading needs no unpickling of objects."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                    has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(save: str | Path, iteration: int, model, optimizer, scheduler, args, config: VLConfig,
                    plan_digest: str) -> Path:
    """`model` is the unwrapped VisionLanguageModel (its parameters are the optimizer's)."""
    final = iteration_dir(save, iteration)
    partial = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    model_state = model.sharded_state_dict()
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "plan_digest": plan_digest,
        "args": asdict(args),
    }
    dist_checkpointing.save(state, str(partial))
    (partial / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), partial / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        write_info(partial, source="mmprolong train", hf_config=config.to_hf_dict(),
                   dtype="bfloat16" if args.bf16 else "float32", iteration=iteration,
                   parallel_layout={"tensor_parallel": args.tensor_model_parallel_size,
                                    "pipeline_parallel": args.pipeline_model_parallel_size,
                                    "context_parallel": args.context_parallel_size})
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        write_text_whole(Path(save) / LATEST, f"{iteration}\n")
    dist.barrier()
    return final


def load_checkpoint(load: str | Path, model, optimizer, scheduler, load_optimizer: bool = True) -> tuple[int, str]:
    """Restore a training checkpoint; returns (iteration, plan digest)."""
    iteration = latest_iteration(load)
    directory = iteration_dir(load, iteration)
    model_state = model.sharded_state_dict()
    request = {"model": model_state}
    if load_optimizer:
        request["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True)
    state = load_sharded(request, directory)
    apply_model_state(model, state["model"], directory)
    if load_optimizer:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = directory / "rng" / f"rank_{dist.get_rank():05d}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))
        return int(state["iteration"]), state["plan_digest"]
    return 0, ""
