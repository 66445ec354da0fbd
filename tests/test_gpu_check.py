"""benchmarks/gpu_check.sh, the device check a session lent a GPU runs once, in its reduced CPU
size: every part runs and reports its figures, so the script cannot rot between loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    # `pytest -m gpu` is left out: here it only skips, and tests/test_gpu.py is in this suite anyway
    run = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--skip-tests", "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and "pytest_gpu" not in report
    for name in ("step_0k", "step_1k"):
        step = report[name]
        assert step["tokens"] >= 0.9 * {"step_0k": 512, "step_1k": 1024}[name] and step["pages"] > 0
        assert step["tflop"] > 0 and step["seconds"] > 0 and step["estimate_gib"] > 0
        assert 5 < step["loss"] < 9  # ~ln(1024) for a random tiny-1k model: the backward ran on a real loss
    assert report["needle_prompt_1k"]["new_tokens"] == 8
