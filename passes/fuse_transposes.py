"""Consecutive Transposes composed into one; a Transpose that moves only size-1 axes as a Reshape."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    can_merge,
    disconnect,
    find,
    interface_tensors,
    is_standard,
    known_rank,
    merge_tensors,
    set_input,
    set_inputs,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

RESHAPE_INPUT_OPSET = 5


@register_pass("fuse-transposes")
def fuse_transposes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Compose Transpose(Transpose(x)) into one Transpose of x, or remove both when they cancel;
    then write a Transpose that keeps the order of every axis but those of size 1 as a Reshape.

    Composing happens only when every reader of the first Transpose is a Transpose, so the first
    one goes away. A Reshape moves no data where a Transpose copies it, and Reshape chains merge.
    """
    interface = interface_tensors(graph)
    names = unique_names(graph)
    fused = cancelled = reshaped = 0
    for subgraph in walk(graph):
        for first in find(subgraph, "Transpose"):
            if not first.outputs:
                continue
            between = first.outputs[0]
            readers = list(between.outputs)
            if id(between) in interface or not readers or not all(_is_transpose(node) for node in readers):
                continue
            source = first.inputs[0]
            first_perm = _perm(first, source)
            perms = [_perm(second, between) for second in readers]
            if first_perm is None or any(perm is None for perm in perms):
                continue
            for second, second_perm in zip(readers, perms):
                # y = transpose(x, p) has y.shape[j] = x.shape[p[j]], so the composition reads x at p1[p2[i]].
                set_input(second, 0, source)
                second.attrs["perm"] = [first_perm[axis] for axis in second_perm]
            disconnect(first)  # unread now; disconnected, it no longer counts as a reader of `source`
            for second in readers:
                perm, output = second.attrs["perm"], second.outputs[0]
                if perm == list(range(len(perm))) and can_merge(source, output, interface, subgraph):
                    disconnect(second)
                    merge_tensors(source, output, interface, subgraph)
                    cancelled += 1
                else:
                    fused += 1
        for node in find(subgraph, "Transpose"):
            # Reshape reads its target from an input since opset 5.
            target = _reshape_target(node) if _is_transpose(node) and (graph.opset or 0) >= RESHAPE_INPUT_OPSET else None
            if target is not None:
                node.op, node.attrs = "Reshape", {}
                set_inputs(node, [node.inputs[0], gs.Constant(names(f"{node.name or 'transpose'}_shape"), target)])
                reshaped += 1
    return PassResult(fused=fused, cancelled=cancelled, as_reshape=reshaped)


def _reshape_target(node: gs.Node) -> np.ndarray | None:
    """The Reshape target equal to `node`'s Transpose when it moves only axes of size 1 (the others
    keep their order, so the data's order is unchanged), else None.

    A dim not known statically is 0 (copied) where it stays in place; one that moves is -1, so at
    most one may, and then no dim is copied: with a 0-size copied dim, -1 could not be resolved.
    Static dims must not be 0, for the same reason.
    """
    source = node.inputs[0]
    perm = _perm(node, source)
    if perm is None or source.shape is None or len(perm) != len(source.shape) or sorted(perm) != list(range(len(perm))):
        return None
    dims = list(source.shape)
    static = [isinstance(dim, (int, np.integer)) and dim >= 0 for dim in dims]
    moved = [axis for axis in perm if not (static[axis] and dims[axis] == 1)]
    if moved != sorted(moved) or perm == list(range(len(perm))):
        return None
    if any(is_static and dims[axis] == 0 for axis, is_static in enumerate(static)):
        return None
    target = [int(dims[axis]) if static[axis] else 0 if axis == position else -1 for position, axis in enumerate(perm)]
    if target.count(-1) > 1 or (-1 in target and 0 in target):
        return None
    return np.array(target, dtype=np.int64)


def _is_transpose(node: gs.Node) -> bool:
    # A Transpose some rewrite left without its result is dead-node elimination's, not ours to rewire.
    return node.op == "Transpose" and is_standard(node) and len(node.inputs) == 1 and len(node.outputs) == 1


def _perm(node: gs.Node, source: gs.Tensor) -> list[int] | None:
    """The node's permutation; without the attribute it reverses the axes, which needs the rank."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(axis) for axis in perm]
    rank = known_rank(source)
    return None if rank is None else list(reversed(range(rank)))
