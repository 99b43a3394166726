"""Channel handlers of the layers whose constant weight owns output channels (and reads input
channels): Conv (plain, depthwise, grouped), ConvTranspose, Gemm and MatMul, and MatMul of two
activations (attention's per-head products)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import constant_value
from ..layers import constant_weight, weight_axes
from .records import Channels, Cut, Depthwise, node_key
from .registry import handles
from .tracker import Analysis, label, rank


@handles("Conv")
def visit_conv(analysis: Analysis, node: gs.Node, tracked) -> None:
    weight = constant_weight(node)
    source = tracked[0] if tracked else None
    if weight is None or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        analysis.freeze_inputs(node, f"read by {label(node)} (weight not constant or auto_pad)")
        analysis.ownerless.append((node.name, "weight not constant, or auto_pad"))
        return
    group = int(node.attrs.get("group", 1))
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    if group > 1 and group == out_channels and in_per_group == 1:
        visit_depthwise_conv(analysis, node, weight, source)
        return
    if group > 1:
        visit_grouped_conv(analysis, node, weight, group, source)
        return
    own_channels(analysis, node, weight, source)


def own_channels(analysis: Analysis, node: gs.Node, weight: np.ndarray, source: Channels | None) -> None:
    """A Conv or ConvTranspose reads the channels of `source` (its weight's input axis) and makes
    a group of its own (its weight's output axis)."""
    if source is not None and not on_channel_axis(analysis, node, source, weight):
        return
    axes = weight_axes(node, weight.ndim)
    if source is not None:
        analysis.consume(node, source, weight_axis=axes.input)
    gid = analysis.produce(node, weight, axis=axes.output)
    analysis.cut_bias(node, (gid,))
    analysis.pass_on(node, Channels((gid,), 1, weight.ndim))


def visit_depthwise_conv(analysis: Analysis, node: gs.Node, weight: np.ndarray, source: Channels | None) -> None:
    """Depthwise: output channel k is input channel k; it is one of the group's members."""
    if source is None:
        analysis.ownerless.append((node.name, "depthwise Conv on channels no group holds"))
        return
    if not on_channel_axis(analysis, node, source, weight):
        return
    if source.block != 1:  # its `group` counts channels, the group's kept count blocks
        analysis.freeze_inputs(node, f"read by depthwise {label(node)} in blocks of {source.block} channels")
        return
    analysis.depthwise.append(Depthwise(node_key(node), source.groups))
    analysis.cuts.append(Cut(node_key(node), 1, 0, source.groups, source.block))
    analysis.cut_bias(node, source.groups, source.block)
    for gid in source.groups:
        analysis.groups[analysis.find(gid)].consumers.append(node.name)
    analysis.pass_on(node, source)


def on_channel_axis(analysis: Analysis, node: gs.Node, source: Channels, weight: np.ndarray) -> bool:
    """A Conv or ConvTranspose reads axis 1 of its input: channels tracked on another axis (a
    MatMul's features, the last axis of an NCHW tensor) are not the ones its weight reads."""
    if source.axis == 1 and source.rank == weight.ndim:
        return True
    analysis.freeze_inputs(node, f"read by {label(node)} on axis {source.axis} of {source.rank}, not its channel axis")
    analysis.ownerless.append((node.name, "Conv reading channels off axis 1"))
    return False


def visit_grouped_conv(analysis: Analysis, node: gs.Node, weight: np.ndarray, group: int,
                       source: Channels | None) -> None:
    """A grouped Conv ties its input to its output a whole conv-group at a time: group j reads
    input block j (in_per_group channels) alone and makes output block j. Both groups become
    groups of blocks, one group of `group` blocks, and a removed block takes its input
    channels, its filters and one from the `group` attribute; its weight's input axis stays."""
    out_per_group = weight.shape[0] // group
    reason = f"read by grouped {label(node)} (group={group})"
    if source is None or source.axis != 1 or source.block != 1 or len(source.groups) != 1:
        analysis.freeze_inputs(node, reason)
        analysis.ownerless.append((node.name, "grouped Conv on channels no group holds" if source is None else
                                   "grouped Conv whose input is not one group of whole channels"))
        return
    gid = analysis.produce(node, weight, axis=weight_axes(node, weight.ndim).output)
    analysis.cut_bias(node, (gid,))
    blocks = analysis.coarsen([gid], out_per_group)  # a fresh group: only a size it does not divide refuses
    if blocks and analysis.coarsen(source.groups, weight.shape[1]):
        analysis.union(source.groups[0], gid)
        analysis.depthwise.append(Depthwise(node_key(node), (gid,)))  # its `group` attribute follows the kept blocks
    else:
        analysis.freeze([gid], reason)
        analysis.freeze_inputs(node, reason)
    analysis.pass_on(node, Channels((gid,), 1, weight.ndim, out_per_group if blocks else 1))


@handles("ConvTranspose")
def visit_conv_transpose(analysis: Analysis, node: gs.Node, tracked) -> None:
    weight = constant_weight(node)
    source = tracked[0] if tracked else None
    if weight is None or int(node.attrs.get("group", 1)) != 1 or "output_shape" in node.attrs:
        analysis.freeze_inputs(node, f"read by {label(node)} (grouped, output_shape or weight not constant)")
        analysis.ownerless.append((node.name, "grouped ConvTranspose, output_shape, or weight not constant"))
        return
    own_channels(analysis, node, weight, source)


@handles("Gemm")
def visit_gemm(analysis: Analysis, node: gs.Node, tracked) -> None:
    weight = constant_weight(node)
    source = tracked[0] if tracked else None
    if weight is None or node.attrs.get("transA", 0) or (len(tracked) > 1 and tracked[1] is not None):
        analysis.freeze_inputs(node, f"read by {label(node)} (transA or weight not constant)")
        analysis.ownerless.append((node.name, "Gemm with transA, or weight not constant"))
        return
    out_axis, in_axis = weight_axes(node, weight.ndim)
    if source is not None:
        if source.axis != 1 or source.rank != 2:
            analysis.freeze_inputs(node, f"read by {label(node)} on axis {source.axis}")
            analysis.ownerless.append((node.name, "Gemm reading channels off axis 1 of a matrix"))
            return
        analysis.consume(node, source, weight_axis=in_axis)
    gid = analysis.produce(node, weight, axis=out_axis)
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == weight.shape[out_axis]:
        analysis.cuts.append(Cut(node_key(node), 2, bias.ndim - 1, (gid,)))
    elif bias is not None and bias.size != 1:
        analysis.freeze([gid], f"{label(node)} bias of shape {list(bias.shape)}")
    analysis.pass_on(node, Channels((gid,), 1, 2))


@handles("MatMul")
def visit_matmul(analysis: Analysis, node: gs.Node, tracked) -> None:
    if len(tracked) == 2 and tracked[0] is not None and tracked[1] is not None:
        visit_batched_matmul(analysis, node, tracked)
        return
    weight = constant_weight(node)
    source = tracked[0] if tracked else None
    if weight is None or weight.ndim != 2 or (len(tracked) > 1 and tracked[1] is not None):
        analysis.freeze_inputs(node, f"read by {label(node)} (weight not a constant matrix)")
        analysis.ownerless.append((node.name, "MatMul weight not a constant matrix"))
        return
    input_rank = source.rank if source is not None else rank(node.inputs[0])
    if source is not None:
        if source.axis != source.rank - 1:
            analysis.freeze_inputs(node, f"read by {label(node)} on axis {source.axis} of {source.rank}")
            analysis.ownerless.append((node.name, "MatMul reading channels off its last axis"))
            return
        analysis.consume(node, source, weight_axis=weight_axes(node, weight.ndim).input)
    if input_rank is None or input_rank < 2:
        analysis.ownerless.append((node.name, "MatMul input of unknown rank or a vector"))
        return
    gid = analysis.produce(node, weight, axis=weight_axes(node, weight.ndim).output)
    analysis.pass_on(node, Channels((gid,), input_rank - 1, input_rank))


def visit_batched_matmul(analysis: Analysis, node: gs.Node, tracked) -> None:
    """Two activations multiplied per head (attention's Q·Kᵀ and weights·V): the channels are a
    batch axis of both, at the same place, so head h of the product reads head h of each. The
    two sides' heads are one group and the product carries it."""
    first, second = tracked
    if first.block != 1 or second.block != 1 or (first.axis, first.rank) != (second.axis, second.rank) or \
            first.axis >= first.rank - 2 or not analysis.lines_up(first.groups, second.groups):
        analysis.freeze_inputs(node, f"read by {label(node)} (two activations whose channels do not line up)")
        return
    analysis.join(first.groups, second.groups)
    analysis.pass_on(node, first)
