"""Run a function on N gloo ranks (spawned processes) and collect what each rank returns.

Results travel through files: a multiprocessing queue of tensors breaks once workers exit.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999). The other pytest-xdist worker's
    ranks open many connections whose local ports come from that range: one took a port the
    kernel had just handed out here before this test's store listened on it (EADDRINUSE)."""
    pick = random.SystemRandom()
    while True:
        port = pick.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def run_ranks(fn, world_size: int, *args):
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry, args=(fn, world_size, port, out, args), nprocs=world_size,
            start_method="spawn", join=True,
        )
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def _entry(rank, fn, world_size, port, out, args):
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    from megatron_mmprolong import runtime

    try:
        result = fn(*args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        runtime.shutdown()
