"""LAME against its energy definition, on real features from the Fashion-MNIST model."""
from __future__ import annotations

import numpy as np
import pytest

from agent.lame import CorrelationMonitor, Lame, affinity, energy, solve
from agent.model.graph_session import GraphSession
from agent.pipeline import softmax
from agent.preprocess import Preprocessor
from exporters.models import fashion_mnist as fm


@pytest.fixture(scope="module")
def stream(fmnist):
    """Features and probabilities (unadapted model) of 400 real test images in runs of 40 of one class,
    as a camera watching one thing at a time sees them."""
    images, labels = fm.load_split("t10k")
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.choice(np.flatnonzero(labels == c), 40, replace=False)
                            for c in rng.permutation(10)])
    session = GraphSession(fmnist["int8"])
    preprocess = Preprocessor(session.info.preprocess)
    outs = [session.step(preprocess(images[i]), strength=0.0) for i in order]
    return np.stack([o.features for o in outs]), np.stack([softmax(o.logits) for o in outs]), labels[order]


@pytest.mark.parametrize("kind", ["knn", "rbf"])
@pytest.mark.parametrize("window", [1, 2, 5, 16, 64])
def test_fixed_point_lowers_the_energy_and_gives_distributions(stream, kind, window):
    features, probs, _ = stream
    for end in range(window, 200, max(window, 8)):
        f, p = features[end - window:end], probs[end - window:end].astype(np.float64)
        p /= p.sum(axis=1, keepdims=True)
        a = affinity(f, kind, k=5).astype(np.float64)
        z = solve(p, a)
        assert z.dtype == np.float32 and np.all(np.isfinite(z)) and np.all(z >= 0)
        np.testing.assert_allclose(z.sum(axis=1), 1.0, atol=1e-5)
        start = energy(p, p, a)
        assert energy(z, p, a) <= start + 1e-6 * max(abs(start), 1.0)  # float32 rounding, as the official code runs


def test_knn_affinity_has_k_neighbours_and_no_self_loops(stream):
    features, _, _ = stream
    a = affinity(features[:10], "knn", k=3)
    assert np.all(np.diag(a) == 0) and np.all(a.sum(axis=1) == 3)
    assert affinity(features[:1], "knn", k=3).tolist() == [[0.0]]


def test_rbf_on_one_frame_or_identical_frames_is_finite():
    one = np.ones((1, 8), np.float32)
    same = np.ones((4, 8), np.float32)
    for f in (one, same):
        a = affinity(f, "rbf", k=5)
        assert np.all(np.isfinite(a))
        p = np.full((len(f), 3), 1 / 3)
        assert np.all(np.isfinite(solve(p, a.astype(np.float64))))


def test_online_lame_corrects_every_frame_and_helps_on_correlated_labels(stream):
    features, probs, labels = stream
    lame = Lame(window=16, affinity="knn", k=5)
    corrected = np.stack([lame.update(f, p) for f, p in zip(features, probs)])
    assert corrected.shape == probs.shape
    assert len(lame.features) == 16
    assert (corrected.argmax(1) == labels).mean() >= (probs.argmax(1) == labels).mean()


def test_correlation_monitor_tells_runs_from_shuffled_labels():
    rng = np.random.default_rng(0)
    runs = np.repeat(rng.integers(0, 10, 50), 20)
    shuffled = rng.permutation(runs)
    verdicts = []
    for sequence in (runs, shuffled):
        monitor = CorrelationMonitor(classes=10)
        for label in sequence:
            monitor.update(int(label))
        verdicts.append(monitor.correlated)
    assert verdicts == [True, False]


def test_float32_solver_agrees_with_the_reference_iteration_in_float64(stream):
    """The paper's update z <- softmax(log p + A z) written out in float64, run to the same energy criterion."""
    features, probs, _ = stream
    for end in (16, 60, 130, 250):
        f, p = features[end - 16:end], probs[end - 16:end].astype(np.float64)
        a = affinity(f, "knn", k=5).astype(np.float64)
        log_p, z, previous = np.log(np.maximum(p, 1e-10)), p, energy(p, p, a)
        for _ in range(100):
            logits = log_p + a @ z
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            z /= z.sum(axis=1, keepdims=True)
            current = energy(z, p, a)
            if abs(previous - current) <= 1e-8 * abs(previous):
                break
            previous = current
        np.testing.assert_allclose(solve(p, a), z, atol=1e-5)
