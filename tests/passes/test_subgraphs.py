"""The default pipeline inside If branches: bodies are cleaned, and the model verifies either way."""

import numpy as np
import onnxslim
from onnx import TensorProto, helper
from builder import ModelBuilder, assert_equivalent, branches, ops, output_names, random, top_ops

FEEDS = [{"x": random([2, 3], seed), "c": np.array(flag)} for seed, flag in ((0, True), (1, False))]


def if_model():
    """Both branches carry an Identity, a foldable constant computation and a dead node."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    scale = b.initializer("scale", random([2, 3], seed=5))

    then = b.branch()
    one, two = then.constant(np.ones([2, 3], np.float32)), then.constant(np.full([2, 3], 2, np.float32))
    offset = then.node("Add", [one, two])
    then.node("Exp", [x])  # dead
    relu = then.node("Relu", [then.node("Identity", [x])])
    then.output(then.node("Add", [relu, offset]))

    other = b.branch()
    factor = other.node("Mul", [scale, other.constant(np.array(0.5, np.float32))])
    other.node("Abs", [factor])  # dead
    other.output(other.node("Mul", [other.node("Identity", [other.node("Neg", [x])]), factor]))

    b.output(b.node("Identity", [b.node("Relu", [b.if_node(condition, then, other)])], ["y"]))
    return b.build()


def test_default_pipeline_cleans_both_branches():
    model = if_model()
    then_before, else_before = branches(model)
    assert len(then_before.node) == 7 and len(else_before.node) == 6

    optimized, report = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=FEEDS), return_report=True)

    assert report.verification.passed
    then_body, else_body = branches(optimized)
    assert top_ops(then_body) == ["Relu", "Add"]
    assert top_ops(else_body) == ["Neg", "Mul"]
    assert top_ops(optimized.graph) == ["If", "Relu"] and output_names(optimized) == ["y"]
    assert ops(optimized)["Identity"] == 0 and ops(optimized)["Constant"] == 0
    assert optimized.ByteSize() < model.ByteSize()


def test_optimized_if_model_verifies_for_both_conditions():
    model = if_model()
    optimized = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=FEEDS))
    for feed in FEEDS:  # each condition on its own, so one branch cannot hide behind the other
        assert_equivalent(model, optimized, [feed])
        assert onnxslim.verify(model, optimized, inputs=[feed]).passed


def test_nested_if_is_cleaned_at_every_depth():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    inner_then = b.branch()
    inner_then.output(inner_then.node("Identity", [inner_then.node("Relu", [x])]))
    inner_else = b.branch()
    zero = inner_else.constant(np.array(0, np.float32))
    inner_else.output(inner_else.node("Add", [inner_else.node("Neg", [x]), zero]))
    outer_then = b.branch()
    outer_then.node("Exp", [x])  # dead
    outer_then.output(outer_then.if_node(condition, inner_then, inner_else))
    outer_else = b.branch()
    outer_else.output(outer_else.node("Neg", [x]))
    b.output(b.if_node(condition, outer_then, outer_else))
    model = b.build()

    optimized = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=FEEDS))

    then_body, _ = branches(optimized)
    assert top_ops(then_body) == ["If"]
    inner = next(node for node in then_body.node if node.op_type == "If")
    bodies = {attribute.name: attribute.g for attribute in inner.attribute}
    assert top_ops(bodies["then_branch"]) == ["Relu"]  # the Identity's output is the branch output: Relu takes its name
    assert top_ops(bodies["else_branch"]) == ["Neg"]  # x + 0 removed, the constant lifted then dropped
    for feed in FEEDS:
        assert_equivalent(model, optimized, [feed])


def test_loop_body_is_cleaned():
    """A Loop body reading an outer weight: w * Identity(1) goes, and the weight is stored once."""
    b = ModelBuilder()
    x = b.input("x", [3])
    weight = b.initializer("w", random([3], seed=7))
    body = b.branch()
    body.inputs = [
        helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
        helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("accumulated", TensorProto.FLOAT, [3]),
    ]
    one = body.node("Identity", [body.constant(np.array(1, np.float32))])
    body.node("Exp", ["accumulated"])  # dead
    body.output(body.node("Identity", ["condition_in"]), np.bool_, [])
    body.output(body.node("Add", ["accumulated", body.node("Mul", [weight, one])]), np.float32, [3])
    trips, keep_going = b.initializer("trips", np.array(3, np.int64)), b.initializer("keep_going", np.array(True))
    b.output(b.node("Loop", [trips, keep_going, x], ["y"], body=body.graph()), np.float32, [3])
    model = b.build()

    optimized = onnxslim.optimize(model)

    loop = next(node for node in optimized.graph.node if node.op_type == "Loop")
    (optimized_body,) = [attribute.g for attribute in loop.attribute]
    assert top_ops(optimized_body) == ["Identity", "Add"]  # the condition pass-through keeps its Identity
    graphs = (optimized.graph, optimized_body)
    copies = [tensor for graph in graphs for tensor in graph.initializer if tensor.name == "w"]
    assert len(copies) == 1
    assert optimized.ByteSize() < model.ByteSize()
    assert_equivalent(model, optimized)


def branches_reading_outer_values():
    """x[batch, samples] -> Unsqueeze at the top level, and each branch repeats it (the dynamo
    exporter's pattern, value_info included): after optimizing, the branches read the outer value."""
    b = ModelBuilder()
    x = b.input("x", ["batch", "samples"])
    condition = b.node("Greater", [b.node("ReduceSum", [x], keepdims=0), b.initializer("zero", np.array(0, np.float32))])
    axes = b.initializer("axes", np.array([1], np.int64))
    outer = b.annotate(b.node("Unsqueeze", [x, axes], ["outer"]), np.float32, ["batch", 1, "samples"])
    weight = b.initializer("w", random([4, 1, 3], seed=2))

    def branch(stride):
        body = b.branch()
        unsqueezed = body.annotate(body.node("Unsqueeze", [x, axes]), np.float32, ["batch", 1, "samples"])
        conv = body.node("Conv", [unsqueezed, weight], strides=[stride])
        body.output(body.node("ReduceMean", [conv], axes=[2], keepdims=0), np.float32, ["batch", 4])
        return body

    mean = b.node("ReduceMean", [outer], axes=[2], keepdims=0)
    b.output(b.node("Add", [b.if_node(condition, branch(1), branch(2)), mean]), np.float32, ["batch", 4])
    return b.build()


def test_a_body_writes_no_type_for_the_outer_values_it_reads_and_a_second_run_changes_nothing():
    """A body's value_info entry for an outer value stands for it in the body: onnx's inference
    of the body then lost every shape, and a second run found a different model."""
    model = branches_reading_outer_values()
    feeds = [{"x": random([batch, samples], seed=batch)} for batch, samples in ((1, 8), (3, 11))]

    optimized = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds))

    then_body, else_body = branches(optimized)
    outer_names = {value.name for value in optimized.graph.value_info} | {node.output[0] for node in optimized.graph.node}
    for body in (then_body, else_body):
        assert "outer" in {name for node in body.node for name in node.input}
        assert not {value.name for value in body.value_info} & outer_names
        assert [dim.dim_param for dim in body.output[0].type.tensor_type.shape.dim][:1] == ["batch"]
    assert onnxslim.optimize(optimized, verify=onnxslim.VerifyOptions(inputs=feeds)).SerializeToString() \
        == optimized.SerializeToString()
