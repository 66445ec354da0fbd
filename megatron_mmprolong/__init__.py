"""megatron-mmprolong: long-context continued pretraining of Qwen2.5-VL and Qwen3-VL on
Megatron-Core."""

__version__ = "0.1.0"
