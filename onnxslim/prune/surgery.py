"""The cut: every tensor that carries a plan's removed channels loses them (producers' weight rows
and biases, per-channel constants, depthwise weights and their `group`, Split sizes, Slice bounds,
Reshape shapes, consumers' weight columns). The same plan applied as zeros (the consumers' weight
columns for removed channels set to 0, nothing removed) gives the model the pruned one must equal
exactly: that separates surgery bugs from pruning's cost."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import constant_value, set_input, unique_names
from ..model import to_graph, to_model
from .records import BiasSlot, Cut, PrunePlan, nodes_by_key


def prune_model(model: onnx.ModelProto, plan: PrunePlan) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the pruned model, the zeroed reference): the plan's removed channels cut out, and the
    original with only the consumers' weight columns for those channels set to zero."""
    pruned = apply_plan(model, plan, remove=True)
    zeroed = apply_plan(model, plan, remove=False)
    return pruned, zeroed


def apply_plan(model: onnx.ModelProto, plan: PrunePlan, remove: bool) -> onnx.ModelProto:
    """The model with the plan's removed channels cut out (`remove`), or zeroed in the consumers."""
    graph = to_graph(model)
    nodes = nodes_by_key(graph)
    names = unique_names(graph)
    for (key, index), value in _cut_values(nodes, plan, remove).items():
        node = nodes[key]
        original = node.inputs[index]
        set_input(node, index, gs.Constant(names(f"{original.name}_pruned" if remove else f"{original.name}_zeroed"),
                                           np.ascontiguousarray(value)))
    if remove:
        _fit_counts(graph, nodes, plan, names)
        interface = {id(tensor) for tensor in graph.inputs + graph.outputs}
        for node in graph.nodes:
            for tensor in node.outputs:
                if isinstance(tensor, gs.Variable) and id(tensor) not in interface:
                    tensor.shape = None  # re-inferred: channel dims changed
    graph.cleanup()
    return to_model(graph, model)


def _cut_values(nodes: dict[str, gs.Node], plan: PrunePlan, remove: bool) -> dict[tuple[str, int], np.ndarray]:
    """Every input the plan changes, by (node_key, input index): its value cut (or zeroed), and
    the consumers' biases with the removed channels' means moved in."""
    replaced: dict[tuple[str, int], np.ndarray] = {}
    for cut in plan.cuts:
        if not plan.cuts_any(cut.groups) or (not remove and not cut.reads):
            continue
        value = replaced.get(cut.slot)
        if value is None:
            value = constant_value(nodes[cut.node].inputs[cut.index])
        indices = plan.kept_indices(cut)
        if cut.reads and cut.node in plan.means and cut.node in plan.biases:
            compensate(nodes, cut, value, indices, plan.means[cut.node], plan.biases[cut.node], replaced)
        replaced[cut.slot] = np.take(value, indices, axis=cut.axis) if remove else zero_removed(value, cut.axis, indices)
    return replaced


def _fit_counts(graph: gs.Graph, nodes: dict[str, gs.Node], plan: PrunePlan, names) -> None:
    """The attributes and shape inputs that count channels follow the kept ones."""
    for record in plan.depthwise:
        if plan.cuts_any(record.groups):
            nodes[record.node].attrs["group"] = plan.kept_count(record.groups)
    for split in plan.splits:
        if plan.cuts_any(split.members()):
            sizes = [plan.kept_count(part) for part in split.outputs]
            _set_split_sizes(nodes[split.node], sizes, graph.opset or 0, names)
    for flatten in plan.flattens:
        if plan.cuts_any(flatten.groups):
            node = nodes[flatten.node]
            # [0, -1] flattens the same way whatever the first entry was (0, -1 or the batch size).
            set_input(node, 1, gs.Constant(names(f"{node.inputs[1].name}_pruned"), np.array([0, -1], np.int64)))
    for sliced in plan.slices:
        if plan.cuts_any(sliced.members()):
            node = nodes[sliced.node]
            start = plan.kept_count(sliced.before)
            end = start + plan.kept_count(sliced.kept)
            for index, bound in ((1, start), (2, end)):
                value = constant_value(node.inputs[index]).copy()
                value.reshape(-1)[sliced.entry] = bound
                set_input(node, index, gs.Constant(names(f"{node.inputs[index].name}_pruned"), value))
    for reshape in plan.head_reshapes:
        if plan.cuts_any(reshape.groups):
            node = nodes[reshape.node]
            shape = constant_value(node.inputs[1]).astype(np.int64).copy()
            shape[reshape.entry] = reshape.unit * plan.kept_count(reshape.groups)
            set_input(node, 1, gs.Constant(names(f"{node.inputs[1].name}_pruned"), shape))


def _set_split_sizes(node: gs.Node, sizes: list[int], opset: int, names) -> None:
    """Give a Split explicit part sizes (the pruned ones): the 'split' input from opset 13, else the attribute."""
    node.attrs.pop("num_outputs", None)
    if opset < 13:
        node.attrs["split"] = list(sizes)
        return
    constant = gs.Constant(names(f"{node.name or 'split'}_sizes_pruned"), np.array(sizes, np.int64))
    if len(node.inputs) > 1:
        set_input(node, 1, constant)
    else:
        node.inputs.append(constant)


def compensate(nodes: dict[str, gs.Node], cut: Cut, weight: np.ndarray, kept: np.ndarray, means: np.ndarray,
               slot: BiasSlot, replaced: dict) -> None:
    """Move the removed inputs' mean contribution into the layer's bias (at `slot`, see
    bias_slots; `replaced[slot.slot]` takes the new bias): for a Conv, b += Σ_k∈removed mean_k ·
    Σ W[:, k] (the kernel summed; at the zero-padded border this is approximate); for a Gemm,
    C += alpha/beta · Σ_f mean_f · W[f] oriented as [K, N]; for a MatMul, b += Σ_f mean_f · W[f, :].
    The zeroed reference gets the same bias, so the surgery check still compares like with like."""
    node = nodes[cut.node]
    if node.op not in ("Conv", "Gemm", "MatMul") or len(means) != weight.shape[cut.axis]:
        return
    bias = replaced.get(slot.slot)
    if bias is None:
        bias = constant_value(nodes[slot.node].inputs[slot.index])
    removed = np.setdiff1d(np.arange(weight.shape[cut.axis]), kept)
    if bias is None or not len(removed):
        return
    shift = _mean_shift(node, np.take(weight.astype(np.float64), removed, axis=cut.axis), means[removed], cut.axis)
    if shift is None or (bias.shape != shift.shape and bias.size != shift.size):
        return
    with np.errstate(over="ignore", invalid="ignore"):
        # asarray: arithmetic on a 0-d bias (a scalar Add after a one-output MatMul) gives a numpy
        # scalar, which onnxruntime does not take as a feed
        compensated = np.asarray((bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype))
    if np.isfinite(compensated).all():  # means too large for the bias's dtype move nothing
        replaced[slot.slot] = compensated


def _mean_shift(node: gs.Node, columns: np.ndarray, means: np.ndarray, axis: int) -> np.ndarray | None:
    """What the removed inputs (their weights `columns` along `axis`, their `means`) added to the
    layer's output on average, in the bias's terms (None where it has none to give)."""
    if node.op == "Conv":
        kernels = columns.sum(axis=tuple(range(2, columns.ndim))) if columns.ndim > 2 else columns  # [O, removed]
        return kernels @ means
    if node.op == "Gemm":
        oriented = columns if axis == 0 else columns.T  # [removed, N]
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        return None if beta == 0 else alpha / beta * (means @ oriented)
    if columns.ndim != 2:
        return None
    return means @ np.moveaxis(columns, axis, 0)  # [removed, N]


def zero_removed(value: np.ndarray, axis: int, kept: np.ndarray) -> np.ndarray:
    """A copy of `value` with the entries along `axis` that are not in `kept` set to 0."""
    value = value.copy()
    index = [slice(None)] * value.ndim
    index[axis] = np.setdiff1d(np.arange(value.shape[axis]), kept)
    value[tuple(index)] = 0
    return value
