"""Every workaround that lets Megatron-Core 0.16 run on a machine without CUDA, in one place.

Applied by `runtime.initialize` only when `torch.cuda.is_available()` is false; on GPUs nothing
here runs. Each shim names the call sites it exists for (`CALL_SITES`); tests/test_cpu_shims.py
fails when an upgraded megatron-core moves one, so a shim never silently outlives its reason.
The model code itself has no CPU branches: it owns its rotary embeddings and attention.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import types
from dataclasses import dataclass
from functools import cache

import torch

SUPPORTED_MEGATRON_CORE = ("0.16.1", "0.17")  # [min, max)


@dataclass(frozen=True)
class CallSite:
    module: str
    snippet: str
    function: str | None = None  # None: anywhere in the module


# Modules that allocate buffers with `device=torch.cuda.current_device()` or call
# `torch.cuda.synchronize()`; their global name `torch` is rebound to a proxy (below).
_TORCH_PROXY_MODULES = (
    # sequence-parallel all-gather / reduce-scatter buffers
    "megatron.core.tensor_parallel.mappings",
    # sequence-parallel backward of the linear layers
    "megatron.core.tensor_parallel.layers",
    # pipeline send/recv buffers and the post-batch synchronize
    "megatron.core.pipeline_parallel.p2p_communication",
    # DDP gradient (and distributed-optimizer parameter) buffers
    "megatron.core.distributed.param_and_grad_buffer",
    # failure flag all-reduced at the end of a distributed-checkpoint save
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # synchronize after the non-blocking tensor copy of a checkpoint save
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    # the loss-token counter of every schedule: torch.zeros(..., device="cuda")
    "megatron.core.pipeline_parallel.schedules",
    # the global memory buffer that sequence-parallel linears all-gather into, and the
    # torch fallback of the multi-tensor L2 norm: torch.tensor(..., device="cuda")
    "megatron.core.utils",
    # the FP32 optimizer's loss scale and the mixed-precision flags: torch.tensor(..., device="cuda")
    "megatron.core.optimizer.optimizer",
    # gradient norm and zero counting: torch.tensor / torch.zeros(..., device="cuda")
    "megatron.core.optimizer.clip_grads",
)

CALL_SITES: tuple[CallSite, ...] = (
    CallSite("megatron.core.tensor_parallel.mappings", "device=torch.cuda.current_device()",
             "_gather_along_first_dim"),
    CallSite("megatron.core.tensor_parallel.mappings", "device=torch.cuda.current_device()",
             "_reduce_scatter_along_first_dim"),
    CallSite("megatron.core.tensor_parallel.layers", "device=torch.cuda.current_device()",
             "LinearWithGradAccumulationAndAsyncCommunication.backward"),
    CallSite("megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.current_device()"),
    CallSite("megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.synchronize()"),
    CallSite("megatron.core.distributed.param_and_grad_buffer", "torch.cuda.current_device()"),
    CallSite("megatron.core.dist_checkpointing.strategies.state_dict_saver",
             "torch.cuda.current_device()"),
    CallSite("megatron.core.dist_checkpointing.strategies.state_dict_saver", "device='cuda'",
             "verify_global_md_reuse"),
    CallSite("megatron.core.dist_checkpointing.strategies.filesystem_async",
             "torch.cuda.synchronize()"),
    CallSite("megatron.core.utils", "device=torch.cuda.current_device()", "GlobalMemoryBuffer.get_tensor"),
    CallSite("megatron.core.utils", 'device="cuda"', "local_multi_tensor_l2_norm"),
    CallSite("megatron.core.optimizer.optimizer", "device='cuda'", "FP32Optimizer.__init__"),
    CallSite("megatron.core.optimizer.clip_grads", "device='cuda'", "get_grad_norm_fp32"),
    CallSite("megatron.core.optimizer.clip_grads", "device='cuda'", "count_zeros_fp32"),
    # clip_grad_by_total_norm_fp32 asserts grad.type() == 'torch.cuda.FloatTensor'
    CallSite("megatron.core.optimizer.clip_grads", "'torch.cuda.FloatTensor'", "clip_grad_by_total_norm_fp32"),
    CallSite("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32(", "MegatronOptimizer.clip_grad_norm"),
    CallSite("megatron.core.pipeline_parallel.schedules", 'torch.zeros([], dtype=torch.int, device="cuda")',
             "forward_backward_no_pipelining"),
    CallSite("megatron.core.pipeline_parallel.schedules", 'torch.zeros([], dtype=torch.int, device="cuda")',
             "forward_backward_pipelining_without_interleaving"),
    CallSite("megatron.core.pipeline_parallel.schedules", 'torch.zeros([], dtype=torch.int, device="cuda")',
             "forward_backward_pipelining_with_interleaving"),
    # Activation recompute saves and restores the CUDA RNG state.
    CallSite("megatron.core.tensor_parallel.random", "torch.cuda.random.get_rng_state",
             "_get_cuda_rng_state"),
    CallSite("megatron.core.tensor_parallel.random", "_get_cuda_rng_state(",
             "_get_all_rng_states"),
    CallSite("megatron.core.tensor_parallel.random", "_set_cuda_rng_state(",
             "_set_all_rng_states"),
    # Tied embeddings over pipeline stages: the first and last stages' copies are summed with
    # an all-reduce of `weight.data.cuda()`.
    CallSite("megatron.core.models.common.language_module.language_module", "weight.data = weight.data.cuda()",
             "LanguageModule.setup_embeddings_and_output_layer"),
    # The default RNG tracker seeds and forks CUDA generators.
    CallSite("megatron.core.tensor_parallel.random", "torch.cuda.get_rng_state()",
             "CudaRNGStatesTracker.add"),
)


# CUDA calls in megatron-core functions that CPU training runs, on branches it never takes; the
# guard test (tests/test_cpu_shims.py) accepts these and CALL_SITES, nothing else.
NOT_REACHED: tuple[CallSite, ...] = (
    # the linears and embeddings allocate on the CPU: use_cpu_initialization (model/builder.py)
    CallSite("megatron.core.tensor_parallel.layers", "device=torch.cuda.current_device()",
             "VocabParallelEmbedding.__init__"),
    CallSite("megatron.core.tensor_parallel.layers", "device=torch.cuda.current_device()",
             "ColumnParallelLinear.__init__"),
    CallSite("megatron.core.tensor_parallel.layers", "device=torch.cuda.current_device()",
             "RowParallelLinear.__init__"),
    # SHARP (use_sharp) for the data-parallel groups
    CallSite("megatron.core.parallel_state", "device_ids=[torch.cuda.current_device()]",
             "initialize_model_parallel"),
    CallSite("megatron.core.parallel_state", "torch.cuda.synchronize()", "initialize_model_parallel"),
    # CUDA-graph-safe RNG (use_cudagraphable_rng)
    CallSite("megatron.core.tensor_parallel.random", "torch.cuda.CUDAGraph", "CudaRNGStatesTracker.__init__"),
    # several distributed-optimizer instances (the distributed optimizer needs CUDA, training/loop.py)
    CallSite("megatron.core.distributed.distributed_data_parallel", "torch.cuda.Stream(",
             "DistributedDataParallel.__init__.<locals>._allocate_buffers_for_parameters"),
    CallSite("megatron.core.distributed.param_and_grad_buffer", "torch.cuda.stream(self.communication_stream)",
             "_ParamAndGradBucketGroup.start_grad_sync"),
    CallSite("megatron.core.distributed.param_and_grad_buffer",
             "self.communication_stream.wait_stream(torch.cuda.default_stream())",
             "_ParamAndGradBucketGroup.start_grad_sync"),
    CallSite("megatron.core.distributed.param_and_grad_buffer",
             "torch.cuda.default_stream().wait_stream(self.communication_stream)",
             "_ParamAndGradBucketGroup.finish_grad_sync"),
    # NCCL user buffers (nccl_ub)
    CallSite("megatron.core.distributed.param_and_grad_buffer", 'torch.zeros([1], device="cuda")',
             "_ParamAndGradBuffer.__init__"),
    # autocast (enable_autocast)
    CallSite("megatron.core.pipeline_parallel.schedules", 'torch.autocast("cuda"', "forward_step"),
    # a GPU out of memory while merging the halves of a SwiGLU weight on checkpoint load
    CallSite("megatron.core.transformer.mlp", "torch.cuda.empty_cache()",
             "apply_swiglu_sharded_factory.<locals>.sh_ten_merge_fn"),
    # NVTX ranges (nvtx profiling)
    CallSite("megatron.core.utils", "torch.cuda.nvtx.range_push(msg)", "nvtx_range_push"),
    CallSite("megatron.core.utils", "torch.cuda.nvtx.range_pop()", "nvtx_range_pop"),
)


class _CudaOnCpu:
    """`torch.cuda` as seen by the proxied modules: the current device is the CPU and
    synchronize is a no-op; everything else is the real `torch.cuda`. (The proxy's `zeros`
    likewise turns device="cuda" into the CPU.)"""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args, **kwargs) -> None:
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    cuda = _CudaOnCpu()

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_off_cuda(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_off_cuda(device), **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


def _off_cuda(device):
    return "cpu" if device is not None and torch.device(device).type == "cuda" else device


_applied = False


def apply() -> None:
    """Install the shims (idempotent). Call only on machines without CUDA."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_shims.apply() must not run on a machine with CUDA")
    proxy = _TorchOnCpu("torch")
    for name in _TORCH_PROXY_MODULES:
        importlib.import_module(name).torch = proxy

    from megatron.core.tensor_parallel import random as mrandom

    # Recompute (CheckpointFunction) snapshots "the CUDA RNG"; on CPU that is the CPU generator.
    for name, replacement in (
        ("_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state()),
        ("_set_cuda_rng_state", lambda state, *args, **kwargs: torch.set_rng_state(state)),
    ):
        setattr(mrandom, name, replacement)
    from megatron.core.optimizer import optimizer as moptimizer

    # Gradient clipping asserts CUDA tensors by their type string; the same scaling on any device.
    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    from megatron.core.models.common.language_module.language_module import LanguageModule

    # Tensor.cuda() is a method, out of the proxy's reach: it stays on the CPU while the tied
    # embedding copies are set up (the all-reduce itself runs on gloo).
    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self):
        with _CudaCopiesStayOnCpu():
            return setup(self)

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu
    _applied = True


class _CudaCopiesStayOnCpu(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **(kwargs or {}))


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    grads = [getattr(p, "decoupled_grad" if use_decoupled_grad else "grad") for p in parameters]
    grads = [g.detach() for g in grads if g is not None]
    coefficient = max_norm / (total_norm + 1.0e-6)
    if coefficient < 1.0 and grads:
        torch._foreach_mul_(grads, coefficient)


def seed_rng_tracker(seed: int) -> None:
    """CPU stand-in for `model_parallel_cuda_manual_seed`: the inference tracker's fork() is a
    no-op, so dropout in tensor-parallel regions draws from the CPU generator. Dropout is 0 in
    Qwen2.5-VL, so no numbers depend on it."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(seed)


def check_call_sites() -> list[str]:
    """Call sites that moved (empty when every shim and every NOT_REACHED entry still has its
    reason). Read from megatron-core's files, so a function a shim replaced is checked too."""
    problems = []
    for site in CALL_SITES + NOT_REACHED:
        source, functions, _ = _parsed(site.module)
        where = f"{site.module}.{site.function}" if site.function else site.module
        text = source if site.function is None else functions.get(site.function)
        if text is None:
            problems.append(f"{where} no longer exists")
        elif site.snippet not in text:
            problems.append(f"{where} no longer contains {site.snippet!r}")
    return problems


@dataclass(frozen=True)
class CudaCall:
    module: str
    function: str  # qualified as in code.co_qualname
    line: int
    text: str


# torch.cuda attributes that are safe on a machine without CUDA
_CUDA_QUERIES = frozenset({"is_available", "device_count", "is_initialized", "OutOfMemoryError"})


def cuda_calls_in_source(source: str, module: str = "") -> list[CudaCall]:
    """Every use of CUDA inside a function of `source`: torch.cuda.* (its queries aside),
    `.cuda()`, and the strings "cuda", "cuda:N" and "torch.cuda.*" (devices, type checks)."""
    return _walk(source, module)[1]


def _walk(source: str, module: str) -> tuple[dict[str, str], list[CudaCall]]:
    """(source of each function and class by qualified name, the CUDA calls in functions)."""
    lines = source.splitlines()
    functions, calls = {}, []

    def visit(node, scope: str, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                # named as code.co_qualname names it: Class.method, outer.<locals>.inner
                name = f"{scope}.<locals>.{child.name}" if in_function else \
                    f"{scope}.{child.name}" if scope else child.name
                functions[name] = ast.get_source_segment(source, child)
                visit(child, name, not isinstance(child, ast.ClassDef))
                continue
            if in_function and _uses_cuda(child):
                calls.append(CudaCall(module, scope, child.lineno, lines[child.lineno - 1].strip()))
            visit(child, scope, in_function)

    visit(ast.parse(source), "", False)
    return functions, calls


def _uses_cuda(node) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
        return not _is_torch(node.func.value)  # tensor.cuda(), module.cuda()
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda":
        return _is_torch(node.value.value) and node.attr not in _CUDA_QUERIES
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value == "cuda" or node.value.startswith(("cuda:", "torch.cuda."))
    return False


def _is_torch(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "torch"


@cache
def _parsed(module: str) -> tuple[str, dict[str, str], dict[str, list[CudaCall]]]:
    """A megatron-core module's source, its functions' sources and its CUDA calls by function,
    from its file (not imported)."""
    with open(importlib.util.find_spec(module).origin) as file:
        source = file.read()
    functions, calls = _walk(source, module)
    by_function: dict[str, list[CudaCall]] = {}
    for call in calls:
        by_function.setdefault(call.function, []).append(call)
    return source, functions, by_function


def unaccounted_cuda_calls(functions) -> list[str]:
    """The CUDA calls in these megatron-core functions ((module, qualified name) pairs, as a run
    recorded them) that neither CALL_SITES nor NOT_REACHED names, as "module:line function: code"."""
    known = CALL_SITES + NOT_REACHED
    found = set()
    for module, function in functions:
        for call in _parsed(module)[2].get(function, []):
            if not any(site.module == module and site.function in (None, function) and site.snippet in call.text
                       for site in known):
                found.add(f"{module}:{call.line} {function}: {call.text}")
    return sorted(found)
