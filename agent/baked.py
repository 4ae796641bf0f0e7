"""The folded layout's network with its normalisation baked in as constants, for frames that measure nothing.

onnxruntime folds a QLinearConv's int32 bias into its packed weights when the session is built
(the symmetric INT8 kernels); a bias computed per frame from `norm.mean` / `norm.var` drops
every adapted convolution to the generic kernel and costs 1.6 plain INT8 frames on
EfficientNet-Lite0. Building a session costs several frames, so the agent normalises most
frames with a session whose normalisation is constant, rebuilt now and then from the
components, and runs the file's own graph (normalisation inputs, `stats` output) only on the
adapted frames that measure statistics; unadapted ones measure through a constant session that
keeps the statistics branch.

From the file, once: the nodes that compute from `norm.mean` / `norm.var` alone become a small
evaluator model; the rest of the graph, without them and without the statistics branch, is a
template whose boundary tensors (each convolution's weight scale and bias, or each
BatchNormalization's statistics in FP32) are initializers. A bake evaluates the boundary for
the given statistics and builds a session with them. On the CPU, onnxruntime optimises each
template once (saved with `optimized_model_filepath`) and a bake hands the boundary to that
optimised graph as SessionOptions.add_initializer values with graph optimisation off: the
serialisation and optimisation passes are what made a rebuild cost (17 -> 7 ms on
EfficientNet-Lite0, identical output). Where the optimisations consume a boundary tensor (FP32:
BatchNormalization fused into Conv) or the session is not on the CPU, the values are written
into the template itself before building (add_initializer alone would miss the fusions).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import contract
from .onnxruntime_quiet import ort

CPU = "CPUExecutionProvider"


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
        self._optimized: dict[bool, bytes | None] = {}

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
        values = self.evaluate(mean, var)
        optimized = self._optimized_template(measuring) if self.providers == [CPU] else None
        if optimized is None:
            for name, value in values.items():
                self._slots[measuring][name].CopyFrom(numpy_helper.from_array(value, name))
            model = self._templates[measuring].SerializeToString()
            return ort.InferenceSession(model, self._options(), providers=self.providers)
        options = self._options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        held = [ort.OrtValue.ortvalue_from_numpy(value) for value in values.values()]
        for name, value in zip(values, held):
            options.add_initializer(name, value)
        session = ort.InferenceSession(optimized, options, providers=[CPU])
        session.baked_values = held  # onnxruntime reads added initializers in place: they must outlive it
        return session

    def optimised(self, measuring: bool) -> bool:
        """Whether bakes reuse the once-optimised template (the CPU, and no optimisation consumed a boundary
        tensor) rather than build from the template each time."""
        return self.providers == [CPU] and self._optimized_template(measuring) is not None

    def _optimized_template(self, measuring: bool) -> bytes | None:
        """The template as onnxruntime's CPU optimisations leave it, if every boundary tensor is still
        an initializer a node reads."""
        if measuring not in self._optimized:
            with tempfile.TemporaryDirectory() as tmp:
                options = self._options()
                options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
                ort.InferenceSession(self._templates[measuring].SerializeToString(), options, providers=[CPU])
                optimized = onnx.load(options.optimized_model_filepath)
            read = {name for node in optimized.graph.node for name in node.input}
            kept = {t.name for t in optimized.graph.initializer} & read
            self._optimized[measuring] = None
            if kept.issuperset(self.boundary):  # sessions only leave the accelerator: the template is done
                self._optimized[measuring] = optimized.SerializeToString()
                del self._templates[measuring], self._slots[measuring]
        return self._optimized[measuring]
