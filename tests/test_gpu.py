"""GPU-only checks (H100/H200): the Transformer Engine backend against the local reference on
the same weights, NCCL start-up. Skipped on machines without CUDA (see conftest.py)."""

import pytest
import torch

from megatron_mmprolong.convert.parity import default_samples, our_logits, pack

from conftest import tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_runtime():
    from megatron_mmprolong import runtime

    rt = runtime.initialize()
    assert rt.device.type == "cuda"
    assert torch.distributed.get_backend() == "nccl"
    return rt


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.08), (torch.float32, 2e-3)])
def test_te_backend_matches_local_backend(gpu_runtime, tmp_path, dtype, atol):
    pytest.importorskip("transformer_engine")
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.model.builder import build_model

    config = tiny_config(hidden=128, heads=4, kv_heads=2, mrope_section=(4, 6, 6))
    write_random_hf_checkpoint(config, tmp_path, seed=3)
    packed, params = pack(default_samples(config, seed=1))
    params.cu_seqlens_q = params.cu_seqlens_kv = params.cu_seqlens_q.cuda()
    packed.input_ids = packed.input_ids.cuda()
    packed.pixel_values = packed.pixel_values.cuda()
    packed.pixel_values_videos = packed.pixel_values_videos.cuda()
    logits = {}
    for backend in ("te", "local"):
        model = build_model(config, backend=backend, params_dtype=dtype)
        load_hf_weights(model, tmp_path)
        out = our_logits(model, packed, params)
        out.float().square().mean().backward()  # the backward pass runs on both backends
        logits[backend] = out.detach().float()
    scale = logits["local"].abs().max().item()
    assert (logits["te"] - logits["local"]).abs().max().item() <= atol * max(scale, 1.0)


def test_converted_checkpoint_loads_into_the_te_model(gpu_runtime, tmp_path):
    """Converted checkpoints carry local-spec names and no TE `_extra_state`; the TE model loads them."""
    pytest.importorskip("transformer_engine")
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
    params.cu_seqlens_q = params.cu_seqlens_kv = params.cu_seqlens_q.cuda()
    for field in ("input_ids", "pixel_values", "pixel_values_videos"):
        setattr(packed, field, getattr(packed, field).cuda())
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        ours = our_logits(model, packed, params).float().cpu()
        expected = torch.cat([hf_logits(reference, s) for s in samples], dim=1)
    assert (ours - expected).abs().max().item() < 2e-3 * max(expected.abs().max().item(), 1.0)
