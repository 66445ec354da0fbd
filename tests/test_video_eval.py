"""eval video: the reference's prompts against a hand-written fixture, answer extraction and
scoring on hand-computed cases, bad data named by file and line, and an endpoint run through a
loopback server (vLLM's video_url part of JPEG frames) that resumes without resending, with the
MLVU judge fallback on a second loopback server."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_mmprolong.cli import main
from megatron_mmprolong.eval.video.answers import extract_letter
from megatron_mmprolong.eval.video.data import VideoQuestion
from megatron_mmprolong.eval.video.prompts import build_prompt
from megatron_mmprolong.eval.video.scores import score_entries
from megatron_mmprolong.eval.video.toy_data import (
    frame_number, right_letters, write_lvb_root, write_mlvu_root, write_videomme_root,
)
from megatron_mmprolong.serving.scripted_server import Fault, ScriptedChatServer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "video_prompts.json").read_text())


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("video")
    return {"videomme": write_videomme_root(base / "videomme"), "mlvu": write_mlvu_root(base / "mlvu"),
            "lvb": write_lvb_root(base / "lvb")}


def _question(benchmark, question, options):
    return VideoQuestion(benchmark, "x", "f line 1", Path("v.mp4"), question, tuple(options), "A", "short")


def test_prompts_are_the_reference_s_character_for_character():
    videomme = _question("videomme", "When demonstrating the Germany modern Christmas tree is initially decorated with "
                         "apples, candles and berries, which kind of the decoration has the largest number?",
                         ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."])
    mlvu = _question("mlvu", "What color is the main male character in the video?", ["Yellow", "Red", "Green", "Blue"])
    lvb = _question("lvb", "Which subtitles appear at the same time?",
                    ["promisc has come", "run away countless", "the lights go out", "hold on", "nothing"])
    for question in (videomme, mlvu, lvb):
        assert build_prompt(question).text() == FIXTURE[question.benchmark], question.benchmark


OPTIONS = ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."]


@pytest.mark.parametrize("reply, letter", [
    ("C", "C"), ("C.", "C"), ("(C)", "C"), (" C) Berries", "C"), ("The answer is D.", "D"),
    ("Best answer: C", "C"),  # the reference strips no "Best answer:" (missing comma) and reads B
    ("The best option is (A)", "A"),
    ("Based on the video, the decorations are berries.", "C"),  # the reference reads B, in "Based"
    ("Based on the video I cannot tell.", ""),  # the reference reads B
    ("I think it is B, the candles.", "B"),
    ("<think>maybe A</think>D", "D"),
    ("A long reply of many words that names no option letter at all here and so means none", ""),
    ("Apples and candles", ""),  # two options' texts: none
])
def test_the_letter_the_reply_means(reply, letter):
    assert extract_letter(reply, OPTIONS) == letter


def test_mlvu_replies_naming_an_option_text_and_five_options():
    assert extract_letter("1->2->3->4", ["4->3->2->1", "2->1->3->4", "1->3->2->4", "1->2->3->4"]) == "D"
    assert extract_letter("E", ["a", "b", "c", "d", "e"]) == "E" and extract_letter("E", ["a", "b", "c", "d"]) == ""


def _entry(benchmark, group, text, answer="A", error=None):
    return {"benchmark": benchmark, "group": group, "options": ["x", "y", "z", "w"], "answer": answer,
            "reply": {"text": text, "error": error, "finish_reason": "stop"}}


def test_scores_by_group_and_mlvu_m_avg_is_the_mean_of_its_tasks():
    entries = [_entry("videomme", "short", "A"), _entry("videomme", "short", "B"), _entry("videomme", "long", "A"),
               _entry("videomme", "medium", "", error="refused"),
               _entry("mlvu", "1_plotQA", "A"), _entry("mlvu", "1_plotQA", "A"), _entry("mlvu", "1_plotQA", "A"),
               _entry("mlvu", "2_needle", "B"), _entry("mlvu", "2_needle", "A", answer="@"),
               _entry("lvb", "15", "(A)"), _entry("lvb", "3600", "D")]
    report = score_entries(entries)["benchmarks"]
    video = report["videomme"]
    assert video["groups"] == {"short": 50.0, "medium": None, "long": 100.0}
    assert video["score"] == pytest.approx(200 / 3) and (video["samples"], video["scored"], video["refused"]) == (4, 3, 1)
    mlvu = report["mlvu"]
    assert mlvu["groups"]["1_plotQA"] == 100.0 and mlvu["groups"]["2_needle"] == 0.0
    assert mlvu["m_avg"] == 50.0 and mlvu["m_avg_pooled"] == 60.0 and mlvu["score"] == 50.0
    assert report["lvb"]["groups"] == {"15": 100.0, "60": None, "600": None, "3600": 0.0}


def _frames_of(body):
    part = next(p for p in body["messages"][0]["content"] if p["type"] == "video_url")
    header, data = part["video_url"]["url"].split(",", 1)
    assert header == "data:video/jpeg;base64"
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(f)))) for f in data.split(",")]


def _oracle(body):
    text = "".join(p.get("text", "") for p in body["messages"][0]["content"] if p["type"] == "text")
    for question, letter in right_letters().items():
        if question in text:
            if question == "Is anything unusual?":
                return Fault(status=400)
            if question == "What colour is the background?":  # MLVU: no letter, for the judge
                return "a cold hue, like the sea"
            return f"The answer is {letter}." if "colour" not in question else "Best answer: " + letter
    raise AssertionError(text)


def _judge(body):
    return "D" if "a cold hue" in body["messages"][0]["content"] else "Z"


def test_an_endpoint_run_sends_video_url_frames_scores_and_resumes(roots, tmp_path, capsys):
    out = tmp_path / "run"
    with ScriptedChatServer(_oracle, model="oracle") as server, ScriptedChatServer(_judge, model="judge") as judge:
        command = ["eval", "video", "--endpoint", server.url, "--model", "oracle", "--videomme-root",
                   str(roots["videomme"]), "--mlvu-root", str(roots["mlvu"]), "--lvb-root", str(roots["lvb"]),
                   "--out", str(out), "--max-video-tokens", "16"]
        assert main(command) == 0
        without_judge = json.loads((out / "scores.json").read_text())["benchmarks"]["mlvu"]
        sent = len(server.bodies)
        with_judge = [*command, "--judge-endpoint", judge.url, "--judge-model", "judge"]
        assert main(with_judge) == 0 and main(with_judge) == 0  # reruns send nothing, the judge is asked once
        assert len(server.bodies) == sent == 12 and len(judge.bodies) == 1
    # the rule finds no letter in one MLVU reply: wrong alone (plotQA 0 of 1), right by the judge's letter
    assert without_judge["groups"]["1_plotQA"] == 0.0 and without_judge["m_avg"] == pytest.approx(500 / 6)  # 6 tasks scored (one refused)
    assert without_judge["m_avg_pooled"] == pytest.approx(500 / 6)
    asked = judge.bodies[0]["messages"][0]["content"]
    assert "Question: What colour is the background??\nOptions: There are several options: \nA. Yellow\nB. Red\n" \
           "C. Green\nD. Blue\n\nAnswer: a cold hue, like the sea\nYour output: " in asked
    body = next(b for b in server.bodies if "Which colour fills" in json.dumps(b))
    assert body["temperature"] == 0 and body["max_tokens"] == 128
    assert body["mm_processor_kwargs"] == {"fps": 1.0, "do_sample_frames": False, "min_pixels": 56 * 84,
                                           "max_pixels": 56 * 84}
    frames = _frames_of(body)  # 4 s at 8 fps: 4 frames, 1 a second; 16 tokens: 8 a group, 112x84 -> 84x56 (2x3 merged patches)
    assert [frame_number(f) for f in frames] == [0, 10, 21, 31] and frames[0].shape == (56, 84, 3)
    scores = json.loads((out / "scores.json").read_text())["benchmarks"]
    assert scores["videomme"]["score"] == 100.0 and scores["lvb"]["score"] == 100.0
    assert scores["videomme"]["groups"] == {"short": 100.0, "medium": 100.0, "long": 100.0}
    assert scores["mlvu"]["refused"] == 1 and scores["mlvu"]["m_avg"] == 100.0 and scores["mlvu"]["judged"] == 1
    entry = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert entry["frames"] == 4 and entry["video_tokens"] == 12 and entry["frame_size"] == [56, 84]
    table = capsys.readouterr().out
    assert "Video-MME" in table and "67.78" in table and "M-avg" in table
    assert Image.open(out / "scores.png").size[0] == 3 * 360
    assert main([*command[:-2], "--max-video-tokens", "24"]) == 2  # another protocol, the same folder
    assert "other settings (sampling)" in capsys.readouterr().err


def test_bad_data_is_named_by_file_and_line(roots, tmp_path, capsys):
    import shutil

    common = ["eval", "video", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "o")]
    lvb = shutil.copytree(roots["lvb"], tmp_path / "lvb")
    records = json.loads((lvb / "lvb_val.json").read_text())
    records[1]["correct_choice"] = 7
    (lvb / "lvb_val.json").write_text(json.dumps(records))
    assert main([*common, "--lvb-root", str(lvb)]) == 2
    assert f"{lvb / 'lvb_val.json'} item 2: correct_choice 7 is outside its 4 candidates" in capsys.readouterr().err
    mlvu = shutil.copytree(roots["mlvu"], tmp_path / "mlvu")
    (mlvu / "MLVU" / "video" / "4_count" / "count_1.mp4").unlink()
    assert main([*common, "--mlvu-root", str(mlvu)]) == 2
    assert f"4_count.json item 1: its video {mlvu / 'MLVU/video/4_count/count_1.mp4'} is not there" in \
        capsys.readouterr().err
    (mlvu / "MLVU" / "video" / "4_count" / "count_1.mp4").write_bytes(b"no video")
    assert main([*common, "--mlvu-root", str(mlvu)]) == 2
    assert "count_1.mp4: cannot be read as a video" in capsys.readouterr().err
    assert main([*common, "--videomme-root", str(tmp_path / "nothing")]) == 2
    assert "the Video-MME folder is not there" in capsys.readouterr().err
    videomme = shutil.copytree(roots["videomme"], tmp_path / "videomme")
    import pyarrow.parquet as pq

    path = videomme / "videomme" / "test-00000-of-00001.parquet"
    table = pq.read_table(path).to_pylist()
    table[2]["answer"] = "E"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table), path)
    assert main([*common, "--videomme-root", str(videomme)]) == 2
    assert f"{path} row 3: answer 'E' is not a letter A-D" in capsys.readouterr().err
