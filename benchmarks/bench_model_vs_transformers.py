"""Forward+backward time of this model (local backend) vs transformers' Qwen2.5-VL on the CPU,
same random weights, same multimodal batch; prints the ratio measured in this run.

    python benchmarks/bench_model_vs_transformers.py [--tokens 2048] [--images 4] [--iters 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def bench_config(layers: int):
    from megatron_mmprolong.config import Qwen25VLConfig, TextConfig, TokenIds, VisionConfig

    text = TextConfig(
        vocab_size=32000, hidden_size=512, num_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=1408, mrope_section=(8, 12, 12),
    )
    vision = VisionConfig(depth=layers, hidden_size=256, num_heads=4, intermediate_size=512,
                          out_hidden_size=512, fullatt_block_indexes=(layers // 2 - 1, layers - 1))
    tokens = TokenIds(image=31995, video=31996, vision_start=31992, vision_end=31993, bos=31990, eos=31991)
    return Qwen25VLConfig(text=text, vision=vision, tokens=tokens)


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.parity import hf_logits, make_sample, our_logits
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.model.builder import build_model

    config = bench_config(args.layers)
    side = 32  # 448 px images: 32x32 patches, 256 merged tokens each
    image_tokens = args.images * side * side // 4
    text_per_gap = max(1, (args.tokens - image_tokens - 2 * args.images) // (args.images + 1))
    sample = make_sample(config, torch.Generator().manual_seed(0),
                         images=[(1, side, side)] * args.images, text_tokens=text_per_gap)
    targets = torch.randint(0, config.text.vocab_size, sample.input_ids.shape)

    runtime.initialize()
    with tempfile.TemporaryDirectory() as hf_dir:
        write_random_hf_checkpoint(config, hf_dir)
        ours = build_model(config, backend="local")
        load_hf_weights(ours, hf_dir)
        results = {}
        for attn in ("sdpa", "eager"):
            reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation=attn)

            def step_reference():
                reference.zero_grad(set_to_none=True)
                logits = hf_logits(reference, sample)
                torch.nn.functional.cross_entropy(logits[0], targets[0]).backward()

            results[f"transformers_{attn}_s"] = timed(step_reference, args.iters)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        logits = our_logits(ours, sample)
        torch.nn.functional.cross_entropy(logits[0], targets[0]).backward()

    results["ours_s"] = timed(step_ours, args.iters)
    report = {
        "tokens": int(sample.input_ids.shape[1]),
        "vision_patches": int(sample.pixel_values.shape[0]),
        "layers": args.layers,
        "threads": args.threads,
        **{k: round(v, 4) for k, v in results.items()},
        "ratio_ours_vs_transformers_sdpa": round(results["ours_s"] / results["transformers_sdpa_s"], 3),
        "ratio_ours_vs_transformers_eager": round(results["ours_s"] / results["transformers_eager_s"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
