"""Training checkpoints: Megatron distributed checkpoints of model and optimizer, plus what an
exact resume needs.

    SAVE/iter_0000020/            torch_dist: model and optimizer (sharded), common.pt with the
                                  iteration, scheduler state and arguments; per-rank RNG states;
                                  mmprolong_checkpoint.json (so `convert mcore-to-hf` reads it)
    SAVE/latest_checkpointed_iteration.txt   written last, atomically

`--keep-last N` removes older complete checkpoints after each save (`prune_checkpoints`).

A checkpoint is written under `iter_NNNNNNN.partial` and renamed when every rank has finished,
so "latest" only ever names complete checkpoints. The data position is not stored separately:
the plan is fixed, so the iteration says exactly which micro-batches come next.

A write the disk refuses (full, quota, I/O error) on any rank stops the save on every rank: the
ranks agree after each part that a subset of them writes, the partial folder is removed (it is
never renamed, so never taken for a checkpoint), and rank 0 says in one line which folder, why
and how much space is free there; the others exit with the same status, silently.
"""

from __future__ import annotations

import logging
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_mmprolong import errors
from megatron_mmprolong.runtime import host_group
from megatron_mmprolong.config import VLConfig
from megatron_mmprolong.convert.checkpoint_info import LATEST, iteration_dir, latest_iteration, write_info
from megatron_mmprolong.convert.mcore_checkpoint import apply_model_state, load_sharded
from megatron_mmprolong.files import write_text_whole

try:  # torch's distributed checkpoint failure is a BaseException: caught beside Exception, not as one
    from torch.distributed.checkpoint.api import CheckpointException as _CheckpointException
except ImportError:  # pragma: no cover
    _CheckpointException = Exception
_FAILURES = (Exception, _CheckpointException)

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
    failed = None
    try:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
    except _FAILURES as err:
        failed = err
    _agree(failed, save, final, iteration)
    try:
        model_state = model.sharded_state_dict()
        state = {
            "model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state),
            "scheduler": scheduler.state_dict(),
            "iteration": iteration,
            "plan_digest": plan_digest,
            "args": asdict(args),
        }
        # collective: a failed write of the sharded part raises on every rank; rank 0's common.pt
        # is written alone first, so the ranks agree on it there (_AgreeingCommonSave)
        with _agreeing_common_save(save, final, iteration):
            dist_checkpointing.save(state, str(partial))
        (partial / "rng").mkdir(exist_ok=True)
        with open(partial / "rng" / f"rank_{rank:05d}.pt", "wb") as stream:  # a Python file keeps the OSError
            torch.save(_rng_state(), stream)
    except (errors.OutputError, errors.ReportedElsewhere):
        raise  # the ranks agreed already (on common.pt)
    except _FAILURES as err:
        failed = err
    _agree(failed, save, final, iteration)
    try:
        if rank == 0:
            write_info(partial, source="mmprolong train", hf_config=config.to_hf_dict(),
                       dtype="bfloat16" if args.bf16 else "float32", iteration=iteration, plan_digest=plan_digest,
                       parallel_layout={"tensor_parallel": args.tensor_model_parallel_size,
                                        "pipeline_parallel": args.pipeline_model_parallel_size,
                                        "context_parallel": args.context_parallel_size})
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            write_text_whole(Path(save) / LATEST, f"{iteration}\n")
    except _FAILURES as err:
        failed = err
    _agree(failed, save, final, iteration)
    return final


def _agree(failed: Exception | None, save, final: Path, iteration: int) -> None:
    """All ranks learn whether any rank's part of the save failed; if one did, the partial folder
    goes and every rank raises: rank 0 the first refused write in words (errors.OutputError), the
    others errors.ReportedElsewhere. An error that is not a refused write keeps its traceback on
    the rank that met it."""
    mine = None
    if failed is not None:
        refused = errors.output_error(failed, final, "checkpoint", _after(save, iteration))
        mine = ("refused", str(refused)) if refused is not None else ("error", f"{type(failed).__name__}: {failed}")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=host_group())
    if not any(everyone):
        return
    if dist.get_rank() == 0:
        shutil.rmtree(final.with_name(final.name + ".partial"), ignore_errors=True)
    if mine is not None and mine[0] == "error":
        raise failed
    refusals = [text for kind, text in filter(None, everyone) if kind == "refused"]
    if dist.get_rank() == 0 and refusals:
        raise errors.OutputError(refusals[0]) from failed
    raise errors.ReportedElsewhere(errors.RUN_FAILED)


@contextmanager
def _agreeing_common_save(save, final: Path, iteration: int):
    """Megatron's common-state save (rank 0 writes common.pt with torch.save, then every rank
    enters the sharded save's collectives), with the ranks agreeing on that write before they go
    on: a full disk there would otherwise leave rank 0 raising while the others wait for it.
    `dist_checkpointing.save` takes no other common strategy, so this one is registered as the
    default ('torch', 1) for the call, through Megatron's registry, and the previous restored.
    Where megatron-core has no such registry (0.19: the common state is a ShardedObject of the
    sharded save, whose failures the ranks already agree on) there is nothing to register."""
    try:
        from megatron.core.dist_checkpointing.strategies.base import (
            StrategyAction, default_strategies, register_default_strategy,
        )
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
    except ImportError:
        with _quiet_writer_log():
            yield
        return

    class AgreeingCommonSave(TorchCommonSaveStrategy):
        def save_common(self, common_state_dict, checkpoint_dir):
            failed = None
            try:
                super().save_common(common_state_dict, checkpoint_dir)
            except _FAILURES as err:
                failed = err
            _agree(failed, save, final, iteration)

    previous = default_strategies[StrategyAction.SAVE_COMMON.value].get(("torch", 1))
    register_default_strategy(StrategyAction.SAVE_COMMON, "torch", 1, AgreeingCommonSave("torch", 1))
    try:
        with _quiet_writer_log():
            yield
    finally:
        if previous is not None:
            register_default_strategy(StrategyAction.SAVE_COMMON, "torch", 1, previous)


@contextmanager
def _quiet_writer_log():
    """Megatron's checkpoint writer logs each failed write ("Local process 0 encountered an error:
    ..."); the run reports a refused write itself, once, and any other error keeps the same text
    in its chain."""
    writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = writer_log.level
    writer_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        writer_log.setLevel(level)


def _after(save, iteration: int) -> str:
    latest = latest_iteration(save)
    kept = (f"the last complete checkpoint is iteration {latest} ({iteration_dir(save, latest)})" if latest is not None
            else "no checkpoint was saved")
    return f"iteration {iteration} was not saved and its partial folder was removed; {kept}"


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


def prune_checkpoints(save: str | Path, keep_last: int) -> list[Path]:
    """Remove complete checkpoints older than the newest `keep_last` at or below "latest" (rank 0,
    after a save). Never the one "latest" names, never a `.partial` one being written, never one
    past "latest" (a killed run's, which the resumed run overwrites). Each goes by a rename to
    `.removing` first, so a folder half removed by a kill is never taken for a checkpoint."""
    latest = latest_iteration(save)
    if latest is None:
        return []
    complete = sorted(
        int(d.name[len("iter_"):]) for d in Path(save).glob("iter_*")
        if d.is_dir() and d.name[len("iter_"):].isdigit() and int(d.name[len("iter_"):]) <= latest
    )
    removed = []
    for iteration in complete[:-keep_last] if len(complete) > keep_last else []:
        if iteration == latest:
            continue
        directory = iteration_dir(save, iteration)
        doomed = directory.with_name(directory.name + ".removing")
        try:
            directory.rename(doomed)
            shutil.rmtree(doomed)
        except OSError as err:  # a checkpoint that cannot be removed now is tried again after the next save
            print(f"could not remove {directory} (--keep-last): {err}", flush=True)
            continue
        removed.append(directory)
    for leftover in Path(save).glob("iter_*.removing"):  # a kill during an earlier removal
        shutil.rmtree(leftover, ignore_errors=True)
    return removed
