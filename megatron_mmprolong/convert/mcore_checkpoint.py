"""Load Megatron-Core distributed checkpoints (converted or trained) at any TP/PP/CP layout."""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_mmprolong.convert.hf_checkpoint import CheckpointError
from megatron_mmprolong.model.vlm import VisionLanguageModel


def load_sharded(request: dict, directory: str | Path) -> dict:
    """Load what `request` (a sharded state dict) asks for. Only `_extra_state` entries (FP8
    scaling history of Transformer Engine layers, absent from converted checkpoints) may be
    missing from the checkpoint; what the checkpoint holds beyond the request (a trained one's
    optimizer state, when loading weights only) is left on disk."""
    # Megatron-Core calls requested keys absent from the checkpoint "unexpected".
    state, _missing, unexpected = dist_checkpointing.load(request, str(directory),
                                                          strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in unexpected if "_extra_state" not in k)
    if absent:
        raise CheckpointError(f"{directory}: checkpoint lacks {len(absent)} tensors, e.g. {absent[:5]}")
    return state


def apply_model_state(model: VisionLanguageModel, state: dict, directory: str | Path) -> None:
    result = model.load_state_dict(state, strict=False)
    absent = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if absent or result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: loaded state does not fit the model (missing {absent[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


def load_mcore_checkpoint(model: VisionLanguageModel, mcore_dir: str | Path) -> None:
    """Every parameter of `model` from a converted or trained checkpoint."""
    request = model.sharded_state_dict()
    state = load_sharded(request, mcore_dir)
    # A trained checkpoint's common state (iteration, arguments, ...) comes back too.
    apply_model_state(model, {key: state[key] for key in request if key in state}, mcore_dir)
