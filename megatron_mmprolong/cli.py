"""`mmprolong <verb>`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def _model_info(args) -> int:
    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import Qwen25VLConfig
    from megatron_mmprolong.model.builder import build_model, count_parameters

    config = Qwen25VLConfig.preset(args.preset) if args.preset else Qwen25VLConfig.from_hf_dir(args.hf_dir)
    runtime.initialize()
    counts = count_parameters(build_model(config, meta=True))
    t, v = config.text, config.vision
    report = {
        "source": args.preset or str(args.hf_dir),
        **counts,
        "language_config": {
            "layers": t.num_layers, "hidden_size": t.hidden_size, "heads": t.num_attention_heads,
            "kv_heads": t.num_key_value_heads, "ffn": t.intermediate_size, "vocab": t.vocab_size,
            "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
            "tied_embeddings": t.tie_word_embeddings,
        },
        "vision_config": {
            "blocks": v.depth, "hidden_size": v.hidden_size, "heads": v.num_heads,
            "ffn": v.intermediate_size, "window_px": v.window_size,
            "full_attention_blocks": list(v.fullatt_block_indexes),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


def _check_parity(args) -> int:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import Qwen25VLConfig
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.parity import run_parity
    from megatron_mmprolong.model.builder import build_model

    config = Qwen25VLConfig.from_hf_dir(args.hf_dir)
    runtime.initialize(seed=args.seed)
    model = build_model(config, backend="local")
    load_hf_weights(model, args.hf_dir)
    model.eval()
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    report = run_parity(model, reference, config, seed=args.seed)
    report["atol"] = args.atol
    report["min_top1_agreement"] = args.min_top1
    report["passed"] = report["max_abs_logit_diff"] <= args.atol and report["top1_agreement"] >= args.min_top1
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprolong", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    info = verbs.add_parser(
        "model-info", help="parameter counts of a preset or HF config, built on the meta device"
    )
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="3b, 7b, 32b, 72b, tiny or tiny-tied")
    source.add_argument("--hf-dir", help="directory with a Qwen2.5-VL config.json")
    info.set_defaults(run=_model_info)

    parity = verbs.add_parser(
        "check-parity",
        help="compare logits with transformers on text + images + video, alone and packed (fp32, CPU)",
    )
    parity.add_argument("--hf-dir", required=True, help="Hugging Face Qwen2.5-VL checkpoint directory")
    parity.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    parity.add_argument(
        "--atol", type=float, default=1e-3,
        help="largest allowed |logit difference| (default 1e-3; tiny models agree to ~1e-6, "
             "deep fp32 models accumulate ~1e-4 from summation order)",
    )
    parity.add_argument(
        "--min-top1", type=float, default=0.99,
        help="smallest allowed fraction of positions with the same argmax (default 0.99)",
    )
    parity.set_defaults(run=_check_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_mmprolong.config import ConfigError
    from megatron_mmprolong.convert.hf_checkpoint import CheckpointError

    try:
        return args.run(args)
    except (ConfigError, CheckpointError) as err:
        print(f"mmprolong {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
