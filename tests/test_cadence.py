"""The folded layout's measuring cadence (agent/model/cadence.py), on its own: no model, no onnxruntime."""
from __future__ import annotations

import pytest

from agent.model.cadence import MeasuringCadence


def _measured(cadence: MeasuringCadence, adapted: bool, frames: int) -> list[int]:
    return [cadence.next(adapted) for _ in range(frames)]


def test_unadapted_frames_measure_every_nth_and_stand_for_the_frames_since():
    cadence = MeasuringCadence(every=4, settle=3)
    assert _measured(cadence, False, 8) == [0, 0, 0, 4, 0, 0, 0, 4]
    assert cadence.next(False, asked=True) == 1  # a gate's shadow pass measures when asked
    assert _measured(cadence, False, 4) == [0, 0, 0, 4]


def test_without_settling_adapted_frames_keep_the_same_cadence():
    cadence = MeasuringCadence(every=4, settle=0)
    assert _measured(cadence, True, 8) == [0, 0, 0, 4, 0, 0, 0, 4]
    cadence.moved(step=1.0, from_bake=1.0)  # moves change nothing
    assert _measured(cadence, True, 4) == [0, 0, 0, 4]


def test_a_drift_episode_is_followed_every_frame_until_it_settles():
    cadence = MeasuringCadence(every=4, settle=3, rebake=0.01)
    assert cadence.following
    for step in (0.001, 0.001, 0.5, 0.001, 0.001):  # a large move starts the count again
        assert cadence.next(True) == 1
        cadence.moved(step, from_bake=float("inf"))
    assert cadence.following
    assert cadence.next(True) == 1
    cadence.moved(0.001, from_bake=float("inf"))
    assert not cadence.following
    assert _measured(cadence, True, 8) == [0, 0, 0, 4, 0, 0, 0, 4]


def test_a_settled_camera_whose_normalisation_leaves_the_bake_follows_again():
    cadence = MeasuringCadence(every=2, settle=1, rebake=0.01, follow=0.1)
    cadence.next(True)
    cadence.moved(0.0, from_bake=float("inf"))
    assert not cadence.following
    cadence.moved(0.02, from_bake=0.05)  # past the rebake threshold, within follow: the bake is rebuilt, no more
    assert not cadence.following
    cadence.moved(0.02, from_bake=0.2)
    assert cadence.following and _measured(cadence, True, 3) == [1, 1, 1]


def test_the_end_of_an_episode_restarts_following():
    cadence = MeasuringCadence(every=4, settle=1)
    cadence.next(True)
    cadence.moved(0.0, from_bake=float("inf"))
    assert not cadence.following
    cadence.restart()
    assert cadence.following


@pytest.mark.parametrize("every, settle, rebake", [(0, 0, 0.0), (1, -1, 0.0), (1, 0, -1.0)])
def test_bad_settings_are_refused(every, settle, rebake):
    with pytest.raises(ValueError, match="every must be >= 1"):
        MeasuringCadence(every, settle, rebake)
