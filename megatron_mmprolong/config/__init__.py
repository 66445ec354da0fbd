"""Model configurations: the shared fields and layouts (base.py), one module per model family
(qwen25vl.py, qwen3vl.py), each reading and writing its transformers config.json and naming its
presets, and the Megatron-Core TransformerConfigs they make (transformer.py).
`VLConfig.from_hf_dir` and `VLConfig.preset` pick the family."""

from megatron_mmprolong.config.base import (
    CP_COMM_THD_MIN_TE,
    CP_COMM_TYPES,
    ConfigError,
    ParallelConfig,
    PrecisionConfig,
    TextConfig,
    TokenIds,
    VisionConfig,
    VLConfig,
    check_cp_comm_type_for_te,
    torch_dtype,
)
from megatron_mmprolong.config.qwen25vl import Qwen25VLConfig
from megatron_mmprolong.config.qwen3vl import Qwen3VLConfig
from megatron_mmprolong.config.transformer import (
    language_transformer_config,
    merger_transformer_config,
    vision_transformer_config,
)

__all__ = [
    "CP_COMM_THD_MIN_TE", "CP_COMM_TYPES", "ConfigError", "ParallelConfig", "PrecisionConfig", "Qwen25VLConfig",
    "Qwen3VLConfig", "TextConfig", "TokenIds", "VLConfig", "VisionConfig", "check_cp_comm_type_for_te",
    "language_transformer_config", "merger_transformer_config", "torch_dtype", "vision_transformer_config",
]
