"""Peak bytes of live tensor storages while a block of code runs (CPU or GPU), counted from the
storages that torch ops create: the measurement the planner's memory estimate is checked against."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage._cdata, storage.nbytes()
        if key in self._live:  # a view, or a storage resized in place
            ref, old = self._live[key]
            self._live[key] = (ref, size)
            self._add(size - old)
        elif size:
            # storages keep their Python object while alive, so the callback fires when the memory is freed
            self._live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size)
            self._add(size)

    def _add(self, size: int) -> None:
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)[1]
