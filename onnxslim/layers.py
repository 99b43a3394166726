"""What onnxslim knows of the layers that own channels: Conv, ConvTranspose, Gemm and MatMul with
a weight. Which axis of the weight holds the output and the input channels, where the bias sits,
how many multiply-adds a layer does, and how many parameters a model holds.

The passes (fusions over `passes/_linear.py`, quantize-int8), pruning, quantization,
reconstruction and the benchmark all read it from here. The axes and channel counts take a
graph-surgeon node or a NodeProto alike; the lookups in a graph (bias, constant weight, MACs of
a node) take graph-surgeon nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import onnx
import onnx.helper
import onnx_graphsurgeon as gs

from .graph import constant_value, is_empty, is_standard, proto_graphs

# Layers whose weight (input 1) owns output channels and reads input channels.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Conv, ConvTranspose and Gemm read their bias here; a MatMul's bias is the Add after it (bias_add).
BIAS_INPUT = 2
# Convolutions and matrix products, integer forms included (multiply_adds counts them all).
CONVOLUTIONS = ("Conv", "ConvInteger", "QLinearConv")
MATRIX_PRODUCTS = ("MatMul", "MatMulInteger", "QLinearMatMul")


def weight_input(op: str) -> int:
    """The input that holds a layer's weight (its second factor): 1, or 3 in the QLinear forms
    (after the data's scale and zero point)."""
    return 3 if op in ("QLinearConv", "QLinearMatMul") else 1


class Axes(NamedTuple):
    """The axes of a layer's weight that hold its output and its input channels."""

    output: int
    input: int


def attributes(node: gs.Node | onnx.NodeProto) -> Mapping:
    """The node's attributes as a mapping of name to value (set ones only; callers give defaults)."""
    if isinstance(node, onnx.NodeProto):
        return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    return node.attrs


def op_of(node: gs.Node | onnx.NodeProto) -> str:
    return node.op_type if isinstance(node, onnx.NodeProto) else node.op


def weight_axes(node: gs.Node | onnx.NodeProto, rank: int) -> Axes:
    """The output- and input-channel axes of the layer's weight of rank `rank`:
    Conv [Cout, Cin/group, k...], ConvTranspose [Cin, Cout/group, k...], Gemm [K, N]
    ([N, K] with transB), MatMul [..., K, N]."""
    op = op_of(node)
    if op == "Conv":
        return Axes(0, 1)
    if op == "ConvTranspose":
        return Axes(1, 0)
    if op == "Gemm":
        return Axes(0, 1) if attributes(node).get("transB", 0) else Axes(1, 0)
    return Axes(rank - 1, rank - 2)  # MatMul


def output_axis(node: gs.Node | onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of a layer's weight (see weight_axes)."""
    return weight_axes(node, rank).output


def channels(node: gs.Node | onnx.NodeProto, shape: Sequence[int]) -> tuple[int, int]:
    """(input channels, output channels) of a layer whose weight has `shape`: a convolution's
    grouped axis counts one group's channels."""
    axes = weight_axes(node, len(shape))
    group = int(attributes(node).get("group", 1))
    op = op_of(node)
    inputs = shape[axes.input] * (group if op == "Conv" else 1)
    outputs = shape[axes.output] * (group if op == "ConvTranspose" else 1)
    return inputs, outputs


def bias_add(node: gs.Node) -> tuple[gs.Node, int] | None:
    """(the Add, the index of its other operand) when a standard Add of two operands alone reads
    a MatMul's output: the Add holds the MatMul's bias, if that operand is one (callers check)."""
    if not node.outputs or len(node.outputs[0].outputs) != 1:
        return None
    add = node.outputs[0].outputs[0]
    if add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
        return None
    return add, 1 if add.inputs[0] is node.outputs[0] else 0


def bias_slot(node: gs.Node) -> tuple[gs.Node, int] | None:
    """(node, input index) where a layer's bias would sit: BIAS_INPUT of a Conv, ConvTranspose or
    Gemm that has one, the other operand of a MatMul's bias_add; None without (callers check
    that it is a constant of the shape they need)."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return (node, BIAS_INPUT) if len(node.inputs) > BIAS_INPUT and not is_empty(node.inputs[BIAS_INPUT]) else None
    return bias_add(node) if node.op == "MatMul" else None


def constant_weight(node: gs.Node) -> np.ndarray | None:
    """The layer's weight (input 1) if it is a constant, else None."""
    return constant_value(node.inputs[1]) if len(node.inputs) >= 2 else None


# ----------------------------------------------------------------------------- counting


def layer_macs(node: gs.Node) -> int | None:
    """Multiply-adds of one sample of a layer (LAYER_OPS) with a constant weight, from the
    graph's inferred shapes (None where the sizes needed are unknown)."""
    if node.op not in LAYER_OPS or len(node.inputs) < 2 or not node.outputs:
        return None
    weight = constant_weight(node)
    if weight is None:
        return None
    return multiply_adds(node.op, node.attrs, node.inputs[0].shape, weight.shape, node.outputs[0].shape, per_sample=True)


def multiply_adds(op: str, attrs: Mapping, data, weight, output, *, per_sample: bool = False) -> int | None:
    """Multiply-adds of a layer (Conv, ConvTranspose, Gemm, MatMul and their integer forms) from
    the shapes of its data input, its weight and its output (None, or a dim that is not an int,
    where unknown); None when the shapes needed are unknown. `per_sample`: of one sample, the
    leading (batch) dim left out, which then need not be known. A channel count the activation
    shapes leave unknown is read from the weight."""
    data, weight, output = _dims(data), _dims(weight), _dims(output)
    if weight is None and op not in MATRIX_PRODUCTS:
        return None
    if op in CONVOLUTIONS:  # each output element sums C/group × kernel products: weight [M, C/group, k...]
        if output is None or len(output) < 2:
            return None
        batch, dims = output[0], [_known(output[1], weight[0]), *output[2:], *weight[1:]]
    elif op == "ConvTranspose":  # each input element is scattered to M/group × kernel outputs: weight [C, M/group, k...]
        if data is None or len(data) < 2:
            return None
        batch, dims = data[0], [_known(data[1], weight[0]), *data[2:], *weight[1:]]
    elif op == "Gemm":
        if len(weight) != 2 or (not per_sample and (data is None or len(data) != 2)):
            return None
        batch, dims = (data[1] if attrs.get("transA", 0) else data[0]) if data else None, weight
    else:  # MatMul, MatMulInteger, QLinearMatMul: output [..., M, N], each element a dot product over K
        if output is None or not output or (data is not None and not data):
            return None
        weight = weight or [None, None]
        inner = _known(data[-1] if data is not None else None, weight[-2] if len(weight) >= 2 else None)
        # A matrix-vector product's output has no batch axis: its one dim is N.
        batch = output[0] if len(output) > 1 else 1
        dims = [*output[1:-1], _known(output[-1], weight[-1]), inner]
    if not per_sample:
        dims = [batch, *dims]
    return None if any(dim is None for dim in dims) else math.prod(dims)


def _dims(shape) -> list[int | None] | None:
    if shape is None:
        return None
    return [int(dim) if isinstance(dim, (int, np.integer)) else None for dim in shape]


def _known(dim: int | None, fallback: int | None) -> int | None:
    return dim if dim is not None else fallback


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant-node value, If/Loop/Scan bodies included."""
    return sum(_graph_parameters(graph) for graph in proto_graphs(model.graph))


def _graph_parameters(graph: onnx.GraphProto) -> int:
    total = sum(math.prod(tensor.dims) for tensor in graph.initializer)
    total += sum(math.prod(sparse.dims) for sparse in graph.sparse_initializer)
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attribute in node.attribute:
            if attribute.name == "value":
                total += math.prod(attribute.t.dims)
            elif attribute.name == "sparse_value":
                total += math.prod(attribute.sparse_tensor.dims)
            elif attribute.name in ("value_float", "value_int", "value_string"):
                total += 1
            elif attribute.name in ("value_floats", "value_ints", "value_strings"):
                total += len(attribute.floats or attribute.ints or attribute.strings)
    return total
