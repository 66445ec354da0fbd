"""Which page images each rank of a model replica decodes, from the grids alone (known from the
plan's metadata before anything is decoded), so that a replica decodes every page once.

- Context parallelism: a CP rank decodes the images it encodes, by the rule the model uses
  (`assign_images`, patch counts, largest first to the least loaded rank).
- Pipeline parallelism: only stages with the vision encoder (the first) decode anything.
- Tensor parallelism: vision TP needs the same pixels on every TP rank. Each TP rank decodes a
  slice of its CP share (the same rule over the share's images) and the TP group all-gathers
  the uint8 pages (`gather_pages`). Chosen over one rank decoding and broadcasting because it
  spreads the decode work evenly over the group's CPU cores and loader workers (with a
  broadcast, TP rank 0's loader would do all of it and need TP times the cores); the gather
  moves ~1/CP of a sequence's uint8 pages over NVLink, a few ms per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_mmprolong.parallel.context_parallel import assign_images, gathered_rows


@dataclass(frozen=True)
class PageShare:
    """A rank's place in its model replica, as far as page decoding cares."""

    context_parallel: int = 1
    context_rank: int = 0
    tensor_parallel: int = 1
    tensor_rank: int = 0
    encodes_vision: bool = True  # a pipeline stage with the vision encoder

    @classmethod
    def of_this_rank(cls) -> "PageShare":
        from megatron.core import parallel_state as ps

        return cls(ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(),
                   ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                   ps.is_pipeline_first_stage())


def context_share(grids: Tensor, share: PageShare) -> list[int]:
    """The images (indices into `grids`, ascending) that this rank's CP rank encodes."""
    return assign_images(grids.prod(-1), share.context_parallel)[share.context_rank]


def tensor_slices(grids: Tensor, share: PageShare) -> list[list[int]]:
    """For each TP rank, the positions in `context_share` of the images it decodes."""
    owned = torch.tensor(context_share(grids, share), dtype=torch.long)
    return assign_images(grids.prod(-1)[owned], share.tensor_parallel)


def images_to_decode(grids: Tensor, share: PageShare) -> list[int]:
    """The images (indices into `grids`, in the order their pages travel) this rank decodes."""
    if not share.encodes_vision or not len(grids):
        return []
    owned = context_share(grids, share)
    return [owned[i] for i in tensor_slices(grids, share)[share.tensor_rank]]


def gather_pages(pages: Tensor, grids: Tensor, share: PageShare, group, patch: int, merge: int) -> Tensor:
    """This TP rank's decoded pages (uint8 [pixels, 3], `images_to_decode` order) -> the pages of
    the whole CP share, in `context_share` order, on every TP rank of `group`. Every TP rank
    calls it with the same grids (CPU)."""
    if share.tensor_parallel == 1:
        return pages
    grids = grids.cpu()
    unit = (patch * merge) ** 2  # pixels of a merged token: every page is a whole number of them
    owned = torch.tensor(context_share(grids, share), dtype=torch.long)
    units = grids[owned].prod(-1) // merge**2
    slices = tensor_slices(grids, share)
    longest = max(int(units[s].sum()) for s in slices)
    if longest == 0:
        return pages
    local = pages.reshape(-1, unit * 3)
    if len(local) < longest:
        local = torch.cat([local, local.new_zeros(longest - len(local), unit * 3)])
    gathered = local.new_empty(share.tensor_parallel * longest, unit * 3)
    dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
    rows = gathered_rows(units, slices, longest).to(gathered.device, non_blocking=True)
    return gathered.index_select(0, rows).view(-1, 3)
