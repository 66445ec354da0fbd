"""Process groups, device choice and seeds.

One entry point, `initialize`, for every launcher: torchrun (RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT), srun (SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID/SLURM_JOB_NODELIST) or a
plain `python` (one process; also a batch script's own process, which has SLURM_PROCID but is no
srun step). NCCL on GPUs, gloo plus the CPU shims without CUDA.

Process groups on GPUs: the default (world) group is `cpu:gloo,cuda:nccl`; its gloo half is the one
group for host-side collectives (`host_group`: stop flags, the logged loss, checkpoint agreement,
object broadcasts). Every other group (Megatron's TP/CP/PP/DP/... groups, the vision TP groups) is
NCCL only: a group created without a backend inherits the default's, and each gloo half opens a
full mesh of sockets at creation (132 sockets per rank at 16 ranks, ~3,400 predicted at 512), so
start-up failed under a 1,024 open-files limit. Megatron's own gloo data-parallel groups are not
created either: this project's checkpoint format (fully_sharded_model_space) does not use them.
Without CUDA everything is gloo, as the model's collectives need.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
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


def raise_open_files_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (sockets, the loader's files and shared memory of a
    large job); returns (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # a hard limit the kernel will not grant (above nr_open): keep the soft one
    return soft, hard


def open_sockets() -> int:
    """Sockets this process holds (Linux's /proc): what each gloo group's full mesh costs a rank."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def group_backends(use_cuda: bool, device_backend: str | None = None) -> tuple[str, str]:
    """(the default group's backend, every other group's). `device_backend` stands in for NCCL
    (tests and benchmarks on machines without it use torch's "fake" backend)."""
    if not use_cuda and device_backend is None:
        return "gloo", "gloo"
    device = device_backend or "nccl"
    return f"cpu:gloo,cuda:{device}", device


@contextlib.contextmanager
def _megatron_groups_on(backend: str):
    """Megatron-Core creates its groups without naming a backend (they would inherit the default
    group's gloo half): name `backend` for each, for the duration of its initialisation."""
    from megatron.core import parallel_state

    original = getattr(parallel_state, "create_group", None)
    if original is None:  # a megatron-core without it: its groups inherit the default backend
        yield
        return

    def create_group(*args, **kwargs):
        if len(args) < 3 and kwargs.get("backend") is None:
            kwargs["backend"] = backend
        return original(*args, **kwargs)

    parallel_state.create_group = create_group
    try:
        yield
    finally:
        parallel_state.create_group = original


def host_group():
    """The group for collectives of host (CPU) tensors and objects: the world group, whose gloo
    half carries them (see the module docstring)."""
    return dist.group.WORLD


def initialize(
    parallel: ParallelConfig = ParallelConfig(),
    seed: int = 1234,
    timeout_minutes: float = 30,
    environ: dict[str, str] | None = None,
    device_backend: str | None = None,
) -> Runtime:
    """Start the process group (if needed), Megatron-Core's model-parallel groups and seeds.
    `timeout_minutes` bounds every collective (a hung or dead rank fails the run after it)."""
    import inspect

    from megatron.core import parallel_state

    raise_open_files_limit()
    env = launch_env(environ)
    device = select_device(env)
    default_backend, group_backend = group_backends(device.type == "cuda", device_backend)

    if not dist.is_initialized():
        dist.init_process_group(
            backend=default_backend,
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
    options = {}
    if "create_gloo_process_groups" in inspect.signature(parallel_state.initialize_model_parallel).parameters:
        options["create_gloo_process_groups"] = False
    with _megatron_groups_on(group_backend):
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
            context_parallel_size=parallel.context_parallel,
            # cp_comm_type a2a+p2p: Transformer Engine takes its a2a and p2p groups from these
            hierarchical_context_parallel_sizes=list(parallel.hierarchical_context_parallel_sizes or ()) or None,
            distributed_timeout_minutes=timeout_minutes,
            **options,
        )
    _create_vision_tensor_parallel_group(parallel, group_backend)
    set_seed(seed)
    return Runtime(device=device, rank=dist.get_rank(), world_size=world_size, parallel=parallel,
                   launcher=env.launcher)


_VISION_TP_GROUP = None


def _create_vision_tensor_parallel_group(parallel: ParallelConfig, backend: str) -> None:
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
        group = dist.new_group(list(range(start, start + vtp)), backend=backend)
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
