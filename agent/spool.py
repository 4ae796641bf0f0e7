"""An on-disk queue for drift alerts: they survive broker outages and restarts, and leave in order.

One JSON file per message, named by a sequence number, written atomically (temp file,
fsync, rename). A message is removed only once the broker has delivered it. The
spool holds at most `max_messages`; past that the oldest are dropped and counted, so a
week-long outage cannot fill the disk. When the disk cannot take a message (full, read-only)
the message is held in memory in its place in the queue, still sent while the broker is
connected, and written later by `retry`. A file that is not a message of this agent's is moved
aside to `rejected/`, never deleted.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from .files import WriteTrouble, write_atomic

log = logging.getLogger(__name__)
SUFFIX = ".json"
WHAT = "alert spool"


class Spool:
    def __init__(self, folder: str | Path, max_messages: int = 10_000, schema: int = 1,
                 trouble: WriteTrouble | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.schema = schema  # the newest payload schema this agent writes; a newer one is not this version's
        self.trouble = trouble or WriteTrouble()
        self.dropped = 0
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, dict]] = {}  # name -> message the disk could not take
        self._names = sorted(self._scan())
        self._next = int(self._names[-1].removesuffix(SUFFIX)) + 1 if self._names else 0
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def _scan(self) -> list[str]:
        return [p.name for p in self.folder.glob(f"*{SUFFIX}") if p.stem.isdigit()]

    def __len__(self) -> int:
        return len(self._names)

    @property
    def held(self) -> int:
        """Messages in memory only: the disk could not take them."""
        return len(self._held)

    def put(self, topic: str, payload: dict) -> None:
        with self._lock:
            name = f"{self._next:016d}{SUFFIX}"
            self._next += 1
            self._names.append(name)
            if self._held or not self._write(name, topic, payload):
                self._held[name] = (topic, payload)  # behind one already held: written in order by retry
            while len(self._names) > self.max_messages:
                oldest = self._names.pop(0)
                if self._held.pop(oldest, None) is None:
                    (self.folder / oldest).unlink(missing_ok=True)
                self.dropped += 1
                log.error("alert spool full (%d): dropped the oldest alert %s", self.max_messages, oldest)

    def _write(self, name: str, topic: str, payload: dict) -> bool:
        data = json.dumps({"topic": topic, "payload": payload}).encode()
        try:
            write_atomic(self.folder / name, lambda f: f.write(data))
        except OSError as exc:
            self.trouble.failed(WHAT, self.folder / name, exc)
            return False
        self.trouble.succeeded(WHAT)
        return True

    def retry(self) -> None:
        """Write the messages held in memory, oldest first, while the disk takes them."""
        with self._lock:
            for name, (topic, payload) in list(self._held.items()):
                if not self._write(name, topic, payload):
                    return
                del self._held[name]

    def peek(self) -> tuple[str, str, dict] | None:
        """The oldest message as (id, topic, payload), or None when empty."""
        with self._lock:
            while self._names:
                name = self._names[0]
                if name in self._held:
                    return name, *self._held[name]
                try:
                    doc = json.loads((self.folder / name).read_bytes())
                    problem = self._problem(doc)
                except (OSError, ValueError) as exc:
                    problem = f"unreadable ({exc})"
                if problem is None:
                    return name, doc["topic"], doc["payload"]
                self._names.pop(0)
                self._set_aside(name, problem)
            return None

    def _problem(self, doc) -> str | None:
        """Why a spooled file is not a message this version sends, or None."""
        if not isinstance(doc, dict) or not isinstance(doc.get("topic"), str) or not isinstance(
                doc.get("payload"), dict):
            return "not a {topic, payload} message"
        schema = doc["payload"].get("schema")
        if not isinstance(schema, int) or not 1 <= schema <= self.schema:
            return f"payload schema {schema!r}, this agent writes schema {self.schema}"
        return None

    def _set_aside(self, name: str, problem: str) -> None:
        aside = self.folder / "rejected" / f"{Path(name).stem}.{time.strftime('%Y%m%dT%H%M%S')}{SUFFIX}"
        try:
            aside.parent.mkdir(exist_ok=True)
            (self.folder / name).replace(aside)
            log.warning("alert spool: %s is %s; moved aside to %s", name, problem, aside)
        except OSError as exc:
            log.error("alert spool: %s is %s and cannot be moved aside (%s); skipped", name, problem,
                      exc.strerror or exc)

    def remove(self, message_id: str) -> None:
        with self._lock:
            if self._names and self._names[0] == message_id:
                self._names.pop(0)
            elif message_id in self._names:
                self._names.remove(message_id)
            if self._held.pop(message_id, None) is None:
                (self.folder / message_id).unlink(missing_ok=True)
