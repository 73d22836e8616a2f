"""The metadata journal: JSON lines for topics, committed offsets, producer-id
blocks and transaction coordinator state. Replayed on start (last record per key
wins), then compacted into a fresh file."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

JOURNAL = "metadata.jsonl"


class Journal:
    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, JOURNAL)
        self.fd = -1

    def replay(self) -> Iterator[dict[str, Any]]:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn trailing write
                try:
                    yield json.loads(line)
                except ValueError:
                    break

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Atomically replace the journal with `records` and open it for appends."""
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            for r in records:
                f.write(_line(r))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, record: dict[str, Any]) -> None:
        data = _line(record)
        mv = memoryview(data)
        while mv:
            n = os.write(self.fd, mv)
            mv = mv[n:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _line(r: dict[str, Any]) -> bytes:
    return json.dumps(r, separators=(",", ":")).encode() + b"\n"
