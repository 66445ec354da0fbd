"""Random Hugging Face Qwen2.5-VL checkpoints written by transformers itself (tests, the demo,
benchmarks): no weights are downloaded, and the reference code defines the format."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_mmprolong.config import VLConfig


def write_random_hf_checkpoint(
    config: VLConfig, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Every tensor random, norms and biases included, so that a mapping error anywhere shows."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config.to_hf_dict()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.05)
    out = Path(out_dir)
    model.to(dtype).save_pretrained(out)
    return out
