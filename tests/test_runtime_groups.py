"""Process groups and limits of runtime.initialize (issue 32).

This machine's torch has no NCCL; torch's "fake" backend stands in for it (a backend that opens no
socket, as NCCL opens none of gloo's), so the GPU layout of groups is built and counted here: the
world group `cpu:gloo,cuda:fake` and every Megatron group on the device backend only. Counting the
process's sockets (/proc/self/fd) shows what a gloo half on each group cost."""

import resource
import subprocess
import sys
import time

import pytest

from megatron_mmprolong import runtime
from megatron_mmprolong.config import ParallelConfig

from multiprocess import run_ranks


def _groups_of_a_gpu_run(layout: dict):
    import torch
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 (registers the "fake" backend)
    from megatron.core import parallel_state as ps

    env = runtime.launch_env()
    world, group_backend = runtime.group_backends(True, "fake")
    dist.init_process_group(world, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size)
    world_only = runtime.open_sockets()
    runtime.initialize(ParallelConfig(**layout), device_backend="fake")
    groups = [g for g in ps._global_process_group_list if g is not None]
    backends = {str(dist.get_backend(g)) for g in groups}
    vision = str(dist.get_backend(runtime.vision_tensor_parallel_group()))
    flag = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(flag, group=runtime.host_group())  # a host tensor, on the world group's gloo half
    return dict(world_only=world_only, after=runtime.open_sockets(), groups=len(groups), backends=backends, vision=vision,
                sum=int(flag), gloo_dp=ps._DATA_PARALLEL_GROUP_GLOO)


def test_megatron_groups_on_the_device_backend_open_no_socket():
    results = run_ranks(_groups_of_a_gpu_run, 2, dict(tensor_parallel=2, vision_tensor_parallel=1))
    for r in results:
        assert r["groups"] >= 8 and r["backends"] == {"fake"} and r["vision"] == "fake"
        assert r["after"] <= r["world_only"]  # TP, CP, DP, PP, MP, ... groups: not one more socket
        assert r["sum"] == 1 + 2 and r["gloo_dp"] is None


def _cpu_run():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    env = runtime.launch_env()
    dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size)
    world_only = runtime.open_sockets()
    runtime.initialize(ParallelConfig(tensor_parallel=2))
    groups = [g for g in ps._global_process_group_list if g is not None]
    return dict(world_only=world_only, after=runtime.open_sockets(), backends={str(dist.get_backend(g)) for g in groups})


def test_without_cuda_every_group_is_gloo_and_the_count_sees_them():
    """The CPU path is unchanged (the model's collectives need gloo), and the socket count used
    above does see groups that open sockets."""
    for r in run_ranks(_cpu_run, 2):
        assert r["backends"] == {"gloo"} and r["after"] > r["world_only"]


def test_group_backends():
    assert runtime.group_backends(True) == ("cpu:gloo,cuda:nccl", "nccl")
    assert runtime.group_backends(False) == ("gloo", "gloo")


def _collective_past_its_timeout():
    import torch
    import torch.distributed as dist

    runtime.initialize(timeout_minutes=0.05)  # 3 s
    if dist.get_rank() == 1:
        time.sleep(6)  # a hung rank
        return None
    began = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=runtime.host_group())
    except Exception as err:  # gloo's timeout
        return time.monotonic() - began, str(err)
    return time.monotonic() - began, "no error"


def test_the_distributed_timeout_bounds_a_collective():
    waited, error = run_ranks(_collective_past_its_timeout, 2)[0]
    assert waited < 15 and "no error" not in error, (waited, error)


def test_train_passes_distributed_timeout_minutes_to_the_process_group(monkeypatch, tmp_path):
    from megatron_mmprolong.training import loop
    from megatron_mmprolong.training.arguments import parse_args

    seen = {}

    class Reached(Exception):
        pass

    def initialize(parallel, seed, timeout_minutes):
        seen["timeout"] = timeout_minutes
        raise Reached

    monkeypatch.setattr(loop.runtime, "initialize", initialize)
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Reached):
        loop.train(parse_args(["--data-mix", "m.yaml", "--global-batch-size", "1",
                               "--distributed-timeout-minutes", "7.5"]))
    assert seen["timeout"] == 7.5


def test_the_open_files_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    code = ("import resource; from megatron_mmprolong.runtime import raise_open_files_limit; "
            "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))).stdout
    assert out.split() [-2:] == [f"({hard},", f"{hard})"], out
