"""Stop signals and failures of `train` (issue 32): a signal before the first step exits 0 without a
traceback, on every rank even when one rank alone was signalled; `megatron_mmprolong.launch` exits
0 after SIGUSR1 as after SIGTERM; faulthandler dumps stacks on a fatal signal; a failure names its
rank and host; `--keep-last` prunes old complete checkpoints only; one TensorBoard folder per run."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path


EXAMPLES = Path(__file__).parents[1] / "examples"


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(name, None)
    return env


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _handles(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_a_signal_during_start_up_exits_0_without_a_traceback(tmp_path):
    """SIGUSR1 while the process still imports (no process group yet): Python's default action
    used to end it with status 138 and no word."""
    process = subprocess.Popen([sys.executable, "-m", "megatron_mmprolong.train", "--data-mix", "none.yaml",
                                "--save", str(tmp_path / "run")], env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _handles(process.pid, signal.SIGUSR1):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGUSR1)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert err.strip() == "mmprolong train: SIGUSR1 before the first step: stopped; nothing to save"


def test_a_signal_to_one_rank_before_the_first_step_stops_every_rank_with_status_0(tiny_train_data, tmp_path):
    """SIGTERM reaches rank 1 while the model is being built (the process group exists): the
    ranks agree on it after start-up, and both exit 0 without a traceback or a checkpoint."""
    *_, mix = tiny_train_data
    save = tmp_path / "run"
    rank = textwrap.dedent("""
        import os, signal, sys
        import megatron_mmprolong.training.loop as loop
        build = loop.build_training_model
        def build_then_signal(*args, **kwargs):
            if os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGTERM)
            return build(*args, **kwargs)
        loop.build_training_model = build_then_signal
        from megatron_mmprolong.train import main
        sys.exit(main(sys.argv[1:]))
    """)
    script = tmp_path / "rank.py"
    script.write_text(rank)
    command = [sys.executable, "-m", "megatron_mmprolong.launch", "--nproc-per-node", "2", "--master-port",
               str(_port()), str(script), "--config", str(EXAMPLES / "cpu_tiny.yaml"), "--data-mix", str(mix),
               "--seq-length", "2048", "--num-workers", "0", "--save", str(save)]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.count("mmprolong train: SIGTERM before the first step: stopped; nothing to save") == 2
    assert not (save / "latest_checkpointed_iteration.txt").exists()
    assert not (save / "training_finished.txt").exists()


def test_the_launcher_exits_0_after_sigusr1_when_every_rank_stopped(tmp_path):
    """Slurm's time-limit warning reaches the launcher: it forwards SIGUSR1 to the ranks (torchrun
    forwards only TERM, INT, HUP and QUIT) and exits with their verdict, 0, without a traceback."""
    ready = tmp_path / "ready"
    rank = tmp_path / "rank.py"
    rank.write_text(textwrap.dedent(f"""
        import os, signal, time
        stop = []
        signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
        open({str(ready)!r} + os.environ["LOCAL_RANK"], "w").close()
        while not stop:
            time.sleep(0.05)
    """))
    process = subprocess.Popen([sys.executable, "-m", "megatron_mmprolong.launch", "--nproc-per-node", "2",
                                "--master-port", str(_port()), str(rank)], env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not all(Path(f"{ready}{r}").exists() for r in (0, 1)):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err
    assert "mmprolong launch: SIGUSR1: every rank stopped and exited 0 (2 on this node)" in err


def test_faulthandler_dumps_the_stacks_on_a_fatal_signal():
    code = ("import os, megatron_mmprolong.training.arguments as A\n"
            "def abort(argv): os.abort()\n"
            "A.parse_command = abort\n"
            "from megatron_mmprolong.train import main\nmain([])\n")
    run = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in run.stderr and ', line 2 in abort' in run.stderr, run.stderr[-2000:]


def test_a_failure_names_its_rank_and_host():
    code = ("import megatron_mmprolong.training.arguments as A\n"
            "def fail(argv): raise RuntimeError('injected failure')\n"
            "A.parse_command = fail\n"
            "from megatron_mmprolong.train import main\nmain([])\n")
    run = subprocess.run([sys.executable, "-c", code], env={**_env(), "RANK": "3", "WORLD_SIZE": "8"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"mmprolong train: rank 3 of 8 on host {socket.gethostname()} failed: RuntimeError: injected failure" \
        in run.stderr
    assert "Traceback" in run.stderr  # a bug keeps its traceback


# ---- artefacts --------------------------------------------------------------------------------

def _complete(save: Path, iteration: int) -> None:
    from megatron_mmprolong.convert.checkpoint_info import iteration_dir

    directory = iteration_dir(save, iteration)
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")


def test_keep_last_prunes_older_complete_checkpoints_only(tmp_path):
    from megatron_mmprolong.training.checkpointing import prune_checkpoints

    save = tmp_path / "run"
    for iteration in (1, 2, 3, 4, 5):
        _complete(save, iteration)
    (save / "latest_checkpointed_iteration.txt").write_text("4\n")  # iter 5: a killed run's, past "latest"
    (save / "iter_0000006.partial").mkdir()  # being written
    (save / "iter_0000000.removing").mkdir()  # a kill during an earlier removal
    removed = prune_checkpoints(save, 2)
    assert [p.name for p in removed] == ["iter_0000001", "iter_0000002"]
    assert sorted(p.name for p in save.iterdir()) == [
        "iter_0000003", "iter_0000004", "iter_0000005", "iter_0000006.partial", "latest_checkpointed_iteration.txt"]
    assert [p.name for p in prune_checkpoints(save, 1)] == ["iter_0000003"]  # never the latest (4)
    assert prune_checkpoints(save, 1) == []


def test_each_run_has_its_own_tensorboard_folder(tmp_path):
    from megatron_mmprolong.training import arguments as A
    from megatron_mmprolong.training.loop import tensorboard_run_dir

    def folder(save):
        return tensorboard_run_dir(A.parse_args(["--data-mix", "m.yaml", "--save", str(save),
                                                 "--tensorboard-dir", str(tmp_path / "tb")]))

    a, b, again = folder(tmp_path / "alice" / "run"), folder(tmp_path / "bob" / "run"), folder(tmp_path / "alice" / "run")
    assert a.parent == b.parent == tmp_path / "tb"
    assert a != b and a.name.startswith("run-") and b.name.startswith("run-")  # same name, two runs
    assert again == a  # a resumed run appends to its own
