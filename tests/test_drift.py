"""The drift detector on its own (numpy and OpenCV only): a still camera with passers-by raises
nothing, a changed condition starts an episode that names it and ends once the camera is back, a
panning camera's scene switches raise nothing, an episode carries over a restart, and a camera installed
at night or in infrared learns its usual conditions again once the day comes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.drift import APART, CONDITION, RELEARN_FRAMES, RELEARNT, DriftDetector
from agent.imaging import observe
from agent.samples import photo, photo_stream


def hall(frames: int, rng: np.random.Generator, dark: range = range(0)):
    """A still camera on a real photo; a 'person' (a dark block) walks across; frames in `dark` are
    night (a quarter of the light, sensor noise)."""
    scene = cv2.resize(photo("coffee"), (320, 240))
    for t in range(frames):
        frame = scene.astype(np.float32)
        x = (7 * t) % 300
        frame[100:200, x:x + 20] = 40
        frame += rng.normal(0, 2, frame.shape)
        if t in dark:
            frame = 0.25 * frame + rng.normal(0, 10, frame.shape)
        yield t, np.clip(frame, 0, 255).astype(np.uint8)


def events(detector: DriftDetector, frames) -> list:
    return [e for t, f in frames if (e := detector.update(observe(f), t, now=float(t))) is not None]


def test_still_camera_with_a_passer_by_raises_nothing():
    assert events(DriftDetector(), hall(1000, np.random.default_rng(0))) == []


def test_night_starts_an_episode_that_names_it_and_ends_when_the_light_is_back():
    found = events(DriftDetector(), hall(600, np.random.default_rng(1), dark=range(200, 400)))
    kinds = [e.type for e in found if e.type != "update"]
    assert kinds == ["start", "end"], found
    start, end = found[0], found[-1]
    assert 200 <= start.frame <= 210 and 400 <= end.frame <= 500
    assert start.episode == end.episode and end.reason == "cleared"
    assert "darker" in start.condition and start.score > start.threshold == 6.0
    assert start.statistics["brightness"] < 0


def infrared(frames):
    """The IR-cut filter lifted: a grey, flat picture."""
    for t, f in frames:
        grey = 0.6 * cv2.cvtColor(f, cv2.COLOR_BGR2GRAY).astype(np.float32) + 40
        yield t, cv2.cvtColor(np.clip(grey, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def test_a_camera_installed_in_infrared_learns_the_day_as_usual_once_colour_comes():
    rng = np.random.default_rng(3)
    frames = list(hall(1300, rng, dark=range(700, 900)))
    frames = list(infrared(frames[:300])) + frames[300:]
    detector = DriftDetector()
    found = events(detector, frames)
    relearnt = [e for e in found if e.reason == RELEARNT]
    assert len(relearnt) == 1 and relearnt[0].type == "end", found
    first = found[0]
    assert first.type == "start" and 300 <= first.frame <= 310 and relearnt[0].episode == first.episode
    assert relearnt[0].frame == first.frame + RELEARN_FRAMES and not detector.provisional
    later = [e for e in found if e.frame > relearnt[0].frame]  # the day is usual now, the night a condition
    assert [e.type for e in later if e.type != "update"] == ["start", "end"]
    assert later[0].frame >= 700 and "darker" in later[0].condition


def test_a_condition_during_the_relearn_is_not_learnt_as_usual():
    """Colour comes at 300, the relearn at 400 and, 60 frames into its warm-up, a dark spell of 30 frames: the
    day is learnt as usual all the same, and the next dark spell starts an episode."""
    rng = np.random.default_rng(8)
    frames = list(hall(900, rng, dark=[*range(460, 490), *range(700, 800)]))
    frames = list(infrared(frames[:300])) + frames[300:]
    found = events(DriftDetector(), frames)
    relearnt = [e.frame for e in found if e.reason == RELEARNT]
    assert relearnt and relearnt[0] < 460
    later = [e for e in found if e.type == "start" and e.frame > relearnt[0]]
    assert later and 700 <= later[0].frame <= 710 and "darker" in later[0].condition


def test_darkness_alone_is_not_taken_for_a_better_light():
    """Noise or a brightness change lights a dark scene as the day does: a dark reference stays."""
    found = events(DriftDetector(), hall(600, np.random.default_rng(6), dark=range(0, 300)))
    assert all(e.reason != RELEARNT for e in found) and found[0].type == "start"


def test_a_camera_installed_by_day_keeps_its_reference_through_the_night():
    detector = DriftDetector()
    found = events(detector, hall(1000, np.random.default_rng(4), dark=range(200, 700)))
    assert [e.reason for e in found if e.type == "end"] == ["cleared"] and not detector.provisional


def test_a_frame_the_condition_has_turned_away_from_is_not_in_it():
    """Infrared (grey) from frame 200, a dim colour dawn from 400, day from 500: the first dawn frames are not
    in the episode's condition until its smoothed distance has followed them; nor are frames back at day."""
    rng = np.random.default_rng(7)
    frames = list(hall(600, rng))
    dawn = [(t, np.clip(0.6 * f.astype(np.float32), 0, 255).astype(np.uint8)) for t, f in frames[400:500]]
    frames = frames[:200] + list(infrared(frames[200:400])) + dawn + frames[500:]
    detector, fit = DriftDetector(), {}
    for t, f in frames:
        observation = observe(f)
        fit[t] = detector.fit(observation)
        detector.update(observation, t, now=float(t))
    assert not any(fit[t] for t in range(100, 200))  # no episode
    assert all(fit[t] == CONDITION for t in range(230, 400))  # a steady condition
    assert all(fit[t] == APART for t in range(400, 406))  # infrared turned into a dim dawn at once
    assert all(fit[t] == CONDITION for t in range(430, 500))  # followed
    assert not any(fit[t] == CONDITION for t in range(501, 600) if detector.active)  # day again


def test_noise_on_a_grey_scene_does_not_replace_its_reference():
    """Sensor noise gives a grey scene colour, but it is a condition, not a better light."""
    rng = np.random.default_rng(5)
    scene = cv2.resize(photo("camera"), (320, 240)).astype(np.float32)
    frames = [(t, np.clip(scene + rng.normal(0, 2 if t < 150 else 25, scene.shape), 0, 255).astype(np.uint8))
              for t in range(450)]
    detector = DriftDetector()
    found = events(detector, frames)
    assert detector.provisional and found and found[0].type == "start" and "more colour" in found[0].condition
    assert all(e.reason != RELEARNT for e in found) and detector.active


def test_scene_switches_of_a_panning_camera_raise_nothing():
    detector = DriftDetector()
    assert events(detector, enumerate(f for _, f in photo_stream(30))) == []
    assert len(detector.views) > 1  # it learnt the scenes as views, not as changes


@pytest.mark.parametrize("mid_episode", [True, False])
def test_state_carries_the_reference_and_the_open_episode_over(mid_episode):
    rng = np.random.default_rng(2)
    first = DriftDetector()
    frames = list(hall(600, rng, dark=range(200, 400)))
    cut = 300 if mid_episode else 150
    before = events(first, frames[:cut])
    second = DriftDetector()
    second.restore(first.state())
    after = events(second, frames[cut:])
    assert second.active is False
    starts = [e for e in before + after if e.type == "start"]
    ends = [e for e in before + after if e.type == "end"]
    assert len(starts) == len(ends) == 1 and starts[0].episode == ends[0].episode
    assert (starts[0] in before) is mid_episode


def test_threshold_must_be_above_the_end_level():
    with pytest.raises(ValueError, match="threshold"):
        DriftDetector(threshold=2.0, end_level=3.0)
