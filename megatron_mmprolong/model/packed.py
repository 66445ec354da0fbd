"""Packed (THD) segment boundaries on the device for the kernels, and on the host for index maths.

Transformer Engine's attention takes `cu_seqlens` on the GPU; the CP split, M-RoPE positions
and the local backend's segment grouping need them as numbers. Reading them back from the
device is a host sync per layer and step, so `PackedSegments` keeps the host copy it was made
from, and `segment_groups` (the local backend's equal-length groups) is computed once per
micro-batch, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor


@dataclass
class PackedSegments(PackedSeqParams):
    cu_seqlens_host: Tensor | None = None  # int32 on the CPU, equal to cu_seqlens_q
    _groups: dict = field(default_factory=dict, repr=False, compare=False)

    def segment_groups(self, device: torch.device) -> list[tuple[int, Tensor]]:
        """(length, token index [segments * length] on `device`) per distinct segment length:
        segments of one length attend as one batch."""
        if device not in self._groups:
            cu = self.cu_seqlens_host.long()
            starts, lengths = cu[:-1], cu.diff()
            groups = []
            for length in torch.unique(lengths[lengths > 0]).tolist():
                index = (starts[lengths == length].unsqueeze(1) + torch.arange(length)).reshape(-1)
                groups.append((length, index.to(device, non_blocking=True)))
            self._groups[device] = groups
        return self._groups[device]


def host_cu_seqlens(params: PackedSeqParams) -> Tensor:
    """The segment boundaries as a CPU tensor (a device read only for plain PackedSeqParams)."""
    host = getattr(params, "cu_seqlens_host", None)
    return host if host is not None else params.cu_seqlens_q.cpu()


def as_packed_segments(params: PackedSeqParams) -> PackedSegments:
    if isinstance(params, PackedSegments):
        return params
    return packed_segments(host_cu_seqlens(params), params.cu_seqlens_q.device, params.max_seqlen_q)


def packed_segments(cu_seqlens: Tensor, device: torch.device, max_seqlen: int | None = None) -> PackedSegments:
    """THD parameters for segments with boundaries `cu_seqlens` (CPU), self-attention."""
    host = cu_seqlens.to("cpu", torch.int32)
    on_device = host.to(device, non_blocking=True)
    longest = int(host.diff().max()) if max_seqlen is None and len(host) > 1 else (max_seqlen or 0)
    return PackedSegments(qkv_format="thd", cu_seqlens_q=on_device, cu_seqlens_kv=on_device,
                          max_seqlen_q=longest, max_seqlen_kv=longest, cu_seqlens_host=host)
