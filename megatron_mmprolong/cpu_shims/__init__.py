"""Every workaround that lets Megatron-Core run on a machine without CUDA, in one place.

Applied by `runtime.initialize` only when `torch.cuda.is_available()` is false; on GPUs nothing
here runs. The workarounds every supported megatron-core line needs are in this file; each line's
own are in its module (mcore_0_16.py ... mcore_0_19.py), picked by the installed version. Each
shim names the call sites it exists for (`CALL_SITES`), and `CPU_SAFE` names the CUDA uses in
functions CPU runs call that cannot fail there. tests/test_cpu_shims.py fails when an upgrade moves
a call site, or when CPU training calls a megatron-core function with a CUDA use that neither
names, so a shim never silently outlives its reason and a new CUDA call is named, not met on a
crashed rank. The model code itself has no CPU branches: it owns its rotary embeddings and attention.
"""

from __future__ import annotations

import importlib
import types
from typing import Iterable

import torch
from packaging.version import Version

from megatron_mmprolong.cpu_shims import scan
from megatron_mmprolong.cpu_shims.scan import CallSite

SUPPORTED_MEGATRON_CORE = ("0.16.1", "0.20")  # [min, max): the lines with a module here


def line(version: str | None = None) -> types.ModuleType:
    """The module of a megatron-core version's own workarounds (default: the installed one)."""
    if version is None:
        import megatron.core

        version = megatron.core.__version__
    low, high = SUPPORTED_MEGATRON_CORE
    parsed = Version(version)
    if not Version(low) <= parsed < Version(high):
        raise RuntimeError(f"megatron-core {version} is outside [{low}, {high}), the lines cpu_shims knows: "
                           f"install a supported one, or add its module (tests/test_cpu_shims.py says what it needs)")
    return importlib.import_module(f"{__name__}.mcore_{parsed.major}_{parsed.minor}")

# Modules that allocate buffers with `device=torch.cuda.current_device()` or call
# `torch.cuda.synchronize()`; their global name `torch` is rebound to a proxy (below).
PROXY_MODULES = (
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

# The call sites the common shims exist for.
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

# CUDA uses in megatron-core functions that CPU training calls, which cannot fail there: on
# branches CPUs never take.
CPU_SAFE: tuple[CallSite, ...] = (
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
    # several distributed-optimizer instances (the distributed optimizer needs CUDA, training/loop.py;
    # the line modules list the rest of that branch)
    CallSite("megatron.core.distributed.param_and_grad_buffer", "torch.cuda.stream(self.communication_stream)",
             "_ParamAndGradBucketGroup.start_grad_sync"),
    # NCCL user buffers (nccl_ub)
    CallSite("megatron.core.distributed.param_and_grad_buffer", 'torch.zeros([1], device="cuda")',
             "_ParamAndGradBuffer.__init__"),
    # autocast (enable_autocast)
    CallSite("megatron.core.pipeline_parallel.schedules", 'torch.autocast("cuda"', "forward_step"),
    # NVTX ranges (nvtx profiling)
    CallSite("megatron.core.utils", "torch.cuda.nvtx.range_push(msg)", "nvtx_range_push"),
    CallSite("megatron.core.utils", "torch.cuda.nvtx.range_pop()", "nvtx_range_pop"),
)


def call_sites() -> tuple[CallSite, ...]:
    """The call sites the installed line's shims exist for."""
    return CALL_SITES + line().CALL_SITES


def cpu_safe() -> tuple[CallSite, ...]:
    """The installed line's CUDA uses that cannot fail on CPUs."""
    return CPU_SAFE + line().CPU_SAFE


def check_call_sites() -> list[str]:
    """Call sites that moved (empty when every shim and every CPU_SAFE entry of the installed
    line still has its reason)."""
    return scan.moved(call_sites() + cpu_safe())


def unaccounted_cuda_calls(functions: Iterable[tuple[str, str]]) -> list[str]:
    """The CUDA uses in these megatron-core functions ((module, qualified name) pairs, as a run
    recorded them) that neither the shims' call sites nor CPU_SAFE name."""
    return scan.unaccounted(functions, call_sites() + cpu_safe())


class _CudaOnCpu:
    """`torch.cuda` as the proxied modules see it: the functions in `replaced`, else the real one."""

    def __init__(self, replaced: dict):
        self._replaced = replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(torch.cuda, name)


# torch.cuda functions the proxied modules call, as every line needs them on the CPU
_CUDA_ON_CPU = {
    "current_device": lambda: torch.device("cpu"),
    "synchronize": lambda *args, **kwargs: None,
}


class _TorchOnCpu(types.ModuleType):
    """`torch` as the proxied modules see it: their `torch.cuda` is a _CudaOnCpu, and
    zeros/tensor turn device="cuda" into the CPU."""

    def __init__(self, cuda: _CudaOnCpu):
        super().__init__("torch")
        self.cuda = cuda

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
    """Install the shims of the installed megatron-core line (idempotent). Call only on machines
    without CUDA."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_shims.apply() must not run on a machine with CUDA")
    proxy = _TorchOnCpu(_CudaOnCpu({**_CUDA_ON_CPU, **line().CUDA_ON_CPU}))
    for name in PROXY_MODULES:
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
