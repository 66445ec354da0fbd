"""--cp-comm-type against the installed Transformer Engine: each communication type is accepted from
the TE release that trains it on packed (THD) sequences and refused, with that version named,
before it; the rules that hold for any TE are checked without one. TE versions are stubbed."""

import re

import pytest

from megatron_mmprolong.config import CP_COMM_THD_MIN_TE, ConfigError, ParallelConfig, Qwen25VLConfig

from multiprocess import run_ranks

C7 = Qwen25VLConfig.preset("7b")  # 4 KV heads


def _check_with_te(monkeypatch, te_version: str, parallel: ParallelConfig) -> None:
    import megatron.core.utils as mcore_utils

    from megatron_mmprolong.model.builder import _check_transformer_engine

    monkeypatch.setattr(mcore_utils, "get_te_version", lambda: te_version)
    _check_transformer_engine(parallel)


CP4 = {"p2p": ParallelConfig(context_parallel=4),
       "a2a": ParallelConfig(context_parallel=4, cp_comm_type="a2a"),
       "all_gather": ParallelConfig(context_parallel=4, cp_comm_type="all_gather"),
       "a2a+p2p": ParallelConfig(context_parallel=4, cp_comm_type="a2a+p2p",
                                 hierarchical_context_parallel_sizes=(2, 2))}


def test_the_rules_name_every_communication_type_but_the_ring():
    assert CP_COMM_THD_MIN_TE == {"a2a": "2.10", "all_gather": "2.18", "a2a+p2p": "2.19"}


@pytest.mark.parametrize("te", ["2.9.0", "2.11.0", "2.20.2"])
def test_the_ring_runs_on_every_transformer_engine(monkeypatch, te):
    _check_with_te(monkeypatch, te, CP4["p2p"])


@pytest.mark.parametrize("comm, last_refused, first_accepted, usable", [
    ("a2a", "2.9.0", "2.10.0", "p2p"),
    ("all_gather", "2.17.1", "2.18.0", "p2p or a2a"),
    ("a2a+p2p", "2.18.0", "2.19.0", "p2p or a2a or all_gather"),
])
def test_each_communication_type_from_the_transformer_engine_that_trains_it_on_thd(
        monkeypatch, comm, last_refused, first_accepted, usable):
    C7.validate_parallel(CP4[comm])  # nothing a TE version could change is wrong with it
    message = (f"cp_comm_type {comm} on packed sequences needs Transformer Engine >= {CP_COMM_THD_MIN_TE[comm]}, "
               f"this is {last_refused}; use {usable}, or upgrade")
    with pytest.raises(ConfigError, match=re.escape(message)):
        _check_with_te(monkeypatch, last_refused, CP4[comm])
    _check_with_te(monkeypatch, first_accepted, CP4[comm])
    _check_with_te(monkeypatch, "2.20.2+cu13", CP4[comm])  # a local build of a later release


def test_a_prerelease_counts_as_before_its_release(monkeypatch):
    with pytest.raises(ConfigError, match="needs Transformer Engine >= 2.19, this is 2.19.0.dev0"):
        _check_with_te(monkeypatch, "2.19.0.dev0", CP4["a2a+p2p"])


def test_without_context_parallelism_the_type_is_not_checked(monkeypatch):
    _check_with_te(monkeypatch, "2.9.0", ParallelConfig(cp_comm_type="all_gather"))


# ---- rules that hold for any Transformer Engine (validate_parallel) --------------------------

def test_unknown_and_misspelt_communication_types():
    with pytest.raises(ConfigError, match="cp_comm_type must be one of p2p, a2a, all_gather, a2a\\+p2p, got 'ring'"):
        C7.validate_parallel(ParallelConfig(context_parallel=2, cp_comm_type="ring"))
    with pytest.raises(ConfigError, match="cp_comm_type allgather: Transformer Engine calls it all_gather"):
        C7.validate_parallel(ParallelConfig(context_parallel=2, cp_comm_type="allgather"))


def test_all_to_all_splits_kv_heads_over_its_ranks():
    C7.validate_parallel(ParallelConfig(tensor_parallel=2, context_parallel=2, cp_comm_type="a2a"))
    with pytest.raises(ConfigError, match="4 KV heads / TP 2 do not divide over 4; use p2p"):
        C7.validate_parallel(ParallelConfig(tensor_parallel=2, context_parallel=4, cp_comm_type="a2a"))
    # a2a+p2p splits heads over its a2a level only
    C7.validate_parallel(ParallelConfig(tensor_parallel=2, context_parallel=8, cp_comm_type="a2a+p2p",
                                        hierarchical_context_parallel_sizes=(2, 4)))
    with pytest.raises(ConfigError, match="a2a\\+p2p splits attention heads over 4 CP ranks"):
        C7.validate_parallel(ParallelConfig(tensor_parallel=2, context_parallel=8, cp_comm_type="a2a+p2p",
                                            hierarchical_context_parallel_sizes=(4, 2)))


@pytest.mark.parametrize("sizes", [None, (2, 1), (2, 2, 1)])
def test_hierarchical_cp_needs_sizes_whose_product_is_the_cp_size(sizes):
    with pytest.raises(ConfigError, match="a2a\\+p2p needs hierarchical_context_parallel_sizes .* CP size 4"):
        C7.validate_parallel(ParallelConfig(context_parallel=4, cp_comm_type="a2a+p2p",
                                            hierarchical_context_parallel_sizes=sizes))


def test_hierarchical_sizes_belong_to_hierarchical_cp():
    with pytest.raises(ConfigError, match="hierarchical_context_parallel_sizes \\[2, 2\\] is for cp_comm_type "
                                          "a2a\\+p2p, not p2p"):
        C7.validate_parallel(ParallelConfig(context_parallel=4, hierarchical_context_parallel_sizes=(2, 2)))


def test_the_language_model_config_carries_the_type_and_sizes():
    from megatron_mmprolong.config import language_transformer_config

    config = language_transformer_config(C7, CP4["a2a+p2p"])
    assert config.cp_comm_type == "a2a+p2p" and config.hierarchical_context_parallel_sizes == [2, 2]
    assert language_transformer_config(C7, CP4["a2a"]).hierarchical_context_parallel_sizes is None


def _hierarchical_groups():
    from megatron.core import parallel_state as ps

    from megatron_mmprolong import runtime

    runtime.initialize(ParallelConfig(context_parallel=2, cp_comm_type="a2a+p2p",
                                      hierarchical_context_parallel_sizes=(2, 1)))
    return [group.size() for group in ps.get_hierarchical_context_parallel_groups()]


def test_runtime_creates_the_hierarchical_cp_groups():
    """TE's a2a+p2p takes its two groups from Megatron-Core's parallel state."""
    assert run_ranks(_hierarchical_groups, 2) == [[2, 1], [2, 1]]
