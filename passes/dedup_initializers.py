"""Equal constants shared: one tensor per distinct (type, shape, bytes)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import equal_constants, replace_all_uses, tensor_nbytes, walk
from onnxslim.manager import PassContext, PassResult, register_pass


@register_pass("deduplicate-initializers")
def deduplicate_initializers(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Make nodes that read equal constants (same type, shape and bytes) read one of them.

    The tensor kept is the first met, outer graphs first, so a body may come to read an outer
    constant but never the other way round (onnx-graphsurgeon writes a constant into the graphs
    whose nodes read it, and export keeps one copy in their innermost common graph). A small
    constant stays in the body that reads it: onnx's inference of a body does not see the values
    of outer-scope initializers, so an Unsqueeze reading its axes from one loses its shape, and a
    Concat of that with a known value is then inferred as empty -- the checker rejects the model.
    """
    ordered, readers = _constants_in_order(graph)
    kept = equal_constants(ordered)
    # Sibling bodies may each hold a different tensor under one name: a kept tensor's name must be its own.
    owners = _tensors_by_name(graph)
    merged = 0
    for tensor in ordered:
        equal = kept[id(tensor)]
        if equal is tensor or len(owners[equal.name]) != 1:
            continue
        if _shape_like(tensor) and not readers[id(tensor)] <= readers[id(equal)]:
            continue
        replace_all_uses(tensor, equal)
        readers[id(equal)] |= readers[id(tensor)]
        merged += 1
    return PassResult(merged=merged)


# Integer constants up to this size are not shared with an enclosing graph (see
# deduplicate_initializers): axes, shapes, starts and pads, whose copies cost a few bytes each.
LOCAL_BYTES = 256


def _shape_like(tensor: gs.Constant) -> bool:
    """An integer constant small enough to be the data an op's inference reads (axes, a shape)."""
    return np.dtype(tensor.dtype).kind in "iu" and tensor_nbytes(tensor) <= LOCAL_BYTES


def _constants_in_order(graph: gs.Graph) -> tuple[list[gs.Constant], dict[int, set[int]]]:
    """Every distinct constant a node reads, in graph order, outer graphs first; and for each
    (by id) the ids of the graphs whose nodes read it."""
    readers: dict[int, set[int]] = {}
    ordered = []
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant):
                    if id(tensor) not in readers:
                        readers[id(tensor)] = set()
                        ordered.append(tensor)
                    readers[id(tensor)].add(id(subgraph))
    return ordered, readers


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
