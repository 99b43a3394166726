"""inline-constant-if: an If whose condition is a constant is replaced by the branch it takes."""

import numpy as np
import onnx
import pytest
from builder import ModelBuilder, assert_equivalent, ops, output_names, random, run_pass, run_passes, top_ops


def inline(model):
    inlined, result = run_pass(model, "inline-constant-if")
    return run_passes(inlined, "eliminate-dead-nodes"), result


def if_model(flag, *, as_constant_node=False, output_name="y"):
    """y = Identity(If(c) then Relu(x) + 1 else Neg(x)), with c a constant."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    if as_constant_node:
        condition = b.constant(np.array(flag), name="c")
    else:
        condition = b.initializer("c", np.array(flag))
    then = b.branch()
    then.output(then.node("Add", [then.node("Relu", [x]), then.initializer("one", np.ones([3], np.float32))]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    result = b.if_node(condition, then, other)
    b.output(b.node("Identity", [result], [output_name]))
    return b.build()


@pytest.mark.parametrize("flag, expected", [(True, ["Relu", "Add", "Identity"]), (False, ["Neg", "Identity"])])
def test_constant_condition_takes_its_branch(flag, expected):
    model = if_model(flag)

    inlined, result = inline(model)

    assert result.changed and result.counters["inlined"] == 1
    assert top_ops(inlined.graph) == expected and ops(inlined)["If"] == 0
    assert_equivalent(model, inlined)


def test_condition_from_a_constant_node():
    model = if_model(True, as_constant_node=True)

    inlined, result = inline(model)

    assert result.counters["inlined"] == 1 and top_ops(inlined.graph) == ["Relu", "Add", "Identity"]
    assert_equivalent(model, inlined)


def test_if_output_that_is_a_graph_output_keeps_its_name():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    then = b.branch()
    then.output(then.node("Relu", [x]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.node("If", [b.initializer("c", np.array(True))], ["y"], then_branch=then.graph(), else_branch=other.graph()))
    model = b.build()

    inlined, result = inline(model)

    assert top_ops(inlined.graph) == ["Relu"] and list(inlined.graph.node[0].output) == ["y"]
    assert output_names(inlined) == ["y"]
    assert_equivalent(model, inlined)


def outer_value_ifs(through_identity):
    """z = Exp(If(c) then relu else Neg(x)), y = If(d) then relu else Abs(x), relu computed outside.

    Without the Identity the branches return the outer `relu` directly, which onnx.checker and
    onnxruntime reject (other runtimes take it); with it, the model is valid.
    """
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    relu = b.node("Relu", [x], ["relu"])
    ifs = []
    for name, other_op in (("first", "Neg"), ("y", "Abs")):
        then, other = b.branch(), b.branch()
        then.output(then.node("Identity", [relu]) if through_identity else relu, np.float32, [2, 3])
        other.output(other.node(other_op, [x]), np.float32, [2, 3])
        condition = b.initializer(f"{name}_condition", np.array(True))
        ifs.append(b.node("If", [condition], [name], then_branch=then.graph(), else_branch=other.graph()))
    b.output(b.node("Exp", [ifs[0]], ["z"]))
    b.output(ifs[1])
    return b.build(check=through_identity)


def test_branch_returning_an_outer_tensor_directly():
    """Readers of the If read the outer tensor; an If output that is a graph output gets an Identity."""
    model = outer_value_ifs(through_identity=False)

    inlined, result = inline(model)

    assert result.counters["inlined"] == 2 and ops(inlined)["If"] == 0
    assert top_ops(inlined.graph) == ["Relu", "Identity", "Exp"]
    identity, exp = inlined.graph.node[1:]
    assert list(exp.input) == ["relu"] and list(identity.input) == ["relu"] and list(identity.output) == ["y"]
    assert output_names(inlined) == ["z", "y"]
    assert_equivalent(outer_value_ifs(through_identity=True), inlined)  # the original itself does not load


def test_branch_returning_an_outer_tensor_through_an_identity():
    model = outer_value_ifs(through_identity=True)

    inlined, result = inline(model)

    assert result.counters["inlined"] == 2 and top_ops(inlined.graph) == ["Relu", "Identity", "Identity", "Exp"]
    assert list(inlined.graph.node[2].output) == ["y"]  # the branch's Identity writes the graph output
    assert_equivalent(model, inlined)


def test_nested_constant_ifs_are_inlined_at_every_depth():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    inner_then = b.branch()
    inner_then.output(inner_then.node("Relu", [x]))
    inner_else = b.branch()
    inner_else.output(inner_else.node("Sigmoid", [x]))
    outer_then = b.branch()
    inner = outer_then.if_node(outer_then.initializer("inner_c", np.array(False)), inner_then, inner_else)
    outer_then.output(outer_then.node("Neg", [inner]))
    outer_else = b.branch()
    outer_else.output(outer_else.node("Abs", [x]))
    b.output(b.node("Identity", [b.if_node(b.initializer("c", np.array(True)), outer_then, outer_else)], ["y"]))
    model = b.build()

    inlined, result = inline(model)

    assert result.counters["inlined"] == 2
    assert top_ops(inlined.graph) == ["Sigmoid", "Neg", "Identity"]
    assert_equivalent(model, inlined)


def test_constant_if_inside_a_branch_of_a_dynamic_if_is_inlined_there():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    inner_then, inner_else = b.branch(), b.branch()
    inner_then.output(inner_then.node("Relu", [x]))
    inner_else.output(inner_else.node("Sigmoid", [x]))
    outer_then = b.branch()
    outer_then.output(outer_then.if_node(outer_then.initializer("inner_c", np.array(True)), inner_then, inner_else))
    outer_else = b.branch()
    outer_else.output(outer_else.node("Abs", [x]))
    b.output(b.node("Identity", [b.if_node(condition, outer_then, outer_else)], ["y"]))
    model = b.build()

    inlined, result = inline(model)

    assert result.counters["inlined"] == 1 and ops(inlined)["If"] == 1
    then_body = next(attribute.g for attribute in inlined.graph.node[0].attribute if attribute.name == "then_branch")
    assert top_ops(then_body) == ["Relu"]
    feeds = [{"x": random([2, 3], seed), "c": np.array(flag)} for seed, flag in ((0, True), (1, False))]
    assert_equivalent(model, inlined, feeds)


def test_branch_names_taken_elsewhere_are_made_unique():
    """Two Ifs whose branches use the same tensor and node names: once inlined, names must be unique."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    results = []
    for index in range(2):
        then = b.branch()
        then.output(then.node("Relu", [x], ["t"], name="relu_node"))
        other = b.branch()
        other.output(other.node("Neg", [x], ["t"], name="neg_node"))
        results.append(b.if_node(b.initializer(f"c{index}", np.array(True)), then, other))
    b.output(b.node("Add", results, ["y"]))
    model = b.build()

    inlined, result = inline(model)

    assert result.counters["inlined"] == 2 and top_ops(inlined.graph) == ["Relu", "Relu", "Add"]
    onnx.checker.check_model(inlined, full_check=True)
    relu_outputs = [node.output[0] for node in inlined.graph.node if node.op_type == "Relu"]
    relu_names = [node.name for node in inlined.graph.node if node.op_type == "Relu"]
    assert len(set(relu_outputs)) == 2 and len(set(relu_names)) == 2
    assert_equivalent(model, inlined)


def test_a_second_run_changes_nothing():
    inlined, _ = inline(if_model(True))
    _, result = run_pass(inlined, "inline-constant-if")
    assert not result.changed


# ----------------------------------------------------------------------------- must not fire


def test_if_with_a_graph_input_condition_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    then, other = b.branch(), b.branch()
    then.output(then.node("Relu", [x]))
    other.output(other.node("Neg", [x]))
    b.output(b.node("Identity", [b.if_node(condition, then, other)], ["y"]))
    model = b.build()

    inlined, result = inline(model)

    assert not result.changed and ops(inlined) == ops(model)
    feeds = [{"x": random([2, 3], seed), "c": np.array(flag)} for seed, flag in ((0, True), (1, False))]
    assert_equivalent(model, inlined, feeds)


def test_if_with_a_computed_condition_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.node("ReduceMax", [b.node("Greater", [x, b.initializer("zero", np.array(0, np.float32))])], keepdims=0)
    condition = b.node("Cast", [condition], to=onnx.TensorProto.BOOL)
    then, other = b.branch(), b.branch()
    then.output(then.node("Relu", [x]))
    other.output(other.node("Neg", [x]))
    b.output(b.node("Identity", [b.if_node(condition, then, other)], ["y"]))
    model = b.build(check=False)

    inlined, result = run_pass(model, "inline-constant-if")

    assert not result.changed and ops(inlined)["If"] == 1


def test_the_branch_not_taken_stops_reading_outer_tensors():
    """The untaken branch read `t`: left reading it, it counted as a second reader, and the
    Identity that carries `t` to the graph output (the taken branch) could not be bypassed
    until a second optimize. Found by the fuzzer's fixed-point check."""
    import onnxslim

    b = ModelBuilder(opset=13)
    x = b.input("x", [])
    t = b.node("Relu", [b.node("Relu", [x])], ["t"])
    then = b.branch()
    then.output(then.node("Identity", [t]))
    other = b.branch()
    other.output(other.node("Add", [t, other.constant(np.array(2.25, np.float32))]))
    b.output(b.if_node(b.initializer("c", np.array(True)), then, other), np.float32, [])
    model = b.build()

    once = onnxslim.optimize(model, verify=False)

    assert top_ops(once.graph) == ["Relu", "Relu"]
    assert onnxslim.optimize(once, verify=False).SerializeToString() == once.SerializeToString()
    assert_equivalent(model, once)
