"""HF safetensors -> Megatron-Core torch_dist checkpoint, streaming, on the CPU.

Everything is checked before the first byte is written (names, shapes from the file headers,
layout divisibility). Tensors are then produced one per layer (QKV interleave, GLU fusion) or
read in row blocks (plain tensors), cut into the chunks a tensor-parallel save would write, and
appended to the checkpoint; memory stays at a few chunks whatever the model size.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from megatron_mmprolong.config import ParallelConfig, VLConfig
from megatron_mmprolong.convert.checkpoint_info import write_info
from megatron_mmprolong.convert.hf_checkpoint import CheckpointError, HFCheckpoint
from megatron_mmprolong.convert.hf_mapping import (
    HFLayout,
    TensorRule,
    canonical_name,
    checkpoint_key,
    stored_rules,
)
from megatron_mmprolong.convert.output_dir import atomic_output_dir
from megatron_mmprolong.convert.torch_dist import SerializedChunk, TorchDistWriter


@dataclass(frozen=True)
class _Tensor:
    """One parameter to write: a whole tensor, or one layer of a stacked one."""

    rule: TensorRule
    key: str
    shape: tuple[int, ...]  # of this parameter (one layer)
    layer: int | None
    num_layers: int

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.shape if self.layer is None else (self.num_layers, *self.shape)

    def offsets(self, box_offsets: tuple[int, ...]) -> tuple[int, ...]:
        return box_offsets if self.layer is None else (self.layer, *box_offsets)


@dataclass
class ConversionReport:
    out_dir: Path
    tensors: int
    chunks: int
    bytes: int
    seconds: float


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    parallel: ParallelConfig = ParallelConfig(),
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    workers: int = 2,
    max_chunk_bytes: int = 512 << 20,
    progress: bool = True,
) -> ConversionReport:
    """Convert; `dtype` None keeps the checkpoint's own dtype."""
    start = time.perf_counter()
    config = VLConfig.from_hf_dir(hf_dir)
    config.validate_parallel(parallel)
    with HFCheckpoint(hf_dir) as checkpoint:
        plan = _plan(config, checkpoint)
        out_dtype = dtype or checkpoint.dtype(plan[0].rule.hf[0])
        total = sum(_numel(t.shape) for t in plan) * torch.empty((), dtype=out_dtype).element_size()
        with atomic_output_dir(out_dir, overwrite) as partial:
            writer = TorchDistWriter(partial)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-mcore", disable=not progress)
            units = [u for t in plan for u in _work_units(t, parallel, out_dtype, max_chunk_bytes)]
            done = 0
            for chunks in _bounded_map(lambda unit: unit(checkpoint), units, workers):
                for key, global_shape, offsets, chunk in chunks:
                    writer.write(key, global_shape, offsets, chunk)
                    bar.update(chunk.nbytes)
                done += 1
                bar.set_postfix_str(f"{done}/{len(units)} pieces")
            bar.close()
            writer.close()
            write_info(
                partial,
                source=str(Path(hf_dir).resolve()),
                hf_config=config.to_hf_dict(),
                dtype=str(out_dtype).removeprefix("torch."),
                parallel_layout={
                    "tensor_parallel": parallel.tensor_parallel,
                    "pipeline_parallel": parallel.pipeline_parallel,
                    "vision_tensor_parallel": parallel.vision_tp,
                },
                checksums=writer.checksums,
            )
    return ConversionReport(
        out_dir=Path(out_dir),
        tensors=len(plan),
        chunks=sum(len(c) for c in writer.checksums.values()),
        bytes=writer.bytes_written,
        seconds=time.perf_counter() - start,
    )


def _plan(config: VLConfig, checkpoint: HFCheckpoint) -> list[_Tensor]:
    """Every tensor to write, with all names and shapes checked against the config."""
    layout = HFLayout.detect(checkpoint.names())
    rules = stored_rules(config, layout)
    expected = _parameter_shapes(config)
    needed = {name for r in rules for name in r.hf}
    missing = sorted(needed - set(checkpoint.names()))
    if missing:
        raise CheckpointError(
            f"{checkpoint.dir}: {len(missing)} tensors the config calls for are missing, "
            f"e.g. {missing[:5]}"
        )
    tolerated = {f"{layout.lm_head}weight"} if config.text.tie_word_embeddings else set()
    unknown = sorted(set(checkpoint.names()) - needed - tolerated)
    if unknown:
        raise CheckpointError(
            f"{checkpoint.dir}: {len(unknown)} tensors have no place in a Qwen2.5-VL model with "
            f"this config.json, e.g. {unknown[:5]}"
        )
    layers = {"language_model": config.text.num_layers, "vision_model": config.vision.depth}
    plan = []
    for rule in rules:
        shapes = [checkpoint.shape(name) for name in rule.hf]
        try:
            produced = tuple(rule.to_mcore([torch.empty(s, device="meta") for s in shapes]).shape)
        except RuntimeError:
            produced = None
        want = expected[rule.mcore]
        if produced != want:
            raise CheckpointError(
                f"{checkpoint.file_of(rule.hf[0])}: {', '.join(rule.hf)} have shapes {shapes}; the "
                f"config calls for {rule.mcore} of shape {want} (does config.json match the weights?)"
            )
        key, layer = checkpoint_key(rule.mcore)
        plan.append(_Tensor(rule, key, want, layer, layers[rule.mcore.split(".")[0]]))
    return plan


def _parameter_shapes(config: VLConfig) -> dict[str, tuple[int, ...]]:
    """Unsharded parameter shapes, from the model itself built on the meta device."""
    from megatron.core import parallel_state

    from megatron_mmprolong import runtime
    from megatron_mmprolong.model.builder import build_model

    if not parallel_state.model_parallel_is_initialized():
        runtime.initialize()
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or (
        parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        raise RuntimeError("conversion runs in one process (tensor and pipeline parallel size 1)")
    model = build_model(config, meta=True)
    shapes = {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    if config.text.tie_word_embeddings:
        shapes["language_model.output_layer.weight"] = shapes["language_model.embedding.word_embeddings.weight"]
    return shapes


def _work_units(tensor: _Tensor, parallel: ParallelConfig, dtype: torch.dtype, max_chunk_bytes: int):
    """Callables producing [(key, global shape, offsets, serialized chunk)]: one per row block for plain
    tensors (read straight from the file), one per tensor for transformed ones."""
    rule = tensor.rule
    tp = parallel.vision_tp if rule.vision else parallel.tensor_parallel
    itemsize = torch.empty((), dtype=dtype).element_size()
    boxes = chunk_boxes(tensor.shape, rule.shard, tp, max_chunk_bytes // itemsize)

    def chunks(full_rows: Tensor, row_start: int, row_boxes):
        out = []
        for rows, cols in row_boxes:
            piece = full_rows[rows.start - row_start : rows.stop - row_start]
            if cols is not None:
                piece = piece[:, cols]
            offsets = (rows.start, cols.start if cols is not None else 0, *[0] * (len(tensor.shape) - 2))
            piece = piece.to(dtype).unsqueeze(0) if tensor.layer is not None else piece.to(dtype)
            out.append((tensor.key, tensor.global_shape, tensor.offsets(offsets[: len(tensor.shape)]),
                        SerializedChunk.of(piece)))
        return out

    if rule.plain:
        by_rows = collections.defaultdict(list)
        for rows, cols in boxes:
            by_rows[(rows.start, rows.stop)].append((rows, cols))

        def read_block(checkpoint, span, row_boxes):
            return chunks(checkpoint.read_rows(rule.hf[0], *span), span[0], row_boxes)

        return [
            (lambda checkpoint, span=span, rb=rb: read_block(checkpoint, span, rb))
            for span, rb in by_rows.items()
        ]

    def convert(checkpoint):
        full = rule.to_mcore([checkpoint.get(name) for name in rule.hf])
        return chunks(full, 0, boxes)

    return [convert]


def chunk_boxes(shape: tuple[int, ...], shard: str, tp: int, max_elements: int):
    """(rows, cols) slices of the chunks to store: the tensor-parallel split of `shard`, each
    piece further cut into row blocks of at most `max_elements`."""
    rows = shape[0]
    row_parts = {"column": tp, "glu": 2 * tp}.get(shard, 1)
    col_parts = tp if shard == "row" else 1
    cols = shape[1] if len(shape) > 1 else 1
    per_row = _numel(shape[1:]) // col_parts if len(shape) > 1 else 1
    block = max(1, max_elements // max(per_row, 1))
    boxes = []
    step = rows // row_parts
    for part in range(row_parts):
        for start in range(part * step, (part + 1) * step, block):
            row_slice = slice(start, min(start + block, (part + 1) * step))
            if col_parts == 1:
                boxes.append((row_slice, None))
            else:
                width = cols // col_parts
                boxes.extend((row_slice, slice(c * width, (c + 1) * width)) for c in range(col_parts))
    return boxes


def _bounded_map(fn, items, workers: int):
    """fn over items in order with at most `workers` results in flight (bounded memory)."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            if len(pending) >= workers:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
