"""Context parallelism for the VLM.

The whole text+image sequence is embedded first; then each CP rank keeps, of every packed
sample, chunks r and 2*CP-1-r of its 2*CP equal chunks (the load-balanced zigzag layout of
Transformer Engine's THD partitioning; one sample per row for unpacked batches). Samples must be
padded to a multiple of 2*CP (the loader does). Images are split over the CP ranks by patch
count, each encoded by one rank, and the features all-gathered, so no rank repeats vision work;
each rank places only the features of its own tokens, and the backward reduce-scatters their
gradients back to the encoding ranks.
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


def gathered_rows(merged: Tensor, owned: list[list[int]], longest: int) -> Tensor:
    """For `gather_padded`'s output: the row of every image's every merged token, images in input
    order (CPU, int64). Rank r's block starts at r * longest and holds its images in order."""
    rank_of = torch.empty(len(merged), dtype=torch.long)
    start_in_block = torch.empty(len(merged), dtype=torch.long)
    for rank, images in enumerate(owned):
        index = torch.tensor(images, dtype=torch.long)
        sizes = merged[index]
        rank_of[index] = rank
        start_in_block[index] = torch.cumsum(sizes, 0) - sizes
    starts = rank_of * longest + start_in_block
    within = torch.arange(int(merged.sum())) - torch.repeat_interleave(torch.cumsum(merged, 0) - merged, merged)
    return torch.repeat_interleave(starts, merged) + within


class _GatherPadded(torch.autograd.Function):
    """All-gather row blocks of up to `longest` rows, each padded to it: rank r's rows start at
    r * longest. The backward reduce-scatters, so each rank receives the gradient of its own rows
    summed over the ranks that used them, and nothing else."""

    @staticmethod
    def forward(ctx, local: Tensor, longest: int, group) -> Tensor:
        ctx.group, ctx.rows = group, len(local)
        padded = local
        if len(local) < longest:
            padded = torch.cat([local, local.new_zeros(longest - len(local), *local.shape[1:])])
        gathered = local.new_empty(dist.get_world_size(group) * longest, *local.shape[1:])
        dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor):
        mine = grad.new_empty(grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:])
        dist.reduce_scatter_tensor(mine, grad.contiguous(), group=ctx.group)
        return mine[: ctx.rows], None, None


def gather_padded(local: Tensor, longest: int, group) -> Tensor:
    """Every rank must call it with the same `longest` and a `local` of the same dtype, and with
    `local` requiring grad on all ranks or on none (the backward is a collective too)."""
    return _GatherPadded.apply(local, longest, group)
