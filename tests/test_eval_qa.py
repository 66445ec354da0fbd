"""`mmprolong eval qa`: the scorer is right (an oracle scores 100%, a constant answer scores its
share of the samples) and the real transformers path runs on an exported checkpoint."""

import json

import numpy as np
import pytest
import torch

from megatron_mmprolong.cli import main
from megatron_mmprolong.data.chat import ChatTokenizer
from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.eval.dataset_qa import answer_questions, prompt_and_answer, score


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
