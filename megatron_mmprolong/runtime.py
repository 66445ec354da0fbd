"""Process groups, device choice and seeds.

One entry point, `initialize`, for every launcher: torchrun (RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT), srun (SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID/SLURM_JOB_NODELIST) or a
plain `python` (one process; also a batch script's own process, which has SLURM_PROCID but is no
srun step). NCCL on GPUs, gloo plus the CPU shims without CUDA.
"""

from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_mmprolong import cpu_shims
from megatron_mmprolong.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist and "MASTER_ADDR" not in env:
            raise RuntimeError("SLURM launch without SLURM_JOB_NODELIST or MASTER_ADDR")
        job_id = int(env.get("SLURM_JOB_ID", 0))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            # Same port on every task of the job, different for jobs sharing a node.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 40000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[007-009,012],cpu1' -> 'gpu007'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a local rank. Where Slurm binds one GPU per task (--gpus-per-task=1) every
    task sees only device 0 whatever its SLURM_LOCALID; with all GPUs visible this is the local rank."""
    if device_count < 1:
        raise RuntimeError("CUDA is available but no device is visible (CUDA_VISIBLE_DEVICES?)")
    return local_rank % device_count


def select_device(env: LaunchEnv) -> torch.device:
    """Bind this process to its GPU, or to the CPU (plus the CPU shims) without CUDA."""
    if torch.cuda.is_available():
        index = cuda_device_index(env.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    cpu_shims.apply()
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    parallel: ParallelConfig
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def initialize(
    parallel: ParallelConfig = ParallelConfig(),
    seed: int = 1234,
    timeout_minutes: int = 30,
    environ: dict[str, str] | None = None,
) -> Runtime:
    """Start the process group (if needed), Megatron-Core's model-parallel groups and seeds."""
    from megatron.core import parallel_state

    env = launch_env(environ)
    device = select_device(env)
    use_cuda = device.type == "cuda"

    if not dist.is_initialized():
        dist.init_process_group(
            # gloo beside NCCL: host-side flags (exit signals, logged loss) reduce without a device copy.
            backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    world_size = dist.get_world_size()
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel * parallel.context_parallel
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not a multiple of TP x PP x CP = {model_parallel}: start "
            f"a multiple of {model_parallel} ranks (torchrun --nproc-per-node) or lower the parallel sizes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        # cp_comm_type a2a+p2p: Transformer Engine takes its a2a and p2p groups from these
        hierarchical_context_parallel_sizes=list(parallel.hierarchical_context_parallel_sizes or ()) or None,
        distributed_timeout_minutes=timeout_minutes,
    )
    _create_vision_tensor_parallel_group(parallel)
    set_seed(seed)
    return Runtime(device=device, rank=dist.get_rank(), world_size=world_size, parallel=parallel,
                   launcher=env.launcher)


_VISION_TP_GROUP = None


def _create_vision_tensor_parallel_group(parallel: ParallelConfig) -> None:
    """Vision TP divides LM TP: each TP group (consecutive ranks: TP is Megatron's innermost
    dimension) splits into TP/vision-TP subgroups that encode the same images."""
    global _VISION_TP_GROUP
    from megatron.core import parallel_state

    tp, vtp = parallel.tensor_parallel, parallel.vision_tp
    if vtp == tp:
        _VISION_TP_GROUP = parallel_state.get_tensor_model_parallel_group()
        return
    rank = dist.get_rank()
    for start in range(0, dist.get_world_size(), vtp):
        group = dist.new_group(list(range(start, start + vtp)))
        if start <= rank < start + vtp:
            _VISION_TP_GROUP = group


def vision_tensor_parallel_group():
    if _VISION_TP_GROUP is None:
        raise RuntimeError("runtime.initialize() has not run")
    return _VISION_TP_GROUP


def set_seed(seed: int) -> None:
    """Python, NumPy and torch seeds plus Megatron's tensor-parallel RNG tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_shims.seed_rng_tracker(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    global _VISION_TP_GROUP
    _VISION_TP_GROUP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
