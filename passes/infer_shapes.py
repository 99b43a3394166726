"""Shape and type annotation with onnx's shape inference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph import node_subgraphs, proto_node_bodies, tensor_map, trusted_symbol, walk
from onnxslim.manager import PassContext, PassResult, register_pass
from onnxslim.shapes import infer_model


@register_pass("infer-shapes")
def infer_shapes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Annotate tensors with the dtypes and shapes onnx's shape inference derives (changes no computation)."""
    memo = graph.__dict__.get(MEMO)
    if memo is not None and _open_questions(graph) <= memo:
        # Inference already ran on this graph and nothing it could say more about has changed
        # since: every incomplete tensor has the same producer reading the same tensors.
        return PassResult(changed=False, skipped=1)
    inferred = infer_model(graph)
    annotated = _annotate(graph, inferred.graph)
    graph.__dict__[MEMO] = _open_questions(graph)
    # Annotation is not a rewrite: it never makes a fixed-point group go round again.
    return PassResult(changed=False, annotated=annotated)


# Attribute of the top-level gs.Graph holding _open_questions() as it was after the last inference.
MEMO = "_onnxslim_inference_memo"


def _open_questions(graph: gs.Graph) -> frozenset:
    """What inference could still learn: every tensor without a dtype or a complete shape, with
    the node that computes it and what that node reads (and whether each input is a constant),
    plus the graph inputs' shapes. Tensors that are complete cannot become more complete, and an
    incomplete tensor whose producer and inputs are all unchanged gets the same answer again;
    a rewrite upstream that resolves it changes its producer's inputs or their kind.
    """
    questions = {tuple((id(tensor), str(tensor.dtype), _dims(tensor.shape)) for tensor in graph.inputs)}
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            for tensor in node.outputs:
                if _complete(tensor):
                    continue
                reads = tuple((id(source), isinstance(source, gs.Constant), _producer_id(source)) for source in node.inputs)
                questions.add((id(tensor), id(node), node.op, reads))
    return frozenset(questions)


def _complete(tensor: gs.Tensor) -> bool:
    if tensor.dtype is None or tensor.shape is None:
        return False
    return all(isinstance(dim, (int, np.integer)) and dim >= 0 or trusted_symbol(dim) for dim in tensor.shape)


def _producer_id(tensor: gs.Tensor) -> int | None:
    return id(tensor.inputs[0]) if tensor.inputs else None


def _dims(shape) -> tuple | None:
    return None if shape is None else tuple(str(dim) for dim in shape)


def _annotate(graph: gs.Graph, proto: onnx.GraphProto) -> int:
    """Copy dtypes/shapes from the inferred proto onto the graph's unannotated tensors, bodies included."""
    tensors = tensor_map(graph)
    annotated = 0
    for value in list(proto.value_info) + list(proto.output):
        tensor = tensors.get(value.name)
        if not isinstance(tensor, gs.Variable) or _settled(tensor) or not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if tensor.dtype is None and tensor_type.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            annotated += 1
        if tensor_type.HasField("shape"):
            inferred = [
                dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim
            ]
            refined = _refine(tensor.shape, inferred)
            if refined != tensor.shape:
                tensor.shape = refined
                annotated += 1
    # The inferred proto leaves out disconnected nodes (see onnxslim.shapes), so skip them here too.
    connected = [node for node in graph.nodes if node.outputs]
    for index, node in enumerate(connected[: len(proto.node)]):
        bodies = node_subgraphs(node)
        if not bodies:
            continue
        # proto.node is read only for owners of bodies: most nodes are not
        for body, body_proto in zip(bodies, proto_node_bodies(proto.node[index])):
            annotated += _annotate(body, body_proto)
    return annotated


def _settled(tensor: gs.Variable) -> bool:
    """Whether annotation cannot change the tensor: typed, with a list of static dims (see _refine)."""
    return (
        tensor.dtype is not None
        and type(tensor.shape) is list
        and all(isinstance(dim, (int, np.integer)) for dim in tensor.shape)
    )


def _refine(known: list | None, inferred: list) -> list | None:
    """`known` with each dynamic dim that inference now finds static filled in.

    Shapes only ever become more static: after folding, inference can resolve dims it could
    not before (a Reshape target that became a constant), but a dim once known stays.
    """
    if known is None:
        return inferred
    if len(known) != len(inferred):
        return known
    return [
        new if not isinstance(old, (int, np.integer)) and isinstance(new, int) and new > 0 else old
        for old, new in zip(known, inferred)
    ]
