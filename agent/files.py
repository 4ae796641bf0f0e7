"""Files on disk: atomic writes (a crash or a full disk never leaves a torn file where a good one was), the state
folder's lock, and the account of writes that fail."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def umask() -> int:
    """The process's umask, read without changing it (Linux), else by the set-and-restore dance."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through `write` to a temp file beside `path`, fsync it, rename it over `path`, fsync the folder.
    The file gets the mode a plain open() would give it (0644 under the usual umask, 0600 under the
    service's UMask=0077), not mkstemp's 0600: a model root exports must be readable by the service."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


class FolderInUse(Exception):
    """Another process holds the folder's lock; the message names its PID and what to do."""


class FolderLock:
    """An exclusive lock on a state folder (flock on `<folder>/agent.lock`, which holds the owner's PID), so that
    two agents never write the same checkpoints and spool. The kernel releases it when the process ends,
    however it ends: a killed agent leaves no stale lock."""

    NAME = "agent.lock"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise FolderInUse(f"state.dir: {folder} is in use by another tta-agent (PID {holder}); stop that one "
                              f"first (systemctl stop tta-agent, or kill {holder}), or give this one a state.dir "
                              "of its own") from None
        try:  # the PID is for the message above; a full disk must not stop the agent that holds the lock
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class WriteTrouble:
    """Writes that fail (a full disk, a folder gone read-only): each is counted; what failed is logged once
    with its path and reason, again when the reason changes, and once more when a write of it succeeds."""

    def __init__(self):
        self.failures = 0
        self.failing: dict[str, str] = {}  # what -> "cannot write <path>: <reason>"

    def failed(self, what: str, path: str | Path, exc: OSError) -> None:
        self.failures += 1
        line = f"cannot write {path}: {exc.strerror or exc}"
        if self.failing.get(what) != line:
            advice = ("free space on that disk" if exc.errno == errno.ENOSPC else
                      "check that folder's disk and permissions")
            log.error("%s: %s; %s (the agent keeps running and retries the write)", what, line, advice)
            self.failing[what] = line

    def succeeded(self, what: str) -> None:
        if self.failing.pop(what, None) is not None:
            log.info("%s: written again", what)

    @property
    def reason(self) -> str | None:
        """Why the agent is degraded by its writes, or None."""
        return next((f"{what}: {line}" for what, line in self.failing.items()), None)


def move_aside(path: Path) -> Path:
    """Rename a file that cannot be used to `<name>.<UTC time>.rejected` beside it, for a person to look at."""
    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.rejected")
    path.replace(aside)
    return aside
