"""`mmprolong synth-qa` against a real chat-completions server on loopback.

The server is the package's `ScriptedChatServer` (the real protocol over real HTTP, answering from
a Python function; not a model). Most tests make it answer with `TextLayerOracle`, which writes
page-anchored questions from the facts that `synth-docs` printed on the pages it is shown; the
reject and fault tests make it answer from a script. The end-to-end test on the shared corpus
runs a random tiny Qwen2.5-VL in this process through transformers instead."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mmprolong.cli import main
from megatron_mmprolong.data.images import ImageParams, smart_resize
from megatron_mmprolong.data.pdf import PdfError, open_pdf
from megatron_mmprolong.data.synth import SynthConfig, synth_docs
from megatron_mmprolong.data.synth_qa import pipeline
from megatron_mmprolong.data.synth_qa.documents import (
    DocumentSettings,
    PageRange,
    SynthQAError,
    choose_segment,
    page_headings,
    plan_document,
)
from megatron_mmprolong.data.synth_qa.oracle import TextLayerOracle
from megatron_mmprolong.data.synth_qa.pipeline import JournalOnly, SynthQAConfig, run_synth_qa
from megatron_mmprolong.data.synth_qa.validate import QA, anchored_pages, answers_agree
from megatron_mmprolong.serving.endpoint import ChatEndpoint, EndpointConfig
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.scripted_server import Fault, ScriptedChatServer

from conftest import CORPUS

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = 12  # 4 documents x 3 questions


@pytest.fixture(scope="module")
def synth_pdfs(tmp_path_factory):
    """Four synthetic PDFs of 6-9 pages (wide enough that every fact's line fits on its page)."""
    out = tmp_path_factory.mktemp("synth-pdfs")
    synth_docs(out, SynthConfig(docs=4, min_pages=6, max_pages=9, page_width=308, page_height=336, font_size=9,
                                format="pdf", seed=3))
    return out


@pytest.fixture(scope="module")
def oracle(synth_pdfs):
    return TextLayerOracle(sorted(str(p) for p in synth_pdfs.glob("*.pdf")))


def _config(tasks=(("extract-single", 0.4), ("extract-multi", 0.4), ("reasoning", 0.2)), questions=3, segment=(3, 4),
            **kwargs) -> SynthQAConfig:
    documents = DocumentSettings(min_pages=4, document_pages=(5, 8), segment_pages=segment,
                                 questions_per_document=questions, tasks=tasks)
    return SynthQAConfig(documents, workers=0, **kwargs)


def _endpoint(server, **kwargs) -> ChatEndpoint:
    return ChatEndpoint(EndpointConfig(url=server.url, model=server.model, backoff=0.01, **kwargs))


def _text(body) -> str:
    return "\n".join(part["text"] for part in body["messages"][-1]["content"] if part["type"] == "text")


def _labels(body) -> list[int]:
    """The page numbers a request labels its images with."""
    return [int(n) for n in re.findall(r"^Page (\d+):$", _text(body), re.MULTILINE)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cli(synth_pdfs, out, *extra) -> list[str]:
    return ["synth-qa", "--input", str(synth_pdfs), "--out", str(out), "--min-pages", "4", "--document-pages", "5", "8",
            "--segment-pages", "3", "4", "--questions-per-document", "3", "--tasks", "extract-single=1",
            "--workers", "0", *extra]


def test_valid_answers_become_records_that_build_data_builds(synth_pdfs, oracle, tmp_path):
    import jsonschema
    from importlib.resources import files

    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.store import MultimodalStore
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    with ScriptedChatServer(oracle, model="oracle") as server:
        summary = run_synth_qa([synth_pdfs], tmp_path / "qa", _config(verify=True, concurrency=4), _endpoint(server),
                               progress=False)
    records = _lines(tmp_path / "qa" / "records.jsonl")
    asked = [body for body in server.bodies if "Task type:" in _text(body)]
    assert summary["questions"] == QUESTIONS == len(asked)
    assert len(server.bodies) == QUESTIONS + summary["requests"]["verify"]
    # The oracle declines tasks its pages cannot serve (two weights for a sum) in words, and on
    # overlapping segments of one document may ask the same question twice.
    assert len(records) == summary["accepted_total"] >= 8
    assert set(summary["rejects"]) <= {"bad-json", "duplicate-question"} and sum(summary["rejects"].values()) + len(records) == QUESTIONS
    assert summary["requests"]["verify"] == len(records)  # every checked pair was verified, and all agreed
    validator = jsonschema.Draft202012Validator(
        json.loads(files("megatron_mmprolong.data").joinpath("record.schema.json").read_text()))
    segments = {tuple(_labels(body)) for body in asked}
    for record in records:
        validator.validate(record)
        segment, (first, last) = record["meta"]["segment"], record["page_range"]
        assert first <= segment["first"] <= segment["last"] <= last
        assert all(segment["first"] <= p <= segment["last"] for p in record["evidence_pages"])
        assert tuple(range(segment["first"], segment["last"] + 1)) in segments  # the generator saw those pages
        assert record["meta"]["verifier"]["agrees"] and record["meta"]["prompt_version"] == "mmprolong-synth-qa-v1"
    assert all(len(body["messages"][-1]["content"]) == 2 + 2 * len(_labels(body)) for body in asked)  # label + image

    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer")
    report = build_dataset([tmp_path / "qa" / "records.jsonl"], tmp_path / "ds",
                           BuildConfig(tokenizer=str(tokenizer), seq_length=4096), progress=False)
    assert (report.samples, report.rejects) == (len(records), 0)
    store = MultimodalStore(tmp_path / "ds")
    assert [store.ids[i] for i in range(len(store))] == [r["id"] for r in records]
    assert [int(store.samples[i]["num_images"]) for i in range(len(store))] == \
        [r["page_range"][1] - r["page_range"][0] + 1 for r in records]  # the whole run, not the segment


def _qa(question, answer, evidence, answer_format="String") -> str:
    return json.dumps({"question": question, "answer": answer, "answer_format": answer_format,
                       "evidence_pages": evidence, "evidence": "printed on the page"})


def _evidence(pages, task):
    return pages[:1] if task == "extract-single" else pages[:2]


def _valid(name):
    return lambda p, t: _qa(f"In Section 2, what is value {name}?", "42", _evidence(p, t), "Integer")


REJECT_SCRIPT = [  # in job order: the first document's 8 questions, then the second's
    (lambda p, t: "Sure, here is a question about these pages.", "bad-json"),
    (lambda p, t: json.dumps({"question": f"On page {p[0]}, what?", "answer": "x"}), "missing-fields"),
    (lambda p, t: _qa(f"On page {p[0]}, what is empty?", " ", _evidence(p, t)), "empty-answer"),
    (lambda p, t: _qa(f"On page {p[0]}, what is long?", "word " * 100, _evidence(p, t)), "answer-too-long"),
    (lambda p, t: _qa(f"On page {p[0]}, what is outside?", "x", [p[0], 999]), "evidence-outside-segment"),
    (lambda p, t: _qa(f"On page {p[0]}, what is counted?", "x", p[:2] if t == "extract-single" else p[:1]),
     "evidence-page-count"),
    (lambda p, t: _qa("What is the access code?", "x", _evidence(p, t)), "no-anchor"),
    (lambda p, t: _qa("On page 999, what is the code?", "x", _evidence(p, t)), "anchor-outside-segment"),
    (_valid("A"), None),
    (_valid("A"), "duplicate-question"),
    (lambda p, t: Fault(text=_valid("T")(p, t), finish_reason="length"), "truncated"),
    (lambda p, t: Fault(status=400), "refused"),
    (_valid("B"), "verify-disagrees"),
    (_valid("C"), "verify-refused"),
    (_valid("D"), None),
    (_valid("E"), None),
]


def test_each_reject_reason_is_counted_with_its_message(synth_pdfs, tmp_path, monkeypatch):
    pdfs = sorted(str(p.resolve()) for p in synth_pdfs.glob("*.pdf"))[:3]
    script = iter(REJECT_SCRIPT)

    def answer(body):
        text = _text(body)
        if "Task type:" not in text:  # verification: the pair's answer is 42
            return Fault(status=400) if "value C" in text else json.dumps({"answer": "41" if "value B" in text else "42.0"})
        return next(script)[0](_labels(body), re.search(r"Task type: ([\w-]+)", text).group(1))

    def render_pages(pdf, *args):  # every page of the third document fails to render
        if pdf == pdfs[2]:
            raise PdfError(f"page 1 of {pdf} cannot be rendered (damaged)")
        return real_render(pdf, *args)

    real_render = pipeline.render_pages
    monkeypatch.setattr(pipeline, "render_pages", render_pages)
    with ScriptedChatServer(answer) as server:
        summary = run_synth_qa(pdfs, tmp_path, _config(questions=8, segment=(3, 3), verify=True, concurrency=1),
                               _endpoint(server), progress=False)
    expected = {reason: 1 for _, reason in REJECT_SCRIPT if reason} | {"unrenderable": 8}
    assert summary["rejects"] == dict(sorted(expected.items()))
    assert summary["accepted_total"] == 3 and summary["requests"]["not_built"] == 8
    rejects = _lines(tmp_path / "rejects.jsonl")
    assert sorted(r["reason"] for r in rejects) == sorted(r for r, n in expected.items() for _ in range(n))
    by_reason = {r["reason"]: r["message"] for r in rejects}
    assert "999 is outside the segment" in by_reason["evidence-outside-segment"]
    assert "lacks answer_format, evidence_pages, evidence" in by_reason["missing-fields"]
    assert "'41', not '42'" in by_reason["verify-disagrees"] and "damaged" in by_reason["unrenderable"]
    assert [r["question"] for r in _lines(tmp_path / "records.jsonl")] == [
        f"In Section 2, what is value {name}?" for name in "ADE"]


def test_a_500_and_a_timeout_are_retried_until_an_answer(synth_pdfs, oracle, tmp_path):
    faults = iter([Fault(status=500), Fault(delay=1.0, text="too late")])
    with ScriptedChatServer(lambda body: next(faults, None) or oracle(body)) as server:
        summary = run_synth_qa(sorted(synth_pdfs.glob("*.pdf"))[:1], tmp_path,
                               _config(tasks=(("extract-single", 1.0),), questions=1),
                               _endpoint(server, timeout=0.3), progress=False)
    assert summary["accepted_total"] == 1 and len(_lines(tmp_path / "records.jsonl")) == 1
    assert (summary["requests"]["http_attempts"], summary["requests"]["retries"], summary["requests"]["sent"]) == (3, 2, 1)


def test_a_killed_run_resumes_and_sends_no_answered_request_again(synth_pdfs, oracle, tmp_path):
    import hashlib

    def answer(body):
        time.sleep(0.15)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return json.dumps({**json.loads(oracle(body)), "request": digest})

    out = tmp_path / "qa"
    with ScriptedChatServer(answer, model="oracle") as server:
        command = [sys.executable, "-m", "megatron_mmprolong.cli",
                   *_cli(synth_pdfs, out, "--endpoint", server.url, "--model", "oracle", "--concurrency", "2")]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal_path, deadline = out / "answers.jsonl", time.time() + 60
        while time.time() < deadline and (not journal_path.exists() or journal_path.read_text().count("\n") < 4):
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        with Journal(journal_path) as journal:
            answered = {json.loads(e["reply"]["text"])["request"] for e in journal.entries()}
        assert 4 <= len(answered) < QUESTIONS  # killed mid-run
        sent_before = len(server.bodies)
        rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        resent = {hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest() for b in server.bodies[sent_before:]}
    assert len(server.bodies) - sent_before == QUESTIONS - len(answered) == len(resent)
    assert not resent & answered
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"]["from_journal"] == len(answered)
    assert len(_lines(out / "records.jsonl")) + len(_lines(out / "rejects.jsonl")) == QUESTIONS


def test_the_api_key_is_sent_but_never_written_or_logged(synth_pdfs, oracle, tmp_path, monkeypatch, capfd):
    secret = "sk-synth-qa-0123456789abcdef"
    monkeypatch.setenv("SYNTH_QA_TEST_KEY", secret)
    faults = iter([Fault(status=500)])
    with ScriptedChatServer(lambda body: next(faults, None) or oracle(body), model="oracle") as server:
        status = main(_cli(synth_pdfs, tmp_path / "qa", "--endpoint", server.url, "--model", "oracle", "--verify",
                           "--api-key-env", "SYNTH_QA_TEST_KEY", "--max-retries", "2"))
    logged = capfd.readouterr()
    assert status == 0 and json.loads(logged.out)["requests"]["retries"] == 1
    assert {h["Authorization"] for h in server.headers} == {f"Bearer {secret}"}
    written = [p for p in (tmp_path / "qa").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"records.jsonl", "rejects.jsonl", "summary.json", "answers.jsonl"}
    assert not any(secret.encode() in p.read_bytes() for p in written)
    assert secret not in logged.out + logged.err


def test_bad_pdfs_are_filtered_with_their_reason_and_duplicates_reported(tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(CORPUS, pool)
    (pool / "copies").mkdir()
    shutil.copy(CORPUS / "pdflatex-4-pages.pdf", pool / "copies" / "same-bytes.pdf")
    (pool / "zero-bytes.pdf").write_bytes(b"")
    data = (CORPUS / "pdflatex-4-pages.pdf").read_bytes()
    (pool / "truncated.pdf").write_bytes(data[: len(data) // 3])
    (pool / "not-a-pdf.pdf").write_text("hello")
    one_page = sum(open_pdf(str(p)).page_count == 1 for p in CORPUS.glob("*.pdf") if "password" not in p.name)
    with ScriptedChatServer(lambda body: "I cannot help with that.") as server:
        summary = run_synth_qa([pool], tmp_path / "qa", SynthQAConfig(
            DocumentSettings(min_pages=2, max_pages=5, document_pages=(2, 6), segment_pages=(2, 3)), workers=0),
            _endpoint(server), progress=False)
    documents = summary["documents"]
    assert documents["seen"] == len(list(CORPUS.glob("*.pdf"))) + 4
    assert documents["filtered"] == {"password-protected": 1, "unreadable": 3, "too-short": one_page, "too-long": 1}
    assert documents["duplicates"] == 1 and summary["duplicate_files"] == [  # the first in input order is kept
        {"pdf": str((pool / "pdflatex-4-pages.pdf").resolve()), "same_as": str((pool / "copies" / "same-bytes.pdf").resolve())}]
    reasons = {Path(f["pdf"]).name: f for f in summary["filtered_files"]}
    assert "password-protected" in reasons["libreoffice-writer-password.pdf"]["message"]
    assert reasons["zero-bytes.pdf"]["reason"] == "unreadable" and "empty" in reasons["zero-bytes.pdf"]["message"]
    assert reasons["imagemagick-images.pdf"]["reason"] == "too-long"  # 6 pages > --max-pages 5
    assert documents["used"] == 3 and summary["rejects"] == {"bad-json": summary["questions"]}


def test_an_unreachable_endpoint_fails_fast_naming_the_url(synth_pdfs, tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    began = time.perf_counter()
    status = main(_cli(synth_pdfs, tmp_path / "qa", "--endpoint", f"http://127.0.0.1:{port}", "--model", "m"))
    assert status == 2 and time.perf_counter() - began < 10
    assert f"cannot reach the endpoint http://127.0.0.1:{port}/v1" in capsys.readouterr().err
    assert not (tmp_path / "qa" / "records.jsonl").exists()


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    """A random tiny-1k Qwen2.5-VL with the tiny tokenizer beside it: a checkpoint `hf:DIR` loads."""
    return _tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny-generator"), "tiny-1k")


def _tiny_chat_checkpoint(path: Path, preset: str) -> Path:
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    write_random_hf_checkpoint(VLConfig.preset(preset), path, seed=4)
    write_tiny_tokenizer(path)
    return path


def test_end_to_end_on_the_real_corpus_with_the_transformers_backend(tiny_generator, tmp_path, monkeypatch, capsys):
    """Random weights write no valid JSON: every question must be rejected with its reason, from
    requests built from the right pages at the right size."""
    import base64
    import io

    from PIL import Image

    from megatron_mmprolong.eval.hf_chat import TransformersChatBackend

    requests = []
    complete = TransformersChatBackend.complete

    async def recorded(self, request):
        requests.append(request)
        return await complete(self, request)

    monkeypatch.setattr(TransformersChatBackend, "complete", recorded)
    max_pixels = 28 * 28 * 16
    status = main(["synth-qa", "--input", str(CORPUS), "--out", str(tmp_path / "qa"), "--generator",
                   f"hf:{tiny_generator}", "--min-pages", "2", "--document-pages", "2", "6", "--segment-pages", "2", "3",
                   "--questions-per-document", "2", "--max-pixels", str(max_pixels), "--max-tokens", "12",
                   "--temperature", "0", "--concurrency", "1", "--workers", "0"])
    assert status == 0
    summary = json.loads((tmp_path / "qa" / "summary.json").read_text())
    rejects = _lines(tmp_path / "qa" / "rejects.jsonl")
    assert summary["documents"]["used"] == 4 and summary["questions"] == 8 == len(requests) == len(rejects)
    assert summary["accepted_total"] == 0 and sum(summary["rejects"].values()) == 8
    assert set(summary["rejects"]) <= {"bad-json", "truncated"} and all(r["message"] for r in rejects)
    methods = {Path(r["pdf"]).name: r["segment"]["method"] for r in rejects}
    assert methods["pdflatex-outline.pdf"] == methods["mistitled_outlines_example.pdf"] == "outline"
    assert methods["pdflatex-4-pages.pdf"] == "fixed"  # no outline, no headings
    image = ImageParams(max_pixels=max_pixels)
    for request, reject in zip(requests, rejects):  # one request in flight: replies in job order
        body = {"messages": request.messages}
        pages = list(range(reject["segment"]["first"], reject["segment"]["last"] + 1))
        assert _labels(body) == pages
        images = [Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
                  for part in request.messages[-1]["content"] if part["type"] == "image_url"]
        doc = open_pdf(reject["pdf"])
        sizes = [doc.page_size(p - 1) for p in pages]
        doc.close()
        assert [(i.height, i.width) for i in images] == [
            smart_resize(round(h * 144 / 72), round(w * 144 / 72), image) for w, h in sizes]
    assert summary["tokens"]["completion"] <= 8 * 12 and summary["tokens"]["prompt"] > 8 * 2 * 16


@pytest.mark.parametrize("preset", ["tiny-1k", "qwen3vl-tiny-1k"])
def test_the_transformers_backend_sees_pages_as_build_data_stores_them(preset, tmp_path):
    """The in-process generator's input for a chat request equals the training sample build-data
    makes of the same pages and question: the same tokens and the same pixels, for each family
    (Qwen3-VL: 32 px tokens, its normalisation, mm_token_type_ids in transformers' generate)."""
    import asyncio

    import torch

    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.pixels import PilDecoder, sample_pixels
    from megatron_mmprolong.data.store import MultimodalStore
    from megatron_mmprolong.data.synth_qa.workers import render_pages
    from megatron_mmprolong.eval.dataset_qa import prompt_and_answer
    from megatron_mmprolong.eval.hf_chat import TransformersChatBackend
    from megatron_mmprolong.serving.chat import ChatRequest, image_part, text_part

    tiny_generator = _tiny_chat_checkpoint(tmp_path / "model", preset)
    vision = VLConfig.preset(preset).vision
    image = ImageParams.for_model(vision, min_pixels=vision.merged_token_px**2 * 4, max_pixels=vision.merged_token_px**2 * 64)
    pdf, question = CORPUS / "pdflatex-4-pages.pdf", "On page 3, what?"
    pages = render_pages(str(pdf), [2, 3], 72, image, "auto")
    content = [text_part("Page 2:"), image_part(pages[0]), text_part("Page 3:"), image_part(pages[1]), text_part(question)]
    request = ChatRequest([{"role": "user", "content": content}], max_tokens=6)
    backend = TransformersChatBackend(tiny_generator, image.min_pixels, image.max_pixels)
    inputs = backend.prompt(request)
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"pdf": str(pdf), "page_range": [2, 3], "task": "extract-single",
                                   "question": question, "answer": "x"}) + "\n")
    build_dataset([records], tmp_path / "ds", BuildConfig(tokenizer=str(tiny_generator), seq_length=4096, dpi=72,
                                                          model_family=VLConfig.preset(preset).family, image=image),
                  progress=False)
    store = MultimodalStore(tmp_path / "ds")
    prompt, _ = prompt_and_answer(store, 0)
    pixels, grids = sample_pixels(store, 0, PilDecoder())
    assert inputs["input_ids"][0].tolist() == prompt.tolist()
    assert torch.equal(inputs["pixel_values"], torch.from_numpy(pixels))
    assert inputs["image_grid_thw"].tolist() == grids.tolist()
    reply = asyncio.run(backend.complete(request))
    assert reply.prompt_tokens == len(prompt) and 1 <= reply.completion_tokens <= 6 and reply.error is None


def _pdf(path: Path, pages: int, texts=None, toc=None) -> str:
    import pymupdf

    doc = pymupdf.open()
    for number in range(1, pages + 1):
        page = doc.new_page(width=200, height=200)
        for row, line in enumerate((texts or {}).get(number, [f"Plain text of page {number}."])):
            page.insert_text((10, 20 + 12 * row), line, fontsize=8)
    if toc:
        doc.set_toc(toc)
    doc.save(path)
    doc.close()
    return str(path)


def test_segments_follow_the_outline_then_the_headings_then_fixed_windows(tmp_path):
    settings = DocumentSettings(min_pages=20, document_pages=(40, 40), segment_pages=(8, 15), questions_per_document=12)
    sections = [1, 9, 18, 30]  # sections of 8, 9, 12 and 11 pages: each one a whole segment
    outlined = _pdf(tmp_path / "outline.pdf", 40, toc=[[1, f"Part {i}", p] for i, p in enumerate(sections)])
    headed = _pdf(tmp_path / "headings.pdf", 40, texts={p: [f"{i + 1} Results of stage {i}", "Body text."]
                                                        for i, p in enumerate(sections)})
    plain = _pdf(tmp_path / "plain.pdf", 40)
    wholes = {(s, e - 1) for s, e in zip(sections, sections[1:] + [41])}
    for path, method in ((outlined, "outline"), (headed, "headings")):
        plans = plan_document(path, "0" * 64, settings)
        assert {p.segment_method for p in plans} == {method}
        assert {(p.segment.first, p.segment.last) for p in plans} <= wholes
        assert all(p.sections[0].page == p.segment.first for p in plans)
    plans = plan_document(plain, "0" * 64, settings)
    assert {p.segment_method for p in plans} == {"fixed"} and all(8 <= len(p.segment) <= 15 for p in plans)
    assert all((p.segment.first - 1) % len(p.segment) == 0 for p in plans)  # windows tiled from the run's start
    # Sections too long for one segment: it starts at one and is cut at the size limit.
    segment, aligned = choose_segment(PageRange(1, 40), (8, 15), [1, 21], 40, __import__("random").Random(0))
    assert aligned and segment.first in (1, 21) and 8 <= len(segment) <= 15
    assert [s.title for s in page_headings({1: "RUNNING HEAD\n1 Introduction", 2: "RUNNING HEAD\nbody",
                                            3: "RUNNING HEAD\nAPPENDIX", 4: "Chapter 2: Methods\n"})] == \
        ["1 Introduction", "APPENDIX", "Chapter 2: Methods"]  # a line on top of 3 pages is a running header


def test_runs_segments_and_tasks_are_seeded_and_follow_the_mix(tmp_path):
    path = _pdf(tmp_path / "long.pdf", 60)
    settings = DocumentSettings(questions_per_document=500)
    plans = plan_document(path, "a" * 64, settings)
    assert all(32 <= len(p.run) <= 50 and 1 <= p.run.first and p.run.last <= 60 for p in plans)
    assert all(p.run.first <= p.segment.first and p.segment.last <= p.run.last and 8 <= len(p.segment) <= 15
               for p in plans)
    share = {task: sum(p.task == task for p in plans) / len(plans) for task in ("extract-single", "extract-multi", "reasoning")}
    assert abs(share["extract-single"] - 0.4) < 0.07 and abs(share["extract-multi"] - 0.4) < 0.07
    assert abs(share["reasoning"] - 0.2) < 0.06
    assert plan_document(path, "a" * 64, settings) == plans
    assert plan_document(path, "a" * 64, DocumentSettings(questions_per_document=500, seed=1)) != plans
    short = plan_document(_pdf(tmp_path / "short.pdf", 24), "b" * 64, DocumentSettings(questions_per_document=3))
    assert all((p.run.first, p.run.last) == (1, 24) for p in short)  # shorter than 32 pages: used whole


def test_parts_then_an_offline_merge_equal_one_run_and_send_nothing_twice(synth_pdfs, oracle, tmp_path):
    with ScriptedChatServer(oracle, model="oracle") as server:
        whole = run_synth_qa([synth_pdfs], tmp_path / "one", _config(verify=True), _endpoint(server), progress=False)
        sent_whole = len(server.bodies)
        for index in range(2):
            run_synth_qa([synth_pdfs], tmp_path / "split", _config(verify=True, part=(index, 2)), _endpoint(server),
                         progress=False)
        assert len(server.bodies) == 2 * sent_whole  # the parts asked everything once between them
    merged = run_synth_qa([synth_pdfs], tmp_path / "split", _config(verify=True), JournalOnly("oracle"), progress=False)
    for name in ("records.jsonl", "rejects.jsonl"):
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert merged["requests"]["sent"] == 0 and merged["requests"]["from_journal"] == sent_whole
    assert merged["accepted"] == whole["accepted"] and merged["tokens"] == whole["tokens"]
    partial = run_synth_qa([synth_pdfs], tmp_path / "partial", _config(), JournalOnly("oracle"), progress=False)
    assert partial["rejects"] == {"unanswered": QUESTIONS}  # offline with nothing journaled: counted, not sent


def test_a_prompt_file_replaces_the_prompts_and_its_version_is_recorded(synth_pdfs, oracle, tmp_path):
    import yaml

    from megatron_mmprolong.data.synth_qa.prompts import DEFAULT_PROMPTS

    prompts = yaml.safe_load(DEFAULT_PROMPTS.read_text())
    prompts["version"] = "team-prompts-v7"
    prompts["generate"] = "Our own instructions ($task).\n" + prompts["generate"]
    custom = tmp_path / "prompts.yaml"
    custom.write_text(yaml.safe_dump(prompts))
    with ScriptedChatServer(oracle) as server:
        run_synth_qa(sorted(synth_pdfs.glob("*.pdf"))[:1], tmp_path / "qa",
                     _config(tasks=(("extract-single", 1.0),), questions=1, prompt_file=str(custom)), _endpoint(server),
                     progress=False)
    assert "Our own instructions (extract-single)." in _text(server.bodies[0])
    assert _lines(tmp_path / "qa" / "records.jsonl")[0]["meta"]["prompt_version"] == "team-prompts-v7"
    prompts["verify"] = "Answer $answer"
    custom.write_text(yaml.safe_dump(prompts))
    with pytest.raises(SynthQAError, match=r"prompts.yaml: verify has an unknown or malformed placeholder"):
        run_synth_qa([synth_pdfs], tmp_path / "bad", _config(prompt_file=str(custom)), JournalOnly("m"), progress=False)


def test_anchors_and_answer_agreement():
    assert anchored_pages("According to pages 20-23 and page 30, how many?") == [20, 21, 22, 23, 30]
    assert anchored_pages("Based on Pages 6, 13 and 19, list all risk factors.") == [6, 13, 19]
    assert anchored_pages("On p. 4 and pp. 7-8, ...") == [4, 7, 8] and anchored_pages("What is on the webpage?") == []

    def qa(answer, answer_format="String"):
        return QA("q", answer, answer_format, (1,), "e")

    assert answers_agree(qa("1234", "Integer"), "It is 1,234 kg.") and not answers_agree(qa("1234", "Integer"), "1243")
    assert answers_agree(qa("0.5", "Float"), "0.50") and answers_agree(qa(["GX-1", "AB-2"], "List"), "AB-2 and GX-1")
    assert answers_agree(qa("The Amber Falcon"), "amber falcon.") and not answers_agree(qa("Amber Falcon"), "Amber Heron")


def test_the_sbatch_script_runs_a_part_then_the_merge(synth_pdfs, oracle, tmp_path):
    """slurm/synth_qa.sbatch run by bash with the variables an array job sets (a one-task array:
    each CLI start costs seconds); the endpoint is given, so no vLLM server is started."""
    env = {**os.environ, "PROJECT_DIR": str(REPO), "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore",
           "INPUT": str(synth_pdfs), "OUT": str(tmp_path / "qa"), "MODEL": "oracle", "WORKERS": "0"}
    options = ["--min-pages", "4", "--document-pages", "5", "8", "--segment-pages", "3", "4"]
    with ScriptedChatServer(oracle, model="oracle") as server:
        subprocess.run(["bash", str(REPO / "slurm" / "synth_qa.sbatch"), *options], check=True, capture_output=True,
                       env={**env, "ENDPOINT": server.url, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"})
        sent = len(server.bodies)
    assert (tmp_path / "qa" / "parts" / "00000-of-00001" / "answers.jsonl").is_file()
    merge = subprocess.run(["bash", str(REPO / "slurm" / "synth_qa.sbatch"), *options], check=True, capture_output=True,
                           text=True, env={**env, "STAGE": "merge"})
    summary = json.loads((tmp_path / "qa" / "summary.json").read_text())
    assert sent == summary["questions"] == QUESTIONS and summary["requests"]["sent"] == 0
    assert len(_lines(tmp_path / "qa" / "records.jsonl")) == summary["accepted_total"] > 0
    assert json.loads(merge.stdout)["accepted"] == summary["accepted"]
