"""Weights loaded at TP2 (2 gloo ranks) give the transformers logits: the QKV group interleave,
the GLU halves, the vocabulary and the merger are sharded correctly."""

import torch

from megatron_mmprolong.config import ParallelConfig
from megatron_mmprolong.convert.parity import default_samples, hf_logits, our_logits, pack

from conftest import tiny_config
from multiprocess import run_ranks


def _tp2_logits(config, path):
    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.model.builder import build_model

    parallel = ParallelConfig(tensor_parallel=2)
    runtime.initialize(parallel)
    model = build_model(config, parallel)
    load_hf_weights(model, path)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    packed, params = pack(default_samples(config, seed=4))
    with torch.no_grad():
        return our_logits(model, packed, params), shapes


def test_tp2_logits_match_transformers(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    config = tiny_config(tied=True)
    write_random_hf_checkpoint(config, tmp_path, seed=11)
    results = run_ranks(_tp2_logits, 2, config, tmp_path)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        expected = torch.cat([hf_logits(reference, s) for s in default_samples(config, seed=4)], dim=1)
    for logits, shapes in results:
        assert (logits - expected).abs().max().item() < 1e-4
        # really sharded: each rank holds half of the QKV rows and of the vocabulary
        assert shapes["language_model.decoder.layers.0.self_attention.linear_qkv.weight"][0] == (4 + 2 * 2) * 16 // 2
        assert shapes["language_model.embedding.word_embeddings.weight"][0] == config.text.vocab_size // 2
