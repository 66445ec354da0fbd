"""Hugging Face <-> Megatron-Core weights of Qwen2.5-VL and Qwen3-VL: the name and layout mapping
per family, the streaming converters both ways, checkpoint metadata, and the numeric checks
(verify at a parallel layout, parity with transformers)."""
