"""The model an `eval` verb runs: a transformers checkpoint (--hf-dir) or this project's model
from a Megatron checkpoint at TP x CP x PP (--mcore-dir), and the options that choose it."""

from __future__ import annotations

from megatron_mmprolong.cli.options import add_first_stage


def add_eval_model(parser, endpoint: bool = False) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="Hugging Face Qwen2.5-VL or Qwen3-VL checkpoint, run with transformers")
    source.add_argument("--mcore-dir", help="Megatron checkpoint or training --save directory, run with this "
                                            "project's model at --tp x --cp x --pp (torchrun with that many ranks)")
    if endpoint:
        source.add_argument("--endpoint", help="OpenAI-compatible base URL of a served model (vllm serve ...), "
                                               "e.g. http://gpu-node:8000/v1; with --model")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size with --mcore-dir")
    parser.add_argument("--cp", type=int, default=1, help="context parallel size with --mcore-dir (long inputs)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size with --mcore-dir")
    add_first_stage(parser)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="parameter dtype; auto: fp32 with --hf-dir (the transformers reference), bf16 with "
                             "--mcore-dir (Transformer Engine's fused attention needs it; fp32 is refused at CP > 1 "
                             "and for prompts whose unfused attention scores exceed 8 GiB)")


def load_hf_model(hf_dir: str, dtype: str):
    import torch

    from megatron_mmprolong.config import VLConfig, torch_dtype
    from megatron_mmprolong.convert.transformers_model import hf_model_class

    dtype = torch_dtype(dtype) if dtype != "auto" else torch.float32
    return hf_model_class(VLConfig.from_hf_dir(hf_dir)).from_pretrained(hf_dir, dtype=dtype).eval()


def evaluated_config(args):
    """The config of the checkpoint --hf-dir or --mcore-dir names (read before any model loads)."""
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.checkpoint_info import checkpoint_config, resolve_checkpoint

    return VLConfig.from_hf_dir(args.hf_dir) if args.hf_dir else checkpoint_config(resolve_checkpoint(args.mcore_dir))


def eval_model(args):
    """(model, writes output, barrier): transformers for --hf-dir; this project's model at TP x CP
    x PP for --mcore-dir, on every rank of a torchrun world of that many ranks, rank 0 writing."""
    if args.hf_dir:
        return load_hf_model(args.hf_dir, args.dtype), True, lambda: None
    import torch.distributed as dist

    from megatron_mmprolong.config import ConfigError, ParallelConfig
    from megatron_mmprolong.convert.checkpoint_info import resolve_checkpoint
    from megatron_mmprolong.eval.megatron_generate import MegatronGenerator
    from megatron_mmprolong.runtime import launch_env

    world, ranks = launch_env().world_size, args.tp * args.cp * args.pp
    if world != ranks:
        raise ConfigError(f"--tp {args.tp} x --cp {args.cp} x --pp {args.pp} needs {ranks} ranks, this run has "
                          f"{world}: torchrun --nproc-per-node {ranks} -m megatron_mmprolong.cli eval ...")
    parallel = ParallelConfig(tensor_parallel=args.tp, context_parallel=args.cp, pipeline_parallel=args.pp,
                              decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers)
    dtype = "bf16" if args.dtype == "auto" else args.dtype
    model = MegatronGenerator.from_checkpoint(resolve_checkpoint(args.mcore_dir), parallel, dtype)
    return model, dist.get_rank() == 0, dist.barrier
