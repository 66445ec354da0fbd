"""End to end on CPU: the tiny recipe's loss falls; SIGTERM saves and exits 0; resuming (from
--save) continues with exactly the losses an uninterrupted run has (at TP2 under torchrun, the
launcher of real runs; tests/test_slurm.py does the same through srun and a requeue)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multiprocess import free_port

EXAMPLES = Path(__file__).parents[1] / "examples"
TP2_CP2 = ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"]


def _command(ranks, mix, save, *extra):
    args = ["--config", str(EXAMPLES / "cpu_tiny.yaml"), "--data-mix", str(mix), "--seq-length", "2048",
            "--save", str(save), "--log-interval", "1", "--num-workers", "1", *extra]
    if ranks == 1:
        return [sys.executable, "-m", "megatron_mmprolong.train", *args]
    port = free_port()
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-port", str(port), "-m", "megatron_mmprolong.train", *args]


def _launch_command(ranks, mix, save, *extra):
    """`python -m megatron_mmprolong.launch` (torchrun that exits 0 when a stop signal's save worked)."""
    command = _command(ranks, mix, save, *extra)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    return [command[0], "-m", "megatron_mmprolong.launch", *command[3:]]


def _losses(save) -> dict[int, float]:
    lines = (Path(save) / "train_metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["loss"] for r in map(json.loads, lines)}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_loss_falls(tiny_train_data, tmp_path):
    *_, mix = tiny_train_data
    subprocess.run(_command(1, mix, tmp_path / "run", "--train-iters", "24"), check=True, env=_env(),
                   stdout=subprocess.DEVNULL)
    losses = list(_losses(tmp_path / "run").values())
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "24"
    assert (tmp_path / "run" / "training_finished.txt").read_text() == "iteration 24 of 24\n"  # the batch script's sign
    info = json.loads((tmp_path / "run" / "iter_0000024" / "mmprolong_checkpoint.json").read_text())
    assert len(info["plan_digest"]) == 16  # a resume checks it before building anything


def test_an_error_during_training_exits_with_the_loader_workers_running(tiny_train_data, tmp_path):
    """The loader workers ignore SIGTERM (Slurm's stop signal): an exception in a step must still
    stop them, or the interpreter's exit handler joins them forever and the job hangs."""
    *_, mix = tiny_train_data
    module, *args = _command(1, mix, tmp_path / "run", "--train-iters", "3")[2:]
    fail_in_the_first_step = ("import sys, megatron_mmprolong.training.loop as loop\n"
                              "def fail(*args): raise RuntimeError('injected failure')\n"
                              "loop._step_metrics = fail\n"
                              "from megatron_mmprolong.train import main\n"
                              "sys.exit(main(sys.argv[1:]))")
    assert module == "megatron_mmprolong.train"
    run = subprocess.run([sys.executable, "-c", fail_in_the_first_step, *args], env=_env(), capture_output=True,
                         text=True, timeout=240)
    assert run.returncode != 0 and "injected failure" in run.stderr
    assert f"rank 0 of 1 on host {socket.gethostname()} failed: RuntimeError: injected failure" in run.stderr


def _workers(process):
    """The processes running the training ranks: torchrun's children."""
    import psutil

    return [p for p in psutil.Process(process.pid).children(recursive=True)
            if "megatron_mmprolong.train" in " ".join(p.cmdline()) and "torch.distributed.run" not in " ".join(p.cmdline())]


def test_sigterm_then_resume_is_bit_exact(tiny_train_data, tmp_path):
    *_, mix = tiny_train_data
    ranks, layout = 2, ["--tensor-model-parallel-size", "2"]
    iterations = ["--train-iters", "10"]
    subprocess.run(_command(ranks, mix, tmp_path / "straight", *iterations, *layout), check=True, env=_env(),
                   stdout=subprocess.DEVNULL)
    expected = _losses(tmp_path / "straight")

    save = tmp_path / "interrupted"
    process = subprocess.Popen(_command(ranks, mix, save, *iterations, *layout), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = save / "train_metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    workers = _workers(process)
    assert len(workers) == ranks
    for worker in workers:  # as Slurm signals every task before the time limit
        worker.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]
    stopped_at = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped_at < 10

    assert not (save / "training_finished.txt").exists()  # stopped, not finished: the batch script requeues
    subprocess.run(_command(ranks, mix, save, *iterations, *layout), check=True, env=_env(),
                   stdout=subprocess.DEVNULL)  # --save alone: the run resumes from the folder it saves to
    assert _losses(save) == expected  # every step, bit for bit


def test_a_resume_says_so_logs_each_step_once_and_a_finished_run_says_it_is_finished(tiny_train_data, tmp_path):
    """A run killed after its last checkpoint logged steps past it: the resumed run says where it
    starts, takes those steps again and keeps one metrics record per step; started once more, the
    finished run says so and exits 0 without touching anything."""
    import shutil

    *_, mix = tiny_train_data
    save = tmp_path / "run"
    four = ["--train-iters", "4", "--save-interval", "2"]
    subprocess.run(_command(1, mix, save, *four), check=True, env=_env(), stdout=subprocess.DEVNULL)
    expected = _losses(save)
    shutil.rmtree(save / "iter_0000004")  # as if killed after step 4 was logged, before its save completed
    (save / "latest_checkpointed_iteration.txt").write_text("2\n")

    resumed = subprocess.run(_command(1, mix, save, *four, "--load", str(save)), env=_env(), capture_output=True,
                             text=True, check=True)
    assert f"resuming from iteration 2 of 4 ({save / 'iter_0000002'})" in resumed.stdout
    summary = next(line for line in resumed.stdout.splitlines() if "resuming from" in line)
    assert summary.startswith(f"1 node ({socket.gethostname()}), 1 rank (single, cpu): TP1 x CP1 x PP1 x DP1; ")
    records = [json.loads(line)["iteration"] for line in (save / "train_metrics.jsonl").read_text().splitlines()]
    assert records == [1, 2, 3, 4]
    assert _losses(save) == expected

    before = {p: p.stat().st_mtime_ns for p in save.rglob("*")}
    again = subprocess.run(_command(1, mix, save, *four, "--load", str(save)), env=_env(), capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"training is finished: {save / 'iter_0000004'} is iteration 4 of 4; nothing to do" in again.stdout
    assert "Traceback" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in save.rglob("*")} == before


def test_sigterm_to_the_launcher_saves_and_exits_0_without_a_traceback(tiny_train_data, tmp_path):
    """SIGTERM to the launcher (not to the ranks): torchrun's agent forwards it to the ranks, which
    save and exit 0, then re-raises it as SignalException (traceback, exit 1) and kills ranks still
    saving after 30 s. `megatron_mmprolong.launch` waits for them and exits with their verdict."""
    *_, mix = tiny_train_data
    save = tmp_path / "run"
    process = subprocess.Popen(_launch_command(2, mix, save, "--train-iters", "30"), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = save / "train_metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err
    assert "mmprolong launch: SIGTERM: every rank stopped and exited 0 (2 on this node)" in err
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped < 30
    assert f"stopping after iteration {stopped} on SIGTERM" in out


def test_sigusr1_to_the_whole_process_group_stops_cleanly(tiny_train_data, tmp_path):
    """Slurm's srun delivers a signal to every process of a task (its process group): the loader
    workers ignore it, and so must multiprocessing's resource tracker, which SIGUSR1 used to kill
    (each semaphore then printed a KeyError traceback at exit), and the Manager process of
    Megatron's checkpoint writer, started by the periodic save before the signal: it died, and the
    save after the signal failed with BrokenPipeError (on several ranks, a hang)."""
    *_, mix = tiny_train_data
    save = tmp_path / "run"
    process = subprocess.Popen(_command(1, mix, save, "--train-iters", "30", "--save-interval", "2"), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (save / "latest_checkpointed_iteration.txt").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGUSR1)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "resource_tracker" not in err, err[-3000:]
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    # the figures that size Slurm's --signal lead time and KillWait
    assert f"stopping after iteration {stopped} on SIGUSR1: saved iteration {stopped} (the save took " in out
    assert "); the last step took " in out and " s from the signal to here" in out
    assert not (save / "training_finished.txt").exists()


def test_training_starts_from_a_converted_hf_checkpoint(tiny_train_data, tmp_path):
    """--pretrained-checkpoint (a converted checkpoint) gives the model its weights: a step at learning rate 0
    saves them unchanged, and the export equals the original HF checkpoint bit for bit."""
    from safetensors.torch import load_file

    from megatron_mmprolong.config import ParallelConfig, Qwen25VLConfig
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.mcore_to_hf import mcore_to_hf
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    *_, mix = tiny_train_data
    write_random_hf_checkpoint(Qwen25VLConfig.preset("tiny-1k"), tmp_path / "hf", seed=5)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", ParallelConfig(tensor_parallel=2), progress=False)
    subprocess.run(_command(2, mix, tmp_path / "run", "--train-iters", "1", "--lr", "0", "--min-lr", "0",
                            "--tensor-model-parallel-size", "2", "--pretrained-checkpoint", str(tmp_path / "mcore")),
                   check=True, env=_env(), stdout=subprocess.DEVNULL)
    mcore_to_hf(tmp_path / "run" / "iter_0000001", tmp_path / "export", progress=False)
    original, exported = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                          for d in (tmp_path / "hf", tmp_path / "export"))
    assert set(exported) == set(original)
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())


def test_tp2cp2_losses_equal_the_recorded_reference(tiny_train_data, tmp_path):
    """The first 5 losses of a TP2 x CP2 run equal those recorded before the loader shipped uint8
    pages split over the replica (tests/fixtures/record_tp2cp2_losses.py): the batch order and
    the encoder's inputs are unchanged. Bit for bit on the machine that recorded them; elsewhere
    fp32 reductions may round differently (another BLAS or core count), hence 1e-6 relative, far
    below a changed batch or pixel (~1e-2)."""
    *_, mix = tiny_train_data
    reference = json.loads((Path(__file__).parent / "fixtures" / "tp2cp2_losses.json").read_text())
    subprocess.run(_command(4, mix, tmp_path / "run", "--train-iters", "5", *TP2_CP2), check=True, env=_env(),
                   stdout=subprocess.DEVNULL)
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4, 5]
    for iteration, loss in losses.items():
        assert loss == pytest.approx(reference["losses"][str(iteration)], rel=1e-6, abs=0)


# ---- Qwen3-VL: the second family through the same loop ---------------------------------------

def test_qwen3vl_loss_falls(tiny_qwen3vl_train_data, tmp_path):
    """A tiny Qwen3-VL (deepstack, q/k norms, interleaved M-RoPE, 32 px tokens) trains end to end."""
    *_, mix = tiny_qwen3vl_train_data
    subprocess.run(_command(1, mix, tmp_path / "run", "--train-iters", "24", "--model", "qwen3vl-tiny-1k"),
                   check=True, env=_env(), stdout=subprocess.DEVNULL)
    losses = list(_losses(tmp_path / "run").values())
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5


def test_qwen3vl_converted_checkpoint_trains_and_resumes_bit_for_bit(tiny_qwen3vl_train_data, tmp_path):
    """HF -> Megatron at TP2; a run from it saves at step 3 and goes on to 6; a second run resumed
    from that step-3 checkpoint has exactly the losses of steps 4-6, and a step at learning rate 0
    exports the HF checkpoint unchanged (the weights came from it, deepstack mergers included)."""
    import shutil

    from safetensors.torch import load_file

    from megatron_mmprolong.config import ParallelConfig, VLConfig
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.mcore_to_hf import mcore_to_hf
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    *_, mix = tiny_qwen3vl_train_data
    tp2 = ["--tensor-model-parallel-size", "2"]
    write_random_hf_checkpoint(VLConfig.preset("qwen3vl-tiny-1k"), tmp_path / "hf", seed=5)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", ParallelConfig(tensor_parallel=2), progress=False)

    subprocess.run(_command(2, mix, tmp_path / "frozen", "--train-iters", "1", "--lr", "0", "--min-lr", "0", *tp2,
                            "--load", str(tmp_path / "mcore")), check=True, env=_env(), stdout=subprocess.DEVNULL)
    mcore_to_hf(tmp_path / "frozen" / "iter_0000001", tmp_path / "export", progress=False)
    original, exported = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                          for d in (tmp_path / "hf", tmp_path / "export"))
    assert any("deepstack" in name for name in original) and set(exported) == set(original)
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())

    straight = tmp_path / "straight"
    subprocess.run(_command(2, mix, straight, "--train-iters", "6", "--save-interval", "3", *tp2,
                            "--load", str(tmp_path / "mcore")), check=True, env=_env(), stdout=subprocess.DEVNULL)
    expected = _losses(straight)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "iter_0000003", resumed / "iter_0000003")
    (resumed / "latest_checkpointed_iteration.txt").write_text("3")
    subprocess.run(_command(2, mix, resumed, "--train-iters", "6", *tp2, "--load", str(resumed),
                            "--pretrained-checkpoint", str(tmp_path / "mcore")),  # the model of the run resumed
                   check=True, env=_env(), stdout=subprocess.DEVNULL)
    assert _losses(resumed) == {i: expected[i] for i in (4, 5, 6)}


def test_training_refuses_data_built_for_another_family(tiny_train_data, tmp_path):
    """Qwen2.5-VL pages (14 px patches, CLIP normalisation) would feed a Qwen3-VL encoder wrong pixels."""
    *_, mix = tiny_train_data
    run = subprocess.run(_command(1, mix, tmp_path / "run", "--train-iters", "1", "--model", "qwen3vl-tiny-1k"),
                         env=_env(), capture_output=True, text=True)
    assert run.returncode != 0
    assert "was built for qwen2_5_vl" in run.stderr and "patch_size 14 (the model's: 16)" in run.stderr
    assert not (tmp_path / "run" / "latest_checkpointed_iteration.txt").exists()
