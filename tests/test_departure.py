"""A change only the model's layers show (compression, pixelation): the departure watch on its own, in the drift
detector, and in a fixed camera's pipeline with the real EfficientNet-Lite0 and OpenCV's JPEG encoder."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_drift import hall

from agent.config import parse_config
from agent.departure import MIN_SPREAD, WARMUP, DepartureWatch
from agent.drift import CONDITION, FEATURES, USUAL, DriftDetector
from agent.imaging import observe
from agent.pipeline import PROBE_EVERY, build_pipeline
from agent.samples import photo
from agent.sources import Frame

LAYERS = 20


def departures(rng: np.random.Generator, moved: int = 0, by: float = 0.0) -> np.ndarray:
    """Per-layer KL of one measured frame: the usual level with a little spread, `moved` layers up by `by` (log)."""
    log_kl = rng.normal(-4.0, 0.1, LAYERS)
    log_kl[:moved] += by
    return np.exp(log_kl)


def test_most_layers_moving_is_a_change_and_a_few_are_content():
    rng = np.random.default_rng(0)
    watch = DepartureWatch(threshold=6.0)
    for _ in range(WARMUP + 10):
        watch.measure(departures(rng), learn=True)
    assert watch.warm and abs(watch.score) < 3
    for _ in range(5):  # a passer-by close to the camera moves a couple of deep layers a lot
        watch.measure(departures(rng, moved=2, by=4.0), learn=True)
        assert watch.score < 3 and not watch.changed
    watch.measure(departures(rng, moved=16, by=3.0), learn=True)
    assert watch.score > 3.0 / MIN_SPREAD - 1 and not watch.changed  # one measurement is not yet a change
    level = watch.mean.copy()
    watch.measure(departures(rng, moved=16, by=3.0), learn=True)
    assert watch.changed
    assert np.array_equal(watch.mean, level)  # a condition coming on does not teach the usual level


def test_its_state_round_trips_and_a_damaged_one_is_refused():
    rng = np.random.default_rng(1)
    watch = DepartureWatch(threshold=6.0)
    for _ in range(WARMUP):
        watch.measure(departures(rng), learn=True)
    copy = DepartureWatch(threshold=6.0)
    copy.restore(watch.state())
    assert np.array_equal(copy.mean, watch.mean) and copy.count == watch.count
    for bad in ({"mean": [1.0, 2.0], "var": [1.0], "count": 3}, {"mean": [1.0]}, {"mean": [np.nan], "var": [0.0],
                                                                                   "count": 1}):
        with pytest.raises(ValueError, match="departure"):
            copy.restore(bad)
    assert np.array_equal(copy.mean, watch.mean)  # left as it was


def test_an_episode_the_layers_open_is_named_kept_and_ended_by_them():
    """A still camera whose imaging statistics never change; the layers move from frame 300 to 499."""
    rng = np.random.default_rng(2)
    detector = DriftDetector(end_frames=20)
    found, fits = [], {}
    for t, image in hall(800, rng):
        observation = observe(image)
        fits[t] = detector.fit(observation)
        changed = 300 <= t < 500
        measured = departures(rng, moved=18 if changed else 0, by=3.0) if t % 11 == 0 else None
        event = detector.update(observation, t, now=float(t), departure=measured)
        if event is not None:
            found.append(event)
    kinds = [e.type for e in found if e.type != "update"]
    assert kinds == ["start", "end"], found
    start, end = found[0], found[-1]
    assert 300 <= start.frame <= 300 + 2 * 11 + 1 and start.condition == [FEATURES] and end.reason == "cleared"
    assert all(fits[t] == CONDITION for t in range(start.frame + 1, 500))  # the imaging looks usual throughout
    back = min(t for t in range(500, 800) if fits[t] == USUAL)
    assert back <= 500 + 11  # on the first measurement after the layers came back
    assert 500 < end.frame <= back + 20 + 1


def test_a_detector_state_without_the_departure_restores_and_learns_it_again():
    rng = np.random.default_rng(3)
    first = DriftDetector()
    for t, image in hall(200, rng):
        first.update(observe(image), t, now=float(t), departure=departures(rng) if t % 11 == 0 else None)
    state = first.state()
    assert state["departure"]["count"] > 0
    older = {k: v for k, v in state.items() if k not in ("departure", "by_features")}
    second = DriftDetector()
    second.restore(older)
    assert second.departure.mean is None and not second.by_features and second.spread is not None


def test_jpeg_on_a_fixed_camera_is_adapted_and_left_at_once(effnet_folded):
    """A camera on a real photo; frames 150-319 go through OpenCV's JPEG encoder at quality 15."""
    config = parse_config({"model": {"path": str(effnet_folded["int8"]), "device": "cpu"},
                           "cameras": [{"name": "desk", "source": "desk.avi"}],
                           "advanced": {"model": {"threads": 1}}})
    pipeline = build_pipeline(config)
    scene = cv2.resize(photo("coffee"), (320, 240), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(4)
    results = []
    for t in range(420):
        dx, dy = rng.integers(-2, 3, 2)
        image = np.clip(np.roll(scene, (dy, dx), (0, 1)) + rng.normal(0, 3, scene.shape), 0, 255).astype(np.uint8)
        if 150 <= t < 320:
            image = cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 15])[1], cv2.IMREAD_COLOR)
        results.append(pipeline.process(Frame(t, image, 0.0)))
    starts = [r for r in results if r.drift and r.drift.type == "start"]
    assert len(starts) == 1 and 150 <= starts[0].frame <= 150 + 2 * PROBE_EVERY + 1, starts
    assert starts[0].drift.condition[0] == FEATURES  # the layers saw it first
    strength = np.array([r.strength for r in results])
    assert strength[starts[0].frame + 1: 320].mean() > 0.8
    assert not strength[320:].any()  # answered unadapted from the first clean frame
