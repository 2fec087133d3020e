"""The append-only JSONL audit file: one line per event, flushed per batch.

Lines are written before the batch reaches the store, so a crash can repeat lines (each
carries its stream id and (user, op id) to de-duplicate by) but never lose one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from gateway.core.events import Event


class AuditLog:
    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        # O_APPEND: concurrent workers interleave whole writes. Open for the worker's life
        # (close() ends it), hence no with-block.
        self._fh = open(path, "ab", buffering=0)  # noqa: SIM115

    def write(self, events: Iterable[Event]) -> None:
        # The event's own JSON with the stream id and partition put in front (no re-encoding).
        lines = [
            f'{{"stream_id":"{e.stream_id}","partition":{e.partition},{e.raw_json[1:]}'
            if e.raw_json.startswith("{") and len(e.raw_json) > 2
            else json.dumps(
                {"stream_id": e.stream_id, "partition": e.partition, **e.raw}, separators=(",", ":")
            )
            for e in events
        ]
        if not lines:
            return
        self._fh.write(("\n".join(lines) + "\n").encode())
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
