"""Rewrite the BatchNormalization nodes of an exported ONNX graph into UnMix-TNS.

Each adapted layer becomes a few ops on the large activation (two spatial means for the
frame statistics, one BatchNormalization that takes the mixed statistics as inputs) and
small (K, C) ops for the mixing and the update. The components enter as graph inputs and
leave as graph outputs, so nothing is hidden. The arithmetic mirrors exporters/unmix.py
line by line; the parity tests hold the two together.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent import contract
from agent.contract import AdaptationSpec, LayerSpec


class _Graph:
    """Appends uniquely named nodes and shared constants; arithmetic reads like the formulas."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0
        self.constants: dict[tuple, str] = {}
        self.prefix = "unmix"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.count += 1
        out = out or f"{self.prefix}/{op_type}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{self.prefix}/{op_type}_{self.count}",
                                           **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            name = f"unmix.const_{len(self.constants)}"
            self.graph.initializer.append(numpy_helper.from_array(array, name))
            self.constants[key] = name
        return self.constants[key]

    def _c(self, x) -> str:
        return x if isinstance(x, str) else self.const(x)

    def add(self, a, b):
        return self.op("Add", self._c(a), self._c(b))

    def sub(self, a, b):
        return self.op("Sub", self._c(a), self._c(b))

    def mul(self, a, b):
        return self.op("Mul", self._c(a), self._c(b))

    def div(self, a, b):
        return self.op("Div", self._c(a), self._c(b))

    def square(self, a):
        return self.op("Mul", a, a)

    def max(self, a, b):
        return self.op("Max", self._c(a), self._c(b))

    def mean(self, x, axes, keepdims=0):
        return self.op("ReduceMean", x, self.const(axes, np.int64), keepdims=keepdims)

    def sum(self, x, axes, keepdims=0):
        return self.op("ReduceSum", x, self.const(axes, np.int64), keepdims=keepdims)

    def norm(self, x):
        return self.op("ReduceL2", x, self.const([1], np.int64), keepdims=1)

    def reshape(self, x, shape):
        return self.op("Reshape", x, self.const(shape, np.int64))

    def cosine(self, vectors, v):
        """(K, 1) cosine similarity of each row of `vectors` (K, C) with the row `v` (1, C)."""
        dot = self.op("MatMul", vectors, self.reshape(v, [-1, 1]))
        return self.div(dot, self.max(self.mul(self.norm(vectors), self.norm(v)), 1e-12))


def _frame_statistics(g: _Graph, x: str) -> tuple[str, str]:
    """Mean and biased variance over H, W as (1, C) rows. ReduceMean rather than GlobalAveragePool:
    its pairwise sums keep near-constant frames accurate."""
    mu4 = g.mean(x, [2, 3], keepdims=1)
    var4 = g.mean(g.square(g.sub(x, mu4)), [2, 3], keepdims=1)
    return g.reshape(mu4, [1, -1]), g.reshape(var4, [1, -1])


def _faithful(g: _Graph, mu, var_x, layer: LayerSpec, spec: AdaptationSpec, bn) -> tuple[str, str, dict]:
    """The paper: mix every component with the frame by its similarity, average, update by momentum."""
    means, variances = (contract.state_input(layer.name, t) for t in ("means", "vars"))
    p = g.op("Softmax", g.mul(g.cosine(means, mu), 1.0 / spec.temperature), axis=0)  # (K, 1)
    d_mean, d_var = g.sub(mu, means), g.sub(var_x, variances)
    mean_k = g.add(means, g.mul(p, d_mean))
    var_k = g.add(variances, g.mul(p, d_var))
    mean = g.mean(mean_k, [0])
    var = g.sub(g.add(g.mean(var_k, [0]), g.mean(g.square(mean_k), [0])), g.square(mean))
    rate = g.mul(p, g.mul(contract.ADAPT, [spec.momentum]))  # adapt = 0: the components stay as they are
    return mean, var, {"means": g.add(means, g.mul(rate, d_mean)), "vars": g.add(variances, g.mul(rate, d_var))}


def _robust(g: _Graph, mu, var_x, layer: LayerSpec, spec: AdaptationSpec, bn) -> tuple[str, str, dict]:
    """Single-instance variant (exporters/unmix.py RobustUnMixTNS2d explains each step)."""
    o = spec.options
    src_mean, src_var = bn.input[3], bn.input[4]
    means, variances, counts = (contract.state_input(layer.name, t) for t in ("means", "vars", "counts"))
    k = spec.components
    seeds = g.const((o["seed_similarity"] - 1e-3 * np.arange(k)).reshape(k, 1))
    cos = g.cosine(g.sub(means, src_mean), g.sub(mu, src_mean))
    empty = g.op("Cast", g.op("Less", counts, g.const([[1e-3]])), to=TensorProto.FLOAT)
    similarity = g.add(cos, g.mul(empty, g.sub(seeds, cos)))
    p = g.op("Softmax", g.mul(similarity, 1.0 / spec.temperature), axis=0)  # (K, 1)

    counts_step = g.mul(contract.ADAPT, g.sub(p, g.mul(counts, o["decay"])))
    new_counts = g.add(counts, counts_step)
    rate = g.div(g.mul(contract.ADAPT, p), g.max(new_counts, 1e-12))
    d_mean = g.sub(mu, means)
    new_means = g.add(means, g.mul(rate, d_mean))
    # variance of the weighted mixture of the component and the frame, exact at rate 0
    spread = g.mul(g.mul(rate, g.sub(1.0, rate)), g.square(d_mean))
    new_vars = g.add(variances, g.add(g.mul(rate, g.sub(var_x, variances)), spread))

    weight = g.div(new_counts, g.add(new_counts, o["support"]))  # (K, 1): ~1 once a component has frames
    total = g.add(g.sum(weight, [0]), o["prior"])
    prior = o["prior"]
    mean = g.div(g.add(g.mul(src_mean, prior), g.sum(g.mul(weight, new_means), [0])), total)
    second_src = g.mul(g.add(src_var, g.square(src_mean)), prior)
    second = g.div(g.add(second_src, g.sum(g.mul(weight, g.add(new_vars, g.square(new_means))), [0])), total)
    mean = g.add(mean, g.mul(g.sub(mu, mean), o["instance"]))
    second = g.add(second, g.mul(g.sub(g.add(var_x, g.square(mu)), second), o["instance"]))
    var = g.max(g.sub(second, g.square(mean)), 0.0)
    return mean, var, {"means": new_means, "vars": new_vars, "counts": new_counts}


MODES = {"faithful": _faithful, "robust": _robust}


def _layer(g: _Graph, x: str, y: str, bn: onnx.NodeProto, layer: LayerSpec, spec: AdaptationSpec
           ) -> tuple[list[str], str]:
    """Emit one adapted layer writing y; returns (state output names, shift score name)."""
    g.prefix = f"unmix/{layer.name}"
    _, gamma, beta, src_mean, src_var = bn.input
    mu, var_x = _frame_statistics(g, x)
    mean, var, new_state = MODES[spec.mode](g, mu, var_x, layer, spec, bn)
    # adapt = 0 gives the source statistics exactly (and the modes leave the components untouched)
    mean_used = g.reshape(g.add(src_mean, g.mul(contract.ADAPT, g.sub(mean, src_mean))), [-1])
    var_used = g.reshape(g.add(src_var, g.mul(contract.ADAPT, g.sub(var, src_var))), [-1])
    g.nodes.append(helper.make_node("BatchNormalization", [x, gamma, beta, mean_used, var_used], [y],
                                    name=f"{g.prefix}/normalize", epsilon=layer.eps))
    outs = [g.op("Identity", new_state[name], out=contract.state_output(layer.name, name))
            for name in spec.state_tensors]
    return outs, _shift_score(g, mu, var_x, src_mean, src_var, layer.eps)


def _shift_score(g: _Graph, mu: str, var_x: str, src_mean: str, src_var: str, eps: float) -> str:
    """KL(N(mu, var) || N(source)) averaged over channels: 0 on source-like frames, grows with shift."""
    vs = g.add(src_var, eps)
    ratio = g.div(g.add(var_x, eps), vs)
    terms = g.sub(g.add(g.div(g.square(g.sub(mu, src_mean)), vs), ratio), g.add(g.op("Log", ratio), 1.0))
    return g.mul(g.mean(terms, [1]), 0.5)  # (1,)


def batchnorm_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """BatchNormalization nodes by torch layer name (the scale initializer is '<layer>.weight')."""
    return {node.input[1].removesuffix(".weight"): node for node in model.graph.node
            if node.op_type == "BatchNormalization"}


def state_shape(spec: AdaptationSpec, layer: LayerSpec, tensor: str) -> list[int]:
    return [spec.components, 1 if tensor == "counts" else layer.channels]


def make_adaptive(model: onnx.ModelProto, spec: AdaptationSpec) -> onnx.ModelProto:
    """Return a copy of `model` whose spec.layers are UnMix-TNS with state inputs/outputs."""
    if spec.mode not in MODES:
        raise ValueError(f"unknown adaptation mode {spec.mode!r} (known: {', '.join(MODES)})")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    missing = {layer.name for layer in spec.layers} - set(batchnorm_nodes(model))
    if missing:
        raise ValueError(f"layers {sorted(missing)} have no BatchNormalization node in the graph")
    g = _Graph(graph)
    graph.input.append(helper.make_tensor_value_info(contract.ADAPT, TensorProto.FLOAT, [1]))
    adapted = {layer.name: layer for layer in spec.layers}
    shifts, state_outs = [], []
    for node in graph.node:
        layer = adapted.get(node.input[1].removesuffix(".weight")) if node.op_type == "BatchNormalization" else None
        if layer is None:
            g.nodes.append(node)
            continue
        for tensor in spec.state_tensors:
            graph.input.append(helper.make_tensor_value_info(
                contract.state_input(layer.name, tensor), TensorProto.FLOAT, state_shape(spec, layer, tensor)))
        outs, shift = _layer(g, node.input[0], node.output[0], node, layer, spec)
        state_outs += [(layer, tensor, out) for tensor, out in zip(spec.state_tensors, outs)]
        shifts.append(shift)
    g.prefix = "unmix"
    g.op("Reshape", g.op("Concat", *shifts, axis=0), g.const([1, -1], np.int64), out=contract.SHIFT)
    del graph.node[:]
    graph.node.extend(g.nodes)
    graph.output.append(helper.make_tensor_value_info(contract.SHIFT, TensorProto.FLOAT, [1, len(shifts)]))
    for layer, tensor, out in state_outs:
        graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, state_shape(spec, layer, tensor)))
    return model
