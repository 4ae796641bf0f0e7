"""What an unattended box meets, run as an operator would: the shipped CLI as a subprocess, real mosquitto
processes, files on disk, a filesystem that fills up. Each failure must leave nothing lost, a line that says
what to do, the right exit code and no crash loop (docs/operations.md)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, Mosquitto, Subscriber, agent_config, fmnist_video, free_port, start_daemon, wait_for

ACL = ROOT / "configs" / "mosquitto-acl.conf"


@pytest.fixture(scope="module")
def drift_video(tmp_path_factory) -> Path:
    """Clean, then the light fails (dark, low contrast), then clean again: one drift episode."""
    path = tmp_path_factory.mktemp("unattended") / "fm.avi"
    fmnist_video(path, [("clean", 120), ("dark", 100), ("clean", 100)])
    return path


def looping(tmp_path: Path, model: Path, video: Path, port: int, **overrides) -> Path:
    return agent_config(tmp_path, model, video, port, exit_when_done=False,
                        cameras=[{"name": "cam1", "source": str(video), "replay": {"loop": True}}], **overrides)


def stop(daemon: subprocess.Popen) -> int:
    daemon.send_signal(signal.SIGTERM)
    return daemon.wait(30)


def http_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


# -- a full disk ----------------------------------------------------------------------------------

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a user namespace to mount a small tmpfs")
def test_a_full_disk_loses_no_alert_and_stops_nothing(tmp_path, broker, fmnist, drift_video):
    """state.dir is a 1 MiB tmpfs, full from the start (the daemon runs in a mount namespace of its own, made by
    `unshare`; the test reaches its files through /proc/<pid>/root)."""
    state, http = tmp_path / "state", free_port()
    state.mkdir()
    config = looping(tmp_path, fmnist["int8"], drift_video, broker.port, http={"enabled": True, "port": http})
    sub = Subscriber(broker.port, "tta/test-box/#")
    log = tmp_path / "agent.log"
    shell = (f"mount -t tmpfs -o size=1m tmpfs {state} && head -c 2M /dev/zero > {state}/filler 2>/dev/null; "
             f"exec {sys.executable} -m agent.cli run --config {config}")
    daemon = subprocess.Popen(["unshare", "-rm", "sh", "-c", shell], cwd=ROOT, stdout=open(log, "ab"),
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    inside = Path(f"/proc/{daemon.pid}/root") / str(state).lstrip("/")
    try:
        assert wait_for(lambda: sub.payloads("cam1/drift"), 90), log.read_text()[-3000:]
        starts = [e for e in sub.payloads("cam1/drift") if e["type"] == "start"]
        assert starts, "the alert reaches the connected broker although the disk cannot take it"
        assert wait_for(lambda: any(s["status"] == "degraded" for s in sub.payloads("stats")), 30)
        degraded = next(s for s in sub.payloads("stats") if s["status"] == "degraded")
        assert "No space left on device" in degraded["degraded_reason"], degraded
        assert degraded["storage"]["write_failures"] > 0
        assert metric(http, "tta_write_failures_total") > 0
        assert http_json(f"http://127.0.0.1:{http}/healthz")["status"] == "degraded"
        time.sleep(2.5)  # a checkpoint a second (agent_config): each failure counted, said once
        text = log.read_text()
        said = f"checkpoint of camera cam1: cannot write {state}/cam1.state.npz: No space left on device; free space"
        assert text.count(said) == 1, text[-3000:]
        assert "Traceback" not in text and daemon.poll() is None
        (inside / "filler").unlink()  # the operator frees space: the writes go through again
        assert wait_for(lambda: "checkpoint of camera cam1: written again" in log.read_text(), 30)
        # the log says so after the checkpoint, and the drift state is written just after it
        assert wait_for(lambda: (inside / "cam1.state.npz").exists() and (inside / "cam1.drift.json").exists(), 10)
        assert wait_for(lambda: sub.payloads("stats")[-1]["status"] == "ok", 30), sub.payloads("stats")[-1]
    finally:
        rc = stop(daemon)
        sub.stop()
    assert rc == 0, log.read_text()[-3000:]


# -- state files that do not fit ------------------------------------------------------------------

def test_state_files_of_another_version_are_moved_aside_and_the_camera_starts_fresh(tmp_path, broker, fmnist,
                                                                                     drift_video):
    state = tmp_path / "state"
    (state / "spool").mkdir(parents=True)
    # valid JSON from a version with three imaging statistics (today: four)
    (state / "cam1.drift.json").write_text(json.dumps({"detector": {
        "views": [[[0.0] * 432] * 2], "references": [[1.0, 1.0, 1.0]], "spread": [0.1] * 3, "level": [0.0] * 3,
        "episode": None, "condition": []}, "since": None}))
    # a checkpoint of a model with 8 components (today's has 16)
    np.savez(state / "cam1.state.npz", __meta__=np.array(json.dumps(
        {"format": 1, "mode": "robust", "components": 8, "frames": 10})))
    # a spooled alert of a newer payload schema, then one of this version's, which must still go out
    alert = {"topic": "tta/test-box/cam1/drift", "payload": {"schema": 1, "type": "end", "episode": "earlier"}}
    (state / "spool" / "0000000000000007.json").write_text(json.dumps({**alert, "payload": {"schema": 9}}))
    (state / "spool" / "0000000000000008.json").write_text(json.dumps(alert))
    config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port,
                          cameras=[{"name": "cam1", "source": str(drift_video), "replay": {"paced": False}}])
    sub = Subscriber(broker.port, "tta/test-box/cam1/drift")
    log = tmp_path / "agent.log"
    assert start_daemon(config, log=log).wait(120) == 0, log.read_text()[-3000:]
    assert wait_for(lambda: any(e.get("episode") == "earlier" for e in sub.payloads("cam1/drift")), 10)
    sub.stop()
    text = log.read_text()
    assert text.count("does not fit this version and model") == 2, text[-3000:]
    assert "references has shape (1, 3), this version expects (1, 4) of finite numbers" in text
    assert "is for mode=robust K=8, the model uses mode=robust K=16" in text
    assert len(list(state.glob("cam1.drift.json.*.rejected"))) == 1
    assert len(list(state.glob("cam1.state.npz.*.rejected"))) == 1
    assert [p.name.split(".")[0] for p in (state / "spool" / "rejected").iterdir()] == ["0000000000000007"]
    assert "payload schema 9, this agent writes schema 1; moved aside" in text
    assert [e["type"] for e in sub.payloads("cam1/drift") if e.get("episode") != "earlier" and e["type"] != "update"] \
        == ["start", "end"]
    # what this run wrote fits: a second start reads it without a word
    again = tmp_path / "again.log"
    assert start_daemon(config, log=again).wait(120) == 0
    assert "does not fit" not in again.read_text() and "resumes adaptation" in again.read_text()


# -- exit codes -------------------------------------------------------------------------------------

def test_a_failure_while_running_exits_70_with_its_traceback_and_goes_offline(tmp_path, broker, fmnist,
                                                                               drift_video):
    """A bug cannot be made on purpose: the pipeline's per-frame step is replaced by one that raises (the only
    stand-in here; the CLI, the daemon, the broker and the files are real)."""
    config = looping(tmp_path, fmnist["int8"], drift_video, broker.port)
    sub = Subscriber(broker.port, "tta/test-box/availability")
    script = ("import sys\n"
              "from agent.pipeline import CameraPipeline\n"
              "def process(self, frame):\n"
              "    raise RuntimeError('a bug in the per-frame step')\n"
              "CameraPipeline.process = process\n"
              "from agent.cli import main\n"
              f"sys.exit(main(['run', '--config', {str(config)!r}]))\n")
    ran = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 70, ran.stderr[-3000:]
    assert "the main loop failed (exit 70" in ran.stderr and "Traceback" in ran.stderr
    assert "RuntimeError: a bug in the per-frame step" in ran.stderr
    assert wait_for(lambda: sub.payloads("availability")[-1:] == ["offline"], 10)
    sub.stop()
    # an operator error stays exit 2, one line, no traceback
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text() + "model: {path: /nowhere.onnx}\n")
    refused = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(bad)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tta-agent: error: {bad}: model: written twice (lines "), lines


# -- a second instance -----------------------------------------------------------------------------

def test_a_second_agent_on_the_same_state_folder_is_refused_naming_the_first(tmp_path, broker, fmnist,
                                                                              drift_video):
    config = looping(tmp_path, fmnist["int8"], drift_video, broker.port)
    log = tmp_path / "first.log"
    first = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: "running 1 camera" in log.read_text(), 60), log.read_text()[-2000:]
        second = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1:] == [
            f"tta-agent: error: {config}: state.dir: {tmp_path / 'state'} is in use by another tta-agent (PID "
            f"{first.pid}); stop that one first (systemctl stop tta-agent, or kill {first.pid}), or give this one "
            "a state.dir of its own"]
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)  # however the first ends, the kernel releases its lock
        first.wait(10)
    after = tmp_path / "after.log"
    third = start_daemon(config, log=after)
    try:
        assert wait_for(lambda: "running 1 camera" in after.read_text(), 60), after.read_text()[-2000:]
    finally:
        assert stop(third) == 0


# -- an ACL that drops what the agent publishes ----------------------------------------------------

def _acl_broker(tmp_path: Path) -> Mosquitto:
    """mosquitto with passwords and the shipped ACL, as configs/mosquitto-acl.conf says to run it."""
    acl, passwords = tmp_path / "acl.conf", tmp_path / "passwd"
    acl.write_text(ACL.read_text())
    for i, user in enumerate(("test-box", "edge-01", "dashboard", "operator")):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwords), user, f"{user}-pw"],
                       check=True)
    for path in (acl, passwords):
        path.chmod(0o644)
    return Mosquitto(tmp_path, extra=f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n").start()


def test_an_acl_that_drops_the_agents_messages_is_said_and_alerts_wait_in_the_spool(tmp_path, fmnist,
                                                                                     drift_video):
    broker = _acl_broker(tmp_path)
    secret, http = tmp_path / "password", free_port()
    secret.write_text("edge-01-pw\n")
    # the mistake: this box logs in as another box's user, so the ACL denies every topic of test-box
    config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port, mqtt__username="edge-01",
                          mqtt__password_file=str(secret), exit_when_done=False, http={"enabled": True, "port": http})
    dashboard = Subscriber(broker.port, "tta/#", auth=("dashboard", "dashboard-pw"))
    log = tmp_path / "denied.log"
    daemon = start_daemon(config, log=log)
    try:
        said = "acknowledges what this agent publishes but does not deliver it"
        assert wait_for(lambda: said in log.read_text(), 60), log.read_text()[-3000:]
        assert "user 'edge-01' must be allowed to write and read tta/test-box/#" in log.read_text()
        assert wait_for(lambda: "drift end" in log.read_text(), 60)
        health = http_json(f"http://127.0.0.1:{http}/healthz")
        assert health["status"] == "degraded" and "does not deliver" in health["reason"], health
        assert metric(http, "tta_mqtt_delivery_failing") == 1.0
        assert metric(http, "tta_alerts_spooled") >= 2  # start and end: kept, not cleared on a PUBACK
        assert dashboard.payloads("test-box/cam1/drift") == [] and dashboard.payloads("prediction") == []
    finally:
        assert stop(daemon) == 0
    spooled = sorted((tmp_path / "state" / "spool").glob("*.json"))
    assert len(spooled) >= 2
    # the operator fixes the user name: what waited in the spool arrives, in order
    fixed = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port, mqtt__username="test-box",
                         mqtt__password_file=str(secret), advanced__drift__warmup=1000,
                         cameras=[{"name": "cam1", "source": str(drift_video), "replay": {"paced": False}}])
    secret.write_text("test-box-pw\n")
    second = tmp_path / "fixed.log"
    try:
        assert start_daemon(fixed, log=second).wait(120) == 0, second.read_text()[-3000:]
        assert wait_for(lambda: len(dashboard.payloads("cam1/drift")) >= len(spooled), 20)
    finally:
        dashboard.stop()
        broker.stop()
    assert [e["type"] for e in dashboard.payloads("cam1/drift") if e["type"] != "update"][:2] == ["start", "end"]
    assert not list((tmp_path / "state" / "spool").glob("*.json"))
    assert "does not deliver" not in second.read_text()


def test_the_shipped_acl_lets_operators_command_and_stops_dashboards_for_any_device_id(tmp_path, fmnist,
                                                                                       drift_video):
    broker = _acl_broker(tmp_path)
    secret = tmp_path / "password"
    secret.write_text("test-box-pw\n")
    config = looping(tmp_path, fmnist["int8"], drift_video, broker.port, mqtt__username="test-box",
                     mqtt__password_file=str(secret), mqtt__homeassistant={"enabled": True})
    dashboard = Subscriber(broker.port, "#", auth=("dashboard", "dashboard-pw"))
    operator = Subscriber(broker.port, "tta/#", auth=("operator", "operator-pw"))
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: len(dashboard.payloads("prediction")) > 10, 60), log.read_text()[-2000:]
        assert wait_for(lambda: any('"delivery": "ok"' in json.dumps(s) for s in dashboard.payloads("stats")), 30)
        dashboard.client.publish("tta/test-box/cam1/adaptation/set", "off", qos=1)
        time.sleep(1.5)
        assert all(p["adaptation"] == "on" for p in dashboard.payloads("prediction"))  # denied by the ACL
        operator.client.publish("tta/test-box/cam1/adaptation/set", "off", qos=1)
        assert wait_for(lambda: any(p["adaptation"] == "off" for p in dashboard.payloads("prediction")), 10)
        assert "does not deliver" not in log.read_text()
    finally:
        assert stop(daemon) == 0
        dashboard.stop()
        operator.stop()
        broker.stop()


# -- the model file replaced on disk ---------------------------------------------------------------

def test_a_model_replaced_on_disk_is_checked_at_sighup(tmp_path, broker, fmnist, fmnist_folded, drift_video):
    model = tmp_path / "model.onnx"
    shutil.copyfile(fmnist["int8"], model)
    config = looping(tmp_path, model, drift_video, broker.port)
    sub = Subscriber(broker.port, "tta/test-box/cam1/prediction")
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    try:
        assert wait_for(lambda: len(sub.payloads("prediction")) > 10, 60), log.read_text()[-2000:]
        data = fmnist["int8"].read_bytes()
        (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
        (tmp_path / "half.onnx").replace(model)  # a copy cut short
        daemon.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "changed on disk and cannot be run" in log.read_text(), 30), log.read_text()[-2000:]
        assert "the running model is kept" in log.read_text() and "a restart would refuse to start" in log.read_text()
        seen = len(sub.payloads("prediction"))
        assert wait_for(lambda: len(sub.payloads("prediction")) > seen + 10, 30)  # still answering
        shutil.copyfile(fmnist_folded["int8"], tmp_path / "new.onnx")
        (tmp_path / "new.onnx").replace(model)  # a valid model, another layout
        daemon.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "changed on disk; running it now" in log.read_text(), 30), log.read_text()[-2000:]
        seen = len(sub.payloads("prediction"))
        assert wait_for(lambda: len(sub.payloads("prediction")) > seen + 10, 30)
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0
        sub.stop()
    assert "folded layout" in log.read_text() and "Traceback" not in log.read_text()


# -- signals while starting ------------------------------------------------------------------------

@pytest.mark.parametrize("delay", [0.15, 0.3])
def test_a_sighup_in_the_first_moments_is_not_fatal(tmp_path, broker, fmnist, drift_video, delay):
    config = agent_config(tmp_path, fmnist["int8"], drift_video, broker.port,
                          cameras=[{"name": "cam1", "source": str(drift_video), "replay": {"paced": False}}])
    log = tmp_path / "agent.log"
    daemon = start_daemon(config, log=log)
    time.sleep(delay)
    daemon.send_signal(signal.SIGHUP)
    assert daemon.wait(120) == 0, log.read_text()[-2000:]


# -- two boxes with one client id ------------------------------------------------------------------

def test_two_boxes_with_one_client_id_are_told_so(tmp_path, broker, fmnist, drift_video):
    daemons, logs = [], []
    try:
        for box in ("box-a", "box-b"):
            folder = tmp_path / box
            folder.mkdir()
            config = looping(folder, fmnist["int8"], drift_video, broker.port, device_id=box,
                             advanced__mqtt__client_id="camera-box")
            logs.append(folder / "agent.log")
            daemons.append(start_daemon(config, log=logs[-1]))
        said = "another client is most likely connected with the same client id 'camera-box'"
        assert wait_for(lambda: any(said in log.read_text() for log in logs), 90), logs[0].read_text()[-3000:]
    finally:
        for daemon in daemons:
            assert stop(daemon) == 0


# -- a newcomer's first hour -----------------------------------------------------------------------

def test_replay_quiet_prints_the_table_only_and_no_progress_bar_goes_to_a_redirected_stderr(tmp_path, fmnist,
                                                                                             drift_video):
    def replay(*extra):
        return subprocess.run([sys.executable, "-m", "agent.cli", "replay", str(drift_video), "--model",
                               str(fmnist["int8"]), "--report", str(tmp_path / "r.png"), *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    quiet = replay("--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert "frames read / processed / skipped / rejected  320 / 320 / 0 / 0" in quiet.stdout
    plain = replay()
    assert plain.returncode == 0
    assert "\r" not in plain.stderr and "frame/s" not in plain.stderr  # no tqdm bar in a log file
    assert "drift start" in plain.stderr  # the events still say what happened
