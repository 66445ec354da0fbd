"""Hugging Face <-> Megatron-Core weights of Qwen2.5-VL."""
