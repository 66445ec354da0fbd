"""Where every vision patch goes: window order, attention segments and 2D rotary positions.

The image processor emits patches in merge-group order (frame, row/2, col/2, 2, 2). Window
attention needs the groups regrouped into windows of `window_size` px (4x4 merged tokens for
Qwen2.5-VL) so that each window is a contiguous segment of a packed (THD) sequence; full
attention blocks attend within each frame. All of it is a function of the grids alone, computed
with vectorised tensor ops (no loop over images or windows) on the CPU, where the loader keeps
`grid_thw`, and moved to the device once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_mmprolong.config import VisionConfig
from megatron_mmprolong.model.packed import PackedSegments, packed_segments


@dataclass
class VisionLayout:
    window_index: Tensor  # [groups] merge groups in window order (gather index)
    restore_index: Tensor  # [groups] inverse permutation, applied to merged tokens
    patch_positions: Tensor  # [patches, 2] (row, col) of each patch, in window order
    window_segments: PackedSegments  # one segment per window
    frame_segments: PackedSegments  # one segment per frame (full-attention blocks)

    @property
    def num_patches(self) -> int:
        return self.patch_positions.shape[0]


def build_vision_layout(
    grid_thw: Tensor, vision: VisionConfig, device: torch.device | str = "cpu"
) -> VisionLayout:
    """Layout for the patches of `grid_thw` [items, 3] (patch units), images and videos alike."""
    grids = grid_thw.detach().to("cpu", torch.long)
    if grids.dim() != 2 or grids.shape[1] != 3 or len(grids) == 0:
        raise ValueError(f"grid_thw must be a non-empty [n, 3] tensor, got {tuple(grids.shape)}")
    merge = vision.spatial_merge_size
    if bool(((grids[:, 1] % merge) | (grids[:, 2] % merge)).any()):
        raise ValueError(f"grid heights and widths must be multiples of {merge}: {grids.tolist()}")
    t, rows, cols = grids[:, 0], grids[:, 1] // merge, grids[:, 2] // merge
    side = vision.window_merged_tokens
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

    return VisionLayout(
        window_index=window_index.to(device, non_blocking=True),
        restore_index=restore_index.to(device, non_blocking=True),
        patch_positions=patch_positions.to(device, non_blocking=True),
        window_segments=_segments(window_lengths, device),
        frame_segments=_segments(frame_lengths, device),
    )


def _segments(lengths: Tensor, device) -> PackedSegments:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return packed_segments(cu, device, int(lengths.max()))
