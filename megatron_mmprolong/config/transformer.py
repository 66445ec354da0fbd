"""The Megatron-Core TransformerConfigs of a model and a parallel layout: the language model's,
the vision blocks' and the merger's, for either family (their fields come from VLConfig)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from megatron_mmprolong.config.base import ConfigError, ParallelConfig, VLConfig

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig


# Shared by the vision blocks and the language model: pre-norm blocks without dropout; norms,
# MLP gating and biases come from the family's fields. Fusions default off; the model builder
# enables what its backend has.
_QWEN_BLOCK = dict(
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    cuda_graph_scope=[],
    # No MoE here, but megatron-core refuses variable_seq_lengths (packed pipelines) with the
    # default "allgather" token dispatcher.
    moe_token_dispatcher_type="alltoall",
)


def language_transformer_config(
    config: VLConfig, parallel: ParallelConfig, **overrides: Any
) -> "TransformerConfig":
    from megatron.core.transformer.transformer_config import TransformerConfig

    t = config.text
    values = dict(
        _QWEN_BLOCK,
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        num_attention_heads=t.num_attention_heads,
        num_query_groups=t.num_key_value_heads,
        kv_channels=t.head_dim,
        ffn_hidden_size=t.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=_activation(t.hidden_act),
        add_bias_linear=False,
        add_qkv_bias=t.qkv_bias,
        qk_layernorm=t.qk_norm,
        mrope_section=list(t.mrope_section),
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
        cp_comm_type=parallel.cp_comm_type,
        hierarchical_context_parallel_sizes=list(parallel.hierarchical_context_parallel_sizes or ()) or None,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def vision_transformer_config(
    config: VLConfig, parallel: ParallelConfig, **overrides: Any
) -> "TransformerConfig":
    """The vision blocks run whole on the first pipeline stage, without sequence or context
    parallelism: each context-parallel rank encodes its own images."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    v = config.vision
    values = dict(
        _QWEN_BLOCK,
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads,
        kv_channels=v.head_dim,
        ffn_hidden_size=v.intermediate_size,
        normalization=v.normalization,
        layernorm_epsilon=v.rms_norm_eps,
        gated_linear_unit=v.gated_mlp,
        activation_func=_activation(v.hidden_act),
        add_bias_linear=True,
        add_qkv_bias=True,
        tensor_model_parallel_size=parallel.vision_tp,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=False,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def merger_transformer_config(
    config: VLConfig, parallel: ParallelConfig, **overrides: Any
) -> "TransformerConfig":
    """Norm(1280) -> Linear(4*1280, 4*1280) -> GELU (exact) -> Linear(-> LM hidden)."""
    v = config.vision
    values = dict(
        num_layers=1,
        hidden_size=v.out_hidden_size,
        num_attention_heads=v.num_heads,
        ffn_hidden_size=v.merger_hidden_size,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
    )
    values.update(overrides)
    return vision_transformer_config(config, parallel, **values)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' gelu_pytorch_tanh (a module-level function, so configs pickle)."""
    return F.gelu(x, approximate="tanh")


def _activation(name: str):
    table = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh}
    if name not in table:
        raise ConfigError(f"hidden_act {name!r} is not supported (expected one of {list(table)})")
    return table[name]
