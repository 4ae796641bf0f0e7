"""The folded layout: BatchNorm folded into INT8 convolutions, UnMix-TNS in the agent (numpy)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers import FailingGpuSession, quantized_weights
from onnx import numpy_helper
from torch import nn

from agent import contract
from agent.contract import AdaptationSpec, LayerSpec, read_model_info
from agent.model.bakes import BakedNormalisation
from agent.model.folded_session import FoldedSession
from agent.model.mixture import RobustMixture
from agent.model.sessions import open_session
from agent.onnxruntime_quiet import ort
from agent.preprocess import Preprocessor
from agent.state import initial_state
from exporters.export import ExportError, adaptation_spec
from exporters.models import fashion_mnist as fm
from exporters.unmix import ROBUST_OPTIONS, RobustUnMixTNS2d


@pytest.fixture(scope="module")
def folded(fmnist_folded) -> dict:
    return fmnist_folded


@pytest.fixture(scope="module")
def test_images():
    images, labels = fm.load_split("t10k")
    preprocess = Preprocessor(contract.Preprocess.from_json(json.dumps(fm.PREPROCESS)))
    return [preprocess(x) for x in images[:400]], labels[:400]


def _spec(channels: list[int]) -> tuple[AdaptationSpec, dict, list[nn.BatchNorm2d]]:
    rng = np.random.default_rng(0)
    layers, stats, bns = [], {}, []
    for i, c in enumerate(channels):
        bn = nn.BatchNorm2d(c, eps=1e-3)
        bn.running_mean.copy_(torch.from_numpy(rng.normal(size=c).astype(np.float32)))
        bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, size=c).astype(np.float32)))
        layers.append(LayerSpec(f"l{i}", c, 1e-3, f"l{i}.running_mean", f"l{i}.running_var"))
        stats[f"l{i}"] = (bn.running_mean.numpy().copy(), bn.running_var.numpy().copy())
        bns.append(bn)
    spec = AdaptationSpec("robust", 4, 0.0, 0.07, tuple(layers), ("means", "vars", "counts"), dict(ROBUST_OPTIONS),
                          "folded")
    return spec, stats, bns


def test_numpy_mixture_is_the_torch_reference_for_every_layer_at_once():
    """Same frame statistics in, same components and normalisation statistics out, at several strengths."""
    spec, stats, bns = _spec([3, 7, 5])
    state = initial_state(spec, stats)
    mixture = RobustMixture(spec, stats)
    mixture.set_state(state)
    torch_layers = [RobustUnMixTNS2d(bn, state[f"l{i}"]["means"], state[f"l{i}"]["vars"], state[f"l{i}"]["counts"])
                    for i, bn in enumerate(bns)]
    rng = np.random.default_rng(1)
    for frame in range(60):
        strength = [1.0, 0.4, 0.0][frame % 3]
        shift = 2.0 if frame > 30 else 0.0  # a second regime seeds another component
        mu = [(stats[f"l{i}"][0] + shift + rng.normal(scale=0.3, size=bn.num_features)).astype(np.float32)
              for i, bn in enumerate(bns)]
        var = [(stats[f"l{i}"][1] * rng.uniform(0.5, 1.5, size=bn.num_features)).astype(np.float32)
               for i, bn in enumerate(bns)]
        expected = [layer.mix_and_update(torch.from_numpy(m), torch.from_numpy(v), strength)
                    for layer, m, v in zip(torch_layers, mu, var)]
        mixture.update(np.concatenate(mu), np.concatenate(var), strength)
        mean, variance = mixture.statistics(np.concatenate(mu), np.concatenate(var))
        np.testing.assert_allclose(mean, np.concatenate([e[0].numpy() for e in expected]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(variance, np.concatenate([e[1].numpy() for e in expected]), rtol=1e-4, atol=1e-5)
    for i, layer in enumerate(torch_layers):
        for name, value in mixture.state()[f"l{i}"].items():
            # the softmax at temperature 0.07 amplifies float32 rounding of the cosines, and the counts add it up
            # over 60 frames (2e-4 apart with AVX-512 kernels); every frame's statistics above agree to 1e-4
            np.testing.assert_allclose(value, layer.get_state()[name], rtol=1e-3, atol=1e-3)


def test_the_folded_file_carries_the_contract_and_opens_as_a_folded_session(folded):
    info = read_model_info(folded["int8"])
    assert info.adaptation.layout == "folded" and info.shift_reference is not None
    model = onnx.load(str(folded["int8"]))
    ops = {n.op_type for n in model.graph.node}
    assert "QLinearConv" in ops and "BatchNormalization" not in ops  # BatchNorm really folded into INT8 convs
    assert {i.name for i in model.graph.input} == {contract.IMAGE, contract.NORM_MEAN, contract.NORM_VAR}
    assert isinstance(open_session(folded["int8"], "cpu", "onnxruntime", method="unmix"), FoldedSession)


def test_int8_agrees_with_fp32_as_the_exporter_reports(folded):
    report = read_model_info(folded["int8"]).calibration
    assert report["layout"] == "folded"
    assert report["top1_agreement_vs_fp32_source_stats"] >= 0.99
    assert report["top1_agreement_vs_fp32"] >= 0.98


def test_dense_weights_have_seven_bits_so_u8s8_kernels_cannot_saturate(folded):
    model = onnx.load(str(folded["int8"]))
    weights = {node.input[3]: w for node, w in quantized_weights(model) if node.op_type == "QLinearConv"}
    assert all(-64 <= w.min() and w.max() <= 64 and np.abs(w).max() >= 60 for w in weights.values())
    gemms = sum(n.op_type == "Gemm" for n in model.graph.node)  # the classifier stays QDQ
    assert read_model_info(folded["int8"]).calibration["seven_bit_weights"] == len(weights) + gemms


def test_fp32_graph_measures_the_sampled_batchnorm_inputs_and_normalises_like_torch(folded, test_images):
    """On source statistics the graph is the torch model; its statistics are those of every r-th
    position of each BatchNorm's input, as torch computes them."""
    session = open_session(folded["fp32"], "cpu", "onnxruntime", method="unmix")
    model = fm.pretrained().eval()
    inputs = {}
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0]))
    image = test_images[0][3]
    out = session.step(image, strength=0.0, measure=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(image))
    np.testing.assert_allclose(out.logits, logits[0].numpy(), atol=1e-4)
    stats = np.stack(session.last_statistics)
    offset = 0
    for layer in session.info.adaptation.layers:
        x = inputs[layer.name][0]
        r = max(1, x.shape[-1] // 7)
        sample = x[:, ::r, ::r]
        np.testing.assert_allclose(stats[0, offset:offset + layer.channels], sample.mean((1, 2)).numpy(),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[1, offset:offset + layer.channels],
                                   sample.var((1, 2), unbiased=False).numpy(), rtol=1e-3, atol=1e-5)
        offset += layer.channels


def test_one_update_standing_for_several_frames_forgets_for_all_of_them():
    spec, stats, _ = _spec([3, 5])
    mixture = RobustMixture(spec, stats)
    mixture.set_state(initial_state(spec, stats))
    rng = np.random.default_rng(2)
    for frames in (1, 1, 4, 16):
        before = mixture.counts.sum(0)
        mu = np.concatenate([stats[f"l{i}"][0] + rng.normal(size=c) for i, c in enumerate((3, 5))])
        mixture.update(mu.astype(np.float32), np.concatenate([stats["l0"][1], stats["l1"][1]]), frames=frames)
        # assignments sum to 1 per layer; the rest is the old support decayed for `frames` frames
        np.testing.assert_allclose(mixture.counts.sum(0), before * (1 - spec.options["decay"]) ** frames + 1,
                                   rtol=1e-5)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_baked_session_normalises_as_the_graph_does_with_the_same_statistics(folded, test_images, precision):
    """A bake's constants reach the network whichever way it is built (added initializers on the
    optimised INT8 graph, written into the FP32 template for the fusions to see): the baked answer
    equals the graph's for the same statistics and differs from the source statistics' answer."""
    session = open_session(folded[precision], "cpu", "onnxruntime", method="unmix")
    source = (session.learner.source_mean, session.learner.source_var)
    baker = BakedNormalisation(folded[precision], source, ort.SessionOptions, ["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    mean = (source[0] + 0.5 * np.sqrt(source[1]) * rng.standard_normal(source[0].shape)).astype(np.float32)
    var = (source[1] * rng.uniform(0.5, 2.0, source[1].shape)).astype(np.float32)
    baked, at_source = baker.session(mean, var), baker.session(*source)
    assert [o.name for o in baked.get_outputs()] == [contract.LOGITS, contract.FEATURES]
    # INT8 bakes go through the once-optimised graph; FP32's fusions consume the BatchNorm statistics
    assert baker.optimised() == (precision == "int8")
    for image in test_images[0][:5]:
        graph = session.session.run([contract.LOGITS], {
            contract.IMAGE: image, contract.NORM_MEAN: mean, contract.NORM_VAR: var})[0]
        got = baked.run([contract.LOGITS], {contract.IMAGE: image})[0]
        np.testing.assert_allclose(got, graph, atol=1e-4)
        assert np.abs(got - at_source.run([contract.LOGITS], {contract.IMAGE: image})[0]).max() > 1e-2


def test_statistics_every_n_frames_and_the_frames_between_answer_from_a_bake(folded, test_images):
    """statistics_every=4: adapted frames 4, 8, ... run the graph, move the components and report their
    shift; the frames between answer from a bake of the normalisation they need, rebuilt once it has moved
    (always, at divergence 0): every answer is the graph's with the normalisation before the frame."""
    images = test_images[0]
    session = open_session(folded["int8"], "cpu", "onnxruntime", method="unmix",
                           statistics_every=4, rebake_divergence=0.0)
    built = []
    for i, image in enumerate(images[:16]):
        before = session.state[session.info.layer_names[0]]["counts"]
        mean, var = session.normalisation
        out = session.step(image, strength=1.0)
        measured = (i + 1) % 4 == 0
        after = session.state[session.info.layer_names[0]]["counts"]
        assert np.array_equal(before, after) != measured, i
        assert (out.shift is not None) == measured, i
        if measured:
            np.testing.assert_array_equal(out.shift, session.learner.shift(*session.last_statistics))
        else:
            assert session.baked_statistics[0] is mean, i
        graph = session.session.run([contract.LOGITS], {contract.IMAGE: image, contract.NORM_MEAN: mean,
                                                        contract.NORM_VAR: var})[0][0]
        np.testing.assert_allclose(out.logits, graph, atol=1e-4)
        built.append(session.bakes)
    assert built == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]  # after each measurement, once
    assert session.frames == 16
    # an unadapted pass beside the adapted frames runs the graph at the source statistics, building nothing
    beside = session.step(images[16], strength=0.0, update=False)
    assert beside.shift is None and session.bakes == 4
    every_frame = open_session(folded["int8"], "cpu", "onnxruntime", method="unmix", statistics_every=1)
    np.testing.assert_allclose(beside.logits, every_frame.step(images[16], strength=0.0).logits, atol=1e-4)
    np.testing.assert_allclose(session.step(images[17], strength=0.0, measure=True).shift,
                               every_frame.step(images[17], strength=0.0).shift, rtol=1e-4, atol=1e-6)
    session.step(images[18], strength=0.0)  # unadapted frames in turn: the bake goes back to the source
    assert session.bakes == 5 and session.baked_statistics[0] is session.learner.source_mean
    session.reset()
    assert session.last_statistics is None and session.frames == 0


def test_a_bake_that_fails_to_build_leaves_its_frame_to_the_graph(folded, test_images, caplog):
    images = test_images[0][:12]
    session, twin = (open_session(folded["int8"], "cpu", "onnxruntime", method="unmix", statistics_every=4,
                                  rebake_divergence=0.0) for _ in range(2))
    bake, calls = session.baker.session, []

    def failing_once(mean, var):
        calls.append(1)
        if len(calls) == 2:  # the rebuild after the measurement at frame 4
            raise RuntimeError("out of memory")
        return bake(mean, var)
    session.baker.session = failing_once
    for image in images:
        np.testing.assert_allclose(session.step(image).logits, twin.step(image).logits, atol=1e-4)
    assert len(calls) == 4 and session.bakes == twin.bakes == 3  # the failed one built at frame 6 instead of 5
    assert "building a baked session failed (RuntimeError: out of memory)" in caplog.text


def test_a_folded_session_failing_on_the_gpu_falls_back_to_the_cpu_with_the_same_components(folded, test_images):
    """The graph and the bakes run on the accelerator; when the graph dies in a measurement, the session
    reopens on the CPU, bakes the same statistics again there, runs the measurement again and carries
    on as its CPU twin."""
    images = test_images[0]
    session, twin = (open_session(folded["int8"], "cpu", "onnxruntime", method="unmix", statistics_every=4,
                                  rebake_divergence=0.0) for _ in range(2))
    for image in images[:7]:  # frames 4 measured; 5-7 run the bake it rebuilt
        session.step(image)
        twin.step(image)
    session.session = FailingGpuSession(session.session)  # dies at the next measurement (frame 8)
    out, expected = session.step(images[7]), twin.step(images[7])
    assert session.provider == "CPUExecutionProvider" and session.fallbacks == 1
    np.testing.assert_array_equal(out.logits, expected.logits)
    for image in images[8:12]:
        np.testing.assert_array_equal(session.step(image).logits, twin.step(image).logits)
    assert session.frames == twin.frames == 12
    for layer, tensors in twin.state.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(session.state[layer][name], value)
    assert session.bakes == twin.bakes


def test_int8_statistics_and_shift_follow_fp32(folded, test_images):
    fp32, int8 = (open_session(folded[k], "cpu", "onnxruntime", method="unmix") for k in ("fp32", "int8"))
    for image in test_images[0][:20]:
        a, b = fp32.step(image, strength=0.0, measure=True), int8.step(image, strength=0.0, measure=True)
        np.testing.assert_allclose(b.shift, a.shift, rtol=0.1, atol=0.02)


def test_a_frame_is_normalised_with_the_components_after_the_previous_frame(folded, test_images):
    session = open_session(folded["fp32"], "cpu", "onnxruntime", method="unmix", statistics_every=1)
    reference = open_session(folded["fp32"], "cpu", "onnxruntime", method="unmix", statistics_every=1)
    images = test_images[0]
    first = session.step(images[0], strength=1.0)
    np.testing.assert_allclose(first.logits, reference.step(images[0], strength=0.0).logits, atol=1e-5)
    assert session.frames == 1 and np.any(session.state[session.info.layer_names[0]]["counts"] > 0)
    # the second frame's statistics: the mixture after frame 1 with frame 1 as the instance term
    mean, var = session.learner.statistics(*session.last_statistics)
    graph = session.session.run([contract.LOGITS], {contract.IMAGE: images[1], contract.NORM_MEAN: mean,
                                                    contract.NORM_VAR: var})[0][0]
    np.testing.assert_allclose(session.step(images[1], strength=1.0).logits, graph, rtol=1e-6)


def test_a_gate_shadow_pass_is_the_instance_term_of_the_next_adapted_normalisation(folded, test_images):
    """The normalisation a measurement moved to is kept for the next one; an unadapted measured frame
    (the gate's shadow pass) in between replaces the instance term, so the next adapted frame is
    normalised with the components and the shadow's statistics, not with what was kept."""
    images = test_images[0]
    session = open_session(folded["int8"], "cpu", "onnxruntime", method="unmix", statistics_every=4,
                           rebake_divergence=0.0)
    for image in images[:4]:
        session.step(image, strength=1.0)
    kept = session.normalisation
    session.step(images[200], strength=0.0, measure=True)
    mean, var = session.learner.statistics(*session.last_statistics)
    assert np.abs(mean - kept[0]).max() > 1e-3
    graph = session.session.run([contract.LOGITS], {contract.IMAGE: images[5], contract.NORM_MEAN: mean,
                                                    contract.NORM_VAR: var})[0][0]
    np.testing.assert_allclose(session.step(images[5], strength=1.0, measure=True).logits, graph, atol=1e-4)


def test_adaptation_helps_on_a_shifted_stream_and_checkpoints_resume(folded, test_images, tmp_path):
    """Contrast-reduced Fashion-MNIST: the folded INT8 model adapted beats it unadapted; a saved and
    fresh session loading the checkpoint continues exactly as the saving session does from it (a
    checkpoint holds the components, not the previous frame's instance term)."""
    images, labels = test_images
    shifted = [(x * 0.3).astype(np.float32) for x in images]  # contrast 0.3 around the normalised mean 0
    adapted, plain = (open_session(folded["int8"], "cpu", "onnxruntime", method="unmix") for _ in range(2))
    right = {"adapted": 0, "plain": 0}
    for x, y in zip(shifted, labels):
        right["adapted"] += int(np.argmax(adapted.step(x).logits) == y)
        right["plain"] += int(np.argmax(plain.step(x, strength=0.0).logits) == y)
    assert right["adapted"] > right["plain"] + 5, right
    adapted.save(tmp_path / "state.npz")
    resumed = open_session(folded["int8"], "cpu", "onnxruntime", method="unmix")
    resumed.load(tmp_path / "state.npz")
    adapted.load(tmp_path / "state.npz")
    assert resumed.frames == adapted.frames == len(shifted)
    for x in shifted[:5]:
        np.testing.assert_array_equal(resumed.step(x).logits, adapted.step(x).logits)


def test_faithful_mode_is_refused_in_the_folded_layout():
    with pytest.raises(ExportError, match="graph layout"):
        adaptation_spec(fm.pretrained(), mode="faithful", layout="folded")


def test_a_folded_file_without_its_statistics_output_is_refused_by_name(folded, tmp_path):
    model = onnx.load(str(folded["int8"]))
    kept = [o for o in model.graph.output if o.name != contract.STATS]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(contract.ContractError, match="stats"):
        read_model_info(tmp_path / "broken.onnx")


def test_source_statistics_of_a_type_the_agent_does_not_read_are_refused_by_layer(folded, tmp_path):
    model = onnx.load(str(folded["int8"]))
    layer = read_model_info(folded["int8"]).adaptation.layers[0]
    source = next(t for t in model.graph.initializer if t.name == layer.source_mean)
    source.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(source).astype(np.float16), source.name))
    onnx.save(model, str(tmp_path / "half.onnx"))
    with pytest.raises(contract.ContractError, match=f"source statistics of layer {layer.name}: .*FLOAT16"):
        read_model_info(tmp_path / "half.onnx")


def test_a_folded_camera_reads_its_file_and_bakes_without_the_onnx_package(folded):
    """The daemon parses the file, splits out the bake and builds bakes with protobuf alone
    (agent/onnx_protobuf.py): onnx's operator library is not loaded."""
    code = ("import sys, numpy as np; from agent.model.sessions import open_session; "
            f"s = open_session({str(folded['int8'])!r}, 'cpu', 'onnxruntime', method='unmix', statistics_every=2, "
            "rebake_divergence=0.0); "
            "[s.step(np.random.default_rng(i).random((1, 1, 28, 28), dtype=np.float32)) for i in range(4)]; "
            "assert s.bakes == 2, s.bakes; "
            "sys.exit(sorted(m for m in sys.modules if m == 'onnx' or m.startswith('onnx.onnx_cpp2py')) or 0)")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr + run.stdout


@pytest.mark.parametrize("values", [np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
                                    np.array([-3, 0, 7], np.int64), np.array([[1, 255]], np.uint8),
                                    np.array([-128, 127], np.int8), np.array([True, False])])
def test_the_protobuf_reader_reads_and_writes_tensors_as_onnx_does(values):
    from agent import onnx_protobuf as pb

    written = pb.from_array(values, "t")
    assert written.SerializeToString() == numpy_helper.from_array(values, "t").SerializeToString()
    for tensor in (written, onnx.helper.make_tensor("t", written.data_type, values.shape, values.ravel().tolist())):
        read = pb.to_array(tensor)  # raw bytes, then the typed fields a hand-built tensor uses
        assert read.dtype == values.dtype and np.array_equal(read, values)
