"""Layer normalization written out in arithmetic, replaced by LayerNormalization (opset 17+).

    d = x − ReduceMean(x)                       over the last k axes, keepdims
    y = d / Sqrt(ReduceMean(d²) + ε) · γ + β    = LayerNormalization(x, γ, β; axis = −k, epsilon = ε)

d² may be Pow(d, 2) or d·d; the division may be d·Reciprocal(√·) or d·(1/√·); γ and β are
optional constants (without γ the fused node gets ones) that broadcast along the normalized axes
only. Axes are an attribute of ReduceMean before opset 18 and an input from 18.

Precision: LayerNormalization computes its statistics in float32 (stash_type 1). For a float32
model that is the original's math; for float16 it is more precise than the original's rounding at
every step (within float16 rounding of it). float64 is left alone: the schema's statistics would
be float32, coarser than the original's. So is bfloat16, which onnxruntime's CPU kernels do not
take. onnxruntime computes the variance in one pass, E[x²] − E[x]²: where the mean dwarfs the
spread (|mean|/std ≳ 1e3 in float32) that rounds differently from the two-pass original, as
onnxruntime's own LayerNorm fusion (ORT_ENABLE_BASIC and up) does to the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    axes_of,
    constant_value,
    disconnect,
    find,
    insert_before,
    interface_tensors,
    is_empty,
    is_standard,
    known_rank,
    single_reader,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

LAYER_NORMALIZATION_OPSET = 17
FUSED_TYPES = (np.dtype(np.float16), np.dtype(np.float32))
# Pow's exponent and the 1 of 1/√v are exact literals in every float type.
SQUARE_EXPONENT = 2.0


@dataclass
class LayerNorm:
    """A matched decomposed layer normalization: LayerNormalization(x, scale, bias) computes `last`'s output."""

    x: gs.Tensor
    axis: int  # negative: the first of the normalized (trailing) axes
    epsilon: float
    scale: np.ndarray  # shaped as the normalized axes
    bias: np.ndarray | None
    last: gs.Node


@register_pass("fuse-layer-norm")
def fuse_layer_norm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace x − mean, / √(variance + ε), · γ + β over the last axes by LayerNormalization (opset 17+)."""
    if (graph.opset or 0) < LAYER_NORMALIZATION_OPSET:
        return PassResult(fused=0)
    interface = interface_tensors(graph)
    names = unique_names(graph)
    fused = 0
    for subgraph in walk(graph):
        for mean in find(subgraph, "ReduceMean"):
            match = _match(mean, interface) if mean.outputs else None
            if match is None:
                continue
            output = match.last.outputs[0]
            scale = gs.Constant(names(f"{output.name}_scale"), match.scale)
            inputs = [match.x, scale]
            if match.bias is not None:
                inputs.append(gs.Constant(names(f"{output.name}_bias"), match.bias))
            attrs = {"axis": match.axis, "epsilon": match.epsilon}
            node = gs.Node("LayerNormalization", names("LayerNormalization"), attrs, inputs=inputs)
            disconnect(match.last)
            node.outputs.append(output)
            insert_before(subgraph, match.last, node)
            fused += 1
    return PassResult(fused=fused)


# ----------------------------------------------------------------------------- matching


def _match(mean: gs.Node, interface: set[int]) -> LayerNorm | None:
    """The layer normalization whose first step is `mean` = ReduceMean(x), or None."""
    x = mean.inputs[0]
    reduced = _trailing_axes(mean, x)
    sub = single_reader(mean.outputs[0], interface)
    if reduced is None or not _binary(sub, "Sub") or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return None
    centered = sub.outputs[0]
    if id(centered) in interface:
        return None
    readers = list({id(reader): reader for reader in centered.outputs}.values())
    square = next((reader for reader in readers if _is_square(reader, centered)), None)
    if square is None or len(readers) != 2 or len(centered.outputs) != (3 if square.op == "Mul" else 2):
        return None
    normalize = readers[1] if readers[0] is square else readers[0]
    variance = _next(square, interface, "ReduceMean")
    if variance is None or _trailing_axes(variance, x) != reduced:
        return None
    add = _next(variance, interface, "Add")
    epsilon = _scalar(add, variance.outputs[0]) if add is not None else None
    root = _next(add, interface, "Sqrt") if epsilon is not None else None
    if root is None or not np.isfinite(epsilon) or epsilon <= 0:
        return None  # without ε a constant row is 0/0 = NaN, which the one-pass kernel need not reproduce
    dtype = np.dtype(constant_value(next(t for t in add.inputs if t is not variance.outputs[0])).dtype)
    if dtype not in FUSED_TYPES:
        return None
    if not _divides(normalize, centered, root, interface):
        return None
    normalized_shape = _static_shape(x, len(reduced))
    if normalized_shape is None:
        return None
    last, scale, bias = normalize, np.ones(normalized_shape, dtype), None
    reader = single_reader(normalize.outputs[0], interface)
    factor = _affine_constant(reader, "Mul", normalize.outputs[0], normalized_shape, dtype)
    if factor is not None:
        last, scale = reader, factor
        reader = single_reader(reader.outputs[0], interface)
    shift = _affine_constant(reader, "Add", last.outputs[0], normalized_shape, dtype)
    if shift is not None:
        last, bias = reader, shift
    return LayerNorm(x, -len(reduced), epsilon, scale, bias, last)


def _binary(node: gs.Node | None, op: str) -> bool:
    return node is not None and node.op == op and is_standard(node) and len(node.inputs) == 2


def _next(node: gs.Node, interface: set[int], op: str) -> gs.Node | None:
    """The only reader of `node`'s only output, if it is a standard `op`."""
    if len(node.outputs) != 1:
        return None
    reader = single_reader(node.outputs[0], interface)
    return reader if reader is not None and reader.op == op and is_standard(reader) else None


def _trailing_axes(reduce_mean: gs.Node, data: gs.Tensor) -> tuple[int, ...] | None:
    """The axes a keepdims ReduceMean averages as negative indices (−k … −1), if they are the last k of `data`."""
    attrs = reduce_mean.attrs
    if attrs.get("keepdims", 1) != 1 or len(reduce_mean.inputs) > 2:
        return None
    rank = known_rank(data)
    absent = "axes" not in attrs and (len(reduce_mean.inputs) < 2 or is_empty(reduce_mean.inputs[1]))
    axes = [] if absent else axes_of(reduce_mean)
    if axes is None:
        return None  # axes computed at run time
    if not axes:
        if attrs.get("noop_with_empty_axes", 0) or rank is None or rank == 0:
            return None  # no axes: the identity, or every axis of a rank we do not know
        axes = list(range(rank))
    if any(axis >= 0 for axis in axes):
        if rank is None or not all(-rank <= axis < rank for axis in axes):
            return None
        axes = [axis - rank if axis >= 0 else axis for axis in axes]
    count = len(set(axes))
    if sorted(set(axes)) != list(range(-count, 0)) or len(axes) != count:
        return None
    return tuple(range(-count, 0))


def _is_square(node: gs.Node, centered: gs.Tensor) -> bool:
    """Pow(d, 2) or d·d."""
    if _binary(node, "Mul"):
        return node.inputs[0] is centered and node.inputs[1] is centered
    if not _binary(node, "Pow") or node.inputs[0] is not centered:
        return False
    exponent = constant_value(node.inputs[1])
    return exponent is not None and exponent.size == 1 and exponent.ndim == 0 and float(exponent.reshape(-1)[0]) == SQUARE_EXPONENT


def _divides(normalize: gs.Node, centered: gs.Tensor, root: gs.Node, interface: set[int]) -> bool:
    """Whether `normalize` is d / √v, or d · r with r = Reciprocal(√v) or 1 / √v."""
    std = root.outputs[0]
    if _binary(normalize, "Div"):
        return normalize.inputs[0] is centered and normalize.inputs[1] is std and single_reader(std, interface) is normalize
    if not _binary(normalize, "Mul"):
        return False
    inverse = single_reader(std, interface)
    if inverse is None or not is_standard(inverse) or len(inverse.outputs) != 1:
        return False
    if _binary(inverse, "Div") and inverse.inputs[1] is std:
        one = constant_value(inverse.inputs[0])
        if one is None or one.ndim != 0 or float(one) != 1.0:
            return False  # a rank-1 numerator could broadcast a rank-0 √v into a larger shape
    elif inverse.op != "Reciprocal":
        return False
    reciprocal = inverse.outputs[0]
    if single_reader(reciprocal, interface) is not normalize:
        return False
    return {id(normalize.inputs[0]), id(normalize.inputs[1])} == {id(centered), id(reciprocal)}


def _scalar(add: gs.Node, operand: gs.Tensor) -> float | None:
    """ε of Add(v, ε) (either order): a one-element float constant that does not raise v's rank."""
    if not _binary(add, "Add"):
        return None
    other = add.inputs[1] if add.inputs[0] is operand else add.inputs[0]
    value = constant_value(other)
    rank = known_rank(operand)
    if value is None or value.size != 1 or value.dtype.kind != "f" or other is operand:
        return None
    if value.ndim > 0 and (rank is None or value.ndim > rank):
        return None
    return float(value.reshape(-1)[0])


def _static_shape(x: gs.Tensor, count: int) -> tuple[int, ...] | None:
    """The sizes of x's last `count` axes, if all are known."""
    if x.shape is None or len(x.shape) < count:
        return None
    dims = tuple(x.shape[len(x.shape) - count :])
    if not all(isinstance(dim, (int, np.integer)) and dim >= 0 for dim in dims):
        return None
    return tuple(int(dim) for dim in dims)


def _affine_constant(node: gs.Node | None, op: str, operand: gs.Tensor, normalized_shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """The constant of `node` = operand·c (Mul) or operand + c (Add), as an array of the normalized
    shape, if c broadcasts along the normalized axes only (so the result keeps operand's shape)."""
    if not _binary(node, op) or (node.inputs[0] is operand) == (node.inputs[1] is operand):
        return None
    other = node.inputs[1] if node.inputs[0] is operand else node.inputs[0]
    value = constant_value(other)
    if value is None or value.dtype != dtype:
        return None
    count = len(normalized_shape)
    rank = known_rank(operand)
    if value.ndim > (rank if rank is not None else count):
        return None
    leading, trailing = value.shape[: max(value.ndim - count, 0)], value.shape[max(value.ndim - count, 0) :]
    if any(dim != 1 for dim in leading):
        return None  # varies along an axis that is not normalized
    trailing_shape = normalized_shape[count - len(trailing) :]
    if any(dim not in (1, size) for dim, size in zip(trailing, trailing_shape)):
        return None
    return np.ascontiguousarray(np.broadcast_to(value.reshape(trailing), normalized_shape))
