"""ONNX files read and built with protobuf alone: the agent's daemon never imports the `onnx` package.

`import onnx` loads its C++ operator library (about 15 MB of resident memory on a daemon that has
200 MB); the agent only needs the message classes, which are plain protobuf in `onnx/onnx_ml_pb2.py`.
That module is loaded by itself under its own name, so a later `import onnx` (the exporter, the tests)
reuses it and both see the same classes.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np


def _message_classes():
    name = "onnx.onnx_ml_pb2"
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.find_spec("onnx")
    origin = Path(found.origin).parent / "onnx_ml_pb2.py" if found and found.origin else None
    if origin is None or not origin.is_file():  # an onnx release laid out differently: the whole package
        import onnx
        return onnx
    spec = importlib.util.spec_from_file_location(name, origin)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_pb = _message_classes()
ModelProto, GraphProto, NodeProto, TensorProto = _pb.ModelProto, _pb.GraphProto, _pb.NodeProto, _pb.TensorProto
AttributeProto = _pb.AttributeProto

_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.INT64: np.int64,
           TensorProto.INT32: np.int32, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
           TensorProto.BOOL: np.bool_}
_TYPED_FIELDS = {TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data", TensorProto.INT64: "int64_data",
                 TensorProto.INT32: "int32_data", TensorProto.INT8: "int32_data", TensorProto.UINT8: "int32_data",
                 TensorProto.BOOL: "int32_data"}


def load(path: str | Path) -> ModelProto:
    model = ModelProto()
    model.ParseFromString(Path(path).read_bytes())
    return model


def dtype(data_type: int) -> type:
    if data_type not in _DTYPES:
        raise ValueError(f"tensor element type {TensorProto.DataType.Name(data_type)} is not one the agent reads")
    return _DTYPES[data_type]


def to_array(tensor: TensorProto) -> np.ndarray:
    if tensor.data_location == TensorProto.EXTERNAL:
        raise ValueError(f"tensor {tensor.name} is stored outside the file; export the model as one file")
    kind = dtype(tensor.data_type)
    if tensor.raw_data:
        values = np.frombuffer(tensor.raw_data, dtype=np.dtype(kind).newbyteorder("<")).astype(kind)
    else:
        values = np.asarray(getattr(tensor, _TYPED_FIELDS[tensor.data_type]), dtype=kind)
    return values.reshape(tuple(tensor.dims))


def from_array(values: np.ndarray, name: str) -> TensorProto:
    values = np.ascontiguousarray(values)
    codes = {np.dtype(kind): code for code, kind in _DTYPES.items()}
    tensor = TensorProto(name=name, data_type=codes[values.dtype], dims=values.shape)
    tensor.raw_data = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
    return tensor


def attribute_values(node: NodeProto) -> dict:
    """The node's attributes that the agent evaluates (integers, floats and their lists), by name."""
    fields = {AttributeProto.INT: "i", AttributeProto.FLOAT: "f", AttributeProto.INTS: "ints",
              AttributeProto.FLOATS: "floats"}
    values = {}
    for attribute in node.attribute:
        if attribute.type not in fields:
            raise ValueError(f"node {node.name or node.op_type}: attribute {attribute.name} is not a number")
        value = getattr(attribute, fields[attribute.type])
        values[attribute.name] = list(value) if attribute.type in (AttributeProto.INTS, AttributeProto.FLOATS) \
            else value
    return values
