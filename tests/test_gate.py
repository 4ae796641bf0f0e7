"""The adaptation gate: unadapted on an unshifted camera, adapting once the statistics leave the
model's clean reference. Real exported models, real Fashion-MNIST and photo frames."""
from __future__ import annotations

import numpy as np
import pytest

from agent.contract import ShiftReference, read_model_info
from agent.gate import AdaptationGate, CollapseGuard
from agent.model.graph_session import GraphSession
from agent.pipeline import CameraPipeline
from agent.sources import Frame
from bench.corruptions import corrupt
from exporters.models import fashion_mnist as fm


def _reference(layers: int = 3, scores=(0.0,) * 100) -> ShiftReference:
    return ShiftReference(np.zeros(layers), np.ones(layers), np.asarray(scores))


def _shift_at(z: float, layers: int = 3) -> np.ndarray:
    """The raw shift whose standardised value is z in every layer of _reference()."""
    return np.full(layers, np.expm1(z))


def test_gate_is_closed_until_the_smoothed_shift_passes_low_and_full_at_high():
    gate = AdaptationGate(_reference(), low=0.5, high=1.5, smoothing=0.5)
    assert gate.strength == 0.0
    for frame in range(3):
        gate.update(_shift_at(0.3), frame)
    assert gate.strength == 0.0
    for frame in range(3, 20):
        gate.update(_shift_at(1.0), frame)
    assert gate.strength == pytest.approx(0.5, abs=1e-3)
    for frame in range(20, 40):
        gate.update(_shift_at(4.0), frame)
    assert gate.strength == 1.0


def test_sparse_observations_forget_at_the_same_rate_per_frame():
    every, sparse = AdaptationGate(_reference(), smoothing=0.1), AdaptationGate(_reference(), smoothing=0.1)
    for frame in range(40):
        every.update(_shift_at(2.0), frame)
        if frame % 4 == 0:
            sparse.update(_shift_at(2.0), frame)
    assert sparse.level == pytest.approx(every.level, rel=0.05)


def test_shadow_passes_only_while_adapting():
    gate = AdaptationGate(_reference(), shadow_every=4, smoothing=1.0)
    assert not any(gate.needs_shadow(f) for f in range(8))  # closed: every pass is already unadapted
    gate.update(_shift_at(3.0), 0)
    shadows = []
    for frame in (1, 2, 3, 4, 5, 7, 9, 10, 13):  # a live source skips frames 6, 8, 11, 12
        if gate.needs_shadow(frame):
            shadows.append(frame)
            gate.update(_shift_at(3.0), frame)
    assert shadows == [4, 9, 13]


def test_gate_starts_above_what_the_clean_calibration_stream_reached():
    calm = AdaptationGate(_reference(scores=[0.0] * 100), low=0.5, high=1.5, margin=0.5)
    assert (calm.low, calm.high) == (0.5, 1.5)
    unusual = AdaptationGate(_reference(scores=[0.0] * 50 + [3.0] * 200), low=0.5, high=1.5, margin=0.5)
    assert unusual.low == pytest.approx(3.5, abs=0.01) and unusual.high == pytest.approx(4.5, abs=0.01)


def test_gate_rejects_inverted_thresholds():
    with pytest.raises(ValueError, match="high"):
        AdaptationGate(_reference(), low=2.0, high=1.0)


def test_exporter_writes_a_shift_reference_per_file(fmnist):
    for kind in ("int8", "fp32"):
        info = read_model_info(fmnist[kind])
        reference = info.shift_reference
        assert reference is not None and reference.frames == 200
        assert reference.mean.shape == (len(info.layer_names),) and np.all(reference.std > 0)


def _run(path, images, gated: bool = True, adaptation: str = "on"):
    session = GraphSession(path, threads=1)
    gate = AdaptationGate(session.info.shift_reference) if gated else None
    pipeline = CameraPipeline(session, gate=gate)
    pipeline.set_adaptation(adaptation)
    return [pipeline.process(Frame(i, image, 0.0)) for i, image in enumerate(images)]


def test_clean_frames_stay_unadapted_and_a_contrast_loss_opens_the_gate_and_helps(fmnist):
    images, labels = fm.load_split("t10k")
    clean = _run(fmnist["int8"], images[:300])
    assert max(r.strength for r in clean) == 0.0
    assert all(np.array_equal(r.adapted, r.raw) for r in clean)  # exactly the unadapted model

    dim = corrupt(images[300:700], "contrast", 5, 0)
    gated = _run(fmnist["int8"], dim)
    unadapted = _run(fmnist["int8"], dim, adaptation="off")
    assert np.mean([r.strength for r in gated[100:]]) > 0.9
    y = labels[300:700]
    acc_gated = np.mean([np.argmax(r.adapted) == t for r, t in zip(gated, y)])
    acc_raw = np.mean([np.argmax(r.adapted) == t for r, t in zip(unadapted, y)])
    assert acc_gated > acc_raw + 0.2, (acc_gated, acc_raw)


def test_efficientnet_on_ordinary_photos_agrees_with_the_unadapted_model(effnet):
    from agent.samples import photo_stream

    frames = [frame for _, frame in photo_stream(8)]
    results = _run(effnet["int8"], frames)
    assert np.mean([r.strength == 0.0 for r in results]) >= 0.95


def test_guard_fires_when_adapted_answers_pile_onto_one_class_of_a_shuffled_stream():
    """A stream whose usual answers spread over every class: adapted answers gathering on one fire it."""
    guard = CollapseGuard(classes=10, window=20)
    rng = np.random.default_rng(0)
    for c in rng.integers(0, 10, 100):
        guard.usual(np.eye(10)[c])
    healthy = [guard.update(np.eye(10)[c], np.eye(10)[c]) for c in rng.integers(0, 10, 100)]
    assert not any(healthy) and guard.fired == 0
    collapsed = [guard.update(np.eye(10)[3], np.eye(10)[c]) for c in rng.integers(0, 10, 40)]
    assert any(collapsed) and guard.fired >= 1


def test_guard_leaves_a_fixed_camera_whose_adapted_answers_gather_on_its_usual_class():
    """A fixed camera in heavy noise: the unadapted answers scatter, the adapted ones stay on the class the camera
    shows in its usual conditions (all the old entropy test saw was a collapse). Answers piling onto a class the
    camera never shows, where the unadapted model still gives its usual class, are one."""
    guard = CollapseGuard(classes=10, window=20)
    rng = np.random.default_rng(0)
    for _ in range(60):
        guard.usual(np.eye(10)[5])
    working = [guard.update(np.eye(10)[5 if rng.random() < 0.7 else 1], np.eye(10)[c])
               for c in rng.integers(0, 10, 200)]
    assert not any(working)
    adapted, unadapted = guard.divergence()
    assert adapted < unadapted
    collapsed = [guard.update(np.eye(10)[2], np.eye(10)[5 if rng.random() < 0.8 else 7]) for _ in range(40)]
    assert any(collapsed) and guard.fired >= 1


def test_a_firing_guard_resets_the_components_and_pauses_adaptation(fmnist):
    images, _ = fm.load_split("t10k")
    session = GraphSession(fmnist["int8"], threads=1)
    guard = CollapseGuard(len(session.info.labels), window=10, margin=1e-6, hold=30)  # fires at any doubt
    pipeline = CameraPipeline(session, raw_every=1, guard=guard)
    results = [pipeline.process(Frame(i, image, 0.0)) for i, image in enumerate(images[:60])]
    assert guard.fired >= 1
    first = next(i for i, r in enumerate(results) if r.strength == 0)
    assert all(r.strength == 0 for r in results[first:first + 29])


def test_the_daemon_refuses_to_gate_a_model_without_a_shift_reference(fmnist, tmp_path):
    import onnx
    from helpers import agent_config

    from agent.config import load_config
    from agent.contract import KEY_SHIFT_REFERENCE, ContractError
    from agent.daemon import Agent

    model = onnx.load(str(fmnist["int8"]))
    kept = [p for p in model.metadata_props if p.key != KEY_SHIFT_REFERENCE]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    config = load_config(agent_config(tmp_path, old, tmp_path / "unused.avi", 1))
    with pytest.raises(ContractError, match="adaptation.gate.enabled: .* has no shift reference"):
        Agent(config)
