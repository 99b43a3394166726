"""Per-channel constant arithmetic on a linear layer's input, folded into its weights (and bias)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    bypass,
    constant_value,
    find,
    interface_tensors,
    is_constant,
    is_standard,
    known_rank,
    only_producer,
    set_inputs,
    single_reader,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

from ._linear import LINEAR_OPS, Linear, as_affine, changes_shared, input_affine, input_vector, linear_layer, set_weights
from .fuse_gelu import is_gelu


@register_pass("fold-scale-into-weights")
def fold_scale_into_weights(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Fold a per-input-channel constant Mul/Div (and, where exact, Add/Sub) feeding a Conv, ConvTranspose, Gemm or MatMul into its weights.

    Conv(x·c, W) = Conv(x, W·c) because zero padding stays zero; a shift x + t becomes bias only
    for a layer without padding. Before a padded Conv, (x·s) + t is rewritten as (x + t/s)·s so the
    scale still folds. Scalar factors on both inputs of a MatMul of activations become one factor
    on its output (attention's q·√s and k·√s). A GELU written out keeps its factor ½, so that
    onnxruntime still recognizes and fuses it.
    """
    interface = interface_tensors(graph)
    names = unique_names(graph)
    folded = reordered = merged = 0
    for subgraph in walk(graph):
        for node in find(subgraph, *LINEAR_OPS):
            while node.outputs:  # one run absorbs a whole chain (Mul → Add → Conv)
                layer = linear_layer(node, interface)
                if layer is None:
                    break
                source = node.inputs[0]
                arithmetic = only_producer(source)
                if arithmetic is None or single_reader(source, interface) is not node or is_gelu(arithmetic, interface):
                    break  # a GELU's ½ stays: onnxruntime fuses the GELU only whole
                affine = _affine(arithmetic, layer)
                new = input_affine(layer, *affine[1:]) if affine is not None else None
                if new is not None and not changes_shared(layer, *new) and bypass(arithmetic, interface, subgraph, keep=affine[0]):
                    set_weights(layer, *new, names)
                    folded += 1
                elif _scale_through_shift(arithmetic, layer, interface, names):
                    reordered += 1
                else:
                    break
        for node in find(subgraph, "MatMul"):
            if node.outputs and _merge_operand_scales(node, subgraph, interface, names):
                merged += 1
    return PassResult(folded=folded, reordered=reordered, merged=merged)


def _affine(node: gs.Node, layer: Linear) -> tuple[int, np.ndarray | None, np.ndarray | None] | None:
    """(index of the variable input, scale, shift) with node(v) = v·scale + shift per input channel of `layer`."""
    if node.op not in ("Add", "Sub", "Mul", "Div") or not is_standard(node) or len(node.inputs) != 2:
        return None
    values = [constant_value(tensor) for tensor in node.inputs]
    if (values[0] is None) == (values[1] is None):
        return None  # two variables, or two constants (fold-constants' job)
    index = 0 if values[1] is not None else 1
    vector = input_vector(layer, values[1 - index], node.inputs[index])
    if vector is None:
        return None
    return as_affine(node.op, index, vector)


def _scale_through_shift(add: gs.Node, layer: Linear, interface: set[int], names) -> bool:
    """(v·s) + t → (v + t/s), with s folded into the layer: when t itself cannot fold (padding).

    Same rounding as before up to one ulp of t: v + t/s is exact to ε·|t/s|, which ·s is ε·|t|.
    """
    shift = _affine(add, layer)
    if shift is None or shift[1] is not None or add.op not in ("Add", "Sub"):
        return False
    scaled = add.inputs[shift[0]]
    mul = only_producer(scaled)
    if mul is None or mul.op not in ("Mul", "Div") or single_reader(scaled, interface) is not add:
        return False
    scale = _affine(mul, layer)
    if scale is None or scale[1] is None or not np.all(scale[1] != 0):
        return False
    new = input_affine(layer, scale[1], None)
    if new is None or changes_shared(layer, *new):
        return False
    # The new shift in the shape both constants broadcast to (neither grows the input, so neither does it).
    shift_shape = np.broadcast_shapes(*(constant_value(tensor).shape for tensor in (add.inputs[1 - shift[0]], mul.inputs[1 - scale[0]])))
    per_channel = shift[2] / scale[1]
    if not np.all(np.isfinite(per_channel)):
        return False
    value = _in_shape(per_channel, shift_shape).astype(layer.dtype)
    add.op = "Add"
    variable = mul.inputs[scale[0]]
    set_inputs(add, [variable, gs.Constant(names(f"{add.name or add.outputs[0].name}_shift"), value)])
    set_weights(layer, *new, names)
    return True


def _in_shape(vector: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A per-input-channel vector laid out in `shape` (every dim 1 but, perhaps, the channel one)."""
    if all(dim == 1 for dim in shape):
        return vector[:1].reshape(shape)
    return vector.reshape(shape)


def _merge_operand_scales(matmul: gs.Node, graph: gs.Graph, interface: set[int], names) -> bool:
    """MatMul(A·a, B·b) = MatMul(A, B)·(a·b) for scalars a, b: two Mul/Div nodes become one Mul."""
    if not is_standard(matmul) or len(matmul.inputs) != 2 or any(is_constant(tensor) for tensor in matmul.inputs):
        return False
    factors = [_scalar_factor(operand, matmul, interface) for operand in matmul.inputs]
    if any(factor is None for factor in factors) or factors[0][2] != factors[1][2]:
        return False
    (a, first, dtype), (b, second, _) = factors
    product = np.asarray(first * second).astype(dtype)
    if not np.isfinite(product):
        return False
    output = matmul.outputs[0]
    unscaled = gs.Variable(names(f"{output.name}_unscaled"), dtype=output.dtype, shape=output.shape)
    matmul.inputs[0], matmul.inputs[1] = a, b  # the Mul/Div nodes are left unread, for dead-node elimination
    matmul.outputs[0] = unscaled
    scale = gs.Node("Mul", names(f"{matmul.name or output.name}_scale"), inputs=[unscaled, gs.Constant(names(f"{output.name}_scale"), product)], outputs=[output])
    index = next(index for index, node in enumerate(graph.nodes) if node is matmul)
    graph.nodes.insert(index + 1, scale)
    return True


def _scalar_factor(tensor: gs.Tensor, reader: gs.Node, interface: set[int]) -> tuple[gs.Tensor, float, np.dtype] | None:
    """(v, s, dtype) if `tensor` = v·s or v/s for a float scalar s, read only by `reader`."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op not in ("Mul", "Div") or not is_standard(node) or len(node.inputs) != 2:
        return None
    if single_reader(tensor, interface) is not reader or is_gelu(node, interface):
        return None
    values = [constant_value(operand) for operand in node.inputs]
    index = 0 if values[1] is not None else 1
    value, variable = values[1 - index], node.inputs[index]
    if value is None or values[index] is not None or (node.op == "Div" and index == 1):
        return None
    rank = known_rank(variable)
    if value.size != 1 or value.dtype.kind != "f" or (value.ndim > 0 and (rank is None or value.ndim > rank)):
        return None
    factor = float(value.reshape(-1)[0])
    if node.op == "Div":
        if factor == 0:
            return None
        factor = 1.0 / factor
    return variable, factor, value.dtype
