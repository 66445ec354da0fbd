"""Mixtures and training plans (`mmprolong plan-data MIX.yaml`).

A mixture YAML names built datasets with weights, optional task and length targets, and a token
budget:

    token_budget: 5.0e9
    seed: 1234
    length_bins: [0, 32768, 65536, 100000, 131072]   # optional; default powers of two
    datasets:
      - path: data/mmprolong          # dataset prefix (build-data --output-prefix)
        weight: 0.8
        tasks: {extract-single: 0.4, extract-multi: 0.4, reasoning: 0.2}
        lengths: natural              # natural | uniform | long-biased | [w0, w1, ...]
        replacement: false
      - path: data/ocr
        weight: 0.2

The plan fixes, from metadata alone and deterministically, which samples are trained on, how
they are packed into micro-batch sequences, and which step each pack belongs to; packs are split
over data-parallel ranks when loading (`rank_schedule`), balanced by compute. Steps are whole
global batches: trailing packs that do not fill one are left out, and the summary counts exactly
what training will see.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from megatron_mmprolong.data.packing import Alignment, balance, best_fit_decreasing, packing_report, sample_cost
from megatron_mmprolong.data.sampling import SamplingError, default_bin_edges, length_bins, select
from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.errors import BadInput

PLAN_FORMAT = "megatron-mmprolong/plan"


class PlanError(BadInput, ValueError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    weight: float = 1.0
    tasks: dict[str, float] | None = None
    lengths: object = "natural"
    replacement: bool = False


@dataclass(frozen=True)
class MixtureSpec:
    datasets: tuple[DatasetSpec, ...]
    token_budget: int
    seed: int = 0
    length_bins: tuple[int, ...] | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MixtureSpec":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_bytes())
        except (OSError, yaml.YAMLError) as err:
            raise PlanError(f"{path}: cannot read the mixture ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
            raise PlanError(f"{path}: needs a non-empty 'datasets' list")
        unknown = set(data) - {"datasets", "token_budget", "seed", "length_bins"}
        if unknown:
            raise PlanError(f"{path}: unknown keys {sorted(unknown)}")
        specs = []
        for i, entry in enumerate(data["datasets"]):
            if not isinstance(entry, dict) or "path" not in entry:
                raise PlanError(f"{path}: datasets[{i}] needs a 'path'")
            extra = set(entry) - {"path", "weight", "tasks", "lengths", "replacement"}
            if extra:
                raise PlanError(f"{path}: datasets[{i}] has unknown keys {sorted(extra)}")
            prefix = Path(entry["path"])
            prefix = prefix if prefix.is_absolute() else (path.parent / prefix)
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise PlanError(f"{path}: datasets[{i}] weight must be a positive number, got {weight!r}")
            specs.append(DatasetSpec(str(prefix.resolve()), weight, entry.get("tasks"),
                                     entry.get("lengths", "natural"), bool(entry.get("replacement", False))))
        try:
            budget = int(float(data["token_budget"]))
        except (KeyError, TypeError, ValueError):
            raise PlanError(f"{path}: 'token_budget' (tokens, e.g. 5.0e9) is required") from None
        bins = data.get("length_bins")
        return cls(tuple(specs), budget, int(data.get("seed", 0)), tuple(bins) if bins else None)


@dataclass(frozen=True)
class PlanConfig:
    seq_length: int
    global_batch: int  # packs (micro-batch sequences) per step
    alignment: Alignment = field(default_factory=Alignment)
    attention_weight: float = 1.32e-5  # Qwen2.5-VL-7B: hidden*layers / parameters
    data_parallel: int | None = None  # only for the utilisation figure of the summary

    def __post_init__(self):
        sizes = {"--seq-length": self.seq_length, "--global-batch-size": self.global_batch,
                 "--context-parallel-size": self.alignment.context_parallel,
                 "--tensor-model-parallel-size": self.alignment.tensor_parallel,
                 "--data-parallel-size": self.data_parallel or 1}
        for flag, value in sizes.items():
            if value < 1:
                raise PlanError(f"{flag} {value}: must be at least 1")


@dataclass
class Plan:
    datasets: list[str]
    dataset_refs: np.ndarray  # uint16 [samples]: dataset of each packed sample
    sample_refs: np.ndarray  # int64 [samples]: sample index within its dataset
    sample_tokens: np.ndarray  # int32 [samples]: real length
    pack_offsets: np.ndarray  # int64 [packs + 1] into the refs
    config: PlanConfig
    summary: dict

    @property
    def packs(self) -> int:
        return len(self.pack_offsets) - 1

    @property
    def steps(self) -> int:
        return self.packs // self.config.global_batch

    def pack(self, index: int) -> slice:
        return slice(int(self.pack_offsets[index]), int(self.pack_offsets[index + 1]))

    def pack_costs(self) -> np.ndarray:
        """Compute of each pack: its padded samples, and the trailing pad segment FP8 adds."""
        alignment = self.config.alignment
        padded = alignment.pad(self.sample_tokens)
        if not len(padded):
            return padded.astype(np.float64)
        costs = np.add.reduceat(sample_cost(padded, self.config.attention_weight), self.pack_offsets[:-1])
        totals = np.add.reduceat(padded, self.pack_offsets[:-1])
        m = alignment.pack_multiple
        return costs + sample_cost((totals + m - 1) // m * m - totals, self.config.attention_weight)

    def rank_schedule(self, rank: int, data_parallel: int) -> np.ndarray:
        """This rank's packs in training order: per step, its share of a compute-balanced split."""
        if not 0 <= rank < data_parallel:
            raise ValueError(f"rank {rank} outside data-parallel size {data_parallel}")
        costs = self.pack_costs()
        batch = self.config.global_batch
        schedule = []
        for step in range(self.steps):
            packs = np.arange(step * batch, (step + 1) * batch)
            schedule.append(packs[balance(costs[packs], data_parallel)[rank]])
        return np.concatenate(schedule) if schedule else np.zeros(0, dtype=np.int64)

    def digest(self) -> str:
        h = hashlib.sha256()
        for array in (self.dataset_refs, self.sample_refs, self.pack_offsets):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(json.dumps(asdict(self.config), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """PATH.npz (arrays) and PATH.json (datasets, config, summary)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(f"{path}.npz", dataset_refs=self.dataset_refs, sample_refs=self.sample_refs,
                 sample_tokens=self.sample_tokens, pack_offsets=self.pack_offsets)
        meta = {"format": PLAN_FORMAT, "digest": self.digest(), "datasets": self.datasets,
                "config": asdict(self.config), "summary": self.summary}
        Path(f"{path}.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            meta = json.loads(Path(f"{path}.json").read_text())
            arrays = np.load(f"{path}.npz")
        except (OSError, ValueError) as err:  # missing, unreadable, not JSON, not an npz
            raise PlanError(f"{path}: not a readable plan ({err}); make one with mmprolong plan-data") from None
        if not isinstance(meta, dict) or meta.get("format") != PLAN_FORMAT:
            raise PlanError(f"{path}.json is not a plan")
        config = dict(meta["config"])
        config["alignment"] = Alignment(**config["alignment"])
        plan = cls(meta["datasets"], arrays["dataset_refs"], arrays["sample_refs"], arrays["sample_tokens"],
                   arrays["pack_offsets"], PlanConfig(**config), meta["summary"])
        if plan.digest() != meta["digest"]:
            raise PlanError(f"{path}.npz does not match {path}.json (digest)")
        return plan


def make_plan(mixture: MixtureSpec, config: PlanConfig) -> Plan:
    rng = np.random.default_rng(mixture.seed)
    edges = list(mixture.length_bins or default_bin_edges(config.seq_length))
    total_weight = sum(d.weight for d in mixture.datasets)
    stores = [MultimodalStore(d.path) for d in mixture.datasets]
    dataset_refs, sample_refs, targets = [], [], []
    for index, (spec, store) in enumerate(zip(mixture.datasets, stores)):
        lengths = np.asarray(store.samples["tokens"], dtype=np.int64)
        if len(lengths) and lengths.max() > config.seq_length:
            raise PlanError(f"{spec.path}: samples of up to {lengths.max()} tokens exceed --seq-length {config.seq_length}")
        tasks = np.asarray(store.samples["task"], dtype=np.int64)
        names = store.manifest["tasks"]
        task_weights = None
        if spec.tasks:
            unknown = sorted(set(spec.tasks) - set(names))
            if unknown:
                raise PlanError(f"{spec.path}: tasks {unknown} are not in the dataset (it has {names})")
            task_weights = np.array([float(spec.tasks.get(name, 0.0)) for name in names])
        budget = int(round(mixture.token_budget * spec.weight / total_weight))
        try:
            selection = select(lengths, tasks, edges, budget, rng, task_weights, spec.lengths,
                               spec.replacement, task_names=names)
        except SamplingError as err:
            raise PlanError(f"{spec.path}: {err}") from None
        dataset_refs.append(np.full(len(selection.samples), index, dtype=np.uint16))
        sample_refs.append(selection.samples.astype(np.int64))
        targets.append(selection.target)
    datasets = np.concatenate(dataset_refs)
    samples = np.concatenate(sample_refs)
    tokens = np.concatenate([np.asarray(stores[i].samples["tokens"])[refs] for i, refs in enumerate(sample_refs)])
    tokens = tokens.astype(np.int32)
    order = rng.permutation(len(samples))  # mixes datasets before packing breaks length ties
    datasets, samples, tokens = datasets[order], samples[order], tokens[order]

    padded = config.alignment.pad(tokens)
    packs = best_fit_decreasing(padded, config.alignment.capacity(config.seq_length))
    packs = [packs[i] for i in rng.permutation(len(packs))]
    kept = len(packs) // config.global_batch * config.global_batch
    if kept == 0:
        raise PlanError(f"the budget fills {len(packs)} packs, less than one global batch of {config.global_batch}")
    report = packing_report(tokens, packs[:kept], config.seq_length, config.alignment)
    members = np.concatenate(packs[:kept])
    offsets = np.zeros(kept + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in packs[:kept]])
    plan = Plan([d.path for d in mixture.datasets], datasets[members], samples[members], tokens[members],
                offsets, config, {})
    plan.summary = _summary(plan, mixture, stores, edges, targets, report, len(packs) - kept)
    return plan


def _summary(plan: Plan, mixture: MixtureSpec, stores, edges, targets, report, dropped_packs: int) -> dict:
    per_dataset = []
    for index, (spec, store, target) in enumerate(zip(mixture.datasets, stores, targets)):
        mine = plan.dataset_refs == index
        rows = plan.sample_refs[mine]
        lengths = np.asarray(store.samples["tokens"])[rows].astype(np.int64)
        tasks = np.asarray(store.samples["task"])[rows]
        bins = length_bins(lengths, edges)
        names = store.manifest["tasks"]
        total = max(int(lengths.sum()), 1)
        per_dataset.append({
            "path": spec.path,
            "samples": int(mine.sum()),
            "unique_samples": len(np.unique(rows)),
            "tokens": int(lengths.sum()),
            "tasks": {names[t]: {"tokens": int(lengths[tasks == t].sum()), "share": round(lengths[tasks == t].sum() / total, 4),
                                 "target": round(float(target[t].sum()), 4)}
                      for t in range(len(names)) if target[t].sum() > 0 or (tasks == t).any()},
            "length_bins": [{"lo": edges[b], "hi": edges[b + 1], "tokens": int(lengths[bins == b].sum()),
                             "share": round(lengths[bins == b].sum() / total, 4), "target": round(float(target[:, b].sum()), 4)}
                            for b in range(len(edges) - 1)],
        })
    summary = {
        "token_budget": mixture.token_budget,
        "tokens": report.real_tokens,
        "samples": report.samples,
        "packs": report.packs,
        "steps": plan.steps,
        "packs_left_out": dropped_packs,
        "packing_efficiency": round(report.efficiency, 5),
        "fixed_length_efficiency": round(report.fixed_bin_efficiency, 5),
        "lower_bound_fixed_packs": report.lower_bound_packs,
        "alignment_multiple": plan.config.alignment.multiple,
        "datasets": per_dataset,
    }
    if plan.config.data_parallel:
        summary["compute_utilisation"] = round(compute_utilisation(plan, plan.config.data_parallel), 5)
    return summary


def compute_utilisation(plan: Plan, data_parallel: int) -> float:
    """Useful work / (steps x ranks x the slowest rank's work), with the balanced split."""
    costs = plan.pack_costs()
    batch = plan.config.global_batch
    useful = slowest = 0.0
    for step in range(plan.steps):
        step_costs = costs[step * batch:(step + 1) * batch]
        loads = [step_costs[r].sum() for r in balance(step_costs, data_parallel)]
        useful += sum(loads)
        slowest += max(loads) * data_parallel
    return useful / slowest if slowest else 1.0
