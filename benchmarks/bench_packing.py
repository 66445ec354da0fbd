"""Packing efficiency on the DESIGN §10 pool: 10,000 samples, long part 32768 + 98304*Beta(1.1, 1.4)
tokens, short tail of 0/10/20% log-uniform in 1K-16K, seq_length 131072, fixed seed.

Prints, per tail: padding every sample to seq_length, first-fit in input order, best-fit
decreasing into fixed-length packs, and ours (best-fit decreasing into variable-length packs,
each sample padded to the layout's multiple), next to the lower bound on fixed packs; plus the
compute utilisation of a 32-pack global batch over 8 data-parallel ranks (attention ~ s^2 of 7B).

    python benchmarks/bench_packing.py [--samples 10000]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from megatron_mmprolong.data.packing import (
    Alignment,
    balance,
    best_fit_decreasing,
    first_fit,
    packing_report,
    sample_cost,
)

SEQ = 131072
ATTENTION_WEIGHT = 1.32e-5  # Qwen2.5-VL-7B: hidden * layers / parameters


def pool(samples: int, tail: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    short = int(round(samples * tail))
    long = (32768 + 98304 * rng.beta(1.1, 1.4, samples - short)).astype(np.int64)
    tail_lengths = np.exp(rng.uniform(np.log(1024), np.log(16384), short)).astype(np.int64)
    lengths = np.concatenate([long, tail_lengths])
    return lengths[rng.permutation(len(lengths))]


def utilisation(pack_costs: np.ndarray, useful: float, batch: int = 32, ranks: int = 8) -> float:
    """useful work / (steps x ranks x slowest rank's work) with a compute-balanced split."""
    steps = len(pack_costs) // batch
    slowest = 0.0
    for s in range(steps):
        costs = pack_costs[s * batch:(s + 1) * batch]
        slowest += max(costs[r].sum() for r in balance(costs, ranks)) * ranks
    return useful * steps * batch / len(pack_costs) / slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10000)
    args = parser.parse_args()
    alignment = Alignment(context_parallel=4, tensor_parallel=2, sequence_parallel=True, fp8=True)
    rows = {}
    for tail in (0.0, 0.1, 0.2):
        lengths = pool(args.samples, tail)
        real = int(lengths.sum())
        padded = alignment.pad(lengths)
        useful = float(sample_cost(lengths, ATTENTION_WEIGHT).sum())
        order = np.random.default_rng(1).permutation
        ours = best_fit_decreasing(padded, SEQ)
        ours = [ours[i] for i in order(len(ours))]
        ours_costs = np.array([sample_cost(padded[p], ATTENTION_WEIGHT).sum() for p in ours])
        fixed = best_fit_decreasing(lengths, SEQ)
        fixed = [fixed[i] for i in order(len(fixed))]
        # a fixed-length pack also spends linear work on its padding up to seq_length
        fixed_costs = np.array([sample_cost(lengths[p], ATTENTION_WEIGHT).sum() + (SEQ - lengths[p].sum()) for p in fixed])
        report = packing_report(lengths, ours, SEQ, alignment)
        rows[f"tail_{int(tail * 100)}%"] = {
            "samples_over_100k": round(float((lengths >= 100_000).mean()), 3),
            "pad_each_to_seq_length": round(real / (len(lengths) * SEQ), 4),
            "first_fit_input_order": round(real / (len(first_fit(lengths, SEQ)) * SEQ), 4),
            "best_fit_decreasing_fixed": round(real / (len(fixed) * SEQ), 4),
            "ours_variable_length": round(report.efficiency, 4),
            "lower_bound_fixed_packs": report.lower_bound_packs,
            "ours_packs": report.packs,
            "fixed_packs": len(fixed),
            "compute_utilisation_ours": round(utilisation(ours_costs, useful), 4),
            "compute_utilisation_fixed_bfd": round(utilisation(fixed_costs, useful), 4),
        }
    print(json.dumps({"seq_length": SEQ, "alignment_multiple": alignment.multiple, "pools": rows}, indent=2))


if __name__ == "__main__":
    main()
