"""One micro-batch through the model, in the form Megatron-Core's pipeline schedules call.

The loss is summed over this rank's answer tokens and returned with their count
(`calculate_per_token_loss`): gradients are normalised by the number of loss tokens across all
context- and data-parallel ranks, not per rank or per micro-batch.

The loader gives each rank the uint8 pages of its TP slice of its CP share of the images
(parallel/page_split.py); on the first pipeline stage the TP group all-gathers them here, so
the model receives its CP share on every TP rank and patchifies it on the device.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.utils import get_attr_wrapped_model
from torch import Tensor

from megatron_mmprolong.model.packed import packed_segments
from megatron_mmprolong.parallel.page_split import PageShare, gather_pages


def batch_to_device(batch: dict, device: torch.device) -> dict:
    moved = {}
    for key, value in batch.items():
        # grids and cu_seqlens stay on the CPU: index maths happens there without syncs
        # (packed_segments puts a device copy of cu_seqlens beside them for the kernels)
        keep = key in ("image_grid_thw", "cu_seqlens")
        moved[key] = value.to(device, non_blocking=True) if isinstance(value, Tensor) and not keep else value
    return moved


def forward_step(data_iterator, model, device: torch.device | None = None):
    """Megatron schedule entry: (output, loss function) for the next micro-batch."""
    batch = next(data_iterator)
    core = get_attr_wrapped_model(model, "cp_token_index", return_model_obj=True)
    cu_cpu = batch["cu_seqlens"]
    cp_index = core.cp_token_index(batch["tokens"].shape[1], cu_cpu) if core.cp_size > 1 else None
    device = device or next(core.parameters()).device
    batch = batch_to_device(batch, device)
    packed = packed_segments(cu_cpu, device, batch["max_seqlen"])
    loss_mask = batch["loss_mask"]
    if cp_index is not None:
        cp_index = cp_index.to(device, non_blocking=True)
        loss_mask = loss_mask[:, cp_index]
    grids = batch["image_grid_thw"]
    pages = None
    if core.pre_process and len(grids):
        vision = core.model_config.vision
        pages = gather_pages(batch["pages"], grids, PageShare.of_this_rank(), core.pg_collection.tp,
                             vision.patch_size, vision.spatial_merge_size)
    output = model(
        batch["tokens"], batch["position_ids"],
        pages=pages, image_grid_thw=grids if pages is not None else None,
        packed_seq_params=packed, labels=batch["labels"], cp_index=cp_index,
    )
    return output, partial(loss_function, loss_mask)


def loss_function(loss_mask: Tensor, per_token_loss: Tensor):
    """(summed loss, loss-token count, [sum, count] for logging) as Megatron's schedules expect."""
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.detach().float()])}
