"""fuse-conv-bn: an inference BatchNormalization folded into the Conv/ConvTranspose/Gemm before it.

Most graphs are `x -> Conv -> BatchNormalization -> Neg -> y`, so the fold rewires a reader; the
statistics are random (variance positive) so a wrong channel or layout shows in the outputs.
"""

import numpy as np
import onnx.numpy_helper
import pytest
from builder import ModelBuilder, assert_equivalent, branches, ops, output_names, random, run_pass, top_ops


def fuse(model):
    return run_pass(model, "fuse-conv-bn", first=("infer-shapes",))


def statistics(b, channels, seed=10, name="bn"):
    """Initializers scale, B, mean, var for a BatchNormalization over `channels` channels."""
    rng = np.random.default_rng(seed)
    values = [
        rng.uniform(0.5, 2.0, channels),
        rng.standard_normal(channels),
        rng.standard_normal(channels),
        rng.uniform(0.1, 3.0, channels),
    ]
    return [b.initializer(f"{name}_{part}", value.astype(np.float32)) for part, value in zip(("scale", "b", "mean", "var"), values)]


def conv_bn(*, bias=True, group=1, op="Conv", opset=17, bn_output=False, **bn_attrs):
    b = ModelBuilder(opset=opset)
    x = b.input("x", [1, 4, 6, 6])
    if op == "Conv":
        weight = random([6, 4 // group, 3, 3], seed=1)
        channels = 6
    else:  # ConvTranspose: [Cin, Cout/group, k, k]
        weight = random([4, 6 // group, 3, 3], seed=1)
        channels = 6
    inputs = [x, b.initializer("w", weight)] + ([b.initializer("bias", random([channels], seed=2))] if bias else [])
    conv = b.node(op, inputs, ["conv"], pads=[1, 1, 1, 1], group=group)
    bn = b.node("BatchNormalization", [conv, *statistics(b, channels)], ["bn"] if bn_output else 1, epsilon=1e-3, **bn_attrs)
    b.output(bn if bn_output else b.node("Neg", [bn], ["y"]))
    return b


def assert_fused(model, layer="Conv"):
    optimized, result = fuse(model)
    assert result.changed and result.counters["fused"] == 1
    assert ops(optimized)["BatchNormalization"] == 0 and ops(optimized)[layer] == 1
    node = next(node for node in optimized.graph.node if node.op_type == layer)
    assert len(node.input) == 3 and node.input[2]  # a bias, created if absent
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized)
    return optimized


def assert_kept(model, feeds=None):
    optimized, result = fuse(model)
    assert not result.changed and result.counters["fused"] == 0
    assert ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds)


# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize("bias", [True, False], ids=["with-bias", "without-bias"])
def test_bn_after_conv_is_folded(bias):
    optimized = assert_fused(conv_bn(bias=bias).build())
    neg = next(node for node in optimized.graph.node if node.op_type == "Neg")
    assert list(neg.input) == ["conv"]  # the reader now reads the Conv


def test_bn_after_grouped_conv_is_folded():
    assert_fused(conv_bn(group=2).build())


def test_bn_after_depthwise_conv_is_folded():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 6, 6])
    conv = b.node("Conv", [x, b.initializer("w", random([4, 1, 3, 3], seed=1))], pads=[1, 1, 1, 1], group=4)
    b.output(b.node("Neg", [b.node("BatchNormalization", [conv, *statistics(b, 4)])], ["y"]))
    assert_fused(b.build())


@pytest.mark.parametrize("group", [1, 2])
def test_bn_after_conv_transpose_scales_its_output_channels(group):
    """ConvTranspose weights are [Cin, Cout/group, k...]: output channel g·Cout/group + j is W[:, j] of group g."""
    assert_fused(conv_bn(op="ConvTranspose", group=group).build(), layer="ConvTranspose")


def test_folded_weights_match_the_formula():
    """W' = W·s, b' = (b − μ)·s + β with s = γ/√(var + ε), computed in float64, stored in float32."""
    model = conv_bn().build()
    optimized, _ = fuse(model)
    given = {tensor.name: onnx.numpy_helper.to_array(tensor).astype(np.float64) for tensor in model.graph.initializer}
    scale = given["bn_scale"] / np.sqrt(given["bn_var"] + 1e-3)
    conv = next(node for node in optimized.graph.node if node.op_type == "Conv")
    folded = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in optimized.graph.initializer}
    assert folded[conv.input[1]].dtype == np.float32
    np.testing.assert_allclose(folded[conv.input[1]], given["w"] * scale[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(folded[conv.input[2]], (given["bias"] - given["bn_mean"]) * scale + given["bn_b"], rtol=1e-5, atol=1e-6)


def test_bn_producing_a_graph_output_keeps_the_output_name():
    model = conv_bn(bn_output=True).build()
    optimized = assert_fused(model)
    assert top_ops(optimized.graph) == ["Conv"] and list(optimized.graph.node[0].output) == ["bn"]


@pytest.mark.parametrize("transposed", [0, 1])
def test_bn_after_gemm_is_folded(transposed):
    b = ModelBuilder()
    x = b.input("x", [3, 4])
    weight = random([5, 4] if transposed else [4, 5], seed=1)
    gemm = b.node("Gemm", [x, b.initializer("w", weight), b.initializer("c", random([5], seed=2))], transB=transposed, beta=0.5)
    b.output(b.node("Neg", [b.node("BatchNormalization", [gemm, *statistics(b, 5)])], ["y"]))
    assert_fused(b.build(), layer="Gemm")


def test_bn_at_opset_9_is_folded():
    """Opset 9 BatchNormalization (with the `spatial` attribute defaulting to 1)."""
    b = conv_bn(opset=9)
    assert_fused(b.build())


def test_bn_inside_a_branch_is_folded():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 6, 6])
    condition = b.input("c", [], np.bool_)
    weight = b.initializer("w", random([6, 4, 3, 3], seed=1))
    stats = statistics(b, 6)
    then = b.branch()
    then.output(then.node("Neg", [then.node("BatchNormalization", [then.node("Conv", [x, weight], pads=[1, 1, 1, 1]), *stats])]))
    other = b.branch()
    other.output(other.node("Conv", [x, b.initializer("w2", random([6, 4, 3, 3], seed=3))], pads=[1, 1, 1, 1]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters["fused"] == 1 and ops(optimized)["BatchNormalization"] == 0
    assert top_ops(branches(optimized)[0]) == ["Conv", "Neg"]
    assert_equivalent(model, optimized, [{"x": random([1, 4, 6, 6]), "c": np.array(flag)} for flag in (True, False)])


# ----------------------------------------------------------------------------- must not fire


def test_bn_after_a_conv_whose_output_is_also_read_elsewhere_stays():
    b = conv_bn()
    b.output(b.node("Abs", ["conv"], ["z"]))
    assert_kept(b.build())


def test_bn_after_a_conv_whose_output_is_a_graph_output_stays():
    b = conv_bn()
    b.output("conv")
    assert_kept(b.build())


def test_bn_with_a_non_constant_scale_stays():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 6, 6])
    gamma = b.input("gamma", [6])
    conv = b.node("Conv", [x, b.initializer("w", random([6, 4, 3, 3], seed=1))], pads=[1, 1, 1, 1])
    _, beta, mean, var = statistics(b, 6)
    b.output(b.node("Neg", [b.node("BatchNormalization", [conv, gamma, beta, mean, var])], ["y"]))
    assert_kept(b.build(), [{"x": random([1, 4, 6, 6]), "gamma": np.ones(6, np.float32)}])


def test_bn_whose_running_statistics_are_read_stays():
    """training_mode=1 normalizes with the batch's statistics and outputs running ones."""
    b = ModelBuilder(opset=15)
    x = b.input("x", [2, 4, 6, 6])
    conv = b.node("Conv", [x, b.initializer("w", random([6, 4, 3, 3], seed=1))], pads=[1, 1, 1, 1])
    y, running_mean, _ = b.node("BatchNormalization", [conv, *statistics(b, 6)], 3, training_mode=1)
    b.output(b.node("Neg", [y], ["y"]))
    b.output(running_mean)
    model = b.build()

    optimized, result = fuse(model)

    assert not result.changed and ops(optimized) == ops(model)


def test_bn_after_a_non_linear_op_stays():
    b = ModelBuilder()
    x = b.input("x", [1, 6, 6, 6])
    b.output(b.node("Neg", [b.node("BatchNormalization", [b.node("Relu", [x]), *statistics(b, 6)])], ["y"]))
    assert_kept(b.build())


def test_bn_after_a_conv_with_shared_weights_stays():
    """Folding would need a second copy of the weights: the model would grow."""
    b = conv_bn(bias=False)
    b.output(b.node("Conv", ["x", "w"], ["other"], pads=[1, 1, 1, 1]))
    assert_kept(b.build())


def test_bn_after_a_conv_with_non_constant_weights_stays():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 6, 6])
    weight = b.input("w", [6, 4, 3, 3])
    conv = b.node("Conv", [x, weight], pads=[1, 1, 1, 1])
    b.output(b.node("Neg", [b.node("BatchNormalization", [conv, *statistics(b, 6)])], ["y"]))
    assert_kept(b.build(), [{"x": random([1, 4, 6, 6]), "w": random([6, 4, 3, 3], seed=1)}])


def test_bn_after_a_custom_domain_conv_is_untouched():
    b = ModelBuilder()
    b.use_domain("com.example")
    x = b.input("x", [1, 4, 6, 6])
    conv = b.node("Conv", [x, b.initializer("w", random([6, 4, 3, 3], seed=1))], domain="com.example")
    b.output(b.node("BatchNormalization", [conv, *statistics(b, 6)]), np.float32, [1, 6, 4, 4])
    model = b.build(check=False)

    optimized, result = run_pass(model, "fuse-conv-bn")

    assert not result.changed and ops(optimized) == ops(model)
