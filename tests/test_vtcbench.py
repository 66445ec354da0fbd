"""eval vtcbench: VTCBench-Wild's released layout read and checked, the reference's prompts, the
official containsAll, the Memory judge, Overall weighted by samples, and the backends (a loopback
endpoint, transformers on a tiny random checkpoint) with journaled, resumable replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_mmprolong.cli import main
from megatron_mmprolong.eval.vtcbench.data import DataRoot, ImageReader, read_split
from megatron_mmprolong.eval.vtcbench.judge import OFFICIAL_PROMPT, final_answer, load_judge_prompt, verdict
from megatron_mmprolong.eval.vtcbench.metrics import contains_all, vlmevalkit_score
from megatron_mmprolong.eval.vtcbench.prompts import INSTRUCTIONS, chat_request
from megatron_mmprolong.eval.vtcbench.toy_data import (
    SAMPLES, render_page, split_rows, stand_in_judge, write_parquet, write_toy_data_root,
)
from megatron_mmprolong.serving.scripted_server import Fault, ScriptedChatServer
from multiprocess import free_port

FIXTURE = Path(__file__).parent / "fixtures" / "vtcbench_prompts.json"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_toy_data_root(tmp_path_factory.mktemp("vtcbench") / "VTCBench")


# ---- the released layout ------------------------------------------------------------------------

def test_both_released_layouts_give_the_same_samples_and_pages(data_root, tmp_path):
    folders = write_toy_data_root(tmp_path / "folders", layout="folders")
    card = DataRoot.open(data_root)
    assert card.split_files("Memory") == [data_root / "data" / "Memory-00000-of-00001.parquet"]
    reader = ImageReader(keep=1)
    for split, rows in SAMPLES.items():
        ours, theirs = read_split(card, split), read_split(DataRoot.open(folders), split)
        assert [(s.problem, s.answers, s.images, s.row) for s in ours] == \
               [(s.problem, s.answers, s.images, s.row) for s in theirs] == \
               [(q, tuple(a), 2 if i == 0 else 1, i + 1) for i, (q, a, _) in enumerate(rows)]
        # one row per row group in the toy files: each sample's pages come from its own group
        assert [reader.images(s) for s in ours] == [[p["bytes"] for p in r["images"]] for r in split_rows(split)]
    assert [s.index for s in read_split(card, "Retrieval", max_samples=1)] == [0]
    # the card's configs decide where a split's files are, as datasets.load_dataset reads them
    moved = write_toy_data_root(tmp_path / "moved")
    (moved / "data" / "Memory-00000-of-00001.parquet").rename(moved / "memory-shard-0.parquet")
    (moved / "README.md").write_text((moved / "README.md").read_text().replace("data/Memory-*", "memory-shard-*"))
    assert DataRoot.open(moved).split_files("Memory") == [moved / "memory-shard-0.parquet"]
    assert len(read_split(DataRoot.open(moved), "Memory")) == 2


def _broken(tmp_path, change) -> Path:
    root = write_toy_data_root(tmp_path / "broken")
    rows = split_rows("Reasoning")
    change(rows)
    write_parquet(root / "data" / "Reasoning-00000-of-00001.parquet", rows)
    return root


def _no_images(rows):
    rows[1]["images"] = []


def _gif_page(rows):
    rows[0]["images"][1]["bytes"] = b"GIF89a" + bytes(20)


@pytest.mark.parametrize("change, reason", [
    (lambda rows: rows[1].update(problem=" "), "row 2: no question"),
    (lambda rows: rows[0].update(answers=[]), "row 1: no gold answer"),
    (lambda rows: rows[1].update(answers=["Katie", ""]), "row 2: an empty gold answer"),
    (_no_images, "row 2: no page image"),
    (_gif_page, "row 1: image 2 is not JPEG or PNG bytes"),
])
def test_a_bad_row_is_named_by_file_and_row_before_a_model_loads(tmp_path, capsys, change, reason):
    root = _broken(tmp_path, change)
    command = ["eval", "vtcbench", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--data-root", str(root),
               "--out", str(tmp_path / "out")]
    assert main(command) == 2
    assert f"{root / 'data' / 'Reasoning-00000-of-00001.parquet'}: {reason}" in capsys.readouterr().err


def test_missing_and_unreadable_files_are_named(data_root, tmp_path, capsys):
    common = ["eval", "vtcbench", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "o")]
    assert main([*common, "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*common, "--data-root", str(empty), "--splits", "Memory"]) == 2
    assert f"{empty}: no parquet file of split Memory" in capsys.readouterr().err
    root = write_toy_data_root(tmp_path / "cut")
    shard = root / "data" / "Memory-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    assert main([*common, "--data-root", str(root)]) == 2
    assert f"{shard}: not a readable parquet file" in capsys.readouterr().err
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["q"], "answers": [["a"]]}), shard)
    assert main([*common, "--data-root", str(root)]) == 2
    assert f"{shard}: no column images" in capsys.readouterr().err


# ---- prompts and scoring ------------------------------------------------------------------------

def test_prompts_are_the_reference_s_character_for_character(data_root):
    expected = json.loads(FIXTURE.read_text())
    for mode in ("vlmevalkit", "official"):
        assert INSTRUCTIONS[mode] == expected[mode]
    assert OFFICIAL_PROMPT == expected["judge"]
    sample = read_split(DataRoot.open(data_root), "Retrieval")[0]
    pages = ImageReader().images(sample)
    request = chat_request(sample, pages)
    content = request.messages[0]["content"]
    assert len(request.messages) == 1 and request.messages[0]["role"] == "user"
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"]  # the pages, then one text
    assert content[0]["image_url"]["url"].startswith("data:image/jpeg;base64,/9j/")
    assert content[2]["text"] == expected["vlmevalkit"]["Retrieval"] + sample.problem
    assert request.temperature == 0 and request.max_tokens == 2048
    assert chat_request(sample, pages, "official").messages[0]["content"][2]["text"] == \
        expected["official"]["Retrieval"] + sample.problem


@pytest.mark.parametrize("reply, answers, ours, vlmevalkit_retrieval, vlmevalkit_reasoning", [
    ("The magic numbers are 9199619 and 1202641.", ["9199619", "1202641"], 1.0, 1.0, 1.0),
    ("The magic number is 9199619.", ["9199619", "1202641"], 0.5, 1.0, 0.5),
    ("YUKI", ["Yuki"], 1.0, 0.0, 0.0),  # the official metric lower-cases both
    ("<think>Yuki, or Katie?</think>Katie", ["Yuki"], 0.0, 1.0, 1.0),  # and drops the thinking
    ("<think>a\nb</think> yuki <think>c</think>", [" Yuki "], 1.0, 0.0, 0.0),  # across lines; gold stripped
    ("", ["7 May 2023"], 0.0, 0.0, 0.0),
])
def test_contains_all_as_the_benchmark_s_metric_py(reply, answers, ours, vlmevalkit_retrieval, vlmevalkit_reasoning):
    assert contains_all(reply, answers) == ours
    assert vlmevalkit_score("Retrieval", reply, answers) == vlmevalkit_retrieval
    assert vlmevalkit_score("Reasoning", reply, answers) == vlmevalkit_reasoning


def test_the_judge_reads_as_llm_judge_py(tmp_path):
    assert final_answer("<think>hmm</think>  a sunset ") == "a sunset"
    assert final_answer("I said </think> 7 May") == "7 May" and final_answer(" plain ") == "plain"
    assert [verdict(t) for t in ("A", " B\n", "C", "a", "A.", "The answer is A", "")] == \
           ["A", "B", "C", None, None, None, None]
    message = load_judge_prompt().message("When?", ("7 May 2023", "May 7"), "<think>x</think>on 7 May 2023")
    assert ("\n<Original Question Begin>: When? \n<Original Question End> \n<Standard Answer Begin>: 7 May 2023, May 7 "
            "\n<Standard Answer End> \n<Candidate's Answer Begin>: on 7 May 2023 \n<Candidate's Answer End> "
            "\nJudging the correctness of the candidate's answer:") in message
    own = tmp_path / "judge.txt"
    own.write_text("Q: $question G: $gold_answer R: $llm_response")
    assert load_judge_prompt(own).message("q", ("a", "b"), "r") == "Q: q G: a, b R: r"
    own.write_text("Q: $question $answer")
    with pytest.raises(ValueError, match="placeholder"):
        load_judge_prompt(own)


def _entry(key, split, text, answers, error=None):
    return {"key": key, "split": split, "question": "q", "answers": answers,
            "reply": {"text": text, "error": error, "finish_reason": "stop"}}


def test_overall_is_weighted_by_samples_and_memory_needs_every_verdict():
    from megatron_mmprolong.eval.vtcbench.scores import score_predictions

    entries = [_entry(f"r{i}", "Retrieval", "42", ["42"]) for i in range(3)]  # 3 x 1
    entries += [_entry("s0", "Reasoning", "", ["Yuki"], error="HTTP 400: too long")]  # refused: 0
    entries += [_entry("m0", "Memory", "7 May", ["7 May"]), _entry("m1", "Memory", "June", ["7 May"]),
                _entry("m2", "Memory", "May", ["7 May"])]
    report = score_predictions(entries, {"m0": "A", "m1": " B\n"}, {"model": "judge"})  # m2: no verdict
    assert {s: c["score"] for s, c in report["splits"].items()} == {"Retrieval": 100.0, "Reasoning": 0.0,
                                                                    "Memory": 50.0}
    # (3 + 0 + 1) / 6 scored samples, not the mean of the three splits (50)
    assert report["overall"]["score"] == pytest.approx(400 / 6) and report["overall"]["samples"] == 6
    assert report["splits"]["Memory"]["judge_missing"] == 1 and not report["overall"]["complete"]
    assert report["splits"]["Reasoning"]["refused"] == 1
    report = score_predictions(entries, {"m0": "A", "m1": "B", "m2": "C"}, {"model": "judge"})
    assert report["overall"]["complete"] and report["overall"]["score"] == pytest.approx(400 / 7)


# ---- runs -----------------------------------------------------------------------------------------

REPLIES = {  # question -> the reply (hand-scored in the test below)
    SAMPLES["Retrieval"][0][0]: "The magic number is 9199619.",  # 1 of 2 golds: 0.5 (VLMEvalKit's any: 1)
    SAMPLES["Retrieval"][1][0]: "<think>6822442?</think>I cannot tell.",  # 0 (VLMEvalKit keeps the thinking: 1)
    SAMPLES["Reasoning"][0][0]: "YUKI",  # 1 (VLMEvalKit is case-sensitive: 0)
    SAMPLES["Reasoning"][1][0]: Fault(status=400),  # refused by the server: 0, counted
    SAMPLES["Memory"][0][0]: "7 May 2023",  # judged "A": 1
    SAMPLES["Memory"][1][0]: "a mountain",  # the judge's reply is unreadable: 0, as llm_judge.py's "C"
}


def _model(body):
    question = body["messages"][0]["content"][-1]["text"].rsplit("Question: ", 1)[1]
    return REPLIES[question]


def _judge(body):
    return "Verdict: B" if "a mountain" in body["messages"][0]["content"] else stand_in_judge(body)


def test_an_endpoint_run_scores_by_hand_and_a_rerun_sends_only_what_is_missing(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    with ScriptedChatServer(_model, model="m") as model, ScriptedChatServer(_judge, model="judge") as judge:
        command = ["eval", "vtcbench", "--endpoint", model.url, "--model", "m", "--data-root", str(data_root),
                   "--out", str(out), "--judge-endpoint", judge.url, "--judge-model", "judge"]
        assert main(command) == 0
        assert (len(model.bodies), len(judge.bodies)) == (6, 2)
        judge_body = judge.bodies[0]
        assert main(command) == 0  # nothing is sent again, to either server
        assert (len(model.bodies), len(judge.bodies)) == (6, 2)
        lines = (out / "predictions.jsonl").read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["question"] != SAMPLES["Memory"][1][0]]
        (out / "predictions.jsonl").write_text("".join(line + "\n" for line in kept))
        assert main(command) == 0  # only the missing reply; its verdict is in judge.jsonl already
        assert (len(model.bodies), len(judge.bodies)) == (7, 2)
        assert model.bodies[-1]["messages"][0]["content"][-1]["text"].endswith(SAMPLES["Memory"][1][0])
    assert judge_body["temperature"] == 0 and judge_body["max_tokens"] == 10
    scores = json.loads((out / "scores.json").read_text())
    splits = scores["splits"]
    assert {s: (c["score"], c["vlmevalkit"]) for s, c in splits.items()} == {
        "Retrieval": (25.0, 100.0), "Reasoning": (50.0, 0.0), "Memory": (50.0, None)}
    assert splits["Reasoning"]["refused"] == 1 and splits["Memory"]["verdicts"] == {
        "A": 1, "B": 0, "C": 0, "unreadable": 1}
    overall = scores["overall"]
    assert overall["score"] == pytest.approx(250 / 6) and overall["vlmevalkit"] == pytest.approx(50.0)
    assert overall["complete"] and overall["samples"] == 6
    assert scores["run"]["sent"] == 1 and scores["run"]["journaled"] == 5
    settings = json.loads((out / "vtcbench_config.json").read_text())  # VLMEvalKit's Qwen2.5-VL page sizes
    assert (settings["min_pixels"], settings["max_pixels"], settings["prompts"], settings["max_new_tokens"]) == \
           (1280 * 28 * 28, 16384 * 28 * 28, "vlmevalkit", 2048)
    table = capsys.readouterr().out
    assert "Retrieval          2    25.00           100.00" in table
    assert "Overall            6    41.67            50.00" in table
    assert Image.open(out / "scores.png").size[0] > 400

    rescored = tmp_path / "rescored"  # no judge: Memory unscored, Overall over the other two
    assert main(["eval", "vtcbench-score", "--predictions", str(out / "predictions.jsonl"), "--out", str(rescored),
                 "--compare", str(out)]) == 0
    again = json.loads((rescored / "scores.json").read_text())
    assert again["splits"]["Memory"]["score"] is None and again["overall"]["score"] == pytest.approx(150 / 4)
    assert not again["overall"]["complete"] and again["overall"]["splits"] == ["Retrieval", "Reasoning"]
    assert "Overall*           4    37.50            50.00\n* over Retrieval + Reasoning only" in capsys.readouterr().out
    # another protocol is refused in this folder
    assert main(["eval", "vtcbench", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--data-root",
                 str(data_root), "--out", str(out), "--prompts", "official"]) == 2
    assert "other settings (prompts)" in capsys.readouterr().err


def test_a_transformers_run_on_a_tiny_random_checkpoint_resumes(data_root, tmp_path):
    from megatron_mmprolong.config import Qwen25VLConfig
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    hf = write_random_hf_checkpoint(Qwen25VLConfig.preset("tiny-1k"), tmp_path / "hf", seed=3)
    write_tiny_tokenizer(hf)
    command = ["eval", "vtcbench", "--hf-dir", str(hf), "--data-root", str(data_root), "--out", str(tmp_path / "run"),
               "--splits", "Retrieval", "Memory", "--max-samples", "1", "--max-new-tokens", "6", "--min-pixels", "3136"]
    assert main(command) == 0
    entries = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [(e["split"], e["row"], e["images"]) for e in entries] == [("Retrieval", 1, 2), ("Memory", 1, 2)]
    assert all(e["reply"]["error"] is None and e["reply"]["completion_tokens"] > 0 for e in entries)
    # the pages reach the model before the text: 12 vision tokens per 84 x 112 page and its two markers
    from megatron_mmprolong.data.chat import ChatTokenizer
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.eval.hf_chat import encode_request

    sample = read_split(DataRoot.open(data_root), "Retrieval")[0]
    text_only = chat_request(sample, [])
    ids, _, _ = encode_request(ChatTokenizer(hf), text_only, ImageParams.for_family("qwen2_5_vl", min_pixels=3136))
    assert entries[0]["reply"]["prompt_tokens"] == len(ids) + 2 * (12 + 2)
    assert main(command) == 0
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert scores["run"]["sent"] == 0 and scores["run"]["journaled"] == 2
    assert render_page("x")[:3] == b"\xff\xd8\xff"


def test_transformers_and_megatron_at_cp2_give_the_same_replies(data_root, tmp_path):
    """The same pages and question through transformers and through this project's model on its
    Megatron conversion at CP2 (two torchrun ranks, rank 0 writing): the same replies."""
    import os
    import subprocess
    import sys

    from megatron_mmprolong.config import ParallelConfig, Qwen25VLConfig
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    hf = write_random_hf_checkpoint(Qwen25VLConfig.preset("tiny-1k"), tmp_path / "hf", seed=3)
    write_tiny_tokenizer(hf)
    hf_to_mcore(hf, tmp_path / "mcore", ParallelConfig(), progress=False)
    common = ["eval", "vtcbench", "--data-root", str(data_root), "--splits", "Reasoning", "--max-samples", "1",
              "--max-new-tokens", "10", "--min-pixels", "3136"]
    assert main([*common, "--hf-dir", str(hf), "--out", str(tmp_path / "hf-run")]) == 0
    port = free_port()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                    "-m", "megatron_mmprolong.cli", *common, "--mcore-dir", str(tmp_path / "mcore"), "--cp", "2",
                    "--tokenizer", str(hf), "--dtype", "fp32", "--out", str(tmp_path / "mcore-run")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                   stdout=subprocess.DEVNULL)

    def replies(run):
        lines = (tmp_path / run / "predictions.jsonl").read_text().splitlines()
        return {e["row"]: e["reply"] for e in map(json.loads, lines)}

    ours, reference = replies("mcore-run"), replies("hf-run")
    assert len(reference) == 1 and all(len(r["text"]) > 3 and r["error"] is None for r in reference.values())
    assert {k: r["text"] for k, r in ours.items()} == {k: r["text"] for k, r in reference.items()}
    assert {k: r["prompt_tokens"] for k, r in ours.items()} == {k: r["prompt_tokens"] for k, r in reference.items()}


def test_strict_servers_take_the_requests_as_they_are(data_root, tmp_path):
    """A `transformers serve`-like model server (unknown fields refused) and a hosted reasoning
    judge (max_tokens refused: max_completion_tokens instead) both answer every request."""
    from megatron_mmprolong.serving.scripted_server import fastapi_strict, hosted_reasoning_model

    def right(body):
        question = body["messages"][0]["content"][-1]["text"].rsplit("Question: ", 1)[1]
        return " and ".join(next(a for rows in SAMPLES.values() for q, a, _ in rows if q == question))

    with ScriptedChatServer(fastapi_strict(right), model="m") as model, \
            ScriptedChatServer(hosted_reasoning_model(stand_in_judge), model="judge") as judge:
        assert main(["eval", "vtcbench", "--endpoint", model.url, "--model", "m", "--data-root", str(data_root),
                     "--out", str(tmp_path / "run"), "--judge-endpoint", judge.url, "--judge-model", "judge"]) == 0
        assert judge.bodies[-1]["max_completion_tokens"] == 10 and "max_tokens" not in judge.bodies[-1]
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert scores["overall"] == {"score": 100.0, "vlmevalkit": 100.0, "samples": 6,
                                 "splits": ["Retrieval", "Reasoning", "Memory"], "complete": True}
