"""The slurm/ scripts on a real Slurm: three node daemons on this machine
(`sudo slurm/local_cluster/start.sh`; .ci/run starts it), enabled with MMPROLONG_SLURM=1.

Training runs the tiny CPU recipe, one task per node over gloo: scancel ends a job (CANCELLED,
never requeued) and two default submissions write two folders; one job on two nodes gets a real
time-limit warning (saves, requeues, resumes from the `--save` given after the script), then loses
a node (requeued, resumes from the last complete checkpoint) and trains to the end."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("MMPROLONG_SLURM") != "1" or not shutil.which("sbatch"),
                       reason="needs a Slurm cluster and MMPROLONG_SLURM=1 (sudo slurm/local_cluster/start.sh)"),
]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _env(**variables):
    return {**os.environ, "PROJECT_DIR": str(REPO), "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore",
            **{k: str(v) for k, v in variables.items()}}


def _sbatch(script, options, arguments=(), **variables) -> str:
    out = subprocess.run(["sbatch", "--parsable", *options, str(script), *arguments], env=_env(**variables),
                         check=True, capture_output=True, text=True).stdout
    return out.strip().split(";")[0]


def _job(job_id) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=True, capture_output=True,
                          text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def _wait(job_id, log: Path, timeout=900) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(job_id)
        if job["JobState"] in FINAL_STATES:
            return job
        time.sleep(2)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish in {timeout} s:\n{log.read_text()[-3000:] if log.exists() else ''}")


def _daemon_log_lines(job_id) -> list[str]:
    """What slurmctld and slurmd logged about the job (where this user can read their logs)."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    files = re.findall(r"^(?:SlurmctldLogFile|SlurmdLogFile)\s*=\s*(\S+)", config, re.M)
    mentions = re.compile(rf"(JobId={job_id}\b|[Jj]ob {job_id}\b|\[{job_id}\.)")
    lines = []
    for name in files:
        try:
            lines += [f"{Path(name).name}: {line}" for line in Path(name).read_text().splitlines() if mentions.search(line)]
        except OSError:
            pass
    return lines


def _report(job_id, log: Path) -> str:
    """For a failed assertion: the job's state, each run's own output (train.sbatch starts each
    with a line of its own), and the daemons' lines about the job. A run that Slurm refused to
    start has no output at all; the daemons say why."""
    text = log.read_text() if log.exists() else ""
    runs = re.split(r"(?m)^(?=train\.sbatch: job \d+ run \d+ starts)", text)
    job = _job(job_id)
    parts = [f"job {job_id}: " + " ".join(f"{k}={job.get(k)}" for k in ("JobState", "Reason", "ExitCode", "Restarts"))]
    started = [r for r in runs if r.startswith("train.sbatch: job ")]
    restarts = int(job.get("Restarts") or 0)
    for number in range(1, restarts + 2):
        own = next((r for r in started if r.startswith(f"train.sbatch: job {job_id} run {number} starts")), None)
        parts.append(f"---- run {number}: " + (f"its output (last 2000 characters):\n{own[-2000:]}" if own is not None
                                               else "no output: its batch script never started"))
    parts.append("---- slurmctld/slurmd about the job:\n" + "\n".join(_daemon_log_lines(job_id)[-30:]))
    return "\n".join(parts)


def _train_options(tmp_path, name, nodes=2, time_limit=10, signal_lead=60):
    log = tmp_path / f"{name}.out"
    # The cluster is 3 node daemons on this 2-core machine (local_cluster/start.sh): one task of
    # one CPU per node, no GPUs. The warning's lead stays below the time limit, so that only a test
    # shortening the limit makes Slurm send it.
    options = ["--job-name", name, f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none",
               "--gpus-per-node=0", f"--time={time_limit}", f"--signal=B:USR1@{signal_lead}", f"--output={log}",
               f"--chdir={tmp_path}"]
    return log, options


def _train_arguments(mix, iterations, *extra):
    return ["--data-mix", str(mix), "--seq-length", "2048", "--train-iters", str(iterations), "--log-interval", "1",
            "--num-workers", "1", *extra]


def _metrics(save: Path) -> list[dict]:
    path = save / "train_metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _until(condition, job_id, log, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        job = _job(job_id)
        assert time.time() < deadline and job["JobState"] not in FINAL_STATES, _report(job_id, log)
        time.sleep(0.5)


def _requeued(job_id, restarts):
    job = _job(job_id)
    return job["JobState"] == "PENDING" and job["Restarts"] == str(restarts)


def _start_soon(job_id):
    # Slurm holds a requeued job ~2 minutes before it may start again (BeginTime): the requeue
    # revokes the run's credential, and slurmd refuses any credential of that job made up to the
    # second of the revocation ("Job N already killed, do not launch batch job": slurmctld then
    # ends the job FAILED 1:0). A real cluster waits the hold out; the test lets the job start
    # 3 s after the update, past the second of the requeue.
    # A job requeued after a node failure may be running again already (no hold to wait out).
    update = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], capture_output=True,
                            text=True)
    assert update.returncode == 0 or _job(job_id)["JobState"] != "PENDING", update.stderr


def _project(tmp_path) -> Path:
    """The checkout as a job sees it, so that default SAVEs (PROJECT_DIR/checkpoints/...) land here."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("slurm", "examples"):
        (project / name).symlink_to(REPO / name)
    return project


def test_scancel_ends_the_job_and_two_default_submissions_never_share_a_folder(tiny_train_data, tmp_path):
    *_, mix = tiny_train_data
    project = _project(tmp_path)
    jobs = {}
    for name, iterations in (("kept", 3), ("cancelled", 30)):
        log, options = _train_options(tmp_path, name, nodes=1)
        jobs[name] = (_sbatch(SLURM / "train.sbatch", options, _train_arguments(mix, iterations),
                              RECIPE="examples/cpu_tiny.yaml", PROJECT_DIR=project), log)
    saves = {name: project / "checkpoints" / "cpu_tiny" / f"job{job_id}" for name, (job_id, _) in jobs.items()}
    job_id, log = jobs["cancelled"]
    _until(lambda: len(_metrics(saves["cancelled"])) >= 1, job_id, log)
    subprocess.run(["scancel", job_id], check=True)  # TERM to every process of the job, KILL after KillWait
    _wait(job_id, log)
    kept = _wait(*jobs["kept"])
    time.sleep(3)  # a requeue by the batch script would show by now
    cancelled, text = _job(job_id), log.read_text()
    assert (cancelled["JobState"], cancelled["Restarts"]) == ("CANCELLED", "0"), _report(job_id, log)
    stopped = int(re.search(r"stopping after iteration (\d+) on SIGTERM", text).group(1))
    assert (saves["cancelled"] / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    assert "requeueing" not in text and f"train.sbatch: job {job_id} run 2" not in text
    assert (kept["JobState"], kept["ExitCode"]) == ("COMPLETED", "0:0"), _report(jobs["kept"][0], jobs["kept"][1])
    assert [m["iteration"] for m in _metrics(saves["kept"])] == [1, 2, 3]
    assert (saves["kept"] / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert f"SAVE={saves['kept']}" in jobs["kept"][1].read_text()
    assert (saves["kept"] / "logs" / f"train-job{jobs['kept'][0]}.log").is_file()


def _kill_node(job_id, node) -> None:
    """What a dead node looks like: its slurmd and the job's processes on it, killed."""
    pid = Path(f"/run/slurmd-{node}.pid").read_text().strip()
    os.kill(int(pid), signal.SIGKILL)
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env and f"SLURMD_NODENAME={node}".encode() in env:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def _revive_node(node) -> None:
    subprocess.run(["slurmd", "-N", node], check=True)
    deadline = time.time() + 60
    # up again: idle, or already running the requeued job (allocated, mixed)
    while not re.match(r"(idle|alloc|mix)", subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"],
                                                          capture_output=True, text=True).stdout.strip()):
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
        assert time.time() < deadline, f"node {node} did not come back"
        time.sleep(1)


ITERATIONS = 60


@pytest.mark.skipif(os.geteuid() != 0, reason="kills and restarts a node daemon (root)")
def test_time_limit_requeues_and_a_dead_node_resumes_from_the_last_checkpoint(tiny_train_data, tmp_path):
    """One job, three runs on two nodes, its folder given as `--save X` after the script:
    1. Slurm's time-limit warning (a real limit with --signal=B:USR1@180): every rank saves, the
       job requeues itself and resumes from X at the iteration it stopped at;
    2. a node's slurmd and ranks killed mid-run: the job requeues itself after the failure, naming
       the node and rank, and resumes from the last complete checkpoint;
    3. it trains to the end: every step logged once, the loss falling."""
    *_, mix = tiny_train_data
    long_mix = mix.with_name("mix_slurm_long.yaml")  # beside mix.yaml: its dataset path is relative
    long_mix.write_text(mix.read_text().replace("token_budget: 120000", "token_budget: 300000"))
    save = tmp_path / "mine"
    log, options = _train_options(tmp_path, "mmprolong-requeue-test", time_limit=10, signal_lead=180)
    job_id = _sbatch(SLURM / "train.sbatch", options,
                     _train_arguments(long_mix, ITERATIONS, "--save", str(save), "--save-interval", "2"),
                     RECIPE="examples/cpu_tiny.yaml", PROJECT_DIR=_project(tmp_path))
    # run 1: once it trains, a time limit that leaves less than the warning's 180 s: slurmctld
    # sends USR1 at one of its next time-limit checks (every 30 s or more on a busy machine), with
    # a minute or more left. ITERATIONS is long enough for the warning to come first.
    _until(lambda: len(_metrics(save)) >= 2, job_id, log)
    elapsed = _job(job_id)["RunTime"].split(":")
    minutes = int(elapsed[-2]) + (int(elapsed[-3]) * 60 if len(elapsed) > 2 else 0)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes + 2}"], check=True)
    _until(lambda: _requeued(job_id, 1), job_id, log)
    first = int((save / "latest_checkpointed_iteration.txt").read_text())
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)  # no second warning
    _start_soon(job_id)
    # run 2: a node dies after the run saved a checkpoint of its own
    _until(lambda: len(_metrics(save)) >= first + 3, job_id, log)
    job = _job(job_id)
    node = next(n for n in subprocess.run(["scontrol", "show", "hostnames", job["NodeList"]], capture_output=True,
                                          text=True).stdout.split() if n != job["BatchHost"])
    _kill_node(job_id, node)
    try:
        _until(lambda: _requeued(job_id, 2), job_id, log)
    finally:
        _revive_node(node)
    last = int((save / "latest_checkpointed_iteration.txt").read_text())
    _start_soon(job_id)
    job = _wait(job_id, log)
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "2"), _report(job_id, log)
    runs = re.split(r"(?m)^(?=train\.sbatch: job \d+ run \d+ starts)", text)[1:]
    assert len(runs) == 3, _report(job_id, log)
    assert re.search(rf"stopping after iteration {first} on SIGUSR1", runs[0]) and "requeueing" in runs[0]
    assert f"resuming from iteration {first} of {ITERATIONS} ({save / f'iter_{first:07d}'})" in runs[1]
    assert re.search(rf"failed with exit status \d+ .*{node}: task 1", runs[1]), runs[1][-3000:]
    assert "restart 2 of at most" in runs[1]
    assert first < last and f"resuming from iteration {last} of {ITERATIONS} ({save / f'iter_{last:07d}'})" in runs[2]
    assert "Traceback" not in runs[0]  # the stop signal reaches every process of a task: none may die of it
    assert [m["iteration"] for m in _metrics(save)] == list(range(1, ITERATIONS + 1))  # every step once
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERATIONS)
    losses = [m["loss"] for m in _metrics(save)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


def test_convert_sbatch_converts_and_verifies(tmp_path):
    from conftest import tiny_config
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    write_random_hf_checkpoint(tiny_config(), tmp_path / "hf", seed=4)
    log = tmp_path / "convert.out"
    job_id = _sbatch(SLURM / "convert.sbatch", ["--cpus-per-task=2", "--time=30", f"--output={log}"],
                     HF_DIR=tmp_path / "hf", MCORE_DIR=tmp_path / "mcore", TP=2)
    job = _wait(job_id, log)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-3000:]
    assert (tmp_path / "mcore" / "metadata.json").is_file()
    text = log.read_text()
    report = json.loads(text[text.rindex("\n{\n"):])  # `convert verify` prints its report last
    assert report["passed"] and report["max_abs_logit_diff"] <= report["atol"]


def test_build_data_array_then_merge_equals_one_build(tiny_train_data, tmp_path):
    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.store import file_names

    tokenizer, records, _ = tiny_train_data
    build_dataset([records], tmp_path / "local" / "ds", BuildConfig(tokenizer=str(tokenizer), seq_length=2048,
                                                                   shard_size=1), progress=False)
    prefix = tmp_path / "slurm" / "ds"
    out = subprocess.run([str(SLURM / "build_data.sh"), "--cpus-per-task=1", "--time=30", f"--chdir={tmp_path}",
                          "--", "--shard-size", "1"],
                         env=_env(INPUT=records, OUTPUT_PREFIX=prefix, TOKENIZER=tokenizer, SEQ_LENGTH=2048, TASKS=3),
                         check=True, capture_output=True, text=True).stdout
    array_id, merge_id = re.search(r"array job (\d+) \(3 tasks\), merge job (\d+)", out).groups()
    merge = _wait(merge_id, tmp_path / f"mmprolong-build-data-{merge_id}.out")
    assert (merge["JobState"], merge["ExitCode"]) == ("COMPLETED", "0:0")
    tasks = [_job(f"{array_id}_{i}") for i in range(3)]
    assert all(t["JobState"] == "COMPLETED" for t in tasks)
    merged_log = (tmp_path / f"mmprolong-build-data-{merge_id}.out").read_text()
    records_count = len(Path(records).read_text().splitlines())
    assert f'"shards_reused": {records_count}' in merged_log  # one record per shard, all built by the array
    assert [p.read_bytes() for p in file_names(prefix)] == [p.read_bytes() for p in file_names(tmp_path / "local" / "ds")]
