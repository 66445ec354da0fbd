"""Qwen2.5-VL and Qwen3-VL built from Megatron-Core specs: the vision encoder (windows or frames,
deepstack mergers), M-RoPE, the language model, the VLM that joins them, layer specs for the TE
and local backends, and the key/value cache of generation."""
