"""slurm/train.sbatch run by bash with stub `srun`, `scontrol`, `apptainer` and `python`
executables on PATH that record how they are called: the ranks each task would be, its master
and world, the srun options, requeues. No Slurm and no root needed.

The stub srun writes one record per step (its options, its command, and per task the variables
that task would see: the batch script's environment plus Slurm's per-task ones, block placement),
then runs the command as task 0. The stub python plays `mmprolong train`: `--preflight` exits with
STUB_PREFLIGHT_STATUS; a training run does what STUB_RANKS says (finish, stop on a signal, fail)."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mmprolong.runtime import launch_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train.sbatch"

SRUN = r'''
import json, os, resource, sys
argv = sys.argv[1:]
options = []
while argv and argv[0].startswith("-"):
    options.append(argv.pop(0))
opt = dict(o[2:].split("=", 1) if "=" in o else (o[2:], "") for o in options)
env = dict(os.environ)
hosts = os.popen("scontrol show hostnames " + env["SLURM_JOB_NODELIST"]).read().split()
if opt.get("ntasks") == "1":
    placement = [hosts[0]]
else:
    per_node = int(opt["ntasks-per-node"])
    placement = [h for h in hosts for _ in range(per_node)]
tasks = []
for rank, host in enumerate(placement):
    task = {k: v for k, v in env.items() if k.startswith(("SLURM", "MASTER", "RANK", "WORLD", "LOCAL", "GLOO", "NCCL", "OMP"))}
    task.update(SLURM_PROCID=str(rank), SLURM_STEP_ID="1", SLURM_STEP_NUM_TASKS=str(len(placement)),
                SLURM_LOCALID=str(placement[:rank].count(host)), SLURMD_NODENAME=host)
    tasks.append(task)
record = {"options": options, "command": argv, "tasks": tasks,
          "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
with open(os.path.join(env["STUB_LOG"], "srun.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")
if os.environ.get("STUB_HIDE_MARKER") and opt.get("ntasks") == "1":  # a container without SAVE mounted
    for name in os.listdir(env["STUB_SAVE"]):
        if name.startswith(".visible-from-job"):
            os.remove(os.path.join(env["STUB_SAVE"], name))
while argv and argv[0] == "apptainer":  # the stub apptainer: record, then run what follows the image
    with open(os.path.join(env["STUB_LOG"], "apptainer.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    i = 2
    while argv[i].startswith("-"):
        i += 1 if argv[i] in ("--nv", "--cleanenv") else 2
    argv = argv[i + 1:]
os.execvpe(argv[0], argv, {**env, **tasks[0]})
'''

SCONTROL = r'''
import json, os, re, sys
args = sys.argv[1:]
def expand(nodelist):
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            for n in range(int(low), int(high or low) + 1):
                hosts.append(prefix + str(n).zfill(len(low)))
    return hosts
if args[:2] == ["show", "hostnames"]:
    print("\n".join(expand(args[2])))
elif args[:2] == ["show", "node"]:
    name = args[-1]
    print(f"NodeName={name} Arch=x86_64 CoresPerSocket=48 NodeAddr={os.environ.get('STUB_ADDR_PREFIX', '')}{name} NodeHostName={name}")
else:
    with open(os.path.join(os.environ["STUB_LOG"], "scontrol.jsonl"), "a") as f:
        f.write(json.dumps(args) + "\n")
'''

PYTHON = r'''
import json, os, signal, sys, time
args = sys.argv[1:]
log = os.environ["STUB_LOG"]
if "--preflight-world-size" in args:
    with open(os.path.join(log, "preflight.jsonl"), "a") as f:
        f.write(json.dumps(args) + "\n")
    if os.environ.get("STUB_PREFLIGHT_WAIT"):
        open(os.path.join(log, "preflight-started"), "w").close()
        time.sleep(60)  # a signal's default action ends it, as it would end python during imports
    if os.environ.get("STUB_PREFLIGHT_LINE"):
        print(os.environ["STUB_PREFLIGHT_LINE"], file=sys.stderr)
    sys.exit(int(os.environ.get("STUB_PREFLIGHT_STATUS", "0")))
with open(os.path.join(log, "train.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
behaviour = os.environ.get("STUB_RANKS", "finish")
if behaviour == "finish":
    print("iteration      5/5 | loss 1.000000", flush=True)
    sys.exit(0)
if behaviour == "fail":
    print("srun: error: " + os.environ["STUB_FAILED_NODE"] + ": task 9: Exited with exit code 1", file=sys.stderr)
    sys.exit(1)
if behaviour == "bad":
    print("mmprolong train: error: bad input", file=sys.stderr)
    sys.exit(2)
if behaviour == "starting":  # still importing: no handler yet, the signal's default action ends it
    open(os.path.join(log, "ranks-started"), "w").close()
    time.sleep(60)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
if behaviour == "finished-then-signal":  # the last step done, its mark written (mmprolong train's)
    print("iteration      5/5 | loss 1.000000", flush=True)
    open(os.path.join(args[args.index("--save") + 1], "training_finished.txt"), "w").write("iteration 5 of 5\n")
open(os.path.join(log, "ranks-started"), "w").close()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.02)
if behaviour == "stop":
    print("iteration      3/5 | loss 1.000000")
    print(f"stopping after iteration 3 on a termination signal; resume with --load X", flush=True)
sys.exit(0)
'''


@pytest.fixture
def stubs(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log.mkdir()
    for name, code in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON), ("apptainer", "")):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    project = tmp_path / "project"  # the checkout as the job sees it: default SAVEs land here
    project.mkdir()
    for name in ("slurm", "examples"):
        (project / name).symlink_to(REPO / name)
    return bin_dir, log, project


def _env(stubs, nodelist="gpu[001-002]", nodes=2, job_id=4242, **variables):
    bin_dir, log, project = stubs
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER", "RANK", "WORLD", "LOCAL"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(log), PROJECT_DIR=str(project),
               PYTHON=str(bin_dir / "python"), SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST=nodelist,
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS_PER_NODE="8", SLURM_TASKS_PER_NODE=f"8(x{nodes})",
               SLURM_CPUS_ON_NODE="96", SLURM_RESTART_COUNT="0", SLURM_JOB_NAME="mmprolong-train")
    env.update({k: str(v) for k, v in variables.items()})
    return env


def _run(env, *arguments, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *arguments], env=env, capture_output=True, text=True, timeout=timeout)


def _records(stubs, name):
    path = stubs[1] / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ranks_step(stubs):
    steps = [s for s in _records(stubs, "srun") if "--kill-on-bad-exit=1" in s["options"]]
    assert len(steps) == 1, steps
    return steps[0]


def _requeues(stubs):
    return [c for c in _records(stubs, "scontrol") if c[0] == "requeue"]


@pytest.mark.parametrize("nodes,nodelist,hosts", [
    (2, "gpu[001-002]", ["gpu001", "gpu002"]),
    (8, "gpu[001-004,010],h100-[7-9]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "h100-7", "h100-8", "h100-9"]),
    (64, "a[01-32],b[101-132]", [f"a{i:02d}" for i in range(1, 33)] + [f"b{i}" for i in range(101, 133)]),
])
def test_traces_give_every_task_its_rank_master_and_world(stubs, nodes, nodelist, hosts):
    traces = []
    stale = {"MASTER_ADDR": "stale-host", "MASTER_PORT": "29500", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for inherited in ({}, stale):
        (stubs[1] / "srun.jsonl").unlink(missing_ok=True)
        result = _run(_env(stubs, nodelist, nodes, job_id=987654, **inherited))
        assert result.returncode == 0, result.stderr
        step = _ranks_step(stubs)
        launches = [launch_env(task) for task in step["tasks"]]
        traces.append([(t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port, t.launcher) for t in launches])
        world = 8 * nodes
        assert [t.rank for t in launches] == list(range(world))
        assert {t.world_size for t in launches} == {world}
        assert {(t.master_addr, t.master_port, t.launcher) for t in launches} == {(hosts[0], 20000 + 987654 % 12768, "slurm")}
        assert [(task["SLURMD_NODENAME"], t.local_rank) for task, t in zip(step["tasks"], launches)] == \
            [(h, i) for h in hosts for i in range(8)]  # 8 consecutive ranks per node: TP/CP groups stay inside it
    assert traces[0] == traces[1]  # a stale launcher environment changes nothing


def test_master_address_is_the_first_nodes_slurm_address(stubs):
    assert _run(_env(stubs, "gpu[003-004]", 2, STUB_ADDR_PREFIX="ib-")).returncode == 0
    assert {t["MASTER_ADDR"] for t in _ranks_step(stubs)["tasks"]} == {"ib-gpu003"}


def test_master_port_stays_below_the_ephemeral_range_for_every_job_id(stubs):
    ports = {}
    for job_id in (12767, 12768, 12769, 45535, 4294967294):
        (stubs[1] / "srun.jsonl").unlink(missing_ok=True)
        assert _run(_env(stubs, job_id=job_id)).returncode == 0
        (ports[job_id],) = {int(t["MASTER_PORT"]) for t in _ranks_step(stubs)["tasks"]}
    assert all(1024 < port < 32768 for port in ports.values()), ports  # Linux's ephemeral ports: 32768-60999
    assert len({ports[12767], ports[12768], ports[12769]}) == 3  # consecutive jobs (sharing a node) differ


def test_two_default_submissions_write_to_two_folders_and_a_run_name_continues(stubs):
    saves = []
    for job_id, extra in ((101, {}), (102, {}), (103, {"RUN_NAME": "ablation-a"}), (104, {"RUN_NAME": "ablation-a"})):
        (stubs[1] / "train.jsonl").unlink(missing_ok=True)
        assert _run(_env(stubs, job_id=job_id, RECIPE="examples/cpu_tiny.yaml", **extra)).returncode == 0
        args = _records(stubs, "train")[0]
        saves.append(args[args.index("--save") + 1])
    project = stubs[2]
    assert saves == [f"{project}/checkpoints/cpu_tiny/job101", f"{project}/checkpoints/cpu_tiny/job102",
                     f"{project}/checkpoints/cpu_tiny/ablation-a", f"{project}/checkpoints/cpu_tiny/ablation-a"]
    assert (project / "checkpoints/cpu_tiny/job101/logs/train-job101.log").is_file()  # per-run log
    assert "iteration      5/5" in (project / "checkpoints/cpu_tiny/job101/logs/train-job101.log").read_text()


def test_save_after_the_script_is_the_runs_one_folder(stubs, tmp_path):
    """mmprolong train resumes from its --save (tests/test_slurm.py runs it); the script must hand
    it exactly one --save, the user's, and the initial weights as their own argument."""
    save, init = tmp_path / "mine", tmp_path / "converted"
    for spelling in (["--save", str(save)], [f"--save={save}"]):
        result = _run(_env(stubs, INIT_CHECKPOINT=tmp_path / "other"), "--lr", "1e-4", *spelling,
                      "--pretrained-checkpoint", str(init))
        assert result.returncode == 0, result.stderr
        for args in (_records(stubs, "train")[-1], _records(stubs, "preflight")[-1]):
            assert args.count("--save") == 1 and args[args.index("--save") + 1] == str(save)
            assert args.count("--pretrained-checkpoint") == 1 and args[args.index("--pretrained-checkpoint") + 1] == str(init)
            assert "--load" not in args and args[-2:] == ["--lr", "1e-4"]
        assert (save / "logs" / "train-job4242.log").is_file()


def _signalled(stubs, signum, behaviour="stop", wait_for="ranks-started", **variables):
    env = _env(stubs, STUB_RANKS=behaviour, **variables)
    process = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.time() + 30
    while not (stubs[1] / wait_for).exists():
        assert time.time() < deadline and process.poll() is None, process.communicate()[0]
        time.sleep(0.02)
    process.send_signal(signum)  # what Slurm sends to the batch shell (B:USR1) or scancel (TERM)
    out, _ = process.communicate(timeout=30)
    return process.returncode, out


def test_time_limit_warning_requeues_after_the_ranks_saved(stubs):
    status, out = _signalled(stubs, signal.SIGUSR1)
    assert status == 0, out
    assert _requeues(stubs) == [["requeue", "4242"]]
    assert "stopping after iteration 3 on a termination signal" in out


def test_term_saves_and_ends_the_job_without_a_requeue(stubs):
    status, out = _signalled(stubs, signal.SIGTERM)
    assert status == 0, out
    assert _requeues(stubs) == []
    assert "stopping after iteration 3" in out and "not requeued" in out


def test_a_finished_run_is_not_requeued(stubs):
    result = _run(_env(stubs))
    assert result.returncode == 0 and _requeues(stubs) == []
    status, out = _signalled(stubs, signal.SIGUSR1, "finished-then-signal")  # the warning after the last step
    assert status == 0 and _requeues(stubs) == [], out


@pytest.mark.parametrize("signum,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_a_signal_before_the_first_step_exits_0_and_the_warning_requeues(stubs, signum, requeued):
    status, out = _signalled(stubs, signum, wait_for="preflight-started", STUB_PREFLIGHT_WAIT=1)
    assert status == 0, out
    assert _requeues(stubs) == ([["requeue", "4242"]] if requeued else [])
    assert _records(stubs, "train") == []  # no rank started


@pytest.mark.parametrize("signum,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_a_signal_that_ends_starting_ranks_exits_0_and_the_warning_requeues(stubs, signum, requeued):
    status, out = _signalled(stubs, signum, "starting")
    assert status == 0, out
    assert _requeues(stubs) == ([["requeue", "4242"]] if requeued else [])
    assert "before the first step" in out


def test_a_failed_run_is_requeued_a_bounded_number_of_times_naming_node_and_rank(stubs):
    result = _run(_env(stubs, STUB_RANKS="fail", STUB_FAILED_NODE="gpu002", MAX_RESTARTS=2, SLURM_RESTART_COUNT=1))
    assert result.returncode == 0 and _requeues(stubs) == [["requeue", "4242"]]
    assert "failed with exit status 1" in result.stdout and "gpu002: task 9: Exited with exit code 1" in result.stdout
    result = _run(_env(stubs, STUB_RANKS="fail", STUB_FAILED_NODE="gpu002", MAX_RESTARTS=2, SLURM_RESTART_COUNT=2))
    assert result.returncode == 1 and len(_requeues(stubs)) == 1
    assert "restarted 2 times (MAX_RESTARTS=2): not requeued" in result.stdout
    result = _run(_env(stubs, STUB_RANKS="bad"))  # a refused input fails the same way again
    assert result.returncode == 2 and len(_requeues(stubs)) == 1


def test_preflight_refuses_before_any_rank_starts(stubs):
    line = "mmprolong train: error: 3 nodes x 8 = 24 ranks do not fit TP 2 x CP 4 with global batch 32"
    result = _run(_env(stubs, "gpu[1-3]", 3, STUB_PREFLIGHT_STATUS=2, STUB_PREFLIGHT_LINE=line))
    assert result.returncode == 2
    assert line in result.stdout and "no rank was started" in result.stdout
    steps = _records(stubs, "srun")
    assert len(steps) == 1 and len(steps[0]["tasks"]) == 1  # one process, and nothing after it
    preflight = _records(stubs, "preflight")[0]
    assert preflight[preflight.index("--preflight-world-size") + 1] == "24" and _records(stubs, "train") == []


def test_launch_hygiene_binding_cpus_limits_and_interfaces(stubs):
    assert _run(_env(stubs, NCCL_SOCKET_IFNAME="ib0,ib1")).returncode == 0
    step = _ranks_step(stubs)
    assert {"--cpus-per-task=12", "--cpu-bind=cores", "--distribution=block:block"} <= set(step["options"])
    assert step["nofile"] == resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # raised to the hard limit
    assert {(t["NCCL_SOCKET_IFNAME"], t["GLOO_SOCKET_IFNAME"], t["OMP_NUM_THREADS"]) for t in step["tasks"]} == \
        {("ib0,ib1", "ib0,ib1", "12")}
    (stubs[1] / "srun.jsonl").unlink()
    assert _run(_env(stubs, NCCL_SOCKET_IFNAME="^lo,docker", SLURM_CPUS_ON_NODE=224)).returncode == 0
    step = _ranks_step(stubs)
    assert "--cpus-per-task=28" in step["options"]
    assert all("GLOO_SOCKET_IFNAME" not in t for t in step["tasks"])  # gloo takes no ^exclusions
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SCRIPT.read_text(), re.M))
    assert header["mem"] == "0" and header["gpus-per-node"] == "8" and "exclusive" in header
    assert re.fullmatch(r"B:USR1@\d+", header["signal"]) and "cpus-per-task" not in header


def test_pyxis_mounts_the_project_save_data_and_initial_checkpoint_at_their_own_paths(stubs, tmp_path):
    save, init = tmp_path / "save", tmp_path / "init"
    env = _env(stubs, CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3", SAVE=save, INIT_CHECKPOINT=init,
               DATA_DIRS="/lustre/data /lustre/plans", CONTAINER_MOUNTS="/scratch:/scratch")
    assert _run(env).returncode == 0
    for step in _records(stubs, "srun"):
        opts = dict(o[2:].split("=", 1) if "=" in o else (o[2:], "") for o in step["options"])
        mounts = opts["container-mounts"].split(",")
        project = str(stubs[2])
        assert mounts == [f"{project}:{project}", f"{save}:{save}", f"{init}:{init}", "/lustre/data:/lustre/data",
                          "/lustre/plans:/lustre/plans", "/scratch:/scratch"]
        assert "no-container-mount-home" in opts and opts["container-image"] == "nvcr.io#nvidia/pytorch:25.01-py3"
    # a container that does not see the host's SAVE: refused before any rank starts
    result = _run({**env, "STUB_HIDE_MARKER": "1", "STUB_SAVE": str(save)})
    assert result.returncode == 2 and f"SAVE {save} is not the host's folder" in result.stdout
    assert len(_records(stubs, "train")) == 1  # only the first run's ranks


def test_apptainer_binds_the_same_folders(stubs, tmp_path):
    save = tmp_path / "save"
    env = _env(stubs, APPTAINER_IMAGE="/images/mmprolong.sif", SAVE=save, DATA_DIRS="/lustre/data")
    result = _run(env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _records(stubs, "apptainer")
    assert len(calls) == 2  # the pre-flight and the ranks
    for call in calls:
        assert call[:2] == ["apptainer", "exec"] and "--nv" in call and "/images/mmprolong.sif" in call
        assert call[call.index("--bind") + 1] == f"{stubs[2]},{save},/lustre/data"
    assert len(_records(stubs, "train")) == 1
