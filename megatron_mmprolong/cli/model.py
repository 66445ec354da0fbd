"""`mmprolong model-info` and `mmprolong check-parity`: a model's shapes and counts, and its logits
against transformers'."""

from __future__ import annotations

import json

from megatron_mmprolong.cli.options import add_tolerances, judge


def _model_info(args) -> int:
    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.model.builder import build_model, count_parameters

    config = VLConfig.preset(args.preset) if args.preset else VLConfig.from_hf_dir(args.hf_dir)
    runtime.initialize()
    counts = count_parameters(build_model(config, meta=True))
    t, v = config.text, config.vision
    report = {
        "source": args.preset or str(args.hf_dir),
        "family": config.display_name,
        "hf_architecture": config.hf_architecture,
        **counts,
        "language_config": {
            "layers": t.num_layers, "hidden_size": t.hidden_size, "heads": t.num_attention_heads,
            "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "ffn": t.intermediate_size,
            "vocab": t.vocab_size, "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
            "mrope_interleaved": t.mrope_interleaved, "qkv_bias": t.qkv_bias, "qk_norm": t.qk_norm,
            "tied_embeddings": t.tie_word_embeddings,
        },
        "vision_config": {
            "blocks": v.depth, "hidden_size": v.hidden_size, "heads": v.num_heads,
            "ffn": v.intermediate_size, "gated_mlp": v.gated_mlp, "normalization": v.normalization,
            "patch_px": v.patch_size, "px_per_token": v.merged_token_px, "window_px": v.window_size,
            "full_attention_blocks": list(v.fullatt_block_indexes),
            "deepstack_blocks": list(v.deepstack_visual_indexes),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


def _check_parity(args) -> int:
    import torch

    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.parity import run_parity
    from megatron_mmprolong.convert.transformers_model import hf_model_class
    from megatron_mmprolong.model.builder import build_model

    config = VLConfig.from_hf_dir(args.hf_dir)
    runtime.initialize(seed=args.seed)
    model = build_model(config, backend="local")
    load_hf_weights(model, args.hf_dir)
    model.eval()
    reference = hf_model_class(config).from_pretrained(
        args.hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return judge(run_parity(model, reference, config, seed=args.seed), args)



def add_model_info(verbs) -> None:
    """model-info: parameter counts on the meta device."""
    info = verbs.add_parser(
        "model-info", help="parameter counts of a preset or HF config, built on the meta device"
    )
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="3b, 7b, 32b, 72b (Qwen2.5-VL), qwen3vl-2b, qwen3vl-4b, qwen3vl-8b, "
                                         "qwen3vl-32b, or a tiny one (tiny, qwen3vl-tiny, ...)")
    source.add_argument("--hf-dir", help="directory with a Qwen2.5-VL or Qwen3-VL config.json")
    info.set_defaults(run=_model_info)


def add_check_parity(verbs) -> None:
    """check-parity: logits and gradients against transformers."""
    parity = verbs.add_parser(
        "check-parity",
        help="compare logits with transformers on text + images + video, alone and packed (fp32, CPU)",
    )
    parity.add_argument("--hf-dir", required=True, help="Hugging Face Qwen2.5-VL or Qwen3-VL checkpoint directory")
    parity.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    add_tolerances(parity)
    parity.set_defaults(run=_check_parity)
