"""Shape and type annotation with onnx's shape inference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph import node_subgraphs
from onnxslim.manager import PassContext, PassResult, register_pass
from onnxslim.shapes import infer_model


@register_pass("infer-shapes")
def infer_shapes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Annotate tensors with the dtypes and shapes onnx's shape inference derives (changes no computation)."""
    inferred = infer_model(graph)
    annotated = _annotate(graph, inferred.graph)
    # Annotation is not a rewrite: it never makes a fixed-point group go round again.
    return PassResult(changed=False, annotated=annotated)


def _annotate(graph: gs.Graph, proto: onnx.GraphProto) -> int:
    """Copy dtypes/shapes from the inferred proto onto the graph's unannotated tensors, bodies included."""
    tensors = graph.tensors()
    annotated = 0
    for value in list(proto.value_info) + list(proto.output):
        tensor = tensors.get(value.name)
        if not isinstance(tensor, gs.Variable) or not value.type.HasField("tensor_type"):
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
    for node, node_proto in zip([node for node in graph.nodes if node.outputs], proto.node):
        bodies = node_subgraphs(node)
        if not bodies:
            continue
        proto_bodies = [
            body
            for attribute in node_proto.attribute
            for body in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs))
        ]
        for body, body_proto in zip(bodies, proto_bodies):
            annotated += _annotate(body, body_proto)
    return annotated


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
