"""Dead-node elimination."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph import count_nodes, walk
from onnxslim.manager import PassContext, PassResult, register_pass


@register_pass("eliminate-dead-nodes")
def eliminate_dead_nodes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Remove nodes whose results reach no graph output, and the initializers only they read."""
    nodes_before = count_nodes(graph)
    constants_before = _constant_count(graph)
    # Graph inputs stay: they are the model's interface even when nothing reads them.
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True, recurse_functions=True)
    return PassResult(nodes=nodes_before - count_nodes(graph), initializers=constants_before - _constant_count(graph))


def _constant_count(graph: gs.Graph) -> int:
    seen: set[int] = set()
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            seen.update(id(tensor) for tensor in node.inputs if isinstance(tensor, gs.Constant))
    return len(seen)
