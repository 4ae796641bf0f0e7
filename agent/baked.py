"""The folded layout's network with its normalisation baked in as constants, for frames that measure nothing.

onnxruntime folds a QLinearConv's int32 bias into its packed weights when the session is built
(the symmetric INT8 kernels); a bias computed per frame from `norm.mean` / `norm.var` drops
every adapted convolution to the generic kernel and costs 1.6 plain INT8 frames on
EfficientNet-Lite0. Building a session costs about 4 frames, so the agent normalises most
frames with a session whose normalisation is constant, rebuilt now and then from the
components, and runs the file's own graph (normalisation inputs, `stats` output) only on the
adapted frames that measure statistics; unadapted ones measure through a constant session that
keeps the statistics branch.

From the file, once: the nodes that compute from `norm.mean` / `norm.var` alone become a small
evaluator model; the rest of the graph, without them and without the statistics branch, is a
template whose boundary tensors (each convolution's weight scale and bias, or each
BatchNormalization's statistics in FP32) are initializers. A bake evaluates the boundary for
the given statistics and writes them into the template before building the session
(SessionOptions.add_initializer is not enough: onnxruntime's fusions read the model's own values).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from . import contract


class BakedNormalisation:
    def __init__(self, path: str | Path, source: tuple[np.ndarray, np.ndarray],
                 options: Callable[[], ort.SessionOptions], providers: list[str]):
        model = onnx.load(str(path))
        graph = model.graph
        constants = {t.name for t in graph.initializer}
        derived = {contract.NORM_MEAN, contract.NORM_VAR}
        norm_nodes = []
        for node in graph.node:  # topological order: one pass finds everything computed from norm.* alone
            inputs = [name for name in node.input if name]
            if any(name in derived for name in inputs) and all(name in derived or name in constants
                                                               for name in inputs):
                norm_nodes.append(node)
                derived.update(node.output)
        rest = [node for node in graph.node if node not in norm_nodes]
        self.boundary = sorted({name for node in rest for name in node.input if name in derived})
        if not self.boundary or contract.NORM_MEAN in self.boundary or contract.NORM_VAR in self.boundary:
            raise contract.ContractError(f"{path}: the folded graph must turn {contract.NORM_MEAN} / "
                                         f"{contract.NORM_VAR} into per-layer tensors before the network reads them")
        self._options, self.providers = options, providers
        self._evaluator = ort.InferenceSession(
            self._evaluator_model(model, norm_nodes).SerializeToString(), options(), providers=["CPUExecutionProvider"])
        values = self.evaluate(*source)
        self._templates = {measuring: self._template_model(model, rest, values, measuring)
                           for measuring in (False, True)}
        self._slots = {measuring: {t.name: t for t in template.graph.initializer if t.name in self.boundary}
                       for measuring, template in self._templates.items()}

    def _evaluator_model(self, model: onnx.ModelProto, norm_nodes: list) -> onnx.ModelProto:
        used = {name for node in norm_nodes for name in node.input}
        graph = helper.make_graph(
            norm_nodes, "normalisation",
            [i for i in model.graph.input if i.name in (contract.NORM_MEAN, contract.NORM_VAR)],
            [helper.make_empty_tensor_value_info(name) for name in self.boundary],
            [t for t in model.graph.initializer if t.name in used])
        return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)

    def _template_model(self, model: onnx.ModelProto, rest: list, values: dict, measuring: bool) -> onnx.ModelProto:
        outputs = [o for o in model.graph.output if measuring or o.name != contract.STATS]
        nodes, wanted = [], {o.name for o in outputs}
        for node in reversed(rest):  # keep what the outputs need: without `stats`, the statistics branch goes
            if any(name in wanted for name in node.output):
                nodes.append(node)
                wanted.update(node.input)
        nodes.reverse()
        initializers = [t for t in model.graph.initializer if t.name in wanted]
        initializers += [numpy_helper.from_array(values[name], name) for name in self.boundary]
        inputs = [i for i in model.graph.input if i.name in wanted]
        graph = helper.make_graph(nodes, model.graph.name, inputs, outputs, initializers)
        baked = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        baked.metadata_props.extend(model.metadata_props)
        return baked

    def evaluate(self, mean: np.ndarray, var: np.ndarray) -> dict[str, np.ndarray]:
        values = self._evaluator.run(self.boundary, {contract.NORM_MEAN: mean, contract.NORM_VAR: var})
        return dict(zip(self.boundary, values))

    def session(self, mean: np.ndarray, var: np.ndarray, measuring: bool = False) -> ort.InferenceSession:
        """A session that normalises every frame with (mean, var); `measuring` keeps the `stats` output."""
        for name, value in self.evaluate(mean, var).items():
            self._slots[measuring][name].CopyFrom(numpy_helper.from_array(value, name))
        return ort.InferenceSession(self._templates[measuring].SerializeToString(), self._options(),
                                    providers=self.providers)
