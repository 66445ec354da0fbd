"""The FLOP model behind the training log's TFLOP/s (training/flops.py) equals an independent
count: torch's FLOP counter over the matmuls the model actually runs on a packed multimodal batch,
for both families (Qwen2.5-VL: windows, SwiGLU vision MLP; Qwen3-VL: frame attention, fc1/fc2
vision MLP, deepstack mergers, heads x head_dim != hidden)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from megatron_mmprolong.convert.parity import make_sample, pack
from megatron_mmprolong.model.builder import build_model
from megatron_mmprolong.training.flops import language_attention_flops, language_linear_flops_per_token, vision_flops

from conftest import TINY_QWEN3VL_SHAPES, tiny_config, tiny_qwen3vl_config

CONFIGS = {
    "default": lambda: tiny_config(),
    "small-windows": lambda: tiny_config(window_size=56, fullatt=(0, 2), depth=3, layers=3),
    **{name: (lambda shape=shape: tiny_qwen3vl_config(**shape)) for name, shape in TINY_QWEN3VL_SHAPES.items()},
}


def _count(model, packed, params) -> dict[str, int]:
    # torch's counter knows the GPU attention kernels; the CPU one needs its formula named
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                     lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        model(packed.input_ids, pixel_values=packed.pixel_values, image_grid_thw=packed.image_grid_thw,
              packed_seq_params=params)
    return {module: sum(ops.values()) for module, ops in counter.get_flop_counts().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_counted_flops_equal_the_model(name, runtime):
    config = CONFIGS[name]()
    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(0)
    # grids that windows (Qwen2.5) or the position grid (Qwen3: 8x8, resampled) do not divide;
    # segment lengths differ
    samples = [make_sample(config, generator, images=[(1, 12, 20), (1, 6, 10)], text_tokens=9),
               make_sample(config, generator, images=[(1, 10, 8)], text_tokens=23)]
    packed, params = pack(samples)
    lengths = [s.input_ids.shape[1] for s in samples]
    counted = _count(model, packed, params)
    # The counter charges a causal segment all s^2 scores; the formula counts the s^2/2 that a
    # causal kernel (flash, cuDNN) computes, as MFU reports do.
    language = language_linear_flops_per_token(config) * sum(lengths) + 2 * language_attention_flops(config, lengths)
    vision = vision_flops(config, packed.image_grid_thw)
    assert counted["VisionLanguageModel.language_model"] == language  # exact: every matmul accounted for
    assert counted["VisionLanguageModel.vision_model"] == vision
    assert counted["Global"] == language + vision


def test_qwen3vl_terms_follow_the_fields():
    """Each Qwen3-VL difference moves the count by exactly its matmuls."""
    import dataclasses

    config = tiny_qwen3vl_config()
    v = config.vision
    grids = [(1, 12, 20)]
    patches, merged = 240, 60
    base = vision_flops(config, grids)
    no_deepstack = dataclasses.replace(config, vision=dataclasses.replace(v, deepstack_visual_indexes=()))
    merger = 2 * merged * (v.merger_hidden_size**2 + v.merger_hidden_size * v.out_hidden_size)
    assert base - vision_flops(no_deepstack, grids) == 3 * merger
    gated = dataclasses.replace(config, vision=dataclasses.replace(v, gated_mlp=True))
    assert vision_flops(gated, grids) - base == 2 * patches * v.depth * v.hidden_size * v.intermediate_size
    t = config.text
    assert t.num_attention_heads * t.head_dim != t.hidden_size
    qkv = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    out = t.num_attention_heads * t.head_dim * t.hidden_size
    assert language_linear_flops_per_token(config) == 2 * (
        t.num_layers * (qkv + out + 3 * t.hidden_size * t.intermediate_size) + t.hidden_size * t.vocab_size)
