"""If nodes whose condition is a constant replaced by the branch they always take."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    can_merge,
    constant_value,
    disconnect,
    interface_tensors,
    is_empty,
    is_standard,
    merge_tensors,
    node_subgraphs,
    replace_all_uses,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass


@register_pass("inline-constant-if")
def inline_constant_if(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace an If whose condition is a constant by the nodes of the branch it takes.

    The branch's nodes move into the enclosing graph where the If was (renamed where a name is
    taken elsewhere in the model), and readers of the If's outputs read the branch's outputs. An
    If output that is a graph output keeps its name. Ifs inside the taken branch are inlined too.
    """
    inlined = 0
    while True:
        found = _next_constant_if(graph)
        if found is None:
            return PassResult(inlined=inlined)
        enclosing, node, branch = found
        _inline(graph, enclosing, node, branch)
        inlined += 1


def _next_constant_if(graph: gs.Graph) -> tuple[gs.Graph, gs.Node, gs.Graph] | None:
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            if node.op != "If" or not is_standard(node) or not node.outputs:
                continue
            condition = constant_value(node.inputs[0])
            if condition is None or np.asarray(condition).size != 1:
                continue
            taken = node.attrs.get("then_branch" if bool(np.asarray(condition).reshape(-1)[0]) else "else_branch")
            if isinstance(taken, gs.Graph) and len(taken.outputs) == len(node.outputs):
                return subgraph, node, taken
    return None


def _inline(root: gs.Graph, enclosing: gs.Graph, node: gs.Node, branch: gs.Graph) -> None:
    """Splice `branch`'s nodes into `enclosing` in place of If `node`, and rewire the If's outputs."""
    results = list(branch.outputs)
    moved = list(branch.nodes)
    _rename_moved(root, node, moved)
    index = next(position for position, candidate in enumerate(enclosing.nodes) if candidate is node)
    outputs = list(node.outputs)
    branch.nodes = []  # moved out first: disconnecting the If detaches what its bodies still hold
    branch.outputs = []
    disconnect(node)
    # The If goes now rather than waiting for dead-node elimination: its other branch would still
    # be walked by later passes, and the branch outputs would still count as interface tensors.
    enclosing.nodes[index : index + 1] = moved
    interface = interface_tensors(root)
    pairs = [(output, result) for output, result in zip(outputs, results) if not is_empty(output)]
    for output, result in pairs:
        if id(output) not in interface:
            replace_all_uses(output, result)
    # An interface output keeps its name: the branch node producing its value writes it directly,
    # else (the value comes from outside the branch, or already went to another output) an Identity copies it.
    holder: dict[int, gs.Tensor] = {}
    identities = []
    allocate = None
    for output, result in pairs:
        if id(output) not in interface:
            continue
        source = holder.get(id(result), result)
        if source is result and _produced_by(result, moved) and can_merge(result, output, interface, enclosing):
            merge_tensors(result, output, interface, enclosing)
            holder[id(result)] = output
        else:
            allocate = allocate or unique_names(root)
            identities.append(gs.Node("Identity", name=allocate(f"{output.name}_identity"), inputs=[source], outputs=[output]))
    enclosing.nodes[index + len(moved) : index + len(moved)] = identities


def _produced_by(tensor: gs.Tensor, nodes: list[gs.Node]) -> bool:
    return bool(tensor.inputs) and any(tensor.inputs[0] is node for node in nodes)


def _rename_moved(root: gs.Graph, node: gs.Node, moved: list[gs.Node]) -> None:
    """Give the taken branch's own tensors and nodes names that nothing outside the If uses.

    Sibling bodies may reuse names (two Ifs' branches often do); once in the enclosing graph a
    name must be unique in the model. Renaming is deterministic: name, name_1, name_2...
    """
    inside = {id(tensor) for moved_node in moved for tensor in moved_node.outputs}
    inside |= {id(tensor) for moved_node in moved for tensor in moved_node.inputs if isinstance(tensor, gs.Constant)}
    within_if = {id(body) for branch in node_subgraphs(node) for body in walk(branch)}
    outside: set[str] = set()
    for subgraph in walk(root):
        if id(subgraph) in within_if:
            continue
        for other in subgraph.nodes:
            outside.add(other.name)
            outside.update(tensor.name for tensor in (*other.inputs, *other.outputs) if id(tensor) not in inside)
        outside.update(tensor.name for tensor in (*subgraph.inputs, *subgraph.outputs) if id(tensor) not in inside)
    allocate = None
    renamed: set[int] = set()
    for moved_node in moved:
        for tensor in (*moved_node.inputs, *moved_node.outputs):
            if id(tensor) in inside and id(tensor) not in renamed and not is_empty(tensor) and tensor.name in outside:
                allocate = allocate or unique_names(root)
                tensor.name = allocate(tensor.name)
                renamed.add(id(tensor))
        if moved_node.name and moved_node.name in outside:
            allocate = allocate or unique_names(root)
            moved_node.name = allocate(moved_node.name)
