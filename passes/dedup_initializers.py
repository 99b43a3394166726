"""Equal constants shared: one tensor per distinct (type, shape, bytes)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph import equal_constants, replace_all_uses, walk
from onnxslim.manager import PassContext, PassResult, register_pass


@register_pass("deduplicate-initializers")
def deduplicate_initializers(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Make nodes that read equal constants (same type, shape and bytes) read one of them.

    The tensor kept is the first met, outer graphs first, so a body may come to read an outer
    constant but never the other way round (onnx-graphsurgeon writes a constant into the graphs
    whose nodes read it, and export keeps one copy in their innermost common graph).
    """
    ordered = _constants_in_order(graph)
    kept = equal_constants(ordered)
    # Sibling bodies may each hold a different tensor under one name: a kept tensor's name must be its own.
    owners = _tensors_by_name(graph)
    merged = 0
    for tensor in ordered:
        equal = kept[id(tensor)]
        if equal is not tensor and len(owners[equal.name]) == 1:
            replace_all_uses(tensor, equal)
            merged += 1
    return PassResult(merged=merged)


def _constants_in_order(graph: gs.Graph) -> list[gs.Constant]:
    """Every distinct constant a node reads, in graph order, outer graphs first."""
    seen: set[int] = set()
    ordered = []
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                    seen.add(id(tensor))
                    ordered.append(tensor)
    return ordered


def _tensors_by_name(graph: gs.Graph) -> dict[str, set[int]]:
    """Which distinct tensors carry each name, over the graph and its bodies."""
    owners: dict[str, set[int]] = {}
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            for tensor in (*node.inputs, *node.outputs):
                owners.setdefault(tensor.name, set()).add(id(tensor))
        for tensor in (*subgraph.inputs, *subgraph.outputs):
            owners.setdefault(tensor.name, set()).add(id(tensor))
    return owners
