"""The onnxruntime session: providers, GPU->CPU fallback, adaptation controls, state files."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import FailingGpuSession

from agent.contract import ContractError
from agent.model.graph_session import GraphSession
from agent.model.providers import CPU, choose_providers
from agent.preprocess import FrameError, Preprocessor
from exporters.models import fashion_mnist as fm


@pytest.fixture(scope="module")
def images():
    return fm.load_split("t10k")[0][:20]


def test_cuda_requested_without_a_gpu_runs_on_the_cpu_and_says_why(fmnist):
    for device in ("cuda", "auto"):
        session = GraphSession(fmnist["int8"], device=device)
        assert session.provider == CPU
        assert "no GPU provider" in session.provider_reason


def test_provider_choice_prefers_gpu_providers_when_offered():
    choice = choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choice.providers == ["CUDAExecutionProvider", CPU]
    assert choose_providers("cpu", ["CUDAExecutionProvider", CPU]).providers == [CPU]
    with pytest.raises(ValueError, match="device must be one of"):
        choose_providers("tpu")


def test_gpu_failure_mid_run_falls_back_to_cpu_with_the_same_state(fmnist, images):
    session = GraphSession(fmnist["int8"])
    twin = GraphSession(fmnist["int8"])
    preprocess = Preprocessor(session.info.preprocess)
    for image in images[:5]:
        session.step(preprocess(image))
        twin.step(preprocess(image))
    session.session = FailingGpuSession(session.session)
    out = session.step(preprocess(images[5]))  # fails on the "GPU", is rerun on the CPU
    expected = twin.step(preprocess(images[5]))
    assert session.provider == CPU and session.fallbacks == 1
    assert "CUDAExecutionProvider failed" in session.fallback_reason
    assert "illegal memory access" in session.fallback_reason
    np.testing.assert_array_equal(out.logits, expected.logits)
    assert session.frames == twin.frames == 6
    for layer, tensors in twin.state.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(session.state[layer][name], value)


def test_frozen_and_off_leave_the_components_alone(fmnist, images):
    session = GraphSession(fmnist["int8"])
    image = Preprocessor(session.info.preprocess)(images[0])
    before = session.state_feeds
    frozen = session.step(image, update=False)
    off = session.step(image, strength=0.0)
    for name, value in session.state_feeds.items():
        np.testing.assert_array_equal(value, before[name])
    moved = session.step(image)
    assert not np.array_equal(frozen.logits, off.logits)
    np.testing.assert_array_equal(moved.logits, frozen.logits)  # same components in, same answer
    assert any(not np.array_equal(v, before[k]) for k, v in session.state_feeds.items())
    session.reset()
    for name, value in session.state_feeds.items():
        np.testing.assert_array_equal(value, before[name])


def test_state_save_and_resume_continue_the_same_stream(fmnist, images, tmp_path):
    a = GraphSession(fmnist["int8"])
    preprocess = Preprocessor(a.info.preprocess)
    for image in images[:10]:
        a.step(preprocess(image))
    a.save(tmp_path / "state.npz")
    b = GraphSession(fmnist["int8"])
    b.load(tmp_path / "state.npz")
    assert b.frames == 10
    for image in images[10:]:
        np.testing.assert_array_equal(a.step(preprocess(image)).logits, b.step(preprocess(image)).logits)


def test_a_model_without_the_contract_is_refused_by_name(tmp_path, fmnist):
    import onnx

    plain = onnx.load(str(fmnist["fp32"]))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ContractError, match="not an adaptive tta-agent model: metadata tta.format_version"):
        GraphSession(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ContractError, match="not a readable ONNX file"):
        GraphSession(tmp_path / "junk.onnx")
    with pytest.raises(ContractError, match="does not exist"):
        GraphSession(tmp_path / "missing.onnx")


@pytest.mark.parametrize("frame, reason", [
    (np.zeros((0, 0, 3), np.uint8), "empty frame"),
    (np.zeros((20, 20, 3), np.float32), "dtype float32"),
    (np.zeros((20, 20, 5), np.uint8), "is not an image"),
    (np.zeros((1, 20), np.uint8), "too small"),
])
def test_bad_frames_are_rejected_with_a_reason(fmnist, frame, reason):
    preprocess = Preprocessor(GraphSession(fmnist["int8"]).info.preprocess)
    with pytest.raises(FrameError, match=reason):
        preprocess(frame)


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (97, 61, 3), (480, 640, 4)])
def test_any_frame_size_and_channel_count_is_converted(fmnist, shape):
    preprocess = Preprocessor(GraphSession(fmnist["int8"]).info.preprocess)
    frame = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    assert preprocess(frame).shape == (1, 1, 28, 28)
