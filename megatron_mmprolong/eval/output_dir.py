"""An evaluation's output folder: the settings it was made with, the documents and dataset that
the writing rank prepares while the others wait, and the answers (see `answer_resumably`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.files import write_text_whole


def check_same_settings(path: Path, config, write: bool) -> None:
    """A folder holds one evaluation: refuse settings (a dataclass) other than those recorded in
    `path`; record them if absent and `write`."""
    wanted = json.loads(json.dumps(asdict(config)))
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise EvalError(f"{path.parent} holds an evaluation with other settings ({', '.join(changed)}); "
                            "use another output folder")
    elif write:
        write_text_whole(path, json.dumps(wanted, indent=1) + "\n")


def prepared_store(out: Path, config, settings: str, dataset: str, prepare, writer: bool, barrier) -> MultimodalStore:
    """The writer records the settings and runs `prepare(config, out)` (documents, dataset) while
    the other ranks wait; then every rank checks the settings and opens the dataset."""
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        check_same_settings(out / settings, config, write=True)
        prepare(config, out)
    barrier()
    check_same_settings(out / settings, config, write=False)
    return MultimodalStore(out / "data" / dataset)
