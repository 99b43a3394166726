"""Where pruning finds each layer's bias (onnxslim.layers knows the layers), and a model's
multiply-adds at given input shapes."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..graph import constant_value
from ..layers import bias_slot, layer_macs
from ..manager import PassContext, get_pass
from ..model import to_graph
from ..shapes import set_input_shapes
from .records import BiasSlot, node_key


def bias_slots(graph: gs.Graph) -> dict[str, BiasSlot]:
    """Where each layer's constant bias is, by the layer's node_key: a Conv's or Gemm's input 2,
    or the constant operand of the Add that alone reads a MatMul (the layers surgery.compensate
    moves means into)."""
    members = {id(node) for node in graph.nodes}
    slots = {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        slot = bias_slot(node)
        if slot is not None and id(slot[0]) in members and constant_value(slot[0].inputs[slot[1]]) is not None:
            slots[node_key(node)] = BiasSlot(node_key(slot[0]), slot[1])
    return slots


def model_macs(model: onnx.ModelProto, input_shapes: dict | None) -> int:
    """The layers' multiply-adds of one sample at `input_shapes` (static dims)."""
    graph = to_graph(model)
    if input_shapes:
        set_input_shapes(graph, input_shapes)
    get_pass("infer-shapes")(graph, PassContext())
    return sum(layer_macs(node) or 0 for node in graph.nodes)
