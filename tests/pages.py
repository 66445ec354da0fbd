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


def for_this_rank(batch: dict) -> dict:
    """`batch` (pages of all its images) with only the pages of this rank's `images_to_decode`."""
    grids = batch["image_grid_thw"]
    pixels = grids[:, 1] * grids[:, 2] * 196
    starts = torch.cumsum(pixels, 0) - pixels
    mine = images_to_decode(grids, PageShare.of_this_rank())
    rows = [torch.arange(int(starts[i]), int(starts[i] + pixels[i])) for i in mine]
    return {**batch, "pages": batch["pages"][torch.cat(rows)] if rows else batch["pages"][:0]}
