"""Page images for tests that build micro-batches by hand: random uint8 pages for grids, and a
batch cut to what this rank's loader would give it (the loader selects before decoding)."""

from __future__ import annotations

import numpy as np
import torch

from megatron_mmprolong.parallel.page_split import PageShare, images_to_decode


def random_pages(grids, rng: np.random.Generator, patch: int = 14) -> np.ndarray:
    """uint8 [pixels, 3] for images of `grids` [images, 3] (t = 1)."""
    pixels = int(np.prod(np.asarray(grids).reshape(-1, 3)[:, 1:], axis=1).sum()) * patch * patch
    return rng.integers(0, 256, (pixels, 3), dtype=np.uint8)


def old_host_patches(rgb: np.ndarray) -> np.ndarray:
    """The loader's host path before the uint8 pages, kept as the oracle: uint8 [H, W, 3] ->
    float32 [0, 1] -> CLIP-normalised CHW -> patches in merge-group order, the temporal frame
    duplicated: [(H/14) * (W/14), 1176]."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    chw = ((np.asarray(rgb, dtype=np.float32) * np.float32(1 / 255) - mean) / std).transpose(2, 0, 1)
    channels, height, width = chw.shape
    gh, gw = height // 14, width // 14
    grid = chw.reshape(channels, gh // 2, 2, 14, gw // 2, 2, 14).transpose(1, 4, 2, 5, 0, 3, 6)
    grid = np.broadcast_to(grid[:, :, :, :, :, None], (*grid.shape[:5], 2, 14, 14))
    return np.ascontiguousarray(grid).reshape(gh * gw, 3 * 2 * 14 * 14)


def for_this_rank(batch: dict, patch: int = 14) -> dict:
    """`batch` (pages of all its images) with only the pages of this rank's `images_to_decode`."""
    grids = batch["image_grid_thw"]
    pixels = grids[:, 1] * grids[:, 2] * patch * patch
    starts = torch.cumsum(pixels, 0) - pixels
    mine = images_to_decode(grids, PageShare.of_this_rank())
    rows = [torch.arange(int(starts[i]), int(starts[i] + pixels[i])) for i in mine]
    return {**batch, "pages": batch["pages"][torch.cat(rows)] if rows else batch["pages"][:0]}
