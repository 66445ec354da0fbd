"""benchmarks/gpu_check.sh, the device check a session lent a GPU runs once, in its reduced CPU
size: every part runs and reports its figures, so the script cannot rot between loans; a part
that fails keeps the others' figures in the report and fails the check."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_on_the_cpu_keeps_every_other_part_when_one_fails(tmp_path):
    out = tmp_path / "gpu_check.json"
    # `pytest -m gpu` is left out: here it only skips, and tests/test_gpu.py is in this suite anyway
    run = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--skip-tests", "--out", str(out),
                          "--fail-part", "qwen25vl.step_512"],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and "pytest_gpu" not in report and report["finished"]
    errors = {k: v.get("error") or v.get("skipped") for k, v in report.items() if isinstance(v, dict)
              and ({"error", "skipped"} & v.keys())}
    assert report["failed"] == ["qwen25vl.step_512"] and len(errors) == 1, errors
    failed = report["qwen25vl.step_512"]
    assert "InjectedFailure" in failed["error"] and failed["tokens"] > 0  # the figures it had are kept
    assert report["setup"]["device_used"] == "cpu" and report["data"]["pages"] >= 4
    for family in ("qwen25vl", "qwen3vl"):
        assert report[f"{family}.model"]["parameters"] > 0
        for length in (512, 1024):
            step = report[f"{family}.step_{length if length < 1024 else '1k'}"]
            assert 0.8 * length <= step["tokens"] <= length and step["pages"] > 1, step
            assert step["tflop"] > 0 and step["seconds"] > 0 and step["estimate_gib"] > 0 and step["build_seconds"] > 0
            # the training loader's batches: a worker process, pinning asked only where CUDA is
            assert step["loader_workers"] == 1 and step["pin_memory"] is False and step["pinned"] is False
            assert step["batch_mib"] > 0 and step["loader_wait_s"] >= 0
            if f"{family}.step_{length}" != "qwen25vl.step_512":
                assert "error" not in step
                assert 5 < step["loss"] < 9  # ~ln(1024) for a random tiny-1k model: the backward ran on a real loss
        assert report[f"{family}.needle_1k"]["new_tokens"] == 8


def test_the_report_is_written_as_each_part_ends(gpu_check, tmp_path):
    out = tmp_path / "report.json"
    report = gpu_check.Report(out, header={"mode": "test"})
    assert json.loads(out.read_text()) == {"mode": "test", "finished": False}

    def first(figures):
        figures["a"] = 1
        assert json.loads(out.read_text())["first"]["running"]  # a killed run says which part it was in

    report.run("first", first, device=False)
    assert json.loads(out.read_text())["first"]["a"] == 1
    report.run("second", lambda f: 1 / 0, device=False)
    report.run("third", lambda f: f.update(b=2), needs=("second",), device=False)
    written = json.loads(out.read_text())
    assert "ZeroDivisionError" in written["second"]["error"] and "needs second" in written["third"]["skipped"]
    assert report.finish() == 1 and json.loads(out.read_text())["failed"] == ["second"]
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left
    assert gpu_check.Report(tmp_path / "ok.json").finish() == 0


def test_the_error_handler_survives_a_lost_cuda_context(gpu_check, tmp_path, monkeypatch):
    """After a device-side assert every CUDA call raises again, empty_cache included."""
    def lost(*args):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("synchronize", "empty_cache", "set_sync_debug_mode"):
        monkeypatch.setattr(torch.cuda, name, lost)
    report = gpu_check.Report(tmp_path / "report.json")
    report.run("assert", lost)
    after = report.run("device_part", lambda f: f.update(ran=True))
    host = report.run("host_part", lambda f: f.update(ran=True) or "done", device=False)
    written = json.loads((tmp_path / "report.json").read_text())
    assert "device-side assert" in written["assert"]["error"] and "cleanup_error" in written["assert"]
    assert after is None and "CUDA is unusable since the error in assert" in written["device_part"]["skipped"]
    assert host == "done" and written["host_part"]["ran"]


@pytest.mark.parametrize("body, timeout, message", [
    ("def test_broken():\n    assert False\n", 300, "pytest -m gpu failed (exit 1)"),
    ("import time\n\ndef test_hangs():\n    time.sleep(600)\n", 4, "did not finish in 4 s"),
])
def test_a_failing_or_hanging_gpu_test_fails_its_part(gpu_check, tmp_path, body, timeout, message):
    test = tmp_path / "test_device.py"
    test.write_text("import pytest\n\npytestmark = pytest.mark.gpu\n\n\n" + body)
    report = gpu_check.Report(tmp_path / "report.json")
    report.run("pytest_gpu", lambda f: gpu_check.gpu_tests(f, timeout=timeout, targets=[test]), device=False)
    assert message in report.data["pytest_gpu"]["error"] and report.finish() == 1


def test_the_gpu_shapes_are_the_families_cut_short(gpu_check):
    """The GPU sizes cannot run here; their configs and page geometry can be checked."""
    from megatron_mmprolong.config import VLConfig

    for family, preset, tokens_per_page in (("qwen25vl", "7b", 2508), ("qwen3vl", "qwen3vl-8b", 1900)):
        config = gpu_check.check_config(family, cpu=False)
        full = VLConfig.preset(preset)
        assert config.family == full.family and config.text.vocab_size == full.text.vocab_size
        assert (config.text.hidden_size, config.text.num_layers, config.vision.depth) == (full.text.hidden_size, 2, 4)
        assert config.tokens == gpu_check.check_config(family, cpu=True).tokens  # the tiny tokenizer's ids
        assert gpu_check.page_tokens(config, cpu=False) == tokens_per_page
