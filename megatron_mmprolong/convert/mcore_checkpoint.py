"""Load a Megatron-Core distributed checkpoint into a Qwen25VLModel at any TP/PP layout."""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_mmprolong.convert.hf_checkpoint import CheckpointError
from megatron_mmprolong.model.qwen25vl import Qwen25VLModel


def load_mcore_checkpoint(model: Qwen25VLModel, mcore_dir: str | Path) -> None:
    """Every parameter must come from the checkpoint; only `_extra_state` entries (FP8 scaling
    history of Transformer Engine layers, absent from converted checkpoints) may be missing."""
    state, missing, _unexpected = dist_checkpointing.load(
        model.sharded_state_dict(), str(mcore_dir), strict=StrictHandling.RETURN_ALL
    )
    absent = sorted(k for k in missing if "_extra_state" not in k)
    if absent:
        raise CheckpointError(f"{mcore_dir}: checkpoint lacks {len(absent)} tensors, e.g. {absent[:5]}")
    result = model.load_state_dict(state, strict=False)
    absent = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if absent or result.unexpected_keys:
        raise CheckpointError(
            f"{mcore_dir}: loaded state does not fit the model (missing {absent[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
