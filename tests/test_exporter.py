"""The adaptive model exporter: real weights, real photos, the real exported graphs."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from helpers import quantized_weights

from agent import contract
from agent.contract import read_model_info
from agent.model.graph_session import GraphSession
from agent.preprocess import Preprocessor
from agent.samples import photo, photo_stream
from agent.state import StateError, initial_state, load_state, save_state
from exporters.cli import main as export_main
from exporters.models import efficientnet_lite as eff
from exporters.models import fashion_mnist as fm
from exporters.unmix import replace_batchnorm

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968)  # espresso, cup


def test_import_agent_does_not_import_torch():
    code = ("import sys, agent, agent.contract, agent.state, agent.preprocess, agent.model.sessions; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_agent_imports_nothing_from_the_exporter():
    """The import graph: agent/ reads the exporter's files and finds the torch backend by its entry point."""
    import ast

    offending = []
    for path in sorted((Path(__file__).resolve().parents[1] / "agent").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offending += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "exporters"]
    assert offending == []


def test_validating_a_config_loads_no_inference_engine():
    code = ("import sys, agent.config, agent.config_reference; "
            "sys.exit(sorted({'torch', 'onnxruntime'} & set(sys.modules)) or 0)")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("name, classes", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_efficientnet_weights_and_preprocessing_see_the_photo(name, classes):
    """TF 'same' padding and x/127.5-1 are right only if the real photos come out right."""
    model = eff.pretrained()
    image = Preprocessor(contract.Preprocess.from_json(json.dumps(eff.PREPROCESS)))(photo(name))
    with torch.no_grad():
        top = int(model(torch.from_numpy(image)).argmax())
    assert top in classes, eff.imagenet_labels()[top]


@pytest.mark.parametrize("kind", ["fp32", "int8"])
@pytest.mark.parametrize("name, classes", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_exported_model_on_source_statistics_sees_the_photo(effnet, kind, name, classes):
    session = GraphSession(effnet[kind])
    image = Preprocessor(session.info.preprocess)(photo(name))
    top = int(np.argmax(session.step(image, strength=0.0).logits))
    assert top in classes, session.info.labels[top]


def test_adapt_off_is_the_plain_batchnorm_model_and_keeps_the_state(effnet):
    session = GraphSession(effnet["fp32"])
    before = session.state_feeds
    image = Preprocessor(session.info.preprocess)(photo("astronaut"))
    logits = session.step(image, strength=0.0).logits
    with torch.no_grad():
        expected = eff.pretrained()(torch.from_numpy(image))[0].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    for name, value in session.state_feeds.items():
        np.testing.assert_array_equal(value, before[name])


def _parity(model_path, reference: torch.nn.Module, frames, seed=0):
    """Run the exported graph and the stateful torch reference side by side, frame by frame.

    Faithful: logits and components (normwise) within 1e-4. Robust: logits within 1e-3 and
    components within 5e-3, because its sharp soft assignments (temperature 0.07 on centred
    means) turn float32 rounding upstream into slightly different shares of a frame between two
    similar young components (deep EfficientNet layers reach ~1e-3 in the counts).
    """
    session = GraphSession(model_path, seed=seed)
    spec = session.info.adaptation
    logit_tolerance, component_tolerance = (1e-4, 1e-4) if spec.mode == "faithful" else (1e-3, 5e-3)
    options = spec.options if spec.mode == "robust" else {"momentum": spec.momentum}
    layers = replace_batchnorm(reference, initial_state(spec, session.info.source_stats, seed), mode=spec.mode,
                               temperature=spec.temperature, **options)
    preprocess = Preprocessor(session.info.preprocess)
    worst = {"logits": 0.0, "components": 0.0}
    same_top1 = 0
    for frame in frames:
        image = preprocess(frame)
        out = session.step(image)
        with torch.no_grad():
            expected = reference(torch.from_numpy(image))[0].numpy()
        np.testing.assert_allclose(out.logits, expected, rtol=1e-4, atol=logit_tolerance)
        worst["logits"] = max(worst["logits"], float(np.abs(out.logits - expected).max()))
        same_top1 += int(np.argmax(out.logits) == np.argmax(expected))
        for name, layer in layers.items():
            expected_state = layer.get_state()
            # a component that holds almost no frames has an ill-conditioned mean (a ratio of tiny
            # counts) that does not reach the output (weight n/(n+support)); compare the others
            used = expected_state["counts"][:, 0] >= 0.05 if "counts" in expected_state else slice(None)
            for tensor, value in expected_state.items():
                # normwise: the softmax at temperature 0.07 turns float32 rounding upstream into small
                # shifts of a soft assignment, which move single entries of a young component
                got, want = session.state[name][tensor][used], value[used]
                relative = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
                assert relative <= component_tolerance, f"{name}.{tensor}: relative error {relative:.2e}"
                worst["components"] = max(worst["components"], float(relative))
    return same_top1, worst


PARITY_PHOTOS = ("chelsea", "coffee", "rocket", "camera", "astronaut", "horse", "coins", "moon", "page")


@pytest.mark.parametrize("mode", ["faithful", "robust"])
def test_efficientnet_fp32_graph_matches_torch_reference_frame_by_frame(effnet, effnet_faithful, mode):
    frames = [f for _, f in photo_stream(6, names=PARITY_PHOTOS)]
    assert len(frames) >= 50
    path = effnet_faithful if mode == "faithful" else effnet["fp32"]
    assert GraphSession(path).info.adaptation.mode == mode
    same_top1, _ = _parity(path, eff.pretrained(), frames)
    assert same_top1 == len(frames)


@pytest.mark.parametrize("mode", ["faithful", "robust"])
def test_fashion_mnist_fp32_graph_matches_torch_reference_frame_by_frame(fmnist, fmnist_faithful, mode):
    images, _ = fm.load_split("t10k")
    path = fmnist_faithful if mode == "faithful" else fmnist["fp32"]
    same_top1, _ = _parity(path, fm.pretrained(), list(images[:200]), seed=3)
    assert same_top1 == 200


def test_metadata_describes_the_model(effnet):
    info = read_model_info(effnet["int8"])
    assert len(info.labels) == 1000 and info.labels[281].startswith("tabby")
    assert info.preprocess.size == (224, 224)
    assert info.preprocess.mean == (127.5, 127.5, 127.5) and info.preprocess.padding == "tf_same"
    spec = info.adaptation
    assert spec.mode == "robust" and spec.components == 16 and spec.temperature == 0.07
    assert spec.state_tensors == ("means", "vars", "counts")
    assert set(spec.options) == {"decay", "support", "prior", "seed_similarity", "instance"}
    assert len(spec.layers) == 49
    first = spec.layers[0]
    assert (first.name, first.channels, first.eps) == ("_bn0", 32, pytest.approx(1e-3))
    source_mean, _ = info.source_stats["_bn0"]
    np.testing.assert_allclose(source_mean, eff.pretrained()._bn0.running_mean.numpy())


def test_int8_is_smaller_has_the_same_interface_and_reports_agreement(effnet, fmnist):
    for paths, ratio in ((effnet, 0.4), (fmnist, 0.8)):  # the small model's graph weighs more than its weights
        fp32, int8 = onnx.load(str(paths["fp32"])), onnx.load(str(paths["int8"]))
        assert paths["int8"].stat().st_size < ratio * paths["fp32"].stat().st_size

        def signature(m):
            return [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in (*m.graph.input,
                                                                                           *m.graph.output)]
        assert signature(int8) == signature(fp32)
        consumers = {i: n.op_type for n in int8.graph.node for i in n.input}
        quantized = {n.op_type for n in int8.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                     and consumers.get(n.input[0]) and any(p.output[0] == n.input[1] and p.op_type == "DequantizeLinear"
                                                         for p in int8.graph.node)}
        assert quantized == {"Conv", "Gemm"}
        # the cosine-similarity MatMuls over the state stay float: nothing dequantized feeds them
        dequantized = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
        matmuls = [n for n in int8.graph.node if n.op_type == "MatMul"]
        assert len(matmuls) == len(read_model_info(paths["int8"]).adaptation.layers)
        assert not any(i in dequantized for n in matmuls for i in n.input)
        report = read_model_info(paths["int8"]).calibration
        assert report["heldout_frames"] > 0 and 0.0 <= report["top1_agreement_vs_fp32"] <= 1.0
        # depthwise convolutions keep float weights: no DequantizeLinear feeds their weight input
        depthwise = [n for n in int8.graph.node if n.op_type == "Conv"
                     and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        assert report["float_depthwise_convolutions"] == len(depthwise)
        assert not any(n.input[1] in dequantized for n in depthwise)
    assert read_model_info(effnet["int8"]).calibration["float_depthwise_convolutions"] == 16
    assert read_model_info(fmnist["int8"]).calibration["top1_agreement_vs_fp32"] >= 0.95


def test_dense_weights_have_seven_bits_so_u8s8_kernels_cannot_saturate(effnet):
    weights = quantized_weights(onnx.load(str(effnet["int8"])))
    assert len(weights) == 34  # EfficientNet-Lite0: 33 dense convolutions and the classifier
    for node, w in weights:
        assert w.dtype == np.int8 and -64 <= w.min() and w.max() <= 64, node.name
        assert np.abs(w).max() >= 60, node.name  # the 7-bit range used, not a smaller one
    assert read_model_info(effnet["int8"]).calibration["seven_bit_weights"] == 34


def test_state_file_round_trip_and_seeded_init(effnet, effnet_faithful, tmp_path):
    info = read_model_info(effnet_faithful)
    assert info.adaptation.mode == "faithful" and info.adaptation.momentum == pytest.approx(1 - 0.9 ** (1 / 64))
    a = initial_state(info.adaptation, info.source_stats, seed=7)
    b = initial_state(info.adaptation, info.source_stats, seed=7)
    c = initial_state(info.adaptation, info.source_stats, seed=8)
    np.testing.assert_array_equal(a["_bn0"]["means"], b["_bn0"]["means"])
    assert not np.array_equal(a["_bn0"]["means"], c["_bn0"]["means"])
    assert a["_bn0"]["means"].shape == (16, 32)
    save_state(tmp_path / "s.npz", a, info.adaptation, frames=12)
    loaded, meta = load_state(tmp_path / "s.npz", info.adaptation)
    assert meta["frames"] == 12 and meta["mode"] == "faithful"
    np.testing.assert_array_equal(loaded["_blocks.3._bn1"]["vars"], a["_blocks.3._bn1"]["vars"])
    robust = read_model_info(effnet["fp32"])
    exported, _ = load_state(effnet["state"], robust.adaptation)
    np.testing.assert_array_equal(exported["_bn0"]["counts"], np.zeros((16, 1), np.float32))
    np.testing.assert_array_equal(exported["_bn0"]["means"][3], robust.source_stats["_bn0"][0])
    a["_bn0"]["means"] = a["_bn0"]["means"][:, :5]
    save_state(tmp_path / "bad.npz", a, info.adaptation)
    with pytest.raises(StateError, match=r"_bn0/means has shape \(16, 5\)"):
        load_state(tmp_path / "bad.npz", info.adaptation)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StateError, match="unreadable"):
        load_state(tmp_path / "junk.npz", info.adaptation)


def _custom(tmp_path, *args):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    calib = tmp_path / "calib"
    calib.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        cv2.imwrite(str(calib / f"{i}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    base = ["custom", "--labels", str(labels), "--input-size", "32", "32", "--calib", str(calib)]
    return export_main(base + list(args))


def test_custom_model_exports(tmp_path):
    out = tmp_path / "tiny.onnx"
    assert _custom(tmp_path, "--model", "tiny_models:with_batchnorm", "--out", str(out)) == 0
    info = read_model_info(out)
    assert [layer.name for layer in info.adaptation.layers] == ["1", "4"]
    assert info.labels == ("a", "b", "c")


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny_models:without_batchnorm"], "no BatchNorm2d layer"),
    (["--model", "tiny_models:with_batchnorm", "--weights", "/nonexistent/w.pt"], "weights file .* not found"),
    (["--model", "tiny_models:with_batchnorm", "--weights", "WRONG"], "does not match the model: missing keys"),
    (["--model", "tiny_models:with_batchnorm", "--calib", "/nonexistent/frames"], "neither a folder"),
    (["--model", "tiny_models:with_batchnorm", "--calib", "EMPTY"], "holds no images"),
    (["--model", "tiny_models:nope"], "has no attribute 'nope'"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, capsys, args, message):
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    (tmp_path / "empty").mkdir()
    args = [str(wrong) if a == "WRONG" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    assert _custom(tmp_path, *args, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("tta-export: error:")
    assert re.search(message, err), err
    assert list(out.parent.iterdir()) == []


def test_unwritable_output_fails_before_work(tmp_path, capsys):
    assert _custom(tmp_path, "--model", "tiny_models:with_batchnorm", "--out", "/proc/tta-export/m.onnx") == 2
    assert "output folder /proc/tta-export cannot be made" in capsys.readouterr().err
