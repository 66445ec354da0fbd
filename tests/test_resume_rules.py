"""Where `train` starts (issue 32): it resumes from the folder it saves to whatever the order of
the flags, initial weights come from --pretrained-checkpoint (a converted checkpoint as --load is
read as it), and a resume of another model, family, M-RoPE base, layout or data plan is refused in
one line naming both values. Checkpoint folders here are their info file and markers: what the
decision reads, without the minute a real one costs (tests/test_training.py resumes real ones)."""

from pathlib import Path

import pytest
import yaml

from megatron_mmprolong.config import VLConfig
from megatron_mmprolong.convert.checkpoint_info import LATEST, iteration_dir, write_info
from megatron_mmprolong.training import arguments as A
from megatron_mmprolong.training.resume import ResumeRefused, argument_model, check_resume, start_point

DIGEST = "0123456789abcdef"


def _checkpoint(folder: Path, iteration: int | None, model: str = "tiny-1k", rope: float | None = None,
                tp: int = 1, digest: str = DIGEST) -> Path:
    """A training --save folder (iteration given) or a converted checkpoint (None)."""
    config = VLConfig.preset(model)
    config = config.with_rotary_base(rope) if rope else config
    directory = iteration_dir(folder, iteration) if iteration is not None else folder
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")
    write_info(directory, hf_config=config.to_hf_dict(), parallel_layout={"tensor_parallel": tp, "pipeline_parallel": 1,
                                                                          "context_parallel": 1}, plan_digest=digest)
    if iteration is not None:
        (folder / LATEST).write_text(f"{iteration}\n")
    return folder


def _args(*argv) -> A.TrainArgs:
    return A.parse_args(["--data-mix", "mix.yaml", *map(str, argv)])


@pytest.mark.parametrize("order", ["save", "load-and-save", "save-twice", "recipe-then-save"])
def test_the_run_resumes_from_the_folder_it_saves_to_whatever_the_order(tmp_path, order):
    run = _checkpoint(tmp_path / "run", 9)
    other = tmp_path / "elsewhere"  # a batch script's default, overridden after it
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"save": str(other), "data_mix": "mix.yaml"}))
    argv = {"save": ["--save", run], "load-and-save": ["--load", run, "--save", run],
            "save-twice": ["--save", other, "--save", run], "recipe-then-save": ["--config", recipe, "--save", run]}[order]
    start = start_point(_args(*argv))
    assert (start.resume, start.iteration) == (run, 9)
    assert start.describe(12) == f"resuming from iteration 9 of 12 ({run / 'iter_0000009'})"


def test_an_empty_save_starts_from_the_pretrained_checkpoint_and_a_full_one_resumes(tmp_path):
    converted = _checkpoint(tmp_path / "converted", None)
    save = tmp_path / "run"
    start = start_point(_args("--save", save, "--pretrained-checkpoint", converted))
    assert (start.resume, start.pretrained) == (None, converted)
    assert start.describe(5) == f"starting at iteration 0 of 5 from the weights of {converted}"
    _checkpoint(save, 3)
    assert start_point(_args("--save", save, "--pretrained-checkpoint", converted)).resume == save


def test_the_older_spelling_of_a_converted_checkpoint_still_starts_from_it(tmp_path):
    converted = _checkpoint(tmp_path / "converted", None)
    start = start_point(_args("--load", converted, "--save", tmp_path / "run"))
    assert (start.resume, start.pretrained) == (None, converted)
    assert "read as --pretrained-checkpoint" in start.note


def test_another_runs_folder_as_load_beside_a_different_save_is_refused(tmp_path):
    old = _checkpoint(tmp_path / "old", 4)
    new = tmp_path / "new"
    with pytest.raises(ResumeRefused) as refused:
        start_point(_args("--load", old, "--save", new))
    message = str(refused.value)
    assert "\n" not in message and f"--load {old}" in message and f"--save {new}" in message
    assert f"--pretrained-checkpoint {old}" in message


def test_load_without_save_resumes_that_folder_and_saves_nothing(tmp_path):
    run = _checkpoint(tmp_path / "run", 2)
    assert start_point(_args("--load", run)).resume == run


def test_two_starting_weights_conflict(tmp_path):
    a, b = _checkpoint(tmp_path / "a", None), _checkpoint(tmp_path / "b", None)
    with pytest.raises(ResumeRefused, match="both name starting weights"):
        start_point(_args("--load", a, "--pretrained-checkpoint", b, "--save", tmp_path / "run"))


def test_no_load_optim_is_refused_naming_the_new_way(tmp_path):
    with pytest.raises(A.ArgumentError, match="--pretrained-checkpoint"):
        _args("--no-load-optim")


# ---- a resume of another run ---------------------------------------------------------------

CASES = {
    "family": (dict(model="tiny-1k"), ["--model", "qwen3vl-tiny-1k"], "model family: qwen2_5_vl", "qwen3_vl"),
    "model": (dict(model="tiny-1k"), ["--model", "tiny"], "another model: tiny-1k", "tiny in this run"),
    "rotary base": (dict(rope=1e6), ["--rotary-base", "5e6"], "M-RoPE base (--rotary-base): 1e+06", "5e+06"),
    "layout": (dict(tp=2), ["--tensor-model-parallel-size", "1"], "parallel layout: TP2 x CP1 x PP1", "TP1 x CP1 x PP1"),
    "data plan": (dict(digest="ffffffffffffffff"), [], "data plan: ffffffffffffffff", DIGEST),
}


@pytest.mark.parametrize("case", CASES)
def test_a_resume_of_another_run_is_refused_naming_both_values(tmp_path, case):
    saved, argv, theirs, ours = CASES[case]
    save = _checkpoint(tmp_path / "run", 6, **saved)
    args = _args("--save", save, *argv)
    start = start_point(args)
    with pytest.raises(ResumeRefused) as refused:
        check_resume(args, start, argument_model(args, None), DIGEST)
    message = str(refused.value)
    assert "\n" not in message and theirs in message and ours in message and str(save) in message, message


def test_a_resume_of_the_same_run_is_accepted(tmp_path):
    save = _checkpoint(tmp_path / "run", 6, rope=4e6, tp=2)
    args = _args("--save", save, "--model", "tiny-1k", "--rotary-base", "4e6", "--tensor-model-parallel-size", "2")
    found = check_resume(args, start_point(args), argument_model(args, None), DIGEST)
    assert found.text.rope_theta == 4e6
    # without --model the checkpoint names the model; the initial weights' config is the argument's
    plain = _args("--save", save, "--tensor-model-parallel-size", "2")
    assert argument_model(plain, None) is None
    check_resume(plain, start_point(plain), None, DIGEST)


def test_the_issue_case_a_qwen3vl_recipe_on_a_qwen25vl_run_is_refused(tmp_path):
    """The Qwen3-VL recipe (initial weights Qwen3-VL, base 5e6) submitted onto a folder that holds a
    Qwen2.5-VL run (base 4e6) used to continue it silently."""
    save = _checkpoint(tmp_path / "run", 100, model="tiny-1k", rope=4e6)
    qwen3 = _checkpoint(tmp_path / "qwen3", None, model="qwen3vl-tiny-1k")
    args = _args("--save", save, "--pretrained-checkpoint", qwen3, "--rotary-base", "5e6")
    from megatron_mmprolong.training.resume import pretrained_config

    start = start_point(args)
    with pytest.raises(ResumeRefused, match="model family: qwen2_5_vl in its checkpoint iter_0000100, qwen3_vl"):
        check_resume(args, start, argument_model(args, pretrained_config(start)), DIGEST)
