"""Common-subexpression elimination: nodes that compute the same value are merged."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

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
    replace_all_uses,
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

    The first node in graph order stays and readers of the others read its outputs. A node of an
    If/Loop/Scan body that repeats a node of an enclosing graph, met there before the node that
    owns the body, reads that node's outputs instead: the enclosing graph computes them before the
    body runs, whether or not it runs. A node both branches of an If compute from outer-scope
    values alone is computed once, before the If: one branch runs whenever the If does, so it is
    computed (or fails) exactly when it was. Nodes that own bodies, custom-domain and
    nondeterministic nodes are never merged.
    """
    interface = interface_tensors(graph)
    sweep = _Sweep(interface)
    sweep.graph(graph, ())
    return PassResult(merged=sweep.merged, hoisted=sweep.hoisted)


@dataclass(frozen=True)
class _Scope:
    """An enclosing graph and its node that owns the body being swept (directly or further in)."""

    graph: gs.Graph
    owner: gs.Node


class _Sweep:
    """One run of the pass: every graph, outer graphs first, with the keys of the enclosing ones."""

    def __init__(self, interface: set[int]) -> None:
        self.interface = interface
        self.constant_keys: dict[int, tuple] = {}
        self.merged = 0
        self.hoisted = 0
        # id(graph) -> (full key -> the first node with it, id(node) -> its position); built the
        # first time a body node that reads only outer-scope values asks, after the graph's own sweep.
        self.indexes: dict[int, tuple[dict[tuple, gs.Node], dict[int, int]]] = {}

    def graph(self, graph: gs.Graph, enclosing: tuple[_Scope, ...]) -> None:
        while True:
            while True:
                count, renamed = self._merge_duplicates(graph, enclosing)
                self.merged += count
                # A kept output that took an interface name changed the keys of nodes met before it.
                if not renamed:
                    break
            for node in list(graph.nodes):
                # A disconnected node's bodies are detached too: there is nothing left to read there.
                if node.outputs:
                    for body in node_subgraphs(node):
                        self.graph(body, (_Scope(graph, node), *enclosing))
            hoisted = sum(self._hoist(graph, node) for node in list(graph.nodes) if node.op == "If" and is_standard(node))
            if not hoisted:
                return
            # Nodes moved out of the branches: what they repeat in this graph, or their readers in
            # the branches repeat here, merges on the next round.
            self.hoisted += hoisted
            self.indexes.clear()

    def _hoist(self, graph: gs.Graph, node: gs.Node) -> int:
        """Move the nodes both branches of the If `node` compute from outer-scope values alone
        into `graph`, just before the If; the else branch's copy reads the moved node's outputs."""
        branches = [node.attrs.get("then_branch"), node.attrs.get("else_branch")]
        if not node.outputs or not all(isinstance(branch, gs.Graph) for branch in branches):
            return 0
        then, other = branches
        hoisted = 0
        while True:
            candidates = {}
            for duplicate in self._outer_only(other):
                candidates.setdefault(_node_key(duplicate, self.constant_keys), duplicate)
            moved = 0
            for inner in self._outer_only(then):
                duplicate = candidates.pop(_node_key(inner, self.constant_keys), None)
                if duplicate is None:
                    continue
                then.nodes.remove(inner)
                graph.nodes.insert(graph.nodes.index(node), inner)
                pairs = list(zip(inner.outputs, duplicate.outputs))
                disconnect(duplicate)
                for kept, replaced in pairs:
                    if not is_empty(replaced):
                        replace_all_uses(replaced, kept)
                moved += 1
            if not moved:
                return hoisted
            hoisted += moved

    def _outer_only(self, body: gs.Graph) -> list[gs.Node]:
        """The mergeable nodes of `body` that read no value computed in it and write none of the
        interface (a body output must be produced in the body)."""
        local = {id(tensor) for tensor in body.inputs} | {id(tensor) for node in body.nodes for tensor in node.outputs}
        return [
            node
            for node in body.nodes
            if _cheap_key(node) is not None
            and not any(id(tensor) in local for tensor in node.inputs)
            and not any(id(tensor) in self.interface for tensor in node.outputs)
            and _node_key(node, self.constant_keys) is not None
        ]

    def _merge_duplicates(self, graph: gs.Graph, enclosing: tuple[_Scope, ...]) -> tuple[int, bool]:
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
        local = {id(tensor) for tensor in graph.inputs} | {id(tensor) for node in graph.nodes for tensor in node.outputs}
        merged, renamed = 0, False
        for node in list(graph.nodes):
            cheap = _cheap_key(node)
            if cheap is None:
                continue
            if enclosing and not any(id(tensor) in local for tensor in node.inputs):
                kept = self._enclosing_duplicate(node, enclosing)
                if kept is not None and self._merge(kept, node, graph) is not None:
                    merged += 1
                    continue
            if cheap not in shared:
                if cheap not in alone:
                    alone[cheap] = node
                    continue
                first = alone.pop(cheap)
                shared[cheap] = {_full_key(first, self.constant_keys): first}
            same = shared[cheap]
            key = _full_key(node, self.constant_keys)
            kept = same.get(key)
            if kept is None:
                same[key] = node
                continue
            took_name = self._merge(kept, node, graph)
            if took_name is not None:
                renamed |= took_name
                merged += 1
        return merged, renamed

    def _merge(self, kept: gs.Node, node: gs.Node, graph: gs.Graph) -> bool | None:
        """Make the readers of `node` (a node of `graph`) read `kept`'s outputs. Returns whether a
        kept output took an interface name, or None (nothing changed) if an interface tensor stands
        in the way: both write one, or `node` writes one and `kept` is outside `graph`."""
        pairs = [(a, b) for a, b in zip(kept.outputs, node.outputs) if not is_empty(b)]
        if not all(can_merge(a, b, self.interface, graph) for a, b in pairs):
            return None
        disconnect(node)
        for a, b in pairs:
            merge_tensors(a, b, self.interface, graph)
        return any(id(b) in self.interface for _, b in pairs)

    def _enclosing_duplicate(self, node: gs.Node, enclosing: tuple[_Scope, ...]) -> gs.Node | None:
        """The first node of an enclosing graph with `node`'s key, placed before the node there that
        leads to `node`'s body (so it is computed before the body runs), innermost graph first."""
        key = _node_key(node, self.constant_keys)
        if key is None:
            return None
        for scope in enclosing:
            keys, positions = self._index(scope.graph)
            kept = keys.get(key)
            if kept is not None and positions[id(kept)] < positions.get(id(scope.owner), -1):
                return kept
        return None

    def _index(self, graph: gs.Graph) -> tuple[dict[tuple, gs.Node], dict[int, int]]:
        if id(graph) not in self.indexes:
            keys: dict[tuple, gs.Node] = {}
            for node in graph.nodes:
                if _cheap_key(node) is not None:
                    key = _node_key(node, self.constant_keys)
                    if key is not None:
                        keys.setdefault(key, node)
            self.indexes[id(graph)] = (keys, {id(node): index for index, node in enumerate(graph.nodes)})
        return self.indexes[id(graph)]


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
