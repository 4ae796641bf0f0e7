"""Frame sources through OpenCV VideoCapture: video files (replay) and live cameras/streams.

Live sources read on a thread of their own and keep only the newest frame, so a slow
model never works on stale frames; what it skips is counted. A stall watchdog reopens
the stream with exponential backoff when frames stop coming.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The source cannot be opened at all; the message names it."""


@dataclass
class Frame:
    index: int  # position in the source (file frame number, or count of frames read live)
    image: np.ndarray
    captured: float  # time.time() when read


@dataclass
class SourceCounters:
    read: int = 0  # frames decoded from the source
    skipped: int = 0  # read but superseded by a newer frame before the model took them
    reconnects: int = 0
    stalls: int = 0
    errors: list[str] = field(default_factory=list)


class FileSource:
    """A recorded video: paced at its own frame rate, or as fast as the model goes."""

    def __init__(self, path: str | Path, paced: bool = False, loop: bool = False, start: int = 0,
                 end: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"video file {self.path} does not exist")
        self.paced, self.loop, self.start, self.end = paced, loop, start, end
        self.counters = SourceCounters()
        capture = self._open()
        self.fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        self.frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        capture.release()
        self.truncated = False
        self._stop = threading.Event()

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise SourceError(f"video file {self.path} cannot be opened (not a video OpenCV can decode)")
        return capture

    def stop(self) -> None:
        self._stop.set()

    def frames(self) -> Iterator[Frame]:
        while not self._stop.is_set():
            yield from self._one_pass()
            if not self.loop:
                return

    def _one_pass(self) -> Iterator[Frame]:
        capture = self._open()
        try:
            if self.start:
                capture.set(cv2.CAP_PROP_POS_FRAMES, self.start)
            index = self.start
            t0 = time.monotonic()
            while not self._stop.is_set() and (self.end is None or index < self.end):
                ok, image = capture.read()
                if not ok:
                    if self.frame_count and index < min(self.frame_count, self.end or self.frame_count) - 1:
                        self.truncated = True
                        self.counters.errors.append(f"{self.path.name}: decoding stopped at frame {index} "
                                                    f"of {self.frame_count} (truncated or corrupt file)")
                        log.warning("%s", self.counters.errors[-1])
                    return
                self.counters.read += 1
                if self.paced:
                    delay = t0 + (index - self.start) / self.fps - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                yield Frame(index, image, time.time())
                index += 1
        finally:
            capture.release()


class LiveSource:
    """A camera index or a stream URL; always hands out the newest frame."""

    def __init__(self, uri: str | int, stall_timeout: float = 5.0, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, open_timeout: float = 10.0):
        self.uri = uri
        self.stall_timeout = stall_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.open_timeout = open_timeout
        self.counters = SourceCounters()
        self.connected = False
        self._latest: Frame | None = None
        self._taken = True
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reader, name=f"source-{uri}", daemon=True)
        self._thread.start()

    def _capture(self) -> cv2.VideoCapture:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.stall_timeout * 1000)]
        if isinstance(self.uri, int):
            return cv2.VideoCapture(self.uri, cv2.CAP_ANY, params)
        return cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, params)

    def _reader(self) -> None:
        backoff = self.backoff_initial
        index = 0
        first = True
        while not self._stop.is_set():
            capture = self._capture()
            if not capture.isOpened():
                capture.release()
                self.counters.errors.append(f"cannot open {self.uri}")
                log.warning("cannot open %s; retrying in %.1f s", self.uri, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            if not first:
                self.counters.reconnects += 1
            first = False
            self.connected = True
            last = time.monotonic()
            while not self._stop.is_set():
                ok, image = capture.read()
                if not ok:
                    if time.monotonic() - last > self.stall_timeout or not capture.isOpened():
                        break
                    self._stop.wait(0.01)
                    continue
                last = time.monotonic()
                backoff = self.backoff_initial
                self.counters.read += 1
                with self._cond:
                    if not self._taken:
                        self.counters.skipped += 1
                    self._latest, self._taken = Frame(index, image, time.time()), False
                    self._cond.notify()
                index += 1
            capture.release()
            self.connected = False
            if not self._stop.is_set():
                self.counters.stalls += 1
                log.warning("%s stalled (no frame for %.1f s); reconnecting in %.1f s", self.uri,
                            self.stall_timeout, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max)

    def frames(self) -> Iterator[Frame]:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: not self._taken or self._stop.is_set(), timeout=1.0)
                if self._taken:
                    continue
                frame, self._taken = self._latest, True
            yield frame

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=self.stall_timeout + self.open_timeout + 1)


def open_source(uri: str, **options) -> FileSource | LiveSource:
    """A digit is a camera index, a URL a stream, anything else a video file."""
    if uri.isdigit():
        return LiveSource(int(uri), **{k: v for k, v in options.items() if k in _LIVE_OPTIONS})
    if "://" in uri:
        return LiveSource(uri, **{k: v for k, v in options.items() if k in _LIVE_OPTIONS})
    return FileSource(uri, **{k: v for k, v in options.items() if k in _FILE_OPTIONS})


_LIVE_OPTIONS = {"stall_timeout", "backoff_initial", "backoff_max", "open_timeout"}
_FILE_OPTIONS = {"paced", "loop", "start", "end"}
