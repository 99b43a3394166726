"""Smaller files for the same computation: attributes that restate a default, and long internal names.

A quantized model's weights are a quarter of the float ones, so what used to be noise in the file
(a Conv's `dilations=[1, 1]`, an exporter's `/backbone/stage3/conv/Conv_output_0`) becomes a
visible share of a small model. Neither pass changes what the graph computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_value, is_standard, node_subgraphs, producer, tensor_map, walk
from onnxslim.manager import PassContext, PassResult, register_pass

# Ops whose spatial attributes default to "1 along each axis" (strides, dilations) and "0 at each
# edge" (pads); onnx.defs records no default for them because the length depends on the rank.
SPATIAL_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"}
ONES = ("strides", "dilations")
# Conv-like ops read kernel_shape from the weight when it is absent (ONNX spec), at this input.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "ConvInteger": 1, "QLinearConv": 3}
# A weight reaches its layer through these (int8 storage: Cast, scale Mul, DequantizeLinear).
WEIGHT_CARRIERS = {"Cast", "Mul", "DequantizeLinear"}


@register_pass("drop-default-attributes")
def drop_default_attributes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Leave out attributes equal to their default (schema defaults, unit strides/dilations, zero pads, kernel_shape of the weight)."""
    opsets = {entry.domain: entry.version for entry in getattr(graph, "import_domains", None) or []}
    opsets[""] = opsets["ai.onnx"] = graph.opset
    dropped = 0
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            if not is_standard(node) or node_subgraphs(node):
                continue
            for name in [name for name, value in node.attrs.items() if _is_default(node, name, value, opsets)]:
                del node.attrs[name]
                dropped += 1
    return PassResult(dropped=dropped)


@register_pass("shorten-names")
def shorten_names(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Give internal tensors short names; the graph's inputs and outputs keep theirs."""
    if any(node_subgraphs(node) for node in graph.nodes):
        return PassResult(renamed=0)  # bodies read outer tensors by name; left as they are
    interface = {tensor.name for tensor in graph.inputs + graph.outputs}
    tensors = tensor_map(graph)
    taken = set(tensors)  # a new name never equals an old one, renamed or not
    renamed, index = 0, 0
    for name, tensor in tensors.items():
        if not name or name in interface:
            continue
        while _base36(index) in taken:
            index += 1
        short = _base36(index)
        if len(short) < len(name):
            tensor.name = short
            taken.add(short)
            renamed += 1
    return PassResult(renamed=renamed)


def _is_default(node: gs.Node, name: str, value, opsets: dict) -> bool:
    if node.op in SPATIAL_OPS and name in ONES + ("pads",) and isinstance(value, (list, tuple)):
        return all(item == (0 if name == "pads" else 1) for item in value)
    if name == "kernel_shape" and node.op in WEIGHT_INPUT:
        dims = _weight_dims(node)
        return dims is not None and list(value) == list(dims[2:])
    try:
        schema = onnx.defs.get_schema(node.op, opsets.get(node.domain or "", opsets[""]), node.domain or "")
    except onnx.defs.SchemaError:
        return False
    attribute = schema.attributes.get(name)
    if attribute is None or not attribute.default_value.name:
        return False
    default = onnx.helper.get_attribute_value(attribute.default_value)
    if isinstance(default, float) and isinstance(value, float):
        return np.float32(default) == np.float32(value)
    if isinstance(default, bytes):
        default = default.decode()
    return type(default) is type(value) and default == value


def _weight_dims(node: gs.Node) -> tuple[int, ...] | None:
    """The weight's shape, followed back through its int8 storage to the stored tensor."""
    index = WEIGHT_INPUT[node.op]
    if len(node.inputs) <= index:
        return None
    tensor = node.inputs[index]
    scales = []  # a Mul's other input must not broadcast the weight along a kernel axis
    for _ in range(4):
        value = constant_value(tensor)
        if value is not None:
            return value.shape if all(_keeps_kernel(value.ndim, scale) for scale in scales) else None
        source = producer(tensor)
        if source is None or source.op not in WEIGHT_CARRIERS or not source.inputs:
            return None
        if source.op == "Mul":
            scale = constant_value(source.inputs[1]) if len(source.inputs) > 1 else None
            if scale is None:
                return None
            scales.append(scale)
        tensor = source.inputs[0]
    return None


def _keeps_kernel(weight_ndim: int, scale: np.ndarray) -> bool:
    """Multiplying a rank-`weight_ndim` weight by `scale` leaves its kernel axes (2 on) as they are."""
    if scale.ndim > weight_ndim:
        return False
    padded = (1,) * (weight_ndim - scale.ndim) + scale.shape
    return all(size == 1 for size in padded[2:])


def _base36(index: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = digits[index % 36]
    while index >= 36:
        index = index // 36 - 1
        text = digits[index % 36] + text
    return text
