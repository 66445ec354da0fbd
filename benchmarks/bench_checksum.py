"""What checking every sample as it is read costs the loader (issue 28): loader CPU-seconds per
128K item with the checks (the default) and without them (`MultimodalStore(verify=False)`),
measured in the same run, passes interleaved, after a warm-up pass; the ratio of the two; and the
time spent in the checks themselves (CRC-32 of the token, loss-span and image bytes the item
read), measured in a third, instrumented pass, as a fraction of the unchecked loader's time.
Both for one rank decoding every page of the pack and for one rank of the 7B recipe's TP2 x CP4
replica (which decodes an eighth of the pages but still reads, and checks, every token).
Then the cost of opening a dataset (the small files are checked whole), and CRC-32 throughput.

One loader worker's view: a single thread in this process (the loader's workers each do this).
The direct figure, checks / loader, is the one to quote: on a busy machine the difference of two
loader timings is within their noise.

Builds its own dataset: synthetic letter-size pages at 144 DPI (~2,500 vision tokens each), about
48 pages per 128K sample, stored as PNG (as benchmarks/bench_loader.py).

    python benchmarks/bench_checksum.py [--docs 2] [--pages 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import time
import warnings
import zlib
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
TP, CP = 2, 4


def loader_pass(dataset) -> float:
    """CPU seconds of this process to make every item of `dataset` once."""
    start = time.process_time()
    for index in range(len(dataset)):
        dataset[index]
    return time.process_time() - start


def checks_pass(dataset) -> tuple[float, int]:
    """CPU seconds spent inside the per-sequence checks while making every item once, and the bytes checked."""
    from megatron_mmprolong.data.store import CheckedSequences

    spent, checked = [0.0], [0]
    original = CheckedSequences._check

    def timed(self, index, data):
        start = time.process_time()
        original(self, index, data)
        spent[0] += time.process_time() - start
        checked[0] += data.nbytes

    CheckedSequences._check = timed
    try:
        loader_pass(dataset)
    finally:
        CheckedSequences._check = original
    return spent[0], checked[0]


def measure(plan, share, rounds: int) -> dict:
    import megatron_mmprolong.data.loader as loader
    from megatron_mmprolong.data.store import MultimodalStore

    unchecked_store = functools.partial(MultimodalStore, verify=False)
    checked = loader.PackedSequences(plan, share=share)
    original, loader.MultimodalStore = loader.MultimodalStore, unchecked_store
    try:
        unchecked = loader.PackedSequences(plan, share=share)
        loader_pass(unchecked)  # warm-up: opens its stores, reads the files into the page cache
    finally:
        loader.MultimodalStore = original
    loader_pass(checked)
    times = {"unchecked": [], "checked": []}
    for _ in range(rounds):
        for name, dataset in (("unchecked", unchecked), ("checked", checked)):
            times[name].append(loader_pass(dataset) / len(dataset))
    opened = (getattr(unchecked, "_stores", None) or [], getattr(checked, "_stores", None) or [])
    assert not any(s.verify for s in opened[0]) and all(s.verify for s in opened[1]), "the unchecked loader checks"
    check_seconds, check_bytes = checks_pass(checked)
    plain, with_checks = statistics.median(times["unchecked"]), statistics.median(times["checked"])
    per_item = check_seconds / len(checked)
    return {
        "items": len(checked),
        "loader_s_per_item_unchecked": round(plain, 4),
        "loader_s_per_item_checked": round(with_checks, 4),
        "loader_time_ratio": round(with_checks / plain, 4),
        "checks_s_per_item": round(per_item, 5),
        "checked_mb_per_item": round(check_bytes / len(checked) / 1e6, 2),
        "checks_over_loader": round(per_item / plain, 5),
    }


def open_seconds(prefix: Path, verify: bool, repeat: int = 5) -> float:
    from megatron_mmprolong.data.store import MultimodalStore

    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        MultimodalStore(prefix, verify=verify)
        best = min(best, time.perf_counter() - start)
    return best


def crc_throughput() -> float:
    data = os.urandom(64 << 20)
    zlib.crc32(data)
    start = time.process_time()
    for _ in range(3):
        zlib.crc32(data)
    return 3 * len(data) / (time.process_time() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--pages", type=int, default=48)
    parser.add_argument("--page-width", type=int, default=1224)
    parser.add_argument("--page-height", type=int, default=1584)
    parser.add_argument("--seq-length", type=int, default=131072)
    parser.add_argument("--packs", type=int, default=4, help="packs in the plan (each pass makes them all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed passes of each kind (median)")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "qwen25-bpe"))
    parser.add_argument("--workdir", default="out/bench-checksum")
    args = parser.parse_args()

    import numpy as np
    import torch
    import yaml

    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.plan import MixtureSpec, PlanConfig, make_plan
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs
    from megatron_mmprolong.parallel.page_split import PageShare

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    records = synth_docs(work / "docs", SynthConfig(docs=args.docs, min_pages=args.pages, max_pages=args.pages,
                                                    page_width=args.page_width, page_height=args.page_height,
                                                    font_size=max(9, args.page_height // 72)))
    build_dataset([records], work / "ds", BuildConfig(tokenizer=args.tokenizer, seq_length=args.seq_length),
                  workers=2, progress=False)
    (work / "mix.yaml").write_text(yaml.safe_dump({"token_budget": int(args.packs * args.seq_length * 0.9), "seed": 0,
                                                   "datasets": [{"path": "ds", "replacement": True}]}))
    plan = make_plan(MixtureSpec.from_yaml(work / "mix.yaml"), PlanConfig(args.seq_length, global_batch=1))
    torch.set_num_threads(1)
    samples = np.load(work / "ds.samples.npy")
    result = {
        "dataset": {"samples": len(samples), "images": int(samples["num_images"].sum()),
                    "tokens_bin_mb": round((work / "ds.tokens.bin").stat().st_size / 1e6, 1),
                    "images_bin_mb": round((work / "ds.images.bin").stat().st_size / 1e6, 1)},
        "plan": {k: plan.summary[k] for k in ("packs", "tokens")},
        "one_rank_decoding_every_page": measure(plan, PageShare(), args.rounds),
        f"tp{TP}_cp{CP}_rank_0": measure(plan, PageShare(CP, 0, TP, 0), args.rounds),
        "open_s": {"checked": round(open_seconds(work / "ds", True), 4),
                   "unchecked": round(open_seconds(work / "ds", False), 4)},
        "crc32_gb_per_s": round(crc_throughput(), 2),
    }
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
