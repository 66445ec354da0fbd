"""`convert verify`: load a Megatron checkpoint at a TP x PP layout and compare its logits with
the HF checkpoint's in transformers on the same multimodal sample (packed text + images + video).

Runs on every rank of a TP x PP world; stages pass hidden states with point-to-point sends.
Without a launcher, `verify_spawned` starts the ranks itself (gloo, CPU).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mmprolong.config import ParallelConfig
from megatron_mmprolong.convert.transformers_model import hf_model_class


def verify_checkpoint(hf_dir: str | Path, mcore_dir: str | Path, parallel: ParallelConfig, seed: int = 0) -> dict:
    """The report (same on every rank): max_abs_logit_diff, top1_agreement, tokens."""
    from megatron.core import parallel_state as ps

    from megatron_mmprolong import runtime
    from megatron_mmprolong.convert.checkpoint_info import checkpoint_config
    from megatron_mmprolong.convert.mcore_checkpoint import load_mcore_checkpoint
    from megatron_mmprolong.convert.parity import (
        compare, default_samples, hf_logits, known_difference, our_logits, pack,
    )
    from megatron_mmprolong.model.builder import build_model

    rt = runtime.initialize(parallel, seed=seed)
    config = checkpoint_config(mcore_dir, hf_template=hf_dir)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = build_model(config, parallel, pre_process=first, post_process=last)
    load_mcore_checkpoint(model, mcore_dir)
    model.eval()
    samples = default_samples(config, seed)
    packed, params = pack(samples)
    tokens = packed.input_ids.shape[1]
    with torch.no_grad():
        if not first:
            hidden = torch.empty(tokens, 1, config.text.hidden_size, device=rt.device)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = our_logits(model, _to(packed, rt.device), params)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    report = None
    if last and ps.get_tensor_model_parallel_rank() == 0:
        reference = hf_model_class(config).from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            expected = torch.cat([hf_logits(reference, s) for s in samples], dim=1)
        report = {**compare(out.cpu(), expected), "tokens": tokens,
                  "tensor_parallel": parallel.tensor_parallel, "pipeline_parallel": parallel.pipeline_parallel,
                  "known_difference": known_difference(config, samples)}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    return next(r for r in reports if r is not None)


def _to(sample, device):
    for field in ("input_ids", "pixel_values", "pixel_values_videos"):
        value = getattr(sample, field)
        if value is not None:
            setattr(sample, field, value.to(device))
    return sample


def verify_spawned(hf_dir, mcore_dir, parallel: ParallelConfig, seed: int = 0) -> dict:
    """Start TP x PP local processes (gloo) and return their report."""
    import torch.multiprocessing as mp

    world = parallel.tensor_parallel * parallel.pipeline_parallel
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        mp.start_processes(
            _rank_main, args=(world, port, str(hf_dir), str(mcore_dir), parallel, seed, str(out)),
            nprocs=world, start_method="spawn", join=True,
        )
        return json.loads(out.read_text())


def _rank_main(rank, world, port, hf_dir, mcore_dir, parallel, seed, out):
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron_mmprolong import runtime

    try:
        report = verify_checkpoint(hf_dir, mcore_dir, parallel, seed)
        if rank == 0:
            Path(out).write_text(json.dumps(report))
    finally:
        runtime.shutdown()
