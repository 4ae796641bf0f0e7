"""The camera anchor: the folded layout's default learner (agent/anchor.py), on its own and in the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import fmnist_video

from agent.config import parse_config
from agent.contract import AdaptationSpec, LayerSpec, read_model_info
from agent.model.anchor import STRENGTH, CameraAnchor
from agent.model.folded_session import FoldedSession
from agent.pipeline import build_pipeline
from agent.sources import FileSource
from agent.state import initial_state, load_state, save_state


def spec(channels=(3, 2), k=4) -> tuple[AdaptationSpec, dict]:
    layers = tuple(LayerSpec(f"l{i}", c, 1e-5, f"m{i}", f"v{i}") for i, c in enumerate(channels))
    source = {f"l{i}": (np.arange(c, dtype=np.float32), np.full(c, 2.0, np.float32)) for i, c in enumerate(channels)}
    return AdaptationSpec("robust", k, 0.1, 0.07, layers, ("means", "vars", "counts")), source


def anchor() -> CameraAnchor:
    s, source = spec()
    learner = CameraAnchor(s, source)
    learner.set_state(initial_state(s, source))
    return learner


def test_before_it_has_seen_the_camera_it_normalises_with_the_source():
    learner = anchor()
    assert not learner.learned
    learner.update(np.ones(5), np.ones(5), strength=1.0)  # a changed condition before any usual frame: ignored
    mean, var = learner.statistics()
    np.testing.assert_array_equal(mean, learner.source_mean)
    np.testing.assert_array_equal(var, learner.source_var)


def test_content_the_camera_always_shows_cancels_and_only_the_change_is_applied():
    learner = anchor()
    content = np.array([5.0, -3.0, 1.0, 7.0, 0.5]), np.array([4.0, 1.0, 9.0, 2.0, 3.0])
    for _ in range(20):
        learner.update(*content, strength=0.0)
    for _ in range(200):  # the same content in the changed condition: no change to apply
        learner.update(*content, strength=1.0)
    mean, var = learner.statistics()
    np.testing.assert_allclose(mean, learner.source_mean, atol=1e-5)
    np.testing.assert_allclose(var, learner.source_var, rtol=1e-5)
    darker = content[0] - 2.0, content[1] * 0.25  # fog/darkness: means move, variances shrink
    for _ in range(200):
        learner.update(*darker, strength=1.0)
    mean, var = learner.statistics()
    np.testing.assert_allclose(mean, learner.source_mean - STRENGTH * 2.0, atol=1e-4)
    np.testing.assert_allclose(var, learner.source_var * 0.25 ** STRENGTH, rtol=1e-4)
    learner.update(*content, strength=0.0)  # usual conditions again: the current statistics restart
    np.testing.assert_allclose(learner.statistics()[0], learner.source_mean, atol=1e-5)


def test_its_state_is_components_and_survives_a_checkpoint(tmp_path):
    s, source = spec()
    learner = anchor()
    rng = np.random.default_rng(0)
    for strength in (0.0,) * 10 + (1.0,) * 5:
        learner.update(rng.normal(size=5), rng.uniform(0.5, 2, 5), strength=strength, frames=3)
    save_state(tmp_path / "cam.npz", learner.state(), s, frames=15)
    restored = CameraAnchor(s, source)
    restored.set_state(load_state(tmp_path / "cam.npz", s)[0])
    for a, b in zip(learner.statistics(), restored.statistics()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert restored.reference_frames == 30 and restored.current_frames == 15


@pytest.fixture(scope="module")
def fixed_camera(tmp_path_factory):
    path = tmp_path_factory.mktemp("anchor") / "shelf.avi"
    fmnist_video(path, [("clean", 150), ("noise", 120), ("clean", 120)])
    return path


def test_a_fixed_camera_is_anchored_while_its_condition_lasts_only(fmnist_folded, fixed_camera):
    """Noise from frame 150 to 269: anchored from the episode's start until a few frames after the noise
    clears, though the episode itself ends only 30 calm frames later; the reference learns nothing meanwhile."""
    config = parse_config({"model": {"path": str(fmnist_folded["int8"]), "device": "cpu"},
                           "cameras": [{"name": "shelf", "source": str(fixed_camera)}],
                           "advanced": {"model": {"threads": 1}}})
    pipeline = build_pipeline(config)
    session = pipeline.session
    assert isinstance(session, FoldedSession) and isinstance(session.learner, CameraAnchor) and pipeline.anchored
    results, reference = [], []
    for frame in FileSource(fixed_camera).frames():
        results.append(pipeline.process(frame))
        reference.append(session.learner.reference_frames)
    strength = np.array([r.strength for r in results])
    starts = [r.frame for r in results if r.drift and r.drift.type == "start"]
    ends = [r.frame for r in results if r.drift and r.drift.type == "end"]
    assert pipeline.drift.fixed and starts and ends and 150 <= starts[0] < ends[0]
    assert reference[starts[0]] == reference[ends[0] - 1]  # nothing of the episode taught the reference
    assert not strength[: starts[0] + 1].any()  # learning the camera: the unadapted model
    assert strength[starts[0] + 1: 270].all()  # the condition: anchored
    returned = 270 + int(np.argmin(strength[270:]))
    assert returned == 270 and not strength[returned:].any(), strength[265:280]  # back on the first clean frame
    assert ends[0] > returned + 20
    assert session.learner.reference_frames >= 100
    during = [r for r in results if starts[0] + 10 < r.frame <= ends[0]]
    moved = [float(np.abs(r.adapted - r.raw).max()) for r in during if r.raw is not None]
    assert moved and max(moved) > 1e-3  # the anchored answer is not the unadapted one
    lame = np.array([r.lame_applied for r in results])
    assert lame[strength > 0].mean() > 0.5  # the condition's answers come in runs: LAME corrects them
    assert not lame[strength == 0].any()  # the unadapted answers are the model's own


def test_a_camera_that_pans_is_not_anchored(fmnist_folded, tmp_path):
    """Differencing cannot tell a pan's new content from a condition (bench/camera.py): left unadapted."""
    import cv2

    from agent.samples import pan, photo

    path = tmp_path / "pan.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (160, 120))
    rng = np.random.default_rng(0)
    for name in ("coffee", "chelsea", "rocket", "astronaut", "coffee", "chelsea"):
        for frame in pan(photo(name), 40, (160, 120)):
            writer.write(frame)
    for frame in pan(photo("coffee"), 120, (160, 120)):  # noise comes on while it pans
        writer.write(np.clip(frame + rng.normal(0, 60, frame.shape), 0, 255).astype(np.uint8))
    writer.release()
    info = read_model_info(fmnist_folded["int8"])
    config = parse_config({"model": {"path": str(fmnist_folded["int8"]), "device": "cpu"},
                           "cameras": [{"name": "pan", "source": str(path)}],
                           "advanced": {"model": {"threads": 1}}})
    pipeline = build_pipeline(config)
    results = list(pipeline.stream(FileSource(path).frames()))
    assert info.adaptation.layout == "folded" and not pipeline.drift.fixed
    assert all(r.strength == 0 for r in results)


def test_a_drift_episode_is_followed_every_frame_then_answered_from_a_bake(fmnist_folded, fixed_camera):
    """The session's cadence on the fixed camera: clean frames teach the reference (measured every 11th);
    in its noise the anchor measures every frame through the graph until the episode settles, then answers
    from a bake of its normalisation (the graph's answer for it) and measures every 11th frame; back in
    clean conditions the next episode is followed from its start again."""
    from agent import contract
    from agent.model.cadence import SETTLE_MEASUREMENTS, STATISTICS_EVERY
    from agent.model.sessions import open_session
    from agent.preprocess import Preprocessor

    session = open_session(fmnist_folded["int8"], "cpu", "onnxruntime", threads=1)
    preprocess = Preprocessor(session.info.preprocess)
    frames = [preprocess(f.image) for f in FileSource(fixed_camera).frames()]
    clean, noisy = frames[:150], frames[150:270]
    measured = [session.step(x, strength=0.0).shift is not None for x in clean]
    assert sum(measured) == len(clean) // STATISTICS_EVERY and session.learner.learned
    shifts, baked = [], 0
    for x in noisy:
        before = session.baked_statistics
        out = session.step(x, strength=1.0)
        shifts.append(out.shift is not None)
        if out.shift is None and session.baked_statistics is not None:
            mean, var = session.baked_statistics
            graph = session.session.run([contract.LOGITS], {contract.IMAGE: x, contract.NORM_MEAN: mean,
                                                            contract.NORM_VAR: var})[0][0]
            np.testing.assert_allclose(out.logits, graph, atol=1e-4)
            baked += before is not None and before[0] is mean  # answered from a bake it already had
    settled = shifts.index(False)
    assert settled >= SETTLE_MEASUREMENTS and all(shifts[:settled])
    assert sum(shifts[settled:]) == len(shifts[settled:]) // STATISTICS_EVERY  # every 11th once settled
    assert baked > 0 and not session.cadence.following
    session.step(frames[270], strength=0.0)
    assert session.cadence.following


def _pipeline(model, camera, **advanced):
    return build_pipeline(parse_config({"model": {"path": str(model), "device": "cpu"},
                                        "cameras": [{"name": "shelf", "source": str(camera)}],
                                        "advanced": {"model": {"threads": 1}, **advanced}}))


def test_scoring_the_unadapted_model_on_every_frame_changes_no_answer(fmnist_folded, fixed_camera):
    """Replay with labels runs the unadapted model on every frame to score it; what the camera answers, the
    guard's feed and what the anchor learns must be what the daemon (every 30th frame) gets."""
    daemon, scored = _pipeline(fmnist_folded["int8"], fixed_camera), _pipeline(fmnist_folded["int8"], fixed_camera)
    scored.score_unadapted = True
    for frame in FileSource(fixed_camera).frames():
        a, b = daemon.process(frame), scored.process(frame)
        assert b.raw is not None
        np.testing.assert_array_equal(a.adapted, b.adapted, err_msg=f"frame {frame.index}")
        assert a.strength == b.strength
    assert daemon.session.learner.reference_frames == scored.session.learner.reference_frames
    np.testing.assert_array_equal(daemon.guard.usual_answers, scored.guard.usual_answers)


def test_the_guard_catches_a_real_collapse_of_the_anchor(fmnist_folded, tmp_path):
    """The light dims (a drift episode; the anchor gives back the camera's usual class where the unadapted model
    does not), then adaptation goes wrong: from frame 250 the adapted pass answers a class this camera never
    gives (a stand-in for a broken learner: none can be made to collapse on purpose). The guard fires, resets
    and pauses adaptation; the dimmed frames before it never fired it."""
    import cv2

    from agent.model.adaptive import StepOutput

    path = tmp_path / "dimmed.avi"
    fmnist_video(path, [("clean", 150)])
    frames = [f.image for f in FileSource(path).frames()]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 50, frames[0].shape[1::-1])
    for i in range(450):
        image = frames[i % len(frames)]
        writer.write(image if i < 150 else (image * 0.7).astype(np.uint8))
    writer.release()
    pipeline = _pipeline(fmnist_folded["int8"], path, adaptation={"raw_every": 3, "guard": {"window": 10}})
    session, step = pipeline.session, pipeline.session.step
    broken = {"from": 10**9}

    def collapsing(image, strength=1.0, update=True, measure=False):
        out = step(image, strength=strength, update=update, measure=measure)
        if strength > 0 and session.frames >= broken["from"]:
            return StepOutput(np.eye(len(out.logits), dtype=np.float32)[9] * 20, out.features, out.shift)
        return out

    session.step = collapsing
    results = []
    for frame in FileSource(path).frames():
        if frame.index == 250:
            broken["from"] = session.frames
            assert pipeline.guard.fired == 0 and pipeline.drift.active and results[-1].strength == 1.0
        results.append(pipeline.process(frame))
    assert pipeline.guard.fired == 1
    fired = next(r.frame for r in results if r.frame > 250 and r.strength == 0)
    assert fired < 300 and all(r.strength == 0 for r in results[fired:])


def test_a_camera_installed_in_infrared_forgets_it_as_its_reference_once_the_day_comes(fmnist_folded, tmp_path):
    """Its first frames are an infrared night's (grey): the drift detector's provisional reference; a hundred
    frames in colour in a row replace it, and the anchor learns its reference again from the day."""
    import cv2

    from agent.drift import RELEARN_FRAMES, RELEARNT
    from agent.samples import photo

    path = tmp_path / "infrared-then-day.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (160, 120))
    rng = np.random.default_rng(0)
    scene = cv2.resize(photo("coffee"), (160, 120)).astype(np.float32)
    for t in range(500):
        frame = scene + rng.normal(0, 2, scene.shape)
        if t < 200:
            grey = cv2.cvtColor(np.clip(frame, 0, 255).astype(np.uint8), cv2.COLOR_BGR2GRAY).astype(np.float32)
            frame = cv2.cvtColor(np.clip(0.6 * grey + 40 + rng.normal(0, 6, grey.shape), 0, 255).astype(np.uint8),
                                 cv2.COLOR_GRAY2BGR).astype(np.float32)
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()
    config = parse_config({"model": {"path": str(fmnist_folded["int8"]), "device": "cpu"},
                           "cameras": [{"name": "yard", "source": str(path)}],
                           "advanced": {"model": {"threads": 1}}})
    pipeline = build_pipeline(config)
    results, reference = [], []
    for frame in FileSource(path).frames():
        results.append(pipeline.process(frame))
        reference.append(pipeline.session.learner.reference_frames)
    relearnt = [r.frame for r in results if r.drift and r.drift.reason == RELEARNT]
    start = next(r.frame for r in results if r.drift and r.drift.type == "start")
    assert 200 <= start <= 210 and relearnt == [start + RELEARN_FRAMES]
    assert reference[relearnt[0]] == 0 < reference[-1]  # forgotten, then learnt from the day
    assert not any(r.strength for r in results[200:])  # colour is better than the infrared reference: never adapted
    assert not pipeline.drift.active and not pipeline.drift.provisional
