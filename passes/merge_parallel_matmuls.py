"""MatMuls (or Gemms) of one input by several constant weights, merged into one and a Split."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_value, disconnect, insert_before, interface_tensors, is_empty, is_standard, known_rank, single_reader, unique_names, walk
from onnxslim.manager import PassContext, PassResult, register_pass

# Split takes the sizes as an input from opset 13 (an attribute before).
SPLIT_SIZES_INPUT_OPSET = 13
# Split counts a negative axis from the end from opset 11.
NEGATIVE_AXIS_OPSET = 11


class _Branch:
    """One MatMul/Gemm reading the shared input, and the bias Add after a MatMul (if merged too)."""

    def __init__(self, node: gs.Node, weight: np.ndarray, bias: np.ndarray | None, bias_node: gs.Node | None):
        self.node, self.weight, self.bias, self.bias_node = node, weight, bias, bias_node

    @property
    def output(self) -> gs.Tensor:
        return (self.bias_node or self.node).outputs[0]

    @property
    def columns(self) -> int:
        return self.weight.shape[1]


@register_pass("merge-parallel-matmuls", joins_layers=True)
def merge_parallel_matmuls(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Merge MatMuls (or Gemms) that read one input with constant weights into one MatMul and a Split.

    x·W₁, x·W₂, x·W₃ (attention's query, key and value projections) are the column blocks of
    x·[W₁ W₂ W₃]: one MatMul with the concatenated weight, then a Split of its last axis. The
    bias Adds after them merge the same way (one Add of the concatenated bias before the Split),
    so six nodes become three. Every weight is a rank-2 constant of one dtype read by nothing
    else (the merged weight replaces them, the model does not grow); a group is merged only when
    that leaves fewer nodes.
    """
    interface = interface_tensors(graph)
    names = None
    merged = 0
    for subgraph in walk(graph):
        shared = [tensor for tensor in _tensors_read(subgraph) if len(tensor.outputs) > 1]
        for tensor in shared:
            for group in _groups(tensor, subgraph, interface):
                axis = _split_axis(group, graph.opset)
                if axis is None:
                    continue
                names = names or unique_names(graph)
                _merge(group, subgraph, graph.opset, axis, names)
                merged += len(group)
    return PassResult(merged=merged)


def _split_axis(group: list[_Branch], opset: int) -> int | None:
    """The output's last axis as Split takes it: counted from the end only from opset 11."""
    node = group[0].node
    rank = 2 if node.op == "Gemm" else known_rank(node.outputs[0]) or known_rank(node.inputs[0])
    if rank is not None:
        return rank - 1
    return -1 if opset >= NEGATIVE_AXIS_OPSET else None


def _tensors_read(graph: gs.Graph) -> list[gs.Tensor]:
    """The tensors nodes of `graph` read, each once, in node order (deterministic)."""
    seen: set[int] = set()
    found = []
    for node in graph.nodes:
        for tensor in node.inputs:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                found.append(tensor)
    return found


def _groups(tensor: gs.Tensor, graph: gs.Graph, interface: set[int]) -> list[list[_Branch]]:
    """The readers of `tensor` that can merge, grouped by how they compute (with or without bias; Gemm attributes)."""
    members = {id(node) for node in graph.nodes}
    groups: dict[tuple, list[_Branch]] = {}
    for reader in tensor.outputs:
        if id(reader) not in members:
            continue  # a reader inside a body: it cannot write the Split's outputs
        found = _branch(reader, tensor, interface)
        if found is not None:
            key, branch = found
            groups.setdefault(key, []).append(branch)
    worth = []
    for (op, has_bias, *_), branches in groups.items():
        if len({id(branch.node) for branch in branches}) != len(branches):
            continue  # a node reading the input twice
        # n branches become one MatMul (+ one Add) and a Split: fewer nodes from 2 MatMuls with bias
        # Adds, else from 3 (a Gemm holds its bias).
        if len(branches) >= (2 if op == "MatMul" and has_bias else 3):
            worth.append(branches)
    return worth


def _branch(node: gs.Node, source: gs.Tensor, interface: set[int]) -> tuple[tuple, _Branch] | None:
    """(group key, branch) if `node` is a MatMul/Gemm of `source` by a constant weight it alone reads."""
    if node.op not in ("MatMul", "Gemm") or not is_standard(node) or len(node.outputs) != 1 or node.inputs[0] is not source:
        return None
    if len(node.inputs) < 2 or node.inputs[1] is source or len(node.inputs[1].outputs) != 1:
        return None  # the weight is shared: the merged copy would add its bytes
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype == object or 0 in weight.shape:
        return None
    if node.op == "Gemm":
        return _gemm_branch(node, weight)
    bias, bias_node = _bias_after(node, weight, interface)
    key = ("MatMul", bias is not None, weight.dtype.str, weight.shape[0])
    return key, _Branch(node, weight, bias, bias_node)


def _gemm_branch(node: gs.Node, weight: np.ndarray) -> tuple[tuple, _Branch] | None:
    """A Gemm's weight as [K, N] (transB undone) and its C as one number per column."""
    attrs = node.attrs
    if attrs.get("transA", 0) or any(key not in ("alpha", "beta", "transA", "transB") for key in attrs):
        return None  # a transposed A is not shared row by row; `broadcast` (opset < 7) is not handled
    if attrs.get("transB", 0):
        weight = weight.T
    bias = None
    if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
        if len(node.inputs[2].outputs) != 1:
            return None
        bias = _column_vector(constant_value(node.inputs[2]), weight, rank=2)
        if bias is None:
            return None
    # Gemms merge when they scale alike; β·C is kept as C (β stays), so it is never rounded anew.
    key = ("Gemm", bias is not None, weight.dtype.str, weight.shape[0], float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0)))
    return key, _Branch(node, weight, bias, None)


def _bias_after(node: gs.Node, weight: np.ndarray, interface: set[int]) -> tuple[np.ndarray | None, gs.Node | None]:
    """The constant per-column bias of an Add reading only the MatMul's output, with that Add."""
    reader = single_reader(node.outputs[0], interface)
    if reader is None or reader.op != "Add" or not is_standard(reader) or len(reader.inputs) != 2:
        return None, None
    other = reader.inputs[1] if reader.inputs[0] is node.outputs[0] else reader.inputs[0]
    if other is node.outputs[0] or len(other.outputs) != 1:
        return None, None
    bias = _column_vector(constant_value(other), weight, rank=known_rank(node.outputs[0]) or known_rank(node.inputs[0]))
    return (bias, reader) if bias is not None else (None, None)


def _column_vector(value: np.ndarray | None, weight: np.ndarray, rank: int | None) -> np.ndarray | None:
    """`value` as one number per output column, if adding it to a [..., N] result of rank `rank`
    changes only values: every dim 1 but the last (1 or N), and no more dims than the result has."""
    if value is None or value.dtype != weight.dtype:
        return None
    limit = rank if rank is not None else 1
    if value.ndim > limit or any(dim != 1 for dim in value.shape[:-1]):
        return None
    if value.ndim and value.shape[-1] not in (1, weight.shape[1]):
        return None
    return np.broadcast_to(value.reshape(-1), (weight.shape[1],))


def _merge(group: list[_Branch], graph: gs.Graph, opset: int, axis: int, names) -> None:
    # The merged nodes go where the earliest of the group was: the shared input is defined before it.
    position = {id(node): index for index, node in enumerate(graph.nodes)}
    first = min((branch.node for branch in group), key=lambda node: position[id(node)])
    source = first.inputs[0]
    base = first.name or first.outputs[0].name
    weight = np.concatenate([branch.weight for branch in group], axis=1)
    outputs = [branch.output for branch in group]
    for branch in group:
        disconnect(branch.node)
        if branch.bias_node is not None:
            disconnect(branch.bias_node)
    product = gs.Variable(names(f"{base}_merged"), dtype=outputs[0].dtype)
    nodes = []
    if first.op == "Gemm":
        attrs = dict(first.attrs)
        if attrs.get("transB", 0):
            weight = weight.T
        inputs = [source, gs.Constant(names(f"{base}_merged_weight"), np.ascontiguousarray(weight))]
        if group[0].bias is not None:
            bias = np.concatenate([branch.bias for branch in group])
            inputs.append(gs.Constant(names(f"{base}_merged_bias"), bias))
        nodes.append(gs.Node("Gemm", name=names(f"{base}_merged"), attrs=attrs, inputs=inputs, outputs=[product]))
    else:
        weight_tensor = gs.Constant(names(f"{base}_merged_weight"), weight)
        nodes.append(gs.Node("MatMul", name=names(f"{base}_merged"), inputs=[source, weight_tensor], outputs=[product]))
        if group[0].bias is not None:
            bias = gs.Constant(names(f"{base}_merged_bias"), np.concatenate([branch.bias for branch in group]))
            biased = gs.Variable(names(f"{base}_merged_biased"), dtype=outputs[0].dtype)
            nodes.append(gs.Node("Add", name=names(f"{base}_merged_bias_add"), inputs=[product, bias], outputs=[biased]))
            product = biased
    sizes = [branch.columns for branch in group]
    if opset >= SPLIT_SIZES_INPUT_OPSET:
        split_inputs = [product, gs.Constant(names(f"{base}_merged_split"), np.array(sizes, dtype=np.int64))]
        attrs = {"axis": axis}
    else:
        split_inputs, attrs = [product], {"axis": axis, "split": sizes}
    nodes.append(gs.Node("Split", name=names(f"{base}_merged_split"), attrs=attrs, inputs=split_inputs, outputs=outputs))
    insert_before(graph, first, *nodes)
