"""Megatron-Core torch_dist checkpoint -> HF safetensors that transformers and vLLM load.

One layer of one parameter at a time is read (chunk checksums verified when the checkpoint
carries them), split back into the HF tensors (q/k/v, gate/up) and streamed into sharded
safetensors files; plain tensors stream in row blocks.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_mmprolong.convert.checkpoint_info import checkpoint_config, read_info
from megatron_mmprolong.convert.hf_checkpoint import CheckpointError
from megatron_mmprolong.convert.hf_mapping import checkpoint_key, export_layout, stored_rules
from megatron_mmprolong.convert.hf_to_mcore import ConversionReport
from megatron_mmprolong.convert.output_dir import atomic_output_dir
from megatron_mmprolong.convert.safetensors_stream import PlannedTensor, StreamingSafetensorsWriter
from megatron_mmprolong.convert.torch_dist import TorchDistReader

# Files a HF model directory carries besides weights and config.json.
TEMPLATE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
)


def mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    hf_template: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 << 30,
    max_block_bytes: int = 512 << 20,
    progress: bool = True,
) -> ConversionReport:
    start = time.perf_counter()
    config = checkpoint_config(mcore_dir, hf_template)
    info = read_info(mcore_dir) or {}
    checksums = info.get("checksums", {})
    rules = stored_rules(config, export_layout(config))
    with TorchDistReader(mcore_dir) as reader:
        missing = sorted({checkpoint_key(r.mcore)[0] for r in rules} - set(reader.keys()))
        if missing:
            raise CheckpointError(f"{mcore_dir}: the model's tensors {missing[:5]} are missing ({len(missing)} in all)")
        planned, work = [], []
        for rule in rules:
            key, layer = checkpoint_key(rule.mcore)
            shape = reader.shape(key)[1:] if layer is not None else reader.shape(key)
            out_dtype = dtype or reader.dtype(key)
            try:
                hf_shapes = [tuple(t.shape) for t in rule.to_hf(torch.empty(shape, device="meta"))]
            except RuntimeError as err:
                raise CheckpointError(f"{mcore_dir}: {key} of shape {shape} does not fit the config ({err})") from None
            planned += [PlannedTensor(n, s, out_dtype) for n, s in zip(rule.hf, hf_shapes)]
            work.append((rule, key, layer, shape, out_dtype))

        with atomic_output_dir(out_dir, overwrite) as partial:
            writer = StreamingSafetensorsWriter(partial, planned, max_shard_bytes)
            bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="mcore-to-hf", disable=not progress)
            for rule, key, layer, shape, out_dtype in work:
                prefix = (layer,) if layer is not None else ()
                if rule.plain:
                    row_bytes = max(1, torch.empty(shape[1:] or (1,), dtype=out_dtype).nbytes)
                    block = max(1, max_block_bytes // row_bytes)
                    for begin in range(0, shape[0], block):
                        rows = min(block, shape[0] - begin)
                        piece = reader.read(
                            key, (*prefix, begin, *[0] * (len(shape) - 1)), (*[1] * len(prefix), rows, *shape[1:]),
                            checksums.get(key),
                        ).reshape(rows, *shape[1:]).to(out_dtype)
                        writer.write(rule.hf[0], piece)
                        bar.update(piece.nbytes)
                    continue
                whole = reader.read(
                    key, (*prefix, *[0] * len(shape)), (*[1] * len(prefix), *shape), checksums.get(key)
                ).reshape(shape)
                for name, tensor in zip(rule.hf, rule.to_hf(whole)):
                    writer.write(name, tensor.to(out_dtype))
                    bar.update(tensor.numel() * tensor.element_size())
            bar.close()
            index = writer.close()
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            hf_config = config.to_hf_dict()
            hf_config["torch_dtype"] = str(planned[0].dtype).removeprefix("torch.")
            (partial / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            _copy_template(hf_template, partial)
            if not (partial / "generation_config.json").exists():
                generation = {"bos_token_id": config.tokens.bos, "eos_token_id": config.tokens.eos}
                (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return ConversionReport(
        out_dir=Path(out_dir),
        tensors=len(planned),
        chunks=len(writer.files),
        bytes=writer.total_bytes,
        seconds=time.perf_counter() - start,
    )


def _copy_template(template: str | Path | None, out: Path) -> None:
    if template is None:
        return
    for name in TEMPLATE_FILES:
        source = Path(template) / name
        if source.is_file():
            shutil.copy2(source, out / name)
