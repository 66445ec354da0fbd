"""Where every vision patch goes: window order, attention segments, 2D rotary positions and the
taps of a learned position grid.

The image processor emits patches in merge-group order (frame, row/2, col/2, 2, 2). Window
attention needs the groups regrouped into windows of `window_size` px (4x4 merged tokens for
Qwen2.5-VL) so that each window is a contiguous segment of a packed (THD) sequence; full
attention blocks attend within each frame. Without windows (Qwen3-VL) each frame is its one
window and the order stays the processor's. All of it is a function of the grids alone, computed
with vectorised tensor ops (no loop over images or windows) on the CPU, where the loader keeps
`grid_thw`, and moved to the device once.

Transformer Engine's fused attention builds one cuDNN graph (forward and backward) per bucket
of the THD segment count: 32, then powers of two up to 512, and above 512, before TE 2.13,
one per exact count (`get_max_batch_size` in common/fused_attn/utils.cu; TE PR #2653 buckets
by 512s from 2.13). Qwen2.5-VL at 128K has about 1,900 windows per CP rank, so on older TE
nearly every micro-batch would build new graphs. There the segment lists are padded with empty
segments to the next multiple of 512, as TE 2.13 rounds itself. cuDNN (>= 9.6) gets zero-length
segments past the real ones either way: TE runs the graph at the bucketed count and
`cu_seqlens_to_actual_seqlens` gives the slots past the real segments length 0. The local
backend skips them, and `max_seqlen` stays the longest real segment.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from packaging.version import Version
from torch import Tensor

from megatron_mmprolong.config import VisionConfig
from megatron_mmprolong.model.packed import PackedSegments, packed_segments


@dataclass
class VisionLayout:
    window_index: Tensor  # [groups] merge groups in window order (gather index)
    restore_index: Tensor  # [groups] inverse permutation, applied to merged tokens
    patch_positions: Tensor  # [patches, 2] (row, col) of each patch, in window order
    window_segments: PackedSegments  # one segment per window (then empty ones, see padded_segment_count)
    frame_segments: PackedSegments  # one segment per frame (full-attention blocks), likewise
    # Bilinear resampling of the learned position grid, per patch in processor order: the four
    # grid points (flat indices) and their weights; None without a position grid.
    position_taps: Tensor | None = None  # [patches, 4] int64
    position_weights: Tensor | None = None  # [patches, 4] float32

    @property
    def num_patches(self) -> int:
        return self.patch_positions.shape[0]


TE_SEGMENT_BUCKET = 512
TE_BUCKETS_MANY_SEGMENTS = Version("2.13")  # TE PR #2653


def padded_segment_count(count: int, te_version: Version | str | None) -> int:
    """How many segments (the real `count`, then empty ones) to hand Transformer Engine
    `te_version` (None: no TE) so that its cuDNN graph cache hits: above 512, before TE 2.13,
    the next multiple of 512; otherwise `count`, which TE buckets itself. A 2.13 pre-release
    counts as older: some lack the fix."""
    if te_version is None or count <= TE_SEGMENT_BUCKET or Version(str(te_version)) >= TE_BUCKETS_MANY_SEGMENTS:
        return count
    return -(-count // TE_SEGMENT_BUCKET) * TE_SEGMENT_BUCKET


@functools.cache
def installed_te_version() -> Version | None:
    """The installed Transformer Engine's version, None without it (looked up once)."""
    from megatron.core.utils import get_te_version

    return get_te_version()


def build_vision_layout(
    grid_thw: Tensor,
    vision: VisionConfig,
    device: torch.device | str = "cpu",
    te_version: Version | str | None = "installed",
) -> VisionLayout:
    """Layout for the patches of `grid_thw` [items, 3] (patch units), images and videos alike.
    The segment lists are padded for `te_version` ("installed": the one installed, if any)."""
    if te_version == "installed":
        te_version = installed_te_version()
    grids = grid_thw.detach().to("cpu", torch.long)
    if grids.dim() != 2 or grids.shape[1] != 3 or len(grids) == 0:
        raise ValueError(f"grid_thw must be a non-empty [n, 3] tensor, got {tuple(grids.shape)}")
    merge = vision.spatial_merge_size
    if bool(((grids[:, 1] % merge) | (grids[:, 2] % merge)).any()):
        raise ValueError(f"grid heights and widths must be multiples of {merge}: {grids.tolist()}")
    t, rows, cols = grids[:, 0], grids[:, 1] // merge, grids[:, 2] // merge
    side = vision.window_merged_tokens or int(torch.maximum(rows, cols).max())  # no windows: one a frame
    win_rows, win_cols = -(-rows // side), -(-cols // side)  # ceil

    groups_per_item = t * rows * cols
    item = torch.repeat_interleave(torch.arange(len(grids)), groups_per_item)
    k = torch.arange(int(groups_per_item.sum())) - (torch.cumsum(groups_per_item, 0) - groups_per_item)[item]
    area, width = (rows * cols)[item], cols[item]
    frame = (torch.cumsum(t, 0) - t)[item] + k // area  # frame number over all items
    row, col = (k % area) // width, k % width

    windows_per_frame = int((win_rows * win_cols).max())
    window = frame * windows_per_frame + (row // side) * win_cols[item] + col // side
    key = (window * side + row % side) * side + col % side
    window_index = torch.argsort(key, stable=True)
    restore_index = torch.empty_like(window_index)
    restore_index[window_index] = torch.arange(len(window_index))

    unit = merge * merge
    _, window_groups = torch.unique_consecutive(window[window_index], return_counts=True)
    window_lengths = window_groups * unit
    frame_lengths = torch.repeat_interleave(grids[:, 1] * grids[:, 2], t)

    # Patch (row, col) in patch units: group origin plus the 2x2 offsets inside the group.
    sub = torch.arange(unit)
    ordered = window_index
    patch_rows = (row[ordered] * merge).unsqueeze(1) + (sub // merge).unsqueeze(0)
    patch_cols = (col[ordered] * merge).unsqueeze(1) + (sub % merge).unsqueeze(0)
    patch_positions = torch.stack([patch_rows.reshape(-1), patch_cols.reshape(-1)], dim=1)

    taps = weights = None
    if vision.num_position_embeddings:
        sizes = grids[item][:, 1:].repeat_interleave(unit, dim=0)  # [patches, 2] (rows, cols) of its image
        in_order = torch.stack([
            ((row * merge).unsqueeze(1) + (sub // merge).unsqueeze(0)).reshape(-1),
            ((col * merge).unsqueeze(1) + (sub % merge).unsqueeze(0)).reshape(-1),
        ], dim=1)  # processor order, unlike patch_positions
        taps, weights = _bilinear_taps(in_order, sizes, vision.position_grid_side)

    def on_device(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device, non_blocking=True)

    return VisionLayout(
        window_index=on_device(window_index),
        restore_index=on_device(restore_index),
        patch_positions=on_device(patch_positions),
        window_segments=_segments(window_lengths, device, te_version),
        frame_segments=_segments(frame_lengths, device, te_version),
        position_taps=on_device(taps),
        position_weights=on_device(weights),
    )


def _bilinear_taps(positions: Tensor, sizes: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """Grid points and weights that resample a side x side grid to an image of `sizes` patches
    with corners aligned (the first and last patch of an axis sit on the first and last grid
    point), for patches at `positions` [patches, 2] (row, col)."""
    source = positions.float() * (side - 1) / (sizes - 1).clamp(min=1)
    low = source.floor()
    frac = source - low
    low = low.long()
    high = (low + 1).clamp(max=side - 1)
    axis_taps = torch.stack([low, high], dim=-1)  # [patches, 2 axes, 2 taps]
    axis_weights = torch.stack([1 - frac, frac], dim=-1)
    taps = axis_taps[:, 0, :, None] * side + axis_taps[:, 1, None, :]
    weights = axis_weights[:, 0, :, None] * axis_weights[:, 1, None, :]
    return taps.reshape(-1, 4), weights.reshape(-1, 4)


def _segments(lengths: Tensor, device, te_version: Version | str | None) -> PackedSegments:
    """Segments of `lengths`, then empty ones up to `padded_segment_count`."""
    cu = torch.empty(padded_segment_count(len(lengths), te_version) + 1, dtype=torch.int32)
    cu[0] = 0
    cu[1 : len(lengths) + 1] = torch.cumsum(lengths, 0)
    cu[len(lengths) + 1 :] = cu[len(lengths)]
    return packed_segments(cu, device, int(lengths.max()))
