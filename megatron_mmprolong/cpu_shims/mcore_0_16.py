"""CPU workarounds of the megatron-core 0.16 line (tested: 0.16.1, Python 3.10/3.11), beyond the
common ones in cpu_shims/__init__.py: none; these are the line's CUDA uses that cannot fail on
CPUs."""

from megatron_mmprolong.cpu_shims.scan import CallSite

# torch.cuda functions the proxied modules see replaced, beyond the common ones
CUDA_ON_CPU: dict = {}

CALL_SITES: tuple[CallSite, ...] = ()

CPU_SAFE: tuple[CallSite, ...] = (
    # several distributed-optimizer instances
    CallSite("megatron.core.distributed.distributed_data_parallel", "torch.cuda.Stream(",
             "DistributedDataParallel.__init__.<locals>._allocate_buffers_for_parameters"),
    CallSite("megatron.core.distributed.param_and_grad_buffer",
             "self.communication_stream.wait_stream(torch.cuda.default_stream())",
             "_ParamAndGradBucketGroup.start_grad_sync"),
    CallSite("megatron.core.distributed.param_and_grad_buffer",
             "torch.cuda.default_stream().wait_stream(self.communication_stream)",
             "_ParamAndGradBucketGroup.finish_grad_sync"),
    # a GPU out of memory while merging the halves of a SwiGLU weight on checkpoint load
    CallSite("megatron.core.transformer.mlp", "torch.cuda.empty_cache()",
             "apply_swiglu_sharded_factory.<locals>.sh_ten_merge_fn"),
)
