"""What pruning knows of the layers that own channels (Conv, ConvTranspose, Gemm, MatMul with a
constant weight): their weight, where their bias sits, and their multiply-adds."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import constant_value
from ..manager import PassContext, get_pass
from ..model import to_graph
from ..shapes import set_input_shapes
from .records import BiasSlot, node_key

# Layers whose constant weight owns output channels (and reads input channels).
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def layer_weight(node: gs.Node) -> np.ndarray | None:
    if len(node.inputs) < 2:
        return None
    return constant_value(node.inputs[1])


def bias_slots(graph: gs.Graph) -> dict[str, BiasSlot]:
    """Where each layer's constant bias is, by the layer's node_key: a Conv's or Gemm's input 2,
    or the constant operand of the Add that alone reads a MatMul."""
    members = {id(node) for node in graph.nodes}
    slots = {}
    for node in graph.nodes:
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
            slots[node_key(node)] = BiasSlot(node_key(node), 2)
        elif node.op == "MatMul" and node.outputs and len(node.outputs[0].outputs) == 1:
            add = node.outputs[0].outputs[0]
            if add.op == "Add" and id(add) in members and len(add.inputs) == 2:
                other = 1 if add.inputs[0] is node.outputs[0] else 0
                if constant_value(add.inputs[other]) is not None:
                    slots[node_key(node)] = BiasSlot(node_key(add), other)
    return slots


def layer_macs(node: gs.Node) -> int | None:
    """Multiply-adds of one sample of a Conv/ConvTranspose/Gemm/MatMul with a constant weight:
    weight elements times output positions (None where the sizes needed are unknown)."""
    if node.op not in LAYER_OPS or len(node.inputs) < 2 or not node.outputs:
        return None
    weight = constant_value(node.inputs[1])
    if weight is None:
        return None
    if node.op == "Conv":
        sizes = (node.outputs[0].shape or [None, None, None])[2:]
    elif node.op == "ConvTranspose":
        sizes = (node.inputs[0].shape or [None, None, None])[2:]
    elif node.op == "MatMul":
        shape = node.outputs[0].shape
        sizes = shape[1:-1] if shape is not None else [None]
    else:
        sizes = []
    if any(not isinstance(size, (int, np.integer)) for size in sizes):
        return None
    return int(weight.size) * int(np.prod(sizes)) if sizes else int(weight.size)


def model_macs(model: onnx.ModelProto, input_shapes: dict | None) -> int:
    """The layers' multiply-adds of one sample at `input_shapes` (static dims)."""
    graph = to_graph(model)
    if input_shapes:
        set_input_shapes(graph, input_shapes)
    get_pass("infer-shapes")(graph, PassContext())
    return sum(layer_macs(node) or 0 for node in graph.nodes)
