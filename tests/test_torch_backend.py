"""The torch backend: the same adaptive model as the .onnx file, and its GPU -> CPU fallback.
CI has no GPU: the GPU run itself is bench/gpu_check.py, skipped here unless CUDA is present."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from agent.model.graph_session import GraphSession  # noqa: E402
from agent.model.sessions import open_session  # noqa: E402
from agent.preprocess import Preprocessor  # noqa: E402
from bench.corruptions import corrupt  # noqa: E402
from exporters.models import fashion_mnist as fm  # noqa: E402
from exporters.torch_session import TorchSession  # noqa: E402


@pytest.fixture(scope="module")
def stream():
    images, _ = fm.load_split("t10k")
    return np.concatenate([images[:40], corrupt(images[40:100], "contrast", 5, 0)])


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_torch_backend_runs_the_same_model_as_the_onnx_file(fmnist, stream, strength):
    ort = GraphSession(fmnist["fp32"], threads=1)
    pt = TorchSession(fmnist["fp32"], device="cpu")
    preprocess = Preprocessor(ort.info.preprocess)
    for image in stream:
        x = preprocess(image)
        a, b = ort.step(x, strength=strength), pt.step(x, strength=strength)
        assert np.argmax(a.logits) == np.argmax(b.logits)
        np.testing.assert_allclose(b.logits, a.logits, atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(b.shift, a.shift, rtol=1e-3, atol=1e-4)
    for layer, tensors in ort.state.items():
        for name, value in tensors.items():
            got = pt.state[layer][name]
            assert np.linalg.norm(got - value) <= 5e-3 * max(np.linalg.norm(value), 1e-12)


def test_unadapted_and_frozen_steps_leave_the_components_alone(fmnist, stream):
    pt = TorchSession(fmnist["fp32"], device="cpu")
    preprocess = Preprocessor(pt.info.preprocess)
    pt.step(preprocess(stream[50]))
    before = pt.state
    pt.step(preprocess(stream[51]), strength=0.0)
    pt.step(preprocess(stream[52]), update=False)
    after = pt.state
    assert all(np.array_equal(after[k][t], before[k][t]) for k in before for t in before[k])
    assert pt.frames == 1


def test_gpu_failure_mid_run_falls_back_to_cpu_with_the_state_of_the_last_good_frame(fmnist, stream):
    """No GPU on CI: a session marked as on the GPU whose forward raises a CUDA error stands in
    (a mock of the device failing); the fallback itself is the real code path."""
    session, twin = TorchSession(fmnist["fp32"], device="cpu"), TorchSession(fmnist["fp32"], device="cpu")
    preprocess = Preprocessor(session.info.preprocess)
    for image in stream[:45]:
        session.step(preprocess(image))
        twin.step(preprocess(image))
    session.on_gpu = True  # claims the GPU; the next forward dies like one
    real_forward = session.model.forward

    def dying(*args, **kwargs):
        real_forward(*args, **kwargs)  # the failed frame may have half-moved the components
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    session.model.forward = dying
    out = session.step(preprocess(stream[45]))
    expected = twin.step(preprocess(stream[45]))
    assert session.fallbacks == 1 and "switched to the CPU" in session.fallback_reason
    assert session.provider.startswith("torch/cpu")
    np.testing.assert_allclose(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for image in stream[46:]:
        np.testing.assert_allclose(session.step(preprocess(image)).logits, twin.step(preprocess(image)).logits,
                                   rtol=1e-5, atol=1e-5)


def test_open_session_keeps_onnxruntime_unless_torch_is_the_way_to_a_gpu(fmnist):
    assert isinstance(open_session(fmnist["int8"], device="cpu"), GraphSession)
    assert isinstance(open_session(fmnist["int8"], device="cpu", backend="torch"), TorchSession)
    cuda = open_session(fmnist["int8"], device="cuda")
    assert isinstance(cuda, TorchSession) == torch.cuda.is_available()


def test_the_torch_backend_refuses_a_folded_file_by_name_and_auto_keeps_it_on_onnxruntime(fmnist_folded):
    from agent.contract import ContractError
    from agent.model.folded_session import FoldedSession

    with pytest.raises(ContractError, match="folded-layout model; the torch backend runs graph-layout models only"):
        open_session(fmnist_folded["int8"], device="cpu", backend="torch")
    assert isinstance(open_session(fmnist_folded["int8"], device="cuda"), FoldedSession)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_check_script_passes_on_a_gpu():
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--frames", "200"], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
