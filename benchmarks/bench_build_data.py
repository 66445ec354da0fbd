"""Pages/s and tokens/s of `build-data` from PDFs with 1 and 2 workers (same run, same inputs).

Inputs: synthetic letter-size PDFs (32 pages, three questions each) rendered at 144 DPI, plus
the real PDFs of ../shared/corpus/pdf as ocr-full samples.

    python benchmarks/bench_build_data.py [--docs 2] [--pages 32] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "qwen25-bpe"))
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "pdf"))
    parser.add_argument("--workdir", default="out/bench-build")
    args = parser.parse_args()

    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs
    from megatron_mmprolong.data.store import MultimodalStore

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    records = synth_docs(work / "synth", SynthConfig(docs=args.docs, min_pages=args.pages, max_pages=args.pages, format="pdf"))
    config = BuildConfig(tokenizer=args.tokenizer, shard_size=2)
    results = {}
    for workers in args.workers:
        runs = {}
        for name, inputs, task in (("synthetic-qa", [records], None), ("corpus-ocr-full", [args.corpus], "ocr-full")):
            start = time.perf_counter()
            report = build_dataset(inputs, work / f"{name}-w{workers}" / "ds", config, ocr_task=task,
                                   workers=workers, progress=False)
            seconds = time.perf_counter() - start
            store = MultimodalStore(work / f"{name}-w{workers}" / "ds")
            pages = int(store.samples["num_images"].sum())
            runs[name] = {"samples": report.samples, "rejects": report.rejects, "pages": pages,
                          "tokens": report.tokens, "seconds": round(seconds, 1),
                          "pages_per_s": round(pages / seconds, 2), "tokens_per_s": round(report.tokens / seconds)}
        results[f"workers_{workers}"] = runs
    if len(args.workers) > 1:
        base, other = (results[f"workers_{w}"] for w in args.workers[:2])
        results["speedup"] = {name: round(other[name]["pages_per_s"] / base[name]["pages_per_s"], 2) for name in base}
    print(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
