"""The training loader pins its batches where CUDA is: the step copies them to the device with
non_blocking=True, which from pageable memory blocks the host until the copy is done."""

import pytest
import torch

from megatron_mmprolong.data.loader import PackedSequences, make_dataloader
from megatron_mmprolong.data.plan import MixtureSpec, PlanConfig, make_plan


@pytest.fixture(scope="module")
def dataset(tiny_train_data):
    *_, mix = tiny_train_data
    return PackedSequences(make_plan(MixtureSpec.from_yaml(mix), PlanConfig(seq_length=2048, global_batch=1)))


@pytest.mark.parametrize("cuda", [True, False])
def test_the_loader_pins_by_default_where_cuda_is(dataset, monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert make_dataloader(dataset, num_workers=0).pin_memory is cuda
    assert make_dataloader(dataset, num_workers=2).pin_memory is cuda


def test_pinning_is_explicit(dataset):
    assert make_dataloader(dataset, num_workers=1, pin_memory=True).pin_memory is True
    assert make_dataloader(dataset, num_workers=1, pin_memory=False).pin_memory is False


def test_the_prefetch_budget_counts_the_copy_being_pinned(dataset):
    """The pin thread holds one item twice (worker shared memory and pinned) while it copies."""
    bound = dataset.item_bytes_bound()
    loader = make_dataloader(dataset, num_workers=4, prefetch_factor=4, prefetch_bytes=3 * bound, pin_memory=False)
    assert (loader.num_workers, loader.prefetch_factor) == (3, 1)
    loader = make_dataloader(dataset, num_workers=4, prefetch_factor=4, prefetch_bytes=3 * bound, pin_memory=True)
    assert (loader.num_workers, loader.prefetch_factor) == (2, 1)
    loader = make_dataloader(dataset, num_workers=4, prefetch_factor=4, prefetch_bytes=bound, pin_memory=True)
    assert (loader.num_workers, loader.prefetch_factor) == (1, 1)  # one item at least


@pytest.mark.gpu
def test_batches_arrive_pinned(dataset):
    torch.cuda.set_device(0)
    for workers in (0, 1):
        batch = next(iter(make_dataloader(dataset, num_workers=workers)))
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert "pages" in tensors and all(t.is_pinned() for t in tensors.values()), workers
