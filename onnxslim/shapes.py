"""Running onnx's shape inference on a graph without copying its weights around."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import InputSpecError
from .graph import walk
from .model import drop_disconnected_nodes

# Initializers above this many elements are handed to shape inference as typed inputs:
# only their dims matter, and data propagation only reads small (shape-like) tensors.
DATA_PROPAGATION_ELEMENTS = 1024


def infer_model(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a ModelProto annotated by onnx shape inference (weights handed over as typed inputs)."""
    skeleton = gs.export_onnx(graph, do_type_check=False)
    _strip(skeleton.graph)
    if skeleton.ir_version < 4:
        skeleton.ir_version = 4  # IR 3 insists initializers are inputs; the skeleton need not be valid IR 3
    try:
        return onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        return skeleton  # inference is best effort: nothing is annotated rather than something wrong


def _strip(graph: onnx.GraphProto) -> None:
    """Large initializers become typed inputs (only their dims matter), and disconnected nodes go
    (they await dead-node elimination, and inference rejects a node without outputs). The node
    order of every graph is kept: the caller pairs inferred bodies with the graph's by position."""
    small = []
    for tensor in graph.initializer:
        if math.prod(tensor.dims) > DATA_PROPAGATION_ELEMENTS:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            small.append(tensor)
    if len(small) != len(graph.initializer):
        kept = [onnx.TensorProto.FromString(tensor.SerializeToString()) for tensor in small]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    drop_disconnected_nodes(graph)
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                _strip(body)


def set_input_shapes(graph: gs.Graph, shapes: dict[str, list[int]]) -> None:
    """Make the named inputs static (`--input-shape`), forgetting every other inferred shape.

    The model's interface changes on purpose here; the shapes inferred from the old dynamic
    inputs would be stale, so all intermediate and output shapes are cleared for re-inference.
    """
    inputs = {tensor.name: tensor for tensor in graph.inputs}
    unknown = set(shapes) - set(inputs)
    if unknown:
        raise InputSpecError(
            f"--input-shape names {', '.join(sorted(unknown))}, but the model's inputs are {', '.join(sorted(inputs))}"
        )
    for name, dims in shapes.items():
        tensor = inputs[name]
        if tensor.shape is not None:
            if len(tensor.shape) != len(dims):
                raise InputSpecError(f"input '{name}' has rank {len(tensor.shape)}, but --input-shape gives {len(dims)} dims")
            for axis, (old, new) in enumerate(zip(tensor.shape, dims)):
                if isinstance(old, (int, np.integer)) and old > 0 and old != new:
                    raise InputSpecError(f"input '{name}' dim {axis} is fixed at {old}, --input-shape gives {new}")
        tensor.shape = list(dims)
    for body in walk(graph):
        outputs = {id(tensor) for tensor in body.outputs}  # still valid: static dims cannot change
        for node in body.nodes:
            for tensor in node.outputs:
                if isinstance(tensor, gs.Variable) and id(tensor) not in outputs:
                    tensor.shape = None
