"""Every documented training argument reaches the Megatron config it names; recipes are defaults,
the command line wins, bad values are errors."""


import pytest
import yaml

from megatron_mmprolong.config import ConfigError, language_transformer_config, vision_transformer_config
from megatron_mmprolong.training import arguments as A

# A non-default value per argument with a target, and the value its target should hold.
VALUES = {
    "rotary_base": (4e6, 4e6),
    "tensor_model_parallel_size": (2, 2),
    "pipeline_model_parallel_size": (2, 2),
    "context_parallel_size": (2, 2),
    "sequence_parallel": (True, True),
    "vision_tensor_parallel_size": (1, 1),
    "decoder_first_pipeline_num_layers": (1, 1),
    "cp_comm_type": ("a2a", "a2a"),
    "hierarchical_context_parallel_sizes": ((2, 2), [2, 2]),
    "seq_length": (65536, 65536),
    "global_batch_size": (8, 8),
    "lr": (3e-4, 3e-4),
    "min_lr": (3e-5, 3e-5),
    "lr_warmup_fraction": (0.25, 25),  # of 100 decay steps
    "lr_warmup_iters": (7, 7),
    "lr_decay_style": ("linear", "linear"),
    "lr_decay_iters": (80, 80),
    "weight_decay": (0.05, 0.05),
    "adam_beta1": (0.8, 0.8),
    "adam_beta2": (0.99, 0.99),
    "adam_eps": (1e-6, 1e-6),
    "clip_grad": (0.5, 0.5),
    "use_distributed_optimizer": (True, True),
    "overlap_grad_reduce": (True, True),
    "bf16": (True, True),
    "fp8_format": ("e4m3", "e4m3"),
    "fp8_recipe": ("tensorwise", "tensorwise"),
    "fp8_dot_product_attention": (True, True),
    "recompute_granularity": ("full", "full"),
    "recompute_method": ("block", "block"),
    "recompute_num_layers": (2, 2),
}
BASE = {"data_mix": "mix.yaml", "model": "tiny", "train_iters": 100}
# what some arguments need beside them to form a valid configuration
REQUIRES = {
    "sequence_parallel": {"tensor_model_parallel_size": 2},
    "decoder_first_pipeline_num_layers": {"pipeline_model_parallel_size": 2},
    "vision_tensor_parallel_size": {"tensor_model_parallel_size": 2},
    "cp_comm_type": {"context_parallel_size": 2},
    "hierarchical_context_parallel_sizes": {"context_parallel_size": 4, "cp_comm_type": "a2a+p2p"},
    "fp8_recipe": {"fp8_format": "e4m3"},
    "fp8_dot_product_attention": {"fp8_format": "hybrid"},
    "recompute_method": {"recompute_granularity": "full"},
    "recompute_num_layers": {"recompute_granularity": "full", "recompute_method": "uniform"},
    "recompute_granularity": {"recompute_method": "uniform"},
    "lr_warmup_fraction": {"lr_decay_iters": 100},
}


def _targets(args: A.TrainArgs) -> dict:
    config = A.model_config(args)
    parallel = A.parallel_config(args)
    precision = A.precision_config(args)
    language = language_transformer_config(config, parallel, **precision.transformer_overrides(), **A.transformer_overrides(args))
    vision = vision_transformer_config(config, parallel, **precision.transformer_overrides(vision=True))
    return {
        "transformer": language, "vision": vision, "optimizer": A.optimizer_config(args),
        "ddp": A.ddp_config(args), "scheduler": A.scheduler_steps(args, args.train_iters),
        "model": config.text, "plan": {"seq_length": args.seq_length, "global_batch": args.global_batch_size},
    }


def _get(container, field):
    return container[field] if isinstance(container, dict) else getattr(container, field)


@pytest.mark.parametrize("arg", [a for a in A.ARGUMENTS if a.target], ids=lambda a: a.name)
def test_argument_reaches_its_megatron_config(arg):
    value, expected = VALUES[arg.name]
    args = A.TrainArgs(**{**BASE, **REQUIRES.get(arg.name, {}), arg.name: value})
    container, field = arg.target.split(".")
    assert _get(_targets(args)[container], field) == expected


def test_every_argument_has_a_test_value_or_no_target():
    assert {a.name for a in A.ARGUMENTS if a.target} == set(VALUES)


def test_every_field_is_documented():
    import dataclasses

    assert {f.name for f in dataclasses.fields(A.TrainArgs)} == {a.name for a in A.ARGUMENTS}


def _recipe(tmp_path, **values):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data-mix": "mix.yaml", **values}))
    return path


def test_command_line_overrides_the_recipe(tmp_path):
    recipe = _recipe(tmp_path, lr=1e-4, seq_length=32768, tensor_model_parallel_size=2)
    args = A.parse_args(["--config", str(recipe), "--lr", "5e-5", "--sequence-parallel"])
    assert (args.lr, args.seq_length, args.tensor_model_parallel_size, args.sequence_parallel) == (5e-5, 32768, 2, True)
    assert args.data_mix == str(tmp_path / "mix.yaml")  # recipe paths are relative to the recipe


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "1e-5", "--frobnicate"], "unknown arguments: --frobnicate"),
        (["--train-iters", "3", "--train-tokens", "1e6"], "--train-iters and --train-tokens conflict"),
        (["--lr-warmup-iters", "3", "--lr-warmup-fraction", "0.1"], "conflict"),
        (["--micro-batch-size", "2"], "must be 1"),
        (["--lr", "1e-7"], "below --min-lr"),
        (["--recompute-granularity", "full"], "needs --recompute-method"),
        (["--save-interval", "5"], "--save-interval needs --save"),
        (["--loader-prefetch-gib", "0"], "--loader-prefetch-gib must be > 0"),
        (["--data-plan", "p"], "exactly one of --data-mix and --data-plan"),
        (["--fp8-format", "hybrid", "--fp8-vision"], "--fp8-vision: FP8 in the vision encoder was removed"),
    ],
)
def test_bad_arguments(tmp_path, argv, message):
    recipe = _recipe(tmp_path)
    with pytest.raises(ConfigError, match=message):
        A.parse_args(["--config", str(recipe), *argv])


def test_bad_recipes(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe key 'learning_rate'"):
        A.parse_args(["--config", str(_recipe(tmp_path, learning_rate=1))])
    with pytest.raises(ConfigError, match="fp8-vision: FP8 in the vision encoder was removed"):
        A.parse_args(["--config", str(_recipe(tmp_path, **{"fp8-vision": True}))])
    with pytest.raises(ConfigError, match="lr_decay_style must be one of"):
        A.parse_args(["--config", str(_recipe(tmp_path, lr_decay_style="exp"))])
    with pytest.raises(SystemExit):  # argparse refuses a bad choice on the command line
        A.parse_args(["--config", str(_recipe(tmp_path)), "--lr-decay-style", "exp"])


def test_recipes_in_examples_parse():
    from pathlib import Path

    for recipe in sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")):
        data = yaml.safe_load(recipe.read_text())
        if "datasets" in data:  # a mixture, not a recipe
            continue
        args = A.parse_args(["--config", str(recipe)])
        assert A.model_config(args).text.num_layers >= 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for CPU runs")
def test_distributed_optimizer_is_refused_on_cpu_before_anything_starts(capsys, keeps_runtime):
    """Megatron-Core's DistributedOptimizer takes only CUDA tensors: a clear error, not a TypeError
    from inside it after the model is built."""
    from megatron_mmprolong.train import main

    assert main(["--data-plan", "missing.plan", "--use-distributed-optimizer"]) == 2
    assert "--use-distributed-optimizer needs CUDA" in capsys.readouterr().err


def test_hierarchical_cp_sizes_from_the_command_line_and_a_recipe(tmp_path):
    """a2a+p2p can be chosen from `mmprolong train`: the sizes reach the parallel layout, from the
    command line (Megatron-LM's nargs form) or a recipe list."""
    cli = A.parse_args(["--data-mix", "mix.yaml", "--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p",
                        "--hierarchical-context-parallel-sizes", "2", "2"])
    recipe = A.parse_args(["--config", str(_recipe(tmp_path, **{"context-parallel-size": 4, "cp-comm-type": "a2a+p2p",
                                                                "hierarchical-context-parallel-sizes": [2, 2]}))])
    for args in (cli, recipe):
        assert A.parallel_config(args).hierarchical_context_parallel_sizes == (2, 2)
    with pytest.raises(A.ArgumentError, match="list of integers"):
        A.parse_args(["--config", str(_recipe(tmp_path, **{"hierarchical-context-parallel-sizes": "2x2"}))])
