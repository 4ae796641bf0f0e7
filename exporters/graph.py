"""Rewrite the BatchNormalization nodes of an exported ONNX graph into UnMix-TNS.

Each adapted layer becomes a handful of ops on the large activation (two spatial
means for the frame statistics and one BatchNormalization that takes the
mixed statistics as inputs) and small (K, C) ops for the mixing and the update. The
components enter as graph inputs and leave as graph outputs, so nothing is hidden.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent import contract
from agent.contract import AdaptationSpec, LayerSpec


class _Builder:
    """Appends uniquely named nodes and constants to a graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0
        self.constants: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, prefix: str, **attrs) -> str:
        self.count += 1
        out = f"{prefix}/{op_type}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            name = f"unmix.const_{len(self.constants)}"
            self.graph.initializer.append(numpy_helper.from_array(array, name))
            self.constants[key] = name
        return self.constants[key]


def _faithful_layer(b: _Builder, x: str, y: str, bn: onnx.NodeProto, layer: LayerSpec,
                    spec: AdaptationSpec) -> tuple[list[str], str]:
    """Emit one layer; returns (state output names, shift score name). Writes y."""
    pre = f"unmix/{layer.name}"
    _, gamma, beta, src_mean, src_var = bn.input
    means, variances = (contract.state_input(layer.name, t) for t in ("means", "vars"))
    row = b.const([1, -1], np.int64)
    col = b.const([-1, 1], np.int64)
    axis0 = b.const([0], np.int64)
    axis1 = b.const([1], np.int64)

    # ReduceMean, not GlobalAveragePool: its pairwise sums keep near-constant frames accurate
    spatial = b.const([2, 3], np.int64)
    mu4 = b.op("ReduceMean", x, spatial, prefix=pre, keepdims=1)
    centred = b.op("Sub", x, mu4, prefix=pre)
    var4 = b.op("ReduceMean", b.op("Mul", centred, centred, prefix=pre), spatial, prefix=pre, keepdims=1)
    mu = b.op("Reshape", mu4, row, prefix=pre)  # (1, C)
    var_x = b.op("Reshape", var4, row, prefix=pre)

    # p = softmax_k(cos(mu, M_k) / T), as a (K, 1) column that broadcasts over channels
    dot = b.op("MatMul", means, b.op("Reshape", mu4, col, prefix=pre), prefix=pre)
    norms = b.op("Mul", b.op("ReduceL2", means, axis1, prefix=pre, keepdims=1),
                 b.op("ReduceL2", mu, axis1, prefix=pre, keepdims=1), prefix=pre)
    cos = b.op("Div", dot, b.op("Max", norms, b.const(1e-12), prefix=pre), prefix=pre)
    p = b.op("Softmax", b.op("Mul", cos, b.const(1.0 / spec.temperature), prefix=pre), prefix=pre, axis=0)

    d_mean = b.op("Sub", mu, means, prefix=pre)
    d_var = b.op("Sub", var_x, variances, prefix=pre)
    mean_k = b.op("Add", means, b.op("Mul", p, d_mean, prefix=pre), prefix=pre)
    var_k = b.op("Add", variances, b.op("Mul", p, d_var, prefix=pre), prefix=pre)
    mean = b.op("ReduceMean", mean_k, axis0, prefix=pre, keepdims=0)
    second = b.op("Add", b.op("ReduceMean", var_k, axis0, prefix=pre, keepdims=0),
                  b.op("ReduceMean", b.op("Mul", mean_k, mean_k, prefix=pre), axis0, prefix=pre, keepdims=0),
                  prefix=pre)
    var = b.op("Sub", second, b.op("Mul", mean, mean, prefix=pre), prefix=pre)

    # adapt = 0 gives the source statistics exactly and leaves the components untouched
    mean_used = b.op("Add", src_mean, b.op("Mul", contract.ADAPT, b.op("Sub", mean, src_mean, prefix=pre),
                                           prefix=pre), prefix=pre)
    var_used = b.op("Add", src_var, b.op("Mul", contract.ADAPT, b.op("Sub", var, src_var, prefix=pre),
                                         prefix=pre), prefix=pre)
    b.nodes.append(helper.make_node("BatchNormalization", [x, gamma, beta, mean_used, var_used], [y],
                                    name=f"{pre}/normalize", epsilon=layer.eps))

    rate = b.op("Mul", p, b.op("Mul", contract.ADAPT, b.const([spec.momentum]), prefix=pre), prefix=pre)
    outs = []
    for name, state, delta in (("means", means, d_mean), ("vars", variances, d_var)):
        out = contract.state_output(layer.name, name)
        b.nodes.append(helper.make_node("Add", [state, b.op("Mul", rate, delta, prefix=pre)], [out],
                                        name=f"{pre}/update_{name}"))
        outs.append(out)
    return outs, _shift_score(b, pre, mu, var_x, src_mean, src_var, layer.eps)


def _shift_score(b: _Builder, pre: str, mu: str, var_x: str, src_mean: str, src_var: str, eps: float) -> str:
    """KL(N(mu, var) || N(source)) averaged over channels: 0 on source-like frames, grows with shift."""
    vs = b.op("Add", src_var, b.const(eps), prefix=pre)
    ratio = b.op("Div", b.op("Add", var_x, b.const(eps), prefix=pre), vs, prefix=pre)
    dm = b.op("Sub", mu, src_mean, prefix=pre)
    terms = b.op("Sub", b.op("Add", b.op("Div", b.op("Mul", dm, dm, prefix=pre), vs, prefix=pre), ratio,
                             prefix=pre),
                 b.op("Add", b.op("Log", ratio, prefix=pre), b.const(1.0), prefix=pre), prefix=pre)
    kl = b.op("ReduceMean", terms, b.const([1], np.int64), prefix=pre, keepdims=0)  # (1,)
    return b.op("Mul", kl, b.const(0.5), prefix=pre)


def batchnorm_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """BatchNormalization nodes by torch layer name (the scale initializer is '<layer>.weight')."""
    found = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            found[node.input[1].removesuffix(".weight")] = node
    return found


def make_adaptive(model: onnx.ModelProto, spec: AdaptationSpec) -> onnx.ModelProto:
    """Return a copy of `model` whose spec.layers are UnMix-TNS with state inputs/outputs."""
    if spec.mode != "faithful":
        raise ValueError(f"unknown adaptation mode {spec.mode!r}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    bns = batchnorm_nodes(model)
    b = _Builder(graph)
    graph.input.append(helper.make_tensor_value_info(contract.ADAPT, TensorProto.FLOAT, [1]))
    adapted = {layer.name: layer for layer in spec.layers}
    shifts, state_outs = [], []
    for node in graph.node:
        layer = adapted.get(node.input[1].removesuffix(".weight")) if node.op_type == "BatchNormalization" else None
        if layer is None:
            b.nodes.append(node)
            continue
        for tensor in spec.state_tensors:
            graph.input.append(helper.make_tensor_value_info(
                contract.state_input(layer.name, tensor), TensorProto.FLOAT, [spec.components, layer.channels]))
        outs, shift = _faithful_layer(b, node.input[0], node.output[0], node, layer, spec)
        state_outs += outs
        shifts.append(shift)
    missing = set(adapted) - set(bns)
    if missing:
        raise ValueError(f"layers {sorted(missing)} have no BatchNormalization node in the graph")
    b.nodes.append(helper.make_node("Concat", shifts, ["shift_flat"], name="unmix/shift_concat", axis=0))
    b.nodes.append(helper.make_node("Reshape", ["shift_flat", b.const([1, -1], np.int64)], [contract.SHIFT],
                                    name="unmix/shift"))
    del graph.node[:]
    graph.node.extend(b.nodes)
    graph.output.append(helper.make_tensor_value_info(contract.SHIFT, TensorProto.FLOAT, [1, len(shifts)]))
    for layer, out in zip([lay for lay in spec.layers for _ in spec.state_tensors], state_outs):
        graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [spec.components, layer.channels]))
    return model
