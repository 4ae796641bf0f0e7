"""The README's first command, as a user runs it, on the exported test models and a freshly rendered video."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from agent.samples import render_sample_video

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_starts_clean_each_run_and_prints_no_broker_noise(tmp_path, effnet):
    video = tmp_path / "sample.mp4"
    render_sample_video(video, frames_per_photo=8)
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["path"] = str(effnet["int8"])
    config["cameras"][0]["source"] = str(video)
    config["state"]["dir"] = str(tmp_path / "state")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))

    last: list[str] = []

    def demo(*extra) -> list[str]:
        ran = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--config", str(path), *extra], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert ran.stderr == "", ran.stderr[-3000:]  # no PUBACK warning, no traceback
        last[:] = [ran.stdout]
        return [line for line in ran.stdout.splitlines()
                if line.startswith(("drift events", "accuracy", "  clean", "  fog", "  night"))]

    first, second = demo(), demo()
    out = last[0]
    assert f"agent demo-box: sample.mp4 through {effnet['int8'].name}, MQTT on 127.0.0.1:" in out
    assert "[mqtt] tta/demo-box/availability = online" in out
    assert "frames read / processed / skipped / rejected  128 / 128 / 0 / 0" in out
    assert "'prediction': 128" in out
    assert (tmp_path / "state" / "demo-report.png").exists()
    assert first and first == second  # the second run learns the camera again, as the first did
    assert (tmp_path / "state" / "demo.state.npz").exists()
    resumed = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--config", str(path), "--resume"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0


def test_demo_without_the_exporter_says_what_to_install(tmp_path, monkeypatch, capsys):
    """A box with the agent only: the demo cannot make its model and says so in one line, exit 2."""
    from agent.cli import main as agent_main

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    config["model"]["path"] = str(tmp_path / "missing.onnx")
    config["cameras"][0]["source"] = str(tmp_path / "sample.mp4")
    (tmp_path / "sample.mp4").write_bytes(b"")  # present: only the model is missing
    config["state"]["dir"] = str(tmp_path / "state")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("sys.executable", str(tmp_path / "bin" / "python"))  # no tta-export beside it
    assert agent_main(["demo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tta-agent: error: ") and "tta-export not found: install the exporter" in err
    assert not (tmp_path / "missing.onnx").exists()
