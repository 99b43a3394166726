"""Channel handlers of the ops that keep the channel axis where it is: ops that act per channel
(activations, pooling, normalization, Pad, Resize, Softmax and reductions along other axes),
element-wise ops that join tensors (their groups become one), Concat (groups side by side) and
Split and Slice on the channel axis (groups divided at their bounds)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import constant_value
from .records import Channels, ChannelSlice, ChannelSplit, Cut, node_key
from .registry import handles
from .tracker import Analysis, label

# Ops that compute each channel from the same channel alone (any axis layout): they pass groups on.
PER_CHANNEL_OPS = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Erf", "Gelu", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Sin", "Cos", "Identity", "Dropout", "Cast", "Clip", "ThresholdedRelu", "Shrink", "IsNaN", "Not",
}
# Spatial ops on NCHW tensors (channel axis 1): the channels pass through.
SPATIAL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where"}


@handles(*sorted(PER_CHANNEL_OPS))
def visit_per_channel(analysis: Analysis, node: gs.Node, tracked) -> None:
    source = tracked[0]
    if source is None:
        analysis.freeze_inputs(node, f"read by {label(node)} as a parameter")
        return
    for index in range(1, len(node.inputs)):
        if not per_channel_constant(analysis, node, index, source):
            return
    analysis.pass_on(node, source)


@handles("BatchNormalization")
def visit_batch_normalization(analysis: Analysis, node: gs.Node, tracked) -> None:
    source = tracked[0]
    if source is None or source.axis != 1 or len(node.outputs) > 1 and any(not t.name == "" for t in node.outputs[1:]):
        analysis.freeze_inputs(node, f"read by {label(node)}")
        return
    for index in range(1, 5):
        if constant_value(node.inputs[index]) is None:
            analysis.freeze_inputs(node, f"{label(node)} statistics not constant")
            return
        analysis.cuts.append(Cut(node_key(node), index, 0, source.groups, source.block))
    analysis.pass_on(node, source)


@handles("InstanceNormalization")
def visit_instance_normalization(analysis: Analysis, node: gs.Node, tracked) -> None:
    source = tracked[0]
    if source is None or source.axis != 1 or any(constant_value(node.inputs[i]) is None for i in (1, 2)):
        analysis.freeze_inputs(node, f"read by {label(node)}")
        return
    analysis.cuts.append(Cut(node_key(node), 1, 0, source.groups, source.block))
    analysis.cuts.append(Cut(node_key(node), 2, 0, source.groups, source.block))
    analysis.pass_on(node, source)


def keeps_channels(*ops: str):
    """Register a check for ops that leave each channel where it is: it says why the op cannot
    pass the channels of `source` on (they are frozen), or None (they pass to its output)."""
    def register(check):
        @handles(*ops)
        def handler(analysis: Analysis, node: gs.Node, tracked) -> None:
            reason = check(analysis, node, tracked)
            if reason:
                analysis.freeze_inputs(node, reason)
            else:
                analysis.pass_on(node, tracked[0])
        return check
    return register


@keeps_channels(*sorted(SPATIAL_OPS))
def spatial(analysis: Analysis, node: gs.Node, tracked) -> str | None:
    source = tracked[0]
    # blocks on axis 1 of NCHW features are runs of whole channels (conv-groups): pooling keeps them
    if source is None or source.axis != 1 or (source.block != 1 and source.rank != 4):
        return f"read by {label(node)} off the channel axis"
    return None


@keeps_channels("Pad")
def pad(analysis: Analysis, node: gs.Node, tracked) -> str | None:
    source = tracked[0]
    pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else np.array(node.attrs.get("pads", []))
    axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if source is None or pads is None or axes is not None or any(t is not None for t in tracked[1:]):
        return f"read by {label(node)}"
    pads = np.asarray(pads).reshape(-1)
    if len(pads) != 2 * source.rank or pads[source.axis] != 0 or pads[source.axis + source.rank] != 0:
        return f"{label(node)} pads the channel axis"
    return None


@keeps_channels("Resize")
def resize(analysis: Analysis, node: gs.Node, tracked) -> str | None:
    source = tracked[0]
    scales = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    sizes = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if source is None or sizes is not None or scales is None or scales.size != source.rank or scales[source.axis] != 1:
        return f"read by {label(node)} (sizes, or scaling the channel axis)"
    return None


@keeps_channels("Softmax", "LogSoftmax")
def softmax(analysis: Analysis, node: gs.Node, tracked) -> str | None:
    source = tracked[0]
    opset = analysis.graph.opset or 0
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1))
    # From opset 13 the op normalizes along `axis`; before, over every axis from `axis` on.
    mixes = source is not None and (source.axis >= axis % source.rank if opset < 13
                                    else source.axis == axis % source.rank)
    if source is None or mixes:
        return f"read by {label(node)} across the channel axis"
    return None


@keeps_channels("ReduceMean", "ReduceMax")
def reduction(analysis: Analysis, node: gs.Node, tracked) -> str | None:
    source = tracked[0]
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        value = constant_value(node.inputs[1])
        axes = None if value is None else value.tolist()
    if source is None or axes is None or not node.attrs.get("keepdims", 1) or \
            any(axis % source.rank == source.axis for axis in axes) or source.block != 1:
        return f"read by {label(node)} (reduces the channel axis or drops dims)"
    return None


@handles(*sorted(ELEMENTWISE_OPS))
def visit_elementwise(analysis: Analysis, node: gs.Node, tracked) -> None:
    known = [channels for channels in tracked if channels is not None]
    if len({channels.block for channels in known}) > 1 and match_blocks(analysis, known):
        tracked = [analysis.channels.get(id(tensor)) for tensor in node.inputs]
        known = [channels for channels in tracked if channels is not None]
    first = known[0]
    for other in known[1:]:
        if (other.rank - other.axis, other.block) != (first.rank - first.axis, first.block) or \
                not analysis.lines_up(other.groups, first.groups):
            analysis.freeze_inputs(node, f"{label(node)} joins tensors whose channels do not line up")
            return
        analysis.join(first.groups, other.groups)
    if node.op == "Where" and tracked[0] is not None:
        analysis.freeze_inputs(node, f"{label(node)} condition")
        return
    widest = max(known, key=lambda channels: channels.rank)
    for index, channels in enumerate(tracked):
        if channels is not None:
            continue
        if not per_channel_constant(analysis, node, index, widest):
            return
    analysis.pass_on(node, widest)


def match_blocks(analysis: Analysis, known: list[Channels]) -> bool:
    """Conv features of whole conv-groups (a grouped Conv's output, in blocks) joined with
    features of single channels as many in all (a squeeze-excitation gate): the finer side
    becomes blocks of the same size, so that a removed conv-group takes its gates too. Only on
    NCHW features (axis 1 of rank 4), where a block is a run of channels, not a Flatten's."""
    coarsest = max(channels.block for channels in known)
    if any((channels.rank, channels.axis) != (4, 1) or coarsest % channels.block for channels in known):
        return False
    done: set[int] = set()  # a group on two inputs is coarsened once (the second's record is stale)
    for channels in known:
        roots = {analysis.find(gid) for gid in channels.groups}
        if channels.block == coarsest or roots <= done:
            continue
        if not analysis.coarsen(channels.groups, coarsest // channels.block):
            return False
        done |= roots
    return True


def per_channel_constant(analysis: Analysis, node: gs.Node, index: int, source: Channels) -> bool:
    """An untracked operand of a per-channel op: constant or not, it must be 1 along the
    channel axis (broadcast) or hold one value per channel (cut with the channels)."""
    tensor = node.inputs[index]
    if not tensor.name:
        return True
    value = constant_value(tensor)
    shape = value.shape if value is not None else (tensor.shape if tensor.shape is not None else None)
    from_right = source.rank - source.axis
    if shape is not None and len(shape) < from_right:
        return True  # broadcast along the channel axis
    axis = len(shape) - from_right if shape is not None else 0
    if shape is None or not isinstance(shape[axis], (int, np.integer)):  # other dims may be symbolic
        analysis.freeze_inputs(node, f"{label(node)} operand '{tensor.name}' of unknown shape")
        return False
    if shape[axis] == 1:
        return True
    if value is not None and shape[axis] == analysis.size(source.groups) * source.block:
        analysis.cuts.append(Cut(node_key(node), index, axis, source.groups, source.block))
        return True
    analysis.freeze_inputs(node, f"{label(node)} operand '{tensor.name}' spans the channels")
    return False


@handles("Concat")
def visit_concat(analysis: Analysis, node: gs.Node, tracked) -> None:
    known = [channels for channels in tracked if channels is not None]
    first = known[0]
    axis = int(node.attrs.get("axis", 0)) % first.rank
    if len(known) != len(tracked) or any((c.axis, c.rank, c.block) != (first.axis, first.rank, first.block) for c in known):
        analysis.freeze_inputs(node, f"{label(node)} joins tensors whose channels are not all known")
        return
    if axis == first.axis:
        groups = tuple(g for channels in known for g in channels.groups)
        analysis.pass_on(node, Channels(groups, first.axis, first.rank, first.block))
        return
    visit_elementwise(analysis, node, tracked)


@handles("Split")
def visit_split(analysis: Analysis, node: gs.Node, tracked) -> None:
    source = tracked[0]
    if source is None:
        return
    axis = int(node.attrs.get("axis", 0)) % source.rank
    if axis != source.axis:  # along another axis every part keeps all the channels
        for output in range(len(node.outputs)):
            analysis.pass_on(node, source, output)
        return
    groups = [analysis.find(g) for g in source.groups]
    sizes = split_sizes(node, analysis.size(groups) * source.block)
    if sizes is None or source.block != 1:
        analysis.freeze_inputs(node, f"read by {label(node)} (split sizes unknown or a flattened block)")
        return
    if not analysis.divide_at(groups, list(itertools.accumulate(sizes))[:-1]):
        analysis.freeze_inputs(node, f"{label(node)} splits a group that is tied to other layers or laid out twice")
        return
    outputs, start = [], 0
    for size in sizes:
        part, taken = [], 0
        while taken < size:
            part.append(groups[start])
            taken += analysis.groups[groups[start]].size
            start += 1
        outputs.append(tuple(part))
    for output, part in enumerate(outputs):
        analysis.pass_on(node, Channels(part, source.axis, source.rank), output)
    analysis.splits.append(ChannelSplit(node_key(node), tuple(outputs)))


def split_sizes(node: gs.Node, total: int) -> list[int] | None:
    """A Split's part sizes along its axis of `total` elements: its 'split' input or attribute,
    else equal parts (num_outputs or one per output; the last smaller as opset 18 allows)."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        sizes = constant_value(node.inputs[1])
        return None if sizes is None else [int(size) for size in sizes]
    if "split" in node.attrs:
        return [int(size) for size in node.attrs["split"]]
    count = int(node.attrs.get("num_outputs", len(node.outputs)))
    each = -(-total // count)
    sizes = [each] * (count - 1) + [total - each * (count - 1)]
    return sizes if sizes[-1] > 0 else None


@handles("Slice")
def visit_slice(analysis: Analysis, node: gs.Node, tracked) -> None:
    """Slice along other axes keeps every channel; along the channel axis (step 1) it keeps
    the groups between its bounds, dividing those a bound falls inside of."""
    source = tracked[0]
    given = [node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None
             for index in range(1, 5)]
    starts, ends, axes, steps = (None if tensor is None else constant_value(tensor) for tensor in given)
    if source is None or any(t is not None for t in tracked[1:]) or starts is None or ends is None or \
            (given[2] is not None and axes is None) or (given[3] is not None and steps is None):
        analysis.freeze_inputs(node, f"read by {label(node)} (bounds not constant)")
        return
    starts, ends = starts.reshape(-1), ends.reshape(-1)
    axes = list(range(len(starts))) if axes is None else [int(axis) % source.rank for axis in axes.reshape(-1)]
    if source.axis not in axes:
        analysis.pass_on(node, source)
        return
    entry = axes.index(source.axis)
    step = 1 if steps is None else int(steps.reshape(-1)[entry])
    groups = [analysis.find(g) for g in source.groups]
    total = analysis.size(groups)
    start, end = (min(max(int(value) + (total if value < 0 else 0), 0), total)
                  for value in (starts[entry], ends[entry]))
    if step != 1 or source.block != 1 or end <= start:
        analysis.freeze_inputs(node, f"{label(node)} slices the channel axis with a step, empty or over blocks")
        return
    if not analysis.divide_at(groups, [start, end]):
        analysis.freeze_inputs(node, f"{label(node)} slices a group that is tied to other layers or laid out twice")
        return
    before, kept, offset = [], [], 0
    for gid in groups:
        if offset < start:
            before.append(gid)
        elif offset < end:
            kept.append(gid)
        offset += analysis.groups[gid].size
    analysis.slices.append(ChannelSlice(node_key(node), entry, tuple(before), tuple(kept)))
    analysis.pass_on(node, Channels(tuple(kept), source.axis, source.rank))
