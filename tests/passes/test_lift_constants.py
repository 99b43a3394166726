"""lift-constants: Constant nodes become initializers; model outputs, strings and custom domains stay nodes."""

import numpy as np
import onnx.helper as helper
import onnx.numpy_helper
from builder import ModelBuilder, assert_equivalent, branches, initializer_names, ops, output_names, random, run_pass


def test_constant_node_becomes_initializer():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    k = b.constant(random([2, 3], seed=1), name="k")
    b.output(b.node("Add", [x, k]))
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert result.changed and result.counters["lifted"] == 1
    assert ops(model)["Constant"] == 1 and ops(lifted)["Constant"] == 0
    assert initializer_names(lifted.graph) == {"k"}  # the tensor keeps its name
    value = onnx.numpy_helper.to_array(lifted.graph.initializer[0])
    np.testing.assert_array_equal(value, random([2, 3], seed=1))
    assert_equivalent(model, lifted)


def test_every_value_attribute_is_lifted():
    """value_float, value_ints... (not only `value`) are lifted with the dtype ONNX gives them."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.nodes.append(helper.make_node("Constant", [], ["scale"], value_float=2.0))
    b.nodes.append(helper.make_node("Constant", [], ["shape"], value_ints=[3, 2]))
    scaled = b.node("Mul", [x, "scale"])
    b.output(b.node("Reshape", [scaled, "shape"]))
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert result.counters["lifted"] == 2
    assert ops(lifted)["Constant"] == 0
    values = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in lifted.graph.initializer}
    assert values["scale"].dtype == np.float32 and values["scale"].shape == ()
    assert values["shape"].dtype == np.int64 and values["shape"].tolist() == [3, 2]
    assert_equivalent(model, lifted)


def test_constant_inside_if_branch_is_lifted_into_the_branch():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    then.output(then.node("Add", [x, then.constant(np.full([2, 3], 5, np.float32), name="five")]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert result.counters["lifted"] == 1
    then_body, _ = branches(lifted)
    assert [node.op_type for node in then_body.node] == ["Add"]
    assert initializer_names(then_body) == {"five"}
    feeds = [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)]
    assert_equivalent(model, lifted, feeds)


def test_constant_that_is_a_model_output_stays_a_node():
    """A model output is never an initializer: it keeps its Constant producer."""
    b = ModelBuilder()
    x = b.input("x", [2])
    b.output(b.node("Relu", [x], ["y"]))
    b.output(b.constant(np.arange(4, dtype=np.float32), name="k"))
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert not result.changed
    assert ops(lifted)["Constant"] == 1 and not lifted.graph.initializer
    assert output_names(lifted) == ["y", "k"]
    assert_equivalent(model, lifted)


def test_constant_that_is_a_branch_output_stays_a_node():
    b = ModelBuilder()
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    then.output(then.constant(np.ones([2], np.float32)))
    other = b.branch()
    other.output(other.constant(np.zeros([2], np.float32)))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert not result.changed
    assert ops(lifted)["Constant"] == 2
    assert_equivalent(model, lifted, [{"c": np.array(True)}, {"c": np.array(False)}])


def test_string_constant_stays_a_node():
    b = ModelBuilder()
    x = b.input("x", [2])
    b.nodes.append(helper.make_node("Constant", [], ["words"], value_strings=[b"a", b"b"]))
    b.output(b.node("Identity", ["words"]), dtype=np.object_, shape=[2])
    b.output(b.node("Relu", [x]))
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert not result.changed and ops(lifted)["Constant"] == 1
    assert_equivalent(model, lifted)


def test_sparse_constant_keeps_its_value():
    """onnx-graphsurgeon drops sparse_value attributes; the import densifies them, so lifting is exact."""
    b = ModelBuilder()
    x = b.input("x", [4])
    sparse = helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(np.array([3.0], np.float32), "values"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "indices"),
        [4],
    )
    b.nodes.append(helper.make_node("Constant", [], ["k"], sparse_value=sparse))
    b.output(b.node("Add", [x, "k"]))
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert result.counters["lifted"] == 1 and ops(lifted)["Constant"] == 0
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(lifted.graph.initializer[0]), [0, 3, 0, 0])
    assert_equivalent(model, lifted)


def test_custom_domain_constant_is_untouched():
    b = ModelBuilder()
    b.use_domain("com.example")
    x = b.input("x", [2])
    k = b.node("Constant", [], domain="com.example", value=onnx.numpy_helper.from_array(np.ones(2, np.float32)))
    b.output(b.node("Add", [x, k]), dtype=np.float32, shape=[2])
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert not result.changed
    assert ops(lifted)["com.example::Constant"] == 1 and not lifted.graph.initializer


def test_ir_version_3_lists_lifted_initializers_as_inputs():
    """IR 3 requires every initializer to be a graph input too."""
    b = ModelBuilder(opset=9, ir_version=3)
    x = b.input("x", [2, 3])
    b.output(b.node("Add", [x, b.constant(np.ones([3], np.float32), name="k")]))
    model = b.build()

    lifted, result = run_pass(model, "lift-constants")

    assert result.counters["lifted"] == 1 and lifted.ir_version == 3
    assert [value.name for value in lifted.graph.input] == ["x", "k"]
    assert_equivalent(model, lifted)
