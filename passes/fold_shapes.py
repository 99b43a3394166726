"""Shape folding: the parts of Shape/Size computations that static dims already decide."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import axes_of, constant_value, interface_tensors, is_empty, is_standard, make_constant, trusted_symbol, walk
from onnxslim.manager import PassContext, PassResult, register_pass
from onnxslim.rules import RuleTable

# A partial value: a 0-D or 1-D integer tensor whose elements are known ints, or else the name of
# the symbolic dim they equal (str), or None (computed, unknown).
Element = int | str | None
Partial = tuple[tuple[Element, ...], bool]  # (elements, is_scalar)
Rule = Callable[[gs.Node, Callable[[gs.Tensor], "Partial | None"]], "Partial | None"]
RULES = RuleTable()
INT64_MAX = 2**63 - 1
rule = RULES.rule


@register_pass("fold-shapes")
def fold_shapes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace Shape/Size results, and Gather/Slice/Concat/Unsqueeze over them, by constants where static dims decide them.

    Dynamic dims are never baked in: an element that depends on one stays computed at run time,
    except a Reshape target's single dynamic element, which becomes -1 (Reshape infers it).
    """
    interface = interface_tensors(graph)
    folded = targets = 0
    # One map for every graph: walk gives a graph before its bodies, so a body reading an
    # outer-scope shape value (a dim gathered at the top level) knows what the outer graph knew.
    partials: dict[int, Partial] = {}
    for body in walk(graph):

        def partial_of(tensor: gs.Tensor) -> Partial | None:
            if id(tensor) in partials:
                return partials[id(tensor)]
            value = constant_value(tensor)
            if value is not None:
                if value.dtype.kind not in "iu" or value.ndim > 1:
                    return None
                return tuple(int(element) for element in value.reshape(-1)), value.ndim == 0
            return _unknown_elements(tensor)

        for node in list(body.nodes):
            if node.op == "Reshape" and is_standard(node) and _target_with_one_dynamic_dim(node, partial_of, interface, body):
                targets += 1
                continue
            compute = RULES.get(node.op)
            if compute is None or not is_standard(node) or not node.outputs or is_empty(node.outputs[0]):
                continue
            partial = compute(node, partial_of)
            if partial is None:
                continue
            output = node.outputs[0]
            elements, scalar = partial
            if all(_known(element) for element in elements) and not isinstance(output, gs.Constant):
                value = _as_array(elements, scalar, output.dtype)
                if value is not None:
                    make_constant(output, value, interface, body)
                    folded += 1
                    continue
            partials[id(output)] = partial
    return PassResult(folded=folded, reshape_targets=targets)


def _as_array(elements: tuple[int, ...], scalar: bool, dtype) -> np.ndarray | None:
    """The folded value in the output's integer type; None when an element does not fit it (the
    rules compute in Python ints, and only Cast wraps, so this is a value no rule should have)."""
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.int64)
    if dtype.kind not in "iu":
        return None
    limits = np.iinfo(dtype)
    if any(not limits.min <= element <= limits.max for element in elements):
        return None
    return np.array(elements, dtype=dtype).reshape(() if scalar else (len(elements),))


def _unknown_elements(tensor: gs.Tensor) -> Partial | None:
    """An integer scalar or short vector computed at run time: its length is known, its elements not."""
    if tensor.dtype is None or np.dtype(tensor.dtype).kind not in "iu" or tensor.shape is None:
        return None
    if len(tensor.shape) == 0:
        return (None,), True
    if len(tensor.shape) == 1 and isinstance(tensor.shape[0], (int, np.integer)) and 0 <= tensor.shape[0] <= 8:
        return (None,) * int(tensor.shape[0]), False
    return None


def _known(element: Element) -> bool:
    return isinstance(element, int)


def _static_dims(tensor: gs.Tensor) -> list[Element] | None:
    """The tensor's dims: ints where static, the symbolic name where it has one, else None."""
    if tensor.shape is None:
        return None
    return [int(dim) if isinstance(dim, (int, np.integer)) and dim >= 0 else trusted_symbol(dim) for dim in tensor.shape]


@rule("Shape")
def shape(node: gs.Node, partial_of) -> Partial | None:
    dims = _static_dims(node.inputs[0])
    if dims is None:
        return None
    rank = len(dims)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start, end = _clamp(start, rank), _clamp(end, rank)
    return tuple(dims[start:end]), False


@rule("Size")
def size(node: gs.Node, partial_of) -> Partial | None:
    dims = _static_dims(node.inputs[0])
    if dims is None or not all(_known(dim) for dim in dims):
        return None
    count = math.prod(dims)  # Python ints: numpy's int64 product wraps around silently
    return ((count,), True) if count <= INT64_MAX else None


@rule("Gather")
def gather(node: gs.Node, partial_of) -> Partial | None:
    data = partial_of(node.inputs[0])
    indices = constant_value(node.inputs[1])
    if data is None or data[1] or indices is None or node.attrs.get("axis", 0) != 0 or indices.ndim > 1:
        return None
    elements = data[0]
    picked = []
    for index in np.asarray(indices).reshape(-1):
        index = int(index)
        if not -len(elements) <= index < len(elements):
            return None
        picked.append(elements[index])
    return tuple(picked), indices.ndim == 0


@rule("Slice")
def slice_(node: gs.Node, partial_of) -> Partial | None:
    data = partial_of(node.inputs[0])
    if data is None or data[1] or "starts" in node.attrs:
        return None
    bounds = [constant_value(tensor) if not is_empty(tensor) else None for tensor in node.inputs[1:5]]
    bounds += [None] * (4 - len(bounds))
    starts, ends, axes, steps = bounds
    for tensor, value in zip(node.inputs[3:5], (axes, steps)):
        if not is_empty(tensor) and value is None:
            return None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and int(np.asarray(axes).reshape(-1)[0]) not in (0, -1):
        return None
    step = int(np.asarray(steps).reshape(-1)[0]) if steps is not None else 1
    if step == 0:
        return None
    start = int(np.asarray(starts).reshape(-1)[0])
    end = int(np.asarray(ends).reshape(-1)[0])
    elements = data[0]
    # Python slicing clamps exactly as ONNX Slice does, including huge INT64 ends.
    end = max(min(end, 2**62), -(2**62))
    return tuple(elements[slice(start, end, step)]), False


@rule("Concat")
def concat(node: gs.Node, partial_of) -> Partial | None:
    if node.attrs.get("axis", 0) not in (0, -1):
        return None
    parts = [partial_of(tensor) for tensor in node.inputs]
    if any(part is None or part[1] for part in parts):
        return None
    return tuple(element for part in parts for element in part[0]), False


@rule("Unsqueeze")
def unsqueeze(node: gs.Node, partial_of) -> Partial | None:
    data = partial_of(node.inputs[0])
    if data is None or not data[1] or axes_of(node) not in ([0], [-1]):
        return None
    return data[0], False


@rule("Squeeze")
def squeeze(node: gs.Node, partial_of) -> Partial | None:
    data = partial_of(node.inputs[0])
    if data is None or data[1] or len(data[0]) != 1:
        return None
    return data[0], True


@rule("Cast")
def cast(node: gs.Node, partial_of) -> Partial | None:
    """Integer to integer: known elements wrap as onnxruntime's casts do (two's complement, the
    target's width); a symbolic dim survives only a target that holds any size a dim can have
    in practice (32 bits or more)."""
    data = partial_of(node.inputs[0])
    target = node.outputs[0].dtype
    if data is None or target is None or np.dtype(target).kind not in "iu":
        return None
    target = np.dtype(target)
    bits, signed = 8 * target.itemsize, target.kind == "i"

    def converted(element: Element) -> Element:
        if isinstance(element, str):
            return element if bits >= 32 else None
        if element is None:
            return None
        wrapped = element % (1 << bits)
        return wrapped - (1 << bits) if signed and wrapped >= 1 << (bits - 1) else wrapped

    return tuple(converted(element) for element in data[0]), data[1]


@rule("Identity")
def identity(node: gs.Node, partial_of) -> Partial | None:
    return partial_of(node.inputs[0])


def _clamp(index: int, rank: int) -> int:
    if index < 0:
        index += rank
    return min(max(index, 0), rank)


def _target_with_one_dynamic_dim(node: gs.Node, partial_of, interface: set[int], body: gs.Graph) -> bool:
    """Reshape(x, [b, s, 12, 64]) with b, s dynamic -> Reshape(x, [0, 0, 12, 64]) or [-1, 12, 197, 64].

    An element that is x's own dim at the same axis (the same symbolic name, not a placeholder
    like "?") becomes 0, which Reshape reads as "copy that dim". If then one dynamic element is
    left and all others are known positive sizes, the element count fixes it (size(x) / their
    product), which is exactly what -1 makes Reshape compute.
    The shape arithmetic that computed them becomes dead. Not with allowzero=1 (0 would be a
    real zero dim); a dynamic element is left alone when a -1 is already there.
    """
    if len(node.inputs) < 2 or isinstance(node.inputs[1], gs.Constant) or node.attrs.get("allowzero", 0) == 1:
        return False
    partial = partial_of(node.inputs[1])
    if partial is None or partial[1]:
        return False
    source = _static_dims(node.inputs[0]) or []
    elements = [
        0 if isinstance(element, str) and axis < len(source) and source[axis] == element else element
        for axis, element in enumerate(partial[0])
    ]
    unknown = [element for element in elements if not _known(element)]
    if len(unknown) > 1:
        return False
    # A new -1 needs every other entry known and positive: beside a 0 (copy) or a -1, an empty
    # input leaves it undetermined and runtimes reject what the original model ran.
    if unknown and not all(_known(element) and element > 0 for element in elements if element is not unknown[0]):
        if not _empty_input_fails_upstream(node, elements, source):
            return False
    target = np.array([element if _known(element) else -1 for element in elements], dtype=np.int64)
    # Named after the Reshape's output, unique in the graph (SSA), so no search for a free name.
    node.inputs[1] = gs.Constant(f"{node.outputs[0].name}__target", target)
    return True


# How far up the graph to look for a Reshape that already rejects empty inputs.
UPSTREAM_SEARCH_NODES = 2000


def _empty_input_fails_upstream(node: gs.Node, elements: list, source: list) -> bool:
    """Whether -1 beside copied dims is exact here: every input for which it would fail already
    fails upstream.

    Reshape(x, [0, 4, 16, -1]) fails exactly when a copied dim of x is 0 (the other entries then
    multiply to 0 and -1 is undetermined). If x is computed from the output of a Reshape R whose
    constant target also has -1 beside copies of the same symbolic dims, R fails on those inputs
    first, so the rewrite changes nothing the model can compute (YOLOv8's DFL head is one).
    """
    if any(_known(element) and element < 0 for element in elements):
        return False
    copied = {source[axis] if axis < len(source) else None for axis, element in enumerate(elements) if element == 0}
    if not copied or None in copied:
        return False
    seen: set[int] = set()
    pending = [node.inputs[0]]
    while pending and len(seen) < UPSTREAM_SEARCH_NODES:
        tensor = pending.pop()
        upstream = tensor.inputs[0] if tensor.inputs else None
        if upstream is None or id(upstream) in seen:
            continue
        seen.add(id(upstream))
        if upstream.op == "Reshape" and is_standard(upstream) and copied <= _symbols_rejecting_empty(upstream):
            return True
        pending.extend(upstream.inputs)
    return False


def _symbols_rejecting_empty(reshape: gs.Node) -> set:
    """The symbolic dims of its input that make this Reshape fail when one of them is 0."""
    target = constant_value(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
    if target is None or reshape.attrs.get("allowzero", 0) == 1 or -1 not in target.tolist():
        return set()
    entries = [int(entry) for entry in np.asarray(target).reshape(-1)]
    if any(entry < -1 for entry in entries) or entries.count(-1) != 1:
        return set()
    dims = _static_dims(reshape.inputs[0]) or []
    symbols = {dims[axis] if axis < len(dims) else None for axis, entry in enumerate(entries) if entry == 0}
    return set() if None in symbols else symbols
