"""Replay of real video files written and decoded by OpenCV through the real INT8 model."""
from __future__ import annotations

import csv
import json
import socket
import threading
import time

import cv2
import numpy as np
import pytest

from agent.cli import main as agent_main
from agent.drift import DriftDetector
from agent.lame import Lame
from agent.model.graph_session import GraphSession
from agent.pipeline import CameraPipeline
from agent.replay import LabelsError, read_labels, replay
from agent.samples import render_sample_video, sidecar_path
from agent.sources import FileSource, Frame, LiveSource, SourceError

FRAMES_PER_PHOTO = 30  # 4 photos x 4 conditions (clean, fog, night, clean) = 480 frames


@pytest.fixture(scope="module")
def sample_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "sample.mp4"
    render_sample_video(path, frames_per_photo=FRAMES_PER_PHOTO)
    return path


def test_replay_accounts_for_every_frame_and_raises_drift_around_the_change(effnet, sample_video):
    session = GraphSession(effnet["int8"])
    labels = read_labels(sidecar_path(sample_video), session.info.labels)
    pipeline = CameraPipeline(session, Lame(window=16), "auto", DriftDetector(layers=session.info.layer_names),
                              raw_every=1)
    source = FileSource(sample_video)
    summary, record = replay(pipeline, source, labels, progress=False)

    read = summary["frames_read"]
    assert read == 480 == source.frame_count
    assert summary["frames_processed"] + summary["frames_skipped"] + summary["frames_rejected"] == read
    assert len(record.frames) == summary["frames_processed"]
    changed, back = 4 * FRAMES_PER_PHOTO, 12 * FRAMES_PER_PHOTO  # first fog frame, first clean frame after night
    starts = [e for e in record.events if e.type == "start"]
    ends = [e for e in record.events if e.type == "end"]
    assert starts and changed <= starts[0].frame < changed + FRAMES_PER_PHOTO, record.events
    assert ends and ends[-1].frame >= back and ends[-1].episode == starts[-1].episode, record.events
    assert all(e.frame < back for e in starts), "no drift should start once the clean scene is back"
    assert set(summary["accuracy"]) == {"unadapted", "adapted", "answer"}
    assert summary["accuracy_by_condition"]["clean"]["unadapted"] > 0.9


def test_stream_overlapping_lame_gives_what_process_gives_frame_by_frame(effnet, sample_video):
    """stream() preprocesses a frame ahead and runs LAME a frame behind the model on a worker thread;
    nothing may change but the timing."""
    def pipeline():
        session = GraphSession(effnet["int8"])
        return CameraPipeline(session, Lame(window=16), "on", DriftDetector(layers=session.info.layer_names),
                              raw_every=5)

    frames = list(FileSource(sample_video, end=150).frames())
    frames.insert(75, Frame(999, np.zeros((0, 0), np.uint8), 0.0))  # rejected, in either way of running
    one_by_one, overlapped = pipeline(), pipeline()
    expected = [r for r in map(one_by_one.process, frames) if r is not None]
    streamed = list(overlapped.stream(iter(frames)))
    assert [r.frame for r in streamed] == [r.frame for r in expected] == list(range(150))
    assert overlapped.counters.rejected == one_by_one.counters.rejected == {"empty frame": 1}
    for a, b in zip(streamed, expected):
        np.testing.assert_array_equal(a.probs, b.probs)
        np.testing.assert_array_equal(a.corrected, b.corrected)
        assert (a.shift, a.drift_score, a.lame_applied) == (b.shift, b.drift_score, b.lame_applied)
        drift = [None if r.drift is None else (r.drift.type, r.drift.score, r.drift.top_layers) for r in (a, b)]
        assert drift[0] == drift[1]  # episode ids are random, times are the capture clock's
    assert any(r.drift for r in streamed)
    assert not np.array_equal(expected[-1].probs, expected[-1].adapted)  # LAME really ran and moved the answer


def test_replay_cli_prints_the_table_and_writes_the_report(effnet, sample_video, tmp_path, capsys):
    report, summary = tmp_path / "report.png", tmp_path / "summary.json"
    code = agent_main(["replay", str(sample_video), "--model", str(effnet["int8"]), "--labels",
                       str(sidecar_path(sample_video)), "--end", "150", "--quiet", "--report", str(report),
                       "--json", str(summary), "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy answer" in out and "latency p50 / p95" in out
    assert cv2.imread(str(report)) is not None
    assert json.loads(summary.read_text())["frames_processed"] == 150


def _write_labels(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows(rows)


@pytest.mark.parametrize("rows, message", [
    ([["frame", "class"], [0, "espresso"]], "header must have 'frame' and 'label'"),
    ([["frame", "label"], ["x", "espresso"]], "row 2: frame 'x' is not an integer"),
    ([["frame", "label"], [0, "espresso"], [1, "unicorn"]], "row 3: label 'unicorn' is not a class"),
    ([["frame", "label"], [0, "espresso"], [0, "cup"]], "row 3: frame 0 labelled twice"),
])
def test_bad_labels_files_name_the_row(effnet, tmp_path, rows, message):
    path = tmp_path / "labels.csv"
    _write_labels(path, rows)
    with pytest.raises(LabelsError, match=message):
        read_labels(path, GraphSession(effnet["int8"]).info.labels)


def test_unreadable_video_is_a_clear_error(tmp_path, effnet, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(SourceError, match="cannot be opened"):
        FileSource(junk)
    assert agent_main(["replay", str(junk), "--model", str(effnet["int8"]), "--quiet"]) == 2
    assert "tta-agent: error: video file" in capsys.readouterr().err


def test_truncated_video_is_read_up_to_the_damage_and_reported(tmp_path):
    path = tmp_path / "cut.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(50):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    source = FileSource(path)
    frames = list(source.frames())
    assert 0 < len(frames) < 50
    assert source.counters.read == len(frames)
    if source.frame_count:  # the AVI header still promises 50 frames
        assert source.truncated and "truncated" in source.counters.errors[0]


def test_unpaced_replay_decodes_ahead_in_order_and_stops_its_decoder(tmp_path):
    """Frames written with their index as brightness come back complete and in order through the
    read-ahead thread; leaving the loop early ends the decoder instead of leaving it blocked."""
    path = tmp_path / "ordered.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(40):
        writer.write(np.full((48, 64, 3), i * 6, np.uint8))
    writer.release()
    frames = list(FileSource(path).frames())
    assert [f.index for f in frames] == list(range(40))
    assert np.all(np.abs(np.array([f.image.mean() for f in frames]) - np.arange(40) * 6) < 3)
    source = FileSource(path)
    for frame in source.frames():
        if frame.index == 3:
            break
    assert not any(t.name == f"decode-{path.name}" and t.is_alive() for t in threading.enumerate())


def test_a_url_that_never_answers_is_retried_with_backoff_without_crashing():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here
    source = LiveSource(f"http://127.0.0.1:{port}/stream.mjpg", open_timeout=0.5, backoff_initial=0.1,
                        backoff_max=0.2)
    time.sleep(1.5)
    source.stop()
    assert source.counters.read == 0 and not source.connected
    assert len(source.counters.errors) >= 2 and "cannot open" in source.counters.errors[0]


def test_live_source_hands_out_the_newest_frame_and_counts_what_it_skipped(sample_video):
    source = LiveSource(str(sample_video), stall_timeout=0.5, backoff_initial=0.1)
    taken = []
    for frame in source.frames():
        taken.append(frame.index)
        time.sleep(0.05)  # a model slower than the decoder
        if len(taken) == 20:
            break
    source.stop()
    assert taken == sorted(taken) and len(set(taken)) == 20
    assert source.counters.skipped > 0
    assert source.counters.read >= len(taken) + source.counters.skipped


def test_replay_under_the_daemon_config_builds_what_the_daemon_builds(effnet, sample_video, tmp_path, capsys):
    """One builder for every camera pipeline: replay --config gets the gate, the guard, LAME and drift the
    daemon would run, and scores what the agent answers."""
    import yaml

    from agent.config import load_config
    from agent.pipeline import build_pipeline

    doc = {"model": {"path": str(effnet["int8"]), "device": "cpu"}, "lame": {"mode": "on"},
           "advanced": {"lame": {"window": 8}, "adaptation": {"guard": {"window": 20}}, "drift": {"warmup": 40}},
           "cameras": [{"name": "cam1", "source": str(sample_video)}]}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    pipeline = build_pipeline(load_config(path))
    assert pipeline.gate is not None and pipeline.guard.window == 20 and pipeline.raw_every == 30
    assert pipeline.lame.window == 8 and pipeline.lame_mode == "on" and pipeline.drift.warmup == 40
    code = agent_main(["replay", str(sample_video), "--config", str(path), "--labels",
                       str(sidecar_path(sample_video)), "--end", "60", "--quiet", "--report", str(tmp_path / "r.png")])
    assert code == 0
    assert "accuracy answer" in capsys.readouterr().out


@pytest.mark.unit
def test_replay_overrides_lay_keys_over_the_config_and_name_bad_ones(tmp_path):
    """--set takes any key of the schema (no second copy of it in flags); the flags --model/--device/--threads
    are overrides too, and a path on the command line is taken from the working directory."""
    from agent.cli import parser, replay_config
    from agent.config import ConfigError

    path = tmp_path / "agent.yaml"
    path.write_text("model: {path: m.onnx, device: cuda}\ncameras: [{name: a, source: '0'}]\n"
                    "advanced: {lame: {window: 8}}\n")
    args = parser().parse_args(["replay", "v.mp4", "--config", str(path), "--device", "cpu",
                                "--set", "advanced.adaptation.gate.enabled=false", "--set", "lame.mode=on"])
    config = replay_config(args)
    assert (config.model.device, config.model.path) == ("cpu", tmp_path / "m.onnx")
    advanced = config.advanced
    assert advanced.adaptation.gate.enabled is False and (config.lame.mode, advanced.lame.window) == ("on", 8)
    args = parser().parse_args(["replay", "v.mp4", "--model", "x.onnx", "--set", "advanced.drift.warmup=40"])
    config = replay_config(args)
    assert config.model.path.is_absolute() and config.advanced.drift.warmup == 40
    assert config.cameras[0].source.endswith("v.mp4")
    for bad, message in ((["--set", "lame.windw=3"], "lame.windw: unknown key"),
                         (["--set", "lame"], "an override is KEY=VALUE"),
                         (["--set", "lame.mode=maybe"], "lame.mode: must be one of auto, on, off")):
        with pytest.raises(ConfigError, match=message):
            replay_config(parser().parse_args(["replay", "v.mp4", "--model", "x.onnx", *bad]))


def test_the_reports_rolling_accuracy_has_no_edge_pulled_towards_zero():
    """A clean stream the model gets right starts at 100%, not at 50% (a centred mean padded with zeros did)."""
    from agent.replay import trailing_mean

    right = np.ones(100)
    np.testing.assert_allclose(trailing_mean(right, 30), 1.0)
    steps = trailing_mean(np.array([1.0, 0.0, 1.0, 1.0]), 2)
    np.testing.assert_allclose(steps, [1.0, 0.5, 0.5, 1.0])
