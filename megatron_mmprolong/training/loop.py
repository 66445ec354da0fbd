"""The training loop on Megatron-Core: its DDP, optimizer, LR schedule, pipeline schedules and
distributed checkpoints, around the Qwen2.5-VL model and the packed-sequence loader.

SIGTERM and SIGUSR1 (Slurm's warning before the time limit or preemption) make every rank save
a checkpoint after the current step and return normally (exit status 0); one before the first
step ends the run with nothing to save (also exit 0; signals.py has the contract).

Rank 0 holds the lock of `--save` for the whole run (output_lock.py): a second run on the same
folder is refused before it reads anything. The run resumes from the folder it saves to
(resume.py). A resume says so ("resuming from iteration N of M (PATH)"), drops the metrics records
past N that a killed run logged after its last checkpoint, and a run whose checkpoint has reached
--train-iters says it is finished, writes SAVE/training_finished.txt and exits 0.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_mmprolong import errors, runtime
from megatron_mmprolong.config import ConfigError
from megatron_mmprolong.convert.checkpoint_info import iteration_dir, resolve_checkpoint
from megatron_mmprolong.convert.mcore_checkpoint import load_mcore_checkpoint
from megatron_mmprolong.data.loader import LoaderState, PackedSequences, loader_batches, make_dataloader
from megatron_mmprolong.data.plan import Plan
from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.files import write_text_whole
from megatron_mmprolong.model.builder import build_model
from megatron_mmprolong.output_lock import lock_save_dir
from megatron_mmprolong.parallel.page_split import PageShare
from megatron_mmprolong.training import arguments as A
from megatron_mmprolong.training import preflight, signals
from megatron_mmprolong.training.checkpointing import load_checkpoint, prune_checkpoints, save_checkpoint
from megatron_mmprolong.training.flops import training_flops
from megatron_mmprolong.training.preflight import check_plan_alignment  # noqa: F401 (its former home)
from megatron_mmprolong.training.step import forward_step


class TrainingError(errors.RunFailed, RuntimeError):
    pass


METRICS = "train_metrics.jsonl"
FINISHED = "training_finished.txt"


@dataclass
class TrainResult:
    iterations: int  # the step reached
    stopped_by_signal: bool
    losses: dict[int, float]  # by iteration, on the rank that logs


def _read_inputs(args: A.TrainArgs, rt):
    """(preflight.Inputs, lock of --save or None), read by rank 0 before any model is built and
    handed to every rank (the lock stays with rank 0); when an input is bad or --save is another
    run's, rank 0 reports it and the others exit with the same status, saying nothing. Rank 0 also
    readies --save: the effective arguments, a metrics log holding no step past the one this run
    starts from, and no finished marker while there are steps to go."""
    inputs, failure, lock = None, None, None
    if rt.rank == 0:
        try:
            lock = lock_save_dir(args.save) if args.save else None
            inputs = preflight.read_inputs(args)
            preflight.check_world(args, rt.world_size)
            if args.save and not inputs.finished:
                _ready_save_dir(args, inputs.start.iteration or 0)
        except Exception as err:  # re-raised below on rank 0, as it is
            failure, inputs = err, None
            if lock is not None:
                lock.release()
    shared = [inputs, None if failure is None else errors.status(failure)]
    dist.broadcast_object_list(shared, src=0, group=runtime.host_group())
    if failure is not None:
        raise failure
    if shared[1] is not None:
        raise errors.ReportedElsewhere(shared[1])
    return shared[0], lock


def _ready_save_dir(args: A.TrainArgs, start: int) -> None:
    """SAVE/train_args.json, and SAVE/train_metrics.jsonl cut to the steps up to `start`: a run
    killed after its last checkpoint logged steps that the resumed run takes again."""
    save = Path(args.save)
    with errors.writing(save, "the training folder"):
        (save / "train_args.json").write_text(A.effective(args) + "\n")
        (save / FINISHED).unlink(missing_ok=True)  # a finished run given more --train-iters
        metrics = save / METRICS
        if metrics.is_file():
            lines = metrics.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _iteration_of(line) is not None and _iteration_of(line) <= start]
            if kept != lines:
                write_text_whole(metrics, "".join(kept))


def _mark_finished(args: A.TrainArgs, iteration: int, train_iters: int) -> None:
    """SAVE/training_finished.txt: the batch script's sign that this run is done (not to requeue).
    Left as it is when it says so already: a finished run started again touches nothing."""
    marker, text = Path(args.save) / FINISHED, f"iteration {iteration} of {train_iters}\n"
    if marker.is_file() and marker.read_text() == text:
        return
    with errors.writing(Path(args.save), "the training folder"):
        write_text_whole(marker, text)


def _iteration_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


def _step_metrics(plan: Plan, stores, config, step: int) -> tuple[int, float]:
    """(real tokens, training FLOPs) of one global step, from metadata."""
    batch = plan.config.global_batch
    start, stop = plan.pack_offsets[step * batch], plan.pack_offsets[(step + 1) * batch]
    lengths = plan.sample_tokens[start:stop]
    grids = [stores[int(d)].image_grids(int(s))
             for d, s in zip(plan.dataset_refs[start:stop], plan.sample_refs[start:stop])]
    grids = np.concatenate(grids) if grids else np.zeros((0, 3))
    return int(lengths.sum()), training_flops(config, lengths, grids)


def build_training_model(args: A.TrainArgs, config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model, the module DDP wraps) as this run trains it: built at the run's layout and
    precision for this pipeline stage, frozen as asked and, for --bf16, wrapped in Megatron's
    Float16Module. Both are the same object without --bf16. Needs `runtime.initialize`."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    model = build_model(config, A.parallel_config(args), precision=A.precision_config(args),
                        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                        **A.transformer_overrides(args))
    model.freeze(vision_encoder=args.freeze_vision, merger=args.freeze_merger)
    return model, (Float16Module(model.config, model) if args.bf16 else model)


def train(args: A.TrainArgs) -> TrainResult:
    if args.use_distributed_optimizer and not torch.cuda.is_available():
        raise ConfigError("--use-distributed-optimizer needs CUDA: Megatron-Core's DistributedOptimizer accepts "
                          "only CUDA tensors; train without it on CPU")
    stop = signals.install()  # afresh for this run (a process may train more than once)
    env = runtime.launch_env()
    try:  # the same verdict on every rank, before any process group: said once, by rank 0
        preflight.check_layout(args, env.world_size)
    except preflight.PreflightError:
        if env.rank != 0:
            raise errors.ReportedElsewhere(errors.BAD_INPUT) from None
        raise
    rt = runtime.initialize(A.parallel_config(args), seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
    stop.agree_from_now()
    stop.stop_before_start(runtime.host_group())
    inputs, lock = _read_inputs(args, rt)
    try:
        return _train(args, rt, inputs, stop)
    finally:
        if lock is not None:
            lock.release()


def _train(args: A.TrainArgs, rt, inputs: preflight.Inputs, stop: signals.StopSignals) -> TrainResult:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    host = runtime.host_group()
    start_point, plan, train_iters = inputs.start, inputs.plan, inputs.train_iters
    config = A.model_config(args, inputs.loaded)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    microbatches = args.global_batch_size // dp
    if start_point.note:
        _say(rt, start_point.note)
    if inputs.finished:
        _say(rt, f"training is finished: {start_point.checkpoint} is iteration {start_point.iteration} of "
                 f"{train_iters}; nothing to do (raise --train-iters to train further)")
        if rt.rank == 0 and args.save:
            _mark_finished(args, start_point.iteration, train_iters)
        return TrainResult(start_point.iteration, False, {})
    _say(rt, start_summary(rt, args, start_point.describe(train_iters)))

    model, wrapped = build_training_model(args, config)
    if start_point.resume is None and start_point.pretrained is not None:
        load_mcore_checkpoint(model, resolve_checkpoint(start_point.pretrained))  # weights only
    ddp = DistributedDataParallel(config=model.config, ddp_config=A.ddp_config(args), module=wrapped)
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(A.optimizer_config(args), [ddp])
    steps = A.scheduler_steps(args, train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=steps["lr_warmup_steps"],
        lr_decay_steps=steps["lr_decay_steps"], lr_decay_style=steps["lr_decay_style"],
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant",
    )
    start = 0
    if start_point.resume is not None:
        start, digest = load_checkpoint(start_point.resume, model, optimizer, scheduler)
        if digest != plan.digest():
            raise ConfigError(f"{start_point.resume} was trained on data plan {digest}, this run's plan is {plan.digest()}")
    stop.stop_before_start(host)  # a signal while the model was built and loaded: nothing to save yet

    _start_helper_processes(loader_workers=args.num_workers > 0, checkpoint_writer=bool(args.save))
    dataset = PackedSequences(plan, rank=dp_rank, data_parallel=dp, image_backend=args.image_backend,
                              share=PageShare.of_this_rank())
    loader = make_dataloader(dataset, LoaderState(plan.digest(), dp_rank, dp, start * microbatches), args.num_workers,
                             prefetch_bytes=int(args.loader_prefetch_gib * 2**30))
    with loader_batches(loader) as batches:
        stores = [MultimodalStore(p) for p in plan.datasets]
        logger = _Logger(args, rt, plan)
        forward_backward = get_forward_backward_func()
        losses: dict[int, float] = {}
        iteration = start
        stopped = False
        step_s = save_s = 0.0
        while iteration < train_iters:
            began = time.perf_counter()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            outputs = forward_backward(forward_step_func=forward_step, data_iterator=batches, model=[ddp],
                                       num_microbatches=microbatches, seq_length=args.seq_length,
                                       micro_batch_size=1, forward_only=False)
            updated, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            iteration += 1
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise TrainingError(f"iteration {iteration}: gradient norm is {grad_norm}; stopping "
                                    "(lower --lr, check the data, or resume from the last checkpoint)")
            loss = _global_loss(outputs, ps, host)
            if not math.isfinite(loss):
                raise TrainingError(f"iteration {iteration}: loss is {loss}; stopping")
            losses[iteration] = loss
            tokens, flops = _step_metrics(plan, stores, config, iteration - 1)
            step_s = time.perf_counter() - began
            logger.step(iteration, train_iters, loss, optimizer.param_groups[0]["lr"], grad_norm, tokens, flops, step_s)
            stopped = stop.any_rank(logger.failed is not None, group=host)
            if stop.failed:
                raise (logger.failed if logger.failed is not None else errors.ReportedElsewhere(errors.RUN_FAILED))
            periodic = args.save_interval and iteration % args.save_interval == 0
            if args.save and (periodic or stopped or iteration == train_iters):
                saving = time.perf_counter()
                save_checkpoint(args.save, iteration, model, optimizer, scheduler, args, config, plan.digest())
                save_s = time.perf_counter() - saving
                logger.line(f"saved checkpoint {iteration_dir(args.save, iteration)} in {save_s:.1f} s")
                if rt.rank == 0 and args.keep_last:
                    for removed in prune_checkpoints(args.save, args.keep_last):
                        logger.line(f"removed checkpoint {removed} (--keep-last {args.keep_last})")
            if stopped:
                saved = (f"saved iteration {iteration} (the save took {save_s:.1f} s)" if args.save
                         else "nothing saved (no --save)")
                logger.line(f"stopping after iteration {iteration} on {stop.name}: {saved}; the last step took "
                            f"{step_s:.2f} s; {stop.seconds_since():.1f} s from the signal to here")
                break
        if rt.rank == 0 and args.save and iteration == train_iters:
            _mark_finished(args, iteration, train_iters)
        logger.close()
    return TrainResult(iteration, stopped, losses)


def build_optimizer(optimizer_config, model_chunks):
    """Megatron-Core's optimizer over `model_chunks`, without the gloo data-parallel groups that
    runtime.initialize does not create (megatron-core's default asks for them)."""
    import inspect

    from megatron.core.optimizer import get_megatron_optimizer

    options = ({"use_gloo_process_groups": False}
               if "use_gloo_process_groups" in inspect.signature(get_megatron_optimizer).parameters else {})
    return get_megatron_optimizer(optimizer_config, model_chunks, **options)


def start_summary(rt, args: A.TrainArgs, where: str) -> str:
    """One line at the start of each run: the job, its nodes and layout, and where it starts.
    A collective (every rank's host name)."""
    hosts = [None] * rt.world_size
    dist.all_gather_object(hosts, socket.gethostname(), group=runtime.host_group())
    p = rt.parallel
    dp = rt.world_size // (p.tensor_parallel * p.context_parallel * p.pipeline_parallel)
    job = os.environ.get("SLURM_JOB_ID")
    run = f"Slurm job {job} run {int(os.environ.get('SLURM_RESTART_COUNT', 0)) + 1}: " if job else ""
    nodes = sorted(set(hosts))
    names = ", ".join(nodes[:4]) + (f", ... {nodes[-1]}" if len(nodes) > 4 else "")
    return (f"{run}{len(nodes)} node{'s' if len(nodes) > 1 else ''} ({names}), {rt.world_size} rank{'s' if rt.world_size > 1 else ''} "
            f"({rt.launcher}, {rt.device.type}): TP{p.tensor_parallel} x CP{p.context_parallel} x "
            f"PP{p.pipeline_parallel} x DP{dp}; {where}")


def _start_helper_processes(loader_workers: bool, checkpoint_writer: bool) -> None:
    """Start, with the stop signals ignored, the long-lived helper processes a run would otherwise
    start with Slurm's stop signal fatal to them (it reaches every process of a task):
    - multiprocessing's resource tracker (the loader's spawned workers use it), which ignores only
      SIGINT and SIGTERM: SIGUSR1 killed it, the next use started one that knew none of the
      workers' semaphores, and each unlink at exit printed a KeyError traceback into the job log;
    - the Manager process through which Megatron's checkpoint writer returns its results, spawned
      at the first save and ignoring nothing: a stop signal after a periodic save killed it, and
      the save that followed the signal failed on that rank (BrokenPipeError) while the other
      ranks waited for it in the save's collectives."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # megatron-core 0.16: _get_write_results_queue(); 0.19: get_write_results_queue(mp_mode)
    writer_queue = (getattr(filesystem_async, "get_write_results_queue", None)
                    or getattr(filesystem_async, "_get_write_results_queue", None))
    with signals.ignored_by_helper_processes():
        if loader_workers:
            resource_tracker.ensure_running()
        if checkpoint_writer and writer_queue is not None:
            writer_queue()


def _say(rt, text: str) -> None:
    if rt.rank == 0:
        print(text, flush=True)


def _global_loss(outputs, ps, group) -> float:
    """Loss per loss token over all data- and context-parallel ranks (counted once per TP group)."""
    owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    totals = torch.zeros(2, dtype=torch.float64)
    if owner:
        for out in outputs:
            totals += out["lm loss"].detach().cpu().double()
    dist.all_reduce(totals, group=group)
    return float(totals[0] / totals[1].clamp(min=1))


def tensorboard_run_dir(args: A.TrainArgs) -> Path:
    """This run's TensorBoard folder under --tensorboard-dir: named after --save (and a digest of
    its full path, so that two runs whose folders share a name do not share events), or after the
    start time and process where nothing is saved. A recipe's one --tensorboard-dir thus holds one
    subfolder per run, side by side in TensorBoard; a resumed run appends to its own."""
    import hashlib

    if args.save:
        save = Path(args.save).resolve()
        return Path(args.tensorboard_dir) / f"{save.name}-{hashlib.sha1(str(save).encode()).hexdigest()[:8]}"
    return Path(args.tensorboard_dir) / time.strftime(f"unsaved-%Y%m%d-%H%M%S-{os.getpid()}")


class _Logger:
    """One line per --log-interval steps and TensorBoard scalars, on rank 0; every step's metrics
    in SAVE/train_metrics.jsonl."""

    def __init__(self, args: A.TrainArgs, rt, plan: Plan):
        self.args, self.world = args, rt.world_size
        self.main = rt.rank == 0
        self.failed: errors.OutputError | None = None  # a metrics write the disk refused (rank 0)
        self.metrics_path = Path(args.save) / METRICS if args.save else None
        self.metrics = open(self.metrics_path, "a") if self.main and args.save else None
        self.writer = None
        if self.main and args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(tensorboard_run_dir(args))
            self.line(f"TensorBoard events in {tensorboard_run_dir(args)}")
        if self.main:
            self.line(f"effective configuration:\n{A.effective(args)}")
            self.line(f"data plan {plan.digest()}: {plan.steps} steps, {plan.summary.get('tokens', 0):,} tokens, "
                      f"packing efficiency {plan.summary.get('packing_efficiency')}")

    def line(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def step(self, iteration, total, loss, lr, grad_norm, tokens, flops, seconds) -> None:
        if not self.main:
            return
        memory = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        record = {"iteration": iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / seconds, "tflops_per_gpu": flops / seconds / self.world / 1e12,
                  "memory_gib": memory, "seconds": seconds}
        if self.metrics and self.failed is None:
            try:
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()
            except OSError as err:  # stop every rank at this step's agreement, in one line
                self.failed = errors.output_error(err, self.metrics_path, "the metrics log",
                                                  f"stopped after iteration {iteration}; no checkpoint was saved for it")
                if self.failed is None:
                    raise
        if self.writer:
            for key, value in record.items():
                if key != "iteration" and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, iteration)
        if iteration % self.args.log_interval == 0 or iteration == total:
            self.line(f"iteration {iteration:>6}/{total} | loss {loss:.6f} | lr {lr:.3e} | grad norm "
                      f"{grad_norm if grad_norm is None else f'{grad_norm:.3f}'} | {record['tokens_per_s']:,.0f} tokens/s | "
                      f"{record['tflops_per_gpu']:.2f} TFLOP/s/GPU | {memory:.1f} GiB | {seconds:.2f} s")

    def close(self) -> None:
        if self.metrics:
            try:
                self.metrics.close()
            except OSError:
                pass  # a refused write was reported already
        if self.writer:
            self.writer.close()
