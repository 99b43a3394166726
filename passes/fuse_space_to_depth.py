"""A Focus layer (four strided Slices of an image and their Concat) replaced by SpaceToDepth."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_value, disconnect, find, insert_before, interface_tensors, is_empty, is_standard, known_dim, known_rank, single_reader, unique_names, walk
from onnxslim.manager import PassContext, PassResult, register_pass

# Slice ends at or beyond this mean "to the end" whatever the dim (exporters write INT32/INT64 max).
SLICE_TO_END = np.iinfo(np.int32).max
# Slice takes steps (an input) from opset 10; before, it could not stride.
STRIDED_SLICE_OPSET = 10
# Types onnxruntime has SpaceToDepth kernels for in every opset (not the integers).
FLOAT_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
BLOCK = 2


@register_pass("fuse-space-to-depth")
def fuse_space_to_depth(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace Concat(x[:, :, i::2, j::2] for the four (i, j)) on channels by SpaceToDepth(x, 2).

    SpaceToDepth puts the block offset (i, j) major, at channel (2·i + j)·C + c; the Concat puts
    the pieces in its own order, so a Gather of channels follows, unless the Concat's only reader
    is a Conv with constant weights: then the Conv's input channels are permuted instead, and
    five nodes (nine when each Slice takes one axis) become one. Both refuse an odd height or
    width (the Concat's pieces differ in size; SpaceToDepth needs whole blocks).
    """
    if (graph.opset or STRIDED_SLICE_OPSET) < STRIDED_SLICE_OPSET:
        return PassResult(fused=0)
    interface = interface_tensors(graph)
    names = None
    fused = 0
    for subgraph in walk(graph):
        for concat in find(subgraph, "Concat"):
            focus = _focus(concat, interface)
            if focus is None:
                continue
            source, blocks = focus
            names = names or unique_names(graph)
            if _replace(concat, source, blocks, subgraph, interface, names):
                fused += 1
    return PassResult(fused=fused)


def _focus(concat: gs.Node, interface: set[int]) -> tuple[gs.Tensor, list[int]] | None:
    """(x, block index 2·i + j of each Concat input) if `concat` joins the four strided picks of x on channels."""
    if len(concat.inputs) != 4 or len(concat.outputs) != 1 or concat.attrs.get("axis") not in (1, -3):
        return None
    picks = [_strided_pick(tensor, concat, interface) for tensor in concat.inputs]
    if any(pick is None for pick in picks) or len({id(pick[0]) for pick in picks}) != 1:
        return None
    source = picks[0][0]
    blocks = [BLOCK * row + column for _, row, column in picks]
    if sorted(blocks) != [0, 1, 2, 3] or known_rank(source) != 4 or _dtype(source) not in FLOAT_DTYPES:
        return None
    return source, blocks


def _strided_pick(tensor: gs.Tensor, concat: gs.Node, interface: set[int]) -> tuple[gs.Tensor, int, int] | None:
    """(x, i, j) if `tensor` is x[:, :, i::2, j::2] by one Slice or a chain of two, read only by `concat`."""
    if single_reader(tensor, interface) is not concat:
        return None
    offsets: dict[int, int] = {}
    for _ in range(2):
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or node.op != "Slice" or not is_standard(node):
            break
        spans = _slice_spans(node)
        if spans is None or any(axis in offsets for axis in spans):
            return None
        offsets.update(spans)
        tensor = node.inputs[0]
        if set(offsets) == {2, 3}:
            return tensor, offsets[2], offsets[3]
    return None


def _slice_spans(node: gs.Node) -> dict[int, int] | None:
    """{axis: start} of a Slice of a rank-4 tensor that takes every second row/column of axes 2/3
    from 0 or 1 to the end, and nothing else (other sliced axes must be taken whole)."""
    if len(node.inputs) < 3 or known_rank(node.inputs[0]) != 4:
        return None
    bounds = []
    for tensor in node.inputs[1:5]:
        value = None if is_empty(tensor) else constant_value(tensor)
        if value is None and not is_empty(tensor):
            return None
        bounds.append(None if value is None else np.asarray(value).reshape(-1).astype(np.int64))
    starts, ends = bounds[0], bounds[1]
    axes = bounds[2] if len(bounds) > 2 and bounds[2] is not None else np.arange(len(starts))
    steps = bounds[3] if len(bounds) > 3 and bounds[3] is not None else np.ones(len(starts), np.int64)
    if starts is None or ends is None or not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    spans = {}
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        axis = axis + 4 if axis < 0 else axis
        to_end = end >= SLICE_TO_END or (known_dim(node.inputs[0], axis) is not None and end >= known_dim(node.inputs[0], axis))
        if not to_end or axis in spans:
            return None
        if axis in (2, 3) and step == BLOCK and start in (0, 1):
            spans[axis] = start
        elif not (start == 0 and step == 1):
            return None  # any other slicing
    return spans


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None


def _replace(concat: gs.Node, source: gs.Tensor, blocks: list[int], graph: gs.Graph, interface: set[int], names) -> bool:
    output = concat.outputs[0]
    conv = single_reader(output, interface)
    weight = _conv_weight(conv, output) if conv is not None else None
    channels = known_dim(source, 1)
    if weight is not None:
        channels = weight.shape[1] // len(blocks)
    # Concat channel j·C + c is SpaceToDepth channel blocks[j]·C + c.
    order = None
    if blocks != sorted(blocks):
        if channels is None:
            return False  # the Gather's indices need C
        order = np.concatenate([block * channels + np.arange(channels) for block in blocks]).astype(np.int64)
    base = concat.name or output.name
    disconnect(concat)
    nodes = []
    if order is None or weight is not None:
        nodes.append(gs.Node("SpaceToDepth", name=names(f"{base}_space_to_depth"), attrs={"blocksize": BLOCK}, inputs=[source], outputs=[output]))
        if order is not None:
            permuted = np.empty_like(weight)
            permuted[:, order] = weight  # the Conv reads SpaceToDepth's channel order
            conv.inputs[1] = gs.Constant(names(f"{conv.inputs[1].name}_space_to_depth"), permuted)
    else:
        moved = gs.Variable(names(f"{base}_space_to_depth"), dtype=output.dtype)
        nodes.append(gs.Node("SpaceToDepth", name=names(f"{base}_space_to_depth"), attrs={"blocksize": BLOCK}, inputs=[source], outputs=[moved]))
        indices = gs.Constant(names(f"{base}_channel_order"), order)
        nodes.append(gs.Node("Gather", name=names(f"{base}_channel_order"), attrs={"axis": 1}, inputs=[moved, indices], outputs=[output]))
    insert_before(graph, concat, *nodes)
    return True


def _conv_weight(conv: gs.Node, data: gs.Tensor) -> np.ndarray | None:
    """The constant weight of a group-1 Conv reading `data` (and nothing else reading that weight)."""
    if conv.op != "Conv" or not is_standard(conv) or len(conv.inputs) < 2 or conv.inputs[0] is not data:
        return None
    if int(conv.attrs.get("group", 1)) != 1 or len(conv.inputs[1].outputs) != 1:
        return None
    weight = constant_value(conv.inputs[1])
    if weight is None or weight.ndim != 4 or weight.shape[1] % 4:
        return None
    return weight
