"""A dataset is checked as training and eval read it (issue 28): one flipped byte in any file the
readers use is found when the dataset is opened or when the damaged sample is read, in one line
naming the dataset, the sample and the file; the manifest carries a checksum of itself; a build
reuses a kept shard only when its content is what the shard's build wrote."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_mmprolong.cli import main
from megatron_mmprolong.data.build import BuildConfig, build_dataset
from megatron_mmprolong.data.store import MultimodalStore, StoreError, file_names

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1  # the sample the tests damage (not the first, so that an offset error shows)
HEADER = 34  # MMIDIDX: magic 9, version 8, dtype code 1, sequence count 8, document count 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(prefix, records, tokenizer) of a tiny dataset of a few multi-page samples."""
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("integrity")
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    records = synth_docs(root / "docs", SynthConfig(docs=2, min_pages=4, max_pages=5, page_width=224,
                                                    page_height=336, font_size=9, seed=4))
    rejected = root / "rejected.jsonl"  # one reject: no file of the dataset is empty
    rejected.write_text(json.dumps({"id": "a", "task": "extract-single", "pages": [str(root / "missing.png")],
                                    "question": "q", "answer": "a", "evidence_pages": [1]}) + "\n")
    prefix = root / "data" / "ds"
    build_dataset([records, rejected], prefix, _config(tokenizer), progress=False)
    return prefix, records, tokenizer


def _config(tokenizer, **kw) -> BuildConfig:
    return BuildConfig(tokenizer=str(tokenizer), seq_length=2048, **{"shard_size": 2, **kw})


def _copy(prefix: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    for path in [*file_names(prefix), Path(f"{prefix}.manifest.json")]:
        if path.exists():
            shutil.copy(path, f"{dest}{path.name[len(prefix.name):]}")
    return dest


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    assert 0 <= offset < len(data)
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, pointers) of an MMIDIDX .idx file."""
    data = path.read_bytes()
    count = struct.unpack("<Q", data[18:26])[0]
    lengths = np.frombuffer(data, np.int32, count, HEADER)
    return lengths, np.frombuffer(data, np.int64, count, HEADER + 4 * count)


def _npy_row_offset(path: Path, row: int, field: str | None = None) -> int:
    """Byte offset of `row` (and its `field`) in a .npy file."""
    array = np.load(path, mmap_mode="r")
    header = array.offset
    offset = header + row * array.dtype.itemsize * (array.shape[1] if array.ndim == 2 else 1)
    return offset + (array.dtype.fields[field][1] if field else 0)


def _image_row(prefix: Path, sample: int, which: str = "first") -> int:
    row = np.load(f"{prefix}.samples.npy")[sample]
    assert row["num_images"] >= 2
    return int(row["first_image"]) + (1 if which == "second" else 0)


def _damage(prefix: Path, case: str) -> str:
    """Flip one byte of `prefix` as `case` says; the file it changed."""
    n = len(np.load(f"{prefix}.samples.npy"))
    name, _, part = case.partition(":")
    path = Path(f"{prefix}.{name}")
    if name in ("tokens.bin", "loss_spans.bin"):
        lengths, pointers = _index(Path(f"{prefix}.{name[:-4]}.idx"))
        _flip(path, int(pointers[TARGET]) + 4 * (int(lengths[TARGET]) // 2), 0xFF)
    elif name == "images.bin":
        lengths, pointers = _index(Path(f"{prefix}.images.idx"))
        row = _image_row(prefix, TARGET, "second")
        _flip(path, int(pointers[row]) + int(lengths[row]) // 2, 0xFF)
    elif name.endswith(".idx"):
        lengths, _ = _index(path)
        count = len(lengths)
        row = _image_row(prefix, TARGET, "second") if name == "images.idx" else TARGET
        if part == "last":
            row = count - 1
        offset = {"length": HEADER + 4 * row, "last": HEADER + 4 * row, "pointer": HEADER + 4 * count + 8 * row,
                  "document": HEADER + 12 * count + 8 * (row + 1)}[part]
        _flip(path, offset)
    elif name == "samples.npy":
        _flip(path, _npy_row_offset(path, TARGET, part))
    elif name == "image_grids.npy":
        _flip(path, _npy_row_offset(path, _image_row(prefix, TARGET, "second")) + 4)  # its h
    else:
        _flip(path, path.stat().st_size // 2)
    return name


def _plan(prefix: Path, tmp_path: Path):
    from megatron_mmprolong.data.plan import MixtureSpec, PlanConfig, make_plan

    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"token_budget": 60000, "seed": 1,
                                   "datasets": [{"path": str(prefix), "replacement": True}]}))
    return make_plan(MixtureSpec.from_yaml(mix), PlanConfig(seq_length=2048, global_batch=1))


def _train_read(prefix: Path, tmp_path: Path, sample: int) -> None:
    """What training does: plan the mixture, then make the loader items that hold `sample`."""
    from megatron_mmprolong.data.loader import PackedSequences

    plan = _plan(prefix, tmp_path)
    dataset = PackedSequences(plan)
    packs = [i for i in range(plan.packs) if sample in plan.sample_refs[plan.pack(i)].tolist()]
    assert packs, "the plan does not use the damaged sample"
    for index in range(len(dataset)):
        if dataset.schedule[index] in packs:
            dataset[index]


def _eval_read(prefix: Path, sample: int) -> None:
    """What eval does with one sample: its prompt and answer, loss mask and pixels."""
    from megatron_mmprolong.data.pixels import decoder, sample_pixels
    from megatron_mmprolong.eval.dataset_qa import prompt_and_answer

    store = MultimodalStore(prefix)
    prompt_and_answer(store, sample)
    store.loss_mask(sample)
    sample_pixels(store, sample, decoder("pil"))


def _assert_names(err: StoreError, prefix: Path, file: str, sample: int | None) -> None:
    text = str(err)
    assert "\n" not in text, text
    assert f"dataset {prefix}" in text and f"{prefix}.{file}" in text, text
    if sample is not None:
        ident = json.loads(Path(f"{prefix}.ids.json").read_text())[sample]
        assert f"sample {sample} ({ident})" in text, text


# ---- a flipped byte in each file --------------------------------------------------------------

READ_CASES = ["tokens.bin", "loss_spans.bin", "images.bin"]
OPEN_CASES = ["tokens.idx:length", "tokens.idx:pointer", "tokens.idx:document", "tokens.idx:last",
              "loss_spans.idx:length", "images.idx:length", "images.idx:pointer", "images.idx:last",
              "samples.npy:num_images", "samples.npy:tokens", "image_grids.npy"]


@pytest.mark.parametrize("case", READ_CASES)
def test_a_flipped_data_byte_stops_training_and_eval_at_the_sample(case, built, tmp_path):
    prefix = _copy(built[0], tmp_path / "ds")
    file = _damage(prefix, case)
    store = MultimodalStore(prefix)  # opening reads no sample
    for other in range(len(store)):
        if other != TARGET:
            _eval_read(prefix, other)  # the other samples are fine
    with pytest.raises(StoreError) as caught:
        _eval_read(prefix, TARGET)
    _assert_names(caught.value, prefix, file, TARGET)
    with pytest.raises(StoreError) as caught:
        _train_read(prefix, tmp_path, TARGET)
    _assert_names(caught.value, prefix, file, TARGET)


def _expected_sample(prefix: Path, case: str) -> int:
    if case.endswith(":last"):
        return len(np.load(f"{prefix}.samples.npy")) - 1
    return TARGET


@pytest.mark.parametrize("case", OPEN_CASES)
def test_a_flipped_index_byte_is_refused_on_opening(case, built, tmp_path):
    prefix = _copy(built[0], tmp_path / "ds")
    expected = _expected_sample(prefix, case)
    file = _damage(prefix, case)
    with pytest.raises(StoreError) as caught:
        MultimodalStore(prefix)
    _assert_names(caught.value, prefix, file, expected)
    with pytest.raises(StoreError) as caught:
        _train_read(prefix, tmp_path, TARGET)
    _assert_names(caught.value, prefix, file, expected)


@pytest.mark.parametrize("file", ["ids.json", "sequence_checksums.npy", "tokens.idx:header"])
def test_other_damage_read_at_opening_names_the_file(file, built, tmp_path):
    prefix = _copy(built[0], tmp_path / "ds")
    name = file.partition(":")[0]
    if file.endswith(":header"):
        _flip(Path(f"{prefix}.{name}"), 9)  # the format version
    else:
        _damage(prefix, file)
    with pytest.raises(StoreError) as caught:
        MultimodalStore(prefix)
    _assert_names(caught.value, prefix, name, None)


def test_verify_still_reads_every_file(built, tmp_path, capsys):
    prefix = _copy(built[0], tmp_path / "ds")
    assert main(["inspect-data", str(prefix), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "checksums of 11 files match" in out and "crc32 of every sample and image, checked as they are read" in out
    _damage(prefix, "rejects.jsonl")  # no reader uses it: opening does not read it, --verify does
    MultimodalStore(prefix)
    assert main(["inspect-data", str(prefix), "--verify"]) == 2
    assert f"{prefix}.rejects.jsonl: the content differs" in capsys.readouterr().err


def test_megatron_still_reads_the_token_file(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = built[0]
    store = MultimodalStore(prefix)
    tokens, images = IndexedDataset(f"{prefix}.tokens"), IndexedDataset(f"{prefix}.images")
    assert len(tokens) == len(store)
    assert all(np.array_equal(tokens[i], store.tokens[i]) for i in range(len(store)))
    assert all(np.array_equal(store.images[r], images[r]) for r in range(len(store.images)))


def test_loader_workers_get_checked_stores(built, tmp_path):
    """The stores travel to spawned loader workers (pickled) and still check what they read."""
    import pickle

    prefix = _copy(built[0], tmp_path / "ds")
    store = MultimodalStore(prefix)
    store.tokens[TARGET]
    again = pickle.loads(pickle.dumps(store.tokens))
    assert np.array_equal(again[TARGET], store.tokens[TARGET])
    _damage(prefix, "tokens.bin")
    with pytest.raises(StoreError, match=f"sample {TARGET} "):
        pickle.loads(pickle.dumps(store.tokens))[TARGET]


# ---- the manifest -----------------------------------------------------------------------------

def _edit_manifest(prefix: Path, edit) -> None:
    path = Path(f"{prefix}.manifest.json")
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def test_an_edited_manifest_is_refused(built, tmp_path, capsys):
    prefix = _copy(built[0], tmp_path / "ds")
    samples = json.loads(Path(f"{prefix}.manifest.json").read_text())["counts"]["samples"]
    _edit_manifest(prefix, lambda m: m["counts"].update(samples=samples + 70))
    with pytest.raises(StoreError) as caught:
        MultimodalStore(prefix)
    text = str(caught.value)
    assert "\n" not in text and f"{prefix}.manifest.json" in text and "checksum" in text and "edited" in text
    assert main(["inspect-data", str(prefix), "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"{prefix}.manifest.json" in err and "checksum" in err


def test_a_manifest_without_its_checksum_is_refused(built, tmp_path):
    prefix = _copy(built[0], tmp_path / "ds")
    _edit_manifest(prefix, lambda m: m.pop("manifest_checksum"))
    with pytest.raises(StoreError, match="has no checksum of itself"):
        MultimodalStore(prefix)


def test_a_reformatted_manifest_still_opens(built, tmp_path):
    """The checksum is of the content, not of the text: indentation and key order do not matter."""
    prefix = _copy(built[0], tmp_path / "ds")
    path = Path(f"{prefix}.manifest.json")
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=4))
    assert len(MultimodalStore(prefix)) == manifest["counts"]["samples"]


# ---- datasets built before the checksums -----------------------------------------------------

def _as_version_1(prefix: Path) -> None:
    """What the build wrote before this change: format 1, no checksums to read by."""
    Path(f"{prefix}.sequence_checksums.npy").unlink()

    def edit(m):
        m["format_version"] = 1
        for key in ("integrity", "manifest_checksum"):
            m.pop(key)
        for key in ("sizes", "checksums"):
            m[key].pop("sequence_checksums.npy")

    _edit_manifest(prefix, edit)


def test_a_dataset_built_before_checksums_opens_with_one_warning(built, tmp_path, capsys):
    from megatron_mmprolong.data import store as store_module

    prefix = _copy(built[0], tmp_path / "ds")
    _as_version_1(prefix)
    store_module._warned.discard(str(prefix))
    store = MultimodalStore(prefix)
    _eval_read(prefix, TARGET)
    MultimodalStore(prefix)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1, warnings
    assert str(prefix) in warnings[0] and "not verified" in warnings[0] and "rebuild" in warnings[0]
    assert len(store) == len(MultimodalStore(built[0]))
    assert main(["inspect-data", str(prefix), "--verify"]) == 0
    assert "none as read (format 1, built before per-sample checksums)" in capsys.readouterr().out


# ---- build shards -----------------------------------------------------------------------------

def _data_bytes(prefix: Path) -> dict:
    return {p.name: p.read_bytes() for p in [*file_names(prefix), Path(f"{prefix}.manifest.json")]}


@pytest.mark.parametrize("file", ["part.tokens.bin", "part.samples.npy", "done.json:old"])
def test_a_damaged_kept_shard_is_built_again(file, built, tmp_path, capsys):
    _, records, tokenizer = built
    config = _config(tokenizer, shard_size=3)
    prefix = tmp_path / "ds"
    report = build_dataset([records], prefix, config, keep_shards=True, progress=False)
    clean = _data_bytes(prefix)
    shards = sorted(Path(f"{prefix}.build").glob("shard-*"))
    assert len(shards) >= 2
    done = shards[0] / "done.json"
    if file == "done.json:old":  # a shard kept by a build before this change: no content checksums
        entry = json.loads(done.read_text())
        entry.pop("files")
        done.write_text(json.dumps(entry))
    else:
        target = shards[0] / file
        _flip(target, target.stat().st_size // 2, 0xFF)
    capsys.readouterr()
    again = build_dataset([records], prefix, config, keep_shards=True, overwrite=True, progress=False)
    assert again.shards_reused == len(shards) - 1
    assert _data_bytes(prefix) == clean
    err = capsys.readouterr().err
    assert str(shards[0]) in err and "building it again" in err
    assert report.samples == again.samples


# ---- the cost, measured -----------------------------------------------------------------------

def test_the_checksum_benchmark_prints_its_cost_ratio(built, tmp_path):
    _, _, tokenizer = built
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_checksum.py"), "--docs", "1", "--pages",
                           "4", "--page-width", "224", "--page-height", "336", "--rounds", "1", "--seq-length",
                           "2048", "--tokenizer", str(tokenizer), "--workdir", str(tmp_path / "bench")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for layout in ("one_rank_decoding_every_page", "tp2_cp4_rank_0"):
        assert result[layout]["loader_time_ratio"] > 0 and 0 < result[layout]["checks_over_loader"] < 1
