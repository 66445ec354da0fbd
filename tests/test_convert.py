"""HF <-> Megatron-Core torch_dist conversion: bit-exact round trips, resharded loading with
verify, corruption and bad input caught before anything is written."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_mmprolong.cli import main
from megatron_mmprolong.config import ConfigError, ParallelConfig
from megatron_mmprolong.convert.hf_checkpoint import CheckpointError
from megatron_mmprolong.convert.hf_to_mcore import chunk_boxes, hf_to_mcore
from megatron_mmprolong.convert.mcore_to_hf import mcore_to_hf
from megatron_mmprolong.convert.output_dir import OutputExistsError
from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
from megatron_mmprolong.convert.torch_dist import TorchDistReader

from conftest import tiny_config, tiny_qwen3vl_config

TP2_PP2 = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)

# Shapes that a TP2/PP2 layout can shard (kv heads and layers even).
CONVERT_SHAPES = {
    "untied": dict(),
    "tied": dict(tied=True, hidden=48, heads=4, kv_heads=2, mrope_section=(2, 2, 2), vision_heads=2),
    "small-windows": dict(window_size=56, fullatt=(0, 2), depth=3, vision_heads=2, layers=4),
}


def _hf_tensors(directory):
    tensors = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            tensors.update(load_file(directory / name))
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory, runtime):
    """A random HF checkpoint and its TP2/PP2 torch_dist conversion."""
    root = tmp_path_factory.mktemp("convert")
    config = tiny_config(tied=False, layers=4)
    write_random_hf_checkpoint(config, root / "hf", seed=21)
    hf_to_mcore(root / "hf", root / "mcore", TP2_PP2, progress=False)
    return config, root


# Qwen3-VL: its 3 deepstack layers stay on the first of the two stages.
QWEN3_TP2_PP2 = ParallelConfig(tensor_parallel=2, pipeline_parallel=2, decoder_first_pipeline_num_layers=3)
QWEN3_CONVERT_SHAPES = {
    "qwen3vl": dict(),
    "qwen3vl-tied": dict(tied=True, head_dim=24, mrope_section=(4, 5, 3), vision_heads=2, deepstack=(1, 2)),
}


def _convert_case(shape):
    if shape in QWEN3_CONVERT_SHAPES:
        return tiny_qwen3vl_config(**QWEN3_CONVERT_SHAPES[shape]), QWEN3_TP2_PP2
    return tiny_config(**CONVERT_SHAPES[shape]), TP2_PP2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", sorted(CONVERT_SHAPES) + sorted(QWEN3_CONVERT_SHAPES))
def test_round_trip_is_bit_exact(shape, dtype, tmp_path, runtime):
    config, layout = _convert_case(shape)
    write_random_hf_checkpoint(config, tmp_path / "hf", seed=3, dtype=dtype)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", layout, progress=False)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", max_shard_bytes=300_000, progress=False)
    original, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    assert set(original) == set(back)
    for name, tensor in original.items():
        assert back[name].dtype == dtype and torch.equal(back[name], tensor), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded


def test_transformers_loads_the_export(converted, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config, root = converted
    mcore_to_hf(root / "mcore", tmp_path / "export", hf_template=root / "hf", progress=False)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "export")
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "hf")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "export" / "generation_config.json").is_file()


def test_chunks_follow_the_tensor_parallel_split(converted):
    config, root = converted
    reader = TorchDistReader(root / "mcore")
    info = json.loads((root / "mcore" / "mmprolong_checkpoint.json").read_text())
    qkv = "language_model.decoder.layers.self_attention.linear_qkv.weight"
    fc1 = "language_model.decoder.layers.mlp.linear_fc1.weight"
    assert reader.shape(qkv)[0] == config.text.num_layers
    assert sorted(info["checksums"][qkv])[:2] == ["0,0,0", "0,64,0"]  # TP2 halves of layer 0
    assert len(info["checksums"][fc1]) == config.text.num_layers * 4  # gate/up halves per rank
    assert info["parallel_layout"] == {"tensor_parallel": 2, "pipeline_parallel": 2, "vision_tensor_parallel": 2}


def test_chunk_boxes_respect_size_limits():
    boxes = chunk_boxes((8, 6), "glu", tp=2, max_elements=6)
    assert [(b[0].start, b[0].stop) for b in boxes] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    boxes = chunk_boxes((4, 8), "row", tp=2, max_elements=100)
    assert [(b[0].start, b[0].stop, b[1].start, b[1].stop) for b in boxes] == [(0, 4, 0, 4), (0, 4, 4, 8)]


def test_a_megatron_saved_checkpoint_exports_too(converted, tmp_path):
    """Our reader reads what megatron's own dist_checkpointing.save writes (e.g. training)."""
    from multiprocess import run_ranks

    config, root = converted
    run_ranks(_megatron_save, 1, config, root / "hf", tmp_path / "saved")
    mcore_to_hf(tmp_path / "saved", tmp_path / "export", hf_template=root / "hf", progress=False)
    original, back = _hf_tensors(root / "hf"), _hf_tensors(tmp_path / "export")
    assert all(torch.equal(back[n], t) for n, t in original.items())


def _megatron_save(config, hf_dir, out):
    from megatron.core import dist_checkpointing

    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.model.builder import build_model

    runtime.initialize()
    model = build_model(config)
    load_hf_weights(model, hf_dir)
    out.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(out))


def _training_like_save(config, hf_dir, save, drop):
    """A save directory as training writes it (iter dir, latest marker), with state beyond the
    weights, and without the tensors whose keys start with `drop`."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.checkpoint_info import LATEST, iteration_dir
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.model.builder import build_model

    runtime.initialize()
    model = build_model(config)
    load_hf_weights(model, hf_dir)
    state = {k: v for k, v in model.sharded_state_dict().items() if not (drop and k.startswith(drop))}
    probe = ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.probe", torch.ones(3), replica_id=0)
    state = {"model": state, "optimizer": {"probe": probe}, "iteration": 7, "args": {"lr": 1e-5}}
    iteration_dir(save, 7).mkdir(parents=True)
    dist_checkpointing.save(state, str(iteration_dir(save, 7)))
    (save / LATEST).write_text("7\n")


def test_weights_load_from_a_training_save_directory(converted, tmp_path, capsys):
    """Verify and export take a training --save directory (its latest checkpoint) and leave its
    optimizer state alone; a checkpoint that lacks a weight is refused by name."""
    from multiprocess import run_ranks

    config, root = converted
    run_ranks(_training_like_save, 1, config, root / "hf", tmp_path / "save", None)
    args = ["convert", "verify", "--hf-dir", str(root / "hf"), "--mcore-dir", str(tmp_path / "save"), "--atol", "1e-4"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["passed"]
    assert main(["convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "save"), "--out", str(tmp_path / "export"),
                 "--hf-template", str(root / "hf")]) == 0
    original, back = _hf_tensors(root / "hf"), _hf_tensors(tmp_path / "export")
    assert all(torch.equal(back[n], t) for n, t in original.items())

    run_ranks(_training_like_save, 1, config, root / "hf", tmp_path / "partial", "language_model.output_layer")
    args[args.index(str(tmp_path / "save"))] = str(tmp_path / "partial")
    assert main(args) == 2
    assert "lacks 1 tensors, e.g. ['language_model.output_layer.weight']" in capsys.readouterr().err


# ---- verify at other layouts (multi-process, gloo) -------------------------------------------

@pytest.mark.parametrize("tp, pp", [(1, 1), (1, 2), (2, 2)])
def test_tp2_pp2_checkpoint_verifies_at_other_layouts(converted, tp, pp, capsys):
    _, root = converted
    args = ["convert", "verify", "--hf-dir", str(root / "hf"), "--mcore-dir", str(root / "mcore"),
            "--tp", str(tp), "--pp", str(pp), "--atol", "1e-4"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-4
    assert (report["tensor_parallel"], report["pipeline_parallel"]) == (tp, pp)


def test_verify_catches_a_flipped_weight(converted, tmp_path, capsys):
    _, root = converted
    shutil.copytree(root / "hf", tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "model.safetensors")
    tensors["model.layers.2.self_attn.o_proj.weight"][1, 7] += 0.5
    save_file(tensors, tmp_path / "bad" / "model.safetensors")
    hf_to_mcore(tmp_path / "bad", tmp_path / "mcore", progress=False)
    args = ["convert", "verify", "--hf-dir", str(root / "hf"), "--mcore-dir", str(tmp_path / "mcore"), "--atol", "1e-4"]
    assert main(args) == 1
    assert json.loads(capsys.readouterr().out)["passed"] is False


def test_qwen3vl_conversion_exports_and_verifies_at_other_layouts(tmp_path, capsys, runtime):
    """A Qwen3-VL checkpoint converted at TP2 x PP2 loads back into transformers unchanged and
    verifies at one rank and at TP2 x PP2 with the deepstack layers on stage 0."""
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_qwen3vl_config()
    write_random_hf_checkpoint(config, tmp_path / "hf", seed=22)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", QWEN3_TP2_PP2, progress=False)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "export", hf_template=tmp_path / "hf", progress=False)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "export")
    reference = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    for layout in (["--tp", "1", "--pp", "1"], ["--tp", "2", "--pp", "2", "--decoder-first-pipeline-num-layers", "3"]):
        args = ["convert", "verify", "--hf-dir", str(tmp_path / "hf"), "--mcore-dir", str(tmp_path / "mcore"),
                "--atol", "1e-4", *layout]
        assert main(args) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["passed"] and report["max_abs_logit_diff"] < 1e-4, report
    args = ["convert", "verify", "--hf-dir", str(tmp_path / "hf"), "--mcore-dir", str(tmp_path / "mcore"),
            "--tp", "1", "--pp", "2"]
    assert main(args) == 2
    assert "deepstack adds vision features to the first 3" in capsys.readouterr().err


# ---- bad input, safety ------------------------------------------------------------------------

def _variant(root, tmp_path, mutate=None, config_change=None):
    bad = tmp_path / "bad"
    shutil.copytree(root / "hf", bad)
    if mutate:
        tensors = load_file(bad / "model.safetensors")
        mutate(tensors)
        save_file(tensors, bad / "model.safetensors")
    if config_change:
        data = json.loads((bad / "config.json").read_text())
        config_change(data)
        (bad / "config.json").write_text(json.dumps(data))
    return bad


@pytest.mark.parametrize(
    "mutate, config_change, error, message",
    [
        (lambda t: t.pop("visual.blocks.1.mlp.up_proj.bias"), None, CheckpointError, "visual.blocks.1.mlp.up_proj.bias"),
        (lambda t: t.update({"visual.extra.weight": torch.zeros(3)}), None, CheckpointError, "visual.extra.weight"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(60, 64)}), None,
         CheckpointError, r"model.layers.0.self_attn.q_proj.weight.*\(60, 64\)"),
        (None, lambda c: c["text_config"].update(intermediate_size=256), CheckpointError, "does config.json match"),
        (None, lambda c: c["text_config"].update(num_hidden_layers=6), CheckpointError, "missing, e.g. .*layers.4"),
    ],
)
def test_bad_checkpoints_fail_before_writing(converted, tmp_path, mutate, config_change, error, message):
    _, root = converted
    bad = _variant(root, tmp_path, mutate, config_change)
    with pytest.raises(error, match=message):
        hf_to_mcore(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_layout_that_does_not_divide_the_model(converted, tmp_path):
    _, root = converted
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size 3 does not divide num_layers 4"):
        hf_to_mcore(root / "hf", tmp_path / "out", ParallelConfig(pipeline_parallel=3), progress=False)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size 3"):
        hf_to_mcore(root / "hf", tmp_path / "out", ParallelConfig(tensor_parallel=3), progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_failures_keep_it(converted, tmp_path, monkeypatch):
    _, root = converted
    out = tmp_path / "out"
    hf_to_mcore(root / "hf", out, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        hf_to_mcore(root / "hf", out, progress=False)
    before = sorted(os.listdir(out))

    from megatron_mmprolong.convert import torch_dist

    def crash(self, *args):
        raise KeyboardInterrupt  # an interrupted run

    monkeypatch.setattr(torch_dist.TorchDistWriter, "close", crash)
    with pytest.raises(KeyboardInterrupt):
        hf_to_mcore(root / "hf", out, overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == before and not (tmp_path / ".out.partial").exists()
    monkeypatch.undo()
    hf_to_mcore(root / "hf", out, overwrite=True, progress=False)
    assert TorchDistReader(out).keys()


def test_corrupted_chunk_is_caught_by_its_checksum(converted, tmp_path):
    _, root = converted
    shutil.copytree(root / "mcore", tmp_path / "mcore")
    # Flip a byte in the middle of the largest chunk: inside its tensor data, so the file
    # still unpickles and only the checksum can tell.
    chunk = max((c for cs in TorchDistReader(root / "mcore")._chunks.values() for c in cs),
                key=lambda c: c.storage.length)
    data = tmp_path / "mcore" / chunk.storage.relative_path
    raw = bytearray(data.read_bytes())
    raw[chunk.storage.offset + chunk.storage.length // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_metadata_pickle_cannot_run_code(converted, tmp_path):
    _, root = converted
    shutil.copytree(root / "mcore", tmp_path / "mcore")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (tmp_path / "mcore" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="refusing to load"):
        TorchDistReader(tmp_path / "mcore")


def test_cli_round_trip_and_errors(converted, tmp_path, capsys):
    _, root = converted
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(root / "hf"), "--out", str(tmp_path / "m"),
                 "--tp", "2", "--dtype", "bf16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tensors"] > 0 and summary["gigabytes"] > 0
    assert TorchDistReader(tmp_path / "m").dtype("vision_model.patch_embed.weight") == torch.bfloat16
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(root / "hf"), "--out", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "h")]) == 2
    assert f"{tmp_path / 'nothing'} holds no checkpoint" in capsys.readouterr().err
    (tmp_path / "m" / "mmprolong_checkpoint.json").unlink()  # a torch_dist checkpoint of another tool
    assert main(["convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "m"), "--out", str(tmp_path / "h")]) == 2
    assert "pass --hf-template" in capsys.readouterr().err
