"""An on-disk queue for drift alerts: they survive broker outages and restarts, and leave in order.

One JSON file per message, named by a sequence number, written atomically (temp file,
fsync, rename). A message is removed only once the broker has acknowledged it. The
spool holds at most `max_messages`; past that the oldest are dropped and counted, so a
week-long outage cannot fill the disk.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from .files import write_atomic

log = logging.getLogger(__name__)
SUFFIX = ".json"


class Spool:
    def __init__(self, folder: str | Path, max_messages: int = 10_000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.dropped = 0
        self._lock = threading.Lock()
        self._names = sorted(self._scan())
        self._next = int(self._names[-1].removesuffix(SUFFIX)) + 1 if self._names else 0
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def _scan(self) -> list[str]:
        names = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            if path.stem.isdigit():
                names.append(path.name)
        return names

    def __len__(self) -> int:
        return len(self._names)

    def put(self, topic: str, payload: dict) -> None:
        with self._lock:
            name = f"{self._next:016d}{SUFFIX}"
            self._next += 1
            data = json.dumps({"topic": topic, "payload": payload}).encode()
            write_atomic(self.folder / name, lambda f: f.write(data))
            self._names.append(name)
            while len(self._names) > self.max_messages:
                oldest = self._names.pop(0)
                (self.folder / oldest).unlink(missing_ok=True)
                self.dropped += 1
                log.error("alert spool full (%d): dropped the oldest alert %s", self.max_messages, oldest)

    def peek(self) -> tuple[str, str, dict] | None:
        """The oldest message as (id, topic, payload), or None when empty."""
        with self._lock:
            while self._names:
                name = self._names[0]
                try:
                    doc = json.loads((self.folder / name).read_bytes())
                    return name, doc["topic"], doc["payload"]
                except (OSError, ValueError, KeyError) as exc:
                    log.error("alert spool: unreadable %s skipped (%s)", name, exc)
                    self._names.pop(0)
                    (self.folder / name).unlink(missing_ok=True)
            return None

    def remove(self, message_id: str) -> None:
        with self._lock:
            if self._names and self._names[0] == message_id:
                self._names.pop(0)
            elif message_id in self._names:
                self._names.remove(message_id)
            (self.folder / message_id).unlink(missing_ok=True)
