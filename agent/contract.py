"""The adaptive model contract shared by exporters/ (which writes it) and agent/ (which reads it).

One .onnx file carries everything: tensor names below, and JSON documents under the
`tta.*` keys of `metadata_props`. Reading needs protobuf and numpy only (agent/onnx_protobuf.py), never torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1

IMAGE = "image"
ADAPT = "adapt"  # float[1]: 1 adapts (mixes and updates components), 0 runs on source statistics
LOGITS = "logits"
FEATURES = "features"
SHIFT = "shift"  # float[1, L]: per-layer KL(frame statistics || source statistics)
# the folded layout (exporters/folded.py): UnMix-TNS runs in the agent, the graph normalises and measures
NORM_MEAN = "norm.mean"  # float[C]: the statistics to normalise this frame with, all adapted layers' channels
NORM_VAR = "norm.var"
STATS = "stats"  # float[2, C]: this frame's mean and variance of each adapted layer's input
# each layout's graph inputs and outputs (per-layer state tensors come on top in the graph layout)
LAYOUT_TENSORS = {"graph": ({IMAGE, ADAPT}, {LOGITS, FEATURES, SHIFT}),
                  "folded": ({IMAGE, NORM_MEAN, NORM_VAR}, {LOGITS, FEATURES, STATS})}
LAYOUTS = tuple(LAYOUT_TENSORS)

KEY_FORMAT = "tta.format_version"
KEY_LABELS = "tta.labels"
KEY_PREPROCESS = "tta.preprocess"
KEY_ADAPTATION = "tta.adaptation"
KEY_CALIBRATION = "tta.calibration"
KEY_SHIFT_REFERENCE = "tta.shift_reference"
KEY_SOURCE = "tta.source"  # {"builder": "module:function", "weights": path|null}: the torch backend's model


class ContractError(ValueError):
    """The file is not an adaptive model this agent can run; the message says what is missing."""


def state_input(layer: str, tensor: str) -> str:
    return f"state.{layer}.{tensor}"


def state_output(layer: str, tensor: str) -> str:
    return f"state_out.{layer}.{tensor}"


@dataclass(frozen=True)
class LayerSpec:
    name: str
    channels: int
    eps: float
    source_mean: str  # initializer names of the source statistics inside the file
    source_var: str


@dataclass(frozen=True)
class AdaptationSpec:
    mode: str
    components: int  # K
    momentum: float
    temperature: float
    layers: tuple[LayerSpec, ...]
    state_tensors: tuple[str, ...] = ("means", "vars")
    options: dict = field(default_factory=dict)
    layout: str = "graph"  # "graph": UnMix-TNS inside the graph; "folded": in the agent (exporters/folded.py)

    def to_json(self) -> str:
        doc = {
            "mode": self.mode,
            "components": self.components,
            "momentum": self.momentum,
            "temperature": self.temperature,
            "state_tensors": list(self.state_tensors),
            "options": self.options,
            "layout": self.layout,
            "layers": [vars(layer) for layer in self.layers],
        }
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> AdaptationSpec:
        doc = json.loads(text)
        layers = tuple(LayerSpec(**layer) for layer in doc.pop("layers"))
        doc["state_tensors"] = tuple(doc["state_tensors"])
        return cls(layers=layers, **doc)


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int]  # (height, width) of the network input
    channel_order: str  # "RGB", "BGR" or "GRAY"
    mean: tuple[float, ...]  # on 0..255 pixel values, per channel
    std: tuple[float, ...]
    resize: str = "shorter_side"  # "shorter_side" (then crop) or "stretch"
    resize_to: int | None = None  # shorter side before the crop; None = crop size
    crop: str = "center"  # "center" or "none"
    padding: str = "symmetric"  # informational: how the network pads ("tf_same" for TF-trained weights)

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        doc = json.loads(text)
        doc["size"] = tuple(doc["size"])
        doc["mean"] = tuple(doc["mean"])
        doc["std"] = tuple(doc["std"])
        return cls(**doc)

    def to_json(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()})


@dataclass(frozen=True)
class ShiftReference:
    """Per-layer mean and spread of log(1 + shift) on the exporter's clean calibration frames, run
    unadapted: what 'no shift' looks like for this model, so the agent can tell a changed camera
    from ordinary scene content without a warm-up of its own."""

    mean: np.ndarray  # (layers,)
    std: np.ndarray  # (layers,)
    scores: np.ndarray  # (frames,) each calibration frame's mean standardised shift, in calibration order

    @property
    def frames(self) -> int:
        return len(self.scores)

    def standardise(self, shift: np.ndarray) -> np.ndarray:
        return (np.log1p(np.maximum(shift, 0.0)) - self.mean) / self.std

    def to_json(self) -> str:
        return json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist(),
                           "scores": np.round(self.scores, 4).tolist()})

    @classmethod
    def from_json(cls, text: str) -> ShiftReference:
        doc = json.loads(text)
        return cls(*(np.asarray(doc[k], np.float64) for k in ("mean", "std", "scores")))


@dataclass(frozen=True)
class ModelInfo:
    """What the agent learns from an adaptive .onnx file before it opens a session."""

    path: Path
    labels: tuple[str, ...]
    preprocess: Preprocess
    adaptation: AdaptationSpec
    source_stats: dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (mean, var)
    calibration: dict
    shift_reference: ShiftReference | None = None  # absent in files exported without calibration frames
    source: dict | None = None  # how to build the torch model (exporters/torch_session.py)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.adaptation.layers]


def _check_types(labels: tuple, preprocess: Preprocess, adaptation: AdaptationSpec) -> None:
    def ok(condition: bool, what: str) -> None:
        if not condition:
            raise ValueError(what)

    ok(len(labels) > 0 and all(isinstance(x, str) for x in labels), "tta.labels must be a list of class names")
    channels = 1 if preprocess.channel_order == "GRAY" else 3
    ok(preprocess.channel_order in ("RGB", "BGR", "GRAY"), "tta.preprocess.channel_order must be RGB, BGR or GRAY")
    ok(len(preprocess.size) == 2 and all(isinstance(v, int) and v > 0 for v in preprocess.size),
       "tta.preprocess.size must be two positive integers")
    for name in ("mean", "std"):
        values = getattr(preprocess, name)
        ok(len(values) == channels and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
           f"tta.preprocess.{name} must be {channels} numbers")
    ok(all(v != 0 for v in preprocess.std), "tta.preprocess.std must not be 0")
    ok(isinstance(adaptation.components, int) and adaptation.components > 0, "tta.adaptation.components must be > 0")
    ok(all(isinstance(t, str) for t in adaptation.state_tensors), "tta.adaptation.state_tensors must be names")
    ok(isinstance(adaptation.options, dict), "tta.adaptation.options must be a mapping")
    ok(adaptation.layout in LAYOUTS, f"tta.adaptation.layout must be one of {', '.join(LAYOUTS)}")
    ok(adaptation.layout == "graph" or adaptation.mode == "robust", "the folded layout runs the robust mode only")
    for layer in adaptation.layers:
        ok(isinstance(layer.name, str) and isinstance(layer.source_mean, str) and isinstance(layer.source_var, str)
           and isinstance(layer.channels, int) and layer.channels > 0, f"tta.adaptation layer {layer!r:.80} malformed")


def _static_shape(value_info) -> tuple:
    """Dimensions of a graph input/output: an int where fixed, None where symbolic."""
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def _check_shapes(path: Path, model, labels: tuple, preprocess: Preprocess, adaptation: AdaptationSpec,
                  stats: dict) -> None:
    """The metadata must describe the graph it sits on: a mismatch would only surface on the first frame."""
    outputs = {o.name: _static_shape(o) for o in model.graph.output}
    inputs = {i.name: _static_shape(i) for i in model.graph.input}
    classes = outputs[LOGITS][-1] if outputs[LOGITS] else None
    if classes is not None and classes != len(labels):
        raise ContractError(f"{path}: tta.labels names {len(labels)} classes but the classifier has {classes} "
                            "outputs; re-export the model with the labels of its classifier")
    image = inputs[IMAGE]
    channels = 1 if preprocess.channel_order == "GRAY" else 3
    if len(image) != 4 or (image[1] is not None and image[1] != channels) \
            or any(d is not None and d != s for d, s in zip(image[2:], preprocess.size)):
        raise ContractError(f"{path}: input '{IMAGE}' has shape {list(image)} but tta.preprocess describes "
                            f"{channels}x{preprocess.size[0]}x{preprocess.size[1]} images; re-export the model")
    for layer in adaptation.layers:
        mean, var = stats[layer.name]
        if mean.shape != (layer.channels,) or var.shape != (layer.channels,):
            raise ContractError(f"{path}: source statistics of layer {layer.name} have {mean.shape} and "
                                f"{var.shape} values for {layer.channels} channels; re-export the model")


def read_model_info(path: str | Path) -> ModelInfo:
    """Load and check the contract of an adaptive model; raise ContractError naming what is wrong."""
    from . import onnx_protobuf as pb

    path = Path(path)
    if not path.is_file():
        raise ContractError(f"model file {path} does not exist")
    try:
        model = pb.load(path)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ContractError(f"model file {path} is not a readable ONNX file: {exc}") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in (KEY_FORMAT, KEY_LABELS, KEY_PREPROCESS, KEY_ADAPTATION) if k not in meta]
    if missing:
        raise ContractError(
            f"{path} is not an adaptive tta-agent model: metadata {', '.join(missing)} missing "
            "(export it with tta-export)"
        )
    if meta[KEY_FORMAT] != str(FORMAT_VERSION):
        raise ContractError(f"{path} has model format {meta[KEY_FORMAT]}, this agent reads {FORMAT_VERSION}")
    try:
        labels = tuple(json.loads(meta[KEY_LABELS]))
        preprocess = Preprocess.from_json(meta[KEY_PREPROCESS])
        adaptation = AdaptationSpec.from_json(meta[KEY_ADAPTATION])
        _check_types(labels, preprocess, adaptation)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # JSON of the wrong shape
        raise ContractError(f"{path}: malformed tta.* metadata: {exc}") from exc

    inits = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    expected_in, expected_out = (set(names) for names in LAYOUT_TENSORS[adaptation.layout])
    stats = {}
    for layer in adaptation.layers:
        for tensor in adaptation.state_tensors if adaptation.layout == "graph" else ():
            expected_in.add(state_input(layer.name, tensor))
            expected_out.add(state_output(layer.name, tensor))
        try:
            mean = pb.to_array(inits[layer.source_mean]).astype(np.float32)
            var = pb.to_array(inits[layer.source_var]).astype(np.float32)
        except KeyError as exc:
            raise ContractError(f"{path}: source statistics {exc} of layer {layer.name} not in the file") from exc
        except ValueError as exc:
            raise ContractError(f"{path}: source statistics of layer {layer.name}: {exc}") from exc
        stats[layer.name] = (mean, var)
    if expected_in - inputs or expected_out - outputs:
        absent = sorted((expected_in - inputs) | (expected_out - outputs))
        more = "..." if len(absent) > 5 else ""
        raise ContractError(f"{path}: graph lacks the contract's tensors {absent[:5]}{more}")
    _check_shapes(path, model, labels, preprocess, adaptation, stats)
    calibration = json.loads(meta.get(KEY_CALIBRATION, "{}"))
    reference = None
    if KEY_SHIFT_REFERENCE in meta:
        try:
            reference = ShiftReference.from_json(meta[KEY_SHIFT_REFERENCE])
        except (TypeError, ValueError, KeyError) as exc:
            raise ContractError(f"{path}: malformed {KEY_SHIFT_REFERENCE} metadata: {exc}") from exc
        if (reference.mean.shape != (len(adaptation.layers),) or reference.std.shape != reference.mean.shape
                or reference.scores.ndim != 1 or not np.all(reference.std > 0)):
            raise ContractError(f"{path}: {KEY_SHIFT_REFERENCE} needs per-layer mean and positive std for "
                                f"{len(adaptation.layers)} adapted layers and a list of scores")
    try:
        source = json.loads(meta[KEY_SOURCE]) if KEY_SOURCE in meta else None
    except ValueError as exc:
        raise ContractError(f"{path}: malformed {KEY_SOURCE} metadata: {exc}") from exc
    if source is not None and not (isinstance(source, dict) and isinstance(source.get("builder"), str)
                                   and isinstance(source.get("weights"), (str, type(None)))):
        raise ContractError(f"{path}: {KEY_SOURCE} must name a builder 'module:function' and a weights path or null")
    return ModelInfo(path, labels, preprocess, adaptation, stats, calibration, reference, source)
