"""`mmprolong plan`: the memory estimate against measured peaks of real training steps on CPU,
parameter counts against the built model, the 128K 7B plan, and the NeMo throughput reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_mmprolong.cli import main
from megatron_mmprolong.config import ParallelConfig, Qwen25VLConfig, TextConfig
from megatron_mmprolong.training import planner
from megatron_mmprolong.training.planner import Cluster, Layout, Workload

from conftest import tiny_config
from multiprocess import run_ranks
from pages import for_this_rank, random_pages

SEQ = 2048
PAGE = (1, 16, 16)  # 64 tokens, 256 patches
PAGES_PER_SAMPLE = 2


def _config() -> Qwen25VLConfig:
    """Small enough for CPU, big enough that weights, layers, vision and logits all weigh in."""
    base = tiny_config(vocab_size=4096, hidden=256, heads=8, kv_heads=2, mrope_section=(4, 6, 6), layers=4)
    text = dataclasses.replace(base.text, intermediate_size=768)
    vision = dataclasses.replace(base.vision, hidden_size=128, num_heads=4, intermediate_size=256, out_hidden_size=256)
    return dataclasses.replace(base, text=text, vision=vision)


def _batch(config, alignment):
    from megatron_mmprolong.convert.parity import make_sample
    from megatron_mmprolong.data.loader import Segment, assemble_pack

    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    special = {"pad": config.tokens.eos, "image_pad": config.tokens.image, "video_pad": config.tokens.video}
    segments, pixels = [], []
    image_tokens = PAGES_PER_SAMPLE * (PAGE[1] * PAGE[2] // 4 + 2)
    for _ in range(2):
        text = (SEQ // 2 - image_tokens - 16) // (PAGES_PER_SAMPLE + 1)
        sample = make_sample(config, generator, images=[PAGE] * PAGES_PER_SAMPLE, text_tokens=text)
        tokens = sample.input_ids[0].numpy().astype(np.int64)
        segments.append(Segment(tokens, rng.random(len(tokens)) < 0.5, sample.image_grid_thw.numpy()))
        pixels.append(random_pages(sample.image_grid_thw.numpy(), rng))
    return assemble_pack(segments, np.concatenate(pixels), alignment, special, 2)


def _measure(layout: dict, recompute: str, microbatches: int) -> dict:
    """On every rank: peak bytes of two fp32 training steps (model, DDP, Adam built inside the
    measurement), its parameter count and the packed length."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mmprolong import runtime
    from megatron_mmprolong.data.packing import Alignment
    from megatron_mmprolong.model.builder import build_model
    from megatron_mmprolong.training.step import forward_step
    from peak_memory import PeakMemory

    parallel = ParallelConfig(**layout)
    runtime.initialize(parallel)
    config = _config()
    batch = for_this_rank(_batch(config, Alignment(parallel.context_parallel, parallel.tensor_parallel,
                                                   parallel.sequence_parallel)))
    overrides = {"none": {}, "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
                 "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}
    tracker = PeakMemory()
    with tracker:
        model = build_model(config, parallel, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), calculate_per_token_loss=True,
                            variable_seq_lengths=True, **overrides[recompute])
        ddp = DistributedDataParallel(config=model.config, module=model,
                                      ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
        model.config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, params_dtype=torch.float32), [ddp])
        for _ in range(2):  # the second step has Adam's state
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch] * microbatches),
                                        model=[ddp], num_microbatches=microbatches, seq_length=batch["tokens"].shape[1],
                                        micro_batch_size=1, forward_only=False)
            optimizer.step()
    return {"peak": tracker.peak, "params": sum(p.numel() for p in model.parameters()),
            "stage": ps.get_pipeline_model_parallel_rank(), "tokens": batch["tokens"].shape[1]}


LAYOUTS = {
    "single": ({}, 1, "none", 1),
    "selective": ({}, 1, "selective", 1),
    "full-recompute": ({}, 1, "full", 1),
    "tp2-sp": (dict(tensor_parallel=2, sequence_parallel=True), 2, "none", 1),
    "pp2-two-microbatches": (dict(pipeline_parallel=2), 2, "none", 2),
    "cp2": (dict(context_parallel=2), 2, "none", 1),
    "dp2": ({}, 2, "none", 1),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_estimate_within_15_percent_of_measured_peak(name):
    layout, world, recompute, microbatches = LAYOUTS[name]
    ranks = run_ranks(_measure, world, layout, recompute, microbatches)
    tp, cp, pp = (layout.get(k, 1) for k in ("tensor_parallel", "context_parallel", "pipeline_parallel"))
    plan_layout = Layout(tp, cp, pp, world // (tp * cp * pp), recompute, distributed_optimizer=False)
    tokens = ranks[0]["tokens"]
    workload = Workload(tokens, global_batch=plan_layout.dp * microbatches, params_bytes=4, page_grid=PAGE,
                        image_fraction=2 * PAGES_PER_SAMPLE * (PAGE[1] * PAGE[2] // 4) / tokens)
    config = _config()
    for rank in ranks:  # parameter counts, per stage and TP shard, equal the model's
        assert planner.stage_parameters(config, tp, pp, rank["stage"]).total == rank["params"]
    estimate = planner.estimate_memory(config, workload, plan_layout, backend="local")
    measured = max(rank["peak"] for rank in ranks)
    assert abs(estimate.total / measured - 1) <= 0.15, (name, estimate, measured)


def test_activation_memory_follows_the_layout():
    """Cheap orientation checks of the estimate (the measured comparison above is the real test)."""
    config, workload = Qwen25VLConfig.preset("7b"), Workload(131072, global_batch=8)
    memory = {name: planner.estimate_memory(config, workload, layout) for name, layout in {
        "base": Layout(2, 4, 1, 8), "cp8": Layout(2, 8, 1, 4), "full": Layout(2, 4, 1, 8, "full"),
        "no-distopt": Layout(2, 4, 1, 8, distributed_optimizer=False)}.items()}
    assert memory["cp8"].activations == pytest.approx(memory["base"].activations / 2)
    assert memory["full"].activations < memory["base"].activations / 10
    params = planner.stage_parameters(config, 2, 1, 0).total
    assert memory["no-distopt"].optimizer == pytest.approx(12 * params)
    assert memory["base"].optimizer == pytest.approx(12 * params / 8)
    assert memory["base"].weights + memory["base"].gradients == pytest.approx(6 * params)


def test_7b_at_128k_on_8_nodes_has_a_feasible_layout(capsys):
    assert main(["plan", "--preset", "7b", "--seq-length", "131072", "--gpus-per-node", "8", "--gpu-memory", "80",
                 "--nodes", "8", "--fp8"]) == 0
    out = capsys.readouterr().out
    assert "fit in memory" in out and "--fp8-format hybrid" in out and "sbatch --nodes=8" in out
    config, workload = Qwen25VLConfig.preset("7b"), Workload(131072, global_batch=32, fp8=True)
    estimates = planner.plan(config, workload, Cluster(8, 8, 80))
    best = estimates[0]
    assert best.fits and best.memory.total <= 80 * planner.GIB
    layout = best.layout
    assert layout.tp * layout.cp * layout.pp * layout.dp == 64 and layout.tp <= 8
    # the printed arguments are the best layout's, and `mmprolong train` accepts them
    from megatron_mmprolong.training.arguments import parse_args

    args = parse_args(planner.training_arguments(best, workload) + ["--data-mix", "x.yaml"])
    assert (args.tensor_model_parallel_size, args.context_parallel_size, args.pipeline_model_parallel_size) == \
        (layout.tp, layout.cp, layout.pp)
    # one GPU cannot hold 7B at 128K without sharding the sequence
    lone = planner.estimate_memory(config, workload, Layout(1, 1, 1, 64), reserved_gib=4)
    assert lone.total > 80 * planner.GIB


def test_nemo_llama2_7b_128k_reference():
    """NeMo's published long-context figure: Llama2-7B shapes, 128K tokens, TP4 x CP4, 128 H100s,
    FP8: 555 TFLOP/s per GPU. The planner's rate model lands within 15% of it (README)."""
    llama = Qwen25VLConfig(text=TextConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_attention_heads=32,
                                           num_key_value_heads=32, intermediate_size=11008, mrope_section=(16, 24, 24)))
    workload = Workload(131072, global_batch=64, image_fraction=0.0, fp8=True)
    cluster = Cluster(16, 8, 80)
    estimate = [e for e in planner.plan(llama, workload, cluster, ("none",))
                if (e.layout.tp, e.layout.cp, e.layout.pp) == (4, 4, 1)][0]
    assert estimate.fits
    assert abs(estimate.tflops_per_gpu / 555 - 1) <= 0.15, estimate.tflops_per_gpu


def test_plan_rejects_bad_input(capsys):
    assert main(["plan", "--recompute", "sometimes"]) == 2
    assert "recompute must be among" in capsys.readouterr().err
    assert main(["plan", "--preset", "7b", "--nodes", "1", "--gpu-memory", "8", "--seq-length", "131072"]) == 1
    assert "no layout fits" in capsys.readouterr().out


def test_the_7b_recipe_layout_fits_only_with_its_recompute():
    """examples/mmprolong_7b_128k.yaml on its 8 x 8 H100: the planner agrees with its choices."""
    from pathlib import Path

    from megatron_mmprolong.training.arguments import read_recipe

    recipe = read_recipe(Path(__file__).parents[1] / "examples" / "mmprolong_7b_128k.yaml")
    tp, cp = recipe["tensor_model_parallel_size"], recipe["context_parallel_size"]
    workload = Workload(recipe["seq_length"], recipe["global_batch_size"], fp8=recipe["fp8_format"] is not None)
    layout = Layout(tp, cp, 1, 64 // (tp * cp), recipe["recompute_granularity"], recipe["use_distributed_optimizer"])
    config = Qwen25VLConfig.preset(recipe["model"])
    assert planner.estimate_memory(config, workload, layout, reserved_gib=4).total <= 80 * planner.GIB
    without = dataclasses.replace(layout, recompute="none")
    assert planner.estimate_memory(config, workload, without, reserved_gib=4).total > 80 * planner.GIB


def test_printed_arguments_override_the_recipe():
    """Pasted after the 7B recipe (TP2 x CP4, SP, full recompute, FP8, distributed optimizer), a
    plan's arguments give exactly the plan's layout, switches turned off included."""
    from pathlib import Path

    from megatron_mmprolong.training.arguments import parse_args

    recipe = str(Path(__file__).parents[1] / "examples" / "mmprolong_7b_128k.yaml")
    for layout, fp8 in ((Layout(1, 8, 1, 8, "none", distributed_optimizer=False), False),
                        (Layout(4, 2, 2, 4, "selective"), True), (Layout(2, 4, 1, 8, "full"), True)):
        estimate = planner.Estimate(layout, None, 1.0, 1.0, True)
        args = parse_args(["--config", recipe, *planner.training_arguments(estimate, Workload(131072, 32, fp8=fp8))])
        assert (args.tensor_model_parallel_size, args.context_parallel_size, args.pipeline_model_parallel_size) == \
            (layout.tp, layout.cp, layout.pp)
        assert args.sequence_parallel == layout.sequence_parallel
        assert args.use_distributed_optimizer == layout.distributed_optimizer
        assert (args.recompute_granularity or "none") == layout.recompute
        assert (args.fp8_format == "hybrid") == fp8 and args.bf16
