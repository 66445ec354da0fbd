"""Load a Hugging Face Qwen2.5-VL checkpoint into a VisionLanguageModel in memory, this rank's shard
only, one tensor at a time. (The offline converter to distributed checkpoints is convert/.)"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_mmprolong.convert.hf_checkpoint import CheckpointError, HFCheckpoint
from megatron_mmprolong.convert.hf_mapping import HFLayout, canonical_name, shard, tensor_rules
from megatron_mmprolong.model.vlm import VisionLanguageModel


@torch.no_grad()
def load_hf_weights(model: VisionLanguageModel, hf_dir: str | Path) -> None:
    """Fill every parameter of `model` from `hf_dir`. Errors name the tensor and the file:
    missing tensors, unexpected shapes and (for a complete model) tensors the model lacks."""
    with HFCheckpoint(hf_dir) as checkpoint:
        layout = HFLayout.detect(checkpoint.names())
        rules = {r.mcore: r for r in tensor_rules(model.model_config, layout)}
        layers = model.language_model.decoder.layers
        offset = layers[0].layer_number - 1 if len(layers) else 0
        language_tp, vision_tp = model.pg_collection.tp, model.vision_pg_collection.tp
        used: set[str] = set()
        for name, param in model.named_parameters():
            key = canonical_name(name, offset)
            rule = rules.get(key)
            if rule is None:
                raise CheckpointError(f"no Hugging Face mapping for model parameter {name!r}")
            sources = [checkpoint.get(hf) for hf in rule.hf]
            used.update(rule.hf)
            try:
                full = rule.to_mcore(sources)
            except RuntimeError as err:
                shapes = {hf: tuple(t.shape) for hf, t in zip(rule.hf, sources)}
                raise CheckpointError(
                    f"{checkpoint.file_of(rule.hf[0])}: tensors {shapes} do not fit {key} ({err})"
                ) from None
            group = vision_tp if rule.vision else language_tp
            local = shard(full, rule.shard, group.rank(), group.size())
            if local.shape != param.shape:
                raise CheckpointError(
                    f"{checkpoint.file_of(rule.hf[0])}: {', '.join(rule.hf)} "
                    f"{[tuple(t.shape) for t in sources]} give {key} a shard of shape "
                    f"{tuple(local.shape)}, but the model (per its config) expects {tuple(param.shape)}"
                )
            param.copy_(local)
        if model.pre_process and model.post_process:
            unused = sorted(set(checkpoint.names()) - used)
            if unused:
                raise CheckpointError(
                    f"{checkpoint.dir}: {len(unused)} tensors have no place in this model, "
                    f"e.g. {unused[:5]} (is config.json the checkpoint's own?)"
                )
