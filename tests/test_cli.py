import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from megatron_mmprolong.cli import main
from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

from conftest import tiny_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    write_random_hf_checkpoint(tiny_config(), path, seed=2)
    return path


def test_model_info_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_mmprolong.cli", "model-info", "--preset", "7b"],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.stdout)
    assert (report["total"], report["vision"], report["language"]) == (8292166656, 676550144, 7615616512)


def test_model_info_from_hf_dir(hf_dir, capsys, runtime):
    assert main(["model-info", "--hf-dir", str(hf_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["language_config"]["vocab"] == 1024 and report["total"] == report["vision"] + report["language"]


def test_check_parity_passes_on_a_good_checkpoint(hf_dir, capsys, runtime):
    assert main(["check-parity", "--hf-dir", str(hf_dir), "--atol", "1e-4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-4 and report["top1_agreement"] == 1.0


def test_check_parity_exits_1_above_tolerance(hf_dir, capsys, runtime):
    # Real differences are ~1e-6 here; a zero tolerance must fail the check.
    assert main(["check-parity", "--hf-dir", str(hf_dir), "--atol", "0"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["max_abs_logit_diff"] > 0


def test_parity_sees_one_differing_weight(hf_dir, tmp_path, runtime):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmprolong.config import Qwen25VLConfig
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.parity import run_parity
    from megatron_mmprolong.model.builder import build_model

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] += 1.0
    save_file(tensors, bad / "model.safetensors")
    config = Qwen25VLConfig.from_hf_dir(hf_dir)
    model = build_model(config)
    load_hf_weights(model, bad)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager")
    assert run_parity(model, reference, config)["max_abs_logit_diff"] > 1e-3


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["check-parity", "--hf-dir", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
