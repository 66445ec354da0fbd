"""Distributed checkpoints at a vision TP smaller than TP.

With --vision-tensor-parallel-size < TP each TP group holds TP / vision-TP copies of the vision
encoder, one per vision-TP subgroup. Only the copy holding TP rank 0 may be the main replica of the
vision shards: a checkpoint is written once per shard. Saved at TP2/vision-TP1, the weights load at
the same layout, at TP1 and at TP2/vision-TP2 (resharded) exactly as the HF loader places them
there; saved at TP1 they load at TP2/vision-TP1; and `train --save` at TP2/vision-TP1 resumes bit
for bit (optimizer state included)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mmprolong.config import ParallelConfig

from conftest import tiny_qwen3vl_config
from multiprocess import run_ranks

# Qwen3-VL: position grid, deepstack mergers; vision heads 4 so vision TP2 shards it too
CONFIG = tiny_qwen3vl_config(layers=2, deepstack=(0, 2), vision_depth=3)
TP1 = dict(tensor_parallel=1)
TP2 = dict(tensor_parallel=2)
TP2_VISION_TP1 = dict(tensor_parallel=2, vision_tensor_parallel=1)


def _build(layout: dict, hf_dir=None):
    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.model.builder import build_model

    parallel = ParallelConfig(**layout)
    runtime.initialize(parallel)
    model = build_model(CONFIG, parallel)
    if hf_dir is not None:
        load_hf_weights(model, hf_dir)
    return model


def _save_then_load(hf_dir, directory, save_layout: dict, load_layouts: list[dict]) -> dict:
    """Saves the HF weights at `save_layout`; for each of `load_layouts` the names of the tensors
    that loaded otherwise than the HF loader places them at that layout."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_mmprolong.convert.mcore_checkpoint import load_mcore_checkpoint

    model = _build(save_layout, hf_dir)
    if dist.get_rank() == 0:
        Path(directory).mkdir()
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))
    differ = {}
    for layout in load_layouts:
        expected = _build(layout, hf_dir).state_dict()
        model = _build(layout)
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()  # a tensor the load missed stays zero
        load_mcore_checkpoint(model, directory)
        loaded = model.state_dict()
        assert loaded.keys() == expected.keys()
        differ[json.dumps(layout)] = [name for name, value in loaded.items() if isinstance(value, torch.Tensor)
                                      and not torch.equal(value, expected[name])]
    return differ


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    path = tmp_path_factory.mktemp("hf")
    write_random_hf_checkpoint(CONFIG, path, seed=7)
    return path


@pytest.mark.parametrize("save_layout, load_layouts", [
    (TP2_VISION_TP1, [TP2_VISION_TP1, TP1, TP2]),
    (TP1, [TP2_VISION_TP1]),
], ids=["save-tp2-vision-tp1", "save-tp1"])
def test_weights_round_trip_across_vision_tp(hf_dir, tmp_path, save_layout, load_layouts):
    for differ in run_ranks(_save_then_load, 2, hf_dir, tmp_path / "checkpoint", save_layout, load_layouts):
        assert differ == {json.dumps(layout): [] for layout in load_layouts}


def test_a_copy_that_is_not_first_holds_no_main_replica(runtime):
    """One process, the copy flag set by hand: every vision shard (tensors, factories, objects) of
    a copy that is not first is no main replica and keeps Megatron's (PP, TP, DP) form, which the
    distributed optimizer asserts; the language model's shards are untouched."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, is_main_replica

    from megatron_mmprolong.model.builder import build_model

    model = build_model(CONFIG)
    first = {s.key: s.replica_id for s in nested_values(model.sharded_state_dict()) if isinstance(s, ShardedBase)}
    model.vision_model.first_copy = False
    other = {s.key: s.replica_id for s in nested_values(model.sharded_state_dict()) if isinstance(s, ShardedBase)}
    assert other.keys() == first.keys()
    vision = [key for key in first if key.startswith("vision_model.")]
    assert vision and all(is_main_replica(first[key]) for key in first)
    assert all(not is_main_replica(other[key]) and len(other[key]) == 3 for key in vision)
    assert all(other[key] == first[key] for key in first if key not in vision)


# ---- the training loop: train --save at TP2/vision-TP1 and resume bit for bit -------------------

EXAMPLES = Path(__file__).parents[1] / "examples"


def _train(mix, save, *extra):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               "-m", "megatron_mmprolong.train", "--config", str(EXAMPLES / "cpu_tiny.yaml"), "--data-mix", str(mix),
               "--seq-length", "2048", "--save", str(save), "--log-interval", "1", "--num-workers", "1",
               "--tensor-model-parallel-size", "2", "--vision-tensor-parallel-size", "1", *extra]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    lines = (Path(save) / "train_metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["loss"] for r in map(json.loads, lines)}


def test_train_saves_and_resumes_bit_for_bit_at_vision_tp_below_tp(tiny_train_data, tmp_path):
    *_, mix = tiny_train_data
    straight = tmp_path / "straight"
    expected = _train(mix, straight, "--train-iters", "4", "--save-interval", "2")
    assert sorted(expected) == [1, 2, 3, 4]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "iter_0000002", resumed / "iter_0000002")
    (resumed / "latest_checkpointed_iteration.txt").write_text("2")
    assert _train(mix, resumed, "--train-iters", "4", "--load", str(resumed)) == {i: expected[i] for i in (3, 4)}
