"""The training loader: one packed micro-batch sequence per item, for one data-parallel rank.

Each item holds, for a pack of whole samples (each padded to the layout's alignment):
`tokens` and `labels` [1, T] (next token within each sample; padding and the last token of a
sample predict nothing; with FP8 a trailing pad segment rounds T to the layout's pack multiple), `loss_mask` [1, T] (answer tokens only), `position_ids` [3, 1, T]
(M-RoPE, restarting at every sample), `cu_seqlens` / `max_seqlen`, `image_grid_thw` [images, 3]
of every image of the pack, and `pages`: uint8 RGB [pixels, 3] of only the images this rank
decodes (parallel/page_split.py: its TP slice of its CP share; none on pipeline stages without
the vision encoder), in the order `images_to_decode` gives. The model patchifies them on the
device (megatron_mmprolong/patchify.py).

The loader's prefetch is bounded in bytes as well as items: from the plan's grids, before any
decoding, `item_bytes_bound` bounds what one item of this rank can hold, and `make_dataloader`
keeps (workers x prefetch) items within the budget. Where CUDA is, items arrive pinned
(page-locked), so that the step's device copies do not block the host.

Items are a pure function of (plan, rank, index), so resuming is starting the sampler at the
number of micro-batches consumed; `LoaderState` is what a checkpoint stores.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megatron_mmprolong.data.pixels import decode_pages, decoder
from megatron_mmprolong.data.plan import Plan
from megatron_mmprolong.data.store import MultimodalStore, StoreError
from megatron_mmprolong.parallel.page_split import PageShare, images_to_decode
from megatron_mmprolong.positions import mrope_position_ids


@dataclass
class LoaderState:
    plan_digest: str
    rank: int
    data_parallel: int
    consumed: int = 0  # micro-batches of this rank already trained on

    def state_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_state_dict(cls, state: dict) -> "LoaderState":
        return cls(**state)


@dataclass
class Segment:
    """One sample of a pack: tokens, per-token loss mask, and the grids of its images."""

    tokens: np.ndarray  # int64
    loss_mask: np.ndarray  # bool, per token
    grids: np.ndarray  # int [images, 3]


def assemble_pack(segments: list[Segment], pages: np.ndarray, alignment, special: dict, merge: int) -> dict:
    """One packed micro-batch (see the module docstring) from whole samples and the pages this
    rank decoded."""
    pad = special["pad"]
    tokens, labels, loss, lengths = [], [], [], []
    for segment in segments:
        text = segment.tokens
        padded = int(alignment.pad(np.array([len(text)]))[0])
        extra = padded - len(text)
        tokens.append(np.concatenate([text, np.full(extra, pad)]))
        labels.append(np.concatenate([text[1:], np.full(extra + 1, pad)]))
        loss.append(np.concatenate([segment.loss_mask[1:], np.zeros(extra + 1, dtype=bool)]))
        lengths.append(padded)
    trailing = alignment.pack_length([len(s.tokens) for s in segments]) - sum(lengths)
    if trailing:  # FP8: the pack to whole row blocks per rank, as a segment of its own
        tokens.append(np.full(trailing, pad))
        labels.append(np.full(trailing, pad))
        loss.append(np.zeros(trailing, dtype=bool))
        lengths.append(trailing)
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lengths)
    input_ids = torch.from_numpy(np.concatenate(tokens).astype(np.int64))[None]
    grid = torch.from_numpy(np.concatenate([s.grids for s in segments]).astype(np.int64).reshape(-1, 3))
    cu_seqlens = torch.from_numpy(cu)
    return {
        "tokens": input_ids,
        "labels": torch.from_numpy(np.concatenate(labels).astype(np.int64))[None],
        "loss_mask": torch.from_numpy(np.concatenate(loss).astype(np.float32))[None],
        "position_ids": mrope_position_ids(
            input_ids, image_token_id=special["image_pad"], video_token_id=special["video_pad"],
            spatial_merge_size=merge, image_grid_thw=grid if len(grid) else None, cu_seqlens=cu_seqlens,
        ),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(max(lengths)),
        "pages": torch.from_numpy(pages),
        "image_grid_thw": grid,
    }


# Host bytes of an item besides its pages, per token: tokens, labels, position ids (3) as int64,
# the loss mask as float32.
TEXT_BYTES_PER_TOKEN = 5 * 8 + 4


class PackedSequences(Dataset):
    def __init__(self, plan: Plan, rank: int = 0, data_parallel: int = 1,
                 image_backend: str = "pil", dali_device: str = "cpu", share: PageShare = PageShare()):
        """`rank` / `data_parallel`: this rank's data-parallel place; `share`: its place in the
        model replica, which says which pages it decodes."""
        self.plan, self.rank, self.data_parallel, self.share = plan, rank, data_parallel, share
        self.schedule = plan.rank_schedule(rank, data_parallel)
        self.image_backend, self.dali_device = image_backend, dali_device
        self._stores: list[MultimodalStore] | None = None
        self._decode = None
        first = MultimodalStore(plan.datasets[0]).manifest
        self.tokens = first["tokenizer"]["special_tokens"]
        self.merge = first["image"]["merge_size"]
        self.patch = first["image"]["patch_size"]

    def __len__(self) -> int:
        return len(self.schedule)

    def _open(self):
        # Opened lazily so that each loader worker maps the files itself.
        if self._stores is None:
            self._stores = [MultimodalStore(p) for p in self.plan.datasets]
            self._decode = decoder(self.image_backend, self.dali_device)
        return self._stores

    def __getitem__(self, index: int) -> dict:
        stores = self._open()
        refs = self.plan.pack(self.schedule[index])
        segments, ids, rows = [], [], []
        for dataset, sample in zip(self.plan.dataset_refs[refs], self.plan.sample_refs[refs]):
            store = stores[int(dataset)]
            segments.append(Segment(np.asarray(store.tokens[int(sample)], dtype=np.int64),
                                    store.loss_mask(int(sample)), store.image_grids(int(sample))))
            ids.append((int(dataset), int(sample)))
            rows += [(store, int(sample), row) for row in store.image_rows(int(sample))]
        grids = np.concatenate([s.grids for s in segments]).astype(np.int64).reshape(-1, 3)
        mine = images_to_decode(torch.from_numpy(grids), self.share)
        batch = assemble_pack(segments, self._pages([rows[i] for i in mine], grids[mine]),
                              self.plan.config.alignment, self.tokens, self.merge)
        batch["samples"] = ids
        return batch

    def _pages(self, rows: list[tuple[MultimodalStore, int, int]], grids: np.ndarray) -> np.ndarray:
        """The pages of (store, sample, image row)s, decoded in one batch; a bad one is named."""
        encoded = [store.images[row].tobytes() for store, _, row in rows]  # a damaged one names itself
        try:
            return decode_pages(encoded, grids, self._decode, self.patch)
        except Exception:  # PIL and DALI raise many kinds; find the image and say which it is
            for (store, sample, row), grid in zip(rows, grids):
                try:
                    decode_pages([store.images[row].tobytes()], grid[None], self._decode, self.patch)
                except Exception as err:
                    raise StoreError(f"{store.prefix}.images.bin: image {row} of sample {sample} "
                                     f"({store.ids[sample]}) cannot be used ({type(err).__name__}: {err})") from None
            raise

    def item_bytes_bound(self) -> int:
        """Most host bytes one item of this rank's schedule can hold, from the grids alone. The
        greedy image split leaves no rank more than the mean plus the largest image, at the CP
        and again at the TP split: pages <= all / (CP x TP) + largest x (1 + 1 / TP)."""
        if not len(self.schedule):
            return 0
        sample_pixels = np.zeros(len(self.plan.sample_refs), dtype=np.int64)
        sample_images = np.zeros(len(self.plan.sample_refs), dtype=np.int64)
        largest = 0
        for d, path in enumerate(self.plan.datasets):
            store = MultimodalStore(path)
            image = np.asarray(store.grids[:, 1], np.int64) * np.asarray(store.grids[:, 2], np.int64) * self.patch**2
            cumulative = np.concatenate([[0], np.cumsum(image)])
            chosen = np.nonzero(self.plan.dataset_refs == d)[0]
            rows = store.samples[self.plan.sample_refs[chosen]]
            first = rows["first_image"].astype(np.int64)
            sample_pixels[chosen] = cumulative[first + rows["num_images"]] - cumulative[first]
            sample_images[chosen] = rows["num_images"]
            largest = max(largest, int(image.max(initial=0)))

        def per_pack(values):
            cumulative = np.concatenate([[0], np.cumsum(values)])
            offsets = self.plan.pack_offsets
            return cumulative[offsets[self.schedule + 1]] - cumulative[offsets[self.schedule]]

        pixels = per_pack(sample_pixels)
        s = self.share
        pages = np.minimum(pixels, -(-pixels // (s.context_parallel * s.tensor_parallel)) + largest
                           + -(-largest // s.tensor_parallel))
        if not s.encodes_vision:
            pages = np.zeros_like(pages)
        samples = per_pack(np.ones(len(self.plan.sample_refs), dtype=np.int64))
        metadata = per_pack(sample_images) * 3 * 8 + (samples + 2) * 4  # grids int64, cu_seqlens int32
        return int((pages * 3 + metadata).max() + self.plan.config.seq_length * TEXT_BYTES_PER_TOKEN)


def make_dataloader(dataset: PackedSequences, state: LoaderState | None = None, num_workers: int = 2,
                    prefetch_factor: int = 2, prefetch_bytes: int | None = None,
                    pin_memory: bool | None = None) -> DataLoader:
    """Micro-batches from `state.consumed` on, in order, `num_workers` processes decoding ahead,
    each at most `prefetch_factor` items and, with `prefetch_bytes`, all of them together at
    most that many bytes (fewer items per worker, then fewer workers; at least one item).

    `pin_memory` (default: where CUDA is) gives the batches in page-locked memory, so that the
    step's `non_blocking` copies (training/step.py) are asynchronous: from pageable memory a copy
    blocks the host until the device has taken it. Workers cannot pin (pinned memory does not
    cross processes): the loader's pin thread in the training process copies each item out of
    the workers' shared memory as it arrives, on the device current when iteration starts
    (runtime.initialize sets it). While it copies it holds that item twice, which the byte
    budget counts as one more item."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    start = 0
    if state is not None:
        expected = (dataset.plan.digest(), dataset.rank, dataset.data_parallel)
        if (state.plan_digest, state.rank, state.data_parallel) != expected:
            raise ValueError(f"loader state is for plan {state.plan_digest} rank {state.rank}/{state.data_parallel}, "
                             f"not plan {expected[0]} rank {expected[1]}/{expected[2]}")
        start = state.consumed
    if num_workers and prefetch_bytes is not None:
        items = max(1, prefetch_bytes // max(1, dataset.item_bytes_bound()) - int(pin_memory))
        num_workers = min(num_workers, items)
        prefetch_factor = max(1, min(prefetch_factor, items // num_workers))
    return _WorkerStoppingLoader(
        dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=num_workers > 0,
        multiprocessing_context="spawn" if num_workers else None, worker_init_fn=_ignore_stop_signals,
        pin_memory=pin_memory,
    )


class _WorkerStoppingLoader(DataLoader):
    """A DataLoader whose workers are stopped before the interpreter's exit handlers run. They ignore
    SIGTERM (below), and multiprocessing's exit handler terminates daemon children with SIGTERM and
    then joins them: a process that exits with a live iterator (after an exception, or holding the
    loader in a traceback) would wait for its workers forever."""

    def _get_iterator(self):
        batches = super()._get_iterator()
        if self.num_workers:
            _live_iterators.add(batches)
        return batches


_live_iterators: "weakref.WeakSet" = weakref.WeakSet()


def _stop_live_workers() -> None:
    for batches in list(_live_iterators):
        batches._shutdown_workers()


# Registered after torch's and multiprocessing's own exit handlers (imported above), so it runs
# first: once torch's has run, `_shutdown_workers` does nothing.
atexit.register(_stop_live_workers)


@contextmanager
def loader_batches(loader: DataLoader):
    """`iter(loader)` whose workers are stopped as soon as the caller leaves, however it leaves."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a task (SIGUSR1 before the time limit, SIGTERM on preemption);
    the training process saves and stops, so its loader workers must outlive the signal."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
