"""Channel handlers of the ops that move or reshape the channel axis: Flatten and Reshape (a
flatten, or attention's split into heads and merge back), Squeeze and Unsqueeze, Transpose, and
Gather of one part of a fused projection."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import constant_value
from .records import Channels, Flatten, HeadReshape, node_key
from .registry import handles
from .tracker import Analysis, dim, label, trailing_size


@handles("Flatten")
def visit_flatten(analysis: Analysis, node: gs.Node, tracked) -> None:
    source = tracked[0]
    axis = int(node.attrs.get("axis", 1))
    block = trailing_size(node.inputs[0], source.axis + 1) if source is not None else None
    if source is None or axis % source.rank != source.axis or block is None:
        analysis.freeze_inputs(node, f"{label(node)} does not flatten from the channel axis")
        return
    analysis.pass_on(node, Channels(source.groups, 1, 2, source.block * block))


@handles("Reshape")
def visit_reshape(analysis: Analysis, node: gs.Node, tracked) -> None:
    source = tracked[0]
    shape = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    block = trailing_size(node.inputs[0], source.axis + 1) if source is not None else None
    # A flatten written as Reshape: [N, C, ...] -> [N, -1] (or [0, -1] / [N, C*...] / [-1, C*...]).
    # [-1, K] is one only where K is all of C*...: [-1, 2] of a [2, 2, 3, 3] tensor is [18, 2].
    flattens = False
    if source is not None and shape is not None and source.axis == 1 and shape.size == 2 and block is not None \
            and node.attrs.get("allowzero", 0) == 0:
        features = analysis.size(source.groups) * source.block * block
        batch = {0, dim(node.inputs[0], 0)}
        flattens = (int(shape[1]) == -1 and int(shape[0]) in batch) or (int(shape[1]) == features and
                                                                        int(shape[0]) in batch | {-1})
    if not flattens:
        if source is not None and shape is not None and node.attrs.get("allowzero", 0) == 0 and \
                reshape_heads(analysis, node, source, shape.astype(np.int64).reshape(-1)):
            return
        analysis.freeze_inputs(node, f"read by {label(node)} (not a flatten from the channel axis, nor heads)")
        return
    if shape[1] != -1:
        analysis.flattens.append(Flatten(node_key(node), source.groups))  # its shape names the channel count
    analysis.pass_on(node, Channels(source.groups, 1, 2, source.block * block))


def reshape_heads(analysis: Analysis, node: gs.Node, source: Channels, shape: np.ndarray) -> bool:
    """Attention's reshapes of the last axis: [..., H·D] -> [..., H, D] makes the group's
    channels H heads of D features (coarsen), and [..., H, D] -> [..., H·D] reads them back as
    blocks of D. Only the last one or two entries may involve the channels; the leading ones
    (0 copies, -1 infers) only regroup the rows."""
    extra = len(shape) - source.rank  # 1: [..., H·D] -> [..., H, D]; 2: [..., P·H·D] -> [..., P, H, D]
    if source.axis == source.rank - 1 and extra in (1, 2) and (shape[-1 - extra:] > 0).all():
        return split_heads(analysis, node, source, shape)
    head = dim(node.inputs[0], source.rank - 1)
    if source.axis == source.rank - 2 and source.block == 1 and len(shape) == source.rank - 1 and \
            isinstance(head, (int, np.integer)) and head > 0:
        # The merge: [..., H, D] -> [..., H·D].
        total = analysis.size(source.groups) * int(head)
        if shape[-1] == total:
            analysis.head_reshapes.append(HeadReshape(node_key(node), source.groups, entry=len(shape) - 1,
                                                      unit=int(head)))
        elif not (shape[-1] == -1 and all(entry == 0 for entry in shape[:-1])):
            return False
        analysis.pass_on(node, Channels(source.groups, len(shape) - 1, len(shape), int(head)))
        return True
    return False


def split_heads(analysis: Analysis, node: gs.Node, source: Channels, shape: np.ndarray) -> bool:
    """The split [..., H·D] -> [..., H, D]. With P parts (a fused Q, K, V projection,
    [..., P·H·D] -> [..., P, H, D]) the group is divided into them first."""
    extra = len(shape) - source.rank
    if len(source.groups) != 1 or source.block != 1:
        return False
    parts_count = int(shape[-3]) if extra == 2 else 1
    heads, size = int(shape[-2]), int(shape[-1])
    if parts_count * heads * size != analysis.groups[analysis.find(source.groups[0])].size:
        return False
    parts = [source.groups[0]]
    for _ in range(parts_count - 1):
        divided = analysis.divide(parts[-1], heads * size)
        if divided is None:
            return False
        parts[-1:] = divided
    if not analysis.coarsen(parts, size):
        return False
    if extra == 2:
        for part in parts:  # the heads' group spans the whole projection: Q, K and V alike
            analysis.groups[part].spans = {}
        analysis.fused.append(tuple(parts))
    analysis.head_reshapes.append(HeadReshape(node_key(node), (parts[0],), entry=len(shape) - 2, unit=1))
    analysis.pass_on(node, Channels(tuple(parts), len(shape) - 2, len(shape),
                                    parts=len(shape) - 3 if extra == 2 else None))
    return True


@handles("Squeeze")
def visit_squeeze(analysis: Analysis, node: gs.Node, tracked) -> None:
    source, axes = tracked[0], _axes(analysis, node, tracked[0])
    if axes is None:
        return
    axes = sorted(axis % source.rank for axis in axes)
    if source.axis in axes or (source.block != 1 and any(axis > source.axis for axis in axes)):
        analysis.freeze_inputs(node, f"{label(node)} squeezes the channel axis")
        return
    new_axis = source.axis - sum(axis < source.axis for axis in axes)
    analysis.pass_on(node, Channels(source.groups, new_axis, source.rank - len(axes), source.block))


@handles("Unsqueeze")
def visit_unsqueeze(analysis: Analysis, node: gs.Node, tracked) -> None:
    source, axes = tracked[0], _axes(analysis, node, tracked[0])
    if axes is None:
        return
    rank = source.rank + len(axes)
    axes = sorted(axis % rank for axis in axes)
    new_axis = source.axis
    for axis in axes:
        if axis <= new_axis:
            new_axis += 1
    if source.block != 1:
        analysis.freeze_inputs(node, f"{label(node)} reshapes a flattened channel axis")
        return
    analysis.pass_on(node, Channels(source.groups, new_axis, rank, source.block))


def _axes(analysis: Analysis, node: gs.Node, source: Channels | None) -> list[int] | None:
    """Squeeze's or Unsqueeze's axes (the attribute before opset 13, or the constant input) for
    the channels of `source`; None, with them frozen, where either is unknown."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        value = constant_value(node.inputs[1])
        axes = None if value is None else value.reshape(-1).tolist()
    if source is None or axes is None:
        analysis.freeze_inputs(node, f"read by {label(node)} (axes unknown)")
        return None
    return axes


@handles("Transpose")
def visit_transpose(analysis: Analysis, node: gs.Node, tracked) -> None:
    source = tracked[0]
    perm = node.attrs.get("perm") or list(range(source.rank - 1, -1, -1)) if source is not None else None
    if source is None or source.block != 1 or len(perm) != source.rank:
        analysis.freeze_inputs(node, f"read by {label(node)}")
        return
    parts = None if source.parts is None else list(perm).index(source.parts)
    analysis.pass_on(node, Channels(source.groups, list(perm).index(source.axis), source.rank, parts=parts))


@handles("Gather")
def visit_gather(analysis: Analysis, node: gs.Node, tracked) -> None:
    """One part of a fused projection (Q, K or V), picked by a constant index on the parts axis."""
    source = tracked[0]
    index = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    axis = int(node.attrs.get("axis", 0)) % source.rank if source is not None else None
    if source is None or source.parts is None or axis != source.parts or index is None or index.ndim != 0 \
            or any(t is not None for t in tracked[1:]):
        analysis.freeze_inputs(node, f"read by {label(node)}")
        return
    part = int(index) % len(source.groups)
    analysis.pass_on(node, Channels((source.groups[part],), source.axis - (source.axis > axis), source.rank - 1))
