"""build-data over real PDFs (broken ones included) and synthetic documents."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_mmprolong.cli import main
from megatron_mmprolong.data.build import BuildConfig, BuildError, NoSamplesError, build_dataset
from megatron_mmprolong.data.pdf import available_backends
from megatron_mmprolong.data.store import MultimodalStore, file_names

from conftest import CORPUS, QWEN_TOKENIZER

pytestmark = pytest.mark.skipif(not CORPUS.is_dir() or not QWEN_TOKENIZER.is_dir(), reason="shared inputs missing")


def _config(**kw):
    return BuildConfig(tokenizer=str(QWEN_TOKENIZER), **{"seq_length": 16384, "shard_size": 4, **kw})


def _check_samples(store, qwen_tokenizer, answers=None):
    """Token counts, placeholders and loss masks agree with grids and answers."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = IndexedDataset(store.prefix + ".tokens")  # Megatron reads the token file as is
    assert len(tokens) == len(store) > 0
    for i in range(len(store)):
        ids = np.asarray(tokens[i])
        row = store.samples[i]
        assert len(ids) == row["tokens"]
        grids = store.image_grids(i)
        vision = int((grids[:, 1] * grids[:, 2]).sum()) // 4
        assert (ids == qwen_tokenizer.image_pad).sum() == vision == row["vision_tokens"]
        assert (ids == qwen_tokenizer.vision_start).sum() == len(grids) == row["num_images"]
        for data, (t, h, w) in zip(store.image_bytes(i), grids):
            with Image.open(__import__("io").BytesIO(data)) as image:
                assert image.size == (w * 14, h * 14)
        mask = store.loss_mask(i)
        assert mask.sum() == row["loss_tokens"]
        if answers is not None:
            assert qwen_tokenizer.decode(ids[mask]) == answers[store.ids[i]] + "<|im_end|>"


@pytest.fixture(scope="module")
def synth_dataset(small_synth, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("ds") / "synth"
    report = build_dataset([small_synth], prefix, _config(), progress=False)
    return report, prefix


def test_synthetic_dataset_samples_are_exact(synth_dataset, small_synth, qwen_tokenizer):
    report, prefix = synth_dataset
    store = MultimodalStore(prefix)
    answers = {json.loads(l)["id"]: json.loads(l)["answer"] for l in small_synth.read_text().splitlines()}
    assert report.samples == len(answers) == len(store) and report.rejects == 0
    _check_samples(store, qwen_tokenizer, answers)
    m = store.manifest
    assert sum(t["samples"] for t in m["per_task"].values()) == len(store)
    assert sum(b["samples"] for b in m["per_length_bin"]) == len(store)
    assert m["counts"]["tokens"] == int(store.samples["tokens"].sum())
    assert set(m["checksums"]) == {p.name[len("synth."):] for p in file_names(prefix)}


@pytest.mark.parametrize("backend", available_backends())
def test_real_pdfs_build_with_every_broken_one_rejected(backend, tmp_path, qwen_tokenizer):
    corpus = tmp_path / "pdfs"
    shutil.copytree(CORPUS, corpus)
    (corpus / "zero-bytes.pdf").write_bytes(b"")
    data = (CORPUS / "pdflatex-4-pages.pdf").read_bytes()
    (corpus / "truncated.pdf").write_bytes(data[: len(data) // 3])
    (corpus / "not-a-pdf.pdf").write_text("hello")
    inputs = sorted(corpus.rglob("*.pdf"))
    report = build_dataset([corpus], tmp_path / "ocr", _config(dpi=72, pdf_backend=backend),
                           ocr_task="ocr-needle", progress=False)
    store = MultimodalStore(tmp_path / "ocr")
    rejects = [json.loads(l) for l in Path(f"{tmp_path}/ocr.rejects.jsonl").read_text().splitlines()]
    assert report.samples + report.rejects == len(inputs)
    by_file = {Path(r["input"].rsplit(":", 1)[0]).name: r for r in rejects}
    assert "password-protected" in by_file["libreoffice-writer-password.pdf"]["reason"]
    assert "empty (0 bytes)" in by_file["zero-bytes.pdf"]["reason"]
    assert by_file["not-a-pdf.pdf"]["kind"] == "bad-pdf"
    assert by_file["truncated.pdf"]["kind"] in ("bad-pdf", "no-text")
    assert by_file["grayscale-image.pdf"]["kind"] == "no-text"  # a scan with no text layer
    assert store.manifest["rejects"] == {k: sum(r["kind"] == k for r in rejects) for k in {r["kind"] for r in rejects}}
    _check_samples(store, qwen_tokenizer)
    # the stored grid of a rendered page is what transformers' processor makes of that page
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from megatron_mmprolong.data.pdf import open_pdf

    index = store.ids.index("pdflatex-4-pages.pdf")
    doc = open_pdf(str(CORPUS / "pdflatex-4-pages.pdf"), backend)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    rendered = [doc.render(p, 72) for p in range(doc.page_count)]
    grids = processor(images=rendered, return_tensors="pt")["image_grid_thw"]
    assert grids.tolist()[: len(store.image_grids(index))] == store.image_grids(index).tolist()


def test_pdf_records_with_page_ranges_and_bad_references(tmp_path, qwen_tokenizer):
    four = str(CORPUS / "pdflatex-4-pages.pdf")
    records = [
        {"id": "ok", "pdf": four, "page_range": [2, 3], "task": "extract-single", "question": "q?",
         "answer": "the answer", "evidence_pages": [3]},
        {"id": "range", "pdf": four, "page_range": [3, 9], "task": "extract-single", "question": "q", "answer": "a"},
        {"id": "evidence", "pdf": four, "page_range": [1, 2], "task": "reasoning", "question": "q", "answer": "a",
         "evidence_pages": [4]},
        {"id": "missing-image", "pages": [str(tmp_path / "nope.png")], "task": "reasoning", "question": "q", "answer": "a"},
        {"id": "corrupt-image", "pages": [str(tmp_path / "bad.png")], "task": "reasoning", "question": "q", "answer": "a"},
        {"id": "chat", "messages": [{"role": "user", "content": "Look: <image>"}, {"role": "assistant", "content": "a page"}],
         "images": [str(tmp_path / "good.png")]},
    ]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("RGB", (300, 200), "white").save(tmp_path / "good.png")
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = build_dataset([path], tmp_path / "ds", _config(dpi=72), progress=False)
    store = MultimodalStore(tmp_path / "ds")
    assert store.ids == ["ok", "chat"] and report.rejects == 4
    assert store.samples[0]["num_images"] == 2 and store.samples[1]["num_images"] == 1
    rejects = {json.loads(l)["id"]: json.loads(l) for l in Path(f"{tmp_path}/ds.rejects.jsonl").read_text().splitlines()}
    assert "has 4 pages" in rejects["range"]["reason"]
    assert "evidence page 4 is outside" in rejects["evidence"]["reason"]
    assert "does not exist" in rejects["missing-image"]["reason"] and rejects["corrupt-image"]["kind"] == "bad-image"
    assert rejects["range"]["input"] == f"{path}:2"
    _check_samples(store, qwen_tokenizer, {"ok": "the answer", "chat": "a page"})
    with pytest.raises(BuildError, match="4 inputs were rejected and --strict"):
        build_dataset([path], tmp_path / "strict", _config(dpi=72), strict=True, progress=False)
    assert not Path(f"{tmp_path}/strict.manifest.json").exists() and not Path(f"{tmp_path}/strict.tokens.bin").exists()


def test_overflow_policies(small_synth, tmp_path, qwen_tokenizer):
    # 448x560 pages are 320 tokens; 1200 tokens fit about three pages.
    with pytest.raises(NoSamplesError, match="skip.rejects.jsonl"):  # every document is too long: no dataset
        build_dataset([small_synth], tmp_path / "skip", _config(seq_length=1200), progress=False)
    assert not Path(f"{tmp_path}/skip.manifest.json").exists()
    kinds = {json.loads(l)["kind"] for l in Path(f"{tmp_path}/skip.rejects.jsonl").read_text().splitlines()}
    assert kinds == {"too-long"}
    build_dataset([small_synth], tmp_path / "drop", _config(seq_length=1200, overflow="drop-far-pages"), progress=False)
    store = MultimodalStore(tmp_path / "drop")
    records = {json.loads(l)["id"]: json.loads(l) for l in small_synth.read_text().splitlines()}
    assert len(store) > 0
    for i in range(len(store)):
        record = records[store.ids[i]]
        text = qwen_tokenizer.decode(np.asarray(store.tokens[i]))
        kept = [p for p in range(1, len(record["pages"]) + 1) if f"Page {p}:" in text]
        assert set(record["evidence_pages"]) <= set(kept)  # evidence is never dropped
        assert store.samples[i]["pages_dropped"] == len(record["pages"]) - len(kept)
        assert store.samples[i]["tokens"] <= 1200
        # whatever was dropped lies at least as far from the evidence as any kept page
        distance = lambda p: min(abs(p - e) for e in record["evidence_pages"])
        dropped = [p for p in range(1, len(record["pages"]) + 1) if p not in kept]
        assert all(distance(d) >= distance(k) for d in dropped for k in kept)
    assert store.manifest["counts"]["pages_dropped"] == int(store.samples["pages_dropped"].sum()) > 0


def _data_bytes(prefix):
    return {p.name: p.read_bytes() for p in [*file_names(prefix), Path(f"{prefix}.manifest.json")]}


def test_one_and_two_workers_give_identical_bytes(small_synth, tmp_path):
    config = _config(shard_size=2)
    build_dataset([small_synth], tmp_path / "one" / "ds", config, workers=1, progress=False)
    build_dataset([small_synth], tmp_path / "two" / "ds", config, workers=2, progress=False)
    assert _data_bytes(tmp_path / "one" / "ds") == _data_bytes(tmp_path / "two" / "ds")


def test_killed_build_resumes_to_identical_bytes(small_synth, tmp_path):
    config = _config(shard_size=2)
    build_dataset([small_synth], tmp_path / "clean" / "ds", config, progress=False)
    prefix = tmp_path / "killed" / "ds"
    prefix.parent.mkdir()
    command = [sys.executable, "-m", "megatron_mmprolong.cli", "build-data", "--input", str(small_synth),
               "--output-prefix", str(prefix), "--tokenizer", str(QWEN_TOKENIZER), "--seq-length", "16384",
               "--shard-size", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = Path(f"{prefix}.build") / "shard-00000" / "done.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not Path(f"{prefix}.manifest.json").exists()
    report = build_dataset([small_synth], prefix, config, progress=False)
    assert report.shards_reused >= 1
    assert _data_bytes(prefix) == _data_bytes(tmp_path / "clean" / "ds")
    assert not Path(f"{prefix}.build").exists()


def test_array_parts_then_merge_give_identical_bytes(small_synth, tmp_path):
    config = _config(shard_size=1)
    build_dataset([small_synth], tmp_path / "clean" / "ds", config, progress=False)
    prefix = tmp_path / "parts" / "ds"
    reports = [build_dataset([small_synth], prefix, config, part=(i, 3), progress=False) for i in (0, 2)]
    assert not any(r.merged for r in reports) and not Path(f"{prefix}.manifest.json").exists()
    shards = len(Path(small_synth).read_text().splitlines())  # one record per shard
    done = sorted(int(p.parent.name[-5:]) for p in Path(f"{prefix}.build").glob("shard-*/done.json"))
    assert done == [i for i in range(shards) if i % 3 != 1]  # part 1 of 3 was not run
    merged = build_dataset([small_synth], prefix, config, progress=False)  # builds part 1 and merges
    assert merged.merged and merged.shards_reused == len(done) < shards
    assert _data_bytes(prefix) == _data_bytes(tmp_path / "clean" / "ds")
    with pytest.raises(BuildError, match="index must be"):
        build_dataset([small_synth], tmp_path / "bad", config, part=(3, 3), progress=False)


def _one_synthetic_document(tmp_path, capsys) -> str:
    """`synth-docs` of one 4-page document of 336x448 px pages; its records file."""
    assert main(["synth-docs", "--out", str(tmp_path / "docs"), "--docs", "1", "--min-pages", "4", "--max-pages", "4",
                 "--page-width", "336", "--page-height", "448", "--font-size", "12"]) == 0
    return json.loads(capsys.readouterr().out)["records"]


def test_cli_synth_build_inspect(tmp_path, capsys):
    records = _one_synthetic_document(tmp_path, capsys)
    prefix = tmp_path / "ds"
    assert main(["build-data", "--input", records, "--output-prefix", str(prefix), "--tokenizer", str(QWEN_TOKENIZER),
                 "--seq-length", "4096"]) == 0
    capsys.readouterr()
    assert main(["build-data", "--input", records, "--output-prefix", str(prefix), "--tokenizer", str(QWEN_TOKENIZER)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["inspect-data", str(prefix), "--sample", "0"]) == 0
    out = capsys.readouterr().out
    assert "extract-single" in out and "<image 1: 336x448 px, 192 tokens>" in out and "--- loss on:" in out
    with Image.open(f"{prefix}.lengths.png") as png:
        assert png.size == (900, 480)


def test_cli_build_data_for_qwen3vl(tmp_path, capsys):
    """--model qwen3vl-8b: pages at 32 px per token, the family in the manifest and in inspect-data."""
    records = _one_synthetic_document(tmp_path, capsys)
    prefix = tmp_path / "ds"
    assert main(["build-data", "--input", records, "--output-prefix", str(prefix), "--tokenizer", str(QWEN_TOKENIZER),
                 "--seq-length", "4096", "--model", "qwen3vl-8b"]) == 0
    capsys.readouterr()
    store = MultimodalStore(prefix)
    assert store.model_family == "qwen3_vl"
    assert store.manifest["image"]["patch_size"] == 16 and store.manifest["image"]["mean"] == [0.5] * 3
    assert store.image_grids(0).tolist()[0] == [1, 28, 20]  # 448 x 336 -> 448 x 320 px, 16 px patches
    assert main(["inspect-data", str(prefix), "--sample", "0"]) == 0
    out = capsys.readouterr().out
    assert "qwen3_vl: 16 px patches, 32 px per token" in out and "<image 1: 320x448 px, 140 tokens>" in out
    assert main(["build-data", "--input", records, "--output-prefix", str(tmp_path / "x"), "--tokenizer",
                 str(QWEN_TOKENIZER), "--model", "qwen4"]) == 2
    assert "'qwen4' is neither a preset" in capsys.readouterr().err
