"""What a run checks before any model is built, and `mmprolong train --preflight-world-size N`.

`read_inputs` is what rank 0 of `train` reads and checks before the other ranks go on (the start
point, the model, the data plan); `check_world` is the arithmetic of the layout. The pre-flight
runs both in one process, with the same arguments parsed the same way, for a world size that no
rank has started yet: a batch script calls it before `srun`, so a node count that cannot fit is
refused in one line instead of after every rank has started (and each printed the error).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_mmprolong.config import ConfigError, VLConfig
from megatron_mmprolong.data.packing import Alignment
from megatron_mmprolong.data.plan import MixtureSpec, Plan, PlanConfig, make_plan
from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.output_lock import SAVE_LOCK, OutputLocked, held_by
from megatron_mmprolong.training import arguments as A
from megatron_mmprolong.training.resume import (
    StartPoint, argument_model, check_resume, pretrained_config, start_point,
)


class PreflightError(ConfigError):
    pass


@dataclass(frozen=True)
class Inputs:
    start: StartPoint
    loaded: VLConfig | None  # the config of the checkpoint the weights come from (resumed or initial)
    plan: Plan
    train_iters: int

    @property
    def finished(self) -> bool:
        return self.start.resume is not None and self.start.iteration >= self.train_iters


def alignment(args: A.TrainArgs) -> Alignment:
    return Alignment(args.context_parallel_size, args.tensor_model_parallel_size, args.sequence_parallel,
                     args.fp8_format is not None)


def _fitting(args: A.TrainArgs) -> tuple[int, str, str]:
    """(ranks per model replica, 'TPt x CPc x PPp', the world sizes that fit the global batch)."""
    tp, cp, pp = args.tensor_model_parallel_size, args.context_parallel_size, args.pipeline_model_parallel_size
    batch = args.global_batch_size
    fitting = ", ".join(str(tp * cp * pp * d) for d in range(1, batch + 1) if batch % d == 0)
    return tp * cp * pp, f"TP{tp} x CP{cp} x PP{pp}", fitting


def check_layout(args: A.TrainArgs, world_size: int) -> None:
    """PreflightError unless `world_size` is a multiple of TP x CP x PP (before any process group)."""
    model_parallel, layout, fitting = _fitting(args)
    if world_size % model_parallel:
        raise PreflightError(f"world size {world_size} is not a multiple of TP x PP x CP = {model_parallel} ({layout}); "
                             f"world sizes that fit --global-batch-size {args.global_batch_size}: {fitting}")


def check_world(args: A.TrainArgs, world_size: int) -> int:
    """The data-parallel size of `world_size` ranks at this layout; PreflightError if they do not fit."""
    check_layout(args, world_size)
    model_parallel, layout, fitting = _fitting(args)
    batch = args.global_batch_size
    dp = world_size // model_parallel
    if batch % dp:
        raise PreflightError(f"--global-batch-size {batch} does not divide over the {dp} data-parallel replicas of "
                             f"{world_size} ranks at {layout}; world sizes that fit: {fitting}")
    return dp


def check_plan_alignment(planned: Alignment, needed: Alignment) -> None:
    """A plan made for another layout serves this one only if its samples and packs are padded
    to multiples of what this layout needs (CP halves, SP rows, FP8 row blocks)."""
    if planned.multiple % needed.multiple or planned.pack_multiple % needed.pack_multiple:
        raise ConfigError(f"the plan pads samples to multiples of {planned.multiple} and packs to "
                          f"{planned.pack_multiple}; this layout needs {needed.multiple} and "
                          f"{needed.pack_multiple} (re-plan with its CP/TP/SP/FP8)")


def make_run_plan(args: A.TrainArgs, aligned: Alignment) -> Plan:
    if args.data_plan:
        plan = Plan.load(args.data_plan)
        if plan.config.seq_length != args.seq_length or plan.config.global_batch != args.global_batch_size:
            raise ConfigError(f"plan {args.data_plan} is for --seq-length {plan.config.seq_length} and "
                              f"--global-batch-size {plan.config.global_batch}")
        return plan
    mixture = MixtureSpec.from_yaml(args.data_mix)
    if args.train_tokens is not None:
        mixture = replace(mixture, token_budget=int(args.train_tokens))
    return make_plan(mixture, PlanConfig(args.seq_length, args.global_batch_size, aligned))


def read_inputs(args: A.TrainArgs) -> Inputs:
    """The start point, the model's checkpoint config and the data plan, each checked: a resume
    against the arguments (resume.check_resume), the model against the layout, the plan against
    the layout, the run's length and the model (its datasets' pages)."""
    start = start_point(args)
    aligned = alignment(args)
    plan = make_run_plan(args, aligned)
    initial = pretrained_config(start)
    loaded = (check_resume(args, start, argument_model(args, initial), plan.digest())
              if start.resume is not None else initial)
    config = A.model_config(args, loaded)
    config.validate_parallel(A.parallel_config(args))
    check_plan_alignment(plan.config.alignment, aligned)
    train_iters = args.train_iters or plan.steps
    if train_iters > plan.steps:
        raise ConfigError(f"--train-iters {train_iters} exceeds the {plan.steps} steps of the data plan "
                          "(raise the mixture's token_budget or allow replacement)")
    for prefix in plan.datasets:
        MultimodalStore(prefix).check_fits(config)
    return Inputs(start, loaded, plan, train_iters)


def check_save_lock(args: A.TrainArgs) -> None:
    """Refuse where another run holds --save (a requeued run of this same Slurm job is let through:
    train waits for its predecessor)."""
    if not args.save:
        return
    holder = held_by(Path(args.save) / SAVE_LOCK)
    if holder is not None and not (holder.slurm_job and holder.slurm_job == os.environ.get("SLURM_JOB_ID")):
        raise OutputLocked(f"{args.save} is being written by another run: {holder.describe()}; wait for it to finish, "
                           "stop it, or choose another --save")


def preflight(args: A.TrainArgs, world_size: int) -> str:
    """One line saying how `world_size` ranks run this job; PreflightError (or the input's own
    error) when they cannot."""
    dp = check_world(args, world_size)
    inputs = read_inputs(args)
    check_save_lock(args)
    where = (f"finished ({inputs.start.checkpoint} is iteration {inputs.start.iteration} of {inputs.train_iters})"
             if inputs.finished else inputs.start.describe(inputs.train_iters))
    return (f"{world_size} ranks fit: TP{args.tensor_model_parallel_size} x CP{args.context_parallel_size} x "
            f"PP{args.pipeline_model_parallel_size} x DP{dp}, {args.global_batch_size // dp} micro-batches per "
            f"replica per step; data plan {inputs.plan.digest()} ({inputs.plan.steps} steps); {where}")
