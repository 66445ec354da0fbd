"""The FLOP model behind the training log's TFLOP/s (training/flops.py) equals an independent
count: torch's FLOP counter over the matmuls the model actually runs on a packed multimodal batch."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from megatron_mmprolong.convert.parity import make_sample, pack
from megatron_mmprolong.model.builder import build_model
from megatron_mmprolong.training.flops import language_attention_flops, language_linear_flops_per_token, vision_flops

from conftest import tiny_config


@pytest.mark.parametrize("shape", [dict(), dict(window_size=56, fullatt=(0, 2), depth=3, layers=3)],
                         ids=["default", "small-windows"])
def test_counted_flops_equal_the_model(shape, runtime):
    config = tiny_config(**shape)
    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(0)
    # images whose grids windows do not divide; segment lengths differ
    samples = [make_sample(config, generator, images=[(1, 12, 20), (1, 6, 10)], text_tokens=9),
               make_sample(config, generator, images=[(1, 10, 8)], text_tokens=23)]
    packed, params = pack(samples)
    lengths = [s.input_ids.shape[1] for s in samples]
    # torch's counter knows the GPU attention kernels; the CPU one needs its formula named
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                     lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        model(packed.input_ids, pixel_values=packed.pixel_values, image_grid_thw=packed.image_grid_thw,
              packed_seq_params=params)
    counted = {module: sum(ops.values()) for module, ops in counter.get_flop_counts().items()}
    # The counter charges a causal segment all s^2 scores; the formula counts the s^2/2 that a
    # causal kernel (flash, cuDNN) computes, as MFU reports do.
    language = language_linear_flops_per_token(config) * sum(lengths) + 2 * language_attention_flops(config, lengths)
    vision = vision_flops(config, packed.image_grid_thw)
    assert counted["VisionLanguageModel.language_model"] == language  # exact: every matmul accounted for
    assert counted["VisionLanguageModel.vision_model"] == vision
    assert counted["Global"] == language + vision
