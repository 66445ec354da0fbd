"""Norms of the local (non-Transformer-Engine) backend: RMSNorm and LayerNorm, picked by the
TransformerConfig's `normalization` as TENorm does on GPUs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm computed as Qwen2.5-VL does (normalise in float32, scale in the input dtype).

    Unlike Megatron's WrappedTorchNorm it supports sequence parallelism: the weight is tagged
    so that `finalize_model_grads` all-reduces its gradient over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: Tensor) -> Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (Qwen3-VL's vision blocks and mergers), both tagged for
    sequence parallelism like RMSNorm's weight."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return F.layer_norm(hidden_states, self.weight.shape, self.weight, self.bias, self.eps)


class LocalNorm:
    """The local backend's norm module for `config.normalization` (a class, as Megatron's
    build_module calls classes and returns plain functions uncalled)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused) -> nn.Module:
        norms = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} is not one of {list(norms)}")
        return norms[config.normalization](config, hidden_size, eps)
