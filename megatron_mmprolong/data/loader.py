"""The training loader: one packed micro-batch sequence per item, for one data-parallel rank.

Each item holds, for a pack of whole samples (each padded to the layout's alignment):
`tokens` and `labels` [1, T] (next token within each sample; padding and the last token of a
sample predict nothing; with FP8 a trailing pad segment rounds T to the layout's pack multiple), `loss_mask` [1, T] (answer tokens only), `position_ids` [3, 1, T]
(M-RoPE, restarting at every sample), `cu_seqlens` / `max_seqlen`, and the sample's pages as
the model takes them: `pixel_values` [patches, 1176] float32 and `image_grid_thw` [images, 3].

Items are a pure function of (plan, rank, index), so resuming is starting the sampler at the
number of micro-batches consumed; `LoaderState` is what a checkpoint stores.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megatron_mmprolong.data.pixels import decoder, pixel_values
from megatron_mmprolong.data.plan import Plan
from megatron_mmprolong.data.store import MultimodalStore
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


def assemble_pack(segments: list[Segment], pixels: np.ndarray, alignment, special: dict, merge: int) -> dict:
    """One packed micro-batch (see the module docstring) from whole samples and their pixels."""
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
        "pixel_values": torch.from_numpy(pixels),
        "image_grid_thw": grid,
    }


class PackedSequences(Dataset):
    def __init__(self, plan: Plan, rank: int = 0, data_parallel: int = 1,
                 image_backend: str = "pil", dali_device: str = "cpu"):
        self.plan, self.rank, self.data_parallel = plan, rank, data_parallel
        self.schedule = plan.rank_schedule(rank, data_parallel)
        self.image_backend, self.dali_device = image_backend, dali_device
        self._stores: list[MultimodalStore] | None = None
        self._decode = None
        first = MultimodalStore(plan.datasets[0]).manifest
        self.tokens = first["tokenizer"]["special_tokens"]
        self.merge = first["image"]["merge_size"]
        self.patch = first["image"]["patch_size"]
        self.temporal = first["image"]["temporal_patch_size"]

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
        segments, images, ids = [], [], []
        for dataset, sample in zip(self.plan.dataset_refs[refs], self.plan.sample_refs[refs]):
            store = stores[int(dataset)]
            segments.append(Segment(np.asarray(store.tokens[int(sample)], dtype=np.int64),
                                    store.loss_mask(int(sample)), store.image_grids(int(sample))))
            images += store.image_bytes(int(sample))
            ids.append((int(dataset), int(sample)))
        grids = np.concatenate([s.grids for s in segments])
        pixels = pixel_values(images, grids, self._decode, self.patch, self.merge, self.temporal)
        batch = assemble_pack(segments, pixels, self.plan.config.alignment, self.tokens, self.merge)
        batch["samples"] = ids
        return batch


def make_dataloader(dataset: PackedSequences, state: LoaderState | None = None, num_workers: int = 2,
                    prefetch_factor: int = 2) -> DataLoader:
    """Micro-batches from `state.consumed` on, in order, `num_workers` processes decoding ahead."""
    start = 0
    if state is not None:
        expected = (dataset.plan.digest(), dataset.rank, dataset.data_parallel)
        if (state.plan_digest, state.rank, state.data_parallel) != expected:
            raise ValueError(f"loader state is for plan {state.plan_digest} rank {state.rank}/{state.data_parallel}, "
                             f"not plan {expected[0]} rank {expected[1]}/{expected[2]}")
        start = state.consumed
    return DataLoader(
        dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=num_workers > 0,
        multiprocessing_context="spawn" if num_workers else None, worker_init_fn=_ignore_stop_signals,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a task (SIGUSR1 before the time limit, SIGTERM on preemption);
    the training process saves and stops, so its loader workers must outlive the signal."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
