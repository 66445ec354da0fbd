"""Sockets per rank after start-up at 4, 8 and 16 ranks: before (every Megatron group with a gloo
half, as `cpu:gloo,cuda:nccl` gave each one) and after (runtime.initialize: Megatron's groups on
the device backend only, the world group's gloo half for host collectives).

    python benchmarks/bench_gloo_sockets.py [--ranks 4 8 16] [--tp 2] [--cp 2]

Runs here without a GPU: torch's "fake" backend stands in for NCCL (it opens no socket, as NCCL
opens none of gloo's; NCCL's own connections come on first use, per group that is used). Each rank
is a small process on this host; sockets are counted in /proc/self/fd once every group exists.
Prints one line per world size: min/max sockets per rank before and after, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int, mode: str, tp: int, cp: int, out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 (registers the "fake" backend)
    from megatron.core import parallel_state

    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import ParallelConfig

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if mode == "before":  # what runtime.initialize did before: every group inherits the world's two backends
        dist.init_process_group("cpu:gloo,cuda:fake", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    else:
        runtime.initialize(ParallelConfig(tensor_parallel=tp, context_parallel=cp), device_backend="fake")
    dist.barrier(group=runtime.host_group())
    with open(os.path.join(out, f"{rank}"), "w") as stream:
        stream.write(str(runtime.open_sockets()))
    dist.barrier(group=runtime.host_group())
    runtime.shutdown()


def measure(world: int, mode: str, tp: int, cp: int) -> list[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, port, mode, tp, cp, out), nprocs=world, start_method="spawn", join=True)
        return [int(open(os.path.join(out, f"{r}")).read()) for r in range(world)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--cp", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"sockets per rank after start-up (TP{args.tp} x CP{args.cp}; min-max over ranks)")
    for world in args.ranks:
        before, after = measure(world, "before", args.tp, args.cp), measure(world, "after", args.tp, args.cp)
        print(f"{world:>3} ranks: before {min(before)}-{max(before)}, after {min(after)}-{max(after)} "
              f"({max(before) / max(after):.1f}x fewer)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
