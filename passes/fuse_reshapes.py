"""Chains of Reshape/Flatten/Squeeze/Unsqueeze collapsed into one Reshape, or into nothing.

Dims are followed symbolically: an entry of a shape is a known size (int), `Dim(j)` (the chain
input's dim j, whatever it is at run time) or None (unknown). A chain becomes Reshape(x, target)
when the target can say every entry without baking in a dynamic dim: a known size, 0 for "x's dim
at this position" (allowzero off), and at most one -1. A dynamic model stays dynamic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    axes_of,
    can_merge,
    constant_value,
    disconnect,
    interface_tensors,
    is_standard,
    merge_tensors,
    only_producer,
    replace_all_uses,
    set_input,
    set_inputs,
    single_reader,
    trusted_symbol,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
# Reshape reads its target from an input since opset 5.
MIN_OPSET = 5


@dataclass(frozen=True)
class Dim:
    """The chain input's dim `axis`, a value known only at run time."""

    axis: int


Entry = int | Dim | None

# Dim symbols exporters write for "unknown" rather than naming a size; equal placeholders prove nothing.
@register_pass("fuse-reshapes")
def fuse_reshapes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Collapse Reshape/Flatten/Squeeze/Unsqueeze chains into one Reshape of the chain's input, or into nothing.

    Only when each intermediate result has no other reader, and the final shape is a constant
    target: known sizes, 0 for the input's own dim at that position, at most one -1 (see
    `_target`). Unsqueeze/Squeeze pairs on the same axes cancel whatever the rank.
    """
    interface = interface_tensors(graph)
    names = _LazyNames(graph)
    counts: Counter = Counter()
    for subgraph in walk(graph):
        if (subgraph.opset or MIN_OPSET) < MIN_OPSET:
            continue
        for node in list(subgraph.nodes):
            if not node.outputs or node.op not in VIEW_OPS or not is_standard(node):
                continue
            result = _fuse_with_producer(node, interface, names) or _squeeze_through_transpose(node, interface, subgraph, names)
            if result:
                counts[result] += 1
    return PassResult(fused=counts["fused"], cancelled=counts["cancelled"])


class _LazyNames:
    """Fresh names for new constants; the scan of the graph's names happens on first use."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.allocate = None

    def __call__(self, base: str) -> str:
        if self.allocate is None:
            self.allocate = unique_names(self.graph)
        return self.allocate(base)


# ----------------------------------------------------------------------------- chains of view ops


def _fuse_with_producer(node: gs.Node, interface: set[int], names: _LazyNames) -> str | None:
    """Merge `node` with the view op before it (whose output only it reads); returns what happened."""
    upstream = only_producer(node.inputs[0])
    if upstream is None or upstream.op not in VIEW_OPS or single_reader(node.inputs[0], interface) is not node:
        return None
    source = upstream.inputs[0]
    output = node.outputs[0]
    if _cancels(upstream, node) and id(output) not in interface:
        replace_all_uses(output, source)
        return "cancelled"
    merged_axes = _merged_axes(upstream, node)
    if merged_axes is not None:
        _set_axes(node, source, merged_axes, names)
        return "fused"
    start = [_static(dim, axis) for axis, dim in enumerate(source.shape)] if source.shape is not None else None
    # The chain input's symbolic dims: an output annotated with one of them has that dim there.
    symbols = {trusted_symbol(dim): axis for axis, dim in enumerate(source.shape or [])}
    symbols.pop(None, None)
    ones: set[int] = set()
    middle = _apply(upstream, start, ones, symbols)
    final = _apply(node, middle, ones, symbols) if middle is not None else None
    if final is None:
        return None
    if start is not None and _is_identity(final, start, ones):
        if id(output) not in interface:
            replace_all_uses(output, source)
            return "cancelled"
        target = [0] * len(final)
    else:
        target = _target(final, node)
        if target is None:
            return None
    _become_reshape(node, source, target, names)
    return "fused"


def _squeeze_through_transpose(node: gs.Node, interface: set[int], graph: gs.Graph, names: _LazyNames) -> str | None:
    """View(x) -> Transpose -> Squeeze becomes View'(x) -> Transpose: the squeezed axes (size 1)
    leave the view's target and the permutation instead (torch's multi-head attention exports
    Reshape -> Transpose -> Squeeze for its q, k, v split)."""
    if node.op != "Squeeze":
        return None
    transpose = only_producer(node.inputs[0], op="Transpose")
    if transpose is None or single_reader(node.inputs[0], interface) is not node:
        return None
    middle = transpose.inputs[0]
    view = only_producer(middle)
    if view is None or view.op not in VIEW_OPS or single_reader(middle, interface) is not transpose:
        return None
    perm = transpose.attrs.get("perm")
    axes = axes_of(node)
    if perm is None or axes is None:
        return None
    perm = [int(axis) for axis in perm]
    squeezed = sorted({axis + len(perm) if axis < 0 else axis for axis in axes})
    if not all(0 <= axis < len(perm) for axis in squeezed) or len(squeezed) != len(axes):
        return None
    removed = {perm[axis] for axis in squeezed}  # the axes of the view's output that go
    source = view.inputs[0]
    start = [_static(dim, axis) for axis, dim in enumerate(source.shape)] if source.shape is not None else None
    symbols = {trusted_symbol(dim): axis for axis, dim in enumerate(source.shape or [])}
    symbols.pop(None, None)
    dims = _apply(view, start, set(), symbols)
    if dims is None or len(dims) != len(perm) or any(isinstance(dims[axis], int) and dims[axis] != 1 for axis in removed):
        return None
    # As for any chain, a -1 beside a copied dim is refused (see `_target`).
    target = _target([dim for axis, dim in enumerate(dims) if axis not in removed], node)
    if target is None:
        return None
    output = node.outputs[0]
    if not can_merge(transpose.outputs[0], output, interface, graph):
        return None
    _become_reshape(view, source, target, names)
    middle.shape = None  # its rank changed; shape inference annotates it again
    transpose.attrs["perm"] = [axis - sum(1 for gone in removed if gone < axis) for axis in perm if axis not in removed]
    kept = transpose.outputs[0]
    kept.shape = output.shape
    disconnect(node)
    merge_tensors(kept, output, interface, graph)
    return "fused"


def _cancels(first: gs.Node, second: gs.Node) -> bool:
    """Unsqueeze then Squeeze (or Squeeze then Unsqueeze) of the same axes, whatever the rank.

    Both ops read their axes against the same rank (the larger one), so equal lists of the
    same sign mean the same positions; a Squeeze without axes is not known to match.
    """
    if {first.op, second.op} != {"Squeeze", "Unsqueeze"}:
        return False
    axes = [axes_of(first), axes_of(second)]
    if any(value is None for value in axes):
        return False
    first_axes, second_axes = sorted(axes[0]), sorted(axes[1])
    same_sign = all(axis >= 0 for axis in first_axes + second_axes) or all(axis < 0 for axis in first_axes + second_axes)
    return same_sign and first_axes == second_axes and len(set(first_axes)) == len(first_axes)


def _merged_axes(first: gs.Node, second: gs.Node) -> list[int] | None:
    """The axes of one Unsqueeze (or Squeeze) doing what two in a row do; exact for any shape.

    Axes are normalized with the rank where it is known; otherwise they must be non-negative.
    """
    if first.op != second.op or first.op not in ("Squeeze", "Unsqueeze"):
        return None
    first_axes, second_axes = axes_of(first), axes_of(second)
    if first_axes is None or second_axes is None:
        return None
    rank = len(first.inputs[0].shape) if first.inputs[0].shape is not None else None
    if first.op == "Unsqueeze":
        # The second's axes are positions in the final output; the first's are positions in the
        # middle one, whose axes fill the final positions the second leaves free, in order.
        if rank is not None:
            first_axes = [axis + rank + len(first_axes) if axis < 0 else axis for axis in first_axes]
            second_axes = [axis + rank + len(first_axes) + len(second_axes) if axis < 0 else axis for axis in second_axes]
        if min(first_axes + second_axes) < 0:
            return None
        # Far enough to reach the middle's highest axis named (the final rank when it is known).
        limit = max(first_axes + second_axes) + len(first_axes) + len(second_axes) + 1
        free = [axis for axis in range(limit) if axis not in second_axes]
        if max(first_axes) >= len(free):
            return None
        return sorted(set(second_axes) | {free[axis] for axis in first_axes})
    # Squeeze: the first's axes are positions in x; the second's are positions among x's remaining axes.
    if rank is not None:
        first_axes = [axis + rank if axis < 0 else axis for axis in first_axes]
        second_axes = [axis + rank - len(first_axes) if axis < 0 else axis for axis in second_axes]
    if min(first_axes + second_axes) < 0:
        return None
    size = rank if rank is not None else max(first_axes) + max(second_axes) + 2
    kept = [axis for axis in range(size) if axis not in first_axes]
    if max(second_axes) >= len(kept):
        return None
    return sorted(set(first_axes) | {kept[axis] for axis in second_axes})


def _set_axes(node: gs.Node, source: gs.Tensor, axes: list[int], names: _LazyNames) -> None:
    """Make Squeeze/Unsqueeze `node` read `source` with `axes` (an attribute before opset 13, an input since)."""
    if "axes" in node.attrs:
        node.attrs["axes"] = axes
        set_input(node, 0, source)
        return
    values = gs.Constant(names(f"{node.outputs[0].name}_axes"), np.array(axes, dtype=np.int64))
    set_inputs(node, [source, values])


def _static(dim, axis: int) -> Entry:
    return int(dim) if isinstance(dim, (int, np.integer)) and dim >= 0 else Dim(axis)


def _apply(node: gs.Node, dims: list[Entry] | None, ones: set[int], symbols: dict[str, int]) -> list[Entry] | None:
    """The output dims of view op `node` given its input dims (None: the chain input's, rank unknown).

    `ones` collects the chain input's dims a Squeeze proved to be 1; `symbols` maps the chain
    input's symbolic dims to their axes.
    """
    if node.op == "Reshape":
        result = _apply_reshape(node, dims)
    elif dims is None:
        return None  # Flatten, Squeeze and Unsqueeze need the rank
    elif node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        axis = axis + len(dims) if axis < 0 else axis
        if not 0 <= axis <= len(dims):
            return None
        result = [_product(dims[:axis]), _product(dims[axis:])]
    elif node.op == "Squeeze":
        result = _apply_squeeze(node, dims, ones)
    else:
        result = _apply_unsqueeze(node, dims)
    return _refine(result, node.outputs[0], symbols) if result is not None else None


def _apply_reshape(node: gs.Node, dims: list[Entry] | None) -> list[Entry] | None:
    shape = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None or np.asarray(shape).ndim != 1:
        return None
    allow_zero = int(node.attrs.get("allowzero", 0)) == 1
    result: list[Entry] = []
    for axis, value in enumerate(int(value) for value in np.asarray(shape)):
        if value > 0 or (value == 0 and allow_zero):
            result.append(value)
        elif value == 0:
            if dims is None:
                result.append(Dim(axis))
            elif axis < len(dims):
                result.append(dims[axis])
            else:
                return None
        elif value == -1:
            result.append(None)
        else:
            return None
    return result


def _apply_squeeze(node: gs.Node, dims: list[Entry], ones: set[int]) -> list[Entry] | None:
    axes = axes_of(node)
    if axes is None:  # every dim of size 1 goes: only known if every dim is known
        if not all(isinstance(dim, int) for dim in dims):
            return None
        return [dim for dim in dims if dim != 1]
    rank = len(dims)
    positions = {axis + rank if axis < 0 else axis for axis in axes}
    if not all(0 <= axis < rank for axis in positions):
        return None
    for axis in positions:
        if isinstance(dims[axis], int) and dims[axis] != 1:
            return None
        if isinstance(dims[axis], Dim):
            ones.add(dims[axis].axis)  # the Squeeze fails at run time unless it is 1
    return [dim for axis, dim in enumerate(dims) if axis not in positions]


def _apply_unsqueeze(node: gs.Node, dims: list[Entry]) -> list[Entry] | None:
    axes = axes_of(node)
    if axes is None:
        return None
    rank = len(dims) + len(axes)
    positions = {axis + rank if axis < 0 else axis for axis in axes}
    if len(positions) != len(axes) or not all(0 <= axis < rank for axis in positions):
        return None
    remaining = iter(dims)
    return [1 if axis in positions else next(remaining) for axis in range(rank)]


def _product(dims: list[Entry]) -> Entry:
    if len(dims) == 1:
        return dims[0]
    if all(isinstance(dim, int) for dim in dims):
        return int(np.prod(dims, dtype=np.int64))
    return None


def _refine(dims: list[Entry], tensor: gs.Tensor, symbols: dict[str, int]) -> list[Entry]:
    """Unknown entries filled in from the output's annotation: a static size, or a symbol of the chain input."""
    shape = tensor.shape
    if shape is None or len(shape) != len(dims):
        return dims
    refined = []
    for dim, known in zip(dims, shape):
        if dim is None and isinstance(known, (int, np.integer)) and known > 0:
            dim = int(known)
        elif dim is None and trusted_symbol(known) in symbols:
            dim = Dim(symbols[known])
        refined.append(dim)
    return refined


def _is_identity(final: list[Entry], start: list[Entry], ones: set[int]) -> bool:
    if len(final) != len(start):
        return False
    return all(
        dim == Dim(axis) or (isinstance(dim, int) and (dim == start[axis] or (dim == 1 and axis in ones)))
        for axis, dim in enumerate(final)
    )


def _target(final: list[Entry], last: gs.Node) -> list[int] | None:
    """The constant Reshape target that gives `final` from the chain input, if there is one.

    A -1 fails at run time when the other entries multiply to 0, which a copied dim can do on an
    empty tensor: it is used only where the chain's last Reshape has its own -1 (the same entries
    at run time, so the same failures), or where every other entry is a known positive size.
    """
    target: list[int] = []
    unknown = []
    for axis, dim in enumerate(final):
        if isinstance(dim, int) and dim > 0:
            target.append(dim)
        elif dim == Dim(axis):
            target.append(0)
        elif isinstance(dim, int):
            return None  # a known 0 would read as "copy the dim"
        else:
            unknown.append(axis)
            target.append(-1)
    if len(unknown) > 1:
        return None
    if unknown and 0 in target and not _own_minus_one(last, unknown[0]):
        return None
    return target


def _own_minus_one(node: gs.Node, axis: int) -> bool:
    if node.op != "Reshape":
        return False
    shape = constant_value(node.inputs[1])
    return shape is not None and axis < np.asarray(shape).size and int(np.asarray(shape).reshape(-1)[axis]) == -1


def _become_reshape(node: gs.Node, source: gs.Tensor, target: list[int], names: _LazyNames) -> None:
    """Rewrite `node` in place as Reshape(source, target); its output (and name) stays."""
    shape = gs.Constant(names(f"{node.outputs[0].name}_shape"), np.array(target, dtype=np.int64))
    node.op = "Reshape"
    node.attrs.clear()
    set_inputs(node, [source, shape])
