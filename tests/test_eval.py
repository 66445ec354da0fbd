"""`mmprolong eval`: the scorers are right (an oracle scores 100%, a constant answer scores its
share, a model that only reads the first half scores by depth), the needle grid resumes, and the
real transformers path runs on a checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mmprolong.cli import main
from megatron_mmprolong.config import ConfigError
from megatron_mmprolong.data.chat import ChatTokenizer
from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.eval.dataset_qa import answer_questions, prompt_and_answer, score
from multiprocess import free_port


class ScriptedModel(torch.nn.Module):
    """Stands in for transformers' model: replies with `reply(prompt)` and checks that it was
    given the sample's images, one pixel row per patch and one placeholder per merged patch."""

    def __init__(self, reply, image_pad):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.reply, self.image_pad = reply, image_pad

    def generate(self, input_ids, attention_mask, max_new_tokens, pixel_values=None, image_grid_thw=None, **_):
        patches = int(image_grid_thw.prod(-1).sum()) if image_grid_thw is not None else 0
        assert (0 if pixel_values is None else len(pixel_values)) == patches
        assert int((input_ids == self.image_pad).sum()) * 4 == patches
        reply = torch.tensor(self.reply(tuple(input_ids[0].tolist())), dtype=torch.long)[:max_new_tokens]
        return torch.cat([input_ids[0], reply])[None]


@pytest.fixture(scope="module")
def dataset(tiny_train_data):
    tokenizer, _, mix = tiny_train_data
    return MultimodalStore(mix.parent / "data" / "synth"), ChatTokenizer(tokenizer)


def test_an_oracle_scores_everything(dataset):
    store, tokenizer = dataset
    answers = {tuple(prompt.tolist()): answer.tolist() for prompt, answer in map(
        lambda i: prompt_and_answer(store, i), range(len(store)))}
    model = ScriptedModel(answers.__getitem__, tokenizer.image_pad)
    results = list(answer_questions(model, store, tokenizer, range(len(store))))
    assert len(results) == len(store) >= 6
    assert score(results)["exact_match"] == 1.0
    assert all(r.answer == r.expected and r.expected for r in results)


def test_a_constant_answer_scores_its_share(dataset):
    store, tokenizer = dataset
    results = list(answer_questions(ScriptedModel(lambda _: [], tokenizer.image_pad), store, tokenizer,
                                    range(len(store))))
    target = results[0].expected
    share = np.mean([r.expected == target for r in results])
    constant = tokenizer.hf.encode(f"  {target.upper()} ") + [tokenizer.im_end]  # case and spaces do not count
    results = list(answer_questions(ScriptedModel(lambda _: constant, tokenizer.image_pad), store, tokenizer,
                                    range(len(store))))
    assert 0 < share < 1 and score(results)["exact_match"] == pytest.approx(share)
    tasks = score(results)["by_task"]
    assert sum(t["samples"] for t in tasks.values()) == len(store)


def test_cli_runs_transformers_on_a_checkpoint(dataset, tmp_path, capsys):
    from megatron_mmprolong.config import Qwen25VLConfig
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    store, _ = dataset
    write_random_hf_checkpoint(Qwen25VLConfig.preset("tiny-1k"), tmp_path / "hf", seed=2)
    out = tmp_path / "qa.json"
    assert main(["eval", "qa", "--hf-dir", str(tmp_path / "hf"), "--data", store.prefix, "--tasks", "extract-single",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    singles = [i for i in range(len(store)) if store.task(i) == "extract-single"]
    assert [r["sample"] for r in report["results"]] == singles
    assert all(r["correct"] == (r["answer"].lower() == r["expected"].lower()) for r in report["results"])
    assert json.loads(capsys.readouterr().out)["samples"] == len(singles)
    assert main(["eval", "qa", "--hf-dir", str(tmp_path / "hf"), "--data", store.prefix, "--tasks", "nope"]) == 2


# ---- needle grid ------------------------------------------------------------------------------

def _needle_config(tokenizer, **changes):
    from megatron_mmprolong.eval.needle import NeedleConfig

    settings = dict(lengths=(512, 1024), depths=(0.0, 0.25, 1.0), per_cell=2)
    return NeedleConfig(str(tokenizer), **{**settings, **changes})


def _first_half_reader(out, tokenizer):
    """Answers right when the needle lies in the first half of the document, else says nothing."""
    records = {json.loads(line)["id"]: json.loads(line) for line in (out / "docs" / "records.jsonl").read_text().splitlines()}
    store = MultimodalStore(out / "data" / "needle")
    replies = {}
    for i in range(len(store)):
        prompt, answer = prompt_and_answer(store, i)
        record = records[store.ids[i]]
        first_half = record["evidence_pages"][0] <= len(record["pages"]) / 2
        replies[tuple(prompt.tolist())] = answer.tolist() if first_half else [tokenizer.im_end]
    return replies.__getitem__


def test_needle_grid_scores_by_depth_and_resumes(tiny_train_data, tmp_path):
    from megatron_mmprolong.eval.needle import run_needle_eval

    tokenizer_path, *_ = tiny_train_data
    tokenizer = ChatTokenizer(tokenizer_path)
    config, out = _needle_config(tokenizer_path), tmp_path / "needle"

    class Interrupted(Exception):
        pass

    def stop(_):
        raise Interrupted  # as if the run were killed before answering anything

    with pytest.raises(Interrupted):
        run_needle_eval(ScriptedModel(stop, tokenizer.image_pad), config, out, progress=False)
    reply = _first_half_reader(out, tokenizer)
    asked = []

    def interrupt_after_three(prompt):
        if len(asked) == 3:
            raise Interrupted
        asked.append(prompt)
        return reply(prompt)

    with pytest.raises(Interrupted):
        run_needle_eval(ScriptedModel(interrupt_after_three, tokenizer.image_pad), config, out, progress=False)
    assert len((out / "answers.jsonl").read_text().splitlines()) == 3

    def record(prompt):
        asked.append(prompt)
        return reply(prompt)

    report = run_needle_eval(ScriptedModel(record, tokenizer.image_pad), config, out, progress=False)
    assert len(asked) == len(set(asked)) == report["samples"] == 2 * 3 * 2  # nothing asked twice
    assert report["grid"] == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]  # rows: depth 0, 0.25, 1
    assert report["by_depth"] == {"0.0": 1.0, "0.25": 1.0, "1.0": 0.0}
    for length in config.lengths:
        assert abs(report["by_length"][str(length)]["context_tokens"] - length) < 0.2 * length
    assert json.loads((out / "needle.json").read_text()) == report
    from PIL import Image

    assert Image.open(out / "needle.png").size == (64 + 64 * 2 + 16, 36 + 64 * 3 + 40)


def test_needle_oracle_and_settings(tiny_train_data, tmp_path):
    from megatron_mmprolong.eval.dataset_qa import EvalError
    from megatron_mmprolong.eval.needle import run_needle_eval

    tokenizer_path, *_ = tiny_train_data
    tokenizer = ChatTokenizer(tokenizer_path)
    out = tmp_path / "needle"
    config = _needle_config(tokenizer_path, lengths=(600,), depths=(0.25, 0.75), per_cell=1)
    with pytest.raises(Exception):
        run_needle_eval(ScriptedModel(lambda _: 1 / 0, tokenizer.image_pad), config, out, progress=False)
    store = MultimodalStore(out / "data" / "needle")
    oracle = {tuple(p.tolist()): a.tolist() for p, a in (prompt_and_answer(store, i) for i in range(len(store)))}
    report = run_needle_eval(ScriptedModel(oracle.__getitem__, tokenizer.image_pad), config, out, progress=False)
    assert report["exact_match"] == 1.0 and report["grid"] == [[1.0], [1.0]]
    with pytest.raises(EvalError, match="other settings \\(per_cell\\)"):
        run_needle_eval(None, _needle_config(tokenizer_path, lengths=(600,), depths=(0.25, 0.75), per_cell=3), out)
    with pytest.raises(EvalError, match="same page counts"):
        _needle_config(tokenizer_path, lengths=(1000, 1010)).pages()
    with pytest.raises(EvalError, match="depths"):
        _needle_config(tokenizer_path, depths=(0.5, 1.5))


@pytest.mark.parametrize("preset", ["tiny-1k", "qwen3vl-tiny-1k"])
def test_needle_cli_on_a_checkpoint(tiny_train_data, tmp_path, capsys, preset):
    """The haystacks' pages follow the evaluated checkpoint's family (Qwen3-VL: 16 px patches)."""
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    tokenizer_path, *_ = tiny_train_data
    config = VLConfig.preset(preset)
    write_random_hf_checkpoint(config, tmp_path / "hf", seed=2)
    args = ["eval", "needle", "--hf-dir", str(tmp_path / "hf"), "--tokenizer", str(tokenizer_path), "--out",
            str(tmp_path / "needle"), "--lengths", "512", "1024", "--depths", "0", "1", "--per-cell", "1",
            "--page-width", "224", "--page-height", "336", "--font-size", "9", "--train-length", "512"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 4 and set(printed["by_length"]) == {"512", "1024"}
    assert (tmp_path / "needle" / "needle.png").is_file()
    store = MultimodalStore(tmp_path / "needle" / "data" / "needle")
    assert store.model_family == config.family and store.image_params.processor_mismatch(config.vision) == []
    assert main(["eval", "needle", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "x"),
                 "--lengths", "50"]) == 2


def test_needle_report_scores_the_grid_by_the_chosen_metric(tmp_path):
    from megatron_mmprolong.eval.dataset_qa import QAResult
    from megatron_mmprolong.eval.needle import needle_report

    results = [QAResult(i, f"n{i}", "extract-single", 900 + 100 * i, "A, B", answer, answer == "A, B", f1)
               for i, (answer, f1) in enumerate([("A, B", 1.0), ("A", 2 / 3), ("C", 0.0), ("B, A, C", 0.8)])]
    cells = {f"n{i}": {"length": length, "depth": depth, "pages": 0}
             for i, (length, depth) in enumerate([(1000, 0.0), (1000, 1.0), (2000, 0.0), (2000, 1.0)])}
    for metric, grid in (("exact_match", [[1.0, 0.0], [0.0, 0.0]]), ("f1", [[1.0, 0.0], [2 / 3, 0.8]])):
        config = _needle_config(tmp_path, lengths=(1000, 2000), depths=(0.0, 1.0), per_cell=1, haystack=("x",),
                                metric=metric)
        report = needle_report(results, cells, config)
        assert np.allclose(report["grid"], grid) and report["metric"] == metric
        assert report["exact_match"] == 0.25 and report["f1"] == pytest.approx((1 + 2 / 3 + 0.8) / 4)


def test_needle_in_your_own_documents(tiny_train_data, tmp_path):
    """--haystack: the needle page sits among the given documents' pages (a real PDF included),
    at the cell's depth, contexts reach their lengths, an oracle scores 100% and a reader that
    ignores the needle page scores 0."""
    from conftest import CORPUS

    from megatron_mmprolong.data.synth import needle_page
    from megatron_mmprolong.eval.needle import run_needle_eval

    tokenizer_path, records, _ = tiny_train_data
    pdf = tmp_path / "pdf.jsonl"
    pdf.write_text(json.dumps({"id": "corpus-pdf", "pdf": str(CORPUS / "google-doc-document.pdf"), "task": "other",
                               "question": "ignored", "answer": "ignored"}) + "\n")
    tokenizer = ChatTokenizer(tokenizer_path)
    config = _needle_config(tokenizer_path, lengths=(1024, 4096), depths=(0.0, 0.5, 1.0), per_cell=1,
                            haystack=(str(records), str(pdf)), dpi=36)
    out = tmp_path / "needle"
    with pytest.raises(ZeroDivisionError):
        run_needle_eval(ScriptedModel(lambda _: 1 / 0, tokenizer.image_pad), config, out, progress=False)
    written = [json.loads(line) for line in (out / "docs" / "records.jsonl").read_text().splitlines()]
    own_pages = {str(p) for p in (out / "pages").rglob("*.png")}
    assert own_pages  # the PDF was rendered once, into OUT/pages
    for record in written:
        cell = record["meta"]["needle"]
        position = record["evidence_pages"][0]
        assert position == needle_page(len(record["pages"]), cell["depth"])
        assert Path(record["pages"][position - 1]).parent == out / "docs"  # the inserted needle page
        assert f"page {position}" in record["question"]
        assert all(Path(p).parent != out / "docs" for i, p in enumerate(record["pages"]) if i != position - 1)
    assert any(p in own_pages for r in written for p in r["pages"])  # PDF pages made it into haystacks
    store = MultimodalStore(out / "data" / "needle")
    oracle = {tuple(p.tolist()): a.tolist() for p, a in (prompt_and_answer(store, i) for i in range(len(store)))}
    report = run_needle_eval(ScriptedModel(oracle.__getitem__, tokenizer.image_pad), config, out, progress=False)
    assert report["exact_match"] == 1.0 and report["samples"] == 6
    for length in config.lengths:
        assert length <= report["by_length"][str(length)]["context_tokens"] < 1.5 * length
    blind = run_needle_eval(ScriptedModel(lambda _: [tokenizer.im_end], tokenizer.image_pad), config,
                            tmp_path / "blind", progress=False)
    assert blind["exact_match"] == 0.0


@pytest.mark.parametrize("answer, expected, f1", [
    ("NG-2537", "ng-2537", 1.0),
    ("NG-2537, RQ-8737", "RQ-8737, NG-2537", 1.0),  # lists: items, any order
    ("RQ-8737", "RQ-8737, NG-2537", 2 / 3),
    ("RQ-8737, XX-1, YY-2", "RQ-8737, NG-2537", 0.4),
    ("1,366", "1366", 1.0), ("1366.0 kg", "1366", 1.0), ("1367", "1366", 0.0),
    ("Not answerable", "Not answerable", 1.0), ("42", "Not answerable", 0.0), ("Not answerable", "42", 0.0),
    ("Amber Gecko", "amber  gecko", 1.0), ("Amber", "Amber Gecko", 0.0),
])
def test_answer_f1(answer, expected, f1):
    from megatron_mmprolong.eval.dataset_qa import answer_f1

    assert answer_f1(answer, expected) == pytest.approx(f1)


def _on_both_checkpoints(tmp_path, seed: int, command: list[str], hf_out: str, mcore_out: str, layout: list[str],
                         preset: str = "tiny-1k"):
    """`command` on a random tiny checkpoint of `preset` with transformers (in this process), then
    on its Megatron conversion at `layout` over two torchrun ranks; outputs under tmp_path."""
    import os
    import subprocess
    import sys

    from megatron_mmprolong.config import ParallelConfig, VLConfig
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    write_random_hf_checkpoint(VLConfig.preset(preset), tmp_path / "hf", seed=seed)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", ParallelConfig(), progress=False)
    assert main([*command, "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / hf_out)]) == 0
    port = free_port()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                    "-m", "megatron_mmprolong.cli", *command, "--mcore-dir", str(tmp_path / "mcore"), *layout,
                    "--dtype", "fp32", "--out", str(tmp_path / mcore_out)],  # fp32 like the transformers run
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                   stdout=subprocess.DEVNULL)


@pytest.mark.parametrize("layout", [["--cp", "2"], ["--tp", "2"], ["--pp", "2"]], ids=["cp2", "tp2", "pp2"])
def test_megatron_and_transformers_give_the_same_answers(dataset, tmp_path, capsys, layout):
    """A random model (so replies are long and arbitrary) answers every question the same way
    through transformers and through this project's model on a Megatron checkpoint at CP2 / TP2 / PP2."""
    store, _ = dataset
    _on_both_checkpoints(tmp_path, 7, ["eval", "qa", "--data", store.prefix, "--limit", "4"], "hf.json", "mcore.json",
                         layout)
    hf, mcore = (json.loads((tmp_path / name).read_text())["results"] for name in ("hf.json", "mcore.json"))
    assert len(hf) == 4 and all(len(r["answer"]) > 5 for r in hf)  # long, arbitrary replies
    assert [r["answer"] for r in mcore] == [r["answer"] for r in hf]


@pytest.mark.parametrize("layout", [["--cp", "2"], ["--pp", "2", "--decoder-first-pipeline-num-layers", "3"]],
                         ids=["cp2", "pp2"])
def test_qwen3vl_megatron_and_transformers_give_the_same_answers(tiny_qwen3vl_train_data, tmp_path, layout):
    """As above for Qwen3-VL: deepstack features split over CP with the tokens, or on PP stage 0
    with the 3 language layers they feed."""
    tokenizer, _, mix = tiny_qwen3vl_train_data
    store = MultimodalStore(mix.parent / "data" / "synth")
    _on_both_checkpoints(tmp_path, 7, ["eval", "qa", "--data", store.prefix, "--limit", "3"], "hf.json", "mcore.json",
                         layout, "qwen3vl-tiny-1k")
    hf, mcore = (json.loads((tmp_path / name).read_text())["results"] for name in ("hf.json", "mcore.json"))
    assert len(hf) == 3 and all(len(r["answer"]) > 5 for r in hf)
    assert [r["answer"] for r in mcore] == [r["answer"] for r in hf]


def test_eval_refuses_a_dataset_of_another_family(dataset, tmp_path, capsys):
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    store, _ = dataset
    write_random_hf_checkpoint(VLConfig.preset("qwen3vl-tiny-1k"), tmp_path / "hf", seed=2)
    assert main(["eval", "qa", "--hf-dir", str(tmp_path / "hf"), "--data", store.prefix]) == 2
    err = capsys.readouterr().err
    assert "was built for qwen2_5_vl" in err and "patch_size 14 (the model's: 16)" in err


def test_megatron_eval_models_are_bf16_and_project_only_the_rows_they_use(tmp_path):
    """TE's flash and cuDNN attention need bf16, so eval models are bf16 unless asked; the
    vocabulary projection runs on the rows whose logits are read (the last prompt position and
    each new token in `generate`), not on the whole 128K prompt."""
    from megatron_mmprolong.config import ParallelConfig, Qwen25VLConfig
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.parity import make_sample
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.eval.megatron_generate import MegatronGenerator

    config = Qwen25VLConfig.preset("tiny-1k")
    write_random_hf_checkpoint(config, tmp_path / "hf", seed=3)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", ParallelConfig(), progress=False)
    generator = MegatronGenerator.from_checkpoint(tmp_path / "mcore", ParallelConfig())
    assert {p.dtype for p in generator.model.parameters()} == {torch.bfloat16}
    language = generator.model.language_model
    rows = []
    language.output_layer.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    project = language.logits
    language.logits = lambda hidden: rows.append(hidden.shape[0]) or project(hidden)
    sample = make_sample(config, torch.Generator().manual_seed(0), images=[(1, 8, 8)], text_tokens=40)
    out = generator.generate(sample.input_ids, max_new_tokens=3, eos_token_id=-1, pad_token_id=0,
                             pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    assert out.shape[1] == sample.input_ids.shape[1] + 3
    assert rows == [1, 1, 1]  # one row per new token, none for the rest of the prompt
    fp32 = MegatronGenerator.from_checkpoint(tmp_path / "mcore", ParallelConfig(), "fp32")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}  # on request
    fp32.model.backend = "te"  # as on a GPU node: fp32 runs TE's unfused attention, [heads, s, s] scores
    fp32._prompt(torch.zeros(20_000, dtype=torch.long), 0)
    with pytest.raises(ConfigError, match="a 30000-token prompt in fp32 needs 13 GiB of attention scores"):
        fp32._prompt(torch.zeros(30_000, dtype=torch.long), 0)


def test_fp32_evaluation_with_context_parallelism_on_transformer_engine_is_refused(monkeypatch, tmp_path):
    from megatron_mmprolong.config import ParallelConfig
    from megatron_mmprolong.eval.megatron_generate import MegatronGenerator
    from megatron_mmprolong.model import specs

    monkeypatch.setattr(specs, "default_backend", lambda: "te")
    with pytest.raises(ConfigError, match="unfused attention, which has no context parallelism"):
        MegatronGenerator.from_checkpoint(tmp_path, ParallelConfig(context_parallel=2), "fp32")


# ---- loss by position -------------------------------------------------------------------------

class FarBlindModel(torch.nn.Module):
    """Predicts every next token with certainty before position `horizon`, knows nothing after
    (transformers' layout: `model` gives hidden states, here logits already, `lm_head` maps them)."""

    def __init__(self, vocab, horizon):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.horizon = vocab, horizon
        self.lm_head = torch.nn.Identity()

    def model(self, input_ids, **_):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        positions = torch.arange(input_ids.shape[1] - 1)
        early = positions + 1 < self.horizon  # the predicted token's position
        logits[0, positions[early], input_ids[0, 1:][early]] = 50.0
        return (logits,)


def test_loss_by_position_sees_the_horizon(dataset):
    from megatron_mmprolong.eval.position_loss import hf_scorer, position_loss

    store, tokenizer = dataset
    vocab = len(tokenizer.hf)
    report = position_loss(hf_scorer(FarBlindModel(vocab, horizon=256), chunk=100), store, range(len(store)),
                           bucket_size=128)
    buckets = [b for b in report["buckets"] if b["tokens"]]
    assert buckets[0]["start"] == 0 and buckets[1]["loss"] < 1e-6 and buckets[1]["accuracy"] == 1.0
    after = [b for b in buckets if b["start"] >= 256]
    assert after and all(b["loss"] == pytest.approx(np.log(vocab)) for b in after)
    special = store.manifest["tokenizer"]["special_tokens"]
    text_targets = sum(int(np.isin(np.asarray(store.tokens[i])[1:], [special["image_pad"], special["vision_start"],
                                                                       special["vision_end"]], invert=True).sum())
                       for i in range(len(store)))
    assert sum(b["tokens"] for b in report["buckets"]) == text_targets  # images are not scored


def test_position_loss_cli(dataset, tmp_path, capsys):
    from PIL import Image

    from megatron_mmprolong.config import Qwen25VLConfig
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    store, _ = dataset
    write_random_hf_checkpoint(Qwen25VLConfig.preset("tiny-1k"), tmp_path / "hf", seed=2)
    assert main(["eval", "position-loss", "--hf-dir", str(tmp_path / "hf"), "--data", store.prefix, "--out",
                 str(tmp_path / "pl"), "--bucket-size", "256", "--limit", "2"]) == 0
    report = json.loads((tmp_path / "pl" / "position_loss.json").read_text())
    assert report["samples"] == 2 and report["buckets"][0]["loss"] > 0
    assert Image.open(tmp_path / "pl" / "position_loss.png").size == (720, 360)
    assert main(["eval", "position-loss", "--hf-dir", str(tmp_path / "hf"), "--data", store.prefix, "--out",
                 str(tmp_path / "x"), "--min-tokens", "10000000"]) == 2


@pytest.mark.parametrize("layout", [["--cp", "2"], ["--pp", "2"]], ids=["cp2", "pp2"])
def test_position_loss_on_a_megatron_checkpoint_equals_transformers(dataset, tmp_path, layout):
    store, _ = dataset
    _on_both_checkpoints(tmp_path, 3, ["eval", "position-loss", "--data", store.prefix, "--bucket-size", "64",
                                       "--limit", "3"], "hf", "mcore", layout)
    hf, mcore = (json.loads((tmp_path / name / "position_loss.json").read_text())["buckets"] for name in ("hf", "mcore"))
    assert len(hf) > 2 and [b["tokens"] for b in mcore] == [b["tokens"] for b in hf]
    for ours, theirs in zip(mcore, hf):
        if theirs["tokens"]:
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
            assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1.5 / theirs["tokens"])


def test_eval_qa_continues_after_a_kill(dataset, tmp_path, monkeypatch, capsys):
    """A killed `eval qa` keeps what it answered; the rerun asks only the rest."""
    from megatron_mmprolong.cli import evaluate
    from megatron_mmprolong.config import VLConfig

    store, tokenizer = dataset
    asked = []

    class Killed(Exception):
        pass

    def scripted(limit):
        def reply(prompt):
            if len(asked) == limit:
                raise Killed
            asked.append(prompt)
            return [tokenizer.im_end]
        return ScriptedModel(reply, tokenizer.image_pad)

    out = tmp_path / "qa.json"
    args = ["eval", "qa", "--hf-dir", str(tmp_path), "--data", store.prefix, "--out", str(out)]
    monkeypatch.setattr(evaluate, "evaluated_config", lambda _: VLConfig.preset("tiny-1k"))  # the scripted model's
    monkeypatch.setattr(evaluate, "eval_model", lambda _: (scripted(3), True, lambda: None))
    with pytest.raises(Killed):
        main(args)
    assert not out.exists() and len((tmp_path / "qa.json.answers.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(evaluate, "eval_model", lambda _: (scripted(len(store)), True, lambda: None))
    assert main(args) == 0
    assert len(asked) == len(set(asked)) == len(store)  # nothing asked twice
    assert [r["sample"] for r in json.loads(out.read_text())["results"]] == list(range(len(store)))
    assert not (tmp_path / "qa.json.answers.jsonl").exists()


# ---- context extension ------------------------------------------------------------------------

def test_renumber_pages():
    from megatron_mmprolong.eval.extension import renumber_pages

    assert renumber_pages("According to page 3, what is on Page 12? See pages 4 and 7, pages 1-2.", 5) == \
        "According to page 8, what is on Page 17? See pages 9 and 12, pages 6-7."
    assert renumber_pages("What weighs 731 kg?", 5) == "What weighs 731 kg?"


def test_extension_pads_to_each_length_and_keeps_the_evidence(tiny_train_data, tmp_path, capsys):
    from megatron_mmprolong.eval.extension import ExtensionConfig, run_extension_eval

    tokenizer_path, records, _ = tiny_train_data
    tokenizer = ChatTokenizer(tokenizer_path)
    original = {r["id"]: r for r in map(json.loads, Path(records).read_text().splitlines())}
    config = ExtensionConfig(str(tokenizer_path), (str(records),), lengths=(1024, 3072))
    out = tmp_path / "extend"
    with pytest.raises(ZeroDivisionError):  # prepared, then the "model" fails at once
        run_extension_eval(ScriptedModel(lambda _: 1 / 0, tokenizer.image_pad), config, out, progress=False)
    padded = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(padded) == 2 * len(original)
    for record in padded:
        source = original[record["meta"]["extension"]["source"]]
        shift = record["meta"]["extension"]["pages_before"]
        own = record["pages"][shift:shift + len(source["pages"])]
        assert [Path(p).name for p in own] == [Path(p).name for p in source["pages"]]  # the document, intact
        assert [Path(p).parent for p in own] == [Path(records).parent / Path(p).parent for p in source["pages"]]
        assert record["evidence_pages"] == [p + shift for p in source["evidence_pages"]]
        if "page " in source["question"]:
            assert f"page {source['evidence_pages'][0] + shift}," in record["question"]
    store = MultimodalStore(out / "data" / "extended")
    oracle = {tuple(p.tolist()): a.tolist() for p, a in (prompt_and_answer(store, i) for i in range(len(store)))}
    report = run_extension_eval(ScriptedModel(oracle.__getitem__, tokenizer.image_pad), config, out, progress=False)
    assert report["exact_match"] == 1.0 and report["samples"] == len(padded)
    for length in config.lengths:
        tokens = report["by_length"][str(length)]["context_tokens"]
        assert length - 150 < tokens < length + 150  # within about a page
    assert json.loads((out / "extension.json").read_text())["by_length"] == report["by_length"]
    from megatron_mmprolong.config import VLConfig

    (tmp_path / "hf").mkdir()
    VLConfig.preset("tiny-1k").save_hf(tmp_path / "hf")  # a config only: the settings are refused before weights load
    assert main(["eval", "extend", "--hf-dir", str(tmp_path / "hf"), "--records", str(records), "--tokenizer",
                 str(tokenizer_path), "--out", str(out), "--lengths", "1024"]) == 2
    assert "other settings (lengths)" in capsys.readouterr().err
