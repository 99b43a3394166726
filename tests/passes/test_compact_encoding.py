"""drop-default-attributes and shorten-names: a smaller file, the same computation."""

import numpy as np
import onnx
from builder import ModelBuilder, assert_equivalent, output_names, random, run_pass


def attributes(model, op):
    node = next(node for node in model.graph.node if node.op_type == op)
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def conv_net(*, weight_through_int8=False, opset=17, **conv_attrs):
    """x -> Conv(w) -> HardSigmoid -> MaxPool -> y; the weight optionally stored as Cast(int8) * scale."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", [1, 3, 8, 8])
    if weight_through_int8:
        stored = b.initializer("weight_stored_as_int8", np.arange(-54, 54, dtype=np.int8).reshape(4, 3, 3, 3))
        cast = b.node("Cast", [stored], ["weight_cast"], to=onnx.TensorProto.FLOAT)
        weight = b.node("Mul", [cast, b.initializer("weight_scale", np.full([4, 1, 1, 1], 0.01, np.float32))], ["weight"])
    else:
        weight = b.initializer("weight", random([4, 3, 3, 3], seed=1))
    conv = b.node("Conv", [x, weight], ["a_rather_long_exporter_name/conv/Conv_output_0"], **conv_attrs)
    sigmoid = b.node("HardSigmoid", [conv], ["another_long_name/HardSigmoid_output_0"], alpha=0.2, beta=0.5)
    b.output(b.node("MaxPool", [sigmoid], ["y"], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 0, 0]))
    return b.build()


def test_defaults_are_left_out():
    model = conv_net(kernel_shape=[3, 3], strides=[1, 1], dilations=[1, 1], pads=[0, 0, 0, 0], group=1)
    compact, result = run_pass(model, "drop-default-attributes")
    assert result.counters["dropped"] == 5 + 2 + 2  # Conv: all five; HardSigmoid: alpha, beta; MaxPool: strides, pads
    assert attributes(compact, "Conv") == {}
    assert attributes(compact, "HardSigmoid") == {}
    assert attributes(compact, "MaxPool") == {"kernel_shape": [2, 2]}  # a pool has no weight to read it from
    assert compact.ByteSize() < model.ByteSize()
    assert_equivalent(model, compact)


def test_kernel_shape_is_read_through_int8_storage():
    model = conv_net(weight_through_int8=True, kernel_shape=[3, 3])
    compact, _ = run_pass(model, "drop-default-attributes")
    assert "kernel_shape" not in attributes(compact, "Conv")
    assert_equivalent(model, compact)


def test_values_that_are_not_defaults_stay():
    model = conv_net(kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1])
    model.graph.node[1].attribute[0].f = 1 / 6  # HardSigmoid alpha as Paddle writes it (beta stays 0.5)
    compact, _ = run_pass(model, "drop-default-attributes")
    assert attributes(compact, "Conv") == {"strides": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}
    assert set(attributes(compact, "HardSigmoid")) == {"alpha"}
    assert_equivalent(model, compact)


def test_softmax_axis_default_follows_the_opset():
    for opset, axis, dropped in [(11, 1, True), (11, -1, False), (13, -1, True), (13, 1, False)]:
        b = ModelBuilder(opset=opset)
        b.output(b.node("Softmax", [b.input("x", [2, 5])], ["y"], axis=axis))
        model = b.build()
        compact, _ = run_pass(model, "drop-default-attributes")
        assert ("axis" not in attributes(compact, "Softmax")) == dropped, (opset, axis)
        assert_equivalent(model, compact)


def test_internal_names_get_short_and_the_interface_keeps_its_names():
    model = conv_net(weight_through_int8=True, kernel_shape=[3, 3])
    compact, result = run_pass(model, "shorten-names")
    assert result.counters["renamed"] == 6  # three initializers, three activations
    names = {name for node in compact.graph.node for name in list(node.input) + list(node.output)}
    assert max(len(name) for name in names - {"x", "y"}) == 1
    assert [tensor.name for tensor in compact.graph.input] == ["x"] and output_names(compact) == ["y"]
    assert compact.ByteSize() < model.ByteSize()
    assert "weight_stored_as_int8" in {tensor.name for tensor in model.graph.initializer}  # the source is untouched
    assert_equivalent(model, compact)


def test_a_short_name_never_collides_with_a_kept_one():
    # Tensors already named "0" and "1" sit later in the graph than the long ones renamed first.
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    first = b.node("Relu", [x], ["a_long_name"])
    second = b.node("Neg", [first], ["0"])
    third = b.node("Abs", [second], ["another_long_name"])
    b.output(b.node("Relu", [third], ["1"]))
    model = b.build()
    compact, _ = run_pass(model, "shorten-names")
    outputs = [name for node in compact.graph.node for name in node.output]
    assert len(set(outputs)) == len(outputs) == 4 and outputs[-1] == "1"
    onnx.checker.check_model(compact, full_check=True)
    assert_equivalent(model, compact)
