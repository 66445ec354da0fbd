"""Build a VisionLanguageModel for a parallel layout: the one place that turns the model
configuration, the backend and the precision into Megatron-Core TransformerConfigs."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_mmprolong.config import (
    ConfigError,
    ParallelConfig,
    PrecisionConfig,
    VLConfig,
    check_cp_comm_type_for_te,
    language_transformer_config,
    merger_transformer_config,
    vision_transformer_config,
)
from megatron_mmprolong.model.vlm import VisionLanguageModel
from megatron_mmprolong.runtime import vision_tensor_parallel_group
from megatron_mmprolong.model.specs import Backend, default_backend


def build_model(
    config: VLConfig,
    parallel: ParallelConfig = ParallelConfig(),
    *,
    backend: Backend | None = None,
    precision: PrecisionConfig = PrecisionConfig(params_dtype="fp32"),
    packed: bool = True,
    training: bool = True,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    meta: bool = False,
    **transformer_overrides: Any,
) -> VisionLanguageModel:
    """Needs Megatron-Core's parallel state (`runtime.initialize`). With `meta=True` the
    parameters live on the meta device: shapes and counts without memory. `packed` and
    `training` describe the batches, for the FP8 attention policy."""
    config.validate()
    config.validate_parallel(parallel)
    # TE modules allocate on the device they are given, not under a meta-device context: a meta
    # build of a 72B model on the TE backend would fill the GPU
    backend = backend or ("local" if meta else default_backend())
    if meta and backend == "te":
        raise ConfigError("a meta-device model (shapes and counts) is built on the local backend, not te")
    if backend == "te":
        _check_transformer_engine(parallel)
    precision.validate(backend, packed=packed, training=training)
    on_gpu = torch.cuda.is_available() and not meta
    common = dict(
        use_cpu_initialization=not on_gpu,
        perform_initialization=not meta,
        apply_rope_fusion=backend == "te",
        **transformer_overrides,
    )
    language = {**common, **precision.transformer_overrides()}
    vision = {**common, **precision.transformer_overrides(vision=True)}
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    vision_pg_collection = copy.copy(pg_collection)
    vision_pg_collection.tp = vision_tensor_parallel_group()
    device_context = torch.device("meta") if meta else contextlib.nullcontext()
    with device_context:
        model = VisionLanguageModel(
            config,
            language_config=language_transformer_config(config, parallel, **language),
            vision_config=vision_transformer_config(config, parallel, **vision),
            merger_config=merger_transformer_config(config, parallel, **vision),
            backend=backend,
            pg_collection=pg_collection,
            vision_pg_collection=vision_pg_collection,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    return model


def _check_transformer_engine(parallel: ParallelConfig) -> None:
    from megatron.core.utils import get_te_version

    check_cp_comm_type_for_te(parallel, str(get_te_version()))


def count_parameters(model: VisionLanguageModel) -> dict[str, int]:
    """Parameter counts; a tied output layer counts once, as in transformers."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.vision_model.parameters()) if model.vision_model else 0
    return {"total": total, "vision": vision, "language": total - vision}
