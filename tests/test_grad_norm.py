"""The gradient norm the optimizer clips by and the training loop logs is the one-rank norm,
also when the vision encoder runs at a smaller tensor-parallel size than the language model.

With --vision-tensor-parallel-size < TP, each TP group holds TP / vision-TP copies of the vision
weights (each vision-TP subgroup encodes the same images, so the copies get equal gradients).
Megatron's norm counts a parameter on every TP rank when it is tensor-parallel and on TP rank 0
otherwise; without help it would count the vision shards once per copy."""

import numpy as np
import pytest
import torch

from megatron_mmprolong.config import ParallelConfig
from megatron_mmprolong.convert.parity import make_sample
from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
from megatron_mmprolong.data.loader import Segment, assemble_pack
from megatron_mmprolong.data.packing import Alignment

from conftest import tiny_config
from multiprocess import run_ranks
from pages import for_this_rank, random_pages

CONFIG = tiny_config(layers=2, kv_heads=4)  # 4 heads and 4 KV heads: TP4 shards it
NORM_RTOL = 1e-5


def _batches():
    """Two packs with images whose windows are cut by the image edges."""
    generator = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    special = {"pad": CONFIG.tokens.eos, "image_pad": CONFIG.tokens.image, "video_pad": CONFIG.tokens.video}
    batches = []
    for images in ([(1, 12, 20), (1, 6, 4)], [(1, 8, 8)]):
        sample = make_sample(CONFIG, generator, images=images, text_tokens=6)
        tokens = sample.input_ids[0].numpy().astype(np.int64)
        grids = sample.image_grid_thw.numpy()
        batches.append(assemble_pack([Segment(tokens, rng.random(len(tokens)) < 0.5, grids)],
                                     random_pages(grids, rng, CONFIG.vision.patch_size), Alignment(), special, 2))
    return batches


def _step(layout: dict, hf_dir) -> dict:
    """One training step as training/loop.py takes it (DDP, finalize_model_grads, Megatron's
    optimizer with clipping): the norm `get_grad_norm()` gives and the one `step()` returns,
    plus the vision parameters' share of the squared norm counted the optimizer's way."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron_mmprolong.training.loop import build_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.model.builder import build_model
    from megatron_mmprolong.training.step import forward_step

    parallel = ParallelConfig(**layout)
    runtime.initialize(parallel)
    model = build_model(CONFIG, parallel, calculate_per_token_loss=True, variable_seq_lengths=True)
    load_hf_weights(model, hf_dir)
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0, params_dtype=torch.float32), [ddp])
    batches = [for_this_rank(b, CONFIG.vision.patch_size) for b in _batches()]
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp], num_microbatches=len(batches),
        seq_length=max(b["tokens"].shape[1] for b in batches), micro_batch_size=1, forward_only=False)
    optimizer.prepare_grads()
    norm = optimizer.get_grad_norm()
    vision = torch.zeros(1, dtype=torch.float64)
    for name, param in model.named_parameters():
        if name.startswith("vision_model.") and param_is_not_shared(param) \
                and param_is_not_tensor_parallel_duplicate(param, ps.get_tensor_model_parallel_group()):
            vision += param.main_grad.double().square().sum()
    torch.distributed.all_reduce(vision, group=ps.get_model_parallel_group())
    _, stepped, _ = optimizer.step()  # clips by the norm it returns, as the loop logs it
    return {"norm": norm, "step_norm": stepped, "vision_squared": float(vision)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf")
    write_random_hf_checkpoint(CONFIG, hf_dir, seed=4)
    return hf_dir, run_ranks(_step, 1, {}, hf_dir)[0]


LAYOUTS = {
    "tp2": (dict(tensor_parallel=2), 2),
    "tp2-vision-tp1": (dict(tensor_parallel=2, vision_tensor_parallel=1), 2),
    "tp4-vision-tp2": (dict(tensor_parallel=4, vision_tensor_parallel=2), 4),  # copies of sharded weights
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_grad_norm_equals_one_rank(reference, name):
    hf_dir, single = reference
    layout, ranks = LAYOUTS[name]
    results = run_ranks(_step, ranks, layout, hf_dir)
    assert single["norm"] > 1.0  # the step clips
    for result in results:  # every rank clips by the same norm
        assert result["norm"] == pytest.approx(single["norm"], rel=NORM_RTOL), (name, result, single)
        assert result["step_norm"] == pytest.approx(single["norm"], rel=NORM_RTOL), name
        assert result["vision_squared"] == pytest.approx(single["vision_squared"], rel=NORM_RTOL), name
