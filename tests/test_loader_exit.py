"""A process that exits holding a loader iterator exits. The workers ignore SIGTERM (Slurm's stop
signal reaches every process of a task), and multiprocessing's exit handler terminates daemon
children with SIGTERM before joining them: such a process, CI's pytest among them, used to wait for
its workers forever after its last line."""

import subprocess
import sys
import textwrap

import psutil
import pytest

SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import TensorDataset
    from megatron_mmprolong.data.loader import make_dataloader

    if __name__ == "__main__":
        loader = make_dataloader(TensorDataset(torch.arange(100)), num_workers=2)
        batches = iter(loader)
        next(batches)
        print(" ".join(str(w.pid) for w in batches._workers), flush=True)
        if sys.argv[1] == "raise":
            raise RuntimeError("a failing step")
""")


@pytest.mark.parametrize("how, status", [("return", 0), ("raise", 1)])
def test_exit_with_live_loader_workers_does_not_wait_for_them(tmp_path, how, status):
    script = tmp_path / "holds_a_loader.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr[-2000:]
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in workers)
