"""Real processes for the tests: a mosquitto broker each test owns, the daemon as a subprocess, a subscriber."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import paho.mqtt.client as paho
import yaml
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Mosquitto:
    """A mosquitto process on a free port that the test can stop and restart (persistence on)."""

    def __init__(self, folder: Path, extra: str = "", port: int | None = None):
        if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.folder = folder
        self.port = port or free_port()
        self.conf = folder / "mosquitto.conf"
        # as root, mosquitto drops to its own user, which cannot read the test's private tmp folder
        stay = f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{stay}listener {self.port} 127.0.0.1\npersistence true\n"
                             f"persistence_location {folder}/\nautosave_interval 1\n"
                             + (extra or "allow_anonymous true\n"))
        self.proc: subprocess.Popen | None = None
        self.log = folder / "mosquitto.log"

    def start(self) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        if not wait_for(self._listening, 10):
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")
        return self

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


class Subscriber:
    """Collects every message under a topic filter, reconnecting like any user's client."""

    def __init__(self, port: int, topic: str = "#", client_id: str | None = None, tls: dict | None = None,
                 auth: tuple[str, str] | None = None):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        persistent = client_id is not None
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(0.2, 1)
        if tls:
            self.client.tls_set(**tls)
        if auth:
            self.client.username_pw_set(*auth)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def payloads(self, suffix: str) -> list:
        with self.lock:
            return [json.loads(p) if p[:1] in (b"{", b"[") else p.decode()
                    for t, p, _ in self.messages if t.endswith(suffix)]

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def fmnist_video(path: Path, segments: list[tuple[str, int]], fps: float = 50.0, size: int = 112,
                 seed: int = 0) -> list[str]:
    """A fixed grayscale 'camera' on a 4x4 shelf of Fashion-MNIST test images with sensor noise, with
    conditions: clean, noise, dark. (How drift alerts cope with content that moves is measured on
    real footage by bench/drift.py.)"""
    from exporters.models.fashion_mnist import load_split

    images, _ = load_split("t10k")
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    shelf = np.block([list(images[r:r + 4].astype(np.float32)) for r in range(0, 16, 4)])
    conditions = []
    for condition, count in segments:
        for _ in range(count):
            x = shelf + rng.normal(0, 3, shelf.shape)
            if condition == "noise":
                x = x + rng.normal(0, 70, x.shape)
            elif condition == "dark":
                x = 0.3 * x + 40
            frame = cv2.resize(np.clip(x, 0, 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_AREA)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
            conditions.append(condition)
    writer.release()
    return conditions


def agent_config(tmp: Path, model: Path, video: Path, port: int, **overrides) -> Path:
    doc = {
        "device_id": "test-box",
        "log_level": "info",
        "model": {"path": str(model), "device": "cpu"},
        "cameras": [{"name": "cam1", "source": str(video), "replay": {"paced": True}}],
        "mqtt": {"host": "127.0.0.1", "port": port, "prefix": "tta"},
        "state": {"dir": str(tmp / "state")},
        "exit_when_done": True,
        "advanced": {"model": {"threads": 1}, "adaptation": {"raw_every": 0},
                     "drift": {"warmup": 50, "end_frames": 20, "update_every": 1000},
                     "mqtt": {"stats_interval_s": 0.5, "keepalive_s": 5}, "state": {"checkpoint_every_s": 1}},
    }
    for key, value in overrides.items():  # section__key__... paths
        node = doc
        *parents, last = key.split("__")
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start_daemon(config: Path, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT,
                            env=environment, stdout=out, stderr=subprocess.STDOUT)


def stopped(daemon: subprocess.Popen, timeout: float) -> int | None:
    """The daemon's exit code, or None (after killing it) if it is still running `timeout` seconds on, so that
    the test can show its log rather than a TimeoutExpired."""
    try:
        return daemon.wait(timeout)
    except subprocess.TimeoutExpired:
        daemon.send_signal(signal.SIGUSR1)  # its threads' stacks, into the log the test shows
        time.sleep(1)
        daemon.kill()
        daemon.wait()
        return None


class FailingGpuSession:
    """Stands in for a CUDA session that dies mid-run: no GPU exists on the CI machine, so this is a mock
    (everything around it, the fallback and the daemon, is real)."""

    def __init__(self, real, error: str = "CUDA failure 700: an illegal memory access was encountered"):
        self.real, self.error = real, error

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self):
        return self.real.io_binding()

    def run_with_iobinding(self, binding):
        raise RuntimeError(self.error)


def quantized_weights(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """(node, INT8 weight) for every quantized Conv/Gemm, in QDQ (DequantizeLinear feeding the weight)
    or QLinearConv form."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type == "QLinearConv":
            found.append((node, values[node.input[3]]))
        elif node.op_type in ("Conv", "Gemm") and getattr(producers.get(node.input[1]), "op_type",
                                                            "") == "DequantizeLinear":
            found.append((node, values[producers[node.input[1]].input[0]]))
    return found
