"""`mmprolong convert hf-to-mcore | mcore-to-hf | verify`: checkpoints between transformers and
Megatron-Core, and their logits compared at a parallel layout."""

from __future__ import annotations

import json

from megatron_mmprolong.cli.options import add_first_stage, add_layout, add_tolerances, judge, parallel_config


def _hf_to_mcore(args) -> int:
    from megatron_mmprolong.config import torch_dtype
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore

    report = hf_to_mcore(
        args.hf_dir, args.out, parallel_config(args),
        dtype=None if args.dtype == "auto" else torch_dtype(args.dtype),
        overwrite=args.overwrite, workers=args.workers,
    )
    print(json.dumps(_summary(report)))
    return 0


def _mcore_to_hf(args) -> int:
    from megatron_mmprolong.config import torch_dtype
    from megatron_mmprolong.convert.checkpoint_info import resolve_checkpoint
    from megatron_mmprolong.convert.mcore_to_hf import mcore_to_hf

    report = mcore_to_hf(
        resolve_checkpoint(args.mcore_dir), args.out, hf_template=args.hf_template,
        dtype=None if args.dtype == "auto" else torch_dtype(args.dtype),
        overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
    )
    print(json.dumps(_summary(report)))
    return 0


def _summary(report) -> dict:
    return {
        "out": str(report.out_dir), "tensors": report.tensors, "gigabytes": round(report.bytes / 1e9, 3),
        "seconds": round(report.seconds, 2), "gb_per_s": round(report.bytes / 1e9 / max(report.seconds, 1e-9), 3),
    }


def _verify(args) -> int:
    import torch.distributed as dist

    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.checkpoint_info import checkpoint_config, resolve_checkpoint
    from megatron_mmprolong.convert.hf_checkpoint import HFCheckpoint
    from megatron_mmprolong.convert.verify import verify_checkpoint, verify_spawned
    from megatron_mmprolong.runtime import launch_env

    parallel = parallel_config(args)
    args.mcore_dir = str(resolve_checkpoint(args.mcore_dir))
    # every rank would fail the same way: check the inputs and the layout before starting them
    checkpoint_config(args.mcore_dir, hf_template=args.hf_dir).validate_parallel(parallel)
    VLConfig.from_hf_dir(args.hf_dir)
    HFCheckpoint(args.hf_dir).close()
    if launch_env().launcher == "single" and args.tp * args.pp > 1:
        report = verify_spawned(args.hf_dir, args.mcore_dir, parallel, args.seed)
    else:
        report = verify_checkpoint(args.hf_dir, args.mcore_dir, parallel, args.seed)
        if dist.get_rank() != 0:
            passed = report["max_abs_logit_diff"] <= args.atol and report["top1_agreement"] >= args.min_top1
            return 0 if passed else 1
    return judge(report, args)



def add_convert(verbs) -> None:
    """convert and its three directions."""
    convert = verbs.add_parser("convert", help="HF <-> Megatron-Core distributed checkpoints")
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_mcore = directions.add_parser("hf-to-mcore", help="HF safetensors -> torch_dist checkpoint (streaming)")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--out", required=True, help="output directory (refused if it exists)")
    add_layout(to_mcore)
    to_mcore.add_argument("--vision-tp", type=int, default=None, help="vision tensor parallel size (default: --tp)")
    to_mcore.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                          help="stored dtype (default: the checkpoint's own)")
    to_mcore.add_argument("--workers", type=int, default=2, help="threads preparing tensors (default 2)")
    to_mcore.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    to_mcore.set_defaults(run=_hf_to_mcore)

    to_hf = directions.add_parser("mcore-to-hf", help="torch_dist checkpoint -> HF safetensors (streaming)")
    to_hf.add_argument("--mcore-dir", required=True,
                       help="a checkpoint, or a training --save directory (its latest checkpoint)")
    to_hf.add_argument("--out", required=True, help="output directory (refused if it exists)")
    to_hf.add_argument("--hf-template", default=None,
                       help="HF directory whose tokenizer/processor/generation files are copied")
    to_hf.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    to_hf.set_defaults(run=_mcore_to_hf)

    verify = directions.add_parser(
        "verify", help="load the Megatron checkpoint at --tp/--pp and compare logits with the HF one"
    )
    verify.add_argument("--hf-dir", required=True)
    verify.add_argument("--mcore-dir", required=True,
                        help="a checkpoint, or a training --save directory (its latest checkpoint)")
    add_layout(verify)
    add_first_stage(verify)
    verify.add_argument("--seed", type=int, default=0)
    add_tolerances(verify)
    verify.set_defaults(run=_verify)
