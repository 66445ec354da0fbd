"""Greedy answers on a Megatron-format model (`eval --mcore-dir`): with the KV cache (the prompt
runs once, each new token alone) vs re-running the whole prompt, pages included, for every new
token (the generator before the cache); same prompt, same weights. Prints the ratio measured in
this run and checks that both give the same tokens.

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


def rerun_prompt(generator, input_ids, max_new_tokens, pixel_values, image_grid_thw):
    """The baseline: every new token re-runs the model over the whole sequence."""
    from megatron_mmprolong.model.packed import packed_segments

    ids = input_ids[0].tolist()
    vision = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
    for _ in range(max_new_tokens):
        n = len(ids)
        cu = torch.tensor([0, n], dtype=torch.int32)
        packed = packed_segments(cu, "cpu", n)
        hidden = generator._forward(torch.tensor(ids)[None], packed, None, vision)
        ids.append(generator._agreed_token(hidden, n - 1))
    return torch.tensor(ids)[None]


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

    config = bench_config(args.layers)
    sample = make_sample(config, torch.Generator().manual_seed(0), images=[(1, 32, 32)] * args.pages, text_tokens=64)
    runtime.initialize()
    generator = MegatronGenerator(build_model(config, backend="local", variable_seq_lengths=True,
                                              training=False).eval())
    inputs = dict(input_ids=sample.input_ids, max_new_tokens=args.new_tokens, pixel_values=sample.pixel_values,
                  image_grid_thw=sample.image_grid_thw)
    runs = {"rerun_prompt": lambda **kw: rerun_prompt(generator, **kw),
            "kv_cache": lambda **kw: generator.generate(eos_token_id=-1, pad_token_id=0, **kw)}
    results, replies = {}, {}
    with torch.no_grad():
        for name, run in runs.items():
            run(**{**inputs, "max_new_tokens": 1})  # warm-up
            start = time.perf_counter()
            replies[name] = run(**inputs)
            results[f"{name}_s"] = time.perf_counter() - start
    runtime.shutdown()
    if not torch.equal(replies["rerun_prompt"], replies["kv_cache"]):
        raise SystemExit("the two generators disagree")
    print(json.dumps({
        "prompt_tokens": int(sample.input_ids.shape[1]), "vision_patches": int(sample.pixel_values.shape[0]),
        "new_tokens": args.new_tokens, "layers": args.layers, **{k: round(v, 3) for k, v in results.items()},
        "speedup_kv_cache": round(results["rerun_prompt_s"] / results["kv_cache_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
