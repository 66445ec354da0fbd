"""The model as users run it: `train --bf16` builds it in bf16 and wraps it in Megatron's
Float16Module; evaluation generates from a bf16 model with a key/value cache at 64K-512K. Each
test compares that with the fp32 model, at the positions users reach, not bf16 with bf16."""

import pytest
import torch

from conftest import tiny_config, tiny_qwen3vl_config
from megatron_mmprolong.config import PrecisionConfig
from megatron_mmprolong.model.builder import build_model
from megatron_mmprolong.model.kv_cache import KVCache
from megatron_mmprolong.model.packed import packed_segments
from megatron_mmprolong.training.arguments import TrainArgs
from megatron_mmprolong.training.loop import build_training_model

FAMILIES = {"qwen25vl": tiny_config, "qwen3vl": tiny_qwen3vl_config}
POSITIONS = (0, 32768, 131072, 262144)
# Random weights 5x larger than Megatron's default init: attention that depends on where a key is,
# so that logits see a wrong rotary angle (at the default init they barely do)
SHARP_INIT = dict(init_method_std=0.1)


def _bf16_bound(reference: torch.Tensor) -> float:
    """What bf16 weights and activations may move logits through a few layers: 1/16 of the
    largest logit (measured: at most 1/50 here; bf16 rotary frequencies moved them by 1/3)."""
    return reference.abs().max().item() / 16


def _trained_as_bf16(config, fp32_model):
    """The `train --bf16` model, with the fp32 model's weights."""
    model, wrapped = build_training_model(TrainArgs(bf16=True), config)
    assert wrapped is not model  # Float16Module
    model.load_state_dict(fp32_model.state_dict())
    return model, wrapped.eval()


def _far_positions(start: int, n: int) -> torch.Tensor:
    """[3, 1, n]: half the tokens at the start of the sequence, half `start` tokens later, so
    attention spans that distance (a constant offset alone would cancel in relative rotary)."""
    positions = torch.cat([torch.arange(n // 2), start + torch.arange(n - n // 2)])
    return positions.expand(3, 1, n).contiguous()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fp32_and_bf16(request, runtime):
    config = FAMILIES[request.param]()
    torch.manual_seed(0)
    fp32 = build_model(config, precision=PrecisionConfig(params_dtype="fp32"), **SHARP_INIT).eval()
    model, wrapped = _trained_as_bf16(config, fp32)
    return config, fp32, model, wrapped


def test_bf16_training_wrap_keeps_the_rotary_angles_of_the_fp32_model(fp32_and_bf16):
    config, fp32, model, _ = fp32_and_bf16
    for start in POSITIONS:
        positions = _far_positions(start, 16)
        torch.testing.assert_close(model.language_model.rotary(positions), fp32.language_model.rotary(positions),
                                   rtol=0, atol=1e-6, msg=f"language angles at {start}")
    patches = torch.stack(torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij"), -1).reshape(-1, 2)
    torch.testing.assert_close(model.vision_model.rotary(patches), fp32.vision_model.rotary(patches), rtol=0, atol=1e-6)


@pytest.mark.parametrize("start", POSITIONS)
def test_bf16_training_wrap_gives_the_fp32_logits_within_bf16_tolerance(fp32_and_bf16, start):
    config, fp32, _, wrapped = fp32_and_bf16
    n = 64
    ids = torch.randint(0, config.tokens.vision_start, (1, n), generator=torch.Generator().manual_seed(start))
    positions = _far_positions(start, n)
    with torch.no_grad():
        reference = fp32(ids, positions)
        logits = wrapped(ids, positions).float()
    error = (logits - reference).abs().max().item()
    assert error <= _bf16_bound(reference), f"bf16 logits off by {error:.3f} at positions up to {start}"


def _tensor_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """Floating-point buffers and plain tensor attributes of every module, by name."""
    found = {}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            found[f"{prefix}.{name} (buffer)"] = buffer.dtype
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                found[f"{prefix}.{name} (attribute)"] = value.dtype
    return {name: dtype for name, dtype in found.items() if dtype.is_floating_point}


# Buffers and tensor attributes that the bf16 training wrap may cast (each with its reason).
CAST_ALLOWED: set[str] = set()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_training_wrap_casts_no_buffer_or_tensor_attribute(family, runtime):
    config = FAMILIES[family]()
    fp32 = build_model(config, precision=PrecisionConfig(params_dtype="fp32"))
    before = _tensor_dtypes(fp32)
    assert any("inv_freq" in name for name in before)  # the audit sees the rotary frequencies
    model, _ = _trained_as_bf16(config, fp32)
    after = _tensor_dtypes(model)
    changed = {name: (before.get(name), dtype) for name, dtype in after.items() if before.get(name) != dtype}
    assert set(changed) <= CAST_ALLOWED, f"cast by the bf16 training wrap: {changed}"


def _own_bytes(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() == tensor.nbytes


def _prefill(model, ids, cache):
    """The prompt's forward with `cache` set on every attention layer, as eval generates."""
    for layer in model.language_model.decoder.layers:
        layer.self_attention.kv_cache = cache
    n = ids.shape[1]
    packed = packed_segments(torch.tensor([0, n], dtype=torch.int32), ids.device, n)
    return model(ids, packed_seq_params=packed, return_hidden=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_keys_and_values_hold_only_their_own_bytes(family, runtime):
    config = FAMILIES[family]()
    model = build_model(config, precision=PrecisionConfig(params_dtype="bf16"), training=False).eval()
    cache = KVCache()
    ids = torch.randint(0, config.tokens.vision_start, (1, 40))
    with torch.no_grad():
        _prefill(model, ids, cache)
    cached = [*cache._keys.values(), *cache._values.values()]
    assert len(cached) == 2 * config.text.num_layers
    # a view of the fused QKV projection would hold (heads + 2 KV heads) / KV heads times its bytes
    assert all(_own_bytes(t) for t in cached), [t.untyped_storage().nbytes() / t.nbytes for t in cached]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_decode_gives_the_logits_of_a_full_forward(family, runtime):
    """Token n+1 decoded against the cache of n prompt tokens, and the full forward over n+1
    tokens: both bf16, within bf16 tolerance."""
    config = FAMILIES[family]()
    torch.manual_seed(1)
    model = build_model(config, precision=PrecisionConfig(params_dtype="bf16"), training=False,
                        **SHARP_INIT).eval()
    n = 96
    ids = torch.randint(0, config.tokens.vision_start, (1, n + 1), generator=torch.Generator().manual_seed(2))
    cache = KVCache()
    try:
        with torch.no_grad():
            full = model.language_model.logits(_prefill(model, ids, KVCache())[-1:])[0, 0].float()
            _prefill(model, ids[:, :n], cache)
            cache.keep_prompt_tokens(torch.ones(n, dtype=torch.bool), room=1)
            hidden = model(ids[:, n:], torch.full((3, 1, 1), n), return_hidden=True)
            decoded = model.language_model.logits(hidden)[0, 0].float()
    finally:
        for layer in model.language_model.decoder.layers:
            layer.self_attention.kv_cache = None
    error = (decoded - full).abs().max().item()
    assert error <= _bf16_bound(full), f"decoded logits off the full forward's by {error:.3f}"


def test_decode_attention_keeps_fp32_scores():
    """One new bf16 token over 4K bf16 cached keys with scores up to ~17, as trained models
    produce: the result is the exact (float64) attention to within bf16's rounding of the
    output, as the prompt's fused attention gives it; bf16 scores were 5x further off."""
    g = torch.Generator().manual_seed(0)
    n, heads, kv_heads, dim = 4096, 8, 2, 64
    keys, values = (torch.randn(n, kv_heads, dim, generator=g).bfloat16() for _ in range(2))
    query = torch.randn(heads, dim, generator=g).bfloat16()
    scale = 4 * dim**-0.5
    cache = KVCache()
    cache.store_prompt(1, keys[:-1], values[:-1])
    cache.keep_prompt_tokens(torch.ones(n - 1, dtype=torch.bool), room=1)
    out = cache.attend(1, query, keys[-1], values[-1], scale).double()
    grouped = query.double().reshape(kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("gqd,ngd->gqn", grouped, keys.double()) * scale
    exact = torch.einsum("gqn,ngd->gqd", scores.softmax(-1), values.double()).reshape(heads, dim)
    assert (out - exact).abs().max() <= 2**-8 * exact.abs().max()
