"""Convert a checkpoint with the real Qwen2.5-VL-7B tensor shapes to a TP4 torch_dist checkpoint
and compare the converter's peak memory with loading every tensor at once, in the same run.

The benchmark writes its own random bf16 weights (streamed, ~16.6 GB for all layers) and runs
each measured step in a fresh process, reading that process's peak RSS.

    python benchmarks/bench_convert_7b.py [--layers 28] [--tp 4] [--workdir out/bench-convert]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import resource
import shutil
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def _in_child(fn, args, queue):
    start = time.perf_counter()
    result = fn(*args)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((result, time.perf_counter() - start, peak_kb * 1024))


def measured(fn, *args):
    """(result, seconds, peak RSS bytes) of fn(*args) run in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_in_child, args=(fn, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"{fn.__name__} failed with exit code {process.exitcode}")
    return result


def write_random_7b(out: Path, layers: int, vision_blocks: int) -> int:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_mmprolong.config import Qwen25VLConfig
    from megatron_mmprolong.convert.safetensors_stream import PlannedTensor, StreamingSafetensorsWriter

    config = Qwen25VLConfig.preset("7b")
    config = dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, num_layers=layers),
        vision=dataclasses.replace(
            config.vision, depth=vision_blocks,
            fullatt_block_indexes=tuple(i for i in config.vision.fullatt_block_indexes if i < vision_blocks),
        ),
    )
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config.to_hf_dict()))
    names = {"model.language_model.": "model.", "model.visual.": "visual."}
    planned = []
    for name, param in model.named_parameters():
        for new, old in names.items():
            name = name.replace(new, old)
        planned.append(PlannedTensor(name, tuple(param.shape), torch.bfloat16))
    out.mkdir(parents=True)
    writer = StreamingSafetensorsWriter(out, planned)
    generator = torch.Generator().manual_seed(0)
    for tensor in planned:
        rows = max(1, (64 << 20) // (tensor.nbytes // tensor.shape[0]))
        for start in range(0, tensor.shape[0], rows):
            shape = (min(rows, tensor.shape[0] - start), *tensor.shape[1:])
            writer.write(tensor.name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    (out / "model.safetensors.index.json").write_text(json.dumps(writer.close()))
    config.save_hf(out)
    return writer.total_bytes


def convert(hf_dir: Path, out: Path, tp: int, workers: int) -> int:
    from megatron_mmprolong.config import ParallelConfig
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore

    return hf_to_mcore(hf_dir, out, ParallelConfig(tensor_parallel=tp), workers=workers, progress=False).bytes


def load_everything(hf_dir: Path) -> int:
    """The naive approach: every tensor of the checkpoint in memory at once."""
    from megatron_mmprolong.convert.hf_checkpoint import HFCheckpoint

    with HFCheckpoint(hf_dir) as checkpoint:
        tensors = {name: checkpoint.get(name) for name in checkpoint.names()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28, help="language-model layers (7B has 28)")
    parser.add_argument("--vision-blocks", type=int, default=32, help="vision blocks (7B has 32)")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default="out/bench-convert")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hf_dir, mcore_dir = work / "hf", work / "mcore"
    size, write_s, _ = measured(write_random_7b, hf_dir, args.layers, args.vision_blocks)
    converted, convert_s, convert_rss = measured(convert, hf_dir, mcore_dir, args.tp, args.workers)
    loaded, load_s, naive_rss = measured(load_everything, hf_dir)
    report = {
        "layers": args.layers,
        "vision_blocks": args.vision_blocks,
        "tensor_parallel": args.tp,
        "checkpoint_gb": round(size / 1e9, 2),
        "write_random_weights_s": round(write_s, 1),
        "convert_s": round(convert_s, 1),
        "convert_gb_per_s": round(converted / 1e9 / convert_s, 3),
        "convert_peak_rss_gb": round(convert_rss / 1e9, 2),
        "naive_load_peak_rss_gb": round(naive_rss / 1e9, 2),
        "naive_load_s": round(load_s, 1),
        "ratio_convert_vs_naive_peak_rss": round(convert_rss / naive_rss, 3),
        "target_peak_rss_under_3gb": convert_rss < 3e9,
    }
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
