"""Consecutive Transposes composed into one."""

from __future__ import annotations

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
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass


@register_pass("fuse-transposes")
def fuse_transposes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Compose Transpose(Transpose(x)) into one Transpose of x, or remove both when they cancel.

    Only when every reader of the first Transpose is a Transpose, so the first one goes away.
    """
    interface = interface_tensors(graph)
    fused = cancelled = 0
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
    return PassResult(fused=fused, cancelled=cancelled)


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
