"""Frame sources through OpenCV VideoCapture: video files (replay) and live cameras/streams.

Live sources read on a thread of their own and keep only the newest frame, so a slow
model never works on stale frames; what it skips is counted. A stall watchdog reopens
the stream with exponential backoff when frames stop coming.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)
READ_AHEAD = 8  # frames a file replay decodes ahead of the model


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
        self._capture = self._open()
        self.fps = self._capture.get(cv2.CAP_PROP_FPS) or 25.0
        self.frame_count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.truncated = False
        self.finished = False
        self._rewind()

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise SourceError(f"video file {self.path} cannot be opened (not a video OpenCV can decode)")
        return capture

    def _rewind(self) -> None:
        if self.start:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, self.start)
        self._index = self.start
        self._t0 = time.monotonic()

    def poll(self) -> Frame | None:
        """The next frame, or None when a paced replay is not due yet or the file has ended."""
        if self.finished:
            return None
        if self.paced and time.monotonic() < self._t0 + (self._index - self.start) / self.fps:
            return None
        if self.end is not None and self._index >= self.end:
            return self._ended()
        ok, image = self._capture.read()
        if not ok:
            expected = min(self.frame_count, self.end or self.frame_count)
            if self.frame_count and self._index < expected - 1:
                self.truncated = True
                self.counters.errors.append(f"{self.path.name}: decoding stopped at frame {self._index} "
                                            f"of {self.frame_count} (truncated or corrupt file)")
                log.warning("%s", self.counters.errors[-1])
            return self._ended()
        self.counters.read += 1
        frame = Frame(self._index, image, time.time())
        self._index += 1
        return frame

    def _ended(self) -> Frame | None:
        if self.loop and self.counters.read:
            self._capture.release()
            self._capture = self._open()
            self._rewind()
            return self.poll()
        self.finished = True
        self._capture.release()
        return None

    def frames(self) -> Iterator[Frame]:
        """Every frame in order. Unpaced, a thread decodes up to READ_AHEAD frames ahead, so decoding
        overlaps the model (both release the GIL) instead of adding to each frame's time."""
        if self.paced:
            while not self.finished:
                frame = self.poll()
                if frame is not None:
                    yield frame
                elif not self.finished:
                    time.sleep(0.002)
            return
        decoded: queue.Queue[Frame | BaseException | None] = queue.Queue(READ_AHEAD)

        def decode() -> None:
            try:
                while not self.finished:
                    frame = self.poll()
                    if frame is not None:
                        decoded.put(frame)
            except BaseException as exc:  # handed to the consumer, raised there
                decoded.put(exc)
            decoded.put(None)

        thread = threading.Thread(target=decode, name=f"decode-{self.path.name}", daemon=True)
        thread.start()
        try:
            while (item := decoded.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.finished = True
            while thread.is_alive():  # unblock a decoder waiting on a full queue
                try:
                    decoded.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.01)

    def stop(self) -> None:
        self.finished = True
        self._capture.release()


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

    finished = False  # a live source never ends by itself

    def poll(self, timeout: float = 0.0) -> Frame | None:
        """The newest frame not yet handed out, waiting up to `timeout` seconds for one."""
        with self._cond:
            if self._taken and timeout:
                self._cond.wait_for(lambda: not self._taken or self._stop.is_set(), timeout=timeout)
            if self._taken:
                return None
            self._taken = True
            return self._latest

    def frames(self) -> Iterator[Frame]:
        while not self._stop.is_set():
            frame = self.poll(timeout=1.0)
            if frame is not None:
                yield frame

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=self.stall_timeout + self.open_timeout + 1)


def open_source(camera) -> FileSource | LiveSource:
    """From a CameraConfig: a digit is a camera index, a URL a stream, anything else a video file."""
    uri = camera.source
    if uri.isdigit() or "://" in uri:
        return LiveSource(int(uri) if uri.isdigit() else uri, stall_timeout=camera.stall_timeout_s,
                          backoff_max=camera.reconnect_max_s)
    replay = camera.replay
    return FileSource(uri, paced=replay.paced, loop=replay.loop, start=replay.start, end=replay.end)
