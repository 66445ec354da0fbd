"""Context parallelism for the VLM.

The whole text+image sequence is embedded first; then each CP rank keeps, of every packed
sample, chunks r and 2*CP-1-r of its 2*CP equal chunks (the load-balanced zigzag layout of
Transformer Engine's THD partitioning; one sample per row for unpacked batches). Samples must be
padded to a multiple of 2*CP (the loader does). Images are split over the CP ranks by patch
count, each encoded by one rank, and the features gathered, so no rank repeats vision work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def local_token_index(cu_seqlens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Global positions of the tokens this CP rank holds, in its local order (CPU, int64)."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    lengths = cu.diff()
    bad = torch.nonzero(lengths % (2 * cp_size)).flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"packed sample {i} has {int(lengths[i])} tokens, not a multiple of 2 x CP = {2 * cp_size}; "
                         "pad samples to the layout's multiple")
    chunk = lengths // (2 * cp_size)
    starts = torch.stack([cu[:-1] + cp_rank * chunk, cu[:-1] + (2 * cp_size - 1 - cp_rank) * chunk], 1).flatten()
    sizes = chunk.repeat_interleave(2)
    within = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    return torch.repeat_interleave(starts, sizes) + within


def assign_images(patches: Tensor, cp_size: int) -> list[list[int]]:
    """Images per CP rank, largest first to the least loaded rank (same result on every rank)."""
    loads = [0] * cp_size
    owned: list[list[int]] = [[] for _ in range(cp_size)]
    for image in sorted(range(len(patches)), key=lambda i: (-int(patches[i]), i)):
        rank = min(range(cp_size), key=lambda r: (loads[r], r))
        owned[rank].append(image)
        loads[rank] += int(patches[image])
    return [sorted(images) for images in owned]


class _GatherRows(torch.autograd.Function):
    """All-gather row blocks of different sizes; the backward sums each block's gradient over
    the ranks that used it and returns this rank's rows."""

    @staticmethod
    def forward(ctx, local: Tensor, sizes: list[int], group) -> Tensor:
        ctx.sizes, ctx.group, ctx.rank = sizes, group, dist.get_rank(group)
        longest = max(sizes)
        padded = local.new_zeros(longest, *local.shape[1:])
        padded[: len(local)] = local
        gathered = local.new_empty(len(sizes) * longest, *local.shape[1:])
        dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        return torch.cat([gathered[r * longest: r * longest + n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def gather_rows(local: Tensor, sizes: list[int], group) -> Tensor:
    return _GatherRows.apply(local, sizes, group)
