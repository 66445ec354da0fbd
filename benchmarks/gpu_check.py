"""One-shot device check of the local (plain-torch) backend on CUDA, for a session lent a GPU.

Runs, and writes one JSON of figures (`--out`):
- `pytest -m gpu` (the TE tests skip where Transformer Engine is missing);
- a bf16 forward + backward of a 7B-shaped model cut to 2 language layers and 4 vision blocks,
  one packed sample of 32K and of 128K tokens made of Letter pages at 144 DPI (88 x 114 patches,
  2508 tokens each) and text, under `torch.cuda.set_sync_debug_mode("error")`: a host sync in
  the step is an error. It reports TFLOP/s by the project's FLOP count (training/flops.py) and
  peak memory next to `mmprolong plan`'s estimate for the same shapes (training/planner.py);
  a length the planner says cannot fit is skipped with both numbers;
- one needle-sized prompt (random tokens and pages) at 128K through `MegatronGenerator`, the
  generator of `eval needle --mcore-dir`, in bf16.

`--cpu` runs the same code on the tiny-1k preset at 512/1K tokens (CI runs it so it cannot rot);
its figures mean nothing. Not covered: Transformer Engine, FP8, NCCL across GPUs.

    benchmarks/gpu_check.sh [--cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

PAGE_GRID = (1, 88, 114)  # a Letter page at 144 DPI, in 14 px patches
GIB = 2**30


def check_config(cpu: bool):
    from megatron_mmprolong.config import Qwen25VLConfig

    if cpu:  # a 1K vocabulary: CPU bf16 matmuls are emulated, and a 152K-wide output layer took 90% of the step
        return Qwen25VLConfig.preset("tiny-1k")
    config = Qwen25VLConfig.preset("7b")
    return dataclasses.replace(
        config, text=dataclasses.replace(config.text, num_layers=2),
        vision=dataclasses.replace(config.vision, depth=4, fullatt_block_indexes=(3,)))


def long_sample(config, length: int, page_grid, seed: int = 0):
    """One sample of about `length` tokens: 90% page tokens (as the planner's workload), the
    rest text between the pages."""
    from megatron_mmprolong.convert.parity import make_sample
    from megatron_mmprolong.training.planner import Workload

    grids = Workload(seq_length=length, global_batch=1, page_grid=page_grid).image_grids(config)
    per_page = int(grids[0].prod()) // config.vision.spatial_merge_size**2 + 2 if len(grids) else 0
    text = max(1, (length - per_page * len(grids)) // (len(grids) + 1))
    return make_sample(config, torch.Generator().manual_seed(seed), images=[tuple(g) for g in grids.tolist()],
                       text_tokens=text)


def step_inputs(model, sample, device):
    """What the loader gives the training step: ids, labels and the pages as uint8 (random) on
    the device (non-blocking, from pinned memory; the step patchifies them there), positions
    computed on the host, boundaries and grids kept on the host."""
    from megatron_mmprolong.model.packed import packed_segments

    config = model.model_config
    length = sample.input_ids.shape[1]
    cu = torch.tensor([0, length], dtype=torch.int32)
    positions = model.position_ids(sample.input_ids, sample.image_grid_thw, cu_seqlens=cu)
    labels = torch.roll(sample.input_ids, -1, dims=1)

    def move(x):
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x

    return dict(input_ids=move(sample.input_ids), position_ids=move(positions), labels=move(labels),
                pages=move(random_pages(sample.image_grid_thw, config.vision.patch_size)),
                image_grid_thw=sample.image_grid_thw,
                packed_seq_params=packed_segments(cu, device, length))


def random_pages(grids, patch: int, seed: int = 0):
    """uint8 RGB [pixels, 3] for images of `grids`, as the loader ships decoded pages."""
    pixels = int((grids[:, 1] * grids[:, 2]).sum()) * patch * patch
    return torch.randint(0, 256, (pixels, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def planner_estimate(config, length: int, page_grid) -> dict:
    """The planner's memory for this one-GPU step without optimizer state: weights, gradients
    (the planner's fp32 main grads counted at the bf16 grads a bare module keeps), activations,
    vision, logits and workspace."""
    from megatron_mmprolong.training.planner import Layout, Workload, estimate_memory

    workload = Workload(seq_length=length, global_batch=1, page_grid=page_grid)
    memory = estimate_memory(config, workload, Layout(tp=1, cp=1, pp=1, dp=1), backend="local")
    total = (memory.weights + memory.gradients / 2 + memory.activations + memory.vision
             + max(memory.logits, memory.rebuilt) + memory.workspace)
    return {"estimate_gib": round(total / GIB, 2), "estimate_activations_gib":
            round((memory.activations + memory.vision + max(memory.logits, memory.rebuilt)) / GIB, 2)}


def training_step(model, config, length: int, device, cpu: bool) -> dict:
    from megatron_mmprolong.training.flops import training_flops

    sample = long_sample(config, length, PAGE_GRID if not cpu else (1, 8, 8))
    inputs = step_inputs(model, sample, device)
    tokens = sample.input_ids.shape[1]
    flops = training_flops(config, [tokens], sample.image_grid_thw.numpy())
    figures = {"tokens": tokens, "pages": int(sample.image_grid_thw.shape[0]), "tflop": round(flops / 1e12, 6)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for attempt in ("warm-up", "timed"):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        start = time.perf_counter()
        try:
            loss = model(**inputs).sum()
            loss.backward()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    figures.update(seconds=round(seconds, 3), tflops=round(flops / seconds / 1e12, 3), loss=float(loss) / tokens)
    if device.type == "cuda":
        figures["sync_debug_mode"] = "error"  # a host sync in the step would have raised
        figures["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        figures["peak_over_weights_gib"] = round((torch.cuda.max_memory_allocated() - before) / GIB, 2)
    return figures


def needle_prompt(model, config, length: int, cpu: bool) -> dict:
    from megatron_mmprolong.eval.megatron_generate import MegatronGenerator

    sample = long_sample(config, length, PAGE_GRID if not cpu else (1, 8, 8), seed=1)
    generator = MegatronGenerator(model.eval())
    start = time.perf_counter()
    out = generator.generate(sample.input_ids, max_new_tokens=8, eos_token_id=-1, pad_token_id=0,
                             pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    seconds = time.perf_counter() - start
    return {"prompt_tokens": int(sample.input_ids.shape[1]), "new_tokens": int(out.shape[1] - sample.input_ids.shape[1]),
            "seconds": round(seconds, 2)}


def gpu_tests(cpu: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_gpu.py"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return {"returncode": run.returncode, "summary": lines[-1] if lines else run.stderr[-400:],
            "skips": [line for line in lines if line.startswith("SKIPPED")]}


def guarded(name: str, results: dict, run) -> None:
    """A failing part is recorded with its error and the rest still runs."""
    try:
        results[name] = run()
    except Exception as err:  # noqa: BLE001 - every failure belongs in the report
        results[name] = {"error": f"{type(err).__name__}: {err}"[:2000], "where": traceback.format_exc()[-1500:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="reduced size on the CPU (CI)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --cpu for the reduced check")

    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import PrecisionConfig
    from megatron_mmprolong.model.builder import build_model

    results: dict = {"mode": "cpu" if args.cpu else "gpu", "torch": torch.__version__}
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name()
    if not args.skip_tests:
        guarded("pytest_gpu", results, lambda: gpu_tests(args.cpu))
    rt = runtime.initialize()
    config = check_config(args.cpu)
    lengths = (512, 1024) if args.cpu else (32768, 131072)
    model = build_model(config, backend="local", precision=PrecisionConfig(params_dtype="bf16"))
    capacity = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else math.inf
    for length in lengths:
        name = f"step_{length // 1024}k"
        estimate = planner_estimate(config, length, PAGE_GRID if not args.cpu else (1, 8, 8))
        if estimate["estimate_gib"] * GIB > 0.95 * capacity:
            results[name] = {**estimate, "skipped": f"the planner estimates {estimate['estimate_gib']} GiB, the "
                                                     f"device has {capacity / GIB:.0f} GiB"}
            continue
        guarded(name, results, lambda: {**training_step(model.train(), config, length, rt.device, args.cpu), **estimate})
        step = results[name]
        if "peak_gib" in step:
            step["peak_vs_estimate"] = round(step["peak_gib"] / step["estimate_gib"], 3)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        guarded(f"needle_prompt_{lengths[-1] // 1024}k", results,
                lambda: needle_prompt(model, config, lengths[-1], args.cpu))
    runtime.shutdown()
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    failed = [name for name, part in results.items() if isinstance(part, dict) and "error" in part]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
