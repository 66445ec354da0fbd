"""GPU-only checks (H100/H200): NCCL start-up, the local backend on CUDA against the CPU, the
Transformer Engine backend against the local reference on the same weights. Skipped on machines
without CUDA (see conftest.py); the TE ones also skip, with the reason, where TE is missing."""

import pytest
import torch

from megatron_mmprolong.config import PrecisionConfig
from megatron_mmprolong.convert.parity import default_samples, our_logits, pack
from megatron_mmprolong.model.specs import transformer_engine_available

from conftest import tiny_config

pytestmark = pytest.mark.gpu
needs_te = pytest.mark.skipif(not transformer_engine_available(), reason="Transformer Engine is not installed")


@pytest.fixture(scope="module")
def gpu_runtime():
    from megatron_mmprolong import runtime

    rt = runtime.initialize()
    assert rt.device.type == "cuda"
    # one process group with a backend per device type: gloo for CPU tensors, NCCL for CUDA ones
    assert "cuda:nccl" in str(torch.distributed.get_backend())
    return rt


def _to_cuda(packed, params):
    params.cu_seqlens_q = params.cu_seqlens_kv = params.cu_seqlens_q.cuda()
    for field in ("input_ids", "pixel_values", "pixel_values_videos"):
        setattr(packed, field, getattr(packed, field).cuda())


def test_nccl_all_reduce(gpu_runtime):
    value = torch.ones(4, device="cuda")
    torch.distributed.all_reduce(value)
    assert value.tolist() == [float(torch.distributed.get_world_size())] * 4


def test_local_backend_on_cuda_matches_transformers(gpu_runtime, tmp_path):
    """The plain-torch backend on the GPU (no TE) in fp32 against transformers on the CPU."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.parity import hf_logits
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.model.builder import build_model

    config = tiny_config(hidden=128, heads=4, kv_heads=2, mrope_section=(4, 6, 6))
    write_random_hf_checkpoint(config, tmp_path, seed=7)
    samples = default_samples(config, seed=1)
    packed, params = pack(samples)
    _to_cuda(packed, params)
    model = build_model(config, backend="local")
    load_hf_weights(model, tmp_path)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        ours = our_logits(model, packed, params).float().cpu()
        expected = torch.cat([hf_logits(reference, s) for s in samples], dim=1)
    assert (ours - expected).abs().max().item() < 1e-3 * max(expected.abs().max().item(), 1.0)


@needs_te
@pytest.mark.parametrize("dtype, atol", [("bf16", 0.08), ("fp32", 2e-3)])
def test_te_backend_matches_local_backend(gpu_runtime, tmp_path, dtype, atol):
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.model.builder import build_model

    config = tiny_config(hidden=128, heads=4, kv_heads=2, mrope_section=(4, 6, 6))
    write_random_hf_checkpoint(config, tmp_path, seed=3)
    packed, params = pack(default_samples(config, seed=1))
    _to_cuda(packed, params)
    logits = {}
    for backend in ("te", "local"):
        model = build_model(config, backend=backend, precision=PrecisionConfig(params_dtype=dtype))
        load_hf_weights(model, tmp_path)
        out = our_logits(model, packed, params)
        out.float().square().mean().backward()  # the backward pass runs on both backends
        logits[backend] = out.detach().float()
    scale = logits["local"].abs().max().item()
    assert (logits["te"] - logits["local"]).abs().max().item() <= atol * max(scale, 1.0)


@needs_te
def test_converted_checkpoint_loads_into_the_te_model(gpu_runtime, tmp_path):
    """Converted checkpoints carry local-spec names and no TE `_extra_state`; the TE model loads them."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.mcore_checkpoint import load_mcore_checkpoint
    from megatron_mmprolong.convert.parity import hf_logits
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.model.builder import build_model

    config = tiny_config(hidden=128, heads=4, kv_heads=2, mrope_section=(4, 6, 6))
    write_random_hf_checkpoint(config, tmp_path / "hf", seed=4)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", progress=False)
    model = build_model(config, backend="te")
    load_mcore_checkpoint(model, tmp_path / "mcore")
    samples = default_samples(config, seed=2)
    packed, params = pack(samples)
    _to_cuda(packed, params)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        ours = our_logits(model, packed, params).float().cpu()
        expected = torch.cat([hf_logits(reference, s) for s in samples], dim=1)
    assert (ours - expected).abs().max().item() < 2e-3 * max(expected.abs().max().item(), 1.0)


@needs_te
def test_fp8_training_step_runs_close_to_bf16(gpu_runtime, tmp_path):
    """TE FP8 GEMMs (hybrid, delayed scaling) through the schedule: finite, close to BF16."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.model.builder import build_model
    from megatron_mmprolong.training.step import forward_step

    from test_parallel import CONFIG, _batches

    write_random_hf_checkpoint(CONFIG, tmp_path, seed=5)
    losses = {}
    for name, precision in (("bf16", PrecisionConfig()), ("fp8", PrecisionConfig(fp8="hybrid"))):
        model = build_model(CONFIG, backend="te", precision=precision, calculate_per_token_loss=True,
                            variable_seq_lengths=True)
        load_hf_weights(model, tmp_path)
        out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(_batches()),
                                          model=[model], num_microbatches=2, seq_length=1, micro_batch_size=1)
        losses[name] = sum(float(o["lm loss"][0]) for o in out)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert abs(losses["fp8"] - losses["bf16"]) <= 0.05 * abs(losses["bf16"])


@needs_te
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_te_context_parallel_matches_one_gpu(tmp_path):
    """CP2 through Transformer Engine's ring attention (NCCL) against one GPU."""
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    from multiprocess import run_ranks
    from test_parallel import CONFIG, _batches, _run

    write_random_hf_checkpoint(CONFIG, tmp_path, seed=6)
    single = run_ranks(_run, 1, {}, tmp_path, ("none",))[0]["modes"]["none"]["loss"]
    split = [r for r in run_ranks(_run, 2, dict(context_parallel=2), tmp_path, ("none",)) if r["last_stage"]]
    count = sum(float(b["loss_mask"].sum()) for b in _batches())
    assert all(abs(r["modes"]["none"]["loss"] - single) / count < 1e-4 for r in split)
