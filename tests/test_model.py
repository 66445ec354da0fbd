import time

import pytest
import torch

from megatron_mmprolong.config import ConfigError, ParallelConfig, Qwen25VLConfig, VLConfig
from megatron_mmprolong.convert.hf_loader import load_hf_weights
from megatron_mmprolong.convert.parity import make_sample, our_logits
from megatron_mmprolong.convert.transformers_model import hf_model_class, hf_model_config
from megatron_mmprolong.model.builder import build_model, count_parameters


@pytest.fixture(scope="module")
def loaded(tiny_hf, runtime):
    config, path = tiny_hf
    model = build_model(config)
    load_hf_weights(model, path)
    return config, path, model


def _sample(config, seed=0, **kw):
    kw = kw or dict(images=[(1, 8, 12), (1, 4, 4)], videos=[(2, 8, 8)])
    return make_sample(config, torch.Generator().manual_seed(seed), **kw)


def test_placeholder_count_mismatch_is_a_clear_error(loaded):
    config, _, model = loaded
    sample = _sample(config)
    positions = model.position_ids(sample.input_ids, sample.image_grid_thw, sample.video_grid_thw,
                                   sample.second_per_grid_ts)
    sample.input_ids[0, 3] = config.tokens.image  # one image token too many
    with pytest.raises(ValueError, match=r"has \d+ image tokens but image_grid_thw describes"):
        our_logits(model, sample)  # caught while computing position ids
    with torch.no_grad(), pytest.raises(RuntimeError, match="differs from the .* vision features"):
        model(sample.input_ids, positions, pixel_values=sample.pixel_values,
              image_grid_thw=sample.image_grid_thw, pixel_values_videos=sample.pixel_values_videos,
              video_grid_thw=sample.video_grid_thw)


def test_labels_give_the_per_token_cross_entropy(loaded):
    config, _, model = loaded
    sample = _sample(config)
    labels = torch.randint(0, config.text.vocab_size, sample.input_ids.shape)
    with torch.no_grad():
        logits = our_logits(model, sample)
        loss = model(sample.input_ids, **sample.vision_inputs(), labels=labels)
    expected = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    assert loss.shape == labels.shape
    torch.testing.assert_close(loss[0], expected, rtol=1e-5, atol=1e-5)


def test_pipeline_hooks_chain_to_the_full_model(loaded):
    config, path, full = loaded
    first = build_model(config, post_process=False)
    last = build_model(config, pre_process=False)
    for stage in (first, last):
        load_hf_weights(stage, path)
    assert first.vision_model is not None and last.vision_model is None
    assert not hasattr(first.language_model, "output_layer")
    assert not hasattr(last.language_model, "embedding")
    # One process has no pipeline group, so emulate a two-stage split of the decoder layers
    # (real pipeline runs are multi-process tests of the parallelism issue).
    split = max(config.text.num_layers // 2, config.deepstack_levels)  # deepstack layers on the first stage
    first.language_model.decoder.layers = first.language_model.decoder.layers[:split]
    last.language_model.decoder.layers = last.language_model.decoder.layers[split:]
    sample = _sample(config, seed=1)
    with torch.no_grad():
        hidden = our_logits(first, sample)  # [seq, batch, hidden] handed to the next stage
        last.set_input_tensor(hidden)
        chained = last(sample.input_ids, image_grid_thw=sample.image_grid_thw,
                       video_grid_thw=sample.video_grid_thw,
                       second_per_grid_ts=sample.second_per_grid_ts)
        torch.testing.assert_close(chained, our_logits(full, sample), rtol=0, atol=0)


@pytest.mark.parametrize("vision, merger", [(True, False), (False, True), (True, True)])
def test_freeze_options(loaded, vision, merger):
    config, path, _ = loaded
    model = build_model(config)
    load_hf_weights(model, path)
    model.freeze(vision_encoder=vision, merger=merger)
    our_logits(model, _sample(config)).float().square().mean().backward()
    for name, param in model.named_parameters():
        in_merger = name.startswith(("vision_model.merger.", "vision_model.deepstack_mergers."))
        in_encoder = name.startswith("vision_model.") and not in_merger
        frozen = (vision and in_encoder) or (merger and in_merger)
        assert param.requires_grad == (not frozen), name
        assert (param.grad is None) == frozen, name


@pytest.mark.parametrize("name", ["3b", "7b", "32b", "72b", "qwen3vl-2b", "qwen3vl-4b", "qwen3vl-8b", "qwen3vl-32b"])
def test_parameter_counts_equal_transformers(name, runtime):
    config = VLConfig.preset(name)
    ours = count_parameters(build_model(config, meta=True))
    with torch.device("meta"):
        hf = hf_model_class(config)(hf_model_config(config))
    total = sum(p.numel() for p in hf.parameters())
    vision = sum(p.numel() for p in hf.model.visual.parameters())
    assert ours == {"total": total, "vision": vision, "language": total - vision}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_7b_on_the_meta_device_is_fast_and_takes_no_memory(runtime):
    before = _rss_bytes()
    start = time.perf_counter()
    model = build_model(Qwen25VLConfig.preset("7b"), meta=True)
    elapsed = time.perf_counter() - start
    grown = _rss_bytes() - before
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model)["total"] > 8e9
    assert elapsed < 5.0
    assert grown < 256 * 2**20  # real fp32 weights would be 33 GB


def test_a_meta_build_takes_the_local_backend_where_te_is_the_default(runtime, monkeypatch):
    """TE modules allocate on the device they are given, not under the meta context: on a GPU
    node (TE the default) a shapes-only build must still use the local backend."""
    import megatron_mmprolong.model.builder as builder

    monkeypatch.setattr(builder, "default_backend", lambda: "te")
    model = build_model(Qwen25VLConfig.preset("tiny"), meta=True)
    assert all(p.is_meta for p in model.parameters())
    assert not [m for m in model.modules() if "transformer_engine" in type(m).__module__]
    with pytest.raises(ConfigError, match="built on the local backend, not te"):
        build_model(Qwen25VLConfig.preset("tiny"), meta=True, backend="te")


def test_all_to_all_context_parallel_needs_transformer_engine_2_10(monkeypatch):
    import megatron.core.utils as mcore_utils

    from megatron_mmprolong.model.builder import _check_transformer_engine

    monkeypatch.setattr(mcore_utils, "is_te_min_version", lambda version, check_equality=True: tuple(map(int, version.split("."))) <= (2, 9))
    monkeypatch.setattr(mcore_utils, "get_te_version", lambda: "2.9.0")
    _check_transformer_engine(ParallelConfig(context_parallel=2, cp_comm_type="p2p"))
    with pytest.raises(ConfigError, match="a2a on packed sequences needs Transformer Engine >= 2.10, this is 2.9.0"):
        _check_transformer_engine(ParallelConfig(context_parallel=2, cp_comm_type="a2a"))


def test_deepstack_layers_must_sit_on_the_first_pipeline_stage():
    config = VLConfig.preset("qwen3vl-8b")  # 36 layers, 3 deepstack levels
    config.validate_parallel(ParallelConfig(pipeline_parallel=12))  # 3 layers a stage: fits
    with pytest.raises(ConfigError, match="first pipeline stage holds 2 language layers, but deepstack"):
        config.validate_parallel(ParallelConfig(pipeline_parallel=18))
    with pytest.raises(ConfigError, match="holds 1 language layers"):  # virtual stages split stage 0
        config.validate_parallel(ParallelConfig(pipeline_parallel=12, virtual_pipeline_parallel=3))
    config.validate_parallel(ParallelConfig(pipeline_parallel=18, decoder_first_pipeline_num_layers=19))
    Qwen25VLConfig.preset("7b").validate_parallel(ParallelConfig(pipeline_parallel=28))  # no deepstack


def test_full_recompute_keeps_deepstack_gradients(runtime):
    """Deepstack features ride on the blocks' `context` through activation checkpoints: with
    full recompute the loss and every gradient equal those of the plain forward."""
    config = VLConfig.preset("qwen3vl-tiny-1k")
    sample = _sample(config, seed=4)
    results = []
    for recompute in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)):
        torch.manual_seed(0)
        model = build_model(config, **recompute)
        model.train()
        our_logits(model, sample).float().square().mean().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    plain, recomputed = results
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    assert plain["vision_model.deepstack_mergers.0.projector.encoder.linear_fc1.weight"].abs().sum() > 0
