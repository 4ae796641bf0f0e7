"""INT8 (QDQ, per-channel weights) quantization of an adaptive model with onnxruntime.quantization.

Graph layout: only convolutions and the classifier are quantized; every normalization and mixing op,
and the cosine-similarity MatMuls that take state inputs, stay float, and so do depthwise
convolutions: INT8 barely speeds them up, and on EfficientNet-Lite0 keeping them float raises
held-out INT8 = FP32 top-1 from 86% to 90%. Calibration runs
the float graph frame by frame so the components evolve as they will at run time. The same
clean frames give each file its shift reference (what 'no shift' looks like), which the
agent's adaptation gate measures frames against.

Folded layout: the plain model with the source statistics folded in is calibrated and
quantized like any INT8 classifier, then rewritten adaptive (exporters/folded.py).

Both layouts give the weights of dense convolutions and Gemm 7 bits (reduce_range, per tensor
override): on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) onnxruntime's U8S8 kernels
add pairs of uint8 x int8 products in int16 (VPMADDUBSW), which saturates with full-range weights.
On such a CPU (AMD EPYC, AVX2) EfficientNet-Lite0's folded INT8 agreed with FP32 on 75% of
held-out frames with 8-bit weights, 98.6% with 7-bit ones. Depthwise convolutions keep 8 bits:
their kernel does not pair products, and 7 bits there cost 11 points of agreement.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from tqdm import tqdm

from agent import contract
from agent.contract import ModelInfo, ShiftReference
from agent.model.graph_session import GraphSession
from agent.model.sessions import open_session
from agent.preprocess import FrameError, Preprocessor

from . import folded
from .export import ExportError, save_atomic, set_metadata

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
QUANTIZED_OPS = ["Conv", "Gemm"]
FOLDED_QUANTIZED_OPS = ["Conv", "Gemm", "Add", "Clip", "Relu"]  # BatchNorm folded: the whole chain stays INT8
CHUNK = 16


def read_frames(source: str | Path, limit: int | None = None) -> list[np.ndarray]:
    """Frames from a folder of images or a video file; raises ExportError naming the problem."""
    source = Path(source)
    frames = []
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ExportError(f"calibration folder {source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for path in files[:limit]:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise ExportError(f"calibration image {path} cannot be decoded")
            frames.append(image)
    elif source.is_file():
        capture = cv2.VideoCapture(str(source))
        try:
            while limit is None or len(frames) < limit:
                ok, frame = capture.read()
                if not ok:
                    break
                frames.append(frame)
        finally:
            capture.release()
        if not frames:
            raise ExportError(f"calibration video {source} has no readable frames")
    else:
        raise ExportError(f"calibration source {source} is neither a folder of images nor a video file")
    return frames


def _feeds_through_float_graph(path: Path, info: ModelInfo, frames: list[np.ndarray]) -> list[dict]:
    """Each frame's session inputs twice: adapted, with the components the float graph evolved up
    to it, and on the source statistics, so the ranges cover both ways the agent runs a frame."""
    session = GraphSession(path, info=info)
    preprocess = Preprocessor(info.preprocess)
    on, off = np.ones(1, np.float32), np.zeros(1, np.float32)
    feeds = []
    for frame in tqdm(frames, desc="calibrating", unit="frame"):
        image = preprocess(frame)
        state = session.state_feeds
        feeds.append({contract.IMAGE: image, contract.ADAPT: on, **state})
        feeds.append({contract.IMAGE: image, contract.ADAPT: off, **state})
        session.step(image)
    return feeds


class _Reader(CalibrationDataReader):
    """Hands the calibrator its frames in chunks (set_range), so it merges them into its
    histograms chunk by chunk instead of holding every intermediate tensor of every frame."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.set_range(0, len(feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self.feeds[start_index:end_index])

    def get_next(self):
        return next(self._iter, None)


def _usable(frames: list[np.ndarray], preprocess: Preprocessor) -> list[np.ndarray]:
    kept = []
    for frame in frames:
        try:
            preprocess(frame)
            kept.append(frame)
        except FrameError as exc:
            log.warning("calibration frame skipped: %s", exc)
    return kept


def _seven_bit_weights(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """TensorQuantOverrides giving every dense convolution's and Gemm's weight 7 bits, per output channel."""
    weights = {t.name: t for t in model.graph.initializer}
    overrides = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in weights:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("group", 1) == 1:
            overrides[node.input[1]] = [{"reduce_range": True, "axis": 0}]
        elif node.op_type == "Gemm":
            overrides[node.input[1]] = [{"reduce_range": True, "axis": 0 if attrs.get("transB", 0) else 1}]
    return overrides


@contextlib.contextmanager
def _root_logging_above(level: int):
    root = logging.getLogger()
    before = root.level
    root.setLevel(level + 1)
    try:
        yield
    finally:
        root.setLevel(before)


def _quantize_static(source: Path, target: Path, feeds: list[dict], method: str, exclude: list[str],
                     ops: list[str]) -> int:
    """Returns how many weights got 7 bits."""
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    # collect in chunks of CHUNK feeds: onnxruntime otherwise holds every intermediate tensor of
    # every calibration feed at once (over 20 GB for EfficientNet)
    feeds = feeds[: len(feeds) - len(feeds) % CHUNK] or feeds
    seven_bit = _seven_bit_weights(onnx.load(str(source)))
    options = {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibMovingAverage": True,
               "CalibStridedMinMax": min(CHUNK, len(feeds)), "TensorQuantOverrides": seven_bit}
    if method == "percentile":
        options["CalibPercentile"] = 99.999
    # onnxruntime's calibrator prints a line per chunk and logs advice on the root logger: not for the user
    with contextlib.redirect_stdout(io.StringIO()), _root_logging_above(logging.WARNING):
        quantize_static(str(source), str(target), _Reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=ops, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method], extra_options=options,
                        nodes_to_exclude=exclude)
    return len(seven_bit)


def quantize(fp32_path: Path, out_path: Path, info: ModelInfo, calib: list[np.ndarray], holdout: list[np.ndarray],
             method: str = "percentile") -> dict:
    """Write the INT8 model to out_path atomically; returns the calibration report stored in its metadata."""
    preprocess = Preprocessor(info.preprocess)
    calib, holdout = _usable(calib, preprocess), _usable(holdout, preprocess)
    if not calib or not holdout:
        raise ExportError(f"need calibration and held-out frames, got {len(calib)} and {len(holdout)} usable")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp) / "int8.onnx"
        seven_bit, excluded, ops = INT8[info.adaptation.layout](fp32_path, tmp_out, info, calib, method)
        model = onnx.load(str(tmp_out))
        report = {"method": method, "layout": info.adaptation.layout, "calibration_frames": len(calib),
                  "heldout_frames": len(holdout),
                  "top1_agreement_vs_fp32": top1_agreement(fp32_path, tmp_out, info, holdout),
                  "top1_agreement_vs_fp32_source_stats": top1_agreement(fp32_path, tmp_out, info, holdout,
                                                                         strength=0.0),
                  "quantized_ops": ops, "float_depthwise_convolutions": len(excluded),
                  "seven_bit_weights": seven_bit}
        set_metadata(model, {contract.KEY_CALIBRATION: json.dumps(report),
                             contract.KEY_SHIFT_REFERENCE: shift_reference(tmp_out, info, calib).to_json()})
        save_atomic(model, out_path)
    return report


def _int8_graph(fp32_path: Path, out: Path, info: ModelInfo, calib: list[np.ndarray], method: str
                ) -> tuple[int, list[str], list[str]]:
    """QDQ of the graph layout's FP32 graph, depthwise convolutions left in FP32. Returns the weights
    given 7 bits, the nodes left in FP32 and the op types quantized."""
    excluded = _depthwise_convolutions(onnx.load(str(fp32_path)))
    seven_bit = _quantize_static(fp32_path, out, _feeds_through_float_graph(fp32_path, info, calib), method,
                                 excluded, QUANTIZED_OPS)
    return seven_bit, excluded, QUANTIZED_OPS


def _int8_folded(fp32_path: Path, out: Path, info: ModelInfo, calib: list[np.ndarray], method: str
                 ) -> tuple[int, list[str], list[str]]:
    """exporters/folded.py builds the folded layout's INT8 graph around a QDQ of the BatchNorm-folded network."""
    preprocess, seven_bit = Preprocessor(info.preprocess), 0
    with tempfile.TemporaryDirectory() as tmp:
        def plain_qdq(model: onnx.ModelProto, feeds: list[dict]) -> onnx.ModelProto:
            nonlocal seven_bit
            onnx.save(model, str(Path(tmp) / "folded.onnx"))
            seven_bit = _quantize_static(Path(tmp) / "folded.onnx", Path(tmp) / "qdq.onnx", feeds, method, [],
                                         FOLDED_QUANTIZED_OPS)
            return onnx.load(str(Path(tmp) / "qdq.onnx"))

        images = [preprocess(frame) for frame in calib]
        onnx.save(folded.int8_model(onnx.load(str(fp32_path)), info.adaptation, images, plain_qdq), str(out))
    return seven_bit, [], FOLDED_QUANTIZED_OPS


INT8 = {"graph": _int8_graph, "folded": _int8_folded}  # by tta.adaptation.layout


def _depthwise_convolutions(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in node.attribute)]


def shift_reference(path: Path, info: ModelInfo, frames: list[np.ndarray]) -> ShiftReference:
    """The per-layer shift of clean frames through this very file, unadapted (INT8 shifts differ a little)."""
    preprocess = Preprocessor(info.preprocess)
    session = open_session(path, "cpu", "onnxruntime", info=info)
    shifts = np.stack([session.step(preprocess(f), strength=0.0, measure=True).shift
                       for f in frames]).astype(np.float64)
    logs = np.log1p(np.maximum(shifts, 0.0))
    mean, std = logs.mean(0), np.maximum(logs.std(0), 1e-6)
    return ShiftReference(mean, std, ((logs - mean) / std).mean(1))


def add_shift_reference(path: Path, info: ModelInfo, frames: list[np.ndarray]) -> None:
    model = onnx.load(str(path))
    set_metadata(model, {contract.KEY_SHIFT_REFERENCE: shift_reference(path, info, frames).to_json()})
    save_atomic(model, path)


def top1_agreement(fp32_path: Path, int8_path: Path, info: ModelInfo, frames: list[np.ndarray],
                   strength: float = 1.0) -> float:
    """Share of frames where both models pick the same class: adapted (each carrying its own
    components through the stream) or on the source statistics (quantization alone)."""
    preprocess = Preprocessor(info.preprocess)
    fp32, int8 = (open_session(p, "cpu", "onnxruntime", info=info) for p in (fp32_path, int8_path))
    same = []
    for frame in frames:
        image = preprocess(frame)
        same.append(np.argmax(fp32.step(image, strength=strength).logits) ==
                    np.argmax(int8.step(image, strength=strength).logits))
    return float(np.mean(same))
