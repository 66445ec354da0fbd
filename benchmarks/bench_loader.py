"""Loader throughput at 128K tokens with real page images: sequences/s and images/s for PIL and
DALI (CPU), 1 and 2 workers, next to the rate the 7B recipe consumes per data-parallel rank.

Builds its own dataset: synthetic letter-size pages at 144 DPI (~2,500 vision tokens each), about
48 pages per 128K sample, stored as PNG.

    python benchmarks/bench_loader.py [--docs 2] [--pages 48]
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
SEQ = 131072


def recipe_rate() -> dict:
    """Per-rank consumption of the 7B recipe: 32 x 128K sequences per step on 64 H100s at TP2 CP4
    (DP 8), assuming 400 TFLOP/s per GPU (the NeMo long-context reference reached 555 with FP8)."""
    params, hidden, layers, vision_params = 7.6e9, 3584, 28, 0.68e9
    tokens = 32 * SEQ
    linear = 6 * params * tokens
    attention = 32 * 6 * SEQ**2 * hidden * layers / 2 * 2  # causal score + value matmuls, fwd + bwd
    vision = 6 * vision_params * tokens * 4  # ~4 patches per LM token
    step_seconds = (linear + attention + vision) / (64 * 400e12)
    per_rank = 32 / 8
    return {"step_seconds_estimate": round(step_seconds, 1), "sequences_per_s_per_rank": round(per_rank / step_seconds, 3),
            "images_per_s_per_rank": round(per_rank * 48 / step_seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--pages", type=int, default=48)
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "qwen25-bpe"))
    parser.add_argument("--workdir", default="out/bench-loader")
    args = parser.parse_args()

    import yaml

    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.loader import PackedSequences, make_dataloader
    from megatron_mmprolong.data.plan import MixtureSpec, PlanConfig, make_plan
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    records = synth_docs(work / "docs", SynthConfig(docs=args.docs, min_pages=args.pages, max_pages=args.pages))
    build_dataset([records], work / "ds", BuildConfig(tokenizer=args.tokenizer, seq_length=SEQ), workers=2, progress=False)
    (work / "mix.yaml").write_text(yaml.safe_dump({"token_budget": int(12 * SEQ * 0.9), "seed": 0,
                                                   "datasets": [{"path": "ds", "replacement": True}]}))
    plan = make_plan(MixtureSpec.from_yaml(work / "mix.yaml"), PlanConfig(SEQ, global_batch=2))
    results = {"recipe_need": recipe_rate(), "plan": {k: plan.summary[k] for k in ("packs", "tokens", "packing_efficiency")}}
    backends = ["pil"]
    try:
        import nvidia.dali  # noqa: F401
        backends.append("dali")
    except ImportError:
        results["dali"] = "not installed"
    for backend in backends:
        for workers in (1, 2):
            dataset = PackedSequences(plan, image_backend=backend)
            loader = make_dataloader(dataset, num_workers=workers, prefetch_factor=2)
            iterator = iter(loader)
            first = next(iterator)  # worker start-up and the first decode are not throughput
            start, sequences, images = time.perf_counter(), 0, 0
            for item in iterator:
                sequences += 1
                images += len(item["image_grid_thw"])
            seconds = time.perf_counter() - start
            results[f"{backend}_workers_{workers}"] = {
                "sequences": sequences, "tokens_per_sequence": int(first["tokens"].shape[1]),
                "sequences_per_s": round(sequences / seconds, 3), "images_per_s": round(images / seconds, 2),
            }
    print(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
