"""Shape folding: the parts of Shape/Size computations that static dims already decide."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import bypass, constant_value, interface_tensors, is_empty, is_standard, make_constant, walk
from onnxslim.manager import PassContext, PassResult, register_pass

from ._shapes import RULES, PartialValues, dim_elements, is_symbol, known

@register_pass("fold-shapes")
def fold_shapes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace Shape/Size results, and Gather/Slice/Concat/Unsqueeze over them, by constants where static dims decide them.

    Also a Where over shape vectors whose condition the shape values decide keeps the input it picks.

    Dynamic dims are never baked in: an element that depends on one stays computed at run time,
    except a Reshape target's single dynamic element, which becomes -1 (Reshape infers it).
    """
    interface = interface_tensors(graph)
    folded = targets = selections = 0
    # One map for every graph: a body reading an outer-scope shape value (a dim gathered at the
    # top level) knows what the outer graph knows.
    partial_of = PartialValues()
    for body in walk(graph):
        for node in list(body.nodes):
            if node.op == "Reshape" and is_standard(node) and _target_with_one_dynamic_dim(node, partial_of, interface, body):
                targets += 1
                continue
            if node.op not in RULES or not is_standard(node) or not node.outputs or is_empty(node.outputs[0]):
                continue
            if node.op == "Where" and _decided_where(node, partial_of, interface, body):
                selections += 1
                continue
            output = node.outputs[0]
            if isinstance(output, gs.Constant):
                continue
            partial = partial_of(output)
            if partial is None or not all(known(element) for element in partial[0]):
                continue
            value = _as_array(*partial, output.dtype)
            if value is not None:
                make_constant(output, value, interface, body)
                folded += 1
    return PassResult(folded=folded, reshape_targets=targets, selections=selections)


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


def _decided_where(node: gs.Node, partial_of, interface: set[int], body: gs.Graph) -> bool:
    """Where(Equal(shape, -1), ones, shape) -> shape: torch's expand(-1 keeps a dim) where no
    element can be -1 (each is a size or a known int). Taken when the condition is decided the same
    way for every element and the chosen input already has the output's length."""
    condition, output = partial_of(node.inputs[0]), partial_of(node.outputs[0])
    if condition is None or output is None or None in condition[0] or len(set(condition[0])) != 1:
        return False
    keep = 1 if condition[0][0] else 2
    chosen = partial_of(node.inputs[keep])
    if chosen is None or len(chosen[0]) != len(output[0]) or chosen[1] != output[1]:
        return False
    return bypass(node, interface, body, keep=keep)


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
    source = dim_elements(node.inputs[0]) or []
    elements = [
        0 if is_symbol(element) and axis < len(source) and source[axis] == element else element
        for axis, element in enumerate(partial[0])
    ]
    unknown = [element for element in elements if not known(element)]
    if len(unknown) > 1:
        return False
    # A new -1 needs every other entry known and positive: beside a 0 (copy) or a -1, an empty
    # input leaves it undetermined and runtimes reject what the original model ran.
    if unknown and not all(known(element) and element > 0 for element in elements if element is not unknown[0]):
        if not _empty_input_fails_upstream(node, elements, source):
            return False
    target = np.array([element if known(element) else -1 for element in elements], dtype=np.int64)
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
    if any(known(element) and element < 0 for element in elements):
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
    dims = dim_elements(reshape.inputs[0]) or []
    symbols = {dims[axis] if axis < len(dims) else None for axis, entry in enumerate(entries) if entry == 0}
    return set() if None in symbols else symbols
