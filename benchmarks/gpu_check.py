"""One-shot device check of the local (plain-torch) backend on CUDA, for a session lent a GPU.

Runs these parts, each writing its section of one JSON (`--out`) as it starts and as it ends
(temp file + rename: a kill, a crash or a lost device leaves every finished section readable):
- `setup`: the device, `runtime.initialize`;
- `data`: the tiny tokenizer and synthetic documents of Letter pages at 144 DPI (data/synth.py);
- per family (`qwen25vl`: 7B-shaped; `qwen3vl`: 8B-shaped; each cut to 2 language layers and 4
  vision blocks, the tiny tokenizer's token ids in the full vocabulary):
  - `<family>.model`: the bf16 model;
  - `<family>.step_32k`, `.step_128k`: a dataset built from the documents by `build_dataset`
    (pages dropped to fit the length, as `build-data --overflow drop-far-pages`), planned, and
    fed through the training loader (`PackedSequences` / `make_dataloader` with the training
    defaults: worker processes, byte-bounded prefetch, pinned batches) into `forward_step` of
    training/step.py, which moves the batch as training does; forward + backward of the loss
    under `torch.cuda.set_sync_debug_mode("error")`: a host sync in the step is an error. It
    reports TFLOP/s by the project's FLOP count (training/flops.py), whether the batch came
    pinned, the loader's wait, and peak memory next to `mmprolong plan`'s estimate for the same
    shapes (training/planner.py); a length the planner says cannot fit is skipped with both numbers;
  - `<family>.needle_128k`: one needle-sized prompt (random tokens and pages) through
    `MegatronGenerator`, the generator of `eval needle --mcore-dir`, in bf16;
- `pytest_gpu` (last, in its own process): `pytest -m gpu` on tests/test_gpu.py and
  tests/test_loader_pin.py, under a timeout (`--pytest-timeout` for the run, pytest-timeout's
  `--pytest-test-timeout` per test where installed); a failure or a timeout fails the check.

A failing part keeps the figures it had and records its error; the parts that need it are
skipped, the others run; the exit status is 1 when any part failed. After a CUDA error that
leaves the context unusable (a device-side assert) the remaining device parts are skipped.
`--fail-part NAME` injects a failure at the end of a part (tests/test_gpu_check.py).

`--cpu` runs the same code on the tiny-1k presets at 512/1K tokens with small pages (CI runs it
so it cannot rot); its figures mean nothing. Not covered: Transformer Engine, FP8, NCCL across GPUs.

    benchmarks/gpu_check.sh [--cpu] [--out FILE] [--families qwen25vl,qwen3vl] [--fail-part NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
FAMILIES = ("qwen25vl", "qwen3vl")
LETTER_PAGE = (1224, 1584)  # px (width, height): a Letter page at 144 DPI, as SynthConfig's default
CPU_PAGE = (224, 224)
GPU_TESTS = ("tests/test_gpu.py", "tests/test_loader_pin.py")


class InjectedFailure(RuntimeError):
    pass


class Report:
    """The JSON report: a section per part, the file rewritten atomically whenever one changes."""

    def __init__(self, path: str | Path, fail_parts=(), header: dict | None = None):
        self.path = Path(path)
        self.fail_parts = set(fail_parts)
        self.data: dict = {**(header or {}), "finished": False}
        self.cuda_lost: str | None = None  # the part after which CUDA calls fail
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def ok(self, name: str) -> bool:
        part = self.data.get(name)
        return isinstance(part, dict) and not ({"error", "skipped", "running"} & part.keys())

    def failed(self) -> list[str]:
        return [k for k, v in self.data.items() if isinstance(v, dict) and "error" in v]

    def run(self, name: str, part, needs=(), device: bool = True):
        """Run `part(figures)`, which fills `figures` as it goes; returns its result, or None when
        it failed or was skipped (its section then says why)."""
        missing = [n for n in needs if not self.ok(n)]
        skipped = (f"needs {', '.join(missing)}" if missing else
                   f"CUDA is unusable since the error in {self.cuda_lost}" if device and self.cuda_lost else None)
        if skipped:
            self.data[name] = {"skipped": skipped}
            self.write()
            return None
        figures: dict = {}
        self.data[name] = {"running": True, "started": time.strftime("%H:%M:%S")}
        self.write()
        start = time.perf_counter()
        result, error = None, None
        try:
            result = part(figures)
            if name in self.fail_parts:
                raise InjectedFailure(f"--fail-part {name}")
        except Exception as err:  # noqa: BLE001 - every failure belongs in the report
            error = {"error": f"{type(err).__name__}: {err}"[:2000], "where": traceback.format_exc()[-3000:]}
            result = None
        # the traceback (and the tensors of the failed frames) is gone here: memory can be freed
        section = {**figures, "part_seconds": round(time.perf_counter() - start, 3)}
        if error:
            section.update(error)
            section.update(self.recover(name))
        self.data[name] = section
        self.write()
        return result

    def recover(self, name: str) -> dict:
        """Free what a failed part left and find out whether CUDA still works. Never raises: after
        a device-side assert every CUDA call (empty_cache included) raises again."""
        notes = {}
        gc.collect()
        if not torch.cuda.is_available():
            return notes
        for call in (lambda: torch.cuda.set_sync_debug_mode("default"), torch.cuda.synchronize, torch.cuda.empty_cache):
            try:
                call()
            except Exception as err:  # noqa: BLE001
                notes["cleanup_error"] = f"{type(err).__name__}: {err}"[:500]
                self.cuda_lost = self.cuda_lost or name
                break
        return notes

    def finish(self) -> int:
        self.data["failed"] = self.failed()
        self.data["finished"] = True
        self.write()
        return 1 if self.data["failed"] else 0


# ---- model and data shapes ---------------------------------------------------------------------

def check_config(family: str, cpu: bool):
    """The model of a family's part. On the CPU the tiny-1k preset (CPU bf16 matmuls are emulated
    and a 152K-wide output layer took 90% of the step). On the GPU the 7B / 8B shapes cut to 2
    language layers and 4 vision blocks, their full vocabulary kept (the logits are a large part of
    the memory at 128K), with the token ids of the tiny tokenizer the check's data is built with."""
    from megatron_mmprolong.config import VLConfig

    tiny = VLConfig.preset("tiny-1k" if family == "qwen25vl" else "qwen3vl-tiny-1k")
    if cpu:
        return tiny
    if family == "qwen25vl":
        config = VLConfig.preset("7b")
        vision = dataclasses.replace(config.vision, depth=4, fullatt_block_indexes=(3,))
    else:
        config = VLConfig.preset("qwen3vl-8b")
        # two deepstack levels: each feeds a language layer of its own
        vision = dataclasses.replace(config.vision, depth=4, deepstack_visual_indexes=(1, 2))
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=2), vision=vision,
                                 tokens=tiny.tokens)
    config.validate()
    return config


def page_grid(config, cpu: bool) -> tuple[int, int, int]:
    """Patches (T, H, W) of one synthetic page as the family's processor sizes it."""
    from megatron_mmprolong.data.images import ImageParams, smart_resize

    width, height = CPU_PAGE if cpu else LETTER_PAGE
    h, w = smart_resize(height, width, ImageParams.for_model(config.vision))
    return (1, h // config.vision.patch_size, w // config.vision.patch_size)


def page_tokens(config, cpu: bool) -> int:
    return math.prod(page_grid(config, cpu)) // config.vision.spatial_merge_size**2


def size_name(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def synth_documents(figures: dict, work: Path, lengths, configs: dict, cpu: bool) -> tuple[Path, Path]:
    """(tiny tokenizer, records.jsonl) of one synthetic document with more pages than the longest
    length needs for any family (build-data drops the far pages to fit each length)."""
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    start = time.perf_counter()
    pages = max(math.ceil(max(lengths) / page_tokens(c, cpu)) + 2 for c in configs.values())
    width, height = CPU_PAGE if cpu else LETTER_PAGE
    tokenizer = write_tiny_tokenizer(work / "tokenizer")
    records = synth_docs(work / "docs", SynthConfig(docs=1, min_pages=pages, max_pages=pages, page_width=width,
                                                    page_height=height, font_size=9 if cpu else 22, seed=5))
    figures.update(pages=pages, page_px=[width, height], records=len(records.read_text().splitlines()),
                   seconds=round(time.perf_counter() - start, 2))
    return tokenizer, records


def training_dataset(figures: dict, config, family: str, length: int, data, work: Path, cpu: bool):
    """The training loader's dataset for `length`: the documents built for the family's processor
    (each sample cut to the length), a plan of one-pack steps, this rank's page share."""
    import yaml

    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.data.loader import PackedSequences
    from megatron_mmprolong.data.plan import MixtureSpec, PlanConfig, make_plan
    from megatron_mmprolong.data.store import MultimodalStore
    from megatron_mmprolong.parallel.page_split import PageShare

    tokenizer, records = data
    start = time.perf_counter()
    root = work / f"{family}-{length}"
    build = BuildConfig(tokenizer=str(tokenizer), seq_length=length, model_family=config.family,
                        image=ImageParams.for_model(config.vision), overflow="drop-far-pages", shard_size=1)
    build_dataset([records], root / "data", build, workers=1 if cpu else min(3, os.cpu_count() or 1),
                  progress=False)
    MultimodalStore(root / "data").check_fits(config)
    mix = root / "mix.yaml"
    mix.write_text(yaml.safe_dump({"token_budget": 3 * length, "seed": 0,
                                   "datasets": [{"path": "data", "replacement": True}]}))
    plan = make_plan(MixtureSpec.from_yaml(mix), PlanConfig(seq_length=length, global_batch=1))
    figures["build_seconds"] = round(time.perf_counter() - start, 2)
    return PackedSequences(plan, share=PageShare.of_this_rank())


# ---- parts ---------------------------------------------------------------------------------------

def gpu_tests(figures: dict, timeout: float, targets=GPU_TESTS, per_test: float | None = None) -> None:
    """`pytest -m gpu` in its own process group, killed after `timeout` seconds; a failure raises."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", *map(str, targets)]
    if per_test and importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={int(per_test)}")
    figures["command"] = " ".join(command[1:])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = ""
        figures.update(timed_out=True, output_tail=(out or "")[-2000:])
        raise TimeoutError(f"pytest -m gpu did not finish in {timeout:g} s") from None
    lines = [line for line in out.splitlines() if line.strip()]
    figures.update(returncode=proc.returncode, summary=lines[-1] if lines else "",
                   skips=[line for line in lines if line.startswith("SKIPPED")])
    if proc.returncode != 0:
        figures["output_tail"] = out[-4000:]
        raise RuntimeError(f"pytest -m gpu failed (exit {proc.returncode}): {figures['summary']}")


def setup(figures: dict, cpu: bool):
    from megatron_mmprolong import runtime

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        figures.update(device=props.name, memory_gib=round(props.total_memory / GIB, 1),
                       capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    rt = runtime.initialize()
    figures.update(device_used=str(rt.device), world_size=rt.world_size)
    return rt


def build(figures: dict, config):
    from megatron_mmprolong.config import PrecisionConfig
    from megatron_mmprolong.model.builder import build_model

    start = time.perf_counter()
    model = build_model(config, backend="local", precision=PrecisionConfig(params_dtype="bf16"))
    figures.update(parameters=sum(p.numel() for p in model.parameters()),
                   language_layers=config.text.num_layers, vision_blocks=config.vision.depth,
                   vocab_size=config.text.vocab_size, seconds=round(time.perf_counter() - start, 2))
    return model


def planner_estimate(config, length: int, grid) -> dict:
    """The planner's memory for this one-GPU step without optimizer state: weights, gradients
    (the planner's fp32 main grads counted at the bf16 grads a bare module keeps), activations,
    vision, logits and workspace."""
    from megatron_mmprolong.training.planner import Layout, Workload, estimate_memory

    workload = Workload(seq_length=length, global_batch=1, page_grid=grid)
    memory = estimate_memory(config, workload, Layout(tp=1, cp=1, pp=1, dp=1), backend="local")
    total = (memory.weights + memory.gradients / 2 + memory.activations + memory.vision
             + max(memory.logits, memory.rebuilt) + memory.workspace)
    return {"estimate_gib": round(total / GIB, 2), "estimate_activations_gib":
            round((memory.activations + memory.vision + max(memory.logits, memory.rebuilt)) / GIB, 2)}


def _loader_settings() -> dict:
    """The training loader's defaults (`mmprolong train --num-workers --loader-prefetch-gib`)."""
    from megatron_mmprolong.training.arguments import TrainArgs

    fields = TrainArgs.__dataclass_fields__
    return {"num_workers": fields["num_workers"].default,
            "prefetch_bytes": int(fields["loader_prefetch_gib"].default * GIB)}


def training_step(figures: dict, model, config, family: str, length: int, data, work: Path, cpu: bool) -> None:
    """A warm-up and a timed micro-batch from the training loader through training/step.py."""
    from megatron_mmprolong.data.loader import loader_batches, make_dataloader
    from megatron_mmprolong.training.flops import training_flops
    from megatron_mmprolong.training.step import forward_step

    grid = page_grid(config, cpu)
    planner_error = None
    try:
        figures.update(planner_estimate(config, length, grid))
    except Exception as err:  # noqa: BLE001 - the step's own figures still count
        planner_error = f"{type(err).__name__}: {err}"
        figures["planner_error"] = planner_error[:1000]
    cuda = torch.cuda.is_available()
    if cuda and "estimate_gib" in figures:
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if figures["estimate_gib"] * GIB > 0.95 * capacity:
            figures["skipped"] = (f"the planner estimates {figures['estimate_gib']} GiB, the device has "
                                  f"{capacity / GIB:.0f} GiB")
            return
    dataset = training_dataset(figures, config, family, length, data, work, cpu)
    settings = _loader_settings()
    if cpu:
        settings["num_workers"] = 1  # the worker and pin paths, without a second spawn on CI
    loader = make_dataloader(dataset, **settings)
    figures.update(loader_workers=loader.num_workers, loader_prefetch=loader.prefetch_factor,
                   pin_memory=loader.pin_memory)
    model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    with loader_batches(loader) as batches:
        for attempt in ("warm-up", "timed"):
            waited = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - waited
            if attempt == "warm-up":  # the workers' start and first decode
                figures["first_batch_s"] = round(time.perf_counter() - started, 3)
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            start = time.perf_counter()
            try:
                output, loss_function = forward_step(iter([batch]), model)
                total, count, _ = loss_function(output)
                total.backward()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    pinned = all(t.is_pinned() for t in tensors) if cuda else False
    lengths = torch.diff(batch["cu_seqlens"]).tolist()
    flops = training_flops(config, lengths, batch["image_grid_thw"].numpy())
    figures.update(
        tokens=int(batch["tokens"].shape[1]), pages=int(batch["image_grid_thw"].shape[0]),
        page_grid=list(grid), batch_mib=round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2),
        pinned=pinned, loader_wait_s=round(waited, 3), tflop=round(flops / 1e12, 6), seconds=round(seconds, 3),
        tflops=round(flops / seconds / 1e12, 3), loss=float(total) / max(1, int(count)),
    )
    if cuda:
        figures["sync_debug_mode"] = "error"  # a host sync in the step would have raised
        figures["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        figures["peak_over_weights_gib"] = round((torch.cuda.max_memory_allocated() - before) / GIB, 2)
        if "estimate_gib" in figures:
            figures["peak_vs_estimate"] = round(figures["peak_gib"] / figures["estimate_gib"], 3)
        if not pinned:
            raise RuntimeError("the loader's batch is not in pinned memory: the step's copies block the host")
    if planner_error:
        raise RuntimeError(f"planner: {planner_error}")


def long_sample(config, length: int, grid, seed: int = 0):
    """One sample of about `length` tokens: 90% page tokens (as the planner's workload), the
    rest text between the pages."""
    from megatron_mmprolong.convert.parity import make_sample
    from megatron_mmprolong.training.planner import Workload

    grids = Workload(seq_length=length, global_batch=1, page_grid=grid).image_grids(config)
    per_page = int(grids[0].prod()) // config.vision.spatial_merge_size**2 + 2 if len(grids) else 0
    text = max(1, (length - per_page * len(grids)) // (len(grids) + 1))
    return make_sample(config, torch.Generator().manual_seed(seed), images=[tuple(g) for g in grids.tolist()],
                       text_tokens=text)


def needle_prompt(figures: dict, model, config, length: int, cpu: bool) -> None:
    from megatron_mmprolong.eval.megatron_generate import MegatronGenerator

    sample = long_sample(config, length, page_grid(config, cpu), seed=1)
    model.zero_grad(set_to_none=True)
    generator = MegatronGenerator(model.eval())
    start = time.perf_counter()
    with torch.no_grad():
        out = generator.generate(sample.input_ids, max_new_tokens=8, eos_token_id=-1, pad_token_id=0,
                                 pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    figures.update(prompt_tokens=int(sample.input_ids.shape[1]),
                   new_tokens=int(out.shape[1] - sample.input_ids.shape[1]),
                   seconds=round(time.perf_counter() - start, 2))


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a lost context is reported by the part that lost it
            pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="reduced size on the CPU (CI)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--pytest-timeout", type=float, default=300,
                        help="seconds for the whole pytest -m gpu run (then it is killed and fails)")
    parser.add_argument("--pytest-test-timeout", type=float, default=120,
                        help="seconds per test, where pytest-timeout is installed")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--work-dir", help="where the check's data is built (default: a temporary folder)")
    parser.add_argument("--fail-part", action="append", default=[], metavar="NAME",
                        help="make part NAME fail at its end, as a test of the report (repeatable)")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --cpu for the reduced check")

    report = Report(args.out, args.fail_part, {"mode": "cpu" if args.cpu else "gpu", "torch": torch.__version__})
    lengths = (512, 1024) if args.cpu else (32768, 131072)
    rt = report.run("setup", lambda f: setup(f, args.cpu))
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.work_dir) as work:
        work = Path(work)
        configs = {}
        for family in families:
            try:
                configs[family] = check_config(family, args.cpu)
            except Exception as err:  # noqa: BLE001
                report.data[f"{family}.config"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                report.write()
        data = report.run("data", lambda f: synth_documents(f, work, lengths, configs, args.cpu), device=False)
        for family, config in configs.items():
            model = report.run(f"{family}.model", lambda f: build(f, config), needs=("setup",))
            for length in lengths:
                report.run(f"{family}.step_{size_name(length)}",
                           lambda f: training_step(f, model, config, family, length, data, work, args.cpu),
                           needs=("setup", "data", f"{family}.model"))
                _free_device_memory()
            report.run(f"{family}.needle_{size_name(lengths[-1])}",
                       lambda f: needle_prompt(f, model, config, lengths[-1], args.cpu),
                       needs=("setup", f"{family}.model"))
            del model
            _free_device_memory()
    if rt is not None:
        try:
            from megatron_mmprolong import runtime

            runtime.shutdown()
        except Exception as err:  # noqa: BLE001 - after a lost context the process groups may not close
            report.data["shutdown_error"] = f"{type(err).__name__}: {err}"[:500]
    if not args.skip_tests:  # last: a hanging test costs its timeout, not the figures above
        _free_device_memory()
        report.run("pytest_gpu", lambda f: gpu_tests(f, args.pytest_timeout, per_test=args.pytest_test_timeout),
                   device=False)
    status = report.finish()
    print(json.dumps(report.data, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
