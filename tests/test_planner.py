"""`mmprolong plan`: the memory estimate against measured peaks of real training steps on CPU,
parameter counts against the built model, the 128K 7B plan, and the NeMo throughput reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_mmprolong.cli import main
from megatron_mmprolong.config import ParallelConfig, Qwen3VLConfig, Qwen25VLConfig, TextConfig, VLConfig
from megatron_mmprolong.training import planner
from megatron_mmprolong.training.planner import Cluster, Layout, Workload

from conftest import tiny_config, tiny_qwen3vl_config
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


def _qwen3vl_config() -> Qwen3VLConfig:
    """The same scale in Qwen3-VL's shape: heads x head dim (384) != hidden, q/k norms, no QKV
    bias; LayerNorm, fc1/fc2 vision MLPs, position grid, three deepstack levels."""
    base = tiny_qwen3vl_config(heads=8, kv_heads=2, head_dim=48, mrope_section=(8, 8, 8))
    text = dataclasses.replace(base.text, vocab_size=4096, hidden_size=256, intermediate_size=768)
    vision = dataclasses.replace(base.vision, hidden_size=128, num_heads=4, intermediate_size=256,
                                 out_hidden_size=256)
    return dataclasses.replace(base, text=text, vision=vision)


CONFIGS = {"qwen2.5-vl": _config, "qwen3-vl": _qwen3vl_config}


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
        pixels.append(random_pages(sample.image_grid_thw.numpy(), rng, config.vision.patch_size))
    return assemble_pack(segments, np.concatenate(pixels), alignment, special, 2)


def _measure(layout: dict, recompute: str, microbatches: int, family: str = "qwen2.5-vl") -> dict:
    """On every rank: peak bytes of two fp32 training steps (model, DDP, Adam built inside the
    measurement), its parameter count and the packed length."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron_mmprolong.training.loop import build_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mmprolong import runtime
    from megatron_mmprolong.data.packing import Alignment
    from megatron_mmprolong.model.builder import build_model
    from megatron_mmprolong.training.step import forward_step
    from peak_memory import PeakMemory

    parallel = ParallelConfig(**layout)
    runtime.initialize(parallel)
    config = CONFIGS[family]()
    batch = for_this_rank(_batch(config, Alignment(parallel.context_parallel, parallel.tensor_parallel,
                                                   parallel.sequence_parallel)), config.vision.patch_size)
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
        optimizer = build_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, params_dtype=torch.float32), [ddp])
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
    "qwen3vl-single": ({}, 1, "none", 1, "qwen3-vl"),
    "qwen3vl-tp2-sp": (dict(tensor_parallel=2, sequence_parallel=True), 2, "none", 1, "qwen3-vl"),
    "qwen3vl-full-recompute": ({}, 1, "full", 1, "qwen3-vl"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_estimate_within_15_percent_of_measured_peak(name):
    layout, world, recompute, microbatches, *family = LAYOUTS[name]
    family = family[0] if family else "qwen2.5-vl"
    ranks = run_ranks(_measure, world, layout, recompute, microbatches, family)
    tp, cp, pp = (layout.get(k, 1) for k in ("tensor_parallel", "context_parallel", "pipeline_parallel"))
    plan_layout = Layout(tp, cp, pp, world // (tp * cp * pp), recompute, distributed_optimizer=False)
    tokens = ranks[0]["tokens"]
    workload = Workload(tokens, global_batch=plan_layout.dp * microbatches, params_bytes=4, page_grid=PAGE,
                        image_fraction=2 * PAGES_PER_SAMPLE * (PAGE[1] * PAGE[2] // 4) / tokens)
    config = CONFIGS[family]()
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
    FP8: 555 TFLOP/s per GPU. The planner's rate model lands within 15% of it (docs/planner.md)."""
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


@pytest.mark.parametrize("recipe_name", ["mmprolong_7b_128k.yaml", "qwen3vl_8b_128k.yaml"])
def test_the_128k_recipe_layouts_fit_only_with_their_recompute(recipe_name):
    """examples/*_128k.yaml on their 8 x 8 H100: the planner agrees with their choices."""
    from pathlib import Path

    from megatron_mmprolong.training.arguments import read_recipe

    recipe = read_recipe(Path(__file__).parents[1] / "examples" / recipe_name)
    tp, cp = recipe["tensor_model_parallel_size"], recipe["context_parallel_size"]
    workload = Workload(recipe["seq_length"], recipe["global_batch_size"], fp8=recipe["fp8_format"] is not None)
    layout = Layout(tp, cp, 1, 64 // (tp * cp), recipe["recompute_granularity"], recipe["use_distributed_optimizer"])
    config = VLConfig.preset(recipe["model"])
    assert planner.estimate_memory(config, workload, layout, reserved_gib=4).total <= 80 * planner.GIB
    without = dataclasses.replace(layout, recompute="none")
    assert planner.estimate_memory(config, workload, without, reserved_gib=4).total > 80 * planner.GIB


def test_qwen3vl_recipe_keeps_its_rope_base():
    """128K is inside Qwen3-VL's pretrained 256K window: the recipe keeps base 5e6."""
    from pathlib import Path

    from megatron_mmprolong.training.arguments import read_recipe

    recipe = read_recipe(Path(__file__).parents[1] / "examples" / "qwen3vl_8b_128k.yaml")
    config = VLConfig.preset(recipe["model"])
    assert recipe["rotary_base"] == config.text.rope_theta == 5e6
    assert recipe["seq_length"] <= config.text.max_position_embeddings


@pytest.mark.parametrize("name", ["7b", "qwen3vl-2b", "qwen3vl-8b"])
def test_parameter_counts_equal_transformers_on_meta(name):
    """Every family's parameters (LayerNorm biases, fc1/fc2 MLPs, patch-embedding bias, position
    grid, deepstack mergers, q/k norms, no QKV bias, tied embeddings) counted as transformers builds them."""
    from megatron_mmprolong.convert.transformers_model import hf_model_class, hf_model_config

    config = VLConfig.preset(name)
    with torch.device("meta"):
        hf = hf_model_class(config)(hf_model_config(config))
    total = sum(p.numel() for p in hf.parameters())  # a tied embedding once
    vision = sum(p.numel() for p in hf.model.visual.parameters())
    counted = planner.stage_parameters(config, 1, 1, 0)
    assert (counted.total, counted.vision) == (total, vision)


def test_deepstack_memory_scales_with_levels():
    config = Qwen3VLConfig.preset("qwen3vl-8b")
    workload, layout = Workload(131072, global_batch=16), Layout(2, 4, 2, 8, "full")
    one = dataclasses.replace(config, vision=dataclasses.replace(config.vision, deepstack_visual_indexes=(8,)))
    memory = planner._stage_memory(config, workload, layout, "te", 0.0, 0)
    single = planner._stage_memory(one, workload, layout, "te", 0.0, 0)
    # [tokens / CP / TP (SP), levels, hidden] bf16 per micro-batch, two in flight on stage 0 of 2
    assert memory.deepstack == 2 * 131072 / 4 / 2 * 3 * 4096 * 2
    assert memory.deepstack == pytest.approx(3 * single.deepstack)
    assert memory.vision > single.vision  # two more mergers and their taps
    assert planner._stage_memory(config, workload, layout, "te", 0.0, 1).deepstack == 0  # not on the last stage
    assert planner.estimate_memory(Qwen25VLConfig.preset("7b"), workload, layout).deepstack == 0


def test_qwen3vl_vision_blocks_keep_two_mlp_matrices():
    """The fc1 -> act -> fc2 MLP keeps 2 ffn-wide tensors per patch, SwiGLU 3 (TE)."""
    config = Qwen3VLConfig.preset("qwen3vl-8b")
    v = config.vision
    gated = dataclasses.replace(config, vision=dataclasses.replace(v, gated_mlp=True))
    workload, layout = Workload(131072, global_batch=8), Layout(2, 4, 1, 8)
    patches = float(workload.image_grids(config).prod(1).sum()) / 4
    extra = v.depth * (planner.TE_SAVED.ffn - planner.TE_SAVED.plain_ffn) * v.intermediate_size / 2 * patches * 2
    difference = (planner.estimate_memory(gated, workload, layout).vision
                  - planner.estimate_memory(config, workload, layout).vision)
    assert planner.TE_SAVED.plain_ffn == 2 and difference == pytest.approx(extra)


def test_qwen3vl_8b_plan_on_the_command_line(capsys):
    assert main(["plan", "--preset", "qwen3vl-8b", "--seq-length", "131072", "--nodes", "8", "--fp8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Qwen3-VL qwen3vl-8b:") and "deepst." in out and "sbatch --nodes=8" in out
    # its pages are 32 px per token: a Letter page at 144 DPI is 1.9K tokens
    assert planner.letter_page_grid(Qwen3VLConfig.preset("qwen3vl-8b")) == (1, 76, 100)
    assert planner.letter_page_grid(Qwen25VLConfig.preset("7b")) == (1, 88, 114)


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
