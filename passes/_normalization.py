"""What layer normalization and RMS normalization share: y = d / √(mean(d²) + ε) · γ (+ β).

fuse-layer-norm (d = x − mean(x)) and fuse-rms-norm (d = x) match the same chain from the square
of d on: ReduceMean over the trailing axes, + ε, Sqrt, then d / √v, d · Reciprocal(√v) or
d · (1 / √v), and constant γ and β that vary along the normalized axes only.

Both fused ops keep their statistics in float32 (stash_type 1): that is a float32 model's math, and
more precise than a float16 model's rounding at every step (within float16 rounding of it). float64
is left alone, its statistics would be coarser than the original's; so is bfloat16, which
onnxruntime's CPU kernels do not take.
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
from onnxslim.manager import PassResult

FUSED_TYPES = (np.dtype(np.float16), np.dtype(np.float32))
# Pow's exponent and the 1 of 1/√v are exact literals in every float type.
SQUARE_EXPONENT = 2.0


@dataclass
class Normalization:
    """d / √(mean(d²) + ε) · scale (+ bias) over d's last len(axes) axes, computed by `last`'s output."""

    data: gs.Tensor  # d
    axes: tuple[int, ...]  # −k … −1
    epsilon: float
    normalize: gs.Node  # the Div or Mul that divides d
    scale: np.ndarray  # shaped as the normalized axes (ones without a Mul)
    bias: np.ndarray | None
    last: gs.Node

    @property
    def axis(self) -> int:
        return self.axes[0]


def fuse_all(graph: gs.Graph, *, opset: int, op: str, starts: tuple[str, ...], match) -> PassResult:
    """Replace every chain that `match(node, interface)` -> (Normalization, data) | None finds from a
    node of the `starts` op types by `op`(data, γ[, β]), where the model's opset has `op`."""
    if (graph.opset or 0) < opset:
        return PassResult(fused=0)
    interface = interface_tensors(graph)
    names = unique_names(graph)
    fused = 0
    for subgraph in walk(graph):
        for node in find(subgraph, *starts):
            found = match(node, interface)
            if found is not None:
                replace_with(subgraph, found[0], op, found[1], names)
                fused += 1
    return PassResult(fused=fused)


def replace_with(subgraph: gs.Graph, match: Normalization, op: str, data: gs.Tensor, names) -> None:
    """Put `op`(data, γ[, β]; axis, epsilon) in place of the matched chain, writing its output."""
    output = match.last.outputs[0]
    inputs = [data, gs.Constant(names(f"{output.name}_scale"), match.scale)]
    if match.bias is not None:
        inputs.append(gs.Constant(names(f"{output.name}_bias"), match.bias))
    node = gs.Node(op, names(op), {"axis": match.axis, "epsilon": match.epsilon}, inputs=inputs)
    disconnect(match.last)
    node.outputs.append(output)
    insert_before(subgraph, match.last, node)


def root_mean_square(square: gs.Node, like: gs.Tensor, interface: set[int], *, with_bias: bool) -> Normalization | None:
    """The chain from `square` = d² (Pow(d, 2) or d·d) to d / √(mean(d²) + ε) · γ (+ β when
    `with_bias`), each step read only by the next; `like` has d's shape (d itself, or the x of x − mean)."""
    data = square.inputs[0] if square.inputs else None
    if data is None or not is_square(square, data):
        return None
    variance = next_reader(square, interface, "ReduceMean")
    axes = trailing_axes(variance, like) if variance is not None else None
    add = next_reader(variance, interface, "Add") if axes is not None else None
    epsilon = epsilon_of(add, variance.outputs[0]) if add is not None else None
    root = next_reader(add, interface, "Sqrt") if epsilon is not None else None
    if root is None or not np.isfinite(epsilon) or epsilon <= 0:
        return None  # without ε a constant row is 0/0 = NaN, which the fused kernels need not reproduce
    dtype = np.dtype(constant_value(next(t for t in add.inputs if t is not variance.outputs[0])).dtype)
    normalize = dividing(root, data, interface)
    normalized_shape = static_shape(like, len(axes))
    if dtype not in FUSED_TYPES or normalize is None or normalized_shape is None:
        return None
    last, scale, bias = normalize, np.ones(normalized_shape, dtype), None
    reader = single_reader(normalize.outputs[0], interface)
    factor = affine_constant(reader, "Mul", normalize.outputs[0], normalized_shape, dtype)
    if factor is not None:
        last, scale = reader, factor
        reader = single_reader(reader.outputs[0], interface)
    shift = affine_constant(reader, "Add", last.outputs[0], normalized_shape, dtype) if with_bias else None
    if shift is not None:
        last, bias = reader, shift
    return Normalization(data, axes, epsilon, normalize, scale, bias, last)


def dividing(root: gs.Node, data: gs.Tensor, interface: set[int]) -> gs.Node | None:
    """The node computing d / √v from root = Sqrt(v): Div(d, √v), or Mul(d, r) with r =
    Reciprocal(√v) or 1 / √v, each step read only by the next."""
    std = root.outputs[0]
    reader = single_reader(std, interface)
    if reader is None:
        return None
    if binary(reader, "Div") and reader.inputs[0] is data and reader.inputs[1] is std:
        return reader
    if len(reader.outputs) != 1:
        return None
    normalize = single_reader(reader.outputs[0], interface)
    return normalize if binary(normalize, "Mul") and divides(normalize, data, root, interface) else None


def binary(node: gs.Node | None, op: str) -> bool:
    return node is not None and node.op == op and is_standard(node) and len(node.inputs) == 2


def next_reader(node: gs.Node, interface: set[int], op: str) -> gs.Node | None:
    """The only reader of `node`'s only output, if it is a standard `op`."""
    if len(node.outputs) != 1:
        return None
    reader = single_reader(node.outputs[0], interface)
    return reader if reader is not None and reader.op == op and is_standard(reader) else None


def trailing_axes(reduce_mean: gs.Node, data: gs.Tensor) -> tuple[int, ...] | None:
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


def is_square(node: gs.Node, centered: gs.Tensor) -> bool:
    """Whether `node` is Pow(d, 2) or d·d."""
    if binary(node, "Mul"):
        return node.inputs[0] is centered and node.inputs[1] is centered
    if not binary(node, "Pow") or node.inputs[0] is not centered:
        return False
    exponent = constant_value(node.inputs[1])
    return exponent is not None and exponent.size == 1 and exponent.ndim == 0 and float(exponent.reshape(-1)[0]) == SQUARE_EXPONENT


def divides(normalize: gs.Node, centered: gs.Tensor, root: gs.Node, interface: set[int]) -> bool:
    """Whether `normalize` is d / √v, or d · r with r = Reciprocal(√v) or 1 / √v."""
    std = root.outputs[0]
    if binary(normalize, "Div"):
        return normalize.inputs[0] is centered and normalize.inputs[1] is std and single_reader(std, interface) is normalize
    if not binary(normalize, "Mul"):
        return False
    inverse = single_reader(std, interface)
    if inverse is None or not is_standard(inverse) or len(inverse.outputs) != 1:
        return False
    if binary(inverse, "Div") and inverse.inputs[1] is std:
        one = constant_value(inverse.inputs[0])
        if one is None or one.ndim != 0 or float(one) != 1.0:
            return False  # a rank-1 numerator could broadcast a rank-0 √v into a larger shape
    elif inverse.op != "Reciprocal":
        return False
    reciprocal = inverse.outputs[0]
    if single_reader(reciprocal, interface) is not normalize:
        return False
    return {id(normalize.inputs[0]), id(normalize.inputs[1])} == {id(centered), id(reciprocal)}


def epsilon_of(add: gs.Node, operand: gs.Tensor) -> float | None:
    """ε of Add(v, ε) (either order): a one-element float constant that does not raise v's rank."""
    if not binary(add, "Add"):
        return None
    other = add.inputs[1] if add.inputs[0] is operand else add.inputs[0]
    value = constant_value(other)
    rank = known_rank(operand)
    if value is None or value.size != 1 or value.dtype.kind != "f" or other is operand:
        return None
    if value.ndim > 0 and (rank is None or value.ndim > rank):
        return None
    return float(value.reshape(-1)[0])


def static_shape(x: gs.Tensor, count: int) -> tuple[int, ...] | None:
    """The sizes of x's last `count` axes, if all are known."""
    if x.shape is None or len(x.shape) < count:
        return None
    dims = tuple(x.shape[len(x.shape) - count :])
    if not all(isinstance(dim, (int, np.integer)) and dim >= 0 for dim in dims):
        return None
    return tuple(int(dim) for dim in dims)


def affine_constant(node: gs.Node | None, op: str, operand: gs.Tensor, normalized_shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """The constant of `node` = operand·c (Mul) or operand + c (Add), as an array of the normalized
    shape, if c broadcasts along the normalized axes only (so the result keeps operand's shape)."""
    if not binary(node, op) or (node.inputs[0] is operand) == (node.inputs[1] is operand):
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
