"""transformers' classes of a model family (the reference for parity, verification and the HF
evaluation backend), named by the family's config."""

from __future__ import annotations

from typing import Any

from megatron_mmprolong.config import VLConfig


def hf_model_class(config: VLConfig) -> type:
    """Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration."""
    import transformers

    return getattr(transformers, config.hf_architecture)


def hf_model_config(config: VLConfig) -> Any:
    """The transformers configuration object of `config`."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[config.family](**config.to_hf_dict())
