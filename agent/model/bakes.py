"""The folded layout's network with its normalisation baked in as constants, for the frames that measure nothing.

onnxruntime folds a QLinearConv's int32 bias into its packed weights when the session is built (the
symmetric INT8 kernels); a bias computed per frame from `norm.mean` / `norm.var` drops every adapted
convolution to the generic kernel. So frames that measure nothing run a session whose normalisation is
constant (a bake), rebuilt when the normalisation moves, and only measured frames run the file's own graph
(normalisation inputs, `stats` output); `bench/results/latency.md` has both costs.

From the file, once: the nodes that compute from `norm.mean` / `norm.var` alone become a small evaluator
(numpy); the rest of the graph, without them and without the statistics branch,
is a template whose boundary tensors (each convolution's weight scale and bias, or each
BatchNormalization's statistics in FP32) are initializers. A bake evaluates the boundary for the given
statistics and builds a session with them. On the CPU onnxruntime optimises the template once (saved with
`optimized_model_filepath`) and a bake hands the boundary to that optimised graph as
SessionOptions.add_initializer values with graph optimisation off, which skips the serialisation and
optimisation passes. Where the optimisations consume a boundary tensor (FP32: BatchNormalization fused
into Conv) or the session is not on the CPU, the values are written into the template itself before
building (add_initializer alone would miss the fusions).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import contract
from .. import onnx_protobuf as pb
from ..onnxruntime_quiet import ort
from .providers import CPU

_ELEMENTWISE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Sqrt": np.sqrt,
                "Reciprocal": np.reciprocal, "Round": np.round}  # np.round: half to even, as ONNX's Round


class NormalisationEvaluator:
    """The nodes that compute from `norm.mean` / `norm.var` alone (a dozen elementwise ops and splits on
    (channels,) vectors), in numpy: neither one more onnxruntime session per camera nor onnx's reference
    evaluator, which loads every operator it knows."""

    def __init__(self, model: pb.ModelProto, nodes: list, path: str | Path):
        unknown = sorted({n.op_type for n in nodes} - set(_ELEMENTWISE) - {"Cast", "Split"})
        if unknown:
            raise contract.ContractError(f"{path}: the normalisation nodes use {', '.join(unknown)}, which the agent "
                                         "does not evaluate; export the model again with tta-export")
        used = {name for node in nodes for name in node.input}
        self.constants = {t.name: pb.to_array(t) for t in model.graph.initializer if t.name in used}
        self.nodes = [(n.op_type, list(n.input), list(n.output), pb.attribute_values(n)) for n in nodes]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = {**self.constants, **feeds}
        for op, inputs, outputs, attrs in self.nodes:
            args = [values[name] for name in inputs if name]
            if op == "Cast":
                results = [args[0].astype(pb.dtype(attrs["to"]))]
            elif op == "Split":
                sizes = args[1] if len(args) > 1 else attrs["split"]
                results = np.split(args[0], np.cumsum(sizes)[:-1], axis=attrs.get("axis", 0))
            else:
                results = [_ELEMENTWISE[op](*args)]
            values.update(zip(outputs, results))
        return values


class BakedNormalisation:
    def __init__(self, path: str | Path, source: tuple[np.ndarray, np.ndarray],
                 options: Callable[[], ort.SessionOptions], providers: list[str]):
        model = pb.load(path)
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
        self._evaluator = NormalisationEvaluator(model, norm_nodes, path)
        self._template = self._template_model(model, rest, self.evaluate(*source))
        self._slots = {t.name: t for t in self._template.graph.initializer if t.name in self.boundary}
        self._optimized: bytes | None = None
        self._optimized_checked = False

    def _template_model(self, model: pb.ModelProto, rest: list, values: dict) -> pb.ModelProto:
        outputs = [o for o in model.graph.output if o.name != contract.STATS]
        nodes, wanted = [], {o.name for o in outputs}
        for node in reversed(rest):  # keep what the outputs need: without `stats`, the statistics branch goes
            if any(name in wanted for name in node.output):
                nodes.append(node)
                wanted.update(node.input)
        nodes.reverse()
        initializers = [t for t in model.graph.initializer if t.name in wanted]
        initializers += [pb.from_array(values[name], name) for name in self.boundary]
        inputs = [i for i in model.graph.input if i.name in wanted]
        graph = pb.GraphProto(name=model.graph.name, node=nodes, input=inputs, output=outputs, initializer=initializers)
        return pb.ModelProto(graph=graph, opset_import=model.opset_import, ir_version=model.ir_version,
                             metadata_props=model.metadata_props)

    def evaluate(self, mean: np.ndarray, var: np.ndarray) -> dict[str, np.ndarray]:
        values = self._evaluator.run({contract.NORM_MEAN: mean, contract.NORM_VAR: var})
        return {name: values[name] for name in self.boundary}

    def session(self, mean: np.ndarray, var: np.ndarray) -> ort.InferenceSession:
        """A session that normalises every frame with (mean, var)."""
        values = self.evaluate(mean, var)
        optimized = self._optimized_template() if self.providers == [CPU] else None
        if optimized is None:
            for name, value in values.items():
                self._slots[name].CopyFrom(pb.from_array(value, name))
            return ort.InferenceSession(self._template.SerializeToString(), self._options(), providers=self.providers)
        options = self._options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        held = [ort.OrtValue.ortvalue_from_numpy(value) for value in values.values()]
        for name, value in zip(values, held):
            options.add_initializer(name, value)
        session = ort.InferenceSession(optimized, options, providers=[CPU])
        session.baked_values = held  # onnxruntime reads added initializers in place: they must outlive it
        return session

    def optimised(self) -> bool:
        """Whether bakes reuse the once-optimised template (the CPU, and no optimisation consumed a boundary
        tensor) rather than build from the template each time."""
        return self.providers == [CPU] and self._optimized_template() is not None

    def _optimized_template(self) -> bytes | None:
        """The template as onnxruntime's CPU optimisations leave it, if every boundary tensor is still
        an initializer a node reads."""
        if not self._optimized_checked:
            with tempfile.TemporaryDirectory() as tmp:
                options = self._options()
                options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
                ort.InferenceSession(self._template.SerializeToString(), options, providers=[CPU])
                optimized = pb.load(options.optimized_model_filepath)
            read = {name for node in optimized.graph.node for name in node.input}
            kept = {t.name for t in optimized.graph.initializer} & read
            self._optimized_checked = True
            if kept.issuperset(self.boundary):  # sessions only leave the accelerator: the template is done
                self._optimized = optimized.SerializeToString()
                del self._template, self._slots
        return self._optimized
