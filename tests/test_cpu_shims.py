"""The CPU workarounds still have their reasons: an upgraded megatron-core that moves a patched
call site fails here, loudly, instead of silently running a stale shim."""

import importlib

import megatron.core
import pytest
import torch
from packaging.version import Version

from megatron_mmprolong import cpu_shims


def test_megatron_core_version_is_in_the_supported_range():
    low, high = cpu_shims.SUPPORTED_MEGATRON_CORE
    assert Version(low) <= Version(megatron.core.__version__) < Version(high), (
        f"megatron-core {megatron.core.__version__} is outside the tested range [{low}, {high}); "
        "re-check every call site in cpu_shims.CALL_SITES"
    )


def test_every_patched_call_site_is_still_there(runtime):  # after the shims are applied
    assert cpu_shims.check_call_sites() == []


def test_a_moved_call_site_is_reported(monkeypatch):
    moved = cpu_shims.CallSite("megatron.core.tensor_parallel.mappings", "torch.cuda.no_such_call()")
    monkeypatch.setattr(cpu_shims, "CALL_SITES", (moved,))
    (problem,) = cpu_shims.check_call_sites()
    assert "no longer contains" in problem and "mappings" in problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="shims are for machines without CUDA")
def test_apply_rebinds_torch_in_the_listed_modules_only(runtime):
    for name in cpu_shims._TORCH_PROXY_MODULES:
        module = importlib.import_module(name)
        assert module.torch.cuda.current_device() == torch.device("cpu")
        assert module.torch.zeros(1).device.type == "cpu"  # everything else is real torch
    assert torch.cuda.current_device is not cpu_shims._CudaOnCpu.current_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="shims are for machines without CUDA")
def test_rng_state_functions_use_the_cpu_generator(runtime):
    from megatron.core.tensor_parallel import random as mrandom

    state = mrandom._get_cuda_rng_state()
    first = torch.rand(3)
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), first)
