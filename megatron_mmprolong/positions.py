"""M-RoPE position ids of Qwen2.5-VL and Qwen3-VL: one (temporal, height, width) triple per token.

Text advances by one on all three axes. An image or video starts at the running position and
spreads over its merged grid: (start + floor(t * interval), start + row, start + col), with
interval = 1 for images and tokens_per_second * seconds_per_grid for videos. Text after it
resumes at start + max(t_last, rows - 1, cols - 1) + 1 (the rule of the original Qwen2.5-VL code and
of vLLM; transformers >= 5 drops the temporal term, which differs only for videos whose scaled
duration exceeds their spatial extent). Positions restart at every packed sample.

Qwen3-VL (`video_frames_as_items`) writes a "<t seconds>" text timestamp before each video frame,
so each frame is placed as an image of its own (t = 1, no tokens_per_second scaling).

Pure tensor code without Python loops over tokens or images; it is meant to run in the data
loader's CPU workers (the model calls it only when a batch comes without position ids).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def mrope_position_ids(
    input_ids: Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid_ts: Tensor | Sequence[float] | None = None,
    tokens_per_second: float = 2,
    cu_seqlens: Tensor | None = None,
    video_frames_as_items: bool = False,
) -> Tensor:
    """Position ids [3, batch, seq] for `input_ids` [batch, seq].

    `cu_seqlens` marks packed samples inside a [1, seq] batch; positions restart at each.
    Images and videos are consumed in sequence order, row by row, as transformers does.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    device = input_ids.device
    flat = input_ids.reshape(-1)
    total = flat.numel()

    sample_start = torch.zeros(total, dtype=torch.bool, device=device)
    sample_start[::seq] = True
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError("cu_seqlens describes packed samples of a batch with one row")
        bounds = cu_seqlens.to(device=device, dtype=torch.long)
        if int(bounds[-1]) != seq or int(bounds[0]) != 0:
            raise ValueError(
                f"cu_seqlens must run from 0 to the sequence length {seq}, got "
                f"{bounds[0].item()}..{bounds[-1].item()}"
            )
        sample_start[bounds[:-1]] = True
    sample_id = torch.cumsum(sample_start.long(), 0) - 1

    advance = torch.ones(total, dtype=torch.long, device=device)
    offsets = torch.zeros(3, total, dtype=torch.long, device=device)

    video_intervals = None
    if video_frames_as_items and video_grid_thw is not None and len(video_grid_thw):
        video_grid_thw = torch.as_tensor(video_grid_thw).long()
        frames = video_grid_thw.repeat_interleave(video_grid_thw[:, 0], dim=0)
        video_grid_thw = torch.cat([torch.ones_like(frames[:, :1]), frames[:, 1:]], dim=1)
    elif video_grid_thw is not None and len(video_grid_thw):
        seconds = (
            torch.ones(len(video_grid_thw))
            if second_per_grid_ts is None
            else torch.as_tensor(second_per_grid_ts, dtype=torch.float32)
        )
        video_intervals = (tokens_per_second * seconds.float()).to(device)
    for kind, token_id, grids, intervals in (
        ("image", image_token_id, image_grid_thw, None),
        ("video", video_token_id, video_grid_thw, video_intervals),
    ):
        token_index = torch.nonzero(flat == token_id).squeeze(1)
        _place_vision_tokens(
            kind, token_index, grids, intervals, spatial_merge_size, sample_id, advance, offsets
        )

    before = torch.cumsum(advance, 0) - advance  # running position before each token
    start = before - before[sample_start][sample_id]
    return (start.unsqueeze(0) + offsets).view(3, batch, seq)


def _place_vision_tokens(
    kind: str,
    token_index: Tensor,
    grids: Tensor | None,
    intervals: Tensor | None,
    merge: int,
    sample_id: Tensor,
    advance: Tensor,
    offsets: Tensor,
) -> None:
    """Write grid offsets of one modality's tokens and the position advance of each item."""
    n_tokens = token_index.numel()
    if grids is None or len(grids) == 0:
        if n_tokens:
            raise ValueError(f"{n_tokens} {kind} tokens in input_ids but no {kind}_grid_thw")
        return
    device = advance.device
    grids = grids.to(device=device, dtype=torch.long)
    t, h, w = grids[:, 0], grids[:, 1] // merge, grids[:, 2] // merge
    per_item = t * h * w
    expected = int(per_item.sum())
    if expected != n_tokens:
        raise ValueError(
            f"input_ids has {n_tokens} {kind} tokens but {kind}_grid_thw describes {expected} "
            f"({len(grids)} {kind}s after the {merge}x{merge} merge)"
        )
    if intervals is None:
        intervals = torch.ones(len(grids), dtype=torch.float32, device=device)
    item = torch.repeat_interleave(torch.arange(len(grids), device=device), per_item)
    first = torch.cumsum(per_item, 0) - per_item
    k = torch.arange(n_tokens, device=device) - first[item]
    area, cols = (h * w)[item], w[item]
    frame = k // area
    offsets[0, token_index] = (frame.float() * intervals[item]).long()
    offsets[1, token_index] = (k % area) // cols
    offsets[2, token_index] = k % cols

    last_token = token_index[first + per_item - 1]
    first_token = token_index[first]
    crossing = sample_id[first_token] != sample_id[last_token]
    if bool(crossing.any()):
        bad = int(torch.nonzero(crossing)[0])
        raise ValueError(f"{kind} {bad} crosses a packed-sample boundary (check cu_seqlens)")
    t_last = ((t - 1).float() * intervals).long()
    extent = torch.maximum(torch.maximum(t_last, h - 1), w - 1) + 1
    advance[token_index] = 0
    advance[last_token] = extent
