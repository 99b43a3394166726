"""Slice of one index followed by Squeeze of that axis, replaced by a Gather of the index."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    axes_of,
    constant_value,
    find,
    interface_tensors,
    is_empty,
    is_standard,
    set_inputs,
    single_reader,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

# Slice ends at or beyond this mean "to the end" whatever the dim (exporters write INT32/INT64 max).
SLICE_TO_END = np.iinfo(np.int32).max
# Gather takes negative indices since opset 11.
NEGATIVE_GATHER_OPSET = 11


@register_pass("fuse-slice-squeeze")
def fuse_slice_squeeze(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace Squeeze(Slice(x, i, i+1, axis=a), a) by Gather(x, i, axis=a): one node instead of two.

    Both fail alike when i is out of range (an empty slice cannot be squeezed; Gather rejects the
    index), so the rewrite is exact. The Slice must have no other reader.
    """
    interface = interface_tensors(graph)
    names = None
    fused = 0
    for subgraph in walk(graph):
        for squeeze in find(subgraph, "Squeeze"):
            if not squeeze.outputs:
                continue
            picked = _single_index_slice(squeeze.inputs[0], interface, squeeze)
            if picked is None:
                continue
            source, index, axis = picked
            if axes_of(squeeze) != [axis]:
                continue
            if (subgraph.opset or NEGATIVE_GATHER_OPSET) < NEGATIVE_GATHER_OPSET and (index < 0 or axis < 0):
                continue
            names = names or unique_names(graph)
            indices = gs.Constant(names(f"{squeeze.outputs[0].name}_index"), np.array(index, dtype=np.int64))
            squeeze.op = "Gather"
            squeeze.attrs.clear()
            squeeze.attrs["axis"] = axis
            set_inputs(squeeze, [source, indices])
            fused += 1
    return PassResult(fused=fused)


def _single_index_slice(tensor: gs.Tensor, interface: set[int], reader: gs.Node):
    """(x, i, axis) if `tensor` is Slice(x) taking exactly index i along one axis, read only by `reader`."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "Slice" or not is_standard(node) or single_reader(tensor, interface) is not reader:
        return None
    if "starts" in node.attrs:  # opset < 10
        starts, ends, axes, steps = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes"), None
    else:
        values = [constant_value(item) if not is_empty(item) else None for item in node.inputs[1:5]]
        values += [None] * (4 - len(values))
        if any(not is_empty(item) and value is None for item, value in zip(node.inputs[1:5], values)):
            return None
        starts, ends, axes, steps = values
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    if starts.size != 1 or ends.size != 1:
        return None
    if steps is not None and int(np.asarray(steps).reshape(-1)[0]) != 1:
        return None
    axis = 0 if axes is None else int(np.asarray(axes).reshape(-1)[0])
    start, end = int(starts[0]), int(ends[0])
    # [i, i+1) is index i for i >= 0 and for i <= -2; [-1, end of axis) is the last index.
    if (start >= 0 and end == start + 1) or (start <= -2 and end == start + 1) or (start == -1 and end >= SLICE_TO_END):
        return node.inputs[0], start, axis
    return None


