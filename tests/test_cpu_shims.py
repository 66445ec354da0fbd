"""The CPU workarounds still have their reasons, per megatron-core line: an upgrade that moves a
patched call site, or that adds a CUDA call on a path CPU training takes, fails here, loudly and
by name, instead of silently running a stale shim or crashing a rank."""

import importlib
import json
import os
from pathlib import Path

import megatron.core
import pytest
import torch

from megatron_mmprolong import cpu_shims
from megatron_mmprolong.cpu_shims import scan

from multiprocess import run_ranks


@pytest.mark.parametrize("version, module", [("0.16.1", "mcore_0_16"), ("0.17.1", "mcore_0_17"),
                                             ("0.18.2", "mcore_0_18"), ("0.19.0", "mcore_0_19"),
                                             ("0.19.2", "mcore_0_19")])
def test_each_supported_line_has_its_module(version, module):
    shims = cpu_shims.line(version)
    assert shims.__name__ == f"megatron_mmprolong.cpu_shims.{module}"
    assert isinstance(shims.CUDA_ON_CPU, dict) and isinstance(shims.CALL_SITES, tuple)
    assert isinstance(shims.CPU_SAFE, tuple)


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.20.0"])
def test_a_line_without_shims_is_refused_by_name(version):
    with pytest.raises(RuntimeError, match=rf"megatron-core {version} is outside \[0.16.1, 0.20\)"):
        cpu_shims.line(version)


def test_the_installed_megatron_core_has_its_line():
    cpu_shims.line()  # raises outside the supported range
    assert cpu_shims.line(megatron.core.__version__) is cpu_shims.line()


def test_every_patched_call_site_is_still_there():  # read from megatron-core's files, patched or not
    moved = cpu_shims.check_call_sites()
    assert not moved, "\n".join(moved)


def test_a_moved_call_site_is_reported():
    moved = scan.CallSite("megatron.core.tensor_parallel.mappings", "torch.cuda.no_such_call()")
    gone = scan.CallSite("megatron.core.tensor_parallel.mappings", "torch", "no_such_function")
    assert scan.moved([moved, gone]) == [
        "megatron.core.tensor_parallel.mappings no longer contains 'torch.cuda.no_such_call()'",
        "megatron.core.tensor_parallel.mappings.no_such_function no longer exists"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="shims are for machines without CUDA")
def test_apply_rebinds_torch_in_the_listed_modules_only(runtime):
    replaced = cpu_shims.line().CUDA_ON_CPU
    for name in cpu_shims.PROXY_MODULES:
        module = importlib.import_module(name)
        assert module.torch.cuda.current_device() == torch.device("cpu")
        assert module.torch.zeros(1).device.type == "cpu"  # everything else is real torch
        assert all(getattr(module.torch.cuda, f) is replacement for f, replacement in replaced.items())
    with pytest.raises((AssertionError, RuntimeError)):  # the real torch.cuda is left alone
        torch.cuda.current_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="shims are for machines without CUDA")
def test_rng_state_functions_use_the_cpu_generator(runtime):
    from megatron.core.tensor_parallel import random as mrandom

    state = mrandom._get_cuda_rng_state()
    first = torch.rand(3)
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), first)


# ---- the guard: no CUDA call that the shims do not know, in what training runs ----------------

EXAMPLES = Path(__file__).parents[1] / "examples"


def _guard_layouts(mix, out: Path) -> list[list[str]]:
    """Two-rank runs of `mmprolong train` that between them take every megatron-core path the
    plugin uses on CPUs: TP+SP, PP (1F1B), CP and DP; DDP with and without overlapped gradient
    reduction, both recompute kinds, clipping, checkpoint save and resume (bf16 training needs CUDA:
    Megatron-Core's mixed-precision optimizer takes only CUDA tensors)."""
    base = ["--config", str(EXAMPLES / "cpu_tiny.yaml"), "--data-mix", str(mix), "--seq-length", "2048",
            "--num-workers", "0", "--log-interval", "1", "--train-iters", "2"]
    tp = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--overlap-grad-reduce",
          "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    return [
        [*base, *tp, "--save", str(out / "tp")],
        [*base, *tp, "--load", str(out / "tp"), "--train-iters", "3"],
        [*base, "--pipeline-model-parallel-size", "2", "--recompute-granularity", "selective"],
        [*base, "--context-parallel-size", "2"],
        [*base],  # DP2
    ]


def _traced_rank(layouts: list[list[str]], trace_files: list[str]) -> None:
    """Run each layout on this rank, recording every megatron-core function called (module,
    qualified name), also when a run fails: the guard names the CUDA call that failed it."""
    import sys
    import threading

    import megatron.core

    from megatron_mmprolong.training.arguments import parse_args
    from megatron_mmprolong.training.loop import train

    root = Path(megatron.core.__file__).parent
    called: set[tuple[str, str]] = set()

    def record(frame, event, arg):
        code = frame.f_code
        if code.co_filename.startswith(str(root)):
            called.add((code.co_filename, code.co_qualname))

    sys.settrace(record)
    threading.settrace(record)
    try:
        for argv in layouts:
            train(parse_args(argv))
    finally:
        sys.settrace(None)
        threading.settrace(None)
        functions = set()
        for filename, qualname in called:
            module = ".".join(Path(filename).relative_to(root.parent.parent).with_suffix("").parts)
            functions.add((module.removesuffix(".__init__"), qualname))
        Path(trace_files[int(os.environ["RANK"])]).write_text(json.dumps(sorted(functions)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="shims are for machines without CUDA")
def test_training_runs_no_cuda_call_the_shims_do_not_know(tiny_train_data, tmp_path):
    """Every CUDA call (torch.cuda.*, device="cuda", .cuda(), CUDA type strings) in the megatron-core
    functions that CPU training runs is a known call site (shimmed, or on a branch CPUs never
    take). A new megatron-core that adds one fails here, by name, instead of crashing a rank."""
    *_, mix = tiny_train_data
    traces = [tmp_path / f"trace{rank}.json" for rank in range(2)]
    failure = None
    try:
        run_ranks(_traced_rank, 2, _guard_layouts(mix, tmp_path), [str(t) for t in traces])
    except Exception as err:  # a rank that hit the unknown call; the trace says which
        failure = err
    functions = {tuple(f) for t in traces if t.exists() for f in json.loads(t.read_text())}
    assert len(functions) > 100, "the trace recorded (almost) nothing"
    unknown = cpu_shims.unaccounted_cuda_calls(functions)
    assert not unknown, "CUDA calls that cpu_shims does not know (shim them, or list them in CPU_SAFE):\n" + \
        "\n".join(unknown)
    if failure is not None:
        raise failure


def test_the_scan_finds_each_kind_of_cuda_call():
    source = '''
def f(x):
    torch.cuda.current_stream().wait_stream(s)
    y = torch.empty(3, device="cuda")
    if torch.cuda.is_available():
        x = x.cuda()
    assert x.type() == 'torch.cuda.FloatTensor'
    def inner():
        return torch.cuda.Event()
'''
    calls = scan.cuda_calls_in_source(source)
    assert [(c.function, c.line) for c in calls] == [("f", 3), ("f", 4), ("f", 6), ("f", 7), ("f.<locals>.inner", 9)]
