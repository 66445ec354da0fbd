"""An append-only JSON-lines journal of answers, keyed by request: a rerun after a kill resends
only what is not in it.

Each answer is one line written with a single write and flushed as it arrives, so a kill leaves
at most a torn last line, which opening the journal drops (the file is cut back to its last whole
line). A line is {"key": ..., "reply": {...}, **extra}. A `read_only` journal reads the whole lines
and leaves the file alone (ranks of a distributed run that do not write).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from megatron_mmprolong.serving.chat import ChatReply


class Journal:
    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict[str, Any]] = {}
        whole = 0
        if self.path.exists():
            raw = self.path.read_bytes()
            for line in raw.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # torn by a kill mid-write
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    number = raw.count(b"\n", 0, whole) + 1
                    raise ValueError(f"{self.path}: line {number} is not a journal entry; "
                                     "move the file away to start afresh") from None
                whole += len(line)
            if whole != len(raw) and not read_only:
                with open(self.path, "r+b") as f:
                    f.truncate(whole)
        self._file = None if read_only else open(self.path, "a", encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def reply(self, key: str) -> ChatReply | None:
        entry = self._entries.get(key)
        return ChatReply.from_dict(entry["reply"]) if entry else None

    def entry(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def entries(self) -> Iterator[dict[str, Any]]:
        return iter(self._entries.values())

    def put(self, key: str, reply: ChatReply, **extra: Any) -> None:
        entry = {"key": key, "reply": reply.to_dict(), **extra}
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        self._entries[key] = entry

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
