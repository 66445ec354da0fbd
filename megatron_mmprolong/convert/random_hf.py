"""Random Hugging Face checkpoints (Qwen2.5-VL, Qwen3-VL) written by transformers itself (tests, the demo,
benchmarks): no weights are downloaded, and the reference code defines the format."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_mmprolong.config import VLConfig
from megatron_mmprolong.convert.transformers_model import hf_model_class, hf_model_config


def write_random_hf_checkpoint(
    config: VLConfig, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Every tensor random, norms and biases included, so that a mapping error anywhere shows."""
    torch.manual_seed(seed)
    model = hf_model_class(config)(hf_model_config(config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.05)
    out = Path(out_dir)
    model.to(dtype).save_pretrained(out)
    return out
