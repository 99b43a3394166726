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
# An IR version every supported onnxruntime reads; the evaluation model is throwaway.
EVALUATION_IR_VERSION = 8


@register_pass("fold-constants")
def fold_constants(graph: gs.Graph, ctx: PassContext, *, size_cap: int = 0) -> PassResult:
    """Evaluate nodes whose inputs are all constants and store their results as initializers.

    A result is stored only if it is no larger than the constants and nodes it replaces, so folding
    never grows the model; results up to `size_cap` bytes are stored regardless (-1: no cap).
    """
    interface = interface_tensors(graph)
    folded = skipped = 0
    for subgraph in walk(graph):
        candidates = [node for node in subgraph.nodes if _foldable(node)]
        foldable = _closed_under_constant_inputs(candidates)
        # Results known (from shape inference) to be too large to store are not even computed.
        foldable = _closed_under_constant_inputs([node for node in foldable if not _surely_too_large(node, size_cap)])
        if not foldable:
            continue
        values = _evaluate(foldable, subgraph.opset, graph)
        foldable = [node for node in foldable if all(id(out) in values for out in node.outputs if not is_empty(out))]
        keep = _materialization(foldable, values, interface, size_cap)
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


def _surely_too_large(node: gs.Node, size_cap: int) -> bool:
    """Whether an output's known static size exceeds what folding its node alone could free."""
    if size_cap < 0:
        return False
    freed = _exclusive_constant_bytes({id(node): node}) + NODE_PROTO_BYTES
    for tensor in node.outputs:
        size = _known_nbytes(tensor)
        if size is not None and size > max(freed, size_cap) and not _inputs_as_large(node, size):
            return True
    return False


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
    nodes: list[gs.Node], values: dict[int, np.ndarray], interface: set[int], size_cap: int
) -> _Materialization:
    """Which folded tensors to store, backing off from those that would grow the model.

    A tensor read by a node that stays (or that is an interface tensor) must be stored or its
    producer kept. Storing it frees the node cone that computes it, and the constants only that
    cone reads; it is stored if its bytes do not exceed what it frees (or `size_cap`). A kept
    producer makes its own folded inputs needed in turn.
    """
    folded = {id(node): node for node in nodes}
    producer_of = {id(tensor): node for node in nodes for tensor in node.outputs}
    kept: set[int] = set()
    decided: dict[int, bool] = {}
    result = _Materialization()
    pending = [tensor for node in nodes for tensor in node.outputs if _needed(tensor, folded, interface)]
    while pending:
        tensor = pending.pop()
        if id(tensor) in decided:
            continue
        value = values[id(tensor)]
        cone = _cone(producer_of[id(tensor)], producer_of)
        freed = _exclusive_constant_bytes(cone) + NODE_PROTO_BYTES * len(cone)
        store = value.nbytes <= freed or size_cap < 0 or value.nbytes <= size_cap
        decided[id(tensor)] = store
        if store:
            result.stored.append(tensor)
            continue
        result.too_large.append(tensor)
        node = producer_of[id(tensor)]
        if id(node) not in kept:
            kept.add(id(node))
            for other in node.outputs:  # the node stays, so its other outputs need not be stored
                decided.setdefault(id(other), False)
            pending.extend(t for t in node.inputs if id(t) in producer_of and id(t) not in decided)
    return result


def _needed(tensor: gs.Tensor, folded: dict[int, gs.Node], interface: set[int]) -> bool:
    if is_empty(tensor):
        return False
    return id(tensor) in interface or any(id(reader) not in folded for reader in tensor.outputs)


def _cone(node: gs.Node, producer_of: dict[int, gs.Node]) -> dict[int, gs.Node]:
    cone, stack = {}, [node]
    while stack:
        current = stack.pop()
        if id(current) in cone:
            continue
        cone[id(current)] = current
        stack.extend(producer_of[id(t)] for t in current.inputs if id(t) in producer_of)
    return cone


def _exclusive_constant_bytes(cone: dict[int, gs.Node]) -> int:
    """Bytes of the initializers read only by nodes of the cone (they disappear with it)."""
    total, seen = 0, set()
    for node in cone.values():
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                if all(id(reader) in cone for reader in tensor.outputs):
                    total += tensor_nbytes(tensor)
    return total
