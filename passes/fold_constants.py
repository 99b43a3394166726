"""Constant folding: subgraphs that read only constants are evaluated once, with onnxruntime (in
its worker process: an evaluation that crashes, hangs or runs out of memory there is a fold not
taken, and the node stays)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxslim.graph import interface_tensors, is_empty, is_standard, make_constant, node_subgraphs, tensor_nbytes, walk
from onnxslim.manager import PassContext, PassResult, register_pass
from onnxslim.runtime import Session

# Never folded: their value is not a function of their inputs.
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
# Their outputs are sequences or optionals, not tensors an initializer could hold.
NON_TENSOR_PREFIXES = ("Sequence", "Optional", "SplitToSequence", "ConcatFromSequence")
# Serialized size of a node beyond its tensors: op_type, names, attributes (a conservative floor).
NODE_PROTO_BYTES = 24
# What removing a node is worth in file bytes: it runs on every inference, its result once. A
# detector's anchor generator (dozens of nodes of Range/Expand/Concat arithmetic on the image
# size) folds into a table of anchors; a weight written as one ConstantOfShape does not pay for itself.
NODE_WORTH = 512
# An IR version every supported onnxruntime reads; the evaluation model is throwaway.
EVALUATION_IR_VERSION = 8


@register_pass("fold-constants")
def fold_constants(graph: gs.Graph, ctx: PassContext, *, size_cap: int = 0, node_bytes: int = NODE_WORTH) -> PassResult:
    """Evaluate nodes whose inputs are all constants and store their results as initializers.

    A result is stored only if it is no larger than the constants it replaces plus `node_bytes`
    for each node it removes (0: folding never grows the model); results up to `size_cap` bytes
    are stored regardless (-1: no cap).
    """
    interface = interface_tensors(graph)
    folded = skipped = 0
    for subgraph in walk(graph):
        candidates = [node for node in subgraph.nodes if _foldable(node)]
        foldable = _closed_under_constant_inputs(candidates)
        # Results known (from shape inference) to be too large to store are not even computed.
        foldable = _closed_under_constant_inputs(_not_surely_too_large(foldable, size_cap, node_bytes))
        if not foldable:
            continue
        values = _evaluate(foldable, subgraph.opset, graph)
        foldable = [node for node in foldable if all(id(out) in values for out in node.outputs if not is_empty(out))]
        keep = _materialization(foldable, values, interface, size_cap, node_bytes)
        for tensor in keep.stored:
            make_constant(tensor, values[id(tensor)], interface, subgraph)
            folded += 1
        skipped += len(keep.too_large)
    return PassResult(changed=folded > 0, folded=folded, kept_for_size=skipped)


def _foldable(node: gs.Node) -> bool:
    return (
        is_standard(node)
        and node.op not in NONDETERMINISTIC
        and node.op != "Constant"
        and not node.op.startswith(NON_TENSOR_PREFIXES)
        and not node_subgraphs(node)
        and not all(map(is_empty, node.inputs))
        and not all(map(is_empty, node.outputs))
    )


def _not_surely_too_large(nodes: list[gs.Node], size_cap: int, node_bytes: int) -> list[gs.Node]:
    """The nodes (in graph order) none of whose outputs' known static size exceeds all that
    folding could free upstream of it: its node cone and the constants only folded nodes read.

    Freed bytes are a property of the set folded together, not of one node: a weight sliced into
    four gates by four Slices is freed by none of them alone, and by the four together.
    """
    if size_cap < 0:
        return nodes
    members = {id(node) for node in nodes}
    producer_of = {id(tensor): node for node in nodes for tensor in node.outputs}
    # Upper bound of what storing a node's outputs could replace (a diamond counts twice: still a bound).
    bound: dict[int, int] = {}
    kept = []
    for node in nodes:
        total = NODE_PROTO_BYTES + node_bytes
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                if all(id(reader) in members for reader in tensor.outputs):
                    total += tensor_nbytes(tensor)
            elif id(tensor) in producer_of:
                total += bound.get(id(producer_of[id(tensor)]), 0)
        bound[id(node)] = total = min(total, UNBOUNDED)
        if not any(_too_large(tensor, node, max(total, size_cap)) for tensor in node.outputs):
            kept.append(node)
    return kept


# Beyond any model's bytes: where the bound of _not_surely_too_large stops adding.
UNBOUNDED = 2**62


def _too_large(tensor: gs.Tensor, node: gs.Node, limit: int) -> bool:
    size = _known_nbytes(tensor)
    return size is not None and size > limit and not _inputs_as_large(node, size)


def _inputs_as_large(node: gs.Node, size: int) -> bool:
    """A large result may still be stored if it replaces an equally large folded input chain."""
    return any(not isinstance(tensor, gs.Constant) and (_known_nbytes(tensor) or 0) >= size for tensor in node.inputs)


def _known_nbytes(tensor: gs.Tensor) -> int | None:
    if tensor.dtype is None or tensor.shape is None:
        return None
    elements = 1
    for dim in tensor.shape:
        if not isinstance(dim, (int, np.integer)):
            return None
        elements *= int(dim)
    try:
        return elements * np.dtype(tensor.dtype).itemsize
    except TypeError:
        return None


def _closed_under_constant_inputs(candidates: list[gs.Node]) -> list[gs.Node]:
    """The candidates whose inputs are constants or outputs of other such candidates (graph order)."""
    computable: set[int] = set()
    result = []
    for node in candidates:  # nodes are in topological order
        for tensor in node.inputs:
            if not (is_empty(tensor) or isinstance(tensor, gs.Constant) or id(tensor) in computable):
                break
        else:
            result.append(node)
            computable.update(map(id, node.outputs))
    return result


def _evaluate(nodes: list[gs.Node], opset: int, root: gs.Graph) -> dict[int, np.ndarray]:
    """Values of every output of `nodes`, by tensor id; nodes onnxruntime cannot run are left out."""
    try:
        return _run(nodes, opset, root)
    except Exception:  # onnxruntime cannot evaluate them all (or a value cannot be handed to it): one at a time
        pass
    values: dict[int, np.ndarray] = {}
    for node in nodes:
        if any(not is_empty(t) and not isinstance(t, gs.Constant) and id(t) not in values for t in node.inputs):
            continue
        try:
            values.update(_run([node], opset, root, known=values))
        except Exception:  # a crash, hang or error in the worker, or a value it cannot take
            continue  # this node stays; its readers then stay too
    return values


def _run(nodes: list[gs.Node], opset: int, root: gs.Graph, known: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Run `nodes` as one onnxruntime session whose initializers are the constants they read."""
    known = known or {}
    produced = {id(tensor) for node in nodes for tensor in node.outputs}
    initializers: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        for tensor in node.inputs:
            if is_empty(tensor) or id(tensor) in produced or tensor.name in initializers:
                continue
            if isinstance(tensor, gs.Constant):
                initializers[tensor.name] = OnnxExporter.export_tensor_proto(tensor)
            else:
                initializers[tensor.name] = onnx.numpy_helper.from_array(np.asarray(known[id(tensor)]), tensor.name)
    outputs = [tensor for node in nodes for tensor in node.outputs if not is_empty(tensor)]
    evaluation = onnx.helper.make_graph(
        [OnnxExporter.export_node(node) for node in nodes],
        "fold_constants",
        inputs=[],
        # Untyped outputs: onnxruntime infers their types itself.
        outputs=[onnx.ValueInfoProto(name=tensor.name) for tensor in outputs],
        initializer=list(initializers.values()),
    )
    opsets = list(root.import_domains or [onnx.helper.make_opsetid("", opset)])
    model = onnx.helper.make_model(evaluation, opset_imports=opsets)
    model.ir_version = EVALUATION_IR_VERSION
    results = Session(model, label="constants to fold").run(None, {})
    return {id(tensor): value for tensor, value in zip(outputs, results)}


class _Materialization:
    def __init__(self):
        self.stored: list[gs.Tensor] = []
        self.too_large: list[gs.Tensor] = []


def _materialization(
    nodes: list[gs.Node], values: dict[int, np.ndarray], interface: set[int], size_cap: int, node_bytes: int
) -> _Materialization:
    """Which folded tensors to store, backing off from those that would grow the model.

    A tensor read by a node that stays (or that is an interface tensor) must be stored or its
    producer kept. The stored tensors together free every folded node that is not kept and every
    constant only such nodes read; each stored tensor is credited with an even share of what its
    cone frees (a weight sliced for two layers is freed only when both slices are stored, and
    half of it is credited to each). A tensor larger than its credit and than `size_cap` is not
    stored: its producer is kept, which makes its folded inputs needed in turn, and the credits
    are counted again until every stored tensor pays for itself.
    """
    folded = {id(node): node for node in nodes}
    producer_of = {id(tensor): node for node in nodes for tensor in node.outputs if not is_empty(tensor)}
    needed = [tensor for node in nodes for tensor in node.outputs if _needed(tensor, folded, interface)]
    listed = {id(tensor) for tensor in needed}
    kept: set[int] = set()
    result = _Materialization()
    while True:
        stored = [tensor for tensor in needed if id(producer_of[id(tensor)]) not in kept]
        if size_cap < 0:
            break
        credit = _credits(stored, producer_of, kept, node_bytes)
        refused = [tensor for tensor in stored if values[id(tensor)].nbytes > max(credit[id(tensor)], size_cap)]
        if not refused:
            break
        result.too_large.extend(refused)
        for tensor in refused:
            node = producer_of[id(tensor)]
            kept.add(id(node))
            for source in node.inputs:
                if id(source) in producer_of and id(source) not in listed:
                    listed.add(id(source))
                    needed.append(source)
    result.stored = stored
    return result


def _credits(stored: list[gs.Tensor], producer_of: dict[int, gs.Node], kept: set[int], node_bytes: int) -> dict[int, float]:
    """Each stored tensor's share of the bytes freed: its cone's nodes and the constants only
    removed nodes read, each split evenly among the stored tensors whose cones hold it."""
    cones = {id(tensor): _cone(producer_of[id(tensor)], producer_of, kept) for tensor in stored}
    holders: dict[int, int] = {}  # node id -> how many cones hold it
    for cone in cones.values():
        for key in cone:
            holders[key] = holders.get(key, 0) + 1
    # A constant is freed if every reader goes: lies in a stored tensor's cone (a folded node in
    # none is dead anyway, but is not counted on).
    readers: dict[int, set[int]] = {}  # freed constant id -> ids of the stored tensors whose cones read it
    sizes: dict[int, int] = {}
    for tensor_id, cone in cones.items():
        for node in cone.values():
            for source in node.inputs:
                if not isinstance(source, gs.Constant):
                    continue
                if id(source) not in sizes:
                    freed = all(id(reader) in holders for reader in source.outputs)
                    sizes[id(source)] = tensor_nbytes(source) if freed else 0
                readers.setdefault(id(source), set()).add(tensor_id)
    credit = {}
    for tensor_id, cone in cones.items():
        nodes = sum((NODE_PROTO_BYTES + node_bytes) / holders[key] for key in cone)
        constants = {id(source) for node in cone.values() for source in node.inputs if isinstance(source, gs.Constant)}
        credit[tensor_id] = nodes + sum(sizes[key] / len(readers[key]) for key in constants)
    return credit


def _needed(tensor: gs.Tensor, folded: dict[int, gs.Node], interface: set[int]) -> bool:
    if is_empty(tensor):
        return False
    return id(tensor) in interface or any(id(reader) not in folded for reader in tensor.outputs)


def _cone(node: gs.Node, producer_of: dict[int, gs.Node], kept: set[int] = frozenset()) -> dict[int, gs.Node]:
    """`node` and the folded nodes upstream of it, up to those that are kept (they stay)."""
    cone, stack = {}, [node]
    while stack:
        current = stack.pop()
        if id(current) in cone:
            continue
        cone[id(current)] = current
        stack.extend(producer_of[id(t)] for t in current.inputs if id(t) in producer_of and id(producer_of[id(t)]) not in kept)
    return cone
