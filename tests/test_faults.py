"""Faults injected into real processes: a mosquitto broker killed and restarted, the daemon killed
and restarted, a live MJPEG stream over HTTP that stalls, drops, changes resolution and sends
garbage. Each test records its figures (docs/operations.md, "Reliability") through the `figures` fixture."""
from __future__ import annotations

import re
import signal
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import Mosquitto, Subscriber, agent_config, fmnist_video, start_daemon, wait_for

DRIFT_LINE = re.compile(r"drift (\w+) camera=cam1 episode=(\w+) frame=(\d+)")


@pytest.fixture(scope="module")
def episodes_video(tmp_path_factory):
    """Three light failures (dark, low contrast) between clean stretches: 7.2 s at 100 fps."""
    path = tmp_path_factory.mktemp("faults") / "episodes.avi"
    segments = [("clean", 120), ("dark", 100), ("clean", 100), ("dark", 100), ("clean", 100), ("dark", 100),
                ("clean", 100)]
    fmnist_video(path, segments, fps=100.0)
    return path


def _raised(log: Path) -> list[tuple[str, str, int]]:
    return [(kind, episode, int(frame)) for kind, episode, frame in DRIFT_LINE.findall(log.read_text())]


def _received(sub: Subscriber) -> list[tuple[str, str, int]]:
    """At-least-once delivery: duplicates collapse, order is kept."""
    return list(dict.fromkeys((e["type"], e["episode"], e["frame"]) for e in sub.payloads("cam1/drift")))


def _log_times(log: Path, text: str) -> list[float]:
    stamps = re.findall(rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}}) .*{re.escape(text)}", log.read_text(), re.M)
    return [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in stamps]


def test_broker_killed_three_times_while_alerts_are_raised_loses_none(tmp_path, fmnist, episodes_video, figures):
    broker = Mosquitto(tmp_path).start()
    sub = Subscriber(broker.port, "tta/test-box/cam1/drift", client_id="alert-consumer")
    log = tmp_path / "agent.log"
    config = agent_config(tmp_path, fmnist["int8"], episodes_video, broker.port, exit_when_done=False,
                          cameras=[{"name": "cam1", "source": str(episodes_video), "replay": {"loop": True}}])
    daemon = start_daemon(config, log=log)  # loops the video: episodes keep coming until SIGTERM
    back = []
    try:
        assert wait_for(lambda: _raised(log), 60), log.read_text()[-2000:]
        for outage in range(3):
            broker.stop(signal.SIGKILL)  # no clean shutdown: sockets just die
            time.sleep(1.5)
            broker.start()
            back.append(time.time())
            assert wait_for(lambda n=outage + 2: len(_log_times(log, "connected to")) >= n, 40), \
                log.read_text()[-2000:]
            # let everything raised so far reach the consumer before the next kill (the broker's own
            # in-memory queue dies with it; that loss would be the broker's, not the agent's)
            assert wait_for(lambda: _received(sub) == _raised(log), 20)
        daemon.terminate()
        assert daemon.wait(20) == 0, log.read_text()[-2000:]
        assert wait_for(lambda: _received(sub) == _raised(log), 20)
    finally:
        daemon.kill()
        sub.stop()
        broker.stop()
    raised = _raised(log)
    assert len(raised) >= 4 and _received(sub) == raised
    reconnect = [c - b for c, b in zip(_log_times(log, "connected to")[1:], back)]
    assert all(r >= -0.05 for r in reconnect)
    figures["broker_killed_3x"] = {"alerts_raised": len(raised), "alerts_received": len(_received(sub)),
                                   "alerts_lost": len(set(raised) - set(_received(sub))),
                                   "reconnect_s": [round(r, 2) for r in reconnect]}


def test_agent_killed_then_restarted_delivers_its_spool_and_resumes_from_the_checkpoint(
        tmp_path, fmnist, episodes_video, figures):
    broker = Mosquitto(tmp_path).start()
    sub = Subscriber(broker.port, "tta/test-box/cam1/drift", client_id="alert-consumer")
    config = agent_config(tmp_path, fmnist["int8"], episodes_video, broker.port, advanced__state__checkpoint_every_s=1)
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    daemon = start_daemon(config, log=first)
    try:
        assert wait_for(lambda: _raised(first), 60), first.read_text()[-2000:]
        broker.stop()  # from here on alerts can only go to the spool
        count = len(_raised(first))
        assert wait_for(lambda: len(_raised(first)) > count, 60)
        time.sleep(1.2)  # at least one checkpoint after the last alert
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        spooled = list((tmp_path / "state" / "spool").iterdir())
        assert spooled, "alerts raised while the broker was down must be on disk"
        broker.start()
        daemon = start_daemon(config, log=second)
        assert daemon.wait(120) == 0, second.read_text()[-2000:]
        assert wait_for(lambda: _received(sub) == _raised(first) + _raised(second), 20), (
            _received(sub), _raised(first), _raised(second))
    finally:
        daemon.kill()
        sub.stop()
        broker.stop()
    resumed = re.search(r"resumes adaptation from \S+ \((\d+) frames, (\d+) s old\)", second.read_text())
    assert resumed, second.read_text()[-2000:]
    episodes: dict[str, set] = {}
    for kind, episode, frame in _received(sub):
        if kind == "start":
            episodes.setdefault(episode, set()).add(frame)
    assert all(len(frames) == 1 for frames in episodes.values())  # one start per episode id, never two
    assert not list((tmp_path / "state" / "spool").iterdir())
    figures["agent_sigkill_restart"] = {
        "alerts_spooled_at_kill": len(spooled), "alerts_raised": len(_raised(first) + _raised(second)),
        "alerts_lost": 0, "checkpoint_frames": int(resumed.group(1)),
        "checkpoint_age_s": int(resumed.group(2))}


class _Stream:
    """An MJPEG-over-HTTP camera the test scripts: each connection plays the next act."""

    def __init__(self, acts: list[list]):
        self.acts = acts
        self.served = 0
        stream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if stream.served >= len(stream.acts):
                    self.send_error(503)
                    return
                act = stream.acts[stream.served]
                stream.served += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for step in act:
                        if isinstance(step, float):  # a stall: the connection stays open, silent
                            time.sleep(step)
                            continue
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(step) + step + b"\r\n")
                        time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def _jpegs(count: int, size: tuple[int, int], seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [cv2.imencode(".jpg", rng.integers(0, 255, (*size, 3), dtype=np.uint8))[1].tobytes()
            for _ in range(count)]


def test_live_stream_that_stalls_drops_changes_size_and_sends_garbage_is_survived(tmp_path, fmnist, figures):
    garbage = [np.random.default_rng(1).bytes(3000) for _ in range(10)]
    acts = [
        _jpegs(40, (56, 56), 0) + [3.0],  # frames, then silence past the stall timeout
        _jpegs(20, (120, 160), 1) + garbage + _jpegs(20, (120, 160), 2),  # a new size, undecodable parts
    ]
    stream = _Stream(acts)
    broker = Mosquitto(tmp_path).start()
    sub = Subscriber(broker.port, "tta/test-box/stats")
    log = tmp_path / "agent.log"
    config = agent_config(tmp_path, fmnist["int8"], Path("unused"), broker.port, exit_when_done=False,
                          cameras=[{"name": "cam1", "source": stream.url}],
                          advanced__sources={"stall_timeout_s": 1.0, "reconnect_max_s": 1.0})
    daemon = start_daemon(config, log=log)
    try:
        def camera():
            stats = sub.payloads("stats")
            return stats[-1]["cameras"]["cam1"] if stats else {}

        assert wait_for(lambda: stream.served >= 2 and camera().get("frames_read", 0) >= 70, 60), (
            camera(), log.read_text()[-3000:])
        assert wait_for(lambda: camera().get("reconnects", 0) >= 1 and camera().get("stalls", 0) >= 1, 20)
        assert daemon.poll() is None
        c = camera()
    finally:
        daemon.terminate()
        code = daemon.wait(10)
        stream.close()
        sub.stop()
        broker.stop()
    assert code == 0, log.read_text()[-3000:]
    assert "stalled" in log.read_text()
    assert c["frames_processed"] + c["frames_rejected"] + c["frames_skipped"] >= 70
    figures["live_stream_faults"] = {k: c[k] for k in ("frames_read", "frames_processed", "frames_skipped",
                                                       "frames_rejected", "stalls", "reconnects")}
