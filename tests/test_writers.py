"""One writer per output (megatron_mmprolong/output_lock.py) with real processes: a second writer
is refused naming the holder's host and pid; a holder killed with SIGKILL is taken over with a
message; build-data refuses a second build into one prefix; training refuses a second run on a
`--save` whose first run's ranks outlive a killed torchrun."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from megatron_mmprolong.output_lock import SAVE_LOCK, Holder, OutputLock, OutputLocked, lock_prefix, lock_save_dir

REPO = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _holder(code: str, ready: Path) -> subprocess.Popen:
    """A process that runs `code` (which takes a lock), then touches `ready` and sleeps."""
    script = textwrap.dedent(code) + f"\nopen({str(ready)!r}, 'w').close()\nimport time\ntime.sleep(600)\n"
    process = subprocess.Popen([sys.executable, "-c", script], env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    return process


def _kill(process):
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    save = tmp_path / "save"
    holder = _holder(f"from megatron_mmprolong.output_lock import lock_save_dir\nlock = lock_save_dir({str(save)!r})",
                     tmp_path / "ready")
    try:
        with pytest.raises(OutputLocked) as refused:
            lock_save_dir(save)
        message = str(refused.value)
        assert "\n" not in message
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and str(save) in message
        assert "--save" in message
    finally:
        _kill(holder)


def test_a_holder_killed_with_sigkill_is_taken_over_with_a_message(tmp_path, capfd):
    save = tmp_path / "save"
    holder = _holder(f"from megatron_mmprolong.output_lock import lock_save_dir\nlock = lock_save_dir({str(save)!r})",
                     tmp_path / "ready")
    _kill(holder)  # the kernel drops its flock; its line stays
    assert json.loads((save / SAVE_LOCK).read_text())["pid"] == holder.pid
    with lock_save_dir(save) as lock:
        assert lock.holder.pid == os.getpid()
        said = capfd.readouterr().err
        assert f"taking over {save / SAVE_LOCK}: its holder, `mmprolong train` pid {holder.pid}" in said
        assert "is no longer running" in said
    assert not (save / SAVE_LOCK).exists()  # a clean release leaves nothing behind
    with lock_save_dir(save):  # and the next writer takes it silently
        assert "taking over" not in capfd.readouterr().err


def test_without_flock_the_line_alone_refuses_a_live_holder_and_yields_to_a_dead_one(tmp_path, monkeypatch, capfd):
    """Where the file system has no flock (ENOLCK), the holder's line is the lock."""
    import megatron_mmprolong.output_lock as output_lock

    def no_flock(fd, operation):
        raise OSError(output_lock.errno.ENOLCK, "No locks available")

    monkeypatch.setattr(output_lock.fcntl, "flock", no_flock)
    path = tmp_path / "out.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        alive = Holder(socket.gethostname(), sleeper.pid, "mmprolong train", "earlier",
                       output_lock._pid_start(sleeper.pid))
        path.write_text(json.dumps(asdict(alive)) + "\n")
        with pytest.raises(OutputLocked, match=f"pid {sleeper.pid} on host"):
            OutputLock.acquire(path, "OUT", "mmprolong train", "--save")
    finally:
        _kill(sleeper)
    with OutputLock.acquire(path, "OUT", "mmprolong train", "--save"):
        assert f"pid {sleeper.pid} on host {socket.gethostname()}" in capfd.readouterr().err


def test_a_fresh_holder_on_another_host_is_refused_a_stale_one_taken_over(tmp_path, capfd):
    path = tmp_path / "out.lock"
    other = Holder("node-elsewhere", 4242, "mmprolong train", "earlier")
    path.write_text(json.dumps(asdict(other)) + "\n")
    with pytest.raises(OutputLocked, match="pid 4242 on host node-elsewhere.*last heartbeat"):
        OutputLock.acquire(path, "OUT", "mmprolong train", "--save")
    old = time.time() - 3600
    os.utime(path, (old, old))
    with OutputLock.acquire(path, "OUT", "mmprolong train", "--save"):
        assert "has not refreshed it for 60 minutes" in capfd.readouterr().err


def test_the_previous_run_of_the_same_slurm_job_is_waited_for(tmp_path, monkeypatch, capfd):
    """A requeued job can start while its previous run still exits: wait for it, not refuse."""
    save = tmp_path / "save"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    holder = _holder(f"from megatron_mmprolong.output_lock import lock_save_dir\nlock = lock_save_dir({str(save)!r})",
                     tmp_path / "ready")
    try:
        threading.Timer(1.5, holder.kill).start()
        began = time.time()
        with lock_save_dir(save):
            assert 1.0 < time.time() - began < 30
        assert "still held by the previous run of this Slurm job" in capfd.readouterr().err
    finally:
        _kill(holder)


def test_array_parts_share_a_prefix_but_a_whole_build_excludes_them(tmp_path):
    prefix = tmp_path / "data" / "ds"
    with lock_prefix(prefix, (0, 2)), lock_prefix(prefix, (1, 2)):
        with pytest.raises(OutputLocked, match=r"pid \d+ on host"):
            lock_prefix(prefix, (1, 2))
        with pytest.raises(OutputLocked, match=r"part-0-of-2.lock"):
            lock_prefix(prefix)
    with lock_prefix(prefix):
        with pytest.raises(OutputLocked, match=r"ds.lock"):
            lock_prefix(prefix, (0, 2))


def test_a_second_build_into_one_prefix_is_refused_naming_the_first(tiny_train_data, tmp_path):
    """Two `build-data` runs into one prefix: the second says which build holds it (it used to
    fail on the first's `.partial` shard)."""
    tokenizer, records, _ = tiny_train_data
    prefix = tmp_path / "ds"
    args = ["build-data", "--input", str(records), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer),
            "--seq-length", "2048"]
    slow_first = textwrap.dedent(f"""
        import sys, time
        import megatron_mmprolong.data.build as build
        real = build._read_inputs
        def slow(*a, **k):
            open({str(tmp_path / 'ready')!r}, 'w').close()
            time.sleep(600)
        build._read_inputs = slow
        from megatron_mmprolong.cli import main
        sys.exit(main({args!r}))
    """)
    first = subprocess.Popen([sys.executable, "-c", slow_first], env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ready").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "megatron_mmprolong.cli", *args], env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"mmprolong build-data: error: {prefix} is being written by another run: `mmprolong build-data` pid "
            f"{first.pid} on host {socket.gethostname()}, since " + second.stderr.split(", since ", 1)[1].strip()]
    finally:
        _kill(first)


# ---- a full disk: one line naming the path and the free space; nothing partial taken for whole ----

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere: the injected-ENOSPC tests below still run)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _one_error_line(stderr: str, prog: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def test_build_data_on_a_full_disk_names_the_prefix_and_the_free_space(tiny_train_data, small_disk):
    tokenizer, records, _ = tiny_train_data
    prefix = small_disk / "ds"
    run = subprocess.run([sys.executable, "-m", "megatron_mmprolong.cli", "build-data", "--input", str(records),
                          "--output-prefix", str(prefix), "--tokenizer", str(tokenizer), "--seq-length", "2048"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    line = _one_error_line(run.stderr, "mmprolong build-data")
    assert f"cannot write dataset {prefix}" in line and "No space left on device" in line
    assert "free of 1.0 MiB there" in line and "no dataset was written" in line
    assert not Path(f"{prefix}.manifest.json").exists() and not Path(f"{prefix}.lock").exists()
    assert not (Path(f"{prefix}.build") / "final").exists()


def test_build_data_enospc_in_the_merge_names_the_prefix(tiny_train_data, tmp_path, monkeypatch, capsys):
    import errno

    import megatron_mmprolong.data.build as build
    from megatron_mmprolong.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(build, "merge_stores", full)
    tokenizer, records, _ = tiny_train_data
    prefix = tmp_path / "ds"
    status = main(["build-data", "--input", str(records), "--output-prefix", str(prefix), "--tokenizer",
                   str(tokenizer), "--seq-length", "2048", "--shard-size", "2"])
    line = _one_error_line(capsys.readouterr().err, "mmprolong build-data")
    assert status == 1
    assert line.startswith(f"mmprolong build-data: error: cannot write dataset {prefix}: No space left on device (")
    assert " free of " in line and f"finished shards are kept in {prefix}.build/" in line
    assert not Path(f"{prefix}.manifest.json").exists()
    records_count = len(Path(records).read_text().splitlines())
    assert len(list(Path(f"{prefix}.build").glob("shard-*"))) == (records_count + 1) // 2  # kept for the rerun


def test_convert_on_a_full_disk_names_the_output_and_keeps_nothing_partial(tmp_path, monkeypatch, capsys):
    import errno

    from conftest import tiny_config
    from megatron_mmprolong.cli import main
    from megatron_mmprolong.convert import torch_dist
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    write_random_hf_checkpoint(tiny_config(), tmp_path / "hf", seed=1)
    written = []

    def full_after_two(self, *args, **kwargs):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(args[0])
        return real(self, *args, **kwargs)

    real = torch_dist.TorchDistWriter.write
    monkeypatch.setattr(torch_dist.TorchDistWriter, "write", full_after_two)
    out = tmp_path / "mcore"
    status = main(["convert", "hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--out", str(out)])
    line = _one_error_line(capsys.readouterr().err, "mmprolong convert")
    assert status == 1
    assert line.startswith(f"mmprolong convert: error: cannot write the converted checkpoint {out}: "
                           "No space left on device (")
    assert " free of " in line and "nothing was written (the partial output was removed)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no .mcore.partial left


def test_convert_into_a_small_tmpfs_says_no_space(tmp_path, small_disk, capsys):
    from conftest import tiny_config
    from megatron_mmprolong.cli import main
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    write_random_hf_checkpoint(tiny_config(), tmp_path / "hf", seed=1)
    out = small_disk / "mcore"
    status = main(["convert", "hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--out", str(out)])
    line = _one_error_line(capsys.readouterr().err, "mmprolong convert")
    assert status == 1 and "No space left on device" in line and "free of 1.0 MiB there" in line
    assert list(small_disk.iterdir()) == []


# ---- training: the lock of --save, and a full disk during a save ---------------------------------

def _train_command(ranks, mix, save, *extra):
    from test_training import _command

    return _command(ranks, mix, save, *extra)


def test_a_second_train_is_refused_while_the_ranks_of_a_killed_torchrun_still_write(tiny_train_data, tmp_path):
    """kill -9 of torchrun leaves its ranks training and saving (each has a session of its own);
    `train --load X --save X` must not write into X beside them."""
    import psutil

    *_, mix = tiny_train_data
    save = tmp_path / "run"
    first = subprocess.Popen(_train_command(2, mix, save, "--train-iters", "30"), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        metrics = save / "train_metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(first.pid).children() if "megatron_mmprolong.train" in " ".join(p.cmdline())]
        rank0 = next(p for p in ranks if p.environ().get("RANK") == "0")
        first.kill()  # the launcher only
        first.wait()
        assert all(p.is_running() for p in ranks)
        second = subprocess.run(_train_command(1, mix, save, "--train-iters", "30", "--load", str(save)), env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        line = _one_error_line(second.stderr, "mmprolong train")
        assert line.startswith(f"mmprolong train: error: {save} is being written by another run: `mmprolong train` "
                               f"pid {rank0.pid} on host {socket.gethostname()}, since ")
        assert all(p.is_running() for p in ranks)  # refused, not fought over
    finally:
        first.kill()
        for rank in ranks:
            try:
                rank.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(tiny_train_data, small_disk):
    """A 1 MiB --save: the checkpoint does not fit. torch's writer used to end a 58-line traceback
    with `unexpected pos 704 vs 598`, naming neither the folder nor the full disk."""
    *_, mix = tiny_train_data
    save = small_disk / "run"
    run = subprocess.run(_train_command(1, mix, save, "--train-iters", "1"), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 1
    line = _one_error_line(run.stderr, "mmprolong train")
    assert line.startswith(f"mmprolong train: error: cannot write checkpoint {save}/iter_0000001")
    assert "No space left on device (" in line and "free of 1.0 MiB there)" in line
    assert line.endswith("iteration 1 was not saved and its partial folder was removed; no checkpoint was saved")
    assert sorted(p.name for p in save.iterdir()) == ["train_args.json", "train_metrics.jsonl"]


def test_enospc_on_one_rank_stops_every_rank_with_one_line(tiny_train_data, tmp_path):
    """Rank 1 alone cannot write its part (its RNG state): the ranks agree, rank 0 says it once,
    every rank exits 1 and none waits for the others."""
    *_, mix = tiny_train_data
    save = tmp_path / "run"
    inject = tmp_path / "inject.py"
    inject.write_text(textwrap.dedent("""
        import errno, os, sys, torch
        real = torch.save
        def save(obj, f, *args, **kwargs):
            if os.environ["RANK"] == "1" and "rng" in str(getattr(f, "name", "")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(obj, f, *args, **kwargs)
        torch.save = save
        if __name__ == "__main__":  # the loader's spawned workers import this file too
            from megatron_mmprolong.train import main
            sys.exit(main(sys.argv[1:]))
    """))
    command = _train_command(2, mix, save, "--train-iters", "1")
    command[command.index("megatron_mmprolong.train") - 1:command.index("megatron_mmprolong.train") + 1] = [str(inject)]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "mmprolong train: error:" in line]
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(f"mmprolong train: error: cannot write checkpoint {save}/iter_0000001: No space left on "
                               "device (")
    assert "megatron_mmprolong/training" not in run.stderr  # no rank's traceback (torchrun adds its own summary)
    assert not (save / "iter_0000001.partial").exists() and not (save / "latest_checkpointed_iteration.txt").exists()


def test_a_full_disk_while_the_manifest_is_written_leaves_no_manifest(tiny_train_data, tmp_path, monkeypatch, capsys):
    """The manifest says a dataset is finished: a cut-short one must not exist, and the rerun
    after freeing space must not be refused as 'a dataset is already there'."""
    import errno

    from megatron_mmprolong.cli import main

    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith("ds.manifest.json"):
            real(self, args[0][:100])  # what a full disk lets through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    tokenizer, records, _ = tiny_train_data
    prefix = tmp_path / "ds"
    argv = ["build-data", "--input", str(records), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer),
            "--seq-length", "2048"]
    monkeypatch.setattr(Path, "write_text", full)
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err, "mmprolong build-data")
    assert "No space left on device" in line
    assert sorted(p.name for p in tmp_path.glob("ds.manifest*")) == []
    monkeypatch.setattr(Path, "write_text", real)
    assert main(argv) == 0  # room again: the same command finishes the dataset
    assert Path(f"{prefix}.manifest.json").is_file()


def test_a_full_disk_for_the_metrics_log_stops_every_rank_in_one_line(tiny_train_data, tmp_path):
    """Rank 0 alone writes train_metrics.jsonl: when the disk refuses a record, every rank stops
    at that step's agreement (none waits for rank 0 in the next step's collectives)."""
    *_, mix = tiny_train_data
    save = tmp_path / "run"
    inject = tmp_path / "inject.py"
    inject.write_text(textwrap.dedent("""
        import errno, os, sys
        import megatron_mmprolong.training.loop as loop

        class Full:
            def __init__(self, stream):
                self.stream, self.records = stream, 0
            def write(self, text):
                self.records += 1
                if self.records == 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.stream.write(text)
            def __getattr__(self, name):
                return getattr(self.stream, name)

        real = loop._Logger.__init__
        def init(self, *args, **kwargs):
            real(self, *args, **kwargs)
            if self.metrics:
                self.metrics = Full(self.metrics)
        loop._Logger.__init__ = init
        if __name__ == "__main__":
            from megatron_mmprolong.train import main
            sys.exit(main(sys.argv[1:]))
    """))
    command = _train_command(2, mix, save, "--train-iters", "5")
    at = command.index("megatron_mmprolong.train")
    command[at - 1:at + 1] = [str(inject)]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "mmprolong train: error:" in line]
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(f"mmprolong train: error: cannot write the metrics log {save}/train_metrics.jsonl: "
                               "No space left on device (")
    assert lines[0].endswith(" there); stopped after iteration 2; no checkpoint was saved for it")
    assert "megatron_mmprolong/training" not in run.stderr
    assert [json.loads(line)["iteration"] for line in (save / "train_metrics.jsonl").read_text().splitlines()] == [1]
