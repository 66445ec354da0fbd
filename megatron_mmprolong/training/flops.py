"""Model FLOPs of a Qwen vision-language model (Qwen2.5-VL, Qwen3-VL dense), counted from the
shapes of its matmuls (forward; training is 3x). Every term follows a config field, so both
families share one count.

Language model: per token, the QKV (heads x `head_dim`, which Qwen3 sets apart from hidden /
heads), output, SwiGLU and vocabulary projections; per packed sample of s tokens, causal
attention's score and value matmuls (s^2/2 each). QKV biases (Qwen2.5), q/k norms (Qwen3) and
the deepstack additions are element-wise: no matmul FLOPs.

Vision encoder: per patch, the patch embedding and every block's linears, the MLP with three
matrices when `gated_mlp` (SwiGLU) or two (fc1 -> act -> fc2); attention within each window
(window blocks) or frame (full blocks, and every block when `window_size` is None); per merged
token, the merger and each deepstack merger (one per `deepstack_visual_indexes` entry, the
merger's shape). The learned position grid's bilinear resample is a gather and a weighted sum
of four rows per patch: negligible, and not counted. Recompute is not counted (model FLOPs, as
MFU reports them).
"""

from __future__ import annotations

import numpy as np

from megatron_mmprolong.config import VLConfig


def language_linear_flops_per_token(config: VLConfig) -> float:
    t = config.text
    qkv = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    out = t.num_attention_heads * t.head_dim * t.hidden_size
    mlp = 3 * t.hidden_size * t.intermediate_size
    return 2.0 * (t.num_layers * (qkv + out + mlp) + t.hidden_size * t.vocab_size)


def language_attention_flops(config: VLConfig, segment_lengths) -> float:
    """Causal attention over packed samples: sum of s^2, not (sum of s)^2."""
    t = config.text
    lengths = np.asarray(segment_lengths, dtype=np.float64)
    return 2.0 * 2.0 * float((lengths**2).sum()) / 2.0 * t.num_attention_heads * t.head_dim * t.num_layers


def vision_flops(config: VLConfig, grids) -> float:
    """Forward FLOPs of encoding images with grids [n, 3] (t, h, w in patches)."""
    v = config.vision
    grids = np.asarray(grids, dtype=np.float64).reshape(-1, 3)
    if not len(grids):
        return 0.0
    patches = float(grids.prod(1).sum())
    hidden = v.hidden_size
    mlp_matrices = 3 if v.gated_mlp else 2
    per_block = 4 * hidden * hidden + mlp_matrices * hidden * v.intermediate_size  # qkv + proj, MLP
    linear = 2.0 * patches * (v.patch_dim * hidden + v.depth * per_block)
    merged = patches / v.spatial_merge_size**2
    mergers = 1 + config.deepstack_levels
    merger = 2.0 * mergers * merged * (v.merger_hidden_size**2 + v.merger_hidden_size * v.out_hidden_size)
    frame = grids[:, 1] * grids[:, 2]
    full = float((grids[:, 0] * frame**2).sum())
    if v.window_merged_tokens is None:
        attention = 4.0 * hidden * v.depth * full
    else:
        full_blocks = len(v.fullatt_block_indexes)
        windows = _window_square_sum(grids, v.window_merged_tokens, v.spatial_merge_size)
        attention = 4.0 * hidden * (full_blocks * full + (v.depth - full_blocks) * windows)
    return linear + merger + attention


def _window_square_sum(grids: np.ndarray, side: int, merge: int) -> float:
    """Sum over windows of (patches in window)^2, windows of side x side merged tokens."""
    total = 0.0
    for t, h, w in grids:
        rows, cols = int(h) // merge, int(w) // merge
        row_sizes = np.minimum(side, rows - np.arange(0, rows, side))
        col_sizes = np.minimum(side, cols - np.arange(0, cols, side))
        areas = np.outer(row_sizes, col_sizes) * merge * merge
        total += float(t) * float((areas.astype(np.float64) ** 2).sum())
    return total


def training_flops_by_kind(config: VLConfig, segment_lengths, grids) -> dict[str, float]:
    """Forward and backward FLOPs (3x forward) of one batch: language model GEMMs, causal
    attention, vision encoder (the planner prices each at its own rate)."""
    tokens = float(np.sum(segment_lengths))
    return {"gemm": 3.0 * language_linear_flops_per_token(config) * tokens,
            "attention": 3.0 * language_attention_flops(config, segment_lengths),
            "vision": 3.0 * vision_flops(config, grids)}


def training_flops(config: VLConfig, segment_lengths, grids) -> float:
    """Forward and backward FLOPs of one batch (3x forward)."""
    return sum(training_flops_by_kind(config, segment_lengths, grids).values())
