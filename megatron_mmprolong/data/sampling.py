"""Choosing which samples training sees: length-bin and task targets, exact token budgets.

Targets are shares of *tokens* (what the budget and the GPU bill count). Length targets:
`natural` (the pool as it is), `uniform` (equal tokens per non-empty bin), `long-biased`
(tokens per bin proportional to the square of its upper edge; with the default power-of-two bins
that puts ~80% of a 32K-128K pool's tokens in the top bin, like the paper's long-biased ablation)
or explicit per-bin weights. Task targets are weights per task label. When both are given, cell
(task x bin) shares are fitted to both marginals by iterative proportional fitting, starting from
the pool's own mass, so tasks keep their natural length spread as far as the targets allow.
Each cell then contributes whole samples, in a seeded random order, until its token allocation
is met; with replacement a cell's samples are reused (reshuffled) when it runs out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LENGTH_PRESETS = ("natural", "uniform", "long-biased")


class SamplingError(ValueError):
    pass


def default_bin_edges(seq_length: int) -> list[int]:
    """0, then powers of two from 1024 below seq_length, then seq_length."""
    edges, edge = [0], 1024
    while edge < seq_length:
        edges.append(edge)
        edge *= 2
    return [*edges, seq_length]


def length_bins(lengths: np.ndarray, edges: list[int]) -> np.ndarray:
    """Bin index of every length; lengths beyond the last edge fall in the last bin."""
    return np.clip(np.searchsorted(np.asarray(edges), lengths, side="right") - 1, 0, len(edges) - 2)


def bin_shares(mass: np.ndarray, edges: list[int], target) -> np.ndarray:
    """Token share per bin for a length target (preset name or explicit weights)."""
    present = mass > 0
    if isinstance(target, str):
        if target == "natural":
            weights = mass.astype(float)
        elif target == "uniform":
            weights = present.astype(float)
        elif target == "long-biased":
            weights = np.asarray(edges[1:], dtype=float) ** 2 * present
        else:
            raise SamplingError(f"length target {target!r} is not one of {LENGTH_PRESETS} or a list of bin weights")
    else:
        weights = np.asarray(target, dtype=float)
        if weights.shape != mass.shape or (weights < 0).any():
            raise SamplingError(f"explicit length weights need {len(mass)} non-negative values (bins {edges})")
        empty = np.flatnonzero((weights > 0) & ~present)
        if len(empty):
            i = empty[0]
            raise SamplingError(f"length bin {edges[i]}-{edges[i + 1]} has weight but no samples")
    if weights.sum() <= 0:
        raise SamplingError("length target gives no weight to any non-empty bin")
    return weights / weights.sum()


def fit_cells(mass: np.ndarray, task_target: np.ndarray | None, bin_target: np.ndarray,
              iterations: int = 2000, tolerance: float = 1e-10) -> np.ndarray:
    """Token shares per (task, bin) cell whose marginals equal the targets (raking)."""
    cells = mass.astype(float) / mass.sum()
    for _ in range(iterations):
        if task_target is not None:
            rows = cells.sum(1, keepdims=True)
            cells = np.divide(cells * task_target[:, None], rows, out=np.zeros_like(cells), where=rows > 0)
        cols = cells.sum(0, keepdims=True)
        cells = np.divide(cells * bin_target[None, :], cols, out=np.zeros_like(cells), where=cols > 0)
        error = np.abs(cells.sum(0) - bin_target).max()
        if task_target is not None:
            error = max(error, np.abs(cells.sum(1) - task_target).max())
        if error < tolerance:
            return cells
    raise SamplingError("the task and length targets cannot both be met by this pool "
                        f"(off by {error:.3f} after {iterations} rounds); relax one of them")


@dataclass
class Selection:
    samples: np.ndarray  # sample indices in training order (may repeat with replacement)
    target: np.ndarray  # token share per (task, bin)
    achieved: np.ndarray  # token share per (task, bin)


def select(
    lengths: np.ndarray,
    tasks: np.ndarray,
    edges: list[int],
    budget_tokens: int,
    rng: np.random.Generator,
    task_weights: np.ndarray | None = None,
    length_target="natural",
    replacement: bool = False,
    task_names: list[str] | None = None,
) -> Selection:
    """Samples (indices into `lengths`) whose tokens add up to the budget, cell by cell."""
    bins = length_bins(lengths, edges)
    task_names = task_names or [f"#{t}" for t in range(int(tasks.max()) + 1)]
    num_tasks = len(task_names)
    mass = np.zeros((num_tasks, len(edges) - 1))
    np.add.at(mass, (tasks, bins), lengths)
    if mass.sum() == 0:
        raise SamplingError("the pool is empty")
    task_target = None
    if task_weights is not None:
        task_target = np.asarray(task_weights, dtype=float)
        missing = np.flatnonzero((task_target > 0) & (mass.sum(1) == 0))
        if len(missing):
            raise SamplingError(f"task {task_names[missing[0]]} has weight but no samples")
        task_target = task_target / task_target.sum()
    cells = fit_cells(mass, task_target, bin_shares(mass.sum(0), edges, length_target))
    chosen = []
    achieved = np.zeros_like(cells)
    for t, b in zip(*np.nonzero(cells > 0)):
        allocation = cells[t, b] * budget_tokens
        members = np.flatnonzero((tasks == t) & (bins == b))
        taken, tokens = _fill(members, lengths, allocation, rng, replacement, (task_names[t], b, edges))
        chosen.append(taken)
        achieved[t, b] = tokens
    order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    order = order[rng.permutation(len(order))]
    return Selection(order, cells, achieved / max(achieved.sum(), 1))


def _fill(members, lengths, allocation, rng, replacement, where):
    """Whole samples of one cell until `allocation` tokens (the last one only if it brings the
    total closer)."""
    picked, total = [], 0
    while True:
        order = members[rng.permutation(len(members))]
        cumulative = total + np.cumsum(lengths[order])
        stop = int(np.searchsorted(cumulative, allocation))
        if stop < len(order):
            before = cumulative[stop - 1] if stop else total
            if abs(cumulative[stop] - allocation) < abs(before - allocation):
                stop += 1
            picked.append(order[:stop])
            return np.concatenate(picked), int(cumulative[stop - 1]) if stop else total
        if not replacement:
            t, b, edges = where
            raise SamplingError(
                f"task {t}, length {edges[b]}-{edges[b + 1]}: the target needs {allocation:,.0f} tokens but "
                f"the pool has {int(lengths[members].sum()):,}; lower the budget or sample with replacement"
            )
        picked.append(order)
        total = int(cumulative[-1])
