"""TP, TP+SP, CP, PP and TP x CP give the single-process loss (1e-5) and gradients (1e-4 relative)
through Megatron-Core's schedules, for one-sample and multi-sample packed (THD) micro-batches
whose samples are not multiples of 2*CP; with activation recompute off, selective and full; for
Qwen2.5-VL and for Qwen3-VL (deepstack features split over CP and SP like the embeddings)."""

import numpy as np
import pytest
import torch

from megatron_mmprolong.config import ParallelConfig
from megatron_mmprolong.convert.hf_mapping import canonical_name, shard, tensor_rules
from megatron_mmprolong.convert.parity import make_sample
from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
from megatron_mmprolong.data.loader import Segment, assemble_pack
from megatron_mmprolong.data.packing import Alignment
from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.data.pixels import patchify_pages

from conftest import tiny_config, tiny_qwen3vl_config
from multiprocess import run_ranks
from pages import for_this_rank, random_pages

LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4
MODES = ("none", "selective", "full")
CONFIG = tiny_config(layers=4, kv_heads=2)
CONFIGS = {"qwen2_5_vl": CONFIG, "qwen3_vl": tiny_qwen3vl_config()}  # 4 layers each; Qwen3: 3 deepstack levels
ALIGNMENT = Alignment(context_parallel=2, tensor_parallel=2, sequence_parallel=True)  # multiple of 8


def _batches(config=CONFIG):
    """A one-sample pack and a three-sample pack; raw sample lengths are not multiples of 8."""
    generator = torch.Generator().manual_seed(12)
    rng = np.random.default_rng(12)
    special = {"pad": config.tokens.eos, "image_pad": config.tokens.image, "video_pad": config.tokens.video}
    packs = [[dict(images=[(1, 12, 20), (1, 6, 4)], text_tokens=5)],
             [dict(images=[(1, 8, 8)], text_tokens=6), dict(images=[(1, 4, 6), (1, 10, 6)], text_tokens=3),
              dict(images=[], text_tokens=9)]]
    batches = []
    for pack in packs:
        segments = []
        for spec in pack:
            sample = make_sample(config, generator, **spec)
            tokens = sample.input_ids[0].numpy().astype(np.int64)
            assert len(tokens) % 8
            grids = sample.image_grid_thw.numpy() if sample.image_grid_thw is not None else np.zeros((0, 3), np.int64)
            segments.append(Segment(tokens, rng.random(len(tokens)) < 0.4, grids))
        grids = np.concatenate([s.grids for s in segments])
        batches.append(assemble_pack(segments, random_pages(grids, rng, config.vision.patch_size), ALIGNMENT,
                                     special, 2))
    return batches


def _run(family: str, layout: dict, hf_dir, modes=MODES, save_to=None, load_from=None) -> dict:
    """On every rank: loss and synced gradients per recompute mode (rank-local shards)."""
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.mcore_checkpoint import load_mcore_checkpoint
    from megatron_mmprolong.model.builder import build_model
    from megatron_mmprolong.training.step import forward_step

    config = CONFIGS[family]
    parallel = ParallelConfig(**layout)
    runtime.initialize(parallel)
    batches = [for_this_rank(b, config.vision.patch_size) for b in _batches(config)]
    encoded, embedded = [], []  # vision inputs; (tokens embedded, rows out) per micro-batch
    vision_tp = runtime.vision_tensor_parallel_group()
    out = {"tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
           "vision_tp": (vision_tp.rank(), vision_tp.size()), "modes": {}}
    for mode in modes:
        recompute = {
            "none": {},
            "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
            "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        }[mode]
        model = build_model(config, parallel, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), calculate_per_token_loss=True,
                            variable_seq_lengths=True, **recompute)
        if load_from is not None:
            load_mcore_checkpoint(model, load_from)
        else:
            load_hf_weights(model, hf_dir)
        if model.vision_model is not None and mode == "none":
            model.vision_model.register_forward_pre_hook(lambda module, args: encoded.append(args[0].detach().clone()))
            model.language_model.embedding.register_forward_hook(
                lambda module, args, kwargs, output: embedded.append((kwargs["input_ids"].shape[1], output.shape[0])),
                with_kwargs=True)
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=max(b["tokens"].shape[1] for b in batches),
            micro_batch_size=1, forward_only=False,
        )
        total = torch.tensor(sum(float(l["lm loss"][0]) for l in losses) if losses else 0.0, dtype=torch.float64)
        torch.distributed.all_reduce(total, group=ps.get_context_parallel_group())
        grads = {}
        offset = model.language_model.decoder.layers[0].layer_number - 1
        for name, param in model.named_parameters():
            grad = param.grad.detach().clone()
            torch.distributed.all_reduce(grad, group=ps.get_context_parallel_group())
            # what finalize_model_grads sums over TP: SP-tagged norms and Qwen3's per-head q/k norms
            if getattr(param, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name:
                torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
            grads[canonical_name(name, offset)] = grad
        out["modes"][mode] = {"loss": float(total), "grads": grads}
        if save_to is not None and mode == modes[0]:
            if torch.distributed.get_rank() == 0:
                save_to.mkdir(exist_ok=True)
            torch.distributed.barrier()
            dist_checkpointing.save(model.sharded_state_dict(), str(save_to))
    out["encoded"] = encoded
    out["embedded"] = embedded
    out["last_stage"] = ps.is_pipeline_last_stage()
    out["layers"] = len(model.language_model.decoder.layers)
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory, runtime):
    """family -> (HF checkpoint, one-process loss and gradients, loss tokens), made on first use."""
    made = {}

    def reference(family):
        if family not in made:
            config = CONFIGS[family]
            hf_dir = tmp_path_factory.mktemp(f"hf-{family}")
            write_random_hf_checkpoint(config, hf_dir, seed=9)
            result = _run(family, {}, hf_dir, modes=("none",))
            count = sum(float(b["loss_mask"].sum()) for b in _batches(config))
            made[family] = (family, hf_dir, result["modes"]["none"], count)
        return made[family]

    return reference


def _compare(reference, results, modes=MODES):
    family, _, expected, count = reference
    rules = {r.mcore: r for r in tensor_rules(CONFIGS[family])}
    for mode in modes:
        last = [r for r in results if r["last_stage"]]
        for result in last:
            assert abs(result["modes"][mode]["loss"] / count - expected["loss"] / count) < LOSS_ATOL, mode
        seen = set()
        for result in results:
            for name, grad in result["modes"][mode]["grads"].items():
                full = expected["grads"][name]
                rank, size = result["vision_tp" if rules[name].vision else "tp"]
                want = shard(full, rules[name].shard, rank, size)
                scale = want.abs().max().item()
                error = (grad - want).abs().max().item()
                assert error <= GRAD_RTOL * scale + 1e-12, f"{mode} {name}: {error} vs {scale}"
                seen.add(name)
        assert seen == set(expected["grads"]), mode


LAYOUTS = {
    "tp2": (dict(tensor_parallel=2), 2),
    "tp2-sp": (dict(tensor_parallel=2, sequence_parallel=True), 2),
    "tp2-vision-tp1": (dict(tensor_parallel=2, vision_tensor_parallel=1), 2),
    "cp2": (dict(context_parallel=2), 2),
    "pp2": (dict(pipeline_parallel=2), 2),
    "pp2-uneven": (dict(pipeline_parallel=2, decoder_first_pipeline_num_layers=1), 2),  # vision + 1 layer | 3
    # Qwen3-VL's three deepstack layers run with the vision encoder on the first stage
    "pp2-deepstack": (dict(pipeline_parallel=2, decoder_first_pipeline_num_layers=3), 2),
}
CASES = [("qwen2_5_vl", name) for name in sorted(LAYOUTS) if name != "pp2-deepstack"] + [
    ("qwen3_vl", name) for name in ("tp2", "tp2-sp", "cp2", "pp2-deepstack")]


@pytest.mark.parametrize("family, name", CASES)
def test_layout_matches_one_process(references, family, name):
    config = CONFIGS[family]
    layout, ranks = LAYOUTS[name]
    reference = references(family)
    results = run_ranks(_run, ranks, family, layout, reference[1])
    _compare(reference, results)
    if name == "pp2-uneven":
        assert [r["layers"] for r in results] == [1, 3]
    if name == "cp2":
        # every image row encoded once, by exactly one rank
        image = ImageParams.for_model(config.vision)
        full = torch.cat([patchify_pages(b["pages"], b["image_grid_thw"], image) for b in _batches(config)])
        per_rank = [torch.cat(r["encoded"]) for r in results if r["encoded"]]
        assert len(per_rank) == 2 and all(len(p) for p in per_rank)
        encoded = torch.cat(per_rank)
        assert len(encoded) == len(full)
        assert sorted(map(tuple, encoded[:, :3].tolist())) == sorted(map(tuple, full[:, :3].tolist()))
        _assert_embeds_only_local_tokens(results, config, cp=2, tp=1)


def _assert_embeds_only_local_tokens(results, config, cp: int, tp: int):
    """Each rank looks up (and all-reduces over TP) only its CP share of the tokens."""
    lengths = [b["tokens"].shape[1] for b in _batches(config)]
    for result in results:
        if result["embedded"]:
            assert result["embedded"] == [(n // cp, n // cp) for n in lengths]


@pytest.mark.parametrize("family, pipeline", [("qwen2_5_vl", dict(pipeline_parallel=2)),
                                              ("qwen3_vl", LAYOUTS["pp2-deepstack"][0])])
def test_tp2_cp2_and_a_checkpoint_moving_to_pp2(references, family, pipeline, tmp_path):
    """TP2 x CP2 on 4 ranks; its distributed checkpoint then loads at PP2 with the same loss."""
    reference = references(family)
    checkpoint = tmp_path / "ckpt"
    results = run_ranks(_run, 4, family, dict(tensor_parallel=2, context_parallel=2, sequence_parallel=True),
                        reference[1], MODES, checkpoint)
    _compare(reference, results)
    _assert_embeds_only_local_tokens(results, CONFIGS[family], cp=2, tp=2)
    moved = run_ranks(_run, 2, family, pipeline, None, ("none",), None, checkpoint)
    _compare(reference, moved, modes=("none",))


# ---- the GPU path's collectives, reproduced on the CPU --------------------------------------

def _sparse_batches(images_per_pack):
    """Packs with few images (fewer than CP ranks) or none; raw lengths not multiples of 8."""
    generator = torch.Generator().manual_seed(21)
    rng = np.random.default_rng(21)
    special = {"pad": CONFIG.tokens.eos, "image_pad": CONFIG.tokens.image, "video_pad": CONFIG.tokens.video}
    batches = []
    for images in images_per_pack:
        sample = make_sample(CONFIG, generator, images=images, text_tokens=7)
        tokens = sample.input_ids[0].numpy().astype(np.int64)
        grids = sample.image_grid_thw.numpy() if images else np.zeros((0, 3), np.int64)
        batches.append(assemble_pack([Segment(tokens, rng.random(len(tokens)) < 0.5, grids)], random_pages(grids, rng),
                                     ALIGNMENT, special, 2))
    return batches


def _bf16_run(layout: dict, hf_dir, steps, overlap_grad_reduce=False) -> dict:
    """bf16 training steps (each a list of packs' images, split over the data-parallel ranks)
    through Megatron's DDP and finalize_model_grads: the last step's loss and the vision
    parameters' reduced gradients."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import PrecisionConfig
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.model.builder import build_model
    from megatron_mmprolong.training.step import forward_step

    runtime.initialize(ParallelConfig(**layout))
    model = build_model(CONFIG, ParallelConfig(**layout), precision=PrecisionConfig(params_dtype="bf16"),
                        calculate_per_token_loss=True, variable_seq_lengths=True)
    load_hf_weights(model, hf_dir)
    ddp = DistributedDataParallel(
        config=model.config, module=Float16Module(model.config, model),
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                                 bucket_size=10_000))
    model.config.finalize_model_grads_func = finalize_model_grads
    for images_per_pack in steps:
        ddp.zero_grad_buffer()
        batches = _sparse_batches(images_per_pack)
        # this rank's share of the data-parallel batch
        mine = [for_this_rank(b) for b in batches[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mine), model=[ddp], num_microbatches=len(mine),
            seq_length=max(b["tokens"].shape[1] for b in mine), micro_batch_size=1, forward_only=False)
    total = torch.tensor([sum(float(l["lm loss"][0]) for l in losses), sum(float(l["lm loss"][1]) for l in losses)],
                         dtype=torch.float64)
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    vision = {name: float(param.main_grad.float().abs().sum()) for name, param in model.named_parameters()
              if name.startswith("vision_model.")}
    return {"loss": float(total[0] / total[1]), "vision_grads": vision}


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf-bf16")
    write_random_hf_checkpoint(CONFIG, hf_dir, seed=11)
    return hf_dir


@pytest.mark.parametrize("images", [[(1, 8, 8)], []], ids=["one-image", "no-image"])
def test_context_parallel_bf16_with_fewer_images_than_ranks(bf16_reference, images):
    """CP2 in bf16 where one rank (or every rank) owns no image: every rank joins every
    collective with the same dtype, forward and backward, and the loss is the single rank's."""
    single = run_ranks(_bf16_run, 1, {}, bf16_reference, [[images]])[0]
    split = run_ranks(_bf16_run, 2, dict(context_parallel=2), bf16_reference, [[images]])
    for result in split:
        assert abs(result["loss"] - single["loss"]) < 2e-2 * abs(single["loss"])
        assert set(result["vision_grads"]) == set(single["vision_grads"])
    if images:  # the image's gradient reached the vision encoder, summed over the CP group
        assert single["vision_grads"]["vision_model.patch_embed.weight"] > 0
        assert split[0]["vision_grads"]["vision_model.patch_embed.weight"] > 0


def test_overlapped_grad_reduce_with_a_text_only_micro_batch(bf16_reference):
    """DP2 with --overlap-grad-reduce where, after a first step with images on both ranks, one
    rank's micro-batch has none: the vision and merger buckets still launch on every rank
    (Megatron's DDP asserts "Communication call has not been issued" otherwise)."""
    image = [(1, 8, 8)]
    results = run_ranks(_bf16_run, 2, {}, bf16_reference, [[image, image], [image, []]], True)
    assert results[0]["loss"] == results[1]["loss"]
    assert results[0]["vision_grads"] == results[1]["vision_grads"]  # reduced over DP
    assert results[0]["vision_grads"]["vision_model.merger.projector.encoder.linear_fc2.weight"] > 0
