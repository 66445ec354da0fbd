"""Offline packing of samples into micro-batch sequences, and their split over data-parallel ranks.

A pack is one packed (THD) sequence of at most `seq_length` tokens holding whole samples;
each sample is padded only to the alignment its layout needs (DESIGN §6: a multiple of 2*CP,
times TP with sequence parallelism, and 16 for FP8), and with FP8 the pack to 16 rows per
CP x TP rank, so packs have variable lengths and padding is a few tokens per sample. Fixed-length packs cannot do much better than ~95% on a 32K-128K pool
(two samples over 64K never share one); variable-length packs reach >99% and the cost of a step
is balanced across data-parallel ranks instead (cost of a sample: linear ~ s plus attention ~ s^2).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Alignment:
    context_parallel: int = 1
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    fp8: bool = False

    @property
    def multiple(self) -> int:
        multiple = 2 * self.context_parallel if self.context_parallel > 1 else 1
        if self.sequence_parallel:
            multiple *= self.tensor_parallel
        return math.lcm(multiple, 16) if self.fp8 else multiple

    def pad(self, lengths: np.ndarray) -> np.ndarray:
        m = self.multiple
        return (np.asarray(lengths) + m - 1) // m * m

    @property
    def pack_multiple(self) -> int:
        """What a whole pack's length must be a multiple of. Transformer Engine checks FP8 GEMM
        inputs on each rank's local rows (before the sequence-parallel all-gather) for rows % 8,
        so with FP8 every CP x TP rank gets a multiple of 16 rows: a pack padded sample by sample
        to lcm(2*CP*TP, 16) holds only 2 rows per sample and rank at TP4 x CP16."""
        if not self.fp8:
            return self.multiple
        rows = 16 * self.context_parallel * (self.tensor_parallel if self.sequence_parallel else 1)
        return math.lcm(rows, self.multiple)

    def pack_length(self, lengths) -> int:
        """Tokens of a pack of samples of `lengths`: each padded, then the pack (one trailing pad
        segment, itself a multiple of 2*CP) up to `pack_multiple`."""
        m = self.pack_multiple
        return int(self.pad(lengths).sum() + m - 1) // m * m

    def capacity(self, seq_length: int) -> int:
        """The most padded sample tokens a pack may hold so that its length stays <= seq_length."""
        return seq_length // self.pack_multiple * self.pack_multiple


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Bins (arrays of item indices) of at most `capacity`; items longest first, each into the
    fullest bin it fits. Items longer than the capacity are an error."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an item of {int(lengths.max())} tokens exceeds the pack size {capacity}")
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    bins: list[list[int]] = []
    for item in order:
        size = int(lengths[item])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            remaining, bin_id = free.pop(at)
        else:
            remaining, bin_id = capacity, len(bins)
            bins.append([])
        bins[bin_id].append(int(item))
        if remaining - size > 0:
            bisect.insort(free, (remaining - size, bin_id))
    return [np.asarray(sorted(b), dtype=np.int64) for b in bins]


def first_fit(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """The naive baseline: items in input order, each into the first bin with room."""
    remaining: list[int] = []
    bins: list[list[int]] = []
    for item, size in enumerate(np.asarray(lengths)):
        for b, room in enumerate(remaining):
            if room >= size:
                remaining[b] -= int(size)
                bins[b].append(item)
                break
        else:
            remaining.append(capacity - int(size))
            bins.append([item])
    return [np.asarray(b, dtype=np.int64) for b in bins]


def sample_cost(lengths: np.ndarray, attention_weight: float) -> np.ndarray:
    """Relative compute of samples: linear layers ~ s, causal attention ~ s^2."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return lengths + attention_weight * lengths**2


def attention_weight_for(hidden_size: int, num_layers: int, parameters: float) -> float:
    """Ratio of per-token attention FLOPs per unit of sequence length to per-token linear FLOPs:
    6*d*L*s (causal score and value matmuls, forward and backward) over 6*N."""
    return hidden_size * num_layers / parameters


def balance(costs: np.ndarray, ranks: int) -> list[np.ndarray]:
    """Split packs over ranks, equal counts, by longest-processing-time (largest cost first to the
    least loaded rank with a free slot). Returns each rank's pack indices in ascending order."""
    count = len(costs)
    if count % ranks:
        raise ValueError(f"{count} packs per step do not divide over {ranks} data-parallel ranks")
    per_rank = count // ranks
    loads = np.zeros(ranks)
    assigned: list[list[int]] = [[] for _ in range(ranks)]
    for pack in np.argsort(-np.asarray(costs), kind="stable"):
        open_ranks = [r for r in range(ranks) if len(assigned[r]) < per_rank]
        rank = min(open_ranks, key=lambda r: (loads[r], r))
        assigned[rank].append(int(pack))
        loads[rank] += costs[pack]
    return [np.asarray(sorted(a), dtype=np.int64) for a in assigned]


@dataclass
class PackingReport:
    samples: int
    packs: int
    real_tokens: int
    padded_tokens: int  # what the packs hold after alignment padding
    fixed_bin_tokens: int  # the same packs padded to seq_length
    lower_bound_packs: int  # no fixed-length packing can use fewer

    @property
    def efficiency(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)

    @property
    def fixed_bin_efficiency(self) -> float:
        return self.real_tokens / max(self.fixed_bin_tokens, 1)


def packing_report(lengths: np.ndarray, packs: list[np.ndarray], seq_length: int, alignment: Alignment) -> PackingReport:
    """Figures over the samples in `packs` (indices into `lengths`)."""
    packed = np.asarray(lengths)[np.concatenate(packs)] if packs else np.zeros(0, dtype=np.int64)
    return PackingReport(
        samples=len(packed),
        packs=len(packs),
        real_tokens=int(packed.sum()),
        padded_tokens=sum(alignment.pack_length(np.asarray(lengths)[p]) for p in packs),
        fixed_bin_tokens=len(packs) * seq_length,
        lower_bound_packs=max(math.ceil(packed.sum() / seq_length), int((packed > seq_length / 2).sum())),
    )
