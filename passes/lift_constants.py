"""Constant nodes lifted to initializers."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_node_value, find, interface_tensors, walk
from onnxslim.manager import PassContext, PassResult, register_pass


@register_pass("lift-constants")
def lift_constants(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Turn Constant nodes into initializers, so every later pass sees weights the same way."""
    interface = interface_tensors(graph)
    lifted = 0
    for subgraph in walk(graph):
        for node in find(subgraph, "Constant"):
            if not node.outputs:
                continue  # lifted already, waiting for dead-node elimination
            output = node.outputs[0]
            value = constant_node_value(node)
            if value is None or value.dtype == object or id(output) in interface:
                continue  # sparse or string values stay nodes; a model output is never an initializer
            node.outputs.clear()
            output.to_constant(np.asarray(value))
            lifted += 1
    return PassResult(lifted=lifted)
