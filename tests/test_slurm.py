"""The slurm/ scripts on a real Slurm: a single-node cluster on this machine
(`sudo slurm/local_cluster/start.sh`; .ci/run starts it), enabled with MMPROLONG_SLURM=1.

Training runs the tiny CPU recipe as 2 tasks over gloo; the warning signal (USR1, which
`--signal=B:USR1@600` sends before the time limit) must make the job save, requeue itself and
resume to the end."""

import json
import os
import re
import shutil
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


def _train_options(tmp_path, name):
    log = tmp_path / f"{name}.out"
    # The cluster is this 2-core machine: 2 tasks of 1 CPU, no GPUs. --time stays above the
    # 10-minute warning so that only the test sends USR1.
    return log, ["--job-name", name, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none",
                 "--time=60", f"--output={log}", f"--chdir={tmp_path}"]


def _train_arguments(mix, iterations):
    return ["--data-mix", str(mix), "--seq-length", "2048", "--train-iters", str(iterations), "--log-interval", "1",
            "--num-workers", "1"]


def _metrics(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "train_metrics.jsonl").read_text().splitlines()]


def test_train_sbatch_runs_the_tiny_recipe_on_two_tasks(tiny_train_data, tmp_path):
    *_, mix = tiny_train_data
    save = tmp_path / "save"
    log, options = _train_options(tmp_path, "mmprolong-train-test")
    job_id = _sbatch(SLURM / "train.sbatch", options, _train_arguments(mix, 12),
                     RECIPE="examples/cpu_tiny.yaml", SAVE=save)
    job = _wait(job_id, log)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert (save / "iter_0000012" / "metadata.json").is_file()
    assert "2 ranks (slurm, cpu): TP 1 x CP 1 x PP 1 x DP 2" in log.read_text()  # both tasks, one world
    losses = [m["loss"] for m in _metrics(save)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # falls ~0.95 in 12 steps at DP2


def test_warning_signal_saves_requeues_and_resumes(tiny_train_data, tmp_path):
    *_, mix = tiny_train_data
    save = tmp_path / "save"
    log, options = _train_options(tmp_path, "mmprolong-requeue-test")
    job_id = _sbatch(SLURM / "train.sbatch", options, _train_arguments(mix, 12),
                     RECIPE="examples/cpu_tiny.yaml", SAVE=save)
    metrics = save / "train_metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and _job(job_id)["JobState"] not in FINAL_STATES, _report(job_id, log)
        time.sleep(0.5)
    # What Slurm does before the time limit with --signal=B:USR1@600: USR1 to the batch script.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    # Slurm holds a requeued job ~2 minutes before it may start again (BeginTime): the requeue
    # revokes the first run's credential, and slurmd refuses any credential of that job made up
    # to the second of the revocation ("Job N already killed, do not launch batch job": slurmctld
    # then ends the job FAILED 1:0 and the second run never starts, so nothing of it is in the
    # log). A real cluster waits the hold out; the test lets the job start 3 s after the update,
    # past the second of the requeue (StartTime=now started it in that second about half the time).
    while not (_job(job_id)["JobState"] == "PENDING" and _job(job_id)["Restarts"] == "1"):
        assert time.time() < deadline and _job(job_id)["JobState"] not in FINAL_STATES, _report(job_id, log)
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], check=True)
    job = _wait(job_id, log)
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), _report(job_id, log)
    stopped = int(re.search(r"stopping after iteration (\d+) on a termination signal", text).group(1))
    assert 3 <= stopped < 12
    assert (save / f"iter_{stopped:07d}" / "metadata.json").is_file()
    assert f"requeueing job {job_id}" in text and f"resuming from {save} (iteration {stopped})" in text
    assert f"resuming from iteration {stopped} of 12 ({save / f'iter_{stopped:07d}'})" in text
    assert f"train.sbatch: job {job_id} run 2 starts" in text
    assert "Traceback" not in text  # the stop signal reaches every process of a task: none may die of it
    assert [m["iteration"] for m in _metrics(save)] == list(range(1, 13))  # every step once, none repeated
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "12"


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
