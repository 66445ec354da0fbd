"""slurm/synth_qa.sbatch's vLLM server, with a stub `vllm` (an HTTP server listing its
--served-model-name values at /v1/models) and a stub python that records the synth-qa call: two
tasks on one node take two ports, and a task never talks to a server that is not its own."""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "synth_qa.sbatch"

VLLM = r'''
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[2:]
names = []
i = args.index("--served-model-name") + 1
while i < len(args) and not args[i].startswith("--"):
    names.append(args[i]); i += 1
port = int(args[args.index("--port") + 1])
with open(os.path.join(os.environ["STUB_LOG"], "vllm.jsonl"), "a") as f:
    f.write(json.dumps({"names": names, "port": port}) + "\n")
class Models(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": n} for n in names]}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", port), Models).serve_forever()  # a port in use: OSError, exit 1, like vLLM
'''

PYTHON = r'''
import json, os, subprocess, sys
if sys.argv[1] == "-c":
    sys.exit(subprocess.call([os.environ["REAL_PYTHON"], *sys.argv[1:]]))
with open(os.path.join(os.environ["STUB_LOG"], "synth.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
'''


class _Foreign(BaseHTTPRequestHandler):
    def do_GET(self):  # another task's vLLM, serving the same model name
        body = json.dumps({"data": [{"id": "Qwen2.5-VL-72B-Instruct"}]}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def foreign_server():
    """A server already on the port job 777 would start from (20000 + 777)."""
    server = HTTPServer(("127.0.0.1", 20777), _Foreign)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run(tmp_path, job_id, **variables):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for name, code in (("vllm", VLLM), ("python", PYTHON)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{code}")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "REAL_PYTHON": sys.executable,
           "PYTHON": str(bin_dir / "python"), "PROJECT_DIR": str(REPO), "INPUT": "/data/pdfs", "OUT": str(tmp_path / "out"),
           "MODEL": "/models/Qwen2.5-VL-72B-Instruct", "SLURM_JOB_ID": str(job_id), "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_ARRAY_TASK_COUNT": "2", "POLL_S": "0.2", **{k: str(v) for k, v in variables.items()}}
    if "PORT" not in variables:
        env.pop("PORT", None)
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in (log / "synth.jsonl").read_text().splitlines()] if (log / "synth.jsonl").exists() else []
    servers = [json.loads(line) for line in (log / "vllm.jsonl").read_text().splitlines()]
    return result, calls, servers


def test_a_task_takes_a_free_port_of_its_own_and_checks_it_reached_its_server(tmp_path, foreign_server):
    result, calls, servers = _run(tmp_path, 777)
    assert result.returncode == 0, result.stderr
    (server,) = servers
    assert server["port"] != 20777 and 20000 <= server["port"] < 32768  # the foreign server's port is skipped
    assert server["names"][0] == "Qwen2.5-VL-72B-Instruct" and server["names"][1].startswith("mmprolong-job777-")
    (call,) = calls
    assert call[call.index("--endpoint") + 1] == f"http://127.0.0.1:{server['port']}/v1"
    assert call[call.index("--model") + 1] == "Qwen2.5-VL-72B-Instruct"
    with socket.socket() as probe:  # the task's server is gone with the task
        assert probe.connect_ex(("127.0.0.1", server["port"])) != 0


def test_a_server_on_the_port_that_is_not_the_tasks_own_is_never_used(tmp_path, foreign_server):
    """The port is taken (PORT forced onto it): vLLM cannot start, and the task fails instead of
    sending its requests to the other task's server, which serves the same model name."""
    result, calls, servers = _run(tmp_path, 777, PORT=20777)
    assert result.returncode == 1
    assert "vLLM exited before serving on port 20777" in result.stderr
    assert calls == [] and len(servers) == 1
