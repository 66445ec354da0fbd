"""`mmprolong train --preflight-world-size N` (issue 32): one process, the same arguments parsed as
train parses them, checks that N ranks fit (TP x CP x PP, the global batch over DP, the model, the
data plan, the resume point, the --save lock) and answers in one line: exit 0 when it fits, 2 when
not, before any rank starts. And the --save lock of a Slurm job names the job and host."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mmprolong.training import arguments as A
from megatron_mmprolong.training.preflight import PreflightError, check_world

EXAMPLES = Path(__file__).parents[1] / "examples"


def _args(*argv):
    return A.parse_args(["--data-mix", "mix.yaml", *map(str, argv)])


@pytest.mark.parametrize("world, dp", [(8, 1), (16, 2), (64, 8), (256, 32)])
def test_world_sizes_that_fit_the_recipe_layout(world, dp):
    recipe = _args("--tensor-model-parallel-size", 2, "--context-parallel-size", 4, "--global-batch-size", 32)
    assert check_world(recipe, world) == dp


@pytest.mark.parametrize("world, reason", [
    (12, "world size 12 is not a multiple of TP x PP x CP = 8 (TP2 x CP4 x PP1)"),
    (24, "--global-batch-size 32 does not divide over the 3 data-parallel replicas of 24 ranks at TP2 x CP4 x PP1"),
    (384, "--global-batch-size 32 does not divide over the 48 data-parallel replicas"),
])
def test_world_sizes_that_do_not_fit_are_refused_listing_those_that_do(world, reason):
    recipe = _args("--tensor-model-parallel-size", 2, "--context-parallel-size", 4, "--global-batch-size", 32)
    with pytest.raises(PreflightError) as refused:
        check_world(recipe, world)
    message = str(refused.value)
    assert reason in message and message.endswith("8, 16, 32, 64, 128, 256") and "\n" not in message


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "SLURM_JOB_ID"):
        env.pop(name, None)
    env.update(extra)
    return env


def _argv(mix, save, world, *extra):
    return ["--config", str(EXAMPLES / "cpu_tiny.yaml"), "--data-mix", str(mix), "--seq-length", "2048",
            "--save", str(save), "--tensor-model-parallel-size", "2", "--preflight-world-size", str(world), *extra]


def _preflight_here(capsys, mix, save, world, *extra):
    """train's main in this process: (exit status, stdout, stderr)."""
    from megatron_mmprolong.train import main

    status = main(_argv(mix, save, world, *extra))
    out, err = capsys.readouterr()
    return status, out, err


def test_preflight_of_the_cpu_recipe_in_one_process(tiny_train_data, tmp_path, capsys, keeps_runtime):
    *_, mix = tiny_train_data
    save = tmp_path / "run"
    fits = subprocess.run([sys.executable, "-m", "megatron_mmprolong.train", *_argv(mix, save, 4)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert fits.stdout.startswith("mmprolong train: pre-flight: 4 ranks fit: TP2 x CP1 x PP1 x DP2, 1 micro-batches "
                                  "per replica per step; data plan ")
    assert "starting at iteration 0 of 30 from random weights" in fits.stdout
    assert not save.exists()  # a check: nothing written, no lock taken

    for world, reason in [(3, "world size 3 is not a multiple of TP x PP x CP = 2"),
                          (8, "--global-batch-size 2 does not divide over the 4 data-parallel replicas")]:
        status, out, err = _preflight_here(capsys, mix, save, world)
        assert status == 2 and out == "" and len(err.splitlines()) == 1
        assert err.startswith("mmprolong train: error: ") and reason in err

    # the plan is checked too: a run longer than its data
    status, out, err = _preflight_here(capsys, mix, save, 2, "--train-iters", "100000")
    assert status == 2 and "exceeds the" in err and len(err.splitlines()) == 1
    assert not save.exists()


def _hold(save: Path, job: str, ready: Path) -> subprocess.Popen:
    script = (f"from megatron_mmprolong.output_lock import lock_save_dir\nlock = lock_save_dir({str(save)!r})\n"
              f"open({str(ready)!r}, 'w').close()\nimport time\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script], env=_env(SLURM_JOB_ID=job), stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.05)
    return process


def test_the_save_lock_of_a_slurm_job_names_its_job_and_host(tiny_train_data, tmp_path, capsys, keeps_runtime):
    """A second job on a --save is refused by the lock itself and, earlier, by the pre-flight
    (before srun), naming the holder's Slurm job id and host; the same job's requeued run is not."""
    from megatron_mmprolong.output_lock import OutputLocked, lock_save_dir

    *_, mix = tiny_train_data
    save = tmp_path / "run"
    holder = _hold(save, "4242", tmp_path / "ready")
    try:
        os.environ["SLURM_JOB_ID"] = "5151"
        try:
            with pytest.raises(OutputLocked) as refused:
                lock_save_dir(save)
        finally:
            del os.environ["SLURM_JOB_ID"]
        named = f"pid {holder.pid} on host {socket.gethostname()}, Slurm job 4242"
        assert named in str(refused.value)
        os.environ["SLURM_JOB_ID"] = "5151"
        try:
            status, _, err = _preflight_here(capsys, mix, save, 2)
            assert status == 2 and named in err and len(err.splitlines()) == 1
            os.environ["SLURM_JOB_ID"] = "4242"  # this job's requeued run: train waits for its predecessor
            status, out, err = _preflight_here(capsys, mix, save, 2)
            assert status == 0 and "2 ranks fit" in out, err[-2000:]
        finally:
            del os.environ["SLURM_JOB_ID"]
    finally:
        holder.kill()
        holder.wait()
