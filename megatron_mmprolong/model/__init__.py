"""Qwen2.5-VL built from Megatron-Core specs."""
