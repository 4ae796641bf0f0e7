"""The README's first command: everything set up on a fresh machine, then the agent at work.

Makes the sample video and the default model if they are missing, starts an embedded
broker unless the config names one, runs the daemon over the video, shows what an MQTT
subscriber sees live, and ends with the replay summary and the PNG report.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho

from .config import load_config
from .daemon import Agent, set_log_level
from .replay import ReplayRecord, format_table, plot_report, read_labels, summarize
from .samples import render_sample_video, sidecar_path

log = logging.getLogger(__name__)


class LiveView:
    """A plain MQTT subscriber that prints what the agent publishes, as any user's client would see it."""

    def __init__(self, host: str, port: int, prefix: str, every: int = 20):
        self.every = every
        self.counts: Counter = Counter()
        self.connected = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="tta-demo-view")
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(f"{prefix}/#", qos=1), self.connected.set())
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        self.connected.wait(10)

    def _on_message(self, client, userdata, message):
        kind = message.topic.rsplit("/", 1)[-1]
        self.counts[kind] += 1
        if kind == "availability":
            print(f"  [mqtt] {message.topic} = {message.payload.decode()}")
        if kind not in ("prediction", "drift"):
            return
        doc = json.loads(message.payload)
        if kind == "prediction" and doc["frame"] % self.every == 0:
            raw = f"  raw {doc['raw'][0]['label'][:22]:<22}" if doc.get("raw") else ""
            top = doc["adapted"][0]
            print(f"  [mqtt] frame {doc['frame']:>4}  adapted {top['label'][:22]:<22} {top['p']:.2f}{raw}"
                  f"  drift {doc['drift_score']:.1f}{'  LAME' if doc['lame_applied'] else ''}")
        elif kind == "drift":
            layers = ", ".join(t["layer"] for t in doc["top_layers"])
            print(f"  [mqtt] DRIFT {doc['type'].upper():<6} frame {doc['frame']:>4}  episode {doc['episode']}  "
                  f"score {doc['score']:.1f}  layers {layers}")

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()


class DemoError(RuntimeError):
    """The demo could not make what it needs."""


def ensure_inputs(model: Path, video: Path) -> None:
    if not video.exists():
        print(f"making the sample video {video} (a camera panning over scikit-image photos: clean, fog, night, clean)")
        video.parent.mkdir(parents=True, exist_ok=True)
        render_sample_video(video)
    if not model.exists():
        print(f"exporting the default model to {model} (EfficientNet-Lite0, ImageNet weights, INT8)")
        # the exporter as a user runs it: the agent itself never imports the torch half
        exporter = Path(sys.executable).with_name("tta-export")
        if not exporter.exists():
            raise DemoError(f"{exporter} not found: install the exporter (pip install -e '.[export]')")
        model.parent.mkdir(parents=True, exist_ok=True)
        if subprocess.run([str(exporter), "efficientnet-lite0", "--out", str(model)], check=False).returncode != 0:
            raise DemoError(f"exporting {model} failed (its error is above)")


def clear_state(folder: Path) -> None:
    """A demo starts clean: what the last run learnt (checkpoints, drift references, unsent alerts) goes."""
    for pattern in ("*.state.npz", "*.drift.json", "spool/*.json"):
        for path in folder.glob(pattern):
            path.unlink()


def run_demo(config_path: Path, resume: bool = False) -> int:
    config = load_config(config_path)
    if not resume:
        clear_state(config.state.dir)
    set_log_level(config.log_level)
    # the embedded broker narrates its clients' comings and goings (a PUBACK that a closing subscriber never
    # sent) at warning and error level: for debugging it, not for the demo's reader
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    video = Path(config.cameras[0].source)
    ensure_inputs(config.model.path, video)
    broker = None
    host, port = config.mqtt.host, config.mqtt.port
    if host is None:
        from .broker import EmbeddedBroker

        broker = EmbeddedBroker().start()
        host, port = "127.0.0.1", broker.port
    record = ReplayRecord()
    agent = Agent(config, config_path, broker=(host, port))
    for camera in agent.cameras:
        camera.pipeline.score_unadapted = True  # the unadapted model on every frame, so the summary can compare
    labels = read_labels(sidecar_path(video), agent.info.labels) if sidecar_path(video).exists() else {}
    agent.sinks.append(lambda camera, result: record.add(result, labels.get(result.frame)))
    view = LiveView(host, port, config.mqtt.prefix)
    print(f"agent {config.device_id}: {video.name} through {config.model.path.name}, MQTT on {host}:{port}")
    try:
        agent.install_signal_handlers()
        agent.run()
    finally:
        view.stop()
        if broker:
            broker.stop()
    camera = agent.cameras[0]
    summary = summarize(camera.pipeline, camera.source, record, elapsed=sum(record.latency_ms) / 1000)
    print()
    print(format_table(summary))
    print(f"MQTT messages received by the subscriber: {dict(view.counts)}")
    report = config.state.dir / "demo-report.png"
    if plot_report(record, summary, report):
        print(f"report: {report}")
    return 0
