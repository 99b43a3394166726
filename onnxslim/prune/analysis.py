"""The dependency groups of a model: walk the graph in order, let each node's op handler
(registry.HANDLERS) follow the channels its inputs carry, then check the extents and make the plan."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UsageError
from ..graph import constant_value, constants, node_subgraphs, walk
from ..layers import LAYER_OPS, layer_macs
from ..manager import PassContext, get_pass
from ..model import to_graph
from ..shapes import set_input_shapes
from . import channel_handlers, layer_handlers, shape_handlers  # noqa: F401 — they fill HANDLERS
from .layers import bias_slots
from .records import Group, PrunePlan, node_key, nodes_by_key
from .registry import HANDLERS
from .tracker import Analysis, dim, label


def analyze(model: onnx.ModelProto, criterion: str = "l2", input_shapes: dict[str, list[int]] | None = None,
            gammas: dict[str, np.ndarray] | None = None) -> PrunePlan:
    """The dependency groups of a (simplified) model, with each prunable group's channel scores.
    `input_shapes` (static dims, e.g. a calibration sample's) give dynamic models MAC counts.
    Criterion "bn" scores a layer's output channels by `gammas` (|γ| of the BatchNormalization
    that followed it, by layer name: bn_gammas of the model before simplification fused them);
    a layer without one is scored by l2."""
    if criterion not in ("l2", "l1", "bn"):
        raise UsageError(f"analyze() scores by weight magnitude (l2 or l1) or BatchNormalization γ (bn), not '{criterion}'")
    graph = to_graph(model)
    if input_shapes:
        set_input_shapes(graph, input_shapes)
    get_pass("infer-shapes")(graph, PassContext())  # ranks and spatial sizes for joins and flattens
    analysis = Analysis(graph, criterion, gammas or {})
    walk_graph(analysis)
    check_extents(analysis)
    return make_plan(analysis)


def bn_gammas(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """|γ| of every inference BatchNormalization with a constant γ that is the only reader of a
    named Conv / ConvTranspose / Gemm / MatMul's output, by that layer's name (Network Slimming's
    channel importance, Liu et al. 2017). Read before simplification, which folds them away."""
    graph = to_graph(model)
    names = Counter(node.name for node in graph.nodes)
    gammas = {}
    for node in graph.nodes:
        if node.op != "BatchNormalization" or len(node.inputs) < 2 or not node.inputs[0].inputs:
            continue
        layer = node.inputs[0].inputs[0]
        gamma = constant_value(node.inputs[1])
        if layer.op in LAYER_OPS and layer.name and names[layer.name] == 1 and gamma is not None and \
                gamma.ndim == 1 and len(node.inputs[0].outputs) == 1:
            gammas[layer.name] = np.abs(gamma.astype(np.float64))
    return gammas


def walk_graph(analysis: Analysis) -> None:
    """Every node in order, then the graph outputs and what subgraphs read: both freeze their channels."""
    graph = analysis.graph
    body_reads = {name for node in graph.nodes for body in node_subgraphs(node)
                  for inner in walk(body) for sub in inner.nodes for name in (t.name for t in sub.inputs)}
    for node in graph.nodes:
        visit(analysis, node)
        for tensor in node.outputs:
            if tensor.name in body_reads:
                analysis.freeze_tensor(tensor, f"read inside a subgraph of {label(node)}")
    for tensor in graph.outputs:
        analysis.freeze_tensor(tensor, f"graph output '{tensor.name}'")


def visit(analysis: Analysis, node: gs.Node) -> None:
    tracked = [analysis.channels.get(id(tensor)) for tensor in node.inputs]
    if not any(tracked) and node.op not in LAYER_OPS:
        return
    if node.domain not in (None, "", "ai.onnx"):
        analysis.freeze_inputs(node, f"read by {label(node)} (domain {node.domain})")
        return
    if any(channels is not None and channels.parts is not None for channels in tracked) and \
            node.op not in ("Transpose", "Gather"):
        analysis.freeze_inputs(node, f"read by {label(node)} before the fused projection's parts are taken apart")
        return
    handler = HANDLERS.get(node.op)
    if handler is None or not node_key(node):  # the plan names a node by its first output
        analysis.freeze_inputs(node, f"read by {label(node)}")
        return
    handler(analysis, node, tracked)


def check_extents(analysis: Analysis) -> None:
    """Every tensor the plan cuts or follows must hold exactly its groups' channels along its
    axis (shape inference's dims, the constants' shapes). A rule that followed channels
    somewhere they are not (a layer reading another axis, an op that reshapes them) shows up
    here as a count that does not add up: its groups are frozen, never cut into an invalid or
    wrong model."""
    nodes = nodes_by_key(analysis.graph)
    for cut in analysis.cuts:
        node = nodes[cut.node]
        value = constant_value(node.inputs[cut.index]) if len(node.inputs) > cut.index else None
        if value is None or value.ndim <= cut.axis or value.shape[cut.axis] != analysis.size(cut.groups) * cut.block:
            analysis.freeze(cut.groups, f"{label(node)} input {cut.index} does not hold the group's channels "
                                        f"on axis {cut.axis}")
    for key, channels in analysis.channels.items():
        tensor = analysis.tensors[key]
        if channels.parts is not None or tensor.shape is None:
            continue  # a fused projection's parts each hold their own heads along the axis
        size = dim(tensor, channels.axis) if len(tensor.shape) == channels.rank else -1
        if size is not None and size != analysis.size(channels.groups) * channels.block:
            analysis.freeze(channels.groups, f"'{tensor.name}' does not hold the group's channels on axis {channels.axis}")


def make_plan(analysis: Analysis) -> PrunePlan:
    """The groups (the union-find's roots, with their scores summed), every record in terms of
    them, and each group's parameters and multiply-adds per channel."""
    roots = _roots(analysis)
    analysis.regroup_records(lambda groups: tuple(analysis.find(g) for g in groups))
    total = 0
    for tensor in constants(analysis.graph):
        total += int(np.prod(tensor.shape))
    for parts in analysis.fused:
        if len({analysis.find(part) for part in parts}) > 1:  # Q, K and V must lose the same heads
            for part in parts:
                group = roots[analysis.find(part)]
                group.frozen = group.frozen or "a part of a fused projection whose other parts are not its heads' peers"
    for group in roots.values():
        parts = analysis.scores.get(group.id)
        group.scores = np.sum(parts, axis=0) if parts else None
        if group.scores is None and not group.frozen:
            group.frozen = "no layer owns these channels"
        group.producers = list(dict.fromkeys(group.producers))
        group.consumers = list(dict.fromkeys(group.consumers))
    total_macs = _count_costs(analysis, roots)
    return PrunePlan(dict(sorted(roots.items())), analysis.cuts, analysis.depthwise, total_parameters=total,
                     flattens=analysis.flattens, total_macs=total_macs, splits=analysis.splits,
                     biases=bias_slots(analysis.graph), head_reshapes=analysis.head_reshapes, slices=analysis.slices,
                     gamma_layers=(analysis.scored_by_gamma, analysis.scored), ownerless=analysis.ownerless)


def _roots(analysis: Analysis) -> dict[int, Group]:
    """The groups that remain (not divided), by root, each root holding its members' scores."""
    roots = {}
    for gid in range(len(analysis.groups)):
        if gid in analysis.retired:
            continue
        root = analysis.find(gid)
        roots.setdefault(root, analysis.groups[root])
        if gid in analysis.scores and gid != root:
            analysis.scores.setdefault(root, []).extend(analysis.scores.pop(gid))
    return roots


def _count_costs(analysis: Analysis, roots: dict[int, Group]) -> int:
    """Each group's parameters and multiply-adds per channel over the cuts (the records are in
    terms of roots by now); returns the model's multiply-adds."""
    nodes = nodes_by_key(analysis.graph)
    total_macs = 0
    for node in analysis.graph.nodes:
        total_macs += layer_macs(node) or 0
    for cut in analysis.cuts:
        node = nodes[cut.node]
        value = constant_value(node.inputs[cut.index])
        if value is None:
            continue
        total_channels = sum(roots[g].size for g in cut.groups) * cut.block
        per_channel = value.size // max(total_channels, 1)
        macs = layer_macs(node) if cut.index == 1 else None
        for gid in cut.groups:
            roots[gid].parameters += per_channel * cut.block
            if macs:
                roots[gid].macs += macs * cut.block / max(total_channels, 1)
    return total_macs
