"""CPU workarounds of the megatron-core 0.19 line (Python >= 3.12; tested: 0.19.2), beyond the
common ones in cpu_shims/__init__.py."""

from megatron_mmprolong.cpu_shims.scan import CallSite


class _HostStream:
    """torch.cuda.current_stream() on the CPU: work is done when issued, nothing to wait for."""

    def wait_event(self, event) -> None:
        return None

    def wait_stream(self, stream) -> None:
        return None


_HOST_STREAM = _HostStream()

# torch.cuda functions the proxied modules see replaced, beyond the common ones
CUDA_ON_CPU: dict = {
    # DDP's start_grad_sync takes the current stream on every call, to wait for gradients that a
    # CUDA-graph replay accumulated (there are none on CPUs)
    "current_stream": lambda *args, **kwargs: _HOST_STREAM,
}

CALL_SITES: tuple[CallSite, ...] = (
    CallSite("megatron.core.distributed.param_and_grad_buffer", "current_stream = torch.cuda.current_stream()",
             "_ParamAndGradBucketGroup.start_grad_sync"),
    # the optimizer asks every rank whether it holds gradients to norm: torch.tensor(device='cuda'),
    # which the common proxy already puts on the CPU
    CallSite("megatron.core.optimizer.optimizer", "device='cuda'", "MegatronOptimizer.has_grad_norm_group"),
)

CPU_SAFE: tuple[CallSite, ...] = (
    # several distributed-optimizer instances
    CallSite("megatron.core.distributed.distributed_data_parallel", "torch.cuda.Stream(",
             "DistributedDataParallel.__init__"),
    CallSite("megatron.core.distributed.param_and_grad_buffer",
             "self.communication_stream.wait_stream(torch.cuda.current_stream())",
             "_ParamAndGradBucketGroup.start_grad_sync"),
    CallSite("megatron.core.distributed.param_and_grad_buffer",
             "torch.cuda.current_stream().wait_stream(self.communication_stream)",
             "_ParamAndGradBucketGroup.finish_grad_sync"),
    # a GPU out of memory while concatenating checkpoint shards on load
    CallSite("megatron.core.transformer.utils", "torch.cuda.empty_cache()", "cat_with_oom_fallback"),
    # a device check before a save: CPU tensors take the other branch
    CallSite("megatron.core.dist_checkpointing.strategies.filesystem_async", 'ten.device.type == "cuda"',
             "FileSystemWriterAsync.prepare_write_data.<locals>._clone_or_dequantize_if_needed"),
)
