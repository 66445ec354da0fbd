"""Every verb on bad input: exit status 2 (1 for a failure found while running), one line naming
the file or argument, no traceback, nothing written by a run that failed before starting.

Most cases call `main(argv)` in this process (an exception escaping it is the traceback the
user would have seen); a few run as real processes: the `mmprolong` entry point, torchrun, and
`convert verify --pp 2`, which starts processes of its own."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_mmprolong.cli import build_parser, main

from conftest import tiny_config

TINY_PAGES = dict(min_pages=4, max_pages=4, page_width=224, page_height=336, font_size=9)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Good inputs (a tokenizer, one document, its dataset, a 3-layer HF checkpoint and its
    Megatron conversion) and bad ones, by placeholder name."""
    import yaml

    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("bad-input")

    def write(name: str, text: str) -> str:
        (root / name).write_text(text)
        return str(root / name)

    rejected = write("rejected.jsonl", json.dumps({
        "id": "a", "task": "extract-single", "pages": [str(root / "missing.png")], "question": "q", "answer": "a",
        "evidence_pages": [1]}) + "\n")
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    records = synth_docs(root / "docs", SynthConfig(docs=1, seed=2, **TINY_PAGES))
    # one document and one reject: no file of the dataset is empty
    build_dataset([records, rejected], root / "data" / "ds", BuildConfig(tokenizer=str(tokenizer), seq_length=2048),
                  progress=False)
    write_random_hf_checkpoint(tiny_config(layers=3), root / "hf", seed=1)
    hf_to_mcore(root / "hf", root / "mcore", progress=False)
    for damaged in ("tokens.bin", "tokens.idx"):
        _truncate(_copy(root / "data" / "ds", root / f"damaged-{damaged}" / "ds"), damaged)

    def mixture(name: str, **dataset) -> str:
        return write(name, yaml.safe_dump({"token_budget": 20000, "seed": 1, "datasets": [dataset]}))

    (root / "garbage").write_bytes(b"\xff\xfe\x00\x81 not text")
    (root / "garbage-ds.manifest.json").write_bytes(b"\xff\xfe\x00\x81 not text")
    (root / "folder").mkdir()
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text("{")
    (root / "garbage-config").mkdir()
    (root / "garbage-config" / "config.json").write_bytes((root / "garbage").read_bytes())
    return {
        "root": str(root), "tok": str(tokenizer), "records": str(records), "ds": str(root / "data" / "ds"),
        "hf": str(root / "hf"), "mc": str(root / "mcore"), "folder": str(root / "folder"),
        "bad_config": str(root / "bad-config"), "missing": str(root / "missing"), "garbage": str(root / "garbage"),
        "garbage_ds": str(root / "garbage-ds"), "garbage_config": str(root / "garbage-config"),
        "short_bin": str(root / "damaged-tokens.bin" / "ds"), "short_idx": str(root / "damaged-tokens.idx" / "ds"),
        "empty_yaml": write("empty.yaml", ""), "bad_yaml": write("bad.yaml", "datasets: [unclosed\n"),
        "list_yaml": write("list.yaml", "- 1\n- 2\n"), "empty_jsonl": write("empty.jsonl", ""),
        "bad_jsonl": write("bad.jsonl", "{not json\n"), "rejected_jsonl": rejected,
        "mix": mixture("mix.yaml", path=str(root / "data" / "ds"), replacement=True),
        "mix_missing": mixture("mix-missing.yaml", path=str(root / "missing")),
        "mix_weight": mixture("mix-weight.yaml", path=str(root / "data" / "ds"), weight="heavy"),
        "mix_short_idx": mixture("mix-short-idx.yaml", path=str(root / "damaged-tokens.idx" / "ds")),
        "recipe_bad": write("recipe-bad.yaml", "lr: [1\n"),
        "recipe_type": write("recipe-type.yaml", "lr: fast\n"),
        "recipe_unknown": write("recipe-unknown.yaml", "learning_rate: 1.0e-5\n"),
    }


def _copy(prefix: Path, copy: Path) -> Path:
    """The dataset's files (manifest included) under the prefix `copy`."""
    copy.parent.mkdir(parents=True, exist_ok=True)
    for path in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(path, copy.parent / path.name.replace(prefix.name, copy.name, 1))
    return copy


def _truncate(prefix: Path, suffix: str) -> Path:
    """PREFIX.`suffix` cut to half its length."""
    damaged = Path(f"{prefix}.{suffix}")
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    return damaged


@dataclass(frozen=True)
class Case:
    argv: str  # placeholders {name} from `inputs`, and {out}: a path in a folder of the case's own
    names: str  # what the error line must contain
    status: int = 2
    leaves: tuple[str, ...] = ()  # what a run that failed while running may leave behind


CASES = [
    # model-info
    Case("model-info --preset nope", "'nope'"),
    Case("model-info --hf-dir {folder}", "{folder}"),
    Case("model-info --hf-dir {bad_config}", "{bad_config}/config.json"),
    Case("model-info --hf-dir {records}", "{records}"),
    Case("model-info --hf-dir {garbage_config}", "{garbage_config}/config.json"),
    # check-parity
    Case("check-parity --hf-dir {missing}", "{missing}"),
    Case("check-parity --hf-dir {hf} --atol lots", "--atol"),
    # convert
    Case("convert hf-to-mcore --hf-dir {missing} --out {out}", "{missing}"),
    Case("convert hf-to-mcore --hf-dir {hf} --out {out} --tp 3", "tensor_model_parallel_size 3"),
    Case("convert hf-to-mcore --hf-dir {hf} --out {folder}", "{folder} already exists"),
    Case("convert mcore-to-hf --mcore-dir {folder} --out {out}", "{folder} holds no checkpoint"),
    Case("convert mcore-to-hf --mcore-dir {missing} --out {out}", "{missing} holds no checkpoint"),
    Case("convert verify --hf-dir {hf} --mcore-dir {folder}", "{folder} holds no checkpoint"),
    Case("convert verify --hf-dir {folder} --mcore-dir {mc}", "{folder}"),
    # checked before any process starts (it failed in each spawned rank, 40 lines of traceback)
    Case("convert verify --hf-dir {hf} --mcore-dir {mc} --pp 2", "--decoder-first-pipeline-num-layers"),
    Case("convert verify --hf-dir {hf} --mcore-dir {mc} --pp 2 --decoder-first-pipeline-num-layers 3",
         "decoder_first_pipeline_num_layers 3"),
    # synth-docs
    Case("synth-docs --out {out} --min-pages 2", "--min-pages 2"),
    Case("synth-docs --out {out} --docs 0", "--docs 0"),
    Case("synth-docs --out {records}", "--out {records} is a file"),
    # build-data
    Case("build-data --input {missing} --output-prefix {out}/x --tokenizer {tok}", "{missing}"),
    Case("build-data --input {empty_jsonl} --output-prefix {out}/x --tokenizer {tok}", "{empty_jsonl}"),
    Case("build-data --input {folder} --output-prefix {out}/x --tokenizer {tok}", "--task"),
    Case("build-data --input {records} --output-prefix {out}/x --tokenizer {missing}", "{missing}"),
    Case("build-data --input {records} --output-prefix {out}/x --tokenizer {tok} --seq-length 0", "--seq-length 0"),
    Case("build-data --input {records} --output-prefix {out}/x --tokenizer {tok} --shard-size 0", "--shard-size 0"),
    Case("build-data --input {records} --output-prefix {out}/x --tokenizer {tok} --workers two", "--workers"),
    # every record rejected: a failure found while running, the reasons kept
    Case("build-data --input {rejected_jsonl} --output-prefix {out}/x --tokenizer {tok}", "{out}/x.rejects.jsonl",
         status=1, leaves=("{out}/x.rejects.jsonl",)),
    Case("build-data --input {bad_jsonl} --output-prefix {out}/x --tokenizer {tok}", "{out}/x.rejects.jsonl",
         status=1, leaves=("{out}/x.rejects.jsonl",)),
    Case("build-data --input {garbage} --output-prefix {out}/x --tokenizer {tok}", "{out}/x.rejects.jsonl",
         status=1, leaves=("{out}/x.rejects.jsonl",)),
    Case("build-data --input {records} --output-prefix {out}/x --tokenizer {records}", "{records}"),
    # synth-qa
    Case("synth-qa --input {missing} --out {out} --offline --model m", "{missing}"),
    Case("synth-qa --input {folder} --out {out} --offline --model m --prompt-file {bad_yaml}", "{bad_yaml}"),
    Case("synth-qa --input {folder} --out {out} --offline --model m --tasks nonsense", "--tasks"),
    Case("synth-qa --input {folder} --out {out} --offline --model m --prompt-file {garbage}", "{garbage}"),
    Case("synth-qa --input {folder} --out {out} --offline --model m --segment-pages 10 5", "--segment-pages 10 5"),
    Case("synth-qa --input {folder} --out {out} --endpoint http://127.0.0.1:9/v1", "--model"),
    # plan-data
    Case("plan-data {missing} --seq-length 2048 --global-batch-size 1 --out {out}/p", "{missing}"),
    Case("plan-data {empty_yaml} --seq-length 2048 --global-batch-size 1 --out {out}/p", "{empty_yaml}"),
    Case("plan-data {bad_yaml} --seq-length 2048 --global-batch-size 1 --out {out}/p", "{bad_yaml}"),
    Case("plan-data {list_yaml} --seq-length 2048 --global-batch-size 1 --out {out}/p", "{list_yaml}"),
    Case("plan-data {folder} --seq-length 2048 --global-batch-size 1 --out {out}/p", "{folder}"),
    Case("plan-data {garbage} --seq-length 2048 --global-batch-size 1 --out {out}/p", "{garbage}"),
    Case("plan-data {mix_weight} --seq-length 2048 --global-batch-size 1 --out {out}/p", "weight"),
    Case("plan-data {mix_missing} --seq-length 2048 --global-batch-size 1 --out {out}/p", "{missing}"),
    Case("plan-data {mix_short_idx} --seq-length 2048 --global-batch-size 1 --out {out}/p", "{short_idx}.tokens.idx"),
    Case("plan-data {mix} --seq-length 2048 --global-batch-size 0 --out {out}/p", "--global-batch-size 0"),
    Case("plan-data {mix} --seq-length 64 --global-batch-size 1 --out {out}/p", "--seq-length 64"),
    Case("plan-data {mix} --seq-length 2048 --global-batch-size 1 --context-parallel-size 0 --out {out}/p",
         "--context-parallel-size 0"),
    # plan
    Case("plan --preset nope", "'nope'"),
    Case("plan --hf-config {missing}", "{missing}"),
    Case("plan --seq-length 0", "sequence length"),
    Case("plan --recompute bogus", "bogus"),
    # inspect-data
    Case("inspect-data {missing}", "{missing}"),
    Case("inspect-data {ds} --sample 99", "--sample 99"),
    Case("inspect-data {ds} --packing 0", "--packing 0"),
    Case("inspect-data {short_bin}", "{short_bin}.tokens.bin"),
    Case("inspect-data {short_idx}", "{short_idx}.tokens.idx"),
    Case("inspect-data {garbage_ds}", "{garbage_ds}.manifest.json"),
    # eval
    Case("eval qa --hf-dir {hf} --data {missing}", "{missing}"),
    Case("eval qa --hf-dir {hf} --data {short_bin}", "{short_bin}.tokens.bin"),
    Case("eval qa --hf-dir {folder} --data {ds} --out {out}/qa.json", "{folder}"),
    Case("eval qa --mcore-dir {folder} --data {ds} --out {out}/qa.json", "{folder} holds no checkpoint"),
    Case("eval qa --hf-dir {hf} --data {ds} --limit 0 --out {out}/qa.json", "--limit 0: give the number of samples"),
    Case("eval qa --hf-dir {hf} --data {ds} --tasks ocr-full --out {out}/qa.json",
         "{ds} has no samples of --tasks ocr-full; its tasks are "),
    Case("eval needle --hf-dir {folder} --out {out}", "--tokenizer"),
    Case("eval needle --hf-dir {hf} --tokenizer {tok} --out {out} --depths 2", "depths"),
    Case("eval needle --hf-dir {hf} --tokenizer {tok} --out {out} --haystack {missing}", "--haystack {missing}"),
    Case("eval extend --hf-dir {hf} --tokenizer {tok} --records {missing} --out {out}", "--records {missing}"),
    Case("eval extend --hf-dir {hf} --tokenizer {tok} --records {empty_jsonl} --out {out}", "--records"),
    Case("eval extend --hf-dir {hf} --tokenizer {missing} --records {records} --out {out}", "{missing}"),
    Case("eval position-loss --hf-dir {hf} --data {short_bin} --out {out}", "{short_bin}.tokens.bin"),
    Case("eval position-loss --hf-dir {hf} --data {ds} --out {out} --bucket-size 0", "--bucket-size 0"),
    # the first-stage option is accepted as train accepts it; the run then needs its two ranks
    Case("eval position-loss --mcore-dir {mc} --data {ds} --out {out} --pp 2 --decoder-first-pipeline-num-layers 1",
         "--pp 2 needs 2 ranks"),
    Case("eval mmlongbench --hf-dir {hf} --data-root {missing} --out {out}", "{missing}"),
    Case("eval mmlongbench --endpoint http://127.0.0.1:9/v1 --data-root {folder} --out {out}", "--model"),
    Case("eval video --hf-dir {hf} --videomme-root {missing} --out {out}", "{missing}"),
    Case("eval video --endpoint http://127.0.0.1:9/v1 --mlvu-root {folder} --out {out}", "--model"),
    Case("eval vtcbench --hf-dir {hf} --data-root {missing} --out {out}", "{missing}"),
    Case("eval vtcbench-score --predictions {missing}", "{missing}"),
    Case("eval score --predictions {missing}", "{missing}"),
    Case("eval score --predictions {bad_jsonl} --out {out}", "{bad_jsonl}"),
    Case("eval score --predictions {empty_jsonl} --out {out}", "{empty_jsonl}"),
    Case("eval score --predictions {folder} --out {out}", "{folder}"),
    # train, in this process (torchrun below)
    Case("train --data-mix {mix_missing} --seq-length 2048 --global-batch-size 1 --save {out}", "{missing}"),
    Case("train --data-mix {mix_short_idx} --seq-length 2048 --global-batch-size 1 --save {out}",
         "{short_idx}.tokens.idx"),
    Case("train --data-plan {missing} --seq-length 2048 --global-batch-size 1 --save {out}", "{missing}"),
    Case("train --config {recipe_bad} --data-mix {mix} --save {out}", "{recipe_bad}"),
    Case("train --config {recipe_type} --data-mix {mix} --save {out}", "lr must be a float"),
    Case("train --config {recipe_unknown} --data-mix {mix} --save {out}", "learning_rate"),
    Case("train --config {missing} --data-mix {mix} --save {out}", "{missing}"),
    Case("train --config {folder} --data-mix {mix} --save {out}", "{folder}"),
    Case("train --config {garbage} --data-mix {mix} --save {out}", "{garbage}"),
    Case("train --data-mix {mix} --seq-length 2048 --global-batch-size 1 --load {folder} --save {out}",
         "{folder} holds no checkpoint"),
    Case("train --data-mix {mix} --seq-length 2048 --global-batch-size 1 --tensor-model-parallel-size 3 --save {out}",
         "TP x PP x CP = 3"),
    Case("train --data-mix {mix} --seq-length 2048 --global-batch-size 1 --lr fast --save {out}", "--lr"),
]


def _leaf_verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[str]:
    """Every runnable command line of the parser: 'model-info', 'convert verify', ..."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        return {" ".join(prefix)}
    return set().union(*(_leaf_verbs(sub, (*prefix, name)) for name, sub in actions[0].choices.items()))


def _verb(argv: list[str], leaves: set[str]) -> str:
    return next(" ".join(argv[:n]) for n in (2, 1) if " ".join(argv[:n]) in leaves)


def _files(*folders) -> set[Path]:
    return {p for folder in folders for p in Path(folder).rglob("*")}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line or "failed:" in line]


def test_the_table_covers_every_verb():
    leaves = _leaf_verbs(build_parser())
    assert {"train", "convert verify", "eval score", "inspect-data"} <= leaves
    covered = {_verb(case.argv.split(), leaves) for case in CASES}
    assert leaves - covered == set(), "verbs without a bad-input case"


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `mmprolong ARGV` in this process."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.argv.split("--out")[0].strip() for c in CASES])
def test_bad_input_is_one_line_and_an_exit_status(case, inputs, tmp_path, capsys, keeps_runtime):
    values = {**inputs, "out": str(tmp_path / "out")}
    before = _files(inputs["root"], tmp_path)
    status, out, err = _main(case.argv.format(**values).split(), capsys)
    assert "Traceback" not in out + err
    assert status == case.status, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert case.names.format(**values) in lines[0]
    left = _files(inputs["root"], tmp_path) - before
    assert left == {Path(p.format(**values)) for p in case.leaves} | {Path(p.format(**values)).parent
                                                                       for p in case.leaves}


# the command that meets each error of the first table of docs/troubleshooting.md, in its order
TROUBLESHOOTING = [
    "inspect-data {missing}",
    "inspect-data {short_bin}",
    "build-data --input {rejected_jsonl} --output-prefix {out}/x --tokenizer {tok}",
    "train --data-mix {mix} --seq-length 2048 --global-batch-size 1 --tensor-model-parallel-size 3",
    "convert verify --hf-dir {hf} --mcore-dir {mc} --pp 2",
]


def test_the_readme_troubleshooting_table_quotes_real_errors(inputs, tmp_path, capsys, keeps_runtime):
    page = (Path(__file__).parents[1] / "docs" / "troubleshooting.md").read_text()
    section = page.split("# Troubleshooting\n", 1)[1].split("\n## ")[0]
    quoted = [row.split("`")[1] for row in section.splitlines() if row.startswith("| `")]
    assert len(quoted) == len(TROUBLESHOOTING) == 5
    for text, command in zip(quoted, TROUBLESHOOTING):
        # placeholders (PREFIX, N, ...) stand for any text
        pattern = "".join(".+?" if re.fullmatch(r"[A-Z]+|\.\.\.", part) else re.escape(part)
                          for part in re.split(r"(\b[A-Z]+\b|\.\.\.)", text))
        argv = command.format(**inputs, out=str(tmp_path / "out")).split()
        line = _error_lines(_main(argv, capsys)[2])[0]
        assert re.search(pattern, line), (text, line)


# ---- the cases of the issue, one assertion each ----------------------------------------------

def test_synth_docs_min_pages_2_is_a_sentence(tmp_path, capsys):
    assert main(["synth-docs", "--out", str(tmp_path / "docs"), "--min-pages", "2"]) == 2
    assert "need 4 <= min_pages <= max_pages" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists()


def test_plan_data_creates_the_out_folder(inputs, tmp_path, capsys):
    out = tmp_path / "some" / "missing" / "dir" / "plan"
    assert main(["plan-data", inputs["mix"], "--seq-length", "2048", "--global-batch-size", "1",
                 "--out", str(out)]) == 0
    assert Path(f"{out}.npz").is_file() and Path(f"{out}.json").is_file()


def test_inspect_data_verify_checks_the_checksums(inputs, tmp_path, capsys):
    assert main(["inspect-data", inputs["ds"], "--verify", "--histogram", str(tmp_path / "h" / "lengths.png")]) == 0
    assert "checksums of 11 files match" in capsys.readouterr().out


def test_build_data_with_every_record_rejected_fails_and_says_where(inputs, tmp_path, capsys):
    prefix = tmp_path / "all-rejected"
    assert main(["build-data", "--input", inputs["rejected_jsonl"], "--output-prefix", str(prefix),
                 "--tokenizer", inputs["tok"]]) == 1
    assert f"the reason for each is in {prefix}.rejects.jsonl" in capsys.readouterr().err
    assert json.loads(Path(f"{prefix}.rejects.jsonl").read_text())["kind"] == "bad-image"
    assert not Path(f"{prefix}.manifest.json").exists() and not Path(f"{prefix}.build").exists()


def test_check_parity_names_the_transformers_mrope_difference(tmp_path, capsys, runtime):
    import dataclasses

    from megatron_mmprolong.convert.parity import default_samples, known_difference
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    config = tiny_config()
    fast_video = dataclasses.replace(config, vision=dataclasses.replace(config.vision, tokens_per_second=8))
    write_random_hf_checkpoint(fast_video, tmp_path / "hf", seed=1)
    assert main(["check-parity", "--hf-dir", str(tmp_path / "hf")]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["known_difference"].startswith("vision tokens_per_second 8")
    assert "transformers >= 5" in _error_lines(err)[0]
    assert known_difference(config, default_samples(config)) is None  # the default rate of 2 is not flagged


def _run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("mmprolong")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "megatron_mmprolong.cli"]


def test_the_installed_entry_point_prints_no_traceback(tmp_path):
    done = _run([*_entry_point(), "synth-docs", "--out", str(tmp_path / "docs"), "--min-pages", "2"], 120)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "mmprolong synth-docs: error: --min-pages 2 --max-pages 50: synthetic documents need 4 <= min_pages "
        "<= max_pages (two facts of each kind)"]


def test_torchrun_train_with_a_missing_dataset_says_so_once_before_building(inputs, tmp_path):
    """Rank 0 reads the mixture and its datasets before any model is built and says what is
    wrong once for both ranks; torchrun then reports the failed worker in its own words (its
    ChildFailedError summary)."""
    done = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                 "megatron_mmprolong.train", "--data-mix", inputs["mix_missing"], "--seq-length", "2048",
                 "--global-batch-size", "1", "--save", str(tmp_path / "save")], 180)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("mmprolong train: error:") == 1
    assert f"{inputs['missing']}.manifest.json is missing" in output
    assert not re.search(r'File ".*megatron_mmprolong/', output)  # torchrun's traceback has only its own frames
    assert not (tmp_path / "save").exists()


def test_convert_verify_pp2_with_tied_embeddings_and_an_uneven_first_stage_runs_on_cpu(tmp_path):
    """Megatron-Core syncs the tied embedding copies with `Tensor.cuda()`; on the CPU it stays
    there (cpu_shims). Three layers over two stages need --decoder-first-pipeline-num-layers."""
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    write_random_hf_checkpoint(tiny_config(tied=True, layers=3), tmp_path / "hf", seed=1)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", progress=False)
    done = _run([*_entry_point(), "convert", "verify", "--hf-dir", str(tmp_path / "hf"), "--mcore-dir",
                 str(tmp_path / "mcore"), "--pp", "2", "--decoder-first-pipeline-num-layers", "1"], 300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["passed"] and report["pipeline_parallel"] == 2


# ---- dataset integrity -------------------------------------------------------------------------

def _store_files(prefix: str) -> list[str]:
    from megatron_mmprolong.data.store import file_names

    return [path.name[len(Path(prefix).name) + 1:] for path in file_names(prefix)]


DATASET_FILES = ["tokens.bin", "tokens.idx", "loss_spans.bin", "loss_spans.idx", "images.bin", "images.idx",
                 "image_grids.npy", "samples.npy", "ids.json", "rejects.jsonl", "sequence_checksums.npy"]


def test_the_manifest_records_every_file(inputs):
    manifest = json.loads(Path(f"{inputs['ds']}.manifest.json").read_text())
    assert sorted(manifest["sizes"]) == sorted(manifest["checksums"]) == sorted(_store_files(inputs["ds"]))
    assert sorted(DATASET_FILES) == sorted(_store_files(inputs["ds"]))
    assert all(manifest["sizes"][f] == Path(f"{inputs['ds']}.{f}").stat().st_size for f in DATASET_FILES)


@pytest.mark.parametrize("suffix", DATASET_FILES)
def test_opening_names_a_truncated_file(suffix, inputs, tmp_path):
    from megatron_mmprolong.data.store import MultimodalStore, StoreError

    copy = _copy(Path(inputs["ds"]), tmp_path / "ds")
    _truncate(copy, suffix)
    with pytest.raises(StoreError, match=f"{copy}.{suffix} has .* bytes, the build wrote"):
        MultimodalStore(copy)


@pytest.mark.parametrize("suffix", DATASET_FILES)
def test_verify_names_a_changed_file_of_the_same_size(suffix, inputs, tmp_path, capsys):
    from megatron_mmprolong.data.store import MultimodalStore, StoreError

    copy = _copy(Path(inputs["ds"]), tmp_path / "ds")
    changed = Path(f"{copy}.{suffix}")
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    assert main(["inspect-data", str(copy), "--verify"]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"mmprolong inspect-data: error: {changed}: the content differs from the build's checksum (the file "
        "changed after the build); rebuild the dataset or restore the file"]
    try:  # the sizes agree: opening checks the small files (naming the file), the .bin files are checked as read
        MultimodalStore(copy)
    except StoreError as err:
        assert str(err).startswith(f"dataset {copy}: ") and f"{changed} differs from the build's checksum" in str(err)


def test_a_missing_file_is_named(inputs, tmp_path):
    from megatron_mmprolong.data.store import MultimodalStore, StoreError

    copy = _copy(Path(inputs["ds"]), tmp_path / "ds")
    Path(f"{copy}.images.bin").unlink()
    with pytest.raises(StoreError, match=f"{copy}.images.bin is missing"):
        MultimodalStore(copy)


def test_a_dataset_built_before_sizes_were_recorded_still_opens(inputs, tmp_path):
    from megatron_mmprolong.data.store import MultimodalStore

    copy = _copy(Path(inputs["ds"]), tmp_path / "ds")
    manifest = json.loads(Path(f"{copy}.manifest.json").read_text())
    del manifest["sizes"]  # as format 1 first wrote it: no sizes, no checksums read by
    del manifest["integrity"], manifest["manifest_checksum"]
    manifest["format_version"] = 1
    Path(f"{copy}.manifest.json").write_text(json.dumps(manifest))
    assert len(MultimodalStore(copy)) == len(MultimodalStore(inputs["ds"]))


def test_an_error_raised_in_a_loader_worker_is_one_line_without_its_traceback():
    """torch re-raises a DataLoader worker's exception with the worker's traceback in its message."""
    from torch._utils import ExceptionWrapper

    from megatron_mmprolong.data.store import StoreError
    from megatron_mmprolong.errors import BAD_INPUT, one_line, status

    try:
        raise StoreError("data/x.images.bin: image 0 of sample 3 (doc-1) cannot be used (truncated)")
    except StoreError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(StoreError) as caught:
        wrapped.reraise()
    assert "Traceback" in str(caught.value)  # what torch hands back
    assert one_line(caught.value) == "data/x.images.bin: image 0 of sample 3 (doc-1) cannot be used (truncated)"
    assert status(caught.value) == BAD_INPUT
