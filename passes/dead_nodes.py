"""Dead-node elimination."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph import constants, count_nodes, disconnect, node_subgraphs, walk
from onnxslim.manager import PassContext, PassResult, register_pass


@register_pass("eliminate-dead-nodes")
def eliminate_dead_nodes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Remove nodes whose results reach no graph output, and the initializers only they read."""
    constants_before = None  # counted before the first removal: most runs remove nothing
    removed = 0
    # Bodies first: a dead node in a body may be the only reader of an outer tensor.
    for body in reversed(list(walk(graph))):
        live = _live_nodes(body)
        if len(live) == len(body.nodes):
            continue
        if constants_before is None:
            constants_before = sum(1 for _ in constants(graph))
        kept = []
        for node in body.nodes:
            if id(node) in live:
                kept.append(node)
            else:
                removed += 1 + sum(count_nodes(nested) for nested in node_subgraphs(node))
                disconnect(node)
        body.nodes = kept
    if constants_before is None:
        return PassResult(nodes=0, initializers=0)
    # Graph inputs stay even when nothing reads them: they are the model's interface.
    return PassResult(nodes=removed, initializers=constants_before - sum(1 for _ in constants(graph)))


def _live_nodes(body: gs.Graph) -> set[int]:
    """Ids of the nodes of `body` that some output of `body` depends on (through nested bodies too)."""
    members = {id(node) for node in body.nodes}
    live: set[int] = set()
    pending = list(body.outputs)
    while pending:
        tensor = pending.pop()
        if not tensor.inputs:
            continue
        node = tensor.inputs[0]
        if id(node) in live or id(node) not in members:
            continue  # already seen, or produced in an enclosing graph
        live.add(id(node))
        pending.extend(node.inputs)
        for nested in node_subgraphs(node):
            pending.extend(_reads(nested))
    return live


def _reads(body: gs.Graph) -> list[gs.Tensor]:
    """Every tensor a body and its nested bodies read, or return directly (outer-scope values included)."""
    reads = []
    for graph in walk(body):
        reads.extend(graph.outputs)
        for node in graph.nodes:
            reads.extend(node.inputs)
    return reads
