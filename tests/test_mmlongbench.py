"""`mmprolong eval mmlongbench` and `eval score`: the harness's prompts character for character,
its sampling and rule-based metrics on hand-computed cases, the judge's verdicts, contexts beyond
128K, and the three backends on a small data root in the released layout (pages rendered here,
answers known): a loopback server that speaks the protocol (and a judge), transformers, and this
project's model on a Megatron checkpoint at CP2, which answers as transformers does."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_mmprolong.cli import main
from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.eval.mmlongbench.data import DataRoot, Sample, harness_selection, read_released
from megatron_mmprolong.eval.mmlongbench.metrics import docqa_score, niah_score, parsed_reply
from megatron_mmprolong.eval.mmlongbench.prompts import build_prompt, chat_request
from megatron_mmprolong.eval.mmlongbench.toy_data import (
    DOC_QA, NIAH, render_page, stand_in_judge, write_jsonl, write_toy_data_root,
)
from megatron_mmprolong.serving.scripted_server import Fault, ScriptedChatServer
from multiprocess import free_port

FIXTURE = Path(__file__).parent / "fixtures" / "mmlongbench_prompts.json"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_toy_data_root(tmp_path_factory.mktemp("mmlb"))


# ---- the harness's prompts, sampling and metrics --------------------------------------------

def _fixture_samples():
    pages = ["mmlongdoc/aguidetoindonesia2021/aguidetoindonesia2021_page3.png",
             "mmlongdoc/aguidetoindonesia2021/aguidetoindonesia2021_page4.png", "mmlongdoc/4027862/4027862_page0.png"]
    doc = Sample("mmlongdoc", 8, 1, {"id": "mmlongdoc_0", "doc_name": "aguidetoindonesia2021", "answer": "868.3",
                                     "question": "What is Indonesia's GDP in billions of dollars?",
                                     "answer_format": "Float", "page_list": pages})
    ctxs = [{"text": "A harbour at dawn. <image> Boats leave early."}, {"text": "The market opens at nine."}]
    mc = Sample("retrieval-image", 8, 1, {"id": "r0", "ctxs": ctxs, "image_list": ["h.png"], "answer": 1,
                                          "question": "Which of the following images appears in the document?",
                                          "choices_image": ["a.png", "b.png", "c.png"]})
    count = Sample("counting-text", 8, 1, {"id": "c0", "ctxs": ctxs, "image_list": ["h.png"], "answer": [1, 2],
                                           "question": "How many needles are in each image? Answer with a list "
                                                       "such as [1, 2]."})
    return doc, mc, count


def test_prompts_match_the_harness_character_for_character():
    expected = json.loads(FIXTURE.read_text())
    doc, mc, count = _fixture_samples()
    assert build_prompt(doc).text == expected["docqa_v1.1"]  # the default: the paper's and the harness's current
    assert build_prompt(doc, "v1.0").text == expected["docqa_v1.0"]
    assert build_prompt(mc).text == expected["retrieval-image"]
    assert build_prompt(mc).images == ["h.png", "a.png", "b.png", "c.png"]
    assert build_prompt(count).text == expected["counting-text"]
    assert build_prompt(doc).question.startswith("Based on Document aguidetoindones, answer the following question. ")


def test_page_labels_default_to_v1_1_on_the_command_line_and_in_the_config():
    from megatron_mmprolong.cli import build_parser
    from megatron_mmprolong.eval.mmlongbench.run import MMLongBenchConfig

    args = build_parser().parse_args(["eval", "mmlongbench", "--endpoint", "http://x/v1", "--model", "m",
                                      "--data-root", "d", "--out", "o"])
    assert args.page_labels == MMLongBenchConfig("m").page_labels == "v1.1"
    assert build_parser().parse_args(["eval", "mmlongbench", "--endpoint", "http://x/v1", "--model", "m",
                                      "--data-root", "d", "--out", "o", "--page-labels", "v1.0"]).page_labels == "v1.0"


def test_the_request_is_the_chat_template_with_the_answer_prefilled(data_root, qwen_tokenizer):
    """The tokens the in-process backends feed the model equal Qwen2.5-VL's chat template
    rendered as the harness's transformers runner renders it (continue_final_message after
    "Answer:"), image placeholders expanded; the request carries the same flag for vLLM."""
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.eval.hf_chat import encode_request

    root = DataRoot.open(data_root)
    sample = harness_selection(read_released(root, "mmlongdoc", 8))[0]
    request = chat_request(build_prompt(sample), root)
    assert request.messages[-1] == {"role": "assistant", "content": "Answer:"} and request.temperature == 0
    assert request.extra == {"continue_final_message": True, "add_generation_prompt": False}
    assert request.max_tokens == 128
    ids, images, grids = encode_request(qwen_tokenizer, request, ImageParams())
    text = build_prompt(sample).text
    content = [{"type": "image"} if piece == "<image>" else {"type": "text", "text": piece}
               for piece in text.replace("<image>", "\0<image>\0").split("\0") if piece]
    rendered = qwen_tokenizer.hf.apply_chat_template(
        [{"role": "user", "content": content}, {"role": "assistant", "content": "Answer:"}],
        tokenize=False, continue_final_message=True)
    per_image = grids[0][1] * grids[0][2] // 4
    expected = qwen_tokenizer.hf(rendered.replace("<|image_pad|>", "<|image_pad|>" * per_image),
                                 add_special_tokens=False).input_ids
    assert rendered.endswith("<|im_start|>assistant\nAnswer:") and len(images) == 3
    assert ids == expected


def test_sampling_is_the_harness_s(tmp_path):
    """Document QA: a seed-42 shuffle, its first 100 (a smaller limit takes a prefix of the same
    order); MM-NIAH: 50 ids drawn from the sorted ids, every row of a drawn id, in file order."""
    docs = [Sample("slidevqa", 8, i + 1, {"id": f"s{i}"}) for i in range(150)]
    chosen = harness_selection(docs)
    assert len(chosen) == 100 == len({s.id for s in chosen}) and chosen != docs[:100]
    assert harness_selection(docs, 10) == chosen[:10] and harness_selection(docs, seed=1) != chosen
    rows = [Sample("counting-text", 8, i + 1, {"id": f"n{i % 60:02d}"}) for i in range(120)]
    picked = harness_selection(rows)
    ids = {s.id for s in picked}
    assert len(ids) == 50 and len(picked) == 100 and [s.line for s in picked] == sorted(s.line for s in picked)
    assert all(s.id in ids for s in rows if s.id in ids) and harness_selection(rows) == picked


@pytest.mark.parametrize("reply, answer, answer_format, score", [
    ("There were 12 boats.", "12", "Integer", 1.0),
    ("About 12.5 boats", "12", "Integer", 0.0),  # no integer 12 in the reply
    ("1,366 kg", "1366", "Integer", 1.0),
    ("25%", "0.25", "Float", 1.0),  # x100
    ("0.45", "45", "Float", 1.0),  # /100
    ("12.6", "12.5", "Float", 1.0),  # within 1%
    ("12.8", "12.5", "Float", 0.0),
    ("the amber gecko lizard", "Amber Gecko", "String", 0.8),  # token F1: P 2/3, R 1
    ("see https://x.org/a for it", "https://x.org/a", "String", 1.0),  # URLs verbatim
    ("May 1, 2019", "2019-05-01", "String", 0.0),  # dates verbatim
    ("Not answerable.", "Not answerable", "None", 1.0),
    ("42", "Not answerable", "None", 0.0),
    ("apple and 12", '["apple", "banana", 12]', "List", 0.7),  # merged text F1 0.4, the integer 1
    ("page 3", '["page 3", "page 7"]', "List", 0.5),  # "page ..." items matched verbatim, one by one
])
def test_document_qa_rules(reply, answer, answer_format, score):
    assert docqa_score(answer, parsed_reply(reply), answer_format) == pytest.approx(score)


@pytest.mark.parametrize("dataset, reply, answer, score", [
    ("retrieval-text", "The Blue Cat!", "blue cat", 1.0),
    ("retrieval-text", "a grey dog", ["blue cat", "bluecat"], 0.0),
    ("counting-text", "[2, 1]", [1, 2], 1.0),  # the sums agree
    ("counting-image", "1 and 3", [1, 2], 0.0),
    # the harness's extract_cnt_list: json.loads reads 1e400 as inf, and turn_int_list's bare except
    # drops the OverflowError of int(inf): the counts are [2], whose sum is the answer's
    ("counting-text", "[2, 1e400]", [1, 1], 1.0),
    ("counting-image", "[2, 1e400]", [1, 2], 0.0),
    ("retrieval-image", "B", 1, 1.0),
    ("reasoning-image", "The answer is (C).", 1, 0.0),
])
def test_mm_niah_rules(dataset, reply, answer, score):
    assert niah_score(dataset, reply, answer) == score


def test_the_reply_is_parsed_after_its_answer_prefix():
    assert parsed_reply(" Answer: 42 ") == "42" and parsed_reply("42\nmore") == "42\nmore"


def test_judge_verdicts_are_read_as_the_harness_reads_them(tmp_path):
    from megatron_mmprolong.eval.mmlongbench.judge import list_verdict, load_judge_prompts, single_verdict

    assert single_verdict("[Scoring Rationale]: same.\n[Score]: 1 point\n[JSON]:\n{\"answer_score\": 1}") == 1
    assert single_verdict('[JSON]: {"answer_score": 0}') == 0 and single_verdict("no idea") == 0
    reply = '[Rationale]: two of four.\n[JSON]:\n{"student_answer_count": 3, "covered_count": 2}'
    assert list_verdict(reply, '["a", "b", "c", "d"]') == pytest.approx(4 / 7)  # P 2/3, R 1/2
    assert list_verdict('{"student_answer_count": 2, "covered_count": 0}', '["a"]') == 0
    (Path(tmp_path) / "bad.yaml").write_text("version: x\nsingle: s\nlist: l\ncase: $answer\n")
    with pytest.raises(EvalError, match=r"case has an unknown .*\$question, \$reference and \$prediction"):
        load_judge_prompts(Path(tmp_path) / "bad.yaml")
    prompts = load_judge_prompts()
    message = prompts.message("Q?", '["a"]', "a", True)
    assert message.startswith(prompts.list) and "<Question>: Q?\n<Standard Answer>: [\"a\"]\n<Student Answer>: a" in message


# ---- the three backends on a data root in the released layout -------------------------------

ANSWERS = {q: a for rows in DOC_QA.values() for q, a, _ in rows} | {
    q.replace("<image>", ""): a for rows in NIAH.values() for q, a in rows}  # images travel apart from the text


def _question(body) -> str:
    text = "".join(p.get("text", "") for p in body["messages"][0]["content"])
    asked = text.rsplit("Question: ", 1)[1].split("\nA. ")[0]
    return asked.split("answer the following question. ")[-1]


def _oracle(body):
    """Right on every sample but two: a refused request and a reply cut at the length limit."""
    question = _question(body)
    if question == "What year?":
        return Fault(status=400)
    if question == "Who signed the report?":
        return Fault(text=" Amber", finish_reason="length")
    answer = ANSWERS[question]
    if isinstance(answer, int):
        return f" {'ABC'[answer]}"
    if question.startswith("Which two"):
        return " apple, banana"
    return f" {json.dumps(answer) if isinstance(answer, list) else answer}"


def test_an_endpoint_run_with_a_judge_counts_refusals_and_resumes(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    with ScriptedChatServer(_oracle, model="oracle") as model, ScriptedChatServer(stand_in_judge, model="judge") as judge:
        command = ["eval", "mmlongbench", "--endpoint", model.url, "--model", "oracle", "--data-root", str(data_root),
                   "--out", str(out), "--lengths", "8", "--judge-endpoint", judge.url,
                   "--judge-model", "judge"]
        assert main(command) == 0
        sent, judged = len(model.bodies), len(judge.bodies)
        body = model.bodies[0]
        assert main(command) == 0  # a rerun sends nothing to either server
        assert (len(model.bodies), len(judge.bodies)) == (sent, judged)
    assert sent == 18 and judged == 5  # 6 document-QA samples less the refused one
    assert body["messages"][1] == {"role": "assistant", "content": "Answer:"} and body["temperature"] == 0
    assert body["continue_final_message"] is True and body["max_tokens"] == 128
    assert sum(p["type"] == "image_url" for p in body["messages"][0]["content"]) == 3
    scores = json.loads((out / "scores.json").read_text())
    doc, niah = scores["categories"]["docqa"], scores["categories"]["niah"]
    assert doc["datasets"]["mmlongdoc"]["8"] == {"samples": 2, "scored": 2, "refused": 0, "empty": 0, "truncated": 1,
                                                  "rule": pytest.approx(250 / 3), "judge": 50.0, "judge_missing": 0}
    # "Amber" for "Amber Gecko": token F1 2/3 by rule, 0 by the judge; "Not answerable" right
    assert doc["datasets"]["slidevqa"]["8"]["refused"] == 1 and doc["datasets"]["slidevqa"]["8"]["rule"] == 100.0
    assert doc["datasets"]["longdocurl"]["8"]["judge"] == 100.0
    assert doc["avg"]["8"] == {"judge": pytest.approx(250 / 3), "rule": pytest.approx(850 / 9)}
    assert {d: c["8"]["rule"] for d, c in niah["datasets"].items()} == dict.fromkeys(NIAH, 100.0)
    assert niah["avg"]["8"] == {"judge": None, "rule": 100.0}
    assert scores["replies"] == {"samples": 18, "scored": 17, "refused": 1, "empty": 0, "truncated": 1}
    table = capsys.readouterr().out
    assert "MMLongBench document QA (LLM judge / rule-based)" in table and "AVG" in table
    assert "18 replies: 17 scored, 1 refused by the backend, 0 empty, 1 cut at the length limit" in table
    assert Image.open(out / "scores.png").size[0] > 800  # two panels

    rescored = tmp_path / "rescored"
    assert main(["eval", "score", "--predictions", str(out / "predictions.jsonl"), "--out", str(rescored),
                 "--compare", str(out), "--train-length", "8192"]) == 0
    again = json.loads((rescored / "scores.json").read_text())
    assert again["judge"] is None and again["categories"]["docqa"]["avg"]["8"]["rule"] == pytest.approx(850 / 9)
    assert again["categories"]["docqa"]["avg"]["8"]["judge"] is None
    alone = np.asarray(Image.open(out / "scores.png"))
    assert not np.array_equal(np.asarray(Image.open(rescored / "scores.png")), alone)  # the overlay and the mark


def test_bad_data_is_named_before_a_model_loads(data_root, tmp_path, capsys):
    common = ["eval", "mmlongbench", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "o")]
    assert main([*common, "--data-root", str(tmp_path)]) == 2
    assert f"{tmp_path / 'mmlb_data'} is not there" in capsys.readouterr().err
    assert main([*common, "--data-root", str(data_root), "--lengths", "16", "--tasks", "docqa"]) == 2
    assert f"{data_root / 'mmlb_data' / 'documentQA' / 'longdocurl_K16.jsonl'}: no such file" in capsys.readouterr().err
    broken = write_toy_data_root(tmp_path / "broken")
    (broken / "mmlb_image" / "slidevqa" / "slidevqadoc1" / "slidevqadoc1_page0.png").unlink()
    assert main([*common, "--data-root", str(broken), "--lengths", "8", "--datasets", "slidevqa"]) == 2
    assert "slidevqadoc1_page0.png" in capsys.readouterr().err
    assert main([*common, "--data-root", str(data_root), "--lengths", "256", "--tasks", "docqa"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err


def test_transformers_and_megatron_at_cp2_give_the_same_replies(data_root, tmp_path):
    """A random tiny model (long, arbitrary replies) answers every document-QA and MM-NIAH sample
    the same through transformers and through this project's model on its Megatron conversion
    at CP2 (two torchrun ranks, rank 0 writing)."""
    import subprocess
    import sys

    from megatron_mmprolong.config import ParallelConfig, Qwen25VLConfig
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    hf = write_random_hf_checkpoint(Qwen25VLConfig.preset("tiny-1k"), tmp_path / "hf", seed=3)
    write_tiny_tokenizer(hf)
    hf_to_mcore(hf, tmp_path / "mcore", ParallelConfig(), progress=False)
    common = ["eval", "mmlongbench", "--data-root", str(data_root), "--lengths", "8", "--datasets", "mmlongdoc",
              "retrieval-image", "--max-new-tokens", "12"]
    assert main([*common, "--hf-dir", str(hf), "--out", str(tmp_path / "hf-run")]) == 0
    port = free_port()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                    "-m", "megatron_mmprolong.cli", *common, "--mcore-dir", str(tmp_path / "mcore"), "--cp", "2",
                    "--tokenizer", str(hf), "--dtype", "fp32", "--out", str(tmp_path / "mcore-run")],  # as transformers
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                   stdout=subprocess.DEVNULL)

    def replies(run):
        lines = (tmp_path / run / "predictions.jsonl").read_text().splitlines()
        return {(e["dataset"], e["line"]): e["reply"] for e in map(json.loads, lines)}

    ours, reference = replies("mcore-run"), replies("hf-run")
    assert len(reference) == 4 and all(len(r["text"]) > 5 and r["error"] is None for r in reference.values())
    assert {k: r["text"] for k, r in ours.items()} == {k: r["text"] for k, r in reference.items()}
    assert {k: r["prompt_tokens"] for k, r in ours.items()} == {k: r["prompt_tokens"] for k, r in reference.items()}


# ---- contexts beyond 128K -------------------------------------------------------------------

BIG_PAGE = (1792, 2352)  # px: 64 x 84 merged patches, 5,376 vision tokens


def _long_root(root: Path, documents: int = 8, pages: int = 16) -> None:
    """A 128K document-QA file of `documents` samples, each on its own document of big pages
    (links to one image: only their headers are read) with one negative page of the next."""
    big = render_page(root / "big.png", "page", BIG_PAGE)
    records = []
    for d in range(documents):
        own, other = f"ldoc{d:02d}", f"ldoc{(d + 1) % documents:02d}"
        paths = [f"longdocurl/{own}/{own}_page{p}.png" for p in range(pages)]
        for path in paths:
            (root / "mmlb_image" / path).parent.mkdir(parents=True, exist_ok=True)
            os.link(big, root / "mmlb_image" / path)
        records.append({"id": f"longdocurl_{d}", "doc_name": own, "question": f"What is in {own}?", "answer": "x",
                        "answer_format": "String", "ans_page_list": [2, 5],
                        "page_list": paths + [f"longdocurl/{other}/{other}_page0.png"]})
    write_jsonl(root / "mmlb_data" / "documentQA" / "longdocurl_K128.jsonl", records)


def _chat_template_tokens(tokenizer, sample, root) -> int:
    """An independent count: the Qwen2.5-VL chat template's text tokenized whole, each image's
    placeholder counted as its merged patches."""
    from megatron_mmprolong.data.images import image_size, smart_resize

    text = build_prompt(sample).text
    content = [{"type": "image"} if piece == "<image>" else {"type": "text", "text": piece}
               for piece in text.replace("<image>", "\0<image>\0").split("\0") if piece]
    rendered = tokenizer.hf.apply_chat_template([{"role": "user", "content": content},
                                                 {"role": "assistant", "content": "Answer:"}],
                                                tokenize=False, continue_final_message=True)
    images = sum(h * w // 28 ** 2 - 1 for h, w in (smart_resize(*image_size(str(root / "mmlb_image" / p)))
                                                  for p in sample.record["page_list"]))
    return len(tokenizer.hf(rendered, add_special_tokens=False).input_ids) + images


def test_contexts_beyond_128k_pad_with_other_documents_to_the_target(tmp_path, qwen_tokenizer):
    from megatron_mmprolong.eval.mmlongbench.prompts import page_document
    from megatron_mmprolong.eval.mmlongbench.run import MMLongBenchConfig, plan

    _long_root(tmp_path)
    root, config = DataRoot.open(tmp_path), MMLongBenchConfig("m", max_samples=2)
    work = [("longdocurl", 128), ("longdocurl", 256), ("longdocurl", 512)]
    samples = plan(root, work, config, tmp_path / "out", True, qwen_tokenizer.path)
    assert [s.length for s in samples] == [128, 128, 256, 256, 512, 512]
    base = {s.id: s for s in samples if s.length == 128}
    for sample in samples[2:]:
        pages, own = sample.record["page_list"], base[sample.id].record["page_list"]
        meta = sample.record["extended"]
        tokens = _chat_template_tokens(qwen_tokenizer, sample, tmp_path)
        assert abs(tokens - sample.length * 1024) <= 0.02 * sample.length * 1024
        assert abs(meta["tokens"] - tokens) <= 8  # the piecewise count agrees with the template's
        start = meta["pages_before"]
        assert pages[start:start + len(own)] == own and len(pages) == start + len(own) + meta["pages_after"]
        padding = pages[:start] + pages[start + len(own):]
        assert not {page_document(p) for p in padding} & {page_document(p) for p in own}
        runs = [[p for p in side if page_document(p) == d] for side in (pages[:start], pages[start + len(own):])
                for d in dict.fromkeys(map(page_document, side))]
        assert all(run == sorted(run, key=lambda p: int(p.rsplit("page", 1)[1].split(".")[0])) for run in runs)
        left = len(set(map(page_document, pages[:start])))
        right = len(set(map(page_document, pages[start + len(own):])))
        assert left - right in (0, 1) and right >= 1  # documents alternate, the first on the left
        labels = [label for label in build_prompt(sample).text.split("Document ")[1:-1]]
        assert [label.split(":")[0] for label in labels] == [page_document(p) for p in pages]  # its own document
        assert sample.record["ans_page_list"] == base[sample.id].record["ans_page_list"]
    again = plan(root, work, config, tmp_path / "out", False)  # other ranks and reruns read the contexts
    assert [s.record for s in again] == [s.record for s in samples]

    with ScriptedChatServer(lambda body: " x", model="m") as server:
        assert main(["eval", "mmlongbench", "--endpoint", server.url, "--model", "m", "--data-root", str(tmp_path),
                     "--out", str(tmp_path / "out"), "--lengths", "128", "256", "512", "--max-samples", "2",
                     "--datasets", "longdocurl", "--tokenizer", qwen_tokenizer.path]) == 0
        images = [sum(p["type"] == "image_url" for p in b["messages"][0]["content"]) for b in server.bodies]
    assert sorted(images) == sorted(len(s.record["page_list"]) for s in samples)
    report = json.loads((tmp_path / "out" / "scores.json").read_text())["categories"]["docqa"]
    assert report["lengths"] == [128, 256, 512] and report["overall_beyond"]["rule"] == 100.0  # "x" is every answer
