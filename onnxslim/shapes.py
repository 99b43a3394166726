"""Running onnx's shape inference on a graph without copying its weights around."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import SparseValues

from .errors import InputSpecError
from .graph import tensor_map, walk
from .exporter import ProtoWriter, forget_inferred_symbols
from .importer import DECLARED_TYPES, exportable_constants

# Initializers above this many elements are handed to shape inference as typed inputs:
# only their dims matter, and data propagation only reads small (shape-like) tensors.
DATA_PROPAGATION_ELEMENTS = 1024


def infer_model(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a ModelProto annotated by onnx shape inference (weights handed over as typed inputs)."""
    skeleton = onnx.helper.make_model(
        _skeleton(graph), opset_imports=list(graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)])
    )
    # IR 3 insists initializers are inputs; the skeleton need not be valid IR 3.
    skeleton.ir_version = max(graph.ir_version or 4, 4)
    try:
        return onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        return skeleton  # inference is best effort: nothing is annotated rather than something wrong


def _skeleton(graph: gs.Graph) -> onnx.GraphProto:
    """The top-level graph without copying its large weights: they become typed inputs (only
    their dims matter to inference, and data propagation reads only small, shape-like tensors).
    Disconnected nodes are left out (inference rejects a node without outputs); node order is
    kept, since the caller pairs inferred bodies with the graph's by position."""
    exportable_constants(graph)
    writer = ProtoWriter(graph.__dict__.get(DECLARED_TYPES))
    skeleton = onnx.GraphProto(name=graph.name or "graph")
    for node in graph.nodes:
        if node.outputs:
            writer.node(skeleton.node.add(), node)
    for tensor in graph.inputs:
        writer.value_info(skeleton.input.add(), tensor)
    for tensor in graph.outputs:
        writer.value_info(skeleton.output.add(), tensor)
    interface = {tensor.name for tensor in [*graph.inputs, *graph.outputs]}
    for tensor in tensor_map(graph).values():
        if isinstance(tensor, gs.Constant):
            # A sparse initializer is typed, not written: the skeleton's initializers are dense.
            if math.prod(tensor.shape) > DATA_PROPAGATION_ELEMENTS or isinstance(tensor._values, SparseValues):
                writer.value_info(skeleton.input.add(), tensor)
            else:
                skeleton.initializer.append(OnnxExporter.export_tensor_proto(tensor))
        elif tensor.name not in interface and (tensor.dtype is not None or tensor.shape is not None):
            writer.value_info(skeleton.value_info.add(), tensor)
    forget_inferred_symbols(skeleton, outputs=True)  # so inference says afresh what it can (see infer-shapes)
    return skeleton


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
