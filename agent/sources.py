"""Frame sources through OpenCV VideoCapture: video files (replay) and live cameras/streams.

Live sources read on a thread of their own and keep only the newest frame, so a slow
model never works on stale frames; what it skips is counted. A stall watchdog reopens
the stream with exponential backoff when frames stop coming.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import stat
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


STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
_DEVICE = re.compile(r"^/dev/video(\d+)$")
_CREDENTIALS = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def redact(uri: str | int) -> str:
    """A stream URL without its user and password: safe for logs, stats and errors."""
    return _CREDENTIALS.sub(r"\1***@", str(uri))


def source_kind(uri: str) -> str:
    """'index' (a digit), 'device' (/dev/videoN), 'stream' (a URL) or 'file'."""
    if uri.isdigit() or _DEVICE.match(uri):
        return "device" if uri.startswith("/") else "index"
    return "stream" if "://" in uri else "file"


def source_problem(uri: str) -> str | None:
    """Why this source cannot be opened, from its form alone (nothing is opened), or None."""
    kind = source_kind(uri)
    if kind in ("index", "device"):
        node = uri if kind == "device" else f"/dev/video{uri}"
        if os.path.isdir("/dev/") and not os.path.exists(node):
            return f"camera device {node} does not exist (is the camera plugged in? v4l2-ctl --list-devices)"
        return None
    if kind == "stream":
        scheme = uri.split("://", 1)[0].lower()
        if scheme not in STREAM_SCHEMES:
            return f"stream {redact(uri)}: scheme {scheme!r} is not one of {', '.join(STREAM_SCHEMES)}"
        return None
    try:
        mode = os.stat(uri).st_mode
    except FileNotFoundError:
        return f"video file {uri} does not exist"
    except OSError as exc:
        return f"video file {uri} cannot be read: {exc.strerror}"
    if not stat.S_ISREG(mode):
        return (f"{uri} is neither a video file nor a camera device (cameras are a digit, /dev/videoN "
                "or a stream URL)")
    if not os.access(uri, os.R_OK):
        return f"video file {uri} cannot be read: permission denied (the service's user needs read access)"
    return None


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
        problem = source_problem(str(self.path))
        if problem:
            raise SourceError(problem)
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
            if _mp4_without_index(self.path):
                raise SourceError(f"video file {self.path} cannot be opened: it is an MP4/MOV without its index "
                                  "('moov' box), a recording cut off before it was finished; recover it with a "
                                  "tool such as untrunc, or record MKV or fragmented MP4, which stay readable "
                                  "when cut")
            raise SourceError(f"video file {self.path} cannot be opened (not a video OpenCV can decode)")
        return capture

    @property
    def connected(self) -> bool:
        return not self.finished

    @property
    def last_error(self) -> str | None:
        return self.counters.errors[-1] if self.counters.errors else None

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


def _mp4_without_index(path: Path) -> bool:
    """An ISO media file (MP4/MOV: an 'ftyp' box first) whose top-level boxes hold no 'moov'."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            position, boxes = 0, []
            while position + 8 <= size and len(boxes) < 10_000:
                f.seek(position)
                header = f.read(16)
                length, kind = int.from_bytes(header[:4], "big"), header[4:8]
                if length == 1 and len(header) == 16:
                    length = int.from_bytes(header[8:16], "big")
                boxes.append(kind)
                if length < 8:
                    break
                position += length
    except OSError:
        return False
    return bool(boxes) and boxes[0] == b"ftyp" and b"moov" not in boxes


class LiveSource:
    """A camera (index or /dev/videoN) or a stream URL; always hands out the newest frame."""

    def __init__(self, uri: str | int, stall_timeout: float = 5.0, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, open_timeout: float = 10.0):
        self.uri = uri
        self.stall_timeout = stall_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.open_timeout = open_timeout
        self.counters = SourceCounters()
        self.connected = False
        self.last_error: str | None = None  # why the source is down, cleared by the next frame
        self.last_frame_at: float | None = None  # time.monotonic() of the newest frame read
        self.name = redact(uri)
        self._latest: Frame | None = None
        self._taken = True
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reader, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def _capture(self) -> cv2.VideoCapture:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.stall_timeout * 1000)]
        if isinstance(self.uri, int):
            return cv2.VideoCapture(self.uri, cv2.CAP_ANY, params)
        if _DEVICE.match(self.uri):
            return cv2.VideoCapture(self.uri, cv2.CAP_V4L2, params)
        return cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, params)

    def _reader(self) -> None:
        backoff = self.backoff_initial
        index = 0
        first = True
        while not self._stop.is_set():
            capture = self._capture()
            if not capture.isOpened():
                capture.release()
                self._failed(f"cannot open {self.name}")
                log.warning("cannot open %s; retrying in %.1f s", self.name, backoff)
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
                last = self.last_frame_at = time.monotonic()
                self.last_error = None
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
                self._failed(f"{self.name} stalled (no frame for {self.stall_timeout:.1f} s)")
                log.warning("%s stalled (no frame for %.1f s); reconnecting in %.1f s", self.name,
                            self.stall_timeout, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max)

    def _failed(self, error: str) -> None:
        self.last_error = error
        self.counters.errors.append(error)
        del self.counters.errors[:-20]

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


def open_source(camera, live) -> FileSource | LiveSource:
    """From a CameraConfig and the config's advanced.sources (timeouts of live ones): a digit or /dev/videoN
    is a camera, a URL a stream, anything else a video file."""
    uri = camera.source
    kind = source_kind(uri)
    if kind != "file":
        return LiveSource(int(uri) if kind == "index" else uri, stall_timeout=live.stall_timeout_s,
                          backoff_max=live.reconnect_max_s)
    replay = camera.replay
    return FileSource(uri, paced=replay.paced, loop=replay.loop, start=replay.start, end=replay.end)
