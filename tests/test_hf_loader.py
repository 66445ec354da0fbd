import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_mmprolong.convert.hf_checkpoint import CheckpointError, HFCheckpoint
from megatron_mmprolong.convert.hf_loader import load_hf_weights
from megatron_mmprolong.convert.parity import make_sample, our_logits
from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
from megatron_mmprolong.model.builder import build_model

from conftest import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config()
    path = tmp_path_factory.mktemp("hf")
    write_random_hf_checkpoint(config, path, seed=5)
    return config, path


def _copy(src, dst, mutate):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    mutate(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def _logits(config, path):
    model = build_model(config)
    load_hf_weights(model, path)
    sample = make_sample(config, torch.Generator().manual_seed(0), images=[(1, 6, 8)])
    with torch.no_grad():
        return our_logits(model, sample)


def test_nested_key_layout_loads_the_same(checkpoint, tmp_path, runtime):
    config, path = checkpoint

    def nest(tensors):
        for name in list(tensors):
            if name.startswith("model."):
                tensors["model.language_model." + name[len("model."):]] = tensors.pop(name)
            elif name.startswith("visual."):
                tensors["model." + name] = tensors.pop(name)

    nested = _copy(path, tmp_path / "nested", nest)
    assert torch.equal(_logits(config, nested), _logits(config, path))


def test_sharded_checkpoint_with_index_loads(checkpoint, tmp_path, runtime):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config, path = checkpoint
    Qwen2_5_VLForConditionalGeneration.from_pretrained(path).save_pretrained(
        tmp_path, max_shard_size="200KB"
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(_logits(config, tmp_path), _logits(config, path))


def test_missing_tensor_is_named(checkpoint, tmp_path, runtime):
    config, path = checkpoint
    broken = _copy(path, tmp_path / "b", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf_weights(build_model(config), broken)


def test_unexpected_shape_names_the_tensor_and_file(checkpoint, tmp_path, runtime):
    config, path = checkpoint

    def shrink(tensors):
        tensors["visual.blocks.2.attn.proj.weight"] = tensors["visual.blocks.2.attn.proj.weight"][:, :32].contiguous()

    broken = _copy(path, tmp_path / "b", shrink)
    with pytest.raises(CheckpointError, match=r"model.safetensors: visual.blocks.2.attn.proj.weight .*\(64, 32\)"):
        load_hf_weights(build_model(config), broken)


def test_config_that_does_not_match_the_weights(checkpoint, runtime):
    config, path = checkpoint
    wider = dataclasses.replace(config, text=dataclasses.replace(config.text, intermediate_size=256))
    with pytest.raises(CheckpointError, match="gate_proj.weight.*expects"):
        load_hf_weights(build_model(wider), path)


def test_tensors_the_model_lacks_are_reported(checkpoint, tmp_path, runtime):
    config, path = checkpoint
    broken = _copy(path, tmp_path / "b", lambda t: t.update({"model.layers.9.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="model.layers.9.extra"):
        load_hf_weights(build_model(config), broken)


def test_missing_shard_and_missing_files(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="missing: \\['model-00001-of-00002.safetensors'\\]"):
        HFCheckpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        HFCheckpoint(empty)


def test_truncated_file_is_an_error_naming_it(checkpoint, tmp_path):
    _, path = checkpoint
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        with HFCheckpoint(tmp_path) as ckpt:
            for name in ckpt.names():
                ckpt.get(name)
