"""Sampling targets, packing, mixtures, plans and the resumable loader."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from megatron_mmprolong.cli import main
from megatron_mmprolong.config import ConfigError
from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.data.loader import LoaderState, PackedSequences, make_dataloader
from megatron_mmprolong.data.packing import Alignment, balance, best_fit_decreasing, packing_report
from megatron_mmprolong.data.pixels import patchify_pages
from megatron_mmprolong.data.plan import MixtureSpec, Plan, PlanConfig, PlanError, make_plan
from megatron_mmprolong.data.sampling import SamplingError, default_bin_edges, length_bins, select
from megatron_mmprolong.data.store import MultimodalStore, StoreError
from megatron_mmprolong.parallel.context_parallel import assign_images
from megatron_mmprolong.parallel.page_split import PageShare, images_to_decode
from megatron_mmprolong.positions import mrope_position_ids

from conftest import CORPUS, QWEN_TOKENIZER
from multiprocess import run_ranks
from pages import old_host_patches

SEQ = 131072


def _pool(n=10000, tail=0.1, seed=0):
    rng = np.random.default_rng(seed)
    short = int(n * tail)
    lengths = np.concatenate([(32768 + 98304 * rng.beta(1.1, 1.4, n - short)).astype(np.int64),
                              np.exp(rng.uniform(np.log(1024), np.log(16384), short)).astype(np.int64)])
    tasks = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    order = rng.permutation(n)
    return lengths[order], tasks[order]


def _shares(lengths, values, count):
    return np.array([lengths[values == v].sum() for v in range(count)]) / lengths.sum()


@pytest.mark.parametrize(
    "length_target, replacement, budget_factor, tail",
    [("natural", False, 0.4, 0.1), ("long-biased", False, 0.3, 0.0), ("natural", True, 2.5, 0.1),
     ("uniform", True, 2.5, 0.1), ("long-biased", True, 2.5, 0.2), ([0, 0, 0, 1, 0, 0, 2, 1], True, 1.0, 0.1)],
)
def test_achieved_distributions_within_one_percent(length_target, replacement, budget_factor, tail):
    lengths, tasks = _pool(tail=tail)
    edges = default_bin_edges(SEQ)  # 0, 1K ... 64K, 128K: 8 bins
    task_weights = np.array([0.4, 0.4, 0.2])
    budget = int(lengths.sum() * budget_factor)
    chosen = select(lengths, tasks, edges, budget, np.random.default_rng(3), task_weights, length_target, replacement)
    picked = lengths[chosen.samples]
    assert abs(picked.sum() - budget) / budget < 0.001
    assert np.abs(_shares(picked, tasks[chosen.samples], 3) - task_weights).max() < 0.01
    bins = length_bins(lengths, edges)[chosen.samples]
    assert np.abs(_shares(picked, bins, len(edges) - 1) - chosen.target.sum(0)).max() < 0.01
    if length_target == "natural":
        assert np.abs(chosen.target.sum(0) - _shares(lengths, length_bins(lengths, edges), len(edges) - 1)).max() < 1e-6
    if not replacement:
        assert len(np.unique(chosen.samples)) == len(chosen.samples)


def test_long_biased_puts_most_tokens_in_the_top_bin():
    lengths, tasks = _pool(tail=0.0)
    edges = default_bin_edges(SEQ)
    chosen = select(lengths, tasks, edges, int(lengths.sum() * 0.3), np.random.default_rng(0), length_target="long-biased")
    assert chosen.target.sum(0)[-1] == pytest.approx(0.8, abs=0.01)


def test_sampling_errors():
    lengths, tasks = _pool(2000)
    edges = default_bin_edges(SEQ)
    with pytest.raises(SamplingError, match="sample with replacement"):
        select(lengths, tasks, edges, int(lengths.sum() * 2), np.random.default_rng(0))
    with pytest.raises(SamplingError, match="has weight but no samples"):
        select(lengths, tasks, edges, 10**6, np.random.default_rng(0), length_target=[0, 0, 0, 0, 0, 1, 0, 0])
    with pytest.raises(SamplingError, match="not one of"):
        select(lengths, tasks, edges, 10**6, np.random.default_rng(0), length_target="short-biased")


def test_variable_length_packing_beats_99_percent():
    lengths, _ = _pool(2000, tail=0.2)
    alignment = Alignment(context_parallel=4, tensor_parallel=2, sequence_parallel=True, fp8=True)
    assert alignment.multiple == 16
    packs = best_fit_decreasing(alignment.pad(lengths), SEQ)
    assert sorted(np.concatenate(packs).tolist()) == list(range(len(lengths)))  # every sample exactly once
    assert max(alignment.pad(lengths)[p].sum() for p in packs) <= SEQ
    report = packing_report(lengths, packs, SEQ, alignment)
    assert report.efficiency >= 0.99
    assert report.fixed_bin_efficiency < 0.97 and report.packs >= report.lower_bound_packs


def test_balance_gives_equal_counts_and_spreads_cost():
    costs = np.array([10.0, 9, 8, 1, 1, 1, 1, 1])
    split = balance(costs, 2)
    assert [len(s) for s in split] == [4, 4]
    assert sorted(np.concatenate(split).tolist()) == list(range(8))
    assert abs(costs[split[0]].sum() - costs[split[1]].sum()) <= 9
    with pytest.raises(ValueError, match="do not divide"):
        balance(costs[:7], 2)


# ---- plans and the loader over real datasets ------------------------------------------------

pytestmark_data = pytest.mark.skipif(not QWEN_TOKENIZER.is_dir(), reason="shared tokenizer missing")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two small datasets: synthetic QA on 450x590 pages (resized on build) and corpus OCR."""
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip("shared tokenizer missing")
    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs

    root = tmp_path_factory.mktemp("plan")
    records = synth_docs(root / "docs", SynthConfig(docs=4, min_pages=4, max_pages=6, page_width=450,
                                                    page_height=590, font_size=14, seed=5))
    config = BuildConfig(tokenizer=str(QWEN_TOKENIZER), seq_length=8192, dpi=40)
    build_dataset([records], root / "qa", config, progress=False)
    build_dataset([CORPUS], root / "ocr", config, ocr_task="ocr-full", progress=False)
    return root, records


def _mixture(root, **kw):
    spec = {"token_budget": kw.pop("budget", 40000), "seed": 7, "datasets": [
        {"path": "qa", "weight": 3, "tasks": {"extract-single": 0.5, "extract-multi": 0.3, "reasoning": 0.2},
         "replacement": kw.pop("replacement", True)},
        {"path": "ocr", "weight": 1, "replacement": True},
    ]}
    path = root / "mix.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _plan(root, global_batch=4, **kw):
    return make_plan(MixtureSpec.from_yaml(_mixture(root, **kw)),
                     PlanConfig(seq_length=8192, global_batch=global_batch,
                                alignment=Alignment(context_parallel=2, tensor_parallel=2, sequence_parallel=True),
                                data_parallel=2))


def test_plan_is_deterministic_and_round_trips(datasets, tmp_path):
    root, _ = datasets
    plan = _plan(root)
    again = _plan(root)
    assert plan.digest() == again.digest()
    plan.save(tmp_path / "p")
    loaded = Plan.load(tmp_path / "p")
    assert loaded.digest() == plan.digest() and loaded.summary == json.loads(json.dumps(plan.summary))
    summary = plan.summary
    assert summary["steps"] * 4 == summary["packs"] == plan.packs
    assert summary["tokens"] == int(plan.sample_tokens.sum())
    assert sum(d["tokens"] for d in summary["datasets"]) == summary["tokens"]
    assert summary["packing_efficiency"] > 0.97


def _segments(item):
    cu = item["cu_seqlens"].tolist()
    return [(a, b) for a, b in zip(cu, cu[1:])]


def test_loader_items_are_consistent_with_the_stores(datasets):
    root, _ = datasets
    plan = _plan(root)
    stores = [MultimodalStore(p) for p in plan.datasets]
    dataset = PackedSequences(plan, rank=1, data_parallel=2)
    tokens = dataset.tokens
    for item in [dataset[i] for i in range(len(dataset))]:
        segments = _segments(item)
        assert all((b - a) % 8 == 0 for a, b in segments)  # 2*CP*TP alignment
        ids, labels, loss = item["tokens"][0], item["labels"][0], item["loss_mask"][0].bool()
        patches = 0
        for (a, b), (d, s) in zip(segments, item["samples"]):
            store = stores[d]
            text = torch.from_numpy(np.asarray(store.tokens[s], dtype=np.int64))
            n = len(text)
            assert torch.equal(ids[a:a + n], text) and (ids[a + n:b] == tokens["pad"]).all()
            assert torch.equal(labels[a:a + n - 1], text[1:])
            assert torch.equal(loss[a:a + n - 1], torch.from_numpy(store.loss_mask(s)[1:])) and not loss[a + n - 1:b].any()
            grids = store.image_grids(s)
            alone = mrope_position_ids(ids[None, a:b], image_token_id=tokens["image_pad"], video_token_id=tokens["video_pad"],
                                       spatial_merge_size=2, image_grid_thw=torch.from_numpy(grids.astype(np.int64)))
            assert torch.equal(item["position_ids"][:, :, a:b], alone)  # positions restart per sample
            patches += int(np.prod(grids, axis=1).sum())
        assert item["pages"].dtype == torch.uint8 and item["pages"].shape == (patches * 14 * 14, 3)
        assert item["image_grid_thw"].shape[1] == 3


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_pixel_values_equal_the_transformers_processor(datasets, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    root, records = datasets
    plan = _plan(root)
    item = PackedSequences(plan, image_backend=backend)[0]
    stores = [MultimodalStore(p) for p in plan.datasets]
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    pages = [Image.open(io.BytesIO(b)) for d, s in item["samples"] for b in stores[d].image_bytes(s)]
    expected = processor(images=pages, return_tensors="pt")
    assert torch.equal(item["image_grid_thw"], expected["image_grid_thw"])
    assert (patchify_pages(item["pages"], item["image_grid_thw"], ImageParams()) - expected["pixel_values"]).abs().max() < 1e-5
    # and for the original 450x590 synthetic pages, resized by us at build time and by it now
    qa = stores[0]
    index = 0
    record = json.loads(records.read_text().splitlines()[qa.samples[index]["record"]])
    originals = [Image.open(records.parent / p) for p in record["pages"]]
    from megatron_mmprolong.data.pixels import decoder, pixel_values

    ours = pixel_values(qa.image_bytes(index), qa.image_grids(index), decoder(backend), qa.image_params)
    reference = processor(images=originals, return_tensors="np")
    assert np.array_equal(qa.image_grids(index), reference["image_grid_thw"])
    assert np.abs(ours - reference["pixel_values"]).max() < 1e-5


def _old_pixel_values(images: list[bytes]) -> np.ndarray:
    """The old loader's float pixels of a pack's stored images (PIL decode, then the oracle)."""
    out = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            out.append(old_host_patches(np.asarray(image.convert("RGB"))))
    return np.concatenate(out) if out else np.zeros((0, 1176), np.float32)


def _pack_images(stores, item) -> list[bytes]:
    return [b for d, s in item["samples"] for b in stores[d].image_bytes(s)]


def test_patchify_equals_the_old_host_pixel_values_bit_for_bit(datasets):
    root, _ = datasets
    plan = _plan(root, global_batch=2, budget=12000, replacement=False)
    stores = [MultimodalStore(p) for p in plan.datasets]
    dataset = PackedSequences(plan)
    sizes = set()
    for item in (dataset[i] for i in range(len(dataset))):
        old = torch.from_numpy(_old_pixel_values(_pack_images(stores, item)))
        assert torch.equal(patchify_pages(item["pages"], item["image_grid_thw"], ImageParams()), old)
        sizes |= {tuple(g) for g in item["image_grid_thw"].tolist()}
    assert len(sizes) > 1  # pages of several sizes in one pack


def _replica_pages(plan_path):
    """On a TP2 x PP2 rank, for each CP rank of a simulated CP2: the pages its loader gives, what
    the TP all-gather makes of them, how many images it decoded, and the prefetch bound."""
    from dataclasses import replace

    from megatron.core import parallel_state as ps

    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import ParallelConfig
    from megatron_mmprolong.parallel.page_split import gather_pages

    runtime.initialize(ParallelConfig(tensor_parallel=2, pipeline_parallel=2))
    plan = Plan.load(plan_path)
    here = PageShare.of_this_rank()
    out = {"share": here, "decoded": 0, "local": {}, "gathered": {}, "bound": {}}
    for cp_rank in range(2):
        share = replace(here, context_parallel=2, context_rank=cp_rank)
        dataset = PackedSequences(plan, share=share)
        dataset._open()
        decode = dataset._decode

        def counting(images, decode=decode):
            out["decoded"] += len(images)
            return decode(images)

        dataset._decode = counting
        items = [dataset[i] for i in range(len(dataset))]
        out["local"][cp_rank] = [item["pages"] for item in items]
        out["bound"][cp_rank] = (dataset.item_bytes_bound(), max(_item_bytes(item) for item in items))
        if here.encodes_vision:
            out["gathered"][cp_rank] = [gather_pages(item["pages"], item["image_grid_thw"], share,
                                                     ps.get_tensor_model_parallel_group(), 14, 2) for item in items]
    return out


def _item_bytes(item) -> int:
    return sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor))


def test_each_rank_decodes_only_the_pages_it_encodes(datasets, tmp_path):
    """TP2 x PP2 ranks, each loading for both ranks of a CP2: after the TP all-gather every CP
    rank's pages give exactly the rows of the old full pixel tensor that the model's
    `assign_images` makes it encode; the replica decodes each page once; the second pipeline
    stage decodes none; no item exceeds the loader's byte bound."""
    root, _ = datasets
    plan = _plan(root, global_batch=2, budget=12000, replacement=False)
    plan.save(tmp_path / "plan")
    results = run_ranks(_replica_pages, 4, str(tmp_path / "plan"))
    stores = [MultimodalStore(p) for p in plan.datasets]
    items = [PackedSequences(plan)[i] for i in range(plan.packs)]
    first = [r for r in results if r["share"].encodes_vision]
    later = [r for r in results if not r["share"].encodes_vision]
    assert len(first) == len(later) == 2
    assert all(r["decoded"] == 0 and all(len(p) == 0 for ps in r["local"].values() for p in ps) for r in later)
    total_images = sum(len(item["image_grid_thw"]) for item in items)
    assert total_images > 4 and sum(r["decoded"] for r in first) == total_images  # each page once per replica
    for index, item in enumerate(items):
        grids = item["image_grid_thw"]
        full = torch.from_numpy(_old_pixel_values(_pack_images(stores, item)))
        starts = torch.cumsum(grids.prod(-1), 0) - grids.prod(-1)
        for cp_rank, owned in enumerate(assign_images(grids.prod(-1), 2)):
            rows = torch.cat([torch.arange(int(starts[i]), int(starts[i] + grids[i].prod())) for i in owned]
                             + [torch.zeros(0, dtype=torch.long)])
            for result in first:
                mine = images_to_decode(grids, replace_share(result["share"], cp_rank))
                assert len(result["local"][cp_rank][index]) == int(grids[mine].prod(-1).sum()) * 196
                gathered = result["gathered"][cp_rank][index]
                assert torch.equal(patchify_pages(gathered, grids[owned], ImageParams()), full[rows])
    for result in results:
        for bound, largest in result["bound"].values():
            assert largest <= bound


def replace_share(share: PageShare, cp_rank: int) -> PageShare:
    from dataclasses import replace

    return replace(share, context_parallel=2, context_rank=cp_rank)


def test_a_corrupt_stored_image_names_the_sample_and_file(datasets, tmp_path):
    import shutil

    root, _ = datasets
    for path in root.glob("qa.*"):
        shutil.copy(path, tmp_path / path.name)
    plan = make_plan(MixtureSpec.from_yaml(_write_yaml(tmp_path / "mix.yaml", {
        "token_budget": 20000, "seed": 1, "datasets": [{"path": "qa", "replacement": True}]})),
        PlanConfig(seq_length=8192, global_batch=1))
    store = MultimodalStore(tmp_path / "qa")
    sample = next(int(s) for s in plan.sample_refs if store.samples[int(s)]["num_images"] > 1)
    row = int(store.samples[sample]["first_image"]) + 1
    start = int(store.images.index.sequence_pointers[row])
    length = int(store.images.index.sequence_lengths[row])
    with open(tmp_path / "qa.images.bin", "r+b") as f:
        f.seek(start + length // 3)
        f.write(b"\x00" * (length // 3))
    dataset = PackedSequences(plan)
    with pytest.raises(StoreError) as err:
        for i in range(len(dataset)):
            dataset[i]
    # the per-sequence checksum names it as it is read, before any decoder sees the bytes
    named = (f"dataset {tmp_path / 'qa'}: image {row} of sample {sample} ({store.ids[sample]}) in "
             f"{tmp_path / 'qa'}.images.bin differs from the build's checksum")
    assert named in str(err.value)
    with pytest.raises(StoreError, match=re.escape(named)):  # and so from a loader worker
        for _ in make_dataloader(dataset, num_workers=1):
            pass


def _write_yaml(path, content):
    path.write_text(yaml.safe_dump(content))
    return path


def test_prefetch_is_bounded_in_bytes(datasets):
    root, _ = datasets
    plan = _plan(root, global_batch=2, budget=12000, replacement=False)
    dataset = PackedSequences(plan)
    bound = dataset.item_bytes_bound()
    assert max(_item_bytes(dataset[i]) for i in range(len(dataset))) <= bound
    loader = make_dataloader(dataset, num_workers=4, prefetch_factor=4, prefetch_bytes=8 * bound)
    assert (loader.num_workers, loader.prefetch_factor) == (4, 2)
    loader = make_dataloader(dataset, num_workers=4, prefetch_factor=4, prefetch_bytes=3 * bound)
    assert (loader.num_workers, loader.prefetch_factor) == (3, 1)
    loader = make_dataloader(dataset, num_workers=4, prefetch_factor=4, prefetch_bytes=bound // 2)
    assert (loader.num_workers, loader.prefetch_factor) == (1, 1)  # one item at least
    smaller = PackedSequences(plan, share=PageShare(context_parallel=2, tensor_parallel=2))
    assert smaller.item_bytes_bound() < bound


def test_two_data_parallel_ranks_see_every_planned_sample_once(datasets):
    root, _ = datasets
    plan = _plan(root, global_batch=2, budget=12000, replacement=False)
    seen = []
    for rank in range(2):
        dataset = PackedSequences(plan, rank=rank, data_parallel=2)
        seen += [tuple(s) for i in range(len(dataset)) for s in dataset[i]["samples"]]
    planned = list(zip(plan.dataset_refs.tolist(), plan.sample_refs.tolist()))
    assert len(seen) == len(set(seen)) == len(planned) and set(seen) == set(planned)


def _first_batches(plan_path, rank, count, consumed):
    """Run in a fresh process: restore a loader state and return the next batches."""
    plan = Plan.load(plan_path)
    dataset = PackedSequences(plan, rank=rank, data_parallel=2)
    state = LoaderState(plan.digest(), rank, 2, consumed)
    batches = []
    for item in make_dataloader(dataset, state, num_workers=2):
        batches.append({k: v for k, v in item.items() if isinstance(v, torch.Tensor)})
        if len(batches) == count:
            break
    return batches


def test_resume_in_a_new_process_is_bit_exact(datasets, tmp_path):
    root, _ = datasets
    plan = _plan(root, global_batch=4, budget=100000)
    plan.save(tmp_path / "plan")
    dataset = PackedSequences(plan, rank=0, data_parallel=2)
    assert len(dataset) >= 5
    uninterrupted = []
    for item in make_dataloader(dataset, LoaderState(plan.digest(), 0, 2), num_workers=2):
        uninterrupted.append({k: v for k, v in item.items() if isinstance(v, torch.Tensor)})
    consumed = 3
    script = (
        "import sys, torch; sys.path.insert(0, {tests!r});"
        "from test_data_plan import _first_batches;"
        "torch.save(_first_batches({plan!r}, 0, {n}, {consumed}), {out!r})"
    ).format(tests=str(Path(__file__).parent), plan=str(tmp_path / "plan"), n=len(dataset) - consumed,
             consumed=consumed, out=str(tmp_path / "resumed.pt"))
    subprocess.run([sys.executable, "-c", script], check=True)
    resumed = torch.load(tmp_path / "resumed.pt")
    assert len(resumed) == len(uninterrupted) - consumed
    for a, b in zip(resumed, uninterrupted[consumed:]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="loader state is for plan"):
        make_dataloader(dataset, LoaderState("other", 0, 2, 1))


def test_loader_workers_outlive_slurm_stop_signals(datasets):
    """srun delivers SIGUSR1/SIGTERM to every process of a task, the loader's workers included;
    the training process needs them for the steps until it has saved."""
    import os
    import signal

    root, _ = datasets
    plan = _plan(root, global_batch=4, budget=100000)
    dataset = PackedSequences(plan, rank=0, data_parallel=2)
    loader = iter(make_dataloader(dataset, LoaderState(plan.digest(), 0, 2), num_workers=1))
    first = next(loader)
    for worker in loader._workers:
        os.kill(worker.pid, signal.SIGUSR1)
        os.kill(worker.pid, signal.SIGTERM)
    rest = list(loader)
    assert len(rest) == len(dataset) - 1 and torch.equal(first["tokens"], dataset[0]["tokens"])


def test_mixture_errors(datasets, tmp_path):
    root, _ = datasets
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": [{"path": str(root / "qa"), "tasks": {"summaries": 1}}],
                                   "token_budget": 1000}))
    with pytest.raises(PlanError, match=r"tasks \['summaries'\] are not in the dataset"):
        make_plan(MixtureSpec.from_yaml(bad), PlanConfig(8192, 1))
    bad.write_text(yaml.safe_dump({"datasets": [{"path": str(root / "qa")}]}))
    with pytest.raises(PlanError, match="token_budget"):
        MixtureSpec.from_yaml(bad)
    bad.write_text(yaml.safe_dump({"datasets": [{"path": str(root / "qa")}], "token_budget": 10**7}))
    with pytest.raises(PlanError, match="sample with replacement"):
        make_plan(MixtureSpec.from_yaml(bad), PlanConfig(8192, 1))


def test_cli_plan_data_and_packing_report(datasets, tmp_path, capsys):
    root, _ = datasets
    mixture = _mixture(root)
    assert main(["plan-data", str(mixture), "--seq-length", "8192", "--global-batch-size", "4",
                 "--context-parallel-size", "2", "--data-parallel-size", "2", "--out", str(tmp_path / "plan")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] >= 1 and 0 < summary["compute_utilisation"] <= 1
    assert Plan.load(tmp_path / "plan").digest() == summary["digest"]
    assert main(["inspect-data", str(root / "qa"), "--packing", "8192"]) == 0
    out = capsys.readouterr().out
    assert "ours (variable-length packs" in out and "first-fit in stored order" in out


# docs/planner.md's planned best layout and the 7B recipe's, both with FP8 GEMMs.
FP8_LAYOUTS = {"readme-tp4-cp16": Alignment(16, 4, True, True), "recipe-tp2-cp4": Alignment(4, 2, True, True)}


@pytest.mark.parametrize("layout", sorted(FP8_LAYOUTS))
def test_fp8_packs_give_every_rank_whole_fp8_row_blocks(datasets, layout):
    """Transformer Engine checks FP8 GEMM inputs on each rank's local rows (before the SP
    all-gather): rows % 8. Every pack of a real plan gives each CP x TP rank a multiple of 16
    rows, its samples stay multiples of 2*CP, and the pack stays within --seq-length."""
    root, _ = datasets
    alignment = FP8_LAYOUTS[layout]
    cp, tp = alignment.context_parallel, alignment.tensor_parallel
    plan = make_plan(MixtureSpec.from_yaml(_mixture(root)), PlanConfig(seq_length=8192, global_batch=2,
                                                                       alignment=alignment))
    dataset = PackedSequences(plan)
    for item in [dataset[i] for i in range(len(dataset))]:
        total = item["tokens"].shape[1]
        assert total // (cp * tp) % 16 == 0 and total % (cp * tp) == 0 and total <= 8192
        segments = _segments(item)
        assert all((b - a) % (2 * cp) == 0 for a, b in segments)
        assert len(segments) in (len(item["samples"]), len(item["samples"]) + 1)
        if len(segments) > len(item["samples"]):  # the trailing pad segment: no loss, pad tokens
            a, b = segments[-1]
            assert (item["tokens"][0, a:b] == dataset.tokens["pad"]).all() and not item["loss_mask"][0, a:b].any()
    report = plan.summary
    assert report["packing_efficiency"] <= 1.0


def test_pack_length_rounds_to_the_fp8_row_multiple():
    recipe = Alignment(4, 2, True, True)
    assert recipe.multiple == 16 and recipe.pack_multiple == 128
    assert recipe.pack_length([100, 30]) == 256  # 112 + 32 = 144 -> 256
    assert Alignment(4, 2, True).pack_length([100, 30]) == 144  # no FP8: samples' own multiple
    assert recipe.capacity(131072) == 131072 and recipe.capacity(131000) == 130944


def test_a_plan_without_fp8_pack_padding_is_refused_for_an_fp8_run():
    from megatron_mmprolong.training.loop import check_plan_alignment

    recipe_fp8, recipe_bf16 = Alignment(4, 2, True, True), Alignment(4, 2, True)
    check_plan_alignment(recipe_fp8, recipe_bf16)  # FP8 packs also serve a BF16 run
    check_plan_alignment(recipe_fp8, Alignment(2, 2, True, True))
    with pytest.raises(ConfigError, match="packs to 16; this layout needs 16 and 128"):
        check_plan_alignment(recipe_bf16, recipe_fp8)
