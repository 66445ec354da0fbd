"""Page images -> the vision encoder's input, in one vectorised pass that runs where the pages
are (the GPU in training): RGB uint8 scaled to [0, 1], normalised with the family's mean/std
(CLIP for Qwen2.5-VL, 0.5 for Qwen3-VL), duplicated to `temporal` frames and cut into patch x patch
patches in merge-group order, as the image processor makes them: [patches, 3 * temporal * patch^2]
float32.

Pages travel as uint8 `[pixels, 3]`: each image's [h * patch, w * patch, 3] rows (HWC, as decoders
give them) back to back, in the order of their grids. They are 8x smaller than the float
patches (4 bytes a value, 2 frames), so the loader ships these and the device expands them.
Shared by the model (training) and by data/pixels.py (host-side inputs for transformers).
"""

from __future__ import annotations

import torch
from torch import Tensor

def page_pixels(grids: Tensor, patch: int) -> Tensor:
    """Pixels of each page [images] (int64) from its grid (t, h, w) in patches."""
    return grids[:, 1].long() * grids[:, 2].long() * patch * patch


def patchify(pages: Tensor, grids: Tensor, patch: int, merge: int, temporal: int, *,
             mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 pages [pixels, 3] with their grids [images, 3] (t = 1; on the CPU, so no host sync)
    -> float32 [sum of h * w, 3 * temporal * patch * patch], normalised with the processor's mean/std."""
    grids = grids.detach().to("cpu", torch.int64).reshape(-1, 3)
    channels = 3
    side = patch * merge  # one merged token covers side x side pixels
    if len(grids) and bool((grids[:, 0] != 1).any()):
        raise ValueError(f"pages are single images (t = 1), got grids {grids[grids[:, 0] != 1][:3].tolist()}")
    if bool((grids[:, 1:] % merge).any()):
        raise ValueError(f"page grids must be multiples of the merge size {merge}")
    if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] != channels:
        raise ValueError(f"pages must be uint8 [pixels, 3], got {pages.dtype} {list(pages.shape)}")
    pixels = int(page_pixels(grids, patch).sum())
    if pages.shape[0] != pixels:
        raise ValueError(f"pages hold {pages.shape[0]} pixels but their grids describe {pixels}")
    device = pages.device
    rows, cols = grids[:, 1] // merge, grids[:, 2] // merge  # merged tokens down and across each page
    tokens = rows * cols
    total = int(tokens.sum())
    # Every merged token is `side` runs of `side` contiguous pixels, one per pixel row; a page
    # row holds `cols` runs and a page starts at a multiple of side * side pixels, so runs are
    # whole rows of the pages viewed as [pixels / side, side * 3].
    sizes = page_pixels(grids, patch)
    first_run = (torch.cumsum(sizes, 0) - sizes) // side
    tokens_here = tokens.to(device, non_blocking=True)

    def per_token(values: Tensor) -> Tensor:  # each page's value, once per merged token of it
        return torch.repeat_interleave(values.to(device, non_blocking=True), tokens_here, output_size=total)

    token_in_page = torch.arange(total, device=device) - per_token(torch.cumsum(tokens, 0) - tokens)
    page_cols = per_token(cols)
    top_left = per_token(first_run) + (token_in_page // page_cols) * side * page_cols + token_in_page % page_cols
    runs = top_left[:, None] + torch.arange(side, device=device)[None] * page_cols[:, None]  # [total, side]
    blocks = pages.view(-1, side * channels).index_select(0, runs.flatten())
    blocks = blocks.view(total, merge, patch, merge, patch, channels)  # (row patch, row, col patch, col, C)
    # made on the host and copied without a wait: torch.tensor(..., device="cuda") would sync
    mean, std, scale = (torch.tensor(v, dtype=torch.float32).to(device, non_blocking=True)
                        for v in (mean, std, 1 / 255))
    values = (blocks.to(torch.float32) * scale - mean) / std
    values = values.permute(0, 1, 3, 5, 2, 4)  # (token, row patch, col patch, C, row, col)
    values = values.unsqueeze(4).expand(total, merge, merge, channels, temporal, patch, patch)
    return values.reshape(total * merge * merge, channels * temporal * patch * patch)
