"""Greedy answers on a Megatron-format model (`eval --mcore-dir`): pages encoded once per prompt
vs re-encoded for every new token (the generator before), same prompt, same weights; prints the
ratio measured in this run and checks that both give the same tokens.

    python benchmarks/bench_generate.py [--pages 8] [--new-tokens 16] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from bench_model_vs_transformers import bench_config

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=8, help="448 px page images, 256 tokens each")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.parity import make_sample
    from megatron_mmprolong.eval.megatron_generate import MegatronGenerator
    from megatron_mmprolong.model.builder import build_model

    class ReencodingGenerator(MegatronGenerator):
        """The baseline: the vision encoder runs again with every new token."""

        def _forward(self, tokens, packed, cp_index, vision):
            return super()._forward(tokens, packed, cp_index, {k: v for k, v in vision.items() if k != "vision_features"})

    config = bench_config(args.layers)
    sample = make_sample(config, torch.Generator().manual_seed(0), images=[(1, 32, 32)] * args.pages, text_tokens=64)
    runtime.initialize()
    model = build_model(config, backend="local", variable_seq_lengths=True, training=False).eval()
    inputs = dict(input_ids=sample.input_ids, max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=0,
                  pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    results, replies = {}, {}
    for name, generator in (("reencode", ReencodingGenerator(model)), ("encode_once", MegatronGenerator(model))):
        generator.generate(**{**inputs, "max_new_tokens": 1})  # warm-up
        start = time.perf_counter()
        replies[name] = generator.generate(**inputs)
        results[f"{name}_s"] = time.perf_counter() - start
    runtime.shutdown()
    if not torch.equal(replies["reencode"], replies["encode_once"]):
        raise SystemExit("the two generators disagree")
    print(json.dumps({
        "prompt_tokens": int(sample.input_ids.shape[1]), "vision_patches": int(sample.pixel_values.shape[0]),
        "new_tokens": args.new_tokens, "layers": args.layers, **{k: round(v, 3) for k, v in results.items()},
        "speedup_encode_once": round(results["reencode_s"] / results["encode_once_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
