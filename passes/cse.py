"""Common-subexpression elimination: nodes that compute the same value are merged."""

from __future__ import annotations

import math
import struct

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    BODY_OPS,
    can_merge,
    constant_bytes,
    constant_type,
    disconnect,
    interface_tensors,
    is_empty,
    is_standard,
    merge_tensors,
    node_subgraphs,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

# Constants up to this size are compared by value; larger ones are left to deduplicate-initializers.
VALUE_KEY_BYTES = 4096
# Their value is not a function of their inputs. Dropout is random in training mode (in inference
# mode eliminate-noops removes it), so it is never merged either.
NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)


@register_pass("eliminate-common-subexpressions")
def eliminate_common_subexpressions(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Merge nodes with the same op, attributes and inputs (equal constants count as one input).

    The first node in graph order stays and readers of the others read its outputs. Nodes that
    own bodies, custom-domain and nondeterministic nodes are never merged.
    """
    interface = interface_tensors(graph)
    merged = 0
    for subgraph in walk(graph):
        while True:
            count, renamed = _merge_duplicates(subgraph, interface)
            merged += count
            # A kept output that took an interface name changed the keys of nodes met before it.
            if not renamed:
                break
    return PassResult(merged=merged)


def _merge_duplicates(graph: gs.Graph, interface: set[int]) -> tuple[int, bool]:
    """One sweep in graph order; returns (nodes merged, whether a kept output was renamed).

    Nodes are first bucketed by a cheap key (op, which tensors they read, where constants sit);
    the full key (attributes, constant values) is computed only for nodes that share a bucket,
    which is rare. Keys are taken as the sweep reaches a node, so a chain of duplicates merges
    in one sweep: the readers of a merged node already read the kept one when they are met.
    """
    alone: dict[tuple, gs.Node] = {}  # cheap key -> the one node met with it so far
    # cheap key -> full key -> the first node met with it. A node whose full key is there already
    # is merged (or skipped), so the first node in graph order stays.
    shared: dict[tuple, dict[tuple, gs.Node]] = {}
    constant_keys: dict[int, tuple] = {}
    merged, renamed = 0, False
    for node in list(graph.nodes):
        cheap = _cheap_key(node)
        if cheap is None:
            continue
        if cheap not in shared:
            if cheap not in alone:
                alone[cheap] = node
                continue
            first = alone.pop(cheap)
            shared[cheap] = {_full_key(first, constant_keys): first}
        same = shared[cheap]
        key = _full_key(node, constant_keys)
        kept = same.get(key)
        if kept is None:
            same[key] = node
            continue
        pairs = [(a, b) for a, b in zip(kept.outputs, node.outputs) if not is_empty(b)]
        if not all(can_merge(a, b, interface, graph) for a, b in pairs):
            continue  # both write interface tensors: each keeps its own
        disconnect(node)
        for a, b in pairs:
            renamed |= id(b) in interface
            merge_tensors(a, b, interface, graph)
        merged += 1
    return merged, renamed


def _cheap_key(node: gs.Node) -> tuple | None:
    """A coarser key than _node_key (equal full keys give equal cheap keys), without reading
    attributes or constant values; None if the node must not be merged."""
    if not node.outputs or node.op in NONDETERMINISTIC or node.op in BODY_OPS or not is_standard(node):
        return None
    reads = ["" if is_empty(tensor) else "constant" if isinstance(tensor, gs.Constant) else id(tensor) for tensor in node.inputs]
    return (node.op, tuple(reads), len(node.outputs))


def _full_key(node: gs.Node, constant_keys: dict[int, tuple]) -> tuple:
    """_node_key, or a key equal to no other node's if the node must not be merged."""
    return _node_key(node, constant_keys) or ("unmergeable", id(node))


def _node_key(node: gs.Node, constant_keys: dict[int, tuple]) -> tuple | None:
    """What determines the node's outputs, hashable; None if the node must not be merged."""
    if not node.outputs or not is_standard(node) or node.op in NONDETERMINISTIC or node_subgraphs(node):
        return None
    inputs = []
    for tensor in node.inputs:
        if is_empty(tensor):
            inputs.append(("",))
        elif isinstance(tensor, gs.Constant):
            if id(tensor) not in constant_keys:
                constant_keys[id(tensor)] = _constant_key(tensor)
            inputs.append(constant_keys[id(tensor)])
        else:
            inputs.append(("tensor", id(tensor)))
    try:
        attributes = tuple(sorted([(name, _attribute_key(value)) for name, value in node.attrs.items()]))
    except _Unmergeable:
        return None
    outputs = tuple(map(is_empty, node.outputs))
    return (node.op, tuple(inputs), attributes, outputs)


def _constant_key(tensor: gs.Constant) -> tuple:
    """Small constants (the scalars and shape vectors exporters repeat) by value, larger ones by
    identity: deduplicate-initializers shares equal large ones, without reading every weight here."""
    signature = constant_type(tensor)
    if signature is None or _nbytes(signature) > VALUE_KEY_BYTES:
        return ("tensor", id(tensor))
    return ("constant", signature, constant_bytes(tensor))


def _nbytes(signature: tuple[int, tuple[int, ...]]) -> int:
    element_type, shape = signature
    return math.prod(shape) * onnx.helper.tensor_dtype_to_np_dtype(element_type).itemsize


class _Unmergeable(Exception):
    pass


def _attribute_key(value):
    """A hashable, exact stand-in for an attribute value (floats by their bits: 0.0 is not -0.0)."""
    if isinstance(value, gs.Constant):  # first: every ConstantOfShape has one
        signature = constant_type(value)
        if signature is None:
            raise _Unmergeable  # strings, or values held in another type than exported
        return ("constant", signature, constant_bytes(value))
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, np.integer)):
        return ("int", int(value))
    if isinstance(value, (float, np.floating)):
        return ("float", struct.pack("<d", float(value)))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, bytes):
        return ("bytes", value)
    if isinstance(value, (list, tuple)):
        return ("list", tuple([_attribute_key(item) for item in value]))
    if isinstance(value, np.ndarray) and value.dtype != object:
        return ("array", value.dtype.str, value.shape, value.tobytes())
    raise _Unmergeable  # subgraphs, types, anything not known to compare exactly
