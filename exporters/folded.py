"""The folded layout: UnMix-TNS whose arithmetic runs outside the graph, BatchNorm folded into INT8 convolutions.

The per-layer graph of exporters/graph.py costs 5.5 plain INT8 frames: BatchNorm cannot be
folded, activations are quantized before normalisation, and every layer adds ~55 small
nodes. Here a frame is normalised with statistics the agent computed from the components
after the previous frame (agent/model/mixture.py, all layers in one vectorised step), so the graph
only has to apply a per-channel affine and report statistics:

- INT8: each adapted BatchNorm is folded into the QLinearConv before it; the affine enters
  as that convolution's per-channel weight scale and int32 bias (graph inputs
  `norm.<layer>.w_scale`, `norm.<layer>.bias`). The INT8 kernels, onnxruntime's NHWC
  layout and the activation fused into the output range all survive.
- Statistics: a second QLinearConv per layer with the same weights and a stride `r` times
  larger computes the pre-activation at every r-th position (r chosen for about 7x7
  positions); all of them are concatenated and reduced in one go, then mapped back to the
  convolution's output space. Output `stats` (2, channels of all layers): mean, variance.
- FP32: BatchNormalization with `norm.<layer>.mean` / `.var` inputs, statistics on the same
  positions, so FP32 and INT8 run the same algorithm.

Every adapted BatchNorm must follow a convolution that nothing else reads; other models
keep the graph layout (tta-export --layout graph).
"""
from __future__ import annotations

import collections
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from agent import contract
from agent.contract import AdaptationSpec

from .export import ExportError
from .graph import batchnorm_nodes

MIN_POSITIONS = 49  # statistics positions per layer (7x7); fewer cost less, more are less noisy
STATS_RANGE = 8.0  # source standard deviations either side of the source mean that INT8 statistics can see


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    readers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    return readers


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _prune(graph: onnx.GraphProto, keep: frozenset = frozenset()) -> None:
    """Drop nodes nothing reads, then initializers nothing reads (but those in `keep`)."""
    nodes = list(graph.node)
    wanted = {o.name for o in graph.output}
    while True:
        used = {i for n in nodes for i in n.input} | wanted
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | keep
    kept_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)


def fuse_padding(model: onnx.ModelProto) -> onnx.ModelProto:
    """Zero Pad -> Conv becomes the Conv's own pads: an explicit Pad costs a quantize/dequantize pair."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    values, readers = _constants(model), _consumers(model)
    kept = []
    for node in model.graph.node:
        if node.op_type == "Pad" and _attrs(node).get("mode", b"constant") in (b"constant", "constant"):
            pads = values.get(node.input[1])
            fill = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
            convs = readers[node.output[0]]
            if (pads is not None and fill is not None and float(fill) == 0 and len(pads) == 8
                    and not pads[[0, 1, 4, 5]].any() and len(convs) == 1 and convs[0].op_type == "Conv"):
                conv = convs[0]
                extra = [int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])]
                old = [a for a in conv.attribute if a.name == "pads"]
                if old:
                    extra = [a + b for a, b in zip(extra, old[0].ints)]
                    conv.attribute.remove(old[0])
                conv.attribute.append(helper.make_attribute("pads", extra))
                conv.input[0] = node.input[0]
                continue
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _prune(model.graph)
    return model


def _conv_before(model: onnx.ModelProto, bn: onnx.NodeProto) -> onnx.NodeProto | None:
    producers = {o: n for n in model.graph.node for o in n.output}
    conv = producers.get(bn.input[0])
    if conv is None or conv.op_type != "Conv" or len(_consumers(model)[bn.input[0]]) != 1:
        return None
    return conv


def sampling(model: onnx.ModelProto, spec: AdaptationSpec) -> dict[str, tuple[int, tuple[int, int]]]:
    """Per layer, the largest power-of-two subsampling r that keeps MIN_POSITIONS positions, and the
    statistics grid it gives."""
    bns = batchnorm_nodes(model)
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    strides = {}
    for layer in (x.name for x in spec.layers):
        shape = shapes.get(bns[layer].input[0])
        if not shape or len(shape) != 4 or not all(shape[2:]):
            raise ExportError(f"layer {layer}: the folded layout needs a static spatial size")
        h, w = shape[2:]
        r = 1
        while math.ceil(h / (2 * r)) * math.ceil(w / (2 * r)) >= MIN_POSITIONS:
            r *= 2
        strides[layer] = (r, (math.ceil(h / r), math.ceil(w / r)))
    return strides


def _split_norm(graph: onnx.GraphProto, nodes: list, spec: AdaptationSpec, vectors: dict[str, str]) -> None:
    """Each (channels of all layers,) vector in `vectors` split into per-layer tensors '<name>/<layer>'."""
    sizes = "norm/sizes"
    graph.initializer.append(numpy_helper.from_array(np.array([x.channels for x in spec.layers], np.int64), sizes))
    for name, vector in vectors.items():
        nodes.append(helper.make_node("Split", [vector, sizes], [f"{name}/{x.name}" for x in spec.layers], axis=0))


def _norm_inputs(graph: onnx.GraphProto, spec: AdaptationSpec) -> None:
    total = sum(x.channels for x in spec.layers)
    for name in (contract.NORM_MEAN, contract.NORM_VAR):
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [total]))
    graph.output.append(helper.make_tensor_value_info(contract.STATS, TensorProto.FLOAT, [2, total]))


def adaptive_fp32(model: onnx.ModelProto, spec: AdaptationSpec, sampled: dict) -> onnx.ModelProto:
    """BatchNormalization on the `norm.mean` / `norm.var` inputs; statistics of its input on the sampled positions."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    bns = batchnorm_nodes(model)
    consts = {"stats/axes": np.array([2, 3], np.int64), "stats/starts": np.zeros(2, np.int64),
              "stats/ends": np.full(2, 1 << 30, np.int64), "stats/zero": np.zeros((), np.float32)}
    consts.update({f"stats/steps{r}": np.array([r, r], np.int64) for r, _ in sampled.values()})
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    _norm_inputs(graph, spec)
    nodes: list = []
    _split_norm(graph, nodes, spec, {"norm/mean": contract.NORM_MEAN, "norm/var": contract.NORM_VAR})
    by_node = {bns[x.name].name: x for x in spec.layers}
    means, seconds = [], []
    for node in graph.node:
        layer = by_node.get(node.name)
        if layer is not None:
            x, prefix, r = node.input[0], f"stats/{layer.name}", sampled[layer.name][0]
            if r > 1:
                nodes.append(helper.make_node("Slice", [x, "stats/starts", "stats/ends", "stats/axes",
                                                        f"stats/steps{r}"], [f"{prefix}/sample"]))
                x = f"{prefix}/sample"
            nodes.append(helper.make_node("ReduceMean", [x, "stats/axes"], [f"{prefix}/mean"], keepdims=0))
            nodes.append(helper.make_node("Mul", [x, x], [f"{prefix}/square"]))
            nodes.append(helper.make_node("ReduceMean", [f"{prefix}/square", "stats/axes"], [f"{prefix}/second"],
                                          keepdims=0))
            means.append(f"{prefix}/mean")
            seconds.append(f"{prefix}/second")
            node.input[3], node.input[4] = f"norm/mean/{layer.name}", f"norm/var/{layer.name}"
        nodes.append(node)
    nodes.append(helper.make_node("Concat", means, ["stats/means"], axis=1))
    nodes.append(helper.make_node("Concat", seconds, ["stats/seconds"], axis=1))
    nodes.append(helper.make_node("Mul", ["stats/means", "stats/means"], ["stats/mean_sq"]))
    nodes.append(helper.make_node("Sub", ["stats/seconds", "stats/mean_sq"], ["stats/var_raw"]))
    nodes.append(helper.make_node("Max", ["stats/var_raw", "stats/zero"], ["stats/var"]))
    nodes.append(helper.make_node("Concat", ["stats/means", "stats/var"], [contract.STATS], axis=0))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def fold_batchnorm(model: onnx.ModelProto, spec: AdaptationSpec) -> tuple[onnx.ModelProto, dict[str, str], dict]:
    """The plain model with the source statistics folded into the convolution before every BatchNorm
    that follows one (what gets calibrated and quantized; layers not adapted stay folded for good);
    returns it, each adapted layer's convolution node name, and each adapted layer's (gamma, beta,
    source mean, source variance, convolution bias)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    values = _constants(model)
    adapted = {layer.name: layer.eps for layer in spec.layers}
    folded, convs, batchnorms = set(), {}, {}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    for layer, bn in batchnorm_nodes(model).items():
        conv = _conv_before(model, bn)
        if conv is None:
            if layer in adapted:
                raise ExportError(f"layer {layer}: the folded layout needs a Conv read only by this BatchNorm; "
                                  f"export with --layout graph")
            continue
        eps = adapted.get(layer, _attrs(bn).get("epsilon", 1e-5))
        gamma, beta, mean, var = (values[name].astype(np.float64) for name in bn.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        weight = values[conv.input[1]].astype(np.float64)
        bias = (values[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2]
                else np.zeros_like(gamma))
        w_name, b_name = f"{layer}.folded_weight", f"{layer}.folded_bias"
        graph.initializer.append(numpy_helper.from_array(
            (weight * scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32), w_name))
        graph.initializer.append(numpy_helper.from_array((beta + (bias - mean) * scale).astype(np.float32), b_name))
        conv.input[:] = [conv.input[0], w_name, b_name]
        conv.output[0] = bn.output[0]
        folded.add(bn.name)
        if layer in adapted:
            convs[layer], batchnorms[layer] = conv.name, (gamma, beta, mean, var, bias)
    kept = [n for n in graph.node if n.name not in folded]
    del graph.node[:]
    graph.node.extend(kept)
    _prune(graph)
    return model, convs, batchnorms


class _Int8Builder:
    """Rewrites a QDQ model (onnxruntime.quantization output of the folded model) into QLinearConv
    nodes with the adapted layers' scale and bias as inputs, plus the statistics branch."""

    def __init__(self, qdq: onnx.ModelProto):
        self.model = onnx.ModelProto.FromString(qdq.SerializeToString())
        self.graph = self.model.graph
        self.values = _constants(self.model)
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.readers = _consumers(self.model)
        self.removed: set[str] = set()
        self.added: list[onnx.NodeProto] = []

    def const(self, name: str, value) -> str:
        if name not in self.values:
            array = np.asarray(value)
            self.graph.initializer.append(numpy_helper.from_array(array, name))
            self.values[name] = array
        return name

    def qlinear_conv(self, conv: onnx.NodeProto, weight_scale: str | None = None, bias: str | None = None
                     ) -> tuple[onnx.NodeProto, dict]:
        """Replace DQ(x), DQ(w), DQ(b) -> Conv -> Q by one QLinearConv; returns it and its parts."""
        dqs = [self.producers.get(name) for name in conv.input if name]
        readers = self.readers[conv.output[0]]
        if not (all(n is not None and n.op_type == "DequantizeLinear" for n in dqs) and len(readers) == 1
                and readers[0].op_type == "QuantizeLinear"):
            raise ExportError(f"convolution {conv.name} was not quantized as DQ -> Conv -> Q")
        x_dq, w_dq, q = dqs[0], dqs[1], readers[0]
        parts = {"x": list(x_dq.input[:3]), "w": w_dq.input[0], "w_scale": w_dq.input[1], "w_zero": w_dq.input[2],
                 "bias": dqs[2].input[0] if len(dqs) > 2 else "", "attrs": _attrs(conv), "y": list(q.input[1:3])}
        node = helper.make_node("QLinearConv", [*parts["x"], parts["w"], weight_scale or parts["w_scale"],
                                                parts["w_zero"], *parts["y"], bias or parts["bias"]],
                                [q.output[0]], name=f"{conv.name}/qlinear", **parts["attrs"])
        self.added.append(node)
        self.removed |= {conv.name, q.name, *(n.name for n in dqs[1:])}
        return node, parts

    def finish(self, keep: frozenset = frozenset()) -> onnx.ModelProto:
        nodes = [n for n in self.graph.node if n.name not in self.removed] + self.added
        ready = {i.name for i in self.graph.input} | {t.name for t in self.graph.initializer} | set(self.values) | {""}
        ordered = []
        while nodes:
            waiting = []
            for node in nodes:
                if all(name in ready for name in node.input):
                    ordered.append(node)
                    ready |= set(node.output)
                else:
                    waiting.append(node)
            if len(waiting) == len(nodes):
                raise ExportError(f"INT8 rewrite left nodes without inputs: {[n.name for n in waiting[:3]]}")
            nodes = waiting
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        _prune(self.graph, keep)
        return self.model


def adaptive_int8(qdq: onnx.ModelProto, spec: AdaptationSpec, convs: dict[str, str], sampled: dict,
                  batchnorms: dict) -> onnx.ModelProto:
    """The QDQ model of the folded model, rewritten: adapted layers' QLinearConv take their scale and
    bias from `norm.mean` / `norm.var` (a dozen ops on the concatenated vectors), and report statistics."""
    b = _Int8Builder(qdq)
    layer_of = {v: k for k, v in convs.items()}
    parts_of, branches = {}, collections.defaultdict(list)  # statistics grid -> layers whose outputs concatenate
    for conv in [n for n in b.graph.node if n.op_type == "Conv"]:
        layer = layer_of.get(conv.name)
        if layer is None:
            b.qlinear_conv(conv)
            continue
        _, parts_of[layer] = b.qlinear_conv(conv, f"norm/w_scale/{layer}", f"norm/bias/{layer}")
        branches[sampled[layer][1]].append(layer)
    _norm_inputs(b.graph, spec)
    _int8_norm(b, spec, parts_of, batchnorms)
    _int8_statistics(b, spec, parts_of, branches, sampled, batchnorms)
    for layer in spec.layers:  # the contract's source statistics, from which the agent's components start
        b.const(layer.source_mean, batchnorms[layer.name][2].astype(np.float32))
        b.const(layer.source_var, batchnorms[layer.name][3].astype(np.float32))
    return b.finish(frozenset(n for x in spec.layers for n in (x.source_mean, x.source_var)))


def _int8_statistics(b: _Int8Builder, spec: AdaptationSpec, parts_of: dict, branches: dict, sampled: dict,
                     batchnorms: dict) -> None:
    """Per layer, the convolution again at every r-th position, standardised per channel by its
    weight scale and bias: u = (z - beta) / sd(z) with z = gamma (x - m_src) / sqrt(v_src + eps) + beta,
    so one uint8 range (+-STATS_RANGE source deviations) fits every channel. Then all layers are
    reduced at once and mapped back: mean(x) = m_src + sign(gamma) sd_src mean(u), var(x) = v_src var(u).

    The reductions run on the uint8 codes cast to float, and the code scale and zero point are applied
    to the (channels,) moments: a DequantizeLinear read twice is duplicated by onnxruntime (one per
    reader), and the codes' sums of squares (at most 49 x 255^2) are exact in float32."""
    spec_layers = {x.name: x for x in spec.layers}
    code_scale, code_zero = 2 * STATS_RANGE / 255, 128
    out_scale = b.const("stats/scale", np.float32(code_scale))
    out_zero = b.const("stats/zero_point", np.uint8(code_zero))
    axes = b.const("stats/axes", np.array([2, 3], np.int64))
    means, variances, order, trusted, signs = [], [], [], {}, {}
    for g, (grid, members) in enumerate(branches.items()):
        for layer in members:
            parts, r = parts_of[layer], sampled[layer][0]
            gamma, beta, _, var, _ = batchnorms[layer]
            sd_z = np.abs(gamma) * np.sqrt(var / (var + spec_layers[layer].eps))
            trusted[layer], signs[layer] = sd_z > 1e-6, np.where(gamma < 0, -1.0, 1.0)
            w_scale = np.broadcast_to(b.values[parts["w_scale"]], gamma.shape).astype(np.float64)
            x_scale = float(b.values[parts["x"][1]])
            bias = b.values[parts["bias"]].astype(np.int64) - np.round(beta / (x_scale * w_scale)).astype(np.int64)
            attrs = dict(parts["attrs"])
            attrs["strides"] = [s * r for s in attrs.get("strides", [1, 1])]
            standardise = (w_scale / np.where(trusted[layer], sd_z, 1.0)).astype(np.float32)
            b.added.append(helper.make_node(
                "QLinearConv", [*parts["x"], parts["w"], b.const(f"stats/{layer}/w_scale", standardise),
                                parts["w_zero"], out_scale, out_zero,
                                b.const(f"stats/{layer}/bias", bias.astype(np.int32))],
                [f"stats/{layer}/q"], name=f"stats/{layer}/conv", **attrs))
        group = f"stats/group{g}"
        ops = [("Concat", [f"stats/{layer}/q" for layer in members], f"{group}/q", {"axis": 1}),
               ("Cast", [f"{group}/q"], f"{group}/codes", {"to": TensorProto.FLOAT}),
               ("ReduceMean", [f"{group}/codes", axes], f"{group}/mean", {"keepdims": 0}),
               ("ReduceSumSquare", [f"{group}/codes", axes], f"{group}/sum_sq", {"keepdims": 0}),
               ("Mul", [f"{group}/sum_sq", b.const(f"{group}/per_position", np.float32(1 / (grid[0] * grid[1])))],
                f"{group}/second", {}),
               ("Mul", [f"{group}/mean", f"{group}/mean"], f"{group}/mean_sq", {}),
               ("Sub", [f"{group}/second", f"{group}/mean_sq"], f"{group}/var", {})]
        b.added += [helper.make_node(op, inputs, [out], **attrs) for op, inputs, out, attrs in ops]
        means.append(f"{group}/mean")
        variances.append(f"{group}/var")
        order += members
    start, offsets = 0, {}
    for layer in order:
        offsets[layer] = np.arange(start, start + spec_layers[layer].channels)
        start += spec_layers[layer].channels
    order = np.concatenate([offsets[x.name] for x in spec.layers]).astype(np.int64)
    for rows, name in ((means, "mean"), (variances, "var")):
        grouped = rows[0] if len(rows) == 1 else f"stats/{name}_grouped"
        if len(rows) > 1:
            b.added.append(helper.make_node("Concat", rows, [grouped], axis=1))
        if np.array_equal(order, np.arange(len(order))):  # one grid in spec order (EfficientNet): no Gather
            b.added.append(helper.make_node("Identity", [grouped], [f"stats/{name}_codes"]))
        else:
            b.added.append(helper.make_node("Gather", [grouped, b.const("stats/order", order)],
                                            [f"stats/{name}_codes"], axis=1))
    cat = lambda values: np.concatenate(values).astype(np.float32)[None]  # noqa: E731
    src_mean = cat([batchnorms[x.name][2] for x in spec.layers])
    src_var = cat([batchnorms[x.name][3] for x in spec.layers])
    ok = np.concatenate([trusted[x.name] for x in spec.layers])[None]
    signed_sd = cat([signs[x.name] for x in spec.layers]) * np.sqrt(src_var)
    c = lambda name, value: b.const(f"stats/{name}", value)  # noqa: E731
    # mean(u) = code_scale (mean of codes - zero point), var(u) = code_scale^2 var(codes)
    ops = [("Sub", ["stats/mean_codes", c("code_zero", np.float32(code_zero))], "stats/mean_centred"),
           ("Mul", ["stats/mean_centred", c("signed_sd_per_code", signed_sd * code_scale)], "stats/mean_offset"),
           ("Add", ["stats/mean_offset", c("src_mean", src_mean)], "stats/mean_x"),
           ("Mul", ["stats/var_codes", c("src_var_per_code", src_var * code_scale ** 2)], "stats/var_x"),
           ("Where", [c("trusted", ok), "stats/mean_x", "stats/src_mean"], "stats/means"),
           ("Where", ["stats/trusted", "stats/var_x", c("src_var", src_var)], "stats/var_trusted"),
           ("Max", ["stats/var_trusted", c("zero", np.zeros((), np.float32))], "stats/var")]
    b.added += [helper.make_node(op, inputs, [out]) for op, inputs, out in ops]
    b.added.append(helper.make_node("Concat", ["stats/means", "stats/var"], [contract.STATS], axis=0))


def _int8_norm(b: _Int8Builder, spec: AdaptationSpec, parts_of: dict, batchnorms: dict) -> None:
    """norm.mean / norm.var -> each adapted QLinearConv's weight scale and int32 bias.

    The folded weights carry the source scale gamma / sqrt(v_src + eps); normalising with (m, v)
    instead multiplies the output by sqrt(v_src + eps) / sqrt(v + eps) (a weight scale) and needs the
    bias beta - (m - conv bias) gamma / sqrt(v + eps), quantized with the input scale times that weight scale."""
    cat = lambda values: np.concatenate(values).astype(np.float32)  # noqa: E731
    layers = spec.layers
    eps = cat([np.full(x.channels, x.eps) for x in layers])
    gamma = cat([batchnorms[x.name][0] for x in layers])
    beta = cat([batchnorms[x.name][1] for x in layers])
    conv_bias = cat([batchnorms[x.name][4] for x in layers])
    src_root = cat([np.sqrt(batchnorms[x.name][3] + x.eps) for x in layers])
    w_scale_src = cat([np.broadcast_to(b.values[parts_of[x.name]["w_scale"]], (x.channels,)) for x in layers])
    x_scale = cat([np.full(x.channels, float(b.values[parts_of[x.name]["x"][1]])) for x in layers])
    c = lambda name, value: b.const(f"norm/{name}", value)  # noqa: E731
    ops = [("Add", [contract.NORM_VAR, c("eps", eps)], "norm/var_eps"),
           ("Sqrt", ["norm/var_eps"], "norm/root"),
           ("Reciprocal", ["norm/root"], "norm/inv_root"),
           ("Mul", ["norm/inv_root", c("w_scale_src_root", w_scale_src * src_root)], "norm/w_scale"),
           ("Mul", ["norm/inv_root", c("gamma", gamma)], "norm/scale"),
           ("Sub", [contract.NORM_MEAN, c("conv_bias", conv_bias)], "norm/mean_unbiased"),
           ("Mul", ["norm/mean_unbiased", "norm/scale"], "norm/mean_scaled"),
           ("Sub", [c("beta", beta), "norm/mean_scaled"], "norm/shift"),
           ("Mul", ["norm/w_scale", c("x_scale", x_scale)], "norm/bias_scale"),
           ("Div", ["norm/shift", "norm/bias_scale"], "norm/bias_float"),
           ("Round", ["norm/bias_float"], "norm/bias_round"),
           ("Cast", ["norm/bias_round"], "norm/bias")]
    nodes = [helper.make_node(op, inputs, [out], **({"to": TensorProto.INT32} if op == "Cast" else {}))
             for op, inputs, out in ops]
    _split_norm(b.graph, nodes, spec, {"norm/w_scale": "norm/w_scale", "norm/bias": "norm/bias"})
    b.added += nodes


def build_fp32(plain: onnx.ModelProto, spec: AdaptationSpec) -> onnx.ModelProto:
    """export_plain's model -> the folded layout's FP32 graph (BatchNorm kept, statistics sampled)."""
    plain = fuse_padding(plain)
    return adaptive_fp32(plain, spec, sampling(plain, spec))


def with_source_statistics(fp32: onnx.ModelProto, spec: AdaptationSpec) -> onnx.ModelProto:
    """The folded FP32 graph as a plain classifier again: BatchNorm on the source statistics, no statistics output."""
    model = onnx.ModelProto.FromString(fp32.SerializeToString())
    graph = model.graph
    source = {f"norm/mean/{x.name}": x.source_mean for x in spec.layers}
    source.update({f"norm/var/{x.name}": x.source_var for x in spec.layers})
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            node.input[3:5] = [source.get(name, name) for name in node.input[3:5]]
    kept_out = [o for o in graph.output if o.name != contract.STATS]
    del graph.output[:]
    graph.output.extend(kept_out)
    kept_in = [i for i in graph.input if i.name not in (contract.NORM_MEAN, contract.NORM_VAR)]
    del graph.input[:]
    graph.input.extend(kept_in)
    _prune(graph)
    return model


def int8_model(fp32: onnx.ModelProto, spec: AdaptationSpec, images: list[np.ndarray], quantize) -> onnx.ModelProto:
    """Fold the source statistics into the convolutions, quantize that plain model with
    `quantize(model, feeds) -> QDQ model` on the calibration images, and rewrite it adaptive."""
    plain = with_source_statistics(fp32, spec)
    sampled = sampling(plain, spec)
    folded, convs, batchnorms = fold_batchnorm(plain, spec)
    qdq = quantize(folded, [{contract.IMAGE: image} for image in images])
    return adaptive_int8(qdq, spec, convs, sampled, batchnorms)
