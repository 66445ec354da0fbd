"""The model an `eval` verb runs: a transformers checkpoint (--hf-dir), this project's model from a
Megatron checkpoint at TP x CP x PP (--mcore-dir) or a served model (--endpoint), the options that
choose it, and the served judges' clients."""

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


def add_endpoint_options(parser) -> None:
    parser.add_argument("--model", help="model name served by --endpoint")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the endpoint's API key")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight to --endpoint")


def model_tokenizer(args) -> str | None:
    """The evaluated model's tokenizer (--tokenizer, else the --hf-dir checkpoint's), once the
    options that go together are checked: --endpoint with --model, --mcore-dir with a tokenizer."""
    from megatron_mmprolong.eval.dataset_qa import EvalError

    if args.endpoint and not args.model:
        raise EvalError("--endpoint needs --model, the name the server serves")
    tokenizer = args.tokenizer or args.hf_dir
    if args.mcore_dir and not tokenizer:
        raise EvalError("--mcore-dir needs --tokenizer (the checkpoint's tokenizer)")
    return tokenizer


def served_model(args):
    """The client of --endpoint, checked now (the server lists --model)."""
    return _checked_endpoint(args.endpoint, args.model, args.api_key_env, args.concurrency, args)


def image_chat_backend(args, image, tokenizer: str | None, source: str):
    """(chat backend, this rank writes output, barrier, requests in flight) of the model that
    --endpoint, --hf-dir or --mcore-dir names, for prompts of images sized by `image`."""
    if args.endpoint:
        return served_model(args), True, lambda: None, args.concurrency
    if args.hf_dir:
        from megatron_mmprolong.config import torch_dtype
        from megatron_mmprolong.eval.hf_chat import TransformersChatBackend

        dtype = None if args.dtype == "auto" else torch_dtype(args.dtype)
        return TransformersChatBackend(args.hf_dir, image.min_pixels, image.max_pixels, dtype), True, lambda: None, 1
    from megatron_mmprolong.data.chat import ChatTokenizer
    from megatron_mmprolong.eval.hf_chat import LocalChatBackend

    model, writer, barrier = eval_model(args)
    return LocalChatBackend(model, ChatTokenizer(tokenizer), image, source, in_thread=False), writer, barrier, 1


def judge_backend(args):
    """The client of --judge-endpoint, serving --judge-model, checked now."""
    from megatron_mmprolong.eval.dataset_qa import EvalError

    if not args.judge_model:
        raise EvalError("--judge-endpoint needs --judge-model, the name the judge's server serves")
    return _checked_endpoint(args.judge_endpoint, args.judge_model, args.judge_api_key_env,
                             getattr(args, "judge_concurrency", 8), args)


def _checked_endpoint(url: str, model: str, api_key_env: str | None, connections: int, args):
    from megatron_mmprolong.serving.endpoint import ChatEndpoint, EndpointConfig

    backend = ChatEndpoint(EndpointConfig(url, model, api_key_env, args.request_timeout, max_retries=args.max_retries,
                                          max_tokens_field=args.max_tokens_field), max_connections=connections)
    backend.check()
    return backend


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
