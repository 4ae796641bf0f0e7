"""torch classifier with BatchNorm -> one self-describing adaptive FP32 .onnx file."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from agent import contract
from agent.contract import AdaptationSpec, LayerSpec, Preprocess
from agent.files import write_atomic

from .graph import make_adaptive
from .unmix import K_DEFAULT, MOMENTUM_BATCH1, ROBUST_OPTIONS, TEMPERATURE, batchnorm_layers

log = logging.getLogger(__name__)
OPSET = 21


class ExportError(RuntimeError):
    """The model cannot be exported; the message names the reason."""


class _WithFeatures(nn.Module):
    """Returns (logits, input of the final nn.Linear) so LAME gets the penultimate features."""

    def __init__(self, model: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.model = model
        self._captured: list[torch.Tensor] = []
        classifier.register_forward_pre_hook(lambda _module, args: self._captured.append(args[0]))

    def forward(self, image):
        logits = self.model(image)
        return logits, torch.flatten(self._captured.pop(), 1)


def with_features(model: nn.Module) -> nn.Module:
    """The model returning (logits, penultimate features): what the graph outputs, and what the
    agent's torch backend runs."""
    return _WithFeatures(model, _classifier(model))


def _classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ExportError("the model has no nn.Linear classifier: the penultimate features cannot be found")
    return linears[-1]


def adaptation_spec(model: nn.Module, mode: str = "robust", components: int = K_DEFAULT,
                    momentum: float = MOMENTUM_BATCH1, temperature: float = TEMPERATURE,
                    layers: list[str] | None = None, options: dict | None = None,
                    layout: str = "graph") -> AdaptationSpec:
    bns = batchnorm_layers(model)
    if not bns:
        raise ExportError("the model has no BatchNorm2d layer: there is nothing for UnMix-TNS to adapt")
    names = list(bns) if layers is None else layers
    unknown = [n for n in names if n not in bns]
    if unknown:
        raise ExportError(f"layers {unknown} are not BatchNorm2d layers of the model")
    specs = tuple(
        LayerSpec(name=n, channels=bns[n].num_features, eps=float(bns[n].eps),
                  source_mean=f"{n}.running_mean", source_var=f"{n}.running_var")
        for n in names
    )
    if mode == "robust":
        return AdaptationSpec(mode=mode, components=components, momentum=momentum, temperature=temperature,
                              layers=specs, state_tensors=("means", "vars", "counts"),
                              options={**ROBUST_OPTIONS, **(options or {})}, layout=layout)
    if mode != "faithful":
        raise ExportError(f"unknown adaptation mode {mode!r} (faithful or robust)")
    if layout != "graph":
        raise ExportError("the faithful mode runs in the graph layout only (--layout graph)")
    return AdaptationSpec(mode=mode, components=components, momentum=momentum, temperature=temperature,
                          layers=specs)


def export_plain(model: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Export with BatchNormalization nodes kept (optimize=False stops the Conv+BN fusion)."""
    wrapped = with_features(model).eval()
    with torch.no_grad():
        program = torch.onnx.export(wrapped, (torch.zeros(input_shape),), dynamo=True, optimize=False,
                                    opset_version=OPSET, input_names=[contract.IMAGE],
                                    output_names=[contract.LOGITS, contract.FEATURES], verbose=False)
    return _strip_prefix(program.model_proto, "model.")


def _strip_prefix(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """Give parameters the user's own names (the wrapper put them under 'model.')."""
    renamed = {t.name: t.name.removeprefix(prefix) for t in model.graph.initializer if t.name.startswith(prefix)}
    for tensor in model.graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    return model


def build_adaptive(model: nn.Module, input_shape: tuple[int, ...], spec: AdaptationSpec,
                   labels: list[str], preprocess: Preprocess) -> onnx.ModelProto:
    if len(labels) != _classifier(model).out_features:
        raise ExportError(f"{len(labels)} labels for a classifier with {_classifier(model).out_features} outputs")
    adaptive = ADAPTIVE_FP32[spec.layout](export_plain(model, input_shape), spec)
    onnx.checker.check_model(adaptive, full_check=True)
    set_metadata(adaptive, {
        contract.KEY_FORMAT: str(contract.FORMAT_VERSION),
        contract.KEY_LABELS: json.dumps(list(labels)),
        contract.KEY_PREPROCESS: preprocess.to_json(),
        contract.KEY_ADAPTATION: spec.to_json(),
    })
    adaptive.producer_name = "tta-export"
    return adaptive


def _graph_fp32(plain: onnx.ModelProto, spec: AdaptationSpec) -> onnx.ModelProto:
    return _fold_constants(make_adaptive(plain, spec))


def _folded_fp32(plain: onnx.ModelProto, spec: AdaptationSpec) -> onnx.ModelProto:
    from .folded import build_fp32  # folded.py imports this module

    return build_fp32(_fold_constants(plain), spec)


ADAPTIVE_FP32 = {"graph": _graph_fp32, "folded": _folded_fp32}  # by tta.adaptation.layout: export_plain -> FP32


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold the exporter's shape arithmetic (padding sizes), nothing more: the full onnxscript
    optimizer would also merge equal initializers, renaming the source statistics the contract names."""
    import onnxscript.optimizer
    from onnxscript import ir

    graph = ir.serde.deserialize_model(model)
    onnxscript.optimizer.fold_constants(graph)
    onnxscript.optimizer.remove_unused_nodes(graph)
    return ir.serde.serialize_model(graph)


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def save_atomic(model: onnx.ModelProto, path: str | Path) -> Path:
    """One file, no external data, and never a half-written model at `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"output folder {path.parent} does not exist")
    data = model.SerializeToString()
    try:
        return write_atomic(path, lambda f: f.write(data))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror}") from exc
