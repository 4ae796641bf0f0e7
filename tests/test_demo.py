"""The README's first command, on the exported test models and a freshly rendered video."""
from __future__ import annotations

from pathlib import Path

import yaml

from agent.demo import run_demo
from agent.samples import render_sample_video


def test_demo_runs_the_daemon_over_the_video_and_reports(effnet, tmp_path, capsys):
    video = tmp_path / "sample.mp4"
    render_sample_video(video, frames_per_photo=8)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    config["model"]["path"] = str(effnet["int8"])
    config["cameras"][0]["source"] = str(video)
    config["state"]["dir"] = str(tmp_path / "state")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_demo(path) == 0
    out = capsys.readouterr().out
    assert f"agent demo-box: sample.mp4 through {effnet['int8'].name}, MQTT on 127.0.0.1:" in out
    assert "[mqtt] tta/demo-box/availability = online" in out
    assert "frames read / processed / skipped / rejected  128 / 128 / 0 / 0" in out
    assert "accuracy answer" in out
    assert "'prediction': 128" in out
    assert (tmp_path / "state" / "demo-report.png").exists()


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
