"""eliminate-dead-nodes: nodes that reach no output go, with the initializers only they read."""

import numpy as np
from builder import (
    ModelBuilder,
    assert_equivalent,
    branches,
    initializer_names,
    ops,
    output_names,
    random,
    run_pass,
    top_ops,
)
from onnxslim import PassContext, get_pass
from onnxslim.model import to_graph


def eliminate(model):
    return run_pass(model, "eliminate-dead-nodes")


def test_unread_node_and_its_own_initializer_are_removed():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.node("Mul", [x, b.initializer("unused_scale", random([2, 3], 1))])
    b.output(b.node("Relu", [x], ["y"]))
    model = b.build()

    cleaned, result = eliminate(model)

    assert result.changed and result.counters == {"nodes": 1, "initializers": 1}
    assert top_ops(cleaned.graph) == ["Relu"] and not cleaned.graph.initializer
    assert_equivalent(model, cleaned)


def test_dead_chain_is_removed_whole():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.node("Neg", [b.node("Exp", [b.node("Abs", [x])])])
    b.output(b.node("Relu", [x], ["y"]))
    model = b.build()

    cleaned, result = eliminate(model)

    assert result.counters["nodes"] == 3 and top_ops(cleaned.graph) == ["Relu"]
    assert_equivalent(model, cleaned)


def test_initializer_shared_with_a_live_node_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    w = b.initializer("w", random([2, 3], 2))
    b.node("Add", [x, w])
    b.output(b.node("Mul", [x, w], ["y"]))
    model = b.build()

    cleaned, result = eliminate(model)

    assert result.counters == {"nodes": 1, "initializers": 0}
    assert initializer_names(cleaned.graph) == {"w"}
    assert_equivalent(model, cleaned)


def test_unused_graph_input_stays():
    """Inputs are the model's interface even when nothing reads them."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.input("unused", [4])
    b.node("Neg", ["unused"])
    b.output(b.node("Relu", [x], ["y"]))
    model = b.build()

    cleaned, _ = eliminate(model)

    assert [value.name for value in cleaned.graph.input] == ["x", "unused"]
    assert top_ops(cleaned.graph) == ["Relu"]
    assert_equivalent(model, cleaned)


def test_node_with_one_read_output_stays_whole():
    b = ModelBuilder()
    x = b.input("x", [4, 3])
    first, _ = b.node("Split", [x], 2, axis=0)
    b.output(b.node("Relu", [first], ["y"]))
    model = b.build()

    cleaned, result = eliminate(model)

    assert not result.changed and ops(cleaned) == ops(model)
    split = next(node for node in cleaned.graph.node if node.op_type == "Split")
    assert len(split.output) == 2
    assert_equivalent(model, cleaned)


def test_live_graph_needs_nothing_removed():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.output(b.node("Relu", [b.node("Add", [x, b.initializer("bias", random([3], 3))])], ["y"]))
    model = b.build()

    cleaned, result = eliminate(model)

    assert not result.changed and result.counters == {"nodes": 0, "initializers": 0}
    assert ops(cleaned) == ops(model)


def test_graph_output_produced_by_an_otherwise_unread_node_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.output(b.node("Relu", [x], ["y"]))
    b.output(b.node("Neg", [x], ["z"]))
    model = b.build()

    cleaned, result = eliminate(model)

    assert not result.changed and output_names(cleaned) == ["y", "z"]


def test_dead_nodes_inside_if_branches_are_removed():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    then.node("Exp", [x])
    then.node("Mul", [x, then.initializer("dead_weight", random([2, 3], 4))])
    then.output(then.node("Relu", [x]))
    other = b.branch()
    other.node("Abs", [x])
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    cleaned, result = eliminate(model)

    assert result.counters == {"nodes": 3, "initializers": 1}
    then_body, else_body = branches(cleaned)
    assert top_ops(then_body) == ["Relu"] and top_ops(else_body) == ["Neg"]
    assert not then_body.initializer
    assert_equivalent(model, cleaned, [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])


def test_outer_node_read_only_inside_a_branch_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    outer = b.node("Exp", [x], ["outer"])
    then = b.branch()
    then.output(then.node("Relu", [outer]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    cleaned, result = eliminate(model)

    assert not result.changed and top_ops(cleaned.graph) == ["Exp", "If"]
    assert_equivalent(model, cleaned, [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])


def test_dead_if_node_goes_with_its_branches():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    then.output(then.node("Relu", [x]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.if_node(condition, then, other)
    b.output(b.node("Abs", [x], ["y"]))
    model = b.build()

    cleaned, result = eliminate(model)

    assert top_ops(cleaned.graph) == ["Abs"] and ops(cleaned) == {"Abs": 1}
    assert result.counters["nodes"] == 3  # the If and the node in each branch
    assert_equivalent(model, cleaned, [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])


def test_nodes_disconnected_by_another_pass_are_removed():
    """eliminate-noops leaves the Identity disconnected in the graph; this pass takes it out."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.output(b.node("Neg", [b.node("Identity", [b.node("Relu", [x])])], ["y"]))
    model = b.build()

    graph = to_graph(model)
    get_pass("eliminate-noops")(graph, PassContext())
    assert len(graph.nodes) == 3  # still there, disconnected
    result = get_pass("eliminate-dead-nodes")(graph, PassContext())
    assert result.counters["nodes"] == 1 and [node.op for node in graph.nodes] == ["Relu", "Neg"]


def test_a_removed_if_stops_reading_outer_tensors():
    """A dead If's branches read `t`; once the If is gone they must not count as readers of `t`,
    or the Identity carrying `t` to the graph output stays until a second optimize."""
    import onnxslim

    b = ModelBuilder(opset=13)
    x = b.input("x", [2])
    condition = b.input("c", [], np.bool_)
    t = b.node("Relu", [b.node("Neg", [x])], ["t"])
    then = b.branch()
    then.output(then.node("Neg", [t]))
    other = b.branch()
    other.output(other.node("Relu", [t]))
    b.if_node(condition, then, other)  # read by nothing
    b.output(b.node("Identity", [t], ["y"]))
    model = b.build()

    once = onnxslim.optimize(model, verify=False)

    assert top_ops(once.graph) == ["Neg", "Relu"]
    assert onnxslim.optimize(once, verify=False).SerializeToString() == once.SerializeToString()
    assert_equivalent(model, once)
