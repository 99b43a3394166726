"""Identity and no-op elimination: nodes whose output equals one of their inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import bypass, constant_value, interface_tensors, is_empty, is_standard, trusted_symbol, walk
from onnxslim.manager import PassContext, PassResult, register_pass
from onnxslim.rules import RuleTable

INT64_MAX = np.iinfo(np.int64).max
# Slice ends at or beyond this mean "to the end" whatever the dim (exporters write INT32/INT64 max).
SLICE_TO_END = np.iinfo(np.int32).max

# A rule looks at a node and returns the index of the input its output equals, or None.
Rule = Callable[[gs.Node], "int | None"]
RULES = RuleTable()
rule = RULES.rule


@register_pass("eliminate-noops")
def eliminate_noops(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Remove Identity, inference Dropout, same-type Cast, one-piece Split, and Reshape/Transpose/Pad/Slice/Tile/arithmetic/logic/Where that change nothing."""
    interface = interface_tensors(graph)
    removed = 0
    for subgraph in walk(graph):
        for node in list(subgraph.nodes):
            check = RULES.get(node.op)
            if check is None or not is_standard(node) or not node.outputs:
                continue
            keep = check(node)
            if (
                keep is not None
                and _same_type(node.inputs[keep], node.outputs[0])
                and _only_first_output_used(node, interface)
                and bypass(node, interface, subgraph, keep=keep)
            ):
                removed += 1
    return PassResult(removed=removed)


def _same_type(source: gs.Tensor, target: gs.Tensor) -> bool:
    """The output may be replaced by the input only if nothing known about them disagrees."""
    if source.dtype is not None and target.dtype is not None and np.dtype(source.dtype) != np.dtype(target.dtype):
        return False
    return True


def _static_shape(tensor: gs.Tensor) -> list[int] | None:
    if tensor.shape is None or any(not isinstance(dim, (int, np.integer)) or dim < 0 for dim in tensor.shape):
        return None
    return [int(dim) for dim in tensor.shape]


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def _only_first_output_used(node: gs.Node, interface: set[int]) -> bool:
    """Bypassing replaces the first output only: the others (e.g. Dropout's mask) must be unused.

    A graph output is used even when no node reads it.
    """
    return all(is_empty(output) or not (output.outputs or id(output) in interface) for output in node.outputs[1:])


@rule("Identity")
def identity(node: gs.Node) -> int | None:
    return 0


@rule("Dropout")
def dropout(node: gs.Node) -> int | None:
    """Dropout is the identity in inference; training_mode (opset 12+) must be absent or false."""
    if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
        training = constant_value(node.inputs[2])
        if training is None or bool(np.asarray(training).any()):
            return None
    if node.attrs.get("is_test", 1) == 0:  # opset < 7 Dropout in training mode
        return None
    return 0  # the mask output has no input equivalent: the pass keeps the node if the mask is used


@rule("Cast", "CastLike")
def same_type_cast(node: gs.Node) -> int | None:
    source, target = node.inputs[0], node.outputs[0]
    if source.dtype is None or target.dtype is None:
        return None
    return 0 if np.dtype(source.dtype) == np.dtype(target.dtype) else None


@rule("Reshape")
def same_shape_reshape(node: gs.Node) -> int | None:
    """A Reshape whose every target dim keeps its input's dim: a 0 (copy, without allowzero) or the
    same static size, and at most one -1 where all the others are kept, so it resolves to the dim
    it stands at whatever the symbolic dims are (an exporter's [0, -1] of an [N, 8] tensor)."""
    shape = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    source = node.inputs[0].shape
    if shape is None or source is None:
        return None
    shape = [int(dim) for dim in np.asarray(shape).reshape(-1)]
    allow_zero = node.attrs.get("allowzero", 0) == 1
    if len(shape) != len(source) or shape.count(-1) > 1:
        return None
    for dim, size in zip(shape, source):
        static = isinstance(size, (int, np.integer)) and size >= 0
        kept = (dim == 0 and not allow_zero) or (static and dim == size)
        if not kept and dim != -1:
            return None
    if -1 in shape and any(size == 0 for size in source if isinstance(size, (int, np.integer))):
        return None  # a -1 beside a zero-size dim is ambiguous: onnxruntime refuses it
    return 0


@rule("Expand")
def same_shape_expand(node: gs.Node) -> int | None:
    """An Expand to a shape its input already covers: no longer rank, and every target dim 1 or the
    input's own static size (symbolic input dims are kept by a 1)."""
    shape = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    source = node.inputs[0].shape
    if shape is None or source is None:
        return None
    shape = [int(dim) for dim in np.asarray(shape).reshape(-1)]
    if len(shape) > len(source):
        return None
    for dim, size in zip(reversed(shape), reversed(source)):
        if dim != 1 and not (isinstance(size, (int, np.integer)) and dim == size):
            return None
    return 0


@rule("Squeeze")
def squeeze_nothing(node: gs.Node) -> int | None:
    """Without axes Squeeze drops every 1-dim; with axes it must drop some. Only the first can be a no-op."""
    has_axes = "axes" in node.attrs or (len(node.inputs) > 1 and not is_empty(node.inputs[1]))
    source = _static_shape(node.inputs[0])
    return 0 if not has_axes and source is not None and 1 not in source else None


@rule("Transpose")
def identity_transpose(node: gs.Node) -> int | None:
    perm = node.attrs.get("perm")
    rank = _rank(node.inputs[0])
    if perm is None:
        return 0 if rank is not None and rank <= 1 else None  # default perm reverses the axes
    return 0 if list(perm) == list(range(len(perm))) else None


@rule("Pad")
def zero_pad(node: gs.Node) -> int | None:
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        pads = constant_value(node.inputs[1])
    if pads is None:
        return None
    return 0 if not np.asarray(pads).any() else None


@rule("Slice")
def full_slice(node: gs.Node) -> int | None:
    if "starts" in node.attrs:  # opset < 10 keeps the bounds in attributes
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes"), None
    else:
        values = [constant_value(tensor) if not is_empty(tensor) else None for tensor in node.inputs[1:5]]
        values += [None] * (4 - len(values))
        starts, ends, axes, steps = values
        if starts is None or ends is None:
            return None
        if any(not is_empty(tensor) and value is None for tensor, value in zip(node.inputs[3:5], values[2:])):
            return None
    starts = np.asarray(starts).reshape(-1)
    ends = np.asarray(ends).reshape(-1)
    steps = np.ones_like(starts) if steps is None else np.asarray(steps).reshape(-1)
    source = node.inputs[0].shape
    axes_list = list(range(len(starts))) if axes is None else [int(axis) for axis in np.asarray(axes).reshape(-1)]
    for start, end, step, axis in zip(starts, ends, steps, axes_list):
        if step != 1 or start != 0:
            return None
        if end >= SLICE_TO_END:
            continue
        if source is None or axis >= len(source) or not isinstance(source[axis], (int, np.integer)) or end < source[axis]:
            return None
    return 0


@rule("Concat", "Sum", "Mean", "Max", "Min")
def single_input(node: gs.Node) -> int | None:
    return 0 if len(node.inputs) == 1 else None


@rule("Split")
def single_output(node: gs.Node) -> int | None:
    """A Split into one piece is its input, when the piece's size (if given) is the axis' static
    size: with another size the original fails, and the model must fail alike."""
    if len(node.outputs) != 1:
        return None
    sizes = node.attrs.get("split")
    if sizes is None and len(node.inputs) > 1 and not is_empty(node.inputs[1]):
        sizes = constant_value(node.inputs[1])
        if sizes is None:
            return None
    if sizes is None:
        return 0
    source = _static_shape(node.inputs[0])
    axis = node.attrs.get("axis", 0)
    if source is None or not -len(source) <= axis < len(source):
        return None
    return 0 if [int(size) for size in np.asarray(sizes).reshape(-1)] == [source[axis]] else None


@rule("Tile")
def ones_tile(node: gs.Node) -> int | None:
    """Tile by all-ones repeats copies its input."""
    repeats = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return 0 if repeats is not None and np.asarray(repeats).size > 0 and bool((np.asarray(repeats) == 1).all()) else None


# The constant that leaves the other operand as it is, and whether it may stand on either side.
# Pow's exponent 1 only on floats: onnxruntime computes an integer base's power in double,
# which an int64 beyond 2**53 would not survive (the model would not compute what it did).
NEUTRAL = {
    "Add": (0, True), "Sub": (0, False), "Mul": (1, True), "Div": (1, False), "Pow": (1, False),
    "And": (True, True), "Or": (False, True), "Xor": (False, True),
    "BitwiseOr": (0, True), "BitwiseXor": (0, True), "BitwiseAnd": (~0, True),
}


@rule(*NEUTRAL)
def neutral_operand(node: gs.Node) -> int | None:
    """x+0, 0+x, x-0, x*1, 1*x, x/1, x**1, x and true, x or false, ... — where the constant, of any
    size, is all neutral and broadcasting it against x leaves x's shape as it is.

    Adding a zero turns -0.0 into +0.0: as for a scalar zero, that difference is not kept.
    """
    neutral, commutative = NEUTRAL[node.op]
    for keep, other in ((0, 1), (1, 0)) if commutative else ((0, 1),):
        value = constant_value(node.inputs[other])
        if value is None or value.dtype == object or not np.all(value == np.asarray(neutral).astype(value.dtype)):
            continue
        variable = node.inputs[keep]
        if node.op == "Pow" and (variable.dtype is None or np.dtype(variable.dtype).kind != "f"):
            continue
        if value.ndim == 0 or _broadcasts_into(list(value.shape), variable.shape):
            return keep
    return None


@rule("Where")
def constant_condition(node: gs.Node) -> int | None:
    """Where(c, a, b) with c all true is a (all false: b), if neither c nor the other side
    broadcasts it to a larger shape."""
    condition = constant_value(node.inputs[0])
    if condition is None or condition.size == 0 or len(node.inputs) < 3:
        return None
    if condition.all():
        keep, other = 1, 2
    elif not condition.any():
        keep, other = 2, 1
    else:
        return None
    chosen = node.inputs[keep]
    if _broadcasts_into(list(condition.shape), chosen.shape) and _broadcasts_into(node.inputs[other].shape, chosen.shape):
        return keep
    return None


def _broadcasts_into(shape: list | None, target: list | None) -> bool:
    """Whether broadcasting a tensor of `shape` against one of `target` gives `target`'s shape for
    every input the model accepts: no more dims, and each of its dims 1 or the same size as
    target's (both static, or one name the model gives both)."""
    if shape is None or target is None or len(shape) > len(target):
        return False
    for dim, into in zip(reversed(shape), reversed(target)):
        if isinstance(dim, (int, np.integer)) and (dim == 1 or isinstance(into, (int, np.integer)) and dim == into >= 0):
            continue
        if trusted_symbol(dim) is not None and trusted_symbol(dim) == trusted_symbol(into):
            continue
        return False
    return True
