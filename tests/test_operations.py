"""Run as an operator would: the shipped CLI as a subprocess, a real mosquitto, files on disk.

Each test is one thing an operator met: a config that passed validation and then crashed,
secrets in logs, a dead camera that looked healthy, silent broker trouble, SIGHUP's scope,
retained commands, device paths, file modes, noise, truncated files, Home Assistant's
sensors, and the HTTP health and metrics endpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import onnx
import paho.mqtt.client as paho
import pytest
import yaml
from helpers import ROOT, Mosquitto, Subscriber, agent_config, fmnist_video, free_port, start_daemon, wait_for

from agent.config import load_config
from agent.files import umask, write_atomic
from agent.sources import LiveSource, open_source, redact, source_kind


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ops") / "shelf.avi"
    fmnist_video(path, [("clean", 200)])
    return path


def looping(tmp_path: Path, model: Path, video: Path, port: int, **overrides) -> Path:
    """A daemon config whose camera loops the video until the test stops it."""
    return agent_config(tmp_path, model, video, port, exit_when_done=False,
                        cameras=[{"name": "cam1", "source": str(video), "replay": {"loop": True}}], **overrides)


def closed_port() -> int:
    return free_port()  # nothing listens on it


def edit(config: Path, **changes) -> Path:
    doc = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        node = doc
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    config.write_text(yaml.safe_dump(doc))
    return config


def relabelled(model: Path, folder: Path, labels: list[str]) -> Path:
    m = onnx.load(str(model))
    for prop in m.metadata_props:
        if prop.key == "tta.labels":
            prop.value = json.dumps(labels)
    out = folder / "relabelled.onnx"
    onnx.save(m, str(out))
    return out


# -- a model that does not match its own labels -------------------------------------------------

def test_labels_that_do_not_match_the_classifier_stop_validation_and_start(tmp_path, fmnist, video):
    model = relabelled(fmnist["int8"], tmp_path, [f"class {i}" for i in range(3)])
    config = agent_config(tmp_path, model, video, closed_port())
    for args in (("validate-config", str(config)), ("run", "--config", str(config))):
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("tta-agent: error: ") and "Traceback" not in result.stderr
        assert "tta.labels names 3 classes but the classifier has 10 outputs" in lines[-1]


# -- validate-config does what run does, short of running ----------------------------------------

def _bad_configs(tmp: Path, model: Path, video: Path) -> dict[str, tuple[dict, str]]:
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    plain = tmp / "plain.onnx"
    m = onnx.load(str(model))
    del m.metadata_props[:]
    onnx.save(m, str(plain))
    not_a_cert = tmp / "ca.pem"
    not_a_cert.write_text("not a certificate\n")
    os.environ.pop("TTA_TEST_UNSET", None)
    return {
        "truncated model": ({"model__path": str(truncated)}, "model.path: "),
        "plain ONNX": ({"model__path": str(plain)}, "is not an adaptive tta-agent model"),
        "model is a folder": ({"model__path": str(tmp)}, "model.path: "),
        "missing password_file": ({"mqtt__username": "u", "mqtt__password_file": str(tmp / "nope")},
                                  "mqtt.password_file: cannot read"),
        "unset password_env": ({"mqtt__username": "u", "mqtt__password_env": "TTA_TEST_UNSET"},
                               "mqtt.password_env: environment variable TTA_TEST_UNSET is not set"),
        "missing TLS CA": ({"mqtt__tls": {"ca": str(tmp / "missing-ca.pem")}}, "mqtt.tls.ca: cannot read"),
        "TLS CA not a certificate": ({"mqtt__tls": {"ca": str(not_a_cert)}}, "mqtt.tls.ca: "),
        "state dir not writable": ({"state__dir": "/proc/tta-agent-state"}, "state.dir: cannot write"),
        "camera device missing": ({"cameras": [{"name": "cam1", "source": "/dev/video97"}]},
                                  "cameras.0.source: camera device /dev/video97 does not exist"),
        "camera index missing": ({"cameras": [{"name": "cam1", "source": "97"}]},
                                 "cameras.0.source: camera device /dev/video97 does not exist"),
        "not a camera": ({"cameras": [{"name": "cam1", "source": "/dev/null"}]},
                         "cameras.0.source: /dev/null is neither a video file nor a camera device"),
        "video missing": ({"cameras": [{"name": "cam1", "source": str(tmp / "gone.mp4")}]},
                          "cameras.0.source: video file"),
        "unknown stream scheme": ({"cameras": [{"name": "cam1", "source": "ftp://cam/x"}]}, "scheme 'ftp'"),
    }


def test_validate_config_refuses_what_would_fail_at_start_and_run_fails_the_same_way(tmp_path, fmnist, video):
    cases = _bad_configs(tmp_path, fmnist["int8"], video)
    for name, (overrides, expected) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        config = agent_config(folder, fmnist["int8"], video, closed_port(), **overrides)
        checked = cli("validate-config", str(config))
        assert checked.returncode == 2, (name, checked.stdout, checked.stderr)
        assert expected in checked.stderr and "Traceback" not in checked.stderr, (name, checked.stderr)
        assert all(line.startswith("tta-agent: error: ") for line in checked.stderr.strip().splitlines()), name
    # run refuses the same way (no traceback, exit 2): the three that used to crash it, and one more
    for name in ("missing TLS CA", "state dir not writable", "unset password_env", "camera device missing"):
        config = tmp_path / name.replace(" ", "_") / "agent.yaml"
        ran = cli("run", "--config", str(config))
        assert ran.returncode == 2 and "Traceback" not in ran.stderr, (name, ran.stderr[-2000:])
        assert cases[name][1] in ran.stderr, (name, ran.stderr[-2000:])


def test_validate_config_passes_a_good_config_and_probe_opens_the_cameras(tmp_path, fmnist, video):
    config = agent_config(tmp_path, fmnist["int8"], video, closed_port())
    assert cli("validate-config", str(config), "--probe").returncode == 0
    rtsp = f"rtsp://admin:s3cret@127.0.0.1:{closed_port()}/stream1"
    edit(config, cameras=[{"name": "cam1", "source": rtsp}])
    assert cli("validate-config", str(config)).returncode == 0  # the form is right; a stream may come later
    probed = cli("validate-config", str(config), "--probe")
    assert probed.returncode == 2
    assert "cameras.0.source: rtsp://***@127.0.0.1" in probed.stderr and "s3cret" not in probed.stderr


# -- a dead camera, and its password ------------------------------------------------------------

def test_a_dead_rtsp_camera_is_degraded_in_stats_and_its_password_never_logged(tmp_path, broker, fmnist, video):
    rtsp = f"rtsp://admin:s3cret@127.0.0.1:{closed_port()}/stream1"
    config = agent_config(tmp_path, fmnist["int8"], video, broker.port, exit_when_done=False,
                          cameras=[{"name": "door", "source": rtsp},
                                   {"name": "hall", "source": str(video), "replay": {"loop": True}}],
                          advanced__sources__reconnect_max_s=1)
    sub = Subscriber(broker.port, "tta/test-box/stats")
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: any(s["status"] == "degraded" and s["cameras"]["hall"]["frames_processed"]
                                    for s in sub.payloads("stats")), 60), log.read_text()[-2000:]
        assert wait_for(lambda: log.read_text().count("cannot open") >= 2, 30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        sub.stop()
    stats = next(s for s in sub.payloads("stats") if s["status"] == "degraded"
                 and s["cameras"]["hall"]["frames_processed"])
    door, hall = stats["cameras"]["door"], stats["cameras"]["hall"]
    assert door["connected"] is False and door["since_last_frame_s"] is None
    assert door["last_error"] == f"cannot open {redact(rtsp)}" and "***@" in door["last_error"]
    assert stats["degraded_reason"] == f"camera door: {door['last_error']}"
    assert hall["connected"] is True and hall["last_error"] is None and hall["since_last_frame_s"] is not None
    text = log.read_text() + json.dumps(sub.payloads("stats"))
    assert "s3cret" not in text and "admin:" not in text


# -- broker trouble ---------------------------------------------------------------------------

def test_an_unreachable_broker_is_logged_with_its_reason_and_its_return(tmp_path, fmnist, video):
    port = free_port()
    config = looping(tmp_path, fmnist["int8"], video, port)
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    broker = Mosquitto(tmp_path, port=port)
    try:
        assert wait_for(lambda: f"broker 127.0.0.1:{port}: cannot connect: Connection refused" in log.read_text(),
                        30), log.read_text()[-2000:]
        time.sleep(3)  # paho retries every second or two: the same reason is not repeated within a minute
        assert log.read_text().count("cannot connect: Connection refused") == 1
        assert "Client is not connected" not in log.read_text()  # paho's own narration stays out
        broker.start()
        assert wait_for(lambda: f"broker 127.0.0.1:{port} reached after" in log.read_text(), 30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
        broker.stop()


def test_tls_against_a_plain_listener_says_so(tmp_path, broker, fmnist, video):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(ssl_ca_pem())
    config = looping(tmp_path, fmnist["int8"], video, broker.port, mqtt__tls={"ca": str(ca)})
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: "TLS handshake failed" in log.read_text(), 30), log.read_text()[-2000:]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)


def ssl_ca_pem() -> bytes:
    """A self-signed CA made with openssl (installed with the system)."""
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"tta-ca-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "k.pem"),
                    "-out", str(folder / "ca.pem"), "-days", "1", "-subj", "/CN=tta-test-ca"], check=True,
                   capture_output=True)
    data = (folder / "ca.pem").read_bytes()
    shutil.rmtree(folder)
    return data


# -- SIGHUP ----------------------------------------------------------------------------------

def test_sighup_while_the_model_loads_is_not_fatal(tmp_path, broker, fmnist, video):
    config = agent_config(tmp_path, fmnist["int8"], video, broker.port,
                          cameras=[{"name": "cam1", "source": str(video), "replay": {"paced": False}}])
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    assert wait_for(lambda: log.exists() and "starting:" in log.read_text(), 60)
    daemon.send_signal(signal.SIGHUP)
    assert daemon.wait(120) == 0, log.read_text()[-2000:]


def test_sighup_reloads_publishing_keys_and_keeps_commanded_modes(tmp_path, broker, fmnist, video):
    config = looping(tmp_path, fmnist["int8"], video, broker.port)
    sub = Subscriber(broker.port, "tta/#")
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: len(sub.payloads("cam1/prediction")) > 5, 60), log.read_text()[-2000:]
        assert len(sub.payloads("cam1/prediction")[-1]["adapted"]) == 3
        sub.client.publish("tta/test-box/cam1/adaptation/set", "frozen", qos=1)
        sub.client.publish("tta/test-box/cam1/lame/set", "off", qos=1)
        assert wait_for(lambda: sub.payloads("stats")[-1]["cameras"]["cam1"]["adaptation"] == "frozen", 30)
        edit(config, advanced__mqtt__top_k=5)
        daemon.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in log.read_text(), 30)
        seen = len(sub.payloads("cam1/prediction"))
        assert wait_for(lambda: len(sub.payloads("cam1/prediction")) > seen + 5, 30)
        assert len(sub.payloads("cam1/prediction")[-1]["adapted"]) == 5
        assert "take effect after a restart" not in log.read_text()
        time.sleep(1.5)  # a few stats intervals after the reload
        camera = sub.payloads("stats")[-1]["cameras"]["cam1"]
        assert camera["adaptation"] == "frozen" and sub.payloads("cam1/prediction")[-1]["lame_applied"] is False
        assert "keeps adaptation frozen, LAME off (set by MQTT command)" in log.read_text()
        edit(config, mqtt__port=1)  # the connection needs a restart: said, not applied
        daemon.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "mqtt.port changed; those take effect after a restart" in log.read_text(), 30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        sub.stop()


# -- retained commands -----------------------------------------------------------------------

def test_a_retained_command_is_ignored_and_clearing_it_is_not_an_error(tmp_path, broker, fmnist, video):
    topic = "tta/test-box/cam1/adaptation/set"
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    pub.publish(topic, "off", qos=1, retain=True).wait_for_publish(5)
    config = looping(tmp_path, fmnist["int8"], video, broker.port)
    sub = Subscriber(broker.port, "tta/test-box/stats")
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: any(s["mqtt"]["commands_ignored"] == 1 for s in sub.payloads("stats")), 60)
        assert f"retained command on '{topic}' ignored" in log.read_text()
        pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # the operator clears it
        time.sleep(1.5)
        last = sub.payloads("stats")[-1]
        assert last["cameras"]["cam1"]["adaptation"] == "on"
        assert last["mqtt"]["commands_rejected"] == 0 and last["mqtt"]["commands_ignored"] == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
        sub.stop()
        pub.loop_stop()


# -- devices and files -----------------------------------------------------------------------

def test_dev_video_paths_are_cameras_and_other_device_files_are_refused(tmp_path):
    assert source_kind("/dev/video7") == "device" and source_kind("7") == "index"
    assert source_kind("/dev/null") == "file" and source_kind("rtsp://x/y") == "stream"
    config = load_config(edit(agent_config(tmp_path, tmp_path / "m.onnx", tmp_path / "v.avi", 1),
                              cameras=[{"name": "usb", "source": "/dev/video97"}],
                              advanced__sources__reconnect_max_s=1))
    source = open_source(config.cameras[0], config.advanced.sources)
    try:
        assert isinstance(source, LiveSource)  # was: "video file /dev/video97 does not exist"
        assert wait_for(lambda: source.last_error == "cannot open /dev/video97", 10)
    finally:
        source.stop()


def test_models_are_written_readable_and_state_under_the_umask(tmp_path, fmnist, broker, video):
    assert stat.S_IMODE(fmnist["int8"].stat().st_mode) == 0o666 & ~umask()  # 0644 under the usual 022
    previous = os.umask(0o077)
    try:
        private = write_atomic(tmp_path / "private.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    config = agent_config(tmp_path, fmnist["int8"], video, broker.port,
                          cameras=[{"name": "cam1", "source": str(video), "replay": {"paced": False}}])
    daemon = subprocess.Popen(["sh", "-c", f"umask 077 && exec {sys.executable} -m agent.cli run --config {config}"],
                              cwd=ROOT)
    assert daemon.wait(120) == 0
    assert stat.S_IMODE((tmp_path / "state" / "cam1.state.npz").stat().st_mode) == 0o600


# -- noise -------------------------------------------------------------------------------------

def test_no_onnxruntime_telemetry_warning_where_the_cache_is_not_writable(tmp_path, fmnist, video):
    config = agent_config(tmp_path, fmnist["int8"], video, closed_port())
    result = cli("validate-config", str(config), env={"HOME": "/proc", "XDG_CACHE_HOME": "/proc/none"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_export_prints_our_lines_only_and_makes_its_output_folder(tmp_path):
    out = tmp_path / "models" / "m.onnx"  # the README's command on a fresh clone: models/ is not there yet
    result = subprocess.run([sys.executable, "-m", "exporters.cli", "fashion-mnist", "--out", str(out),
                             "--calib-frames", "64", "--holdout-frames", "64"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and "calibrating" not in line]
    assert lines == ["tta-export: exporting 9 adapted layers, folded layout, mode robust, K=16"], lines
    assert json.loads(result.stdout)["int8"] == str(out) and out.is_file()


def test_debug_log_level_says_what_each_frame_did(tmp_path, broker, fmnist, video):
    config = agent_config(tmp_path, fmnist["int8"], video, broker.port, log_level="debug",
                          cameras=[{"name": "cam1", "source": str(video), "replay": {"paced": False}}])
    log = tmp_path / "agent.log"
    assert start_daemon(config, log=log).wait(120) == 0
    frames = [line for line in log.read_text().splitlines() if "DEBUG agent.daemon: camera cam1 frame" in line]
    assert len(frames) == 200 and "strength" in frames[0] and "ms" in frames[0]
    info = tmp_path / "info"
    info.mkdir()
    config = agent_config(info, fmnist["int8"], video, broker.port,
                          cameras=[{"name": "cam1", "source": str(video), "replay": {"paced": False}}])
    assert start_daemon(config, log=info / "agent.log").wait(120) == 0
    assert "DEBUG" not in (info / "agent.log").read_text()


# -- truncated files ---------------------------------------------------------------------------

def test_truncated_recordings_are_explained(tmp_path, fmnist, video):
    mp4 = tmp_path / "cut.mp4"
    writer = cv2.VideoWriter(str(tmp_path / "full.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (112, 112))
    for i in range(100):
        writer.write(np.full((112, 112, 3), i, np.uint8))
    writer.release()
    data = (tmp_path / "full.mp4").read_bytes()
    mp4.write_bytes(data[: len(data) // 2])
    cut = cli("replay", str(mp4), "--model", str(fmnist["int8"]), "--quiet")
    assert cut.returncode == 2 and "Traceback" not in cut.stderr
    assert "MP4/MOV without its index ('moov' box)" in cut.stderr.strip().splitlines()[-1]

    avi = tmp_path / "cut.avi"
    data = video.read_bytes()
    avi.write_bytes(data[: len(data) // 2])
    replayed = cli("replay", str(avi), "--model", str(fmnist["int8"]), "--quiet")
    assert replayed.returncode == 3, replayed.stderr[-2000:]
    assert "input damaged" in replayed.stdout and "truncated or corrupt file" in replayed.stdout


# -- Home Assistant -----------------------------------------------------------------------------

def test_home_assistant_sensors_have_state_topics_that_are_retained_and_quiet(tmp_path, broker, fmnist, video):
    config = agent_config(tmp_path, fmnist["int8"], video, broker.port, mqtt__homeassistant={"enabled": True},
                          cameras=[{"name": "cam1", "source": str(video), "replay": {"paced": True}}])
    assert start_daemon(config, log=tmp_path / "agent.log").wait(120) == 0
    late = Subscriber(broker.port, "#")  # subscribes after the run: only retained messages arrive
    assert wait_for(lambda: late.payloads("cam1/class") and late.payloads("cam1_drift/config"), 10)
    late.stop()
    discovery = {t: json.loads(p) for t, p, _ in late.messages if t.endswith("/config")}
    class_sensor = next(d for t, d in discovery.items() if t.endswith("_class/config"))
    drift_sensor = next(d for t, d in discovery.items() if t.endswith("_drift/config"))
    source_sensor = next(d for t, d in discovery.items() if t.endswith("_source/config"))
    assert class_sensor["state_topic"] == "tta/test-box/cam1/class"
    assert drift_sensor["state_topic"] == "tta/test-box/cam1/drift/state"
    assert source_sensor["device_class"] == "connectivity" and source_sensor["state_topic"] == "tta/test-box/stats"
    assert "value_json.cameras['cam1'].connected" in source_sensor["value_template"]
    assert "connected" in late.payloads("tta/test-box/stats")[-1]["cameras"]["cam1"]
    assert late.payloads("cam1/class")[-1]["label"]
    assert late.payloads("cam1/drift/state")[-1]["active"] is False


def test_class_topic_changes_at_most_once_a_second(tmp_path, broker, fmnist, video):
    config = agent_config(tmp_path, fmnist["int8"], video, broker.port,
                          cameras=[{"name": "cam1", "source": str(video), "replay": {"paced": True}}])
    sub = Subscriber(broker.port, "tta/test-box/cam1/#")
    assert start_daemon(config, log=tmp_path / "agent.log").wait(120) == 0
    time.sleep(0.5)
    sub.stop()
    predictions, classes = sub.payloads("cam1/prediction"), sub.payloads("cam1/class")
    assert len(predictions) == 200 and 1 <= len(classes) <= 200 / 50 + 1  # 4 s of video at 50 frames/s
    labels = [c["label"] for c in classes]
    assert all(a != b for a, b in zip(labels, labels[1:]))  # sent on a change only


# -- HTTP /healthz and /metrics -----------------------------------------------------------------

def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_parse_and_healthz_fails_while_the_main_loop_stalls(tmp_path, broker, fmnist, video):
    """The agent in this process (a sink that blocks stalls its loop on purpose); the HTTP, the broker, the
    model and the video are real."""
    from prometheus_client.parser import text_string_to_metric_families

    from agent.daemon import Agent

    port = free_port()
    config = load_config(agent_config(tmp_path, fmnist["int8"], video, broker.port, exit_when_done=False,
                                      http={"enabled": True, "port": port}, advanced__http__stall_s=1.0,
                                      cameras=[{"name": "cam1", "source": str(video), "replay": {"loop": True}}]))
    stall = threading.Event()
    agent = Agent(config, sinks=[lambda camera, result: stall.is_set() and time.sleep(4)])
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: get(f"{base}/healthz")[0] == 200, 30)
        assert wait_for(lambda: agent.cameras[0].pipeline.counters.processed > 20, 30)
        code, body = get(f"{base}/metrics")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        for name in ("tta_frames_processed", "tta_fps", "tta_frame_latency_seconds", "tta_adaptation_strength",
                     "tta_drift_active", "tta_alerts_spooled", "tta_alerts_acked", "tta_alerts_dropped",
                     "tta_mqtt_reconnects", "tta_provider_info", "tta_camera_connected"):
            assert name in families, (name, sorted(families))
        processed = next(s for s in families["tta_frames_processed"].samples if s.name.endswith("_total"))
        assert processed.labels == {"camera": "cam1"} and processed.value > 20
        count = next(s for s in families["tta_frame_latency_seconds"].samples if s.name.endswith("_count"))
        assert count.value > 20
        provider = families["tta_provider_info"].samples[0]
        assert provider.labels["provider"] == "CPUExecutionProvider"
        stall.set()
        assert wait_for(lambda: get(f"{base}/healthz")[0] == 503, 10)
        doc = json.loads(get(f"{base}/healthz")[1])
        assert doc["live"] is False and doc["reason"].startswith("main loop stalled")
        stall.clear()
        assert wait_for(lambda: get(f"{base}/healthz")[0] == 200, 15)
        assert get(f"{base}/nothing")[0] == 404
    finally:
        agent.request_stop()
        runner.join(30)
    with pytest.raises(OSError):  # the endpoint is closed with the agent
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
