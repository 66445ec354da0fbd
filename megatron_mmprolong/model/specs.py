"""Layer specs of the vision blocks, the merger and the language model, for both backends.

The backend is chosen here and nowhere else: "te" (Transformer Engine: fused norm+linear,
fused attention with THD/CP/FP8) on GPUs, "local" (Megatron-Core's own linears, the SDPA
reference attention, our RMSNorm/LayerNorm) elsewhere. Both name their parameters the same way in
distributed checkpoints (`sharded_state_dict_keys_map`), so checkpoints move between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_mmprolong.model.attention import TokenRotarySelfAttention, WindowedSelfAttention
from megatron_mmprolong.model.deepstack import DeepstackLanguageLayer, DeepstackTapLayer
from megatron_mmprolong.model.norm import LocalNorm
from megatron_mmprolong.model.reference_attention import ReferenceCoreAttention

Backend = Literal["te", "local"]


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def default_backend() -> Backend:
    return "te" if torch.cuda.is_available() and transformer_engine_available() else "local"


@dataclass(frozen=True)
class BackendModules:
    norm: type
    column_linear: type
    row_linear: type
    core_attention: type
    fused_norm_column_linear: type | None  # norm folded into the following linear (TE)


def backend_modules(backend: Backend) -> BackendModules:
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return BackendModules(
            norm=TENorm,
            column_linear=TEColumnParallelLinear,
            row_linear=TERowParallelLinear,
            core_attention=TEDotProductAttention,
            fused_norm_column_linear=TELayerNormColumnParallelLinear,
        )
    if backend == "local":
        return BackendModules(
            norm=LocalNorm,
            column_linear=ColumnParallelLinear,
            row_linear=RowParallelLinear,
            core_attention=ReferenceCoreAttention,
            fused_norm_column_linear=None,
        )
    raise ValueError(f"unknown backend {backend!r}; expected 'te' or 'local'")


def _layer_spec(
    backend: Backend, attention: type, mask: AttnMaskType, config: TransformerConfig,
    layer: type = TransformerLayer, **layer_params,
) -> ModuleSpec:
    m = backend_modules(backend)
    fused = m.fused_norm_column_linear
    qk_norm = m.norm if config.qk_layernorm else IdentityOp  # per head, before the rotary (Qwen3)
    return ModuleSpec(
        module=layer,
        params=layer_params,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else m.norm,
            self_attention=ModuleSpec(
                module=attention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=fused or m.column_linear,
                    core_attention=m.core_attention,
                    linear_proj=m.row_linear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if fused else m.norm,
            mlp=ModuleSpec(
                module=MLP,
                params={"ffn_hidden_size": config.ffn_hidden_size},
                submodules=MLPSubmodules(linear_fc1=fused or m.column_linear, linear_fc2=m.row_linear),
            ),
            mlp_bda=get_bias_dropout_add,
            # Local norms are saved under the TE names, so checkpoints load into either backend.
            sharded_state_dict_keys_map={}
            if fused
            else {
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def language_block_spec(
    backend: Backend, config: TransformerConfig, vp_stage: int | None = None, deepstack: bool = False
) -> TransformerBlockSubmodules:
    """`deepstack`: the layers add the deepstack features they are given (model/deepstack.py)."""
    layer = _layer_spec(backend, TokenRotarySelfAttention, AttnMaskType.causal, config,
                        DeepstackLanguageLayer if deepstack else TransformerLayer)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
        layer_norm=backend_modules(backend).norm,
    )


def vision_block_spec(
    backend: Backend, config: TransformerConfig, deepstack_taps: tuple[int, ...] = ()
) -> TransformerBlockSubmodules:
    """`deepstack_taps`: 0-based blocks whose outputs the block also returns (model/deepstack.py)."""
    if deepstack_taps:
        layer = _layer_spec(backend, WindowedSelfAttention, AttnMaskType.no_mask, config,
                            DeepstackTapLayer, taps=tuple(deepstack_taps))
    else:
        layer = _layer_spec(backend, WindowedSelfAttention, AttnMaskType.no_mask, config)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * config.num_layers, layer_norm=backend_modules(backend).norm
    )


def merger_submodules(backend: Backend) -> MLPSubmodules:
    m = backend_modules(backend)
    return MLPSubmodules(linear_fc1=m.column_linear, linear_fc2=m.row_linear)
