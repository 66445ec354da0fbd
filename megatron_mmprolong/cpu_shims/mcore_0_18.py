"""CPU workarounds of the megatron-core 0.18 line (Python >= 3.12; checked by hand at 0.18.2, not
in CI), beyond the common ones in cpu_shims/__init__.py: none; these are the line's CUDA uses
that cannot fail on CPUs."""

from megatron_mmprolong.cpu_shims.scan import CallSite

# torch.cuda functions the proxied modules see replaced, beyond the common ones
CUDA_ON_CPU: dict = {}

CALL_SITES: tuple[CallSite, ...] = ()

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
