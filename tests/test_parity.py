"""The model equals transformers' model of its family (Qwen2_5_VLForConditionalGeneration,
Qwen3VLForConditionalGeneration; float32, CPU): logits within 1e-4 for single and packed inputs,
gradients of every parameter within 1e-4 relative."""

import pytest
import torch

from megatron_mmprolong.convert.hf_checkpoint import HFCheckpoint
from megatron_mmprolong.convert.hf_loader import load_hf_weights
from megatron_mmprolong.convert.hf_mapping import HFLayout, canonical_name, tensor_rules
from megatron_mmprolong.convert.parity import hf_logits, make_sample, our_logits, pack, run_parity
from megatron_mmprolong.convert.transformers_model import hf_model_class
from megatron_mmprolong.model.builder import build_model

LOGIT_ATOL = 1e-4
GRAD_RTOL = 1e-4

CASES = {
    "one-image": dict(images=[(1, 12, 20)]),
    "four-images": dict(images=[(1, 8, 8), (1, 14, 6), (1, 2, 2), (1, 16, 22)]),
    "video": dict(images=[(1, 6, 10)], videos=[(4, 8, 12)], seconds_per_grid=0.5),
    "two-videos": dict(videos=[(2, 10, 10), (6, 12, 16)], seconds_per_grid=0.25),
}


@pytest.fixture(scope="module")
def models(tiny_hf, runtime):
    config, path = tiny_hf
    ours = build_model(config)
    load_hf_weights(ours, path)
    reference = hf_model_class(config).from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with HFCheckpoint(path) as checkpoint:
        layout = HFLayout.detect(checkpoint.names())
    return config, ours, reference, layout


def _samples(config, names, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [make_sample(config, generator, **CASES[n]) for n in names]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(models, case):
    config, ours, reference, layout = models
    (sample,) = _samples(config, [case])
    with torch.no_grad():
        diff = (our_logits(ours, sample) - hf_logits(reference, sample)).abs().max().item()
    assert diff < LOGIT_ATOL


def test_packed_logits_match_each_sample_alone(models):
    config, ours, reference, layout = models
    samples = _samples(config, ["video", "four-images", "one-image"], seed=1)
    packed, params = pack(samples)
    with torch.no_grad():
        expected = torch.cat([hf_logits(reference, s) for s in samples], dim=1)
        diff = (our_logits(ours, packed, params) - expected).abs().max().item()
    assert diff < LOGIT_ATOL


def test_run_parity_report(models):
    config, ours, reference, layout = models
    report = run_parity(ours, reference, config, seed=3)
    assert report["max_abs_logit_diff"] < LOGIT_ATOL
    assert report["top1_agreement"] == 1.0
    assert len(report["samples"]) == 2 and report["packed"]["max_abs_logit_diff"] < LOGIT_ATOL


def _loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_gradients_match_transformers(models):
    config, ours, reference, layout = models
    samples = _samples(config, ["video", "four-images"], seed=2)
    packed, params = pack(samples)
    targets = torch.randint(0, config.text.vocab_size, packed.input_ids.shape)
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    _loss(our_logits(ours, packed, params), targets).backward()
    # The reference runs each sample alone; the packed loss is the token-weighted sum.
    offset, total = 0, packed.input_ids.shape[1]
    for sample in samples:
        n = sample.input_ids.shape[1]
        (_loss(hf_logits(reference, sample), targets[:, offset : offset + n]) * n / total).backward()
        offset += n

    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    rules = {r.mcore: r for r in tensor_rules(config, layout)}
    checked = 0
    for name, param in ours.named_parameters():
        rule = rules[canonical_name(name)]
        expected = rule.to_mcore([_hf_grad(ref_grads, hf) for hf in rule.hf])
        scale = expected.abs().max().item()
        assert param.grad is not None, name
        err = (param.grad - expected).abs().max().item()
        assert err <= GRAD_RTOL * scale + 1e-12, f"{name}: {err} vs scale {scale}"
        checked += 1
    assert checked == len(list(ours.parameters()))


def _hf_grad(ref_grads, checkpoint_name):
    """The gradient of the module parameter that transformers saves as `checkpoint_name`
    (Qwen2.5-VL's checkpoints drop the `language_model.` / `model.` nesting of its modules)."""
    for module_name, grad in ref_grads.items():
        flat = module_name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        if checkpoint_name in (module_name, flat):
            return grad
    raise KeyError(checkpoint_name)
