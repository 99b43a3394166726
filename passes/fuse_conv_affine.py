"""Per-channel constant arithmetic after a linear layer, folded into its weights and bias."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import bypass, constant_value, find, interface_tensors, is_empty, is_standard, known_rank, single_reader, unique_names, walk
from onnxslim.manager import PassContext, PassResult, register_pass

from ._linear import (
    LINEAR_OPS,
    Linear,
    as_affine,
    batch_norm_parameters,
    changes_shared,
    channel_vector,
    fused_name,
    layer_producing,
    linear_layer,
    output_affine,
    output_vector,
    set_weights,
)

# Ops a scalar factor passes through unchanged, f(x)·s = f(x·s), reading their data from input 0.
SCALE_TRANSPARENT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")
# How far upstream a scalar factor is carried (attention needs 3: MatMul, Transpose, Reshape).
SCALE_REACH = 8
# Gemm broadcasts C (unidirectionally) from opset 7; before, it needed a `broadcast` attribute.
GEMM_BROADCAST_OPSET = 7


@register_pass("fuse-conv-affine")
def fuse_conv_affine(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Fold a per-channel constant Add/Sub/Mul/Div after a Conv, ConvTranspose, Gemm or MatMul into its weights and bias.

    A MatMul of a matrix by a constant matrix followed by the Add of a per-column bias becomes a
    Gemm; an inference BatchNormalization absorbs such arithmetic into its scale and bias; a scalar
    factor reaches a layer through reshapes, transposes and MatMuls of activations (attention's
    QKᵀ/√d scales the query projection instead).
    """
    interface = interface_tensors(graph)
    names = unique_names(graph)
    fused = gemms = moved = 0
    for subgraph in walk(graph):
        for node in find(subgraph, *LINEAR_OPS):
            while node.outputs:  # one run absorbs a whole chain (Conv → Mul → Add), so a second finds nothing
                layer = linear_layer(node, interface)
                if layer is None:
                    break
                if layer.bias_node is not None and layer.output_rank == 2 and graph.opset >= GEMM_BROADCAST_OPSET:
                    if _to_gemm(layer, subgraph, interface):
                        gemms += 1
                        continue
                reader = single_reader(layer.output, interface)
                affine = _affine(reader, layer.output, partial(output_vector, layer)) if reader is not None else None
                new = output_affine(layer, *affine[1:]) if affine is not None else None
                if new is None or changes_shared(layer, *new) or not bypass(reader, interface, subgraph, keep=affine[0]):
                    break
                set_weights(layer, *new, names)
                fused += 1
        for bn in find(subgraph, "BatchNormalization"):
            while bn.outputs and _into_batch_norm(bn, graph.opset, subgraph, interface, names):
                fused += 1
        for node in find(subgraph, "Mul", "Div"):
            if node.outputs and _scale_upstream(node, subgraph, interface, names):
                moved += 1
    return PassResult(fused=fused, gemm=gemms, moved=moved)


def _affine(reader: gs.Node, source: gs.Tensor, vector_of) -> tuple[int, np.ndarray | None, np.ndarray | None] | None:
    """(index of `source` in `reader`, scale, shift) with reader(y) = y·scale + shift, or None.

    `vector_of(constant)` is the constant as one number per channel, or None if it is not that.
    """
    if reader.op not in ("Add", "Sub", "Mul", "Div") or not is_standard(reader) or len(reader.inputs) != 2:
        return None
    index = 0 if reader.inputs[0] is source else 1
    if reader.inputs[1 - index] is source:
        return None  # y ∘ y
    vector = vector_of(constant_value(reader.inputs[1 - index]))
    if vector is None:
        return None
    return as_affine(reader.op, index, vector)


def _to_gemm(layer: Linear, graph: gs.Graph, interface: set[int]) -> bool:
    """MatMul(A, B) + bias with A a matrix is Gemm(A, B, bias): the MatMul becomes the Gemm."""
    add, node = layer.bias_node, layer.node
    keep = 0 if add.inputs[0] is node.outputs[0] else 1
    bias = add.inputs[1 - keep]
    if not bypass(add, interface, graph, keep=keep):
        return False
    node.op = "Gemm"
    node.attrs.clear()
    node.inputs.append(bias)
    return True


def _into_batch_norm(bn: gs.Node, opset: int, graph: gs.Graph, interface: set[int], names) -> bool:
    """BN(x)·s + t is BN with γ' = γ·s and β' = β·s + t: the arithmetic after it goes into its parameters."""
    parameters = batch_norm_parameters(bn, opset, interface)
    output = bn.outputs[0]
    reader = single_reader(output, interface)
    if parameters is None or reader is None:
        return False
    channels = parameters[0].shape[0]
    rank = known_rank(output) or known_rank(bn.inputs[0])

    def vector_of(value: np.ndarray | None) -> np.ndarray | None:
        if value is None or (output.dtype is not None and value.dtype != np.dtype(output.dtype)):
            return None
        if rank is None:  # BN's input has rank >= 2: a one-element constant of rank <= 2 cannot grow it
            return channel_vector(value, 2, 0, 1) if value.size == 1 else None
        return channel_vector(value, rank, rank - 2, channels)

    affine = _affine(reader, output, vector_of)
    if affine is None:
        return False
    index, scale, shift = affine
    gamma, beta = (value.astype(np.float64) for value in parameters[:2])
    if scale is not None:
        gamma, beta = gamma * scale, beta * scale
    if shift is not None:
        beta = beta + shift
    gamma, beta = np.broadcast_to(gamma, (channels,)), np.broadcast_to(beta, (channels,))
    if not (np.all(np.isfinite(gamma)) and np.all(np.isfinite(beta))) or not bypass(reader, interface, graph, keep=index):
        return False
    for slot, value in ((1, gamma), (2, beta)):
        old = bn.inputs[slot]
        bn.inputs[slot] = gs.Constant(names(fused_name(old.name)), value.astype(parameters[slot - 1].dtype))
    return True


def _scale_upstream(node: gs.Node, graph: gs.Graph, interface: set[int], names) -> bool:
    """y·s or y/s with y = f(layer(x)), f made of scale-transparent ops and MatMuls of activations:
    the factor goes into the layer's weights and bias (each tensor on the way read only by the next)."""
    if not is_standard(node) or len(node.inputs) != 2:
        return False
    values = [constant_value(tensor) for tensor in node.inputs]
    index = 0 if values[1] is not None else 1
    value, variable = values[1 - index], node.inputs[index]
    if value is None or values[index] is not None or (node.op == "Div" and index == 1):
        return False
    if value.size != 1 or value.dtype.kind != "f" or (value.ndim > 0 and value.ndim > (known_rank(variable) or 0)):
        return False  # not a scalar, or one that would add dims
    factor = float(value.reshape(-1)[0])
    if node.op == "Div":
        factor = 1.0 / factor if factor != 0 else np.inf
    found = _layer_upstream(variable, node, interface, SCALE_REACH)
    if found is None or found[0].dtype != value.dtype:
        return False
    layer, columns = found
    scale = np.full(layer.out_channels, factor)
    if columns is not None:  # one part of a Split of the layer's channels: only its channels scale (·1 is exact)
        scale = np.ones(layer.out_channels)
        scale[columns[0] : columns[1]] = factor
    new = output_affine(layer, scale, None)
    if new is None or changes_shared(layer, *new) or not bypass(node, interface, graph, keep=index):
        return False
    set_weights(layer, *new, names)
    return True


def _layer_upstream(tensor: gs.Tensor, reader: gs.Node, interface: set[int], reach: int) -> tuple[Linear, tuple[int, int] | None] | None:
    """The linear layer whose output becomes `tensor` through scale-transparent ops and MatMuls of
    activations, every tensor on the way read only by the next node; with the channels [start, end)
    of it that `tensor` carries when it is one part of a Split of the layer's channels (merged
    query, key and value projections), else None."""
    if reach < 0 or single_reader(tensor, interface) is not reader:
        return None
    layer = layer_producing(tensor, interface)
    if layer is not None:
        return layer, None
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or not is_standard(node) or not node.inputs:
        return None
    if node.op in SCALE_TRANSPARENT:
        return _layer_upstream(node.inputs[0], node, interface, reach - 1)
    if node.op == "Split" and single_reader(node.inputs[0], interface) is node:
        layer = layer_producing(node.inputs[0], interface)
        columns = _split_part(node, tensor, layer) if layer is not None else None
        return (layer, columns) if columns is not None else None
    if node.op == "MatMul" and all(constant_value(operand) is None for operand in node.inputs):
        for operand in node.inputs:  # (A·s)B = (AB)·s = A(B·s)
            found = _layer_upstream(operand, node, interface, reach - 1)
            if found is not None:
                return found
    return None


def _split_part(split: gs.Node, part: gs.Tensor, layer: Linear) -> tuple[int, int] | None:
    """The channels [start, end) of `layer` that output `part` of `split` holds, if it splits the channel axis."""
    axis = int(split.attrs.get("axis", 0))
    if axis >= 0:
        if layer.output_rank is None:
            return None
        axis -= layer.output_rank
    if -1 - axis != layer.output_channel_axis:
        return None
    count = len(split.outputs)
    if len(split.inputs) > 1 and not is_empty(split.inputs[1]):
        sizes = constant_value(split.inputs[1])
        sizes = None if sizes is None else [int(size) for size in np.asarray(sizes).reshape(-1)]
    elif "split" in split.attrs:
        sizes = [int(size) for size in split.attrs["split"]]
    else:  # equal parts (opset 18's num_outputs rounds up; only an exact division is read here)
        sizes = [layer.out_channels // count] * count if layer.out_channels % count == 0 else None
    if sizes is None or len(sizes) != count or sum(sizes) != layer.out_channels or min(sizes) < 0:
        return None
    index = next(index for index, output in enumerate(split.outputs) if output is part)
    return sum(sizes[:index]), sum(sizes[: index + 1])
