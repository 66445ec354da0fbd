import dataclasses
import json
from pathlib import Path

import pytest

from megatron_mmprolong.config import (
    ConfigError,
    ParallelConfig,
    Qwen25VLConfig,
    Qwen3VLConfig,
    VLConfig,
    language_transformer_config,
    vision_transformer_config,
)

FIXTURE = Path(__file__).parent / "fixtures" / "qwen25vl_7b_config.json"


def test_published_flat_7b_config_equals_preset():
    assert Qwen25VLConfig.from_hf_dict(json.loads(FIXTURE.read_text())) == Qwen25VLConfig.preset("7b")


def test_nested_layout_written_by_transformers_is_read(tmp_path):
    from transformers import Qwen2_5_VLConfig

    hf = Qwen2_5_VLConfig(**json.loads(FIXTURE.read_text()))
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in written and "hidden_size" not in written  # really nested
    assert Qwen25VLConfig.from_hf_dir(tmp_path) == Qwen25VLConfig.preset("7b")


@pytest.mark.parametrize("name", sorted(Qwen25VLConfig.preset_names()))
def test_round_trip_through_hf_dict_and_transformers(name, tmp_path):
    from transformers import Qwen2_5_VLConfig

    config = Qwen25VLConfig.preset(name).with_rotary_base(4e6)
    config.save_hf(tmp_path)
    assert Qwen25VLConfig.from_hf_dir(tmp_path) == config
    hf = Qwen2_5_VLConfig.from_pretrained(tmp_path)  # transformers reads what we write
    t = hf.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.vocab_size) == (
        config.text.hidden_size, config.text.num_layers, config.text.num_key_value_heads,
        config.text.vocab_size,
    )
    assert t.rope_parameters["rope_theta"] == 4e6
    assert list(t.rope_parameters["mrope_section"]) == list(config.text.mrope_section)
    assert hf.tie_word_embeddings == config.text.tie_word_embeddings
    v = hf.vision_config
    assert (v.depth, v.intermediate_size, v.window_size, list(v.fullatt_block_indexes)) == (
        config.vision.depth, config.vision.intermediate_size, config.vision.window_size,
        list(config.vision.fullatt_block_indexes),
    )


def test_preset_facts():
    c7, c3, c72 = (Qwen25VLConfig.preset(n) for n in ("7b", "3b", "72b"))
    assert (c7.text.hidden_size, c7.text.num_layers, c7.text.head_dim) == (3584, 28, 128)
    assert c7.vision.head_dim == 80 and c7.vision.window_merged_tokens == 4
    assert c3.text.tie_word_embeddings and not c7.text.tie_word_embeddings
    assert c72.vision.intermediate_size == 3456 and c7.vision.intermediate_size == 3420


def test_rotary_base_override_changes_only_the_base():
    base = Qwen25VLConfig.preset("7b")
    raised = base.with_rotary_base(4e6)
    assert raised.text.rope_theta == 4e6
    assert dataclasses.replace(raised.text, rope_theta=1e6) == base.text
    with pytest.raises(ConfigError, match="positive"):
        base.with_rotary_base(0)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="7b"):
        Qwen25VLConfig.preset("8b")


def test_tensor_parallel_must_divide_kv_heads():
    with pytest.raises(ConfigError, match=r"16 does not divide num_key_value_heads 8.*\[1, 2, 4, 8\]"):
        Qwen25VLConfig.preset("72b").validate_parallel(ParallelConfig(tensor_parallel=16))


@pytest.mark.parametrize(
    "parallel, message",
    [
        (ParallelConfig(tensor_parallel=3), "does not divide num_attention_heads 28"),
        (ParallelConfig(tensor_parallel=2, vision_tensor_parallel=3), "vision num_heads 16"),
        (ParallelConfig(tensor_parallel=1, vision_tensor_parallel=8), "vision intermediate_size 3420"),
        (ParallelConfig(pipeline_parallel=3), "does not divide num_layers 28"),
        (ParallelConfig(pipeline_parallel=4, decoder_first_pipeline_num_layers=5), "do not split evenly"),
        (ParallelConfig(sequence_parallel=True), "sequence parallelism needs"),
        (ParallelConfig(context_parallel=0), "context_parallel_size must be >= 1"),
    ],
)
def test_parallel_layout_errors(parallel, message):
    with pytest.raises(ConfigError, match=message):
        Qwen25VLConfig.preset("7b").validate_parallel(parallel)


def test_valid_layouts_pass():
    c7 = Qwen25VLConfig.preset("7b")
    for tp in (1, 2, 4):
        c7.validate_parallel(ParallelConfig(tensor_parallel=tp, sequence_parallel=tp > 1, pipeline_parallel=2))
    c7.validate_parallel(ParallelConfig(pipeline_parallel=4, decoder_first_pipeline_num_layers=4))


def _hf_dict(**changes):
    data = json.loads(FIXTURE.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="qwen2_vl"), "expected 'qwen2_5_vl'"),
        (dict(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 16]}), "summing to head_dim/2 = 64"),
        (dict(num_key_value_heads=5), "not a multiple of num_key_value_heads 5"),
        (dict(hidden_size=None), "'hidden_size' is missing"),
        (dict(vision_config=None), "vision_config is missing"),
        (dict(image_token_id=999999), "outside the vocabulary"),
    ],
)
def test_bad_hf_configs(changes, message):
    with pytest.raises(ConfigError, match=message):
        Qwen25VLConfig.from_hf_dict(_hf_dict(**changes))


def test_vision_config_errors():
    data = _hf_dict()
    data["vision_config"]["fullatt_block_indexes"] = [7, 32]
    with pytest.raises(ConfigError, match=r"\[32\] are outside the 32 vision blocks"):
        Qwen25VLConfig.from_hf_dict(data)
    data = _hf_dict()
    data["vision_config"]["window_size"] = 100
    with pytest.raises(ConfigError, match="window_size 100"):
        Qwen25VLConfig.from_hf_dict(data)


def test_bad_config_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        Qwen25VLConfig.from_hf_dir(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen25VLConfig.from_hf_dir(tmp_path / "missing")


def test_transformer_configs():
    c7 = Qwen25VLConfig.preset("7b").with_rotary_base(4e6)
    parallel = ParallelConfig(tensor_parallel=2, context_parallel=2, sequence_parallel=True)
    lm = language_transformer_config(c7, parallel)
    assert (lm.num_query_groups, lm.kv_channels, lm.ffn_hidden_size) == (4, 128, 18944)
    assert lm.add_qkv_bias and not lm.add_bias_linear and lm.gated_linear_unit
    assert (lm.tensor_model_parallel_size, lm.context_parallel_size, lm.sequence_parallel) == (2, 2, True)
    vision = vision_transformer_config(c7, parallel)
    assert vision.add_bias_linear and vision.kv_channels == 80
    assert (vision.context_parallel_size, vision.sequence_parallel, vision.pipeline_model_parallel_size) == (1, False, 1)


@pytest.mark.parametrize(
    "precision, backend, packed, training, message",
    [
        (dict(fp8="hybrid"), "local", True, True, "needs the Transformer Engine backend"),
        (dict(fp8="e5m2"), "te", True, True, "hybrid or e4m3"),
        (dict(fp8="hybrid", fp8_recipe="mxfp8"), "te", True, True, "needs Blackwell"),
        (dict(fp8="hybrid", fp8_recipe="blockwise"), "te", True, True, "needs Blackwell"),
        (dict(fp8="hybrid", fp8_attention=True), "te", True, True, "forward-only"),
        (dict(fp8_attention=True), "te", False, True, "needs FP8"),
        (dict(params_dtype="int8"), "te", True, True, "dtype 'int8'"),
    ],
)
def test_fp8_policy_refusals(precision, backend, packed, training, message):
    from megatron_mmprolong.config import PrecisionConfig

    with pytest.raises(ConfigError, match=message):
        PrecisionConfig(**precision).validate(backend, packed=packed, training=training)


def test_fp8_policy_accepted_combinations():
    from megatron_mmprolong.config import PrecisionConfig

    for precision, packed, training in [
        (dict(fp8="hybrid"), True, True),
        (dict(fp8="e4m3", fp8_recipe="tensorwise"), True, True),
        (dict(fp8="hybrid", fp8_attention=True), False, True),  # unpacked (with or without CP)
        (dict(fp8="hybrid", fp8_attention=True), True, False),  # packed, forward only
    ]:
        PrecisionConfig(**precision).validate("te", packed=packed, training=training)
    policy = PrecisionConfig(fp8="hybrid", fp8_attention=True)
    language, vision = policy.transformer_overrides(), policy.transformer_overrides(vision=True)
    assert language["fp8"] == "hybrid" and language["fp8_dot_product_attention"] and language["bf16"]
    assert "fp8" not in vision and vision["bf16"]  # the vision encoder stays BF16


def test_alignment_multiples():
    from megatron_mmprolong.data.packing import Alignment

    assert Alignment().multiple == 1
    assert Alignment(context_parallel=2).multiple == 4
    assert Alignment(context_parallel=4, tensor_parallel=2, sequence_parallel=True).multiple == 16
    assert Alignment(tensor_parallel=4, sequence_parallel=True).multiple == 4
    assert Alignment(tensor_parallel=2, sequence_parallel=True, fp8=True).multiple == 16
    assert Alignment(context_parallel=8, tensor_parallel=4, sequence_parallel=True, fp8=True).multiple == 64
    assert Alignment(context_parallel=2).pad([1, 4, 5]).tolist() == [4, 4, 8]


@pytest.mark.parametrize("name", sorted(Qwen3VLConfig.preset_names()))
def test_qwen3vl_round_trip_through_transformers(name, tmp_path):
    from transformers import Qwen3VLConfig as HFQwen3VLConfig

    config = Qwen3VLConfig.preset(name)
    config.save_hf(tmp_path)
    assert VLConfig.from_hf_dir(tmp_path) == config  # the family comes from model_type
    hf = HFQwen3VLConfig.from_pretrained(tmp_path)
    t, v = hf.text_config, hf.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.head_dim, t.num_key_value_heads, t.vocab_size) == (
        config.text.hidden_size, config.text.num_layers, config.text.head_dim,
        config.text.num_key_value_heads, config.text.vocab_size,
    )
    assert t.rope_parameters["rope_theta"] == config.text.rope_theta == 5e6
    assert list(t.rope_parameters["mrope_section"]) == list(config.text.mrope_section)
    assert (v.depth, v.hidden_size, v.patch_size, list(v.deepstack_visual_indexes)) == (
        config.vision.depth, config.vision.hidden_size, 16, list(config.vision.deepstack_visual_indexes),
    )
    hf.save_pretrained(tmp_path / "again")  # and what transformers writes back reads the same
    assert VLConfig.from_hf_dir(tmp_path / "again") == config


def test_qwen3vl_facts_and_refusals():
    c4, c32 = Qwen3VLConfig.preset("qwen3vl-4b"), Qwen3VLConfig.preset("qwen3vl-32b")
    assert c4.text.head_dim == 128 and c4.text.hidden_size // c4.text.num_attention_heads == 80
    assert c32.text.head_dim * c32.text.num_attention_heads == 8192 != c32.text.hidden_size
    assert c4.vision.merged_token_px == 32 and c4.vision.window_merged_tokens is None
    assert c4.deepstack_levels == 3 and c4.text.tie_word_embeddings and not c32.text.tie_word_embeddings
    data = c4.to_hf_dict()
    data["text_config"]["num_experts"] = 128
    with pytest.raises(ConfigError, match="MoE"):
        VLConfig.from_hf_dict(data)
    with pytest.raises(ConfigError, match="expected 'qwen2_5_vl' or 'qwen3_vl'"):
        VLConfig.from_hf_dict({**c4.to_hf_dict(), "model_type": "llava"})
    with pytest.raises(ConfigError, match="model_type is 'qwen3_vl', expected 'qwen2_5_vl'"):
        Qwen25VLConfig.from_hf_dict(c4.to_hf_dict())
