"""The daemon as a subprocess against a mosquitto process each test starts: topics, schemas, will,
the alert spool across a broker outage, TLS with a password, commands, sd_notify."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import (
    FailingGpuSession,
    Mosquitto,
    Subscriber,
    agent_config,
    fmnist_video,
    start_daemon,
    stopped,
    wait_for,
)

SCHEMAS = Path(__file__).resolve().parents[1] / "agent" / "schemas"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def drift_video(tmp_path_factory):
    """Clean, then the light fails (dark, low contrast), then clean again, twice: two drift episodes."""
    path = tmp_path_factory.mktemp("fm") / "fm.avi"
    fmnist_video(path, [("clean", 120), ("dark", 100), ("clean", 100), ("dark", 100), ("clean", 100)])
    return path


def test_subscriber_receives_every_topic_with_valid_schemas(tmp_path, broker, fmnist, drift_video):
    sub = Subscriber(broker.port, "tta/#")
    config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port, advanced__adaptation__raw_every=5,
                          cameras=[{"name": "cam1", "source": str(drift_video), "replay": {"paced": False}}])
    daemon = start_daemon(config, log=tmp_path / "agent.log")
    assert daemon.wait(120) == 0, (tmp_path / "agent.log").read_text()[-3000:]
    assert wait_for(lambda: "offline" in sub.payloads("availability"), 5)
    sub.stop()
    assert sub.payloads("availability")[:1] == ["online"]
    predictions = sub.payloads("cam1/prediction")
    assert len(predictions) == 520
    assert [p["frame"] for p in predictions] == list(range(520))
    for p in predictions:
        jsonschema.validate(p, schema("prediction"))
    # the unadapted model: every 5th frame, and every frame the gate keeps adaptation at 0
    assert all(p["raw"] is not None for p in predictions if p["frame"] % 5 == 0 or p["adaptation_strength"] == 0)
    events = sub.payloads("cam1/drift")
    for e in events:
        jsonschema.validate(e, schema("drift"))
    edges = [e for e in events if e["type"] != "update"]
    assert [e["type"] for e in edges] == ["start", "end", "start", "end"]
    assert edges[0]["episode"] == edges[1]["episode"] != edges[2]["episode"]
    assert "lower contrast" in edges[0]["condition"] and edges[0]["score"] > edges[0]["threshold"]
    states = sub.payloads("cam1/drift/state")
    for s in states:
        jsonschema.validate(s, schema("drift_state"))
    changes = [a for i, a in enumerate(s["active"] for s in states) if i == 0 or a != states[i - 1]["active"]]
    assert changes == [False, True, False, True, False]  # the first: at start; updates repeat True
    stats = sub.payloads("tta/test-box/stats")
    assert stats
    for s in stats:
        jsonschema.validate(s, schema("stats"))
    assert stats[-1]["cameras"]["cam1"]["frames_processed"] == 520
    assert (tmp_path / "state" / "cam1.state.npz").exists()


def test_killed_agent_goes_offline_through_the_will(tmp_path, broker, fmnist, drift_video):
    sub = Subscriber(broker.port, "tta/test-box/availability")
    daemon = start_daemon(agent_config(tmp_path, fmnist["int8"], drift_video, broker.port))
    assert wait_for(lambda: "online" in sub.payloads("availability"), 30)
    daemon.kill()
    daemon.wait(10)
    assert wait_for(lambda: sub.payloads("availability")[-1:] == ["offline"], 15)
    sub.stop()


def test_every_alert_arrives_in_order_across_a_broker_outage(tmp_path, broker, fmnist, drift_video):
    """Broker stopped while drift events are raised, then restarted: at-least-once, in order."""
    sub = Subscriber(broker.port, "tta/test-box/cam1/drift", client_id="alert-consumer")
    log = tmp_path / "agent.log"
    daemon = start_daemon(agent_config(tmp_path, fmnist["int8"], drift_video, broker.port), log=log)
    assert wait_for(lambda: "drift start" in log.read_text(), 60), log.read_text()[-2000:]
    broker.stop()  # the outage spans the first episode's end and the second's start
    time.sleep(6)
    broker.start()
    assert daemon.wait(120) == 0
    raised = [(m[0], m[1], int(m[2])) for m in re.findall(r"drift (\w+) camera=cam1 episode=(\w+) frame=(\d+)",
                                                           log.read_text())]
    assert len(raised) >= 4
    assert wait_for(lambda: len({(e["type"], e["episode"], e["frame"]) for e in sub.payloads("drift")})
                    >= len(raised), 20)
    sub.stop()
    received = [(e["type"], e["episode"], e["frame"]) for e in sub.payloads("drift")]
    unique = list(dict.fromkeys(received))  # at-least-once: duplicates allowed, order and completeness not
    assert unique == raised
    assert "disconnected" in log.read_text()


def test_sigterm_publishes_offline_saves_state_and_exits_quickly(tmp_path, broker, fmnist, drift_video, figures):
    sub = Subscriber(broker.port, "tta/#")
    config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port, advanced__state__checkpoint_every_s=3600)
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    assert wait_for(lambda: len(sub.payloads("prediction")) > 20, 60)
    daemon.send_signal(signal.SIGUSR1)  # every thread's stack to the log, and the daemon goes on
    assert wait_for(lambda: "most recent call first" in log.read_text(), 10), log.read_text()[-2000:]
    assert daemon.poll() is None
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    took = time.monotonic() - started
    assert took < 5
    assert wait_for(lambda: sub.payloads("availability")[-1:] == ["offline"], 5)
    assert (tmp_path / "state" / "cam1.state.npz").exists()
    assert not list((tmp_path / "state" / "spool").iterdir())  # every alert handed over before exit
    sub.stop()
    figures["sigterm"] = {"exit_s": round(took, 2)}


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it."""
    paths = {name: folder / f"{name}" for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")}

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tta-test-ca",
            "-keyout", paths["ca.key"], "-out", paths["ca.crt"])
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", paths["server.key"],
            "-out", paths["server.csr"])
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", paths["server.csr"], "-CA", paths["ca.crt"], "-CAkey", paths["ca.key"],
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", paths["server.crt"])
    for p in paths.values():
        p.chmod(0o644)
    return paths


def test_tls_with_password_connects_and_a_wrong_password_does_not(tmp_path, fmnist, drift_video):
    certs = _certificates(tmp_path)
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "agent", "s3cret-pass"], check=True)
    passwords.chmod(0o644)
    broker = Mosquitto(tmp_path, extra=f"allow_anonymous false\npassword_file {passwords}\n"
                                       f"cafile {certs['ca.crt']}\ncertfile {certs['server.crt']}\n"
                                       f"keyfile {certs['server.key']}\n").start()
    try:
        sub = Subscriber(broker.port, "tta/#", tls={"ca_certs": str(certs["ca.crt"])},
                         auth=("agent", "s3cret-pass"))
        secret = tmp_path / "mqtt-password"
        secret.write_text("s3cret-pass\n")
        tls = {"ca": str(certs["ca.crt"])}
        log = tmp_path / "agent.log"
        config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port, mqtt__tls=tls,
                              mqtt__username="agent", mqtt__password_file=str(secret))
        daemon = start_daemon(config, log=log)
        assert wait_for(lambda: len(sub.payloads("prediction")) > 10, 60), log.read_text()[-2000:]
        daemon.terminate()
        assert stopped(daemon, 15) == 0, log.read_text()[-6000:]  # a stuck stop dumps its stacks at 8 s
        assert "s3cret-pass" not in log.read_text()
        assert not any(b"s3cret-pass" in m[1] for m in sub.messages)
        sub.stop()

        secret.write_text("wrong\n")
        log.unlink()
        daemon = start_daemon(config, log=log)
        assert wait_for(lambda: "refused the connection" in log.read_text(), 30), log.read_text()[-2000:]
        time.sleep(4)  # paho retries every second or two; the same reason is said once a minute
        assert log.read_text().count("refused the connection") == 1, log.read_text()[-2000:]
        assert daemon.poll() is None  # keeps processing frames, and keeps trying
        daemon.terminate()
        assert stopped(daemon, 15) == 0, log.read_text()[-6000:]
    finally:
        broker.stop()


def test_commands_switch_adaptation_and_malformed_ones_are_counted(tmp_path, broker, fmnist, drift_video):
    sub = Subscriber(broker.port, "tta/#")
    config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port)
    daemon = start_daemon(config)
    assert wait_for(lambda: len(sub.payloads("prediction")) > 5, 60)
    publish = sub.client.publish
    publish("tta/test-box/cam1/adaptation/set", "off", qos=1)
    for topic, payload in [("tta/test-box/cam1/adaptation/set", "explode"),
                           ("tta/test-box/cam1/adaptation/set", b"\xff\xfe"),
                           ("tta/test-box/cam1/adaptation/set", "x" * 10_000),
                           ("tta/test-box/cam1/lame/set", '{"mode": "on"}')]:
        publish(topic, payload, qos=1)
    assert wait_for(lambda: any(p["adaptation"] == "off" for p in sub.payloads("prediction")), 10)
    assert wait_for(lambda: any(s["mqtt"]["commands_rejected"] == 4 for s in sub.payloads("stats")), 10), \
        [s["mqtt"]["commands_rejected"] for s in sub.payloads("stats")]
    assert daemon.poll() is None
    daemon.terminate()
    assert daemon.wait(10) == 0
    sub.stop()


def test_systemd_notify_ready_watchdog_status_and_stopping(tmp_path, broker, fmnist, drift_video):
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.5)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
    daemon = start_daemon(agent_config(tmp_path, fmnist["int8"], drift_video, broker.port), env=env)
    seen: list[str] = []

    def receive_until(predicate, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            try:
                seen.extend(sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass
        return predicate()

    assert receive_until(lambda: "READY=1" in seen and seen.count("WATCHDOG=1") >= 2, 60), seen
    assert any(s.startswith("STATUS=") and "fps" in s for s in seen)
    daemon.send_signal(signal.SIGTERM)
    assert receive_until(lambda: "STOPPING=1" in seen, 10), seen
    assert daemon.wait(10) == 0
    sock.close()


def test_home_assistant_discovery_is_announced_and_announced_again(tmp_path, broker, fmnist, drift_video):
    sub = Subscriber(broker.port, "homeassistant/#")
    config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port,
                          mqtt__homeassistant={"enabled": True})
    daemon = start_daemon(config)
    try:
        assert wait_for(lambda: len(sub.payloads("/config")) >= 3, 60)
        docs = {t: json.loads(p) for t, p, _ in sub.messages if t.endswith("/config")}
        sensor = docs["homeassistant/sensor/test-box/cam1_class/config"]
        assert sensor["state_topic"] == "tta/test-box/cam1/class"
        assert sensor["availability_topic"] == "tta/test-box/availability"
        drift = docs["homeassistant/binary_sensor/test-box/cam1_drift/config"]
        assert drift["state_topic"] == "tta/test-box/cam1/drift/state" and drift["device_class"] == "problem"
        before = len(sub.payloads("/config"))
        sub.client.publish("homeassistant/status", "online", qos=1)  # Home Assistant restarted
        assert wait_for(lambda: len(sub.payloads("/config")) >= before + 3, 10)
    finally:
        daemon.terminate()
        daemon.wait(10)
        sub.stop()


def test_sighup_reloads_what_it_can_and_keeps_running(tmp_path, broker, fmnist, drift_video):
    log = tmp_path / "agent.log"
    config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port)
    daemon = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: "running 1 camera" in log.read_text(), 60)
        doc = yaml.safe_load(config.read_text())
        doc["lame"] = {"mode": "off"}
        doc["mqtt"]["port"] = broker.port + 1
        config.write_text(yaml.safe_dump(doc))
        daemon.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in log.read_text(), 10), log.read_text()[-2000:]
        assert "mqtt.port changed; those take effect after a restart" in log.read_text()
        config.write_text("model: [unclosed")
        daemon.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in log.read_text(), 10)
        assert daemon.poll() is None
    finally:
        daemon.terminate()
        assert daemon.wait(10) == 0


def test_gpu_failure_in_the_daemon_publishes_degraded_and_loses_no_frame(tmp_path, broker, fmnist, drift_video):
    from agent.config import load_config
    from agent.daemon import Agent

    sub = Subscriber(broker.port, "tta/#")
    config = load_config(agent_config(tmp_path, fmnist["int8"], drift_video, broker.port,
                                      cameras=[{"name": "cam1", "source": str(drift_video),
                                                "replay": {"paced": False}}]))
    agent = Agent(config)
    session = agent.cameras[0].pipeline.session
    session.session = FailingGpuSession(session.session, "CUDA failure 999: unknown error (device lost)")
    assert agent.run() == 0
    assert wait_for(lambda: any(s["status"] == "degraded" for s in sub.payloads("stats")), 10)
    # the final stats (published on the way out) may still be on their way: wait for the last frame's
    assert wait_for(lambda: sub.payloads("stats")[-1]["cameras"]["cam1"]["frames_processed"] == 520, 10)
    sub.stop()
    degraded = next(s for s in sub.payloads("stats") if s["status"] == "degraded")
    jsonschema.validate(degraded, schema("stats"))
    assert "CUDAExecutionProvider failed" in degraded["degraded_reason"]
    assert degraded["provider"] == "CPUExecutionProvider"
    last = sub.payloads("stats")[-1]
    assert last["cameras"]["cam1"]["frames_processed"] == 520  # the failed frame was rerun on the CPU
    # predictions made before the first connect are dropped and counted, never silently lost
    assert last["mqtt"]["predictions_sent"] + last["mqtt"]["predictions_dropped"] == 520


def _episodes(sub: Subscriber) -> list[tuple[str, str]]:
    return list(dict.fromkeys((e["type"], e["episode"]) for e in sub.payloads("cam1/drift") if e["type"] != "update"))


def test_a_drift_episode_goes_on_across_sighup_and_ends_once(tmp_path, broker, fmnist):
    video = tmp_path / "dark.avi"
    fmnist_video(video, [("clean", 120), ("dark", 250), ("clean", 150)])
    sub = Subscriber(broker.port, "tta/test-box/cam1/drift/#")
    log = tmp_path / "agent.log"
    config = agent_config(tmp_path, fmnist["int8"], video, broker.port)
    daemon = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: "drift start" in log.read_text(), 60), log.read_text()[-2000:]
        daemon.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in log.read_text(), 10)
        assert daemon.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert wait_for(lambda: len(_episodes(sub)) >= 2, 5)
    sub.stop()
    (start, episode), (end, same) = _episodes(sub)
    assert (start, end) == ("start", "end") and episode == same
    assert sub.payloads("cam1/drift/state")[-1]["active"] is False


def test_a_restart_mid_episode_carries_it_over_and_its_end_comes(tmp_path, broker, fmnist):
    """The first run ends inside a dark episode; the second sees the light come back."""
    dark, back = tmp_path / "dark.avi", tmp_path / "back.avi"
    fmnist_video(dark, [("clean", 120), ("dark", 150)])
    fmnist_video(back, [("dark", 20), ("clean", 150)])
    sub = Subscriber(broker.port, "tta/test-box/cam1/drift/#")
    for video in (dark, back):
        config = agent_config(tmp_path, fmnist["int8"], video, broker.port,
                              cameras=[{"name": "cam1", "source": str(video), "replay": {"paced": False}}])
        assert start_daemon(config, log=tmp_path / "agent.log").wait(60) == 0, (tmp_path / "agent.log").read_text()
        if video == dark:
            assert wait_for(lambda: sub.payloads("cam1/drift/state")[-1:] and
                            sub.payloads("cam1/drift/state")[-1]["active"], 5)
    assert wait_for(lambda: len(_episodes(sub)) >= 2, 5)
    sub.stop()
    assert "carried over" in (tmp_path / "agent.log").read_text()
    (start, episode), (end, same) = _episodes(sub)
    assert (start, end) == ("start", "end") and episode == same
    states = sub.payloads("cam1/drift/state")
    assert states[-1]["active"] is False and states[-1]["episode"] is None
    assert any(s["active"] and s["frame"] is None and s["episode"] == episode for s in states)  # at the restart
