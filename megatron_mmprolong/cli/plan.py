"""`mmprolong plan`: the parallel layouts that fit a model and sequence length on a cluster."""

from __future__ import annotations


def _plan_layouts(args) -> int:
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.training import planner

    config = VLConfig.from_hf_dir(args.hf_config) if args.hf_config else VLConfig.preset(args.preset)
    name = f"{config.display_name} from {args.hf_config}" if args.hf_config else f"{config.display_name} {args.preset}"
    workload = planner.Workload(
        seq_length=args.seq_length, global_batch=args.global_batch_size, micro_batch=args.micro_batch_size,
        sample_length=args.sample_length, image_fraction=args.image_fraction, page_grid=tuple(args.page_grid) if args.page_grid else None,
        params_bytes=2, fp8=args.fp8)
    cluster = planner.Cluster(args.nodes, args.gpus_per_node, args.gpu_memory)
    estimates = planner.plan(config, workload, cluster, tuple(args.recompute.split(",")),
                             distributed_optimizer=not args.no_distributed_optimizer)
    print(planner.format_report(name, estimates, workload, cluster, args.top))
    return 0 if any(e.fits for e in estimates) else 1



def add_plan(verbs) -> None:
    """plan: model, workload and cluster options."""
    layouts = verbs.add_parser("plan", help="parallel layouts that fit a model and sequence length on a cluster: "
                                            "memory per GPU, step time, ready-to-paste arguments")
    source = layouts.add_mutually_exclusive_group()
    source.add_argument("--preset", default="7b", help="a model preset: 3b, 7b, 32b, 72b (Qwen2.5-VL), qwen3vl-2b, "
                                                       "qwen3vl-4b, qwen3vl-8b, qwen3vl-32b (Qwen3-VL); default 7b")
    source.add_argument("--hf-config", help="directory with a Qwen2.5-VL or Qwen3-VL config.json")
    layouts.add_argument("--seq-length", type=int, default=131072)
    layouts.add_argument("--global-batch-size", type=int, default=32, help="packed sequences per step")
    layouts.add_argument("--micro-batch-size", type=int, default=1)
    layouts.add_argument("--gpus-per-node", type=int, default=8)
    layouts.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    layouts.add_argument("--nodes", type=int, default=1)
    layouts.add_argument("--fp8", action="store_true", help="FP8 GEMMs (Transformer Engine, H100)")
    layouts.add_argument("--recompute", default="none,selective,full",
                         help="activation recompute options to consider, comma-separated")
    layouts.add_argument("--no-distributed-optimizer", action="store_true")
    layouts.add_argument("--sample-length", type=int,
                         help="tokens per packed sample (default: one sample per sequence, the costliest attention)")
    layouts.add_argument("--image-fraction", type=float, default=0.9, help="share of image tokens")
    layouts.add_argument("--page-grid", type=int, nargs=3, metavar=("T", "H", "W"),
                         help="patches per page image (default: a Letter page at 144 DPI as the model's processor "
                              "sizes it: 1 88 114, ~2.5K tokens, for Qwen2.5-VL; 1 76 100, 1.9K tokens, for Qwen3-VL)")
    layouts.add_argument("--top", type=int, default=10, help="layouts to list")
    layouts.set_defaults(run=_plan_layouts)
