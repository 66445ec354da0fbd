"""Window permutation, attention segments and 2D rotary positions equal transformers'."""

import pytest
import torch

from megatron_mmprolong.config import VisionConfig
from megatron_mmprolong.model.vision_layout import build_vision_layout

GRIDS = {
    "one-window": [[1, 8, 8]],
    "windows-cut-by-edges": [[1, 12, 20], [1, 6, 10], [1, 2, 2]],
    "video": [[3, 14, 22]],
    "mixed": [[1, 16, 16], [4, 6, 8], [1, 30, 2]],
}


@pytest.mark.parametrize("window_size", [112, 56])
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_layout_equals_transformers(name, window_size):
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    grids = torch.tensor(GRIDS[name])
    layout = build_vision_layout(grids, VisionConfig(window_size=window_size))
    window_index, cu_windows = get_vision_window_index(grids, 2, window_size, 14)
    assert torch.equal(layout.window_index, window_index)
    assert torch.equal(layout.window_segments.cu_seqlens_q, cu_windows)
    assert torch.equal(layout.frame_segments.cu_seqlens_q, get_vision_cu_seqlens(grids))
    positions = get_vision_position_ids(grids, 2)
    groups = positions.view(-1, 4, 2)[window_index].view(-1, 2)
    assert torch.equal(layout.patch_positions, groups)
    assert torch.equal(layout.window_index[layout.restore_index], torch.arange(len(window_index)))
    lengths = cu_windows.diff()
    assert layout.window_segments.max_seqlen_q == int(lengths.max())


def test_bad_grids_are_errors():
    with pytest.raises(ValueError, match="multiples of 2"):
        build_vision_layout(torch.tensor([[1, 5, 4]]), VisionConfig())
    with pytest.raises(ValueError, match="non-empty"):
        build_vision_layout(torch.zeros(0, 3, dtype=torch.long), VisionConfig())


# ---- empty segments that keep Transformer Engine < 2.13 on few cuDNN graphs ------------------

# 560 one-window images and two whose windows are cut by the edges: 568 windows, 562 frames
MANY = [[1, 2, 2]] * 560 + [[1, 12, 20], [1, 6, 10]]


@pytest.mark.parametrize("count, version, padded", [
    (1, "2.12", 1), (300, "2.12", 300), (512, "2.12", 512),  # TE buckets up to 512 itself
    (513, "2.12", 1024), (1900, "2.12.0", 2048), (2048, "2.10", 2048), (1900, "2.11.0+cu12", 2048),
    (1900, "2.13.0.dev0", 2048),  # pre-releases of 2.13 may predate the fix
    (1900, "2.13", 1900), (1900, "2.13.0+cu12", 1900), (1900, "2.20", 1900),  # TE buckets by 512s
    (1900, None, 1900),  # no Transformer Engine
])
def test_padded_segment_count(count, version, padded):
    from megatron_mmprolong.model.vision_layout import padded_segment_count

    assert padded_segment_count(count, version) == padded


def test_segments_padded_with_empty_ones_on_old_transformer_engine():
    grids = torch.tensor(MANY)
    plain = build_vision_layout(grids, VisionConfig(), te_version=None)
    padded = build_vision_layout(grids, VisionConfig(), te_version="2.12")
    for name, count in (("window_segments", 568), ("frame_segments", 562)):
        real, more = getattr(plain, name), getattr(padded, name)
        assert len(real.cu_seqlens_q) == count + 1 and len(more.cu_seqlens_q) == 1024 + 1
        assert torch.equal(more.cu_seqlens_q[: count + 1], real.cu_seqlens_q)
        assert bool((more.cu_seqlens_q[count:] == plain.num_patches).all())  # empty ones at the end
        assert more.cu_seqlens_q.dtype == torch.int32 and torch.equal(more.cu_seqlens_host, more.cu_seqlens_q)
        assert more.cu_seqlens_kv is more.cu_seqlens_q
        assert more.max_seqlen_q == more.max_seqlen_kv == real.max_seqlen_q  # the longest real one
    assert plain.window_segments.max_seqlen_q == 64 and plain.frame_segments.max_seqlen_q == 240
    assert torch.equal(padded.window_index, plain.window_index)


def test_vision_output_unchanged_by_empty_segments(runtime, monkeypatch):
    """The encoder (local backend) gives the same features and gradients, bit for bit, with the
    segment lists padded as for the installed TE < 2.13 (build_vision_layout's default)."""
    from megatron_mmprolong.model import vision_layout
    from megatron_mmprolong.model.builder import build_model

    from conftest import tiny_config

    config = tiny_config(layers=1)
    encoder = build_model(config).vision_model
    grids = torch.tensor(MANY)
    pixels = torch.randn(int(grids.prod(-1).sum()), config.vision.patch_dim, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for version in (None, "2.12.0"):
        monkeypatch.setattr(vision_layout, "installed_te_version", lambda version=version: version)
        layout = vision_layout.build_vision_layout(grids, config.vision)
        assert len(layout.window_segments.cu_seqlens_q) - 1 == (568 if version is None else 1024)
        encoder.zero_grad()
        features = encoder(pixels, layout)
        features.square().sum().backward()
        outputs[version] = (features.detach(), [p.grad.clone() for p in encoder.parameters()])
    (plain, plain_grads), (padded, padded_grads) = outputs.values()
    assert torch.equal(padded, plain)
    assert all(torch.equal(a, b) for a, b in zip(padded_grads, plain_grads, strict=True))


@pytest.mark.gpu
def test_transformer_engine_takes_empty_segments(runtime, monkeypatch):
    """On a GPU: Transformer Engine's fused (cuDNN) THD attention in bf16 gives the vision
    encoder the same features and gradients with the segment lists padded as for TE < 2.13
    (forced here, whatever TE is installed) as without."""
    from megatron_mmprolong.config import PrecisionConfig
    from megatron_mmprolong.model.builder import build_model
    from megatron_mmprolong.model.specs import transformer_engine_available

    from conftest import tiny_config

    if not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed")
    monkeypatch.setenv("NVTE_FLASH_ATTN", "0")  # the cuDNN graphs, not flash-attn
    config = tiny_config(layers=1, vision_heads=2)  # vision head dim 32
    encoder = build_model(config, backend="te", precision=PrecisionConfig(params_dtype="bf16")).vision_model
    grids = torch.tensor(MANY)
    pixels = torch.randn(int(grids.prod(-1).sum()), config.vision.patch_dim, generator=torch.Generator().manual_seed(0))
    pixels = pixels.cuda()
    outputs = []
    for version in (None, "2.12"):
        layout = build_vision_layout(grids, config.vision, "cuda", te_version=version)
        encoder.zero_grad()
        features = encoder(pixels, layout)
        features.float().square().mean().backward()
        outputs.append((features.detach().float(), encoder.patch_embed.weight.grad.float().clone()))
        try:
            from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention as te_dpa
        except ImportError:
            continue
        backends = getattr(te_dpa, "_attention_backends", {})
        assert backends.get("use_fused_attention") in (True, None), backends
    (plain, plain_grad), (padded, padded_grad) = outputs
    assert torch.isfinite(padded).all() and torch.isfinite(padded_grad).all()
    assert (padded - plain).abs().max().item() <= 1e-2 * max(plain.abs().max().item(), 1.0)
    assert (padded_grad - plain_grad).abs().max().item() <= 1e-2 * max(plain_grad.abs().max().item(), 1e-6)
