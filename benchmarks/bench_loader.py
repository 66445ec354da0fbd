"""The loader at 128K tokens with real page images, at the 7B recipe's layout of one model replica
(TP2 x CP4 = 8 ranks, each rank's loader run in turn in this process): decode CPU-seconds per
sequence across the replica and the bytes each rank receives, for the old path (every rank
decodes every page and expands it to float32 patches on the host) next to the new one (each rank
decodes its TP slice of its CP share as uint8; patches are made on the GPU). Then the CPU cores
per GPU a node needs to feed the recipe with 5x headroom, and the peak host memory of one rank's
loader with 8 workers: measured for the new path; for the old one measured with 2 workers and
scaled to 8 (its 8 workers would hold ~40 GiB of float patches, more than a laptop has).

Builds its own dataset: synthetic letter-size pages at 144 DPI (~2,500 vision tokens each), about
48 pages per 128K sample, stored as PNG.

    python benchmarks/bench_loader.py [--docs 2] [--pages 48] [--sequences 2] [--workers 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
SEQ = 131072
TP, CP = 2, 4
HEADROOM = 5


def recipe_rate() -> dict:
    """Consumption of the 7B recipe: 32 x 128K sequences per step on 64 H100s at TP2 CP4 (DP 8, so
    a replica is 8 GPUs), assuming 400 TFLOP/s per GPU (the NeMo long-context reference reached
    555 with FP8)."""
    params, hidden, layers, vision_params = 7.6e9, 3584, 28, 0.68e9
    tokens = 32 * SEQ
    linear = 6 * params * tokens
    attention = 32 * 6 * SEQ**2 * hidden * layers / 2 * 2  # causal score + value matmuls, fwd + bwd
    vision = 6 * vision_params * tokens * 4  # ~4 patches per LM token
    step_seconds = (linear + attention + vision) / (64 * 400e12)
    per_replica = 32 / 8 / step_seconds
    return {"step_seconds_estimate": round(step_seconds, 1), "sequences_per_s_per_replica": round(per_replica, 3),
            "with_headroom": round(HEADROOM * per_replica, 3)}


class OldPath:
    """The loader before issue 16, per rank: every page of the pack decoded, then float32 patches
    (the temporal frame duplicated) made on the host and shipped."""

    def __init__(self, dataset, image):
        self.dataset, self.image = dataset, image

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from megatron_mmprolong.data.pixels import patchify_pages

        item = self.dataset[index]
        item["pixel_values"] = patchify_pages(item.pop("pages"), item["image_grid_thw"], self.image)
        return item


def item_bytes(item) -> int:
    import torch

    return sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor))


def cpu_seconds(dataset, sequences: int) -> tuple[float, list[dict]]:
    """CPU time of this process (all its threads) to make the first `sequences` items."""
    start, items = time.process_time(), []
    for index in range(sequences):
        items.append(dataset[index])
    return time.process_time() - start, items


def peak_loader_memory(dataset, workers: int, prefetch_gib: float | None, items: int) -> dict:
    """Peak resident memory of the main process plus its loader workers (sampled every 50 ms)
    while `items` micro-batches stream through, less what the main process held before."""
    import psutil

    from megatron_mmprolong.data.loader import make_dataloader

    me = psutil.Process()
    base = me.memory_info().rss
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            total = 0
            for process in [me] + me.children(recursive=True):
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    loader = make_dataloader(dataset, num_workers=workers, prefetch_factor=2,
                             prefetch_bytes=None if prefetch_gib is None else int(prefetch_gib * 2**30))
    count = 0
    for _ in loader:
        count += 1
        if count == items:
            break
    del loader
    done.set()
    watcher.join()
    return {"workers": workers, "items": count, "peak_gib": round((peak[0] - base) / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--pages", type=int, default=48)
    parser.add_argument("--sequences", type=int, default=2, help="sequences each rank's loader makes for the timing")
    parser.add_argument("--packs", type=int, default=12, help="packs in the plan (the new path's memory run streams them all)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--old-workers", type=int, default=2,
                        help="workers for the old path's memory run (8 would need ~40 GiB: it is scaled from these)")
    parser.add_argument("--prefetch-gib", type=float, default=2.0, help="the new path's --loader-prefetch-gib")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "qwen25-bpe"))
    parser.add_argument("--workdir", default="out/bench-loader")
    args = parser.parse_args()

    import torch
    import yaml

    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.loader import PackedSequences
    from megatron_mmprolong.data.plan import MixtureSpec, PlanConfig, make_plan
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs
    from megatron_mmprolong.parallel.page_split import PageShare

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    records = synth_docs(work / "docs", SynthConfig(docs=args.docs, min_pages=args.pages, max_pages=args.pages))
    build_dataset([records], work / "ds", BuildConfig(tokenizer=args.tokenizer, seq_length=SEQ), workers=2, progress=False)
    (work / "mix.yaml").write_text(yaml.safe_dump({"token_budget": int(args.packs * SEQ * 0.9), "seed": 0,
                                                   "datasets": [{"path": "ds", "replacement": True}]}))
    plan = make_plan(MixtureSpec.from_yaml(work / "mix.yaml"), PlanConfig(SEQ, global_batch=2))
    need = recipe_rate()
    results = {"recipe_need": need, "layout": f"TP{TP} x CP{CP} = {TP * CP} ranks per replica",
               "plan": {k: plan.summary[k] for k in ("packs", "tokens", "packing_efficiency")}}
    torch.set_num_threads(1)  # one loader worker's view: a single thread per process

    full = PackedSequences(plan)  # one rank decoding every page as uint8: "one full decode"
    full_seconds, full_items = cpu_seconds(full, args.sequences)
    pages_bytes = sum(int(item["pages"].nbytes) for item in full_items) / args.sequences
    text_bytes = sum(item_bytes(item) - int(item["pages"].nbytes) for item in full_items) / args.sequences
    shares = [PageShare(CP, c, TP, t) for c in range(CP) for t in range(TP)]
    paths = {}
    for name in ("old", "new"):
        seconds, received = 0.0, []
        for share in shares:  # each rank's loader in turn
            rank = OldPath(PackedSequences(plan), ImageParams()) if name == "old" else PackedSequences(plan, share=share)
            spent, items = cpu_seconds(rank, args.sequences)
            seconds += spent
            received.append(sum(item_bytes(item) for item in items) / args.sequences)
        per_sequence = seconds / args.sequences
        paths[name] = {
            "replica_decode_cpu_s_per_sequence": round(per_sequence, 2),
            "vs_one_full_decode": round(seconds / full_seconds, 2),
            "bytes_per_rank_mb": {"max": round(max(received) / 1e6, 1), "mean": round(sum(received) / len(received) / 1e6, 1)},
            "cpu_cores_per_gpu_for_recipe_x5": round(need["with_headroom"] * per_sequence / (TP * CP), 2),
        }
    results["one_full_decode_cpu_s_per_sequence"] = round(full_seconds / args.sequences, 2)
    results["sequence_bytes_mb"] = {"uint8_pages": round(pages_bytes / 1e6, 1), "text": round(text_bytes / 1e6, 1),
                                    "target_per_rank_uint8_pages_over_cp_plus_text": round((pages_bytes / CP + text_bytes) / 1e6, 1)}
    results.update(paths)
    results["new_vs_old"] = {
        "decode_work": round(paths["new"]["replica_decode_cpu_s_per_sequence"] / paths["old"]["replica_decode_cpu_s_per_sequence"], 3),
        "bytes_per_rank": round(paths["new"]["bytes_per_rank_mb"]["max"] / paths["old"]["bytes_per_rank_mb"]["max"], 3),
        "cores_per_gpu": round(paths["new"]["cpu_cores_per_gpu_for_recipe_x5"] / paths["old"]["cpu_cores_per_gpu_for_recipe_x5"], 3),
    }
    old = peak_loader_memory(OldPath(PackedSequences(plan), ImageParams()), args.old_workers, None, 3 * args.old_workers)
    new = peak_loader_memory(PackedSequences(plan, share=shares[0]), args.workers, args.prefetch_gib, plan.packs)
    old_scaled = round(old["peak_gib"] * args.workers / args.old_workers, 2)  # each worker holds its own items
    memory = {"old_measured": old, f"old_scaled_to_{args.workers}_workers_gib": old_scaled, "new": new,
              "new_vs_old": round(new["peak_gib"] / old_scaled, 3)}
    results[f"loader_peak_host_memory_{args.workers}_workers"] = memory
    print(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
