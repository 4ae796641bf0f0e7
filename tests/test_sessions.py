"""Every kind of adaptive session held to one contract (agent.model.adaptive.AdaptiveModel), on the real
exported Fashion-MNIST models: the graph layout, the folded layout with each learner, and the
exporter's torch session. The streams shift their contrast so that adaptation has work to do."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import FailingGpuSession

from agent.model.adaptive import AdaptiveModel
from agent.model.folded_session import FoldedSession
from agent.model.graph_session import GraphSession
from agent.model.sessions import open_session
from agent.preprocess import Preprocessor
from agent.state import initial_state
from exporters.models import fashion_mnist as fm

KINDS = ("graph", "folded anchor", "folded unmix", "torch")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    images = fm.load_split("t10k")[0][:48]
    return [(x * 0.3).astype(np.uint8) for x in images]  # low contrast: every learner moves


def _open(kind: str, fmnist: dict, fmnist_folded: dict) -> AdaptiveModel:
    if kind == "graph":
        return open_session(fmnist["int8"], "cpu", "onnxruntime")
    if kind == "torch":
        pytest.importorskip("torch")
        return open_session(fmnist["int8"], "cpu", "torch")
    return open_session(fmnist_folded["int8"], "cpu", "onnxruntime", method=kind.split()[1])


def _run(session: AdaptiveModel, frames, strength: float = 1.0, update: bool = True) -> list[np.ndarray]:
    """Measured unadapted frames first (the camera anchor's reference), then the frames at `strength`."""
    preprocess = Preprocessor(session.info.preprocess)
    for x in frames[:8]:
        session.step(preprocess(x * 3), strength=0.0, measure=True)
    return [session.step(preprocess(x), strength=strength, update=update).logits for x in frames[8:]]


def _equal(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[layer][name], b[layer][name]) for layer in a for name in a[layer])


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def test_every_session_is_an_adaptive_model(kind, fmnist, fmnist_folded):
    session = _open(kind, fmnist, fmnist_folded)
    assert isinstance(session, AdaptiveModel)
    assert session.fallbacks == 0 and session.fallback_reason is None and session.frames == 0
    assert session.provider.startswith("torch/cpu" if kind == "torch" else "CPUExecutionProvider")


def test_frozen_and_off_leave_the_state_alone_and_on_moves_it(kind, fmnist, fmnist_folded, frames):
    session = _open(kind, fmnist, fmnist_folded)
    _run(session, frames[:8])  # the anchor learns its reference here
    learned = session.state
    preprocess = Preprocessor(session.info.preprocess)
    for strength in (0.0, 1.0):  # off, frozen: update=False
        for x in frames[8:20]:
            session.step(preprocess(x), strength=strength, update=False)
        assert _equal(session.state, learned), strength
    for x in frames[8:20]:
        session.step(preprocess(x), strength=1.0)
    assert not _equal(session.state, learned)


def test_save_and_load_resume_exactly(kind, fmnist, fmnist_folded, frames, tmp_path):
    a = _open(kind, fmnist, fmnist_folded)
    _run(a, frames[:24])
    a.save(tmp_path / "state.npz")
    b = _open(kind, fmnist, fmnist_folded)
    b.load(tmp_path / "state.npz")
    a.load(tmp_path / "state.npz")  # a checkpoint holds the state, not the last frame's instance term
    assert a.frames == b.frames and _equal(a.state, b.state)
    preprocess = Preprocessor(a.info.preprocess)
    for x in frames[24:]:
        np.testing.assert_array_equal(a.step(preprocess(x)).logits, b.step(preprocess(x)).logits)


def test_reset_restores_the_source(kind, fmnist, fmnist_folded, frames):
    session = _open(kind, fmnist, fmnist_folded)
    _run(session, frames)
    assert not _equal(session.state, initial_state(session.info.adaptation, session.info.source_stats, 0))
    session.reset()
    assert session.frames == 0
    assert _equal(session.state, initial_state(session.info.adaptation, session.info.source_stats, 0))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "torch"])  # torch's own: test_torch_backend.py
def test_a_gpu_failure_keeps_the_state_on_the_cpu(kind, fmnist, fmnist_folded, frames):
    """No GPU here: the accelerator's session is a stand-in that dies (helpers.FailingGpuSession)."""
    session, twin = (_open(kind, fmnist, fmnist_folded) for _ in range(2))
    _run(session, frames[:16])
    _run(twin, frames[:16])
    assert isinstance(session, (GraphSession, FoldedSession))
    session.session = FailingGpuSession(session.session)
    preprocess = Preprocessor(session.info.preprocess)
    for x in frames[16:]:  # measured frames run the graph: the first dies, reruns on the CPU
        np.testing.assert_array_equal(session.step(preprocess(x)).logits, twin.step(preprocess(x)).logits)
    assert session.fallbacks == 1 and session.provider == "CPUExecutionProvider"
    assert _equal(session.state, twin.state)


def test_each_layout_says_which_methods_it_runs(fmnist, fmnist_folded):
    """`auto` is the layout's first method; a method of the other layout names the export that runs it."""
    from agent.contract import ContractError, read_model_info
    from agent.model.sessions import resolve_method

    graph, folded = read_model_info(fmnist["int8"]), read_model_info(fmnist_folded["int8"])
    assert (resolve_method("auto", graph), resolve_method("auto", folded)) == ("unmix", "anchor")
    assert resolve_method("unmix", folded) == "unmix"
    with pytest.raises(ContractError, match=r"anchor needs a folded-layout model .* \(tta-export --layout folded"):
        open_session(fmnist["int8"], "cpu", "onnxruntime", method="anchor")
    with pytest.raises(ValueError, match="one of anchor, unmix, got 'tent'"):
        resolve_method("tent", folded)
