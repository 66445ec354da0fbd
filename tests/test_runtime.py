import pytest

from megatron_mmprolong.runtime import first_host, launch_env


def test_torchrun_environment():
    env = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "n1", 1234, "torchrun",
    )


def test_slurm_environment_derives_master_from_the_node_list():
    env = launch_env({
        "SLURM_PROCID": "9", "SLURM_NTASKS": "32", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0",
    })
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (9, 16, 1, "gpu007", "slurm")
    assert env.master_port == 20000 + 123456 % 40000


def test_torchrun_variables_win_over_slurm_ones():
    env = launch_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"})
    assert env.launcher == "torchrun" and env.world_size == 2


def test_single_process_without_launcher():
    env = launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0


def test_a_batch_script_process_is_no_srun_step():
    """A batch script of an 8-task job runs one process: it must not wait for 7 more ranks."""
    env = launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[001-002]"})
    assert (env.world_size, env.launcher) == (1, "single")


@pytest.mark.parametrize(
    "nodelist, host",
    [("node01", "node01"), ("gpu[007-009,012]", "gpu007"), ("a[3,5],b1", "a3"), ("c-1-[10-11]", "c-1-10"), ("x1,x2", "x1")],
)
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_without_node_list_is_an_error():
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST"):
        launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})


# One GPU per task (srun --gpus-per-task=1): every task sees only device 0, whatever its local rank.
@pytest.mark.parametrize("local_rank, count, index", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (7, 4, 3)])
def test_cuda_device_index_wraps_local_rank_to_the_visible_devices(local_rank, count, index):
    from megatron_mmprolong.runtime import cuda_device_index

    assert cuda_device_index(local_rank, count) == index


def test_select_device_binds_a_one_gpu_task_to_its_only_device(monkeypatch):
    import torch

    from megatron_mmprolong import runtime

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.append(index))
    env = launch_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "3",
                      "SLURM_JOB_NODELIST": "gpu001"})
    device = runtime.select_device(env)
    assert chosen == [0] and device == torch.device("cuda", 0)


def test_select_device_without_cuda_is_the_cpu(monkeypatch):
    import torch

    from megatron_mmprolong import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime.cpu_shims, "apply", lambda: None)
    assert runtime.select_device(launch_env({})) == torch.device("cpu")
