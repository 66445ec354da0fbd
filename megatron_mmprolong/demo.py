"""`make demo`: the whole pipeline on a CPU in minutes, on small inputs, nothing downloaded.

1. synthetic long documents with page-anchored questions -> an indexed multimodal dataset
   (a 1K-token tokenizer built offline, so that the tiny model's output layer stays small);
   then synthetic PDFs -> `synth-qa` -> a second dataset: the generator is a stand-in for a served
   VLM (`TextLayerOracle` behind a loopback chat-completions server: it writes questions from the
   facts printed on the pages it is shown), so the requests, journal, checks and verification run
   for real over HTTP without a GPU;
2. a random tiny Qwen2.5-VL checkpoint written by transformers, compared with this model;
3. converted to a Megatron distributed checkpoint for TP2;
4. trained with `examples/cpu_tiny.yaml` on two ranks (TP2 over gloo), saved;
5. exported back to Hugging Face and verified against the trained checkpoint;
6. the exported model answers the dataset's questions with transformers, then a needle grid
   (1K-8K tokens x 5 depths, past the 4K training window) with its heat map (exact match; a
   tiny model trained for a few dozen steps scores near zero, the point is that the path works),
   its longest column (8K) on the trained Megatron checkpoint split over two context-parallel ranks
   (answers compared with the export's), and the loss by position over the dataset;
7. `eval mmlongbench` on the exported model over a toy data root in MMLongBench's released
   layout (document QA in every answer format, the six MM-NIAH tasks), the harness's prompts and
   metrics, with a stand-in LLM judge on loopback: the table, scores.json and scores.png;
8. `eval video` on the exported model over a toy Video-MME root (counter videos encoded here), at
   1 fps within the token budget: the paper's table, scores.json and scores.png.

Each step is the `mmprolong` command a user would run; a summary closes the demo.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "cpu_tiny.yaml"
OUT = REPO / "out" / "demo"  # examples/cpu_tiny_mix.yaml reads the dataset from here


class DemoError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(title: str, argv: list[str], timings: dict) -> str:
    """Run one step, echoing its output; returns its standard output."""
    print(f"\n== {title}\n$ {' '.join(argv)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait() != 0:
        raise DemoError(f"step '{title}' failed with exit status {process.returncode}")
    timings[title] = time.perf_counter() - start
    return "".join(lines)


def _last_json(text: str) -> dict:
    return json.loads(text[text.rindex("\n{\n") if "\n{\n" in text else text.index("{"):])


def _same_answers(first: Path, second: Path) -> tuple[int, int]:
    """(answers equal in both, questions) over the questions of the first answers.jsonl."""
    answers = [{json.loads(line)["id"]: json.loads(line)["answer"] for line in path.read_text().splitlines()}
               for path in (first, second)]
    return sum(answers[1].get(key) == answer for key, answer in answers[0].items()), len(answers[0])


def _two_ranks(module: str, *args: str) -> list[str]:
    """`module` on two torchrun ranks of this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "-m", module, *args]


def _mmprolong(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_mmprolong.cli", *args]


def _synth_qa(pdfs: Path, out: Path, tokenizer: Path, timings: dict) -> dict:
    """Synthetic PDFs -> synth-qa against the stand-in generator on loopback -> a dataset."""
    from megatron_mmprolong.data.synth_qa.oracle import TextLayerOracle
    from megatron_mmprolong.serving.scripted_server import ScriptedChatServer

    _run("synthetic PDFs", _mmprolong(
        "synth-docs", "--out", str(pdfs), "--docs", "4", "--min-pages", "20", "--max-pages", "24", "--format", "pdf",
        "--page-width", "308", "--page-height", "336", "--font-size", "9", "--seed", "2"), timings)
    oracle = TextLayerOracle(sorted(str(p) for p in pdfs.glob("*.pdf")))
    with ScriptedChatServer(oracle, model="text-layer-oracle") as server:
        _run("synth-qa: questions on 8-15 page segments (stand-in generator)", _mmprolong(
            "synth-qa", "--input", str(pdfs), "--out", str(out), "--endpoint", server.url, "--model", server.model,
            "--verify", "--workers", "0"), timings)
    built = _last_json(_run("dataset from the synth-qa records", _mmprolong(
        "build-data", "--input", str(out / "records.jsonl"), "--output-prefix", str(OUT / "data" / "synth-qa"),
        "--tokenizer", str(tokenizer), "--seq-length", "4096"), timings))
    return {**json.loads((out / "summary.json").read_text()), "samples": built["samples"]}


def _mmlongbench(hf_dir: Path, timings: dict) -> dict:
    """The benchmark's path on a toy data root, judged by a stand-in on loopback."""
    from megatron_mmprolong.eval.mmlongbench.toy_data import stand_in_judge, write_toy_data_root
    from megatron_mmprolong.serving.scripted_server import ScriptedChatServer

    root = write_toy_data_root(OUT / "mmlb")
    with ScriptedChatServer(stand_in_judge, model="stand-in-judge") as judge:
        _run("MMLongBench layout (toy data root, 8K) on the exported model, stand-in judge", _mmprolong(
            "eval", "mmlongbench", "--hf-dir", str(hf_dir), "--data-root", str(root), "--out", str(OUT / "mmlongbench"),
            "--lengths", "8", "--judge-endpoint", judge.url, "--judge-model", judge.model, "--train-length", "4096"),
            timings)
    return json.loads((OUT / "mmlongbench" / "scores.json").read_text())


def _video(hf_dir: Path, timings: dict) -> dict:
    """Video-MME's path on a toy root of tiny counter videos (a few seconds each)."""
    from megatron_mmprolong.eval.video.toy_data import write_videomme_root

    root = write_videomme_root(OUT / "videomme")
    _run("Video-MME layout (toy root, 1 fps) on the exported model", _mmprolong(
        "eval", "video", "--hf-dir", str(hf_dir), "--videomme-root", str(root), "--out", str(OUT / "video"),
        "--max-new-tokens", "16"), timings)
    return json.loads((OUT / "video" / "scores.json").read_text())["benchmarks"]["videomme"]


def _counts(counts: dict) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def main() -> int:
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    shutil.rmtree(OUT, ignore_errors=True)
    tokenizer, docs, data = OUT / "tokenizer", OUT / "docs", OUT / "data" / "synth"
    pdfs, synth_qa = OUT / "pdfs", OUT / "synth-qa"
    hf_dir, mcore_dir, run_dir, export = OUT / "tiny-hf", OUT / "tiny-mcore", OUT / "run", OUT / "trained-hf"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        write_tiny_tokenizer(tokenizer)
        _run("synthetic documents", _mmprolong(
            "synth-docs", "--out", str(docs), "--docs", "8", "--min-pages", "4", "--max-pages", "8",
            "--page-width", "224", "--page-height", "336", "--font-size", "9", "--seed", "1"), timings)
        _run("dataset", _mmprolong(
            "build-data", "--input", str(docs / "records.jsonl"), "--output-prefix", str(data),
            "--tokenizer", str(tokenizer), "--seq-length", "4096", "--workers", "2", "--shard-size", "8"), timings)
        _run("inspect dataset", _mmprolong("inspect-data", str(data), "--sample", "0", "--packing", "4096"), timings)
        qa = _synth_qa(pdfs, synth_qa, tokenizer, timings)

        write_random_hf_checkpoint(VLConfig.preset("tiny-1k"), hf_dir, seed=0)
        for file in tokenizer.iterdir():  # the export copies the tokenizer from here
            shutil.copy(file, hf_dir / file.name)
        parity = _last_json(_run("parity with transformers", _mmprolong(
            "check-parity", "--hf-dir", str(hf_dir), "--atol", "1e-4"), timings))
        _run("convert HF -> Megatron (TP2)", _mmprolong(
            "convert", "hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(mcore_dir), "--tp", "2"), timings)

        _run("train (TP2, 2 ranks over gloo)", _two_ranks(
            "megatron_mmprolong.train", "--config", str(RECIPE), "--tensor-model-parallel-size", "2",
            "--pretrained-checkpoint", str(mcore_dir), "--save", str(run_dir)), timings)
        losses = [json.loads(line)["loss"] for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]

        _run("export Megatron -> HF", _mmprolong(
            "convert", "mcore-to-hf", "--mcore-dir", str(run_dir), "--out", str(export),
            "--hf-template", str(hf_dir)), timings)
        verify = _last_json(_run("verify the export (TP2)", _mmprolong(
            "convert", "verify", "--hf-dir", str(export), "--mcore-dir", str(run_dir), "--tp", "2",
            "--atol", "1e-4"), timings))
        scores = _last_json(_run("dataset questions on the exported model (transformers)", _mmprolong(
            "eval", "qa", "--hf-dir", str(export), "--data", str(data), "--out", str(OUT / "eval_qa.json")),
            timings))
        pages = ["--per-cell", "1", "--train-length", "4096", "--page-width", "224", "--page-height", "336",
                 "--font-size", "9"]
        needle = _last_json(_run("needle grid, 1K-8K tokens (trained at 4K)", _mmprolong(
            "eval", "needle", "--hf-dir", str(export), "--out", str(OUT / "needle"),
            "--lengths", "1024", "2048", "4096", "8192", *pages), timings))
        _run("the 8K column on the trained Megatron checkpoint, CP2 (2 ranks)", _two_ranks(
            "megatron_mmprolong.cli", "eval", "needle", "--mcore-dir", str(run_dir), "--cp", "2", "--dtype", "fp32",
            "--tokenizer", str(export), "--out", str(OUT / "needle-cp2"), "--lengths", "8192", *pages), timings)
        same, asked = _same_answers(OUT / "needle-cp2" / "answers.jsonl", OUT / "needle" / "answers.jsonl")
        by_position = _last_json(_run("loss by position", _mmprolong(
            "eval", "position-loss", "--hf-dir", str(export), "--data", str(data), "--out", str(OUT / "position_loss"),
            "--bucket-size", "256"), timings))
        bench = _mmlongbench(export, timings)
        video = _video(export, timings)
    except DemoError as err:
        print(f"\ndemo: {err}", file=sys.stderr)
        return 1

    k = max(1, len(losses) // 6)
    print("\n== summary")
    print(f"outputs under {OUT}")
    for title, seconds in timings.items():
        print(f"  {seconds:7.1f} s  {title}")
    print(f"  {time.perf_counter() - started:7.1f} s  in all")
    print(f"parity with transformers: max |logit difference| {parity['max_abs_logit_diff']:.2e}")
    print(f"training: {len(losses)} steps, loss {sum(losses[:k]) / k:.3f} (first {k}) -> "
          f"{sum(losses[-k:]) / k:.3f} (last {k})")
    print(f"export: max |logit difference| {verify['max_abs_logit_diff']:.2e} against the trained checkpoint")
    by_task = ", ".join(f"{task} {score['exact_match']:.0%}" for task, score in scores["by_task"].items())
    print(f"synth-qa: {qa['questions']} questions on {qa['documents']['used']} PDFs, "
          f"{qa['accepted_total']} accepted and verified ({_counts(qa['accepted'])}), rejects: "
          f"{_counts(qa['rejects']) or 'none'}; {qa['samples']} samples built")
    print(f"questions: {scores['samples']} answered, exact match {scores['exact_match']:.1%} ({by_task})")
    by_length = ", ".join(f"{int(n) // 1024}K {s['exact_match']:.0%}" for n, s in needle["by_length"].items())
    losses_by_position = ", ".join(f"{b['start']}-{b['end']} {b['loss']:.2f}" for b in by_position["buckets"] if b["loss"])
    print(f"loss by position: {losses_by_position}")
    print(f"needle grid: {needle['samples']} documents, exact match {by_length}; heat map {OUT / 'needle' / 'needle.png'}")
    print(f"needle 8K column on the Megatron checkpoint at CP2: {same} of {asked} answers equal to the export's "
          f"(transformers); heat map {OUT / 'needle-cp2' / 'needle.png'}")
    doc, niah, replies = bench["categories"]["docqa"]["avg"]["8"], bench["categories"]["niah"]["avg"]["8"], bench["replies"]
    print(f"MMLongBench layout (toy data, 8K): document QA AVG {doc['judge']:.1f} (judge) / {doc['rule']:.1f} (rule), "
          f"MM-NIAH AVG {niah['rule']:.1f}; {replies['samples']} replies, {replies['truncated']} cut at 128 tokens; "
          f"plot {OUT / 'mmlongbench' / 'scores.png'}")
    print(f"Video-MME layout (toy videos): {video['samples']} questions, accuracy {video['accuracy']:.1f}; "
          f"plot {OUT / 'video' / 'scores.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
