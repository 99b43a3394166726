"""fuse-rms-norm: a decomposed RMS normalization (T5, Llama) becomes RMSNormalization (opset 23+).

Graphs are `x -> Identity -> rms norm -> Neg -> y` with x of shape [N, S, 8], N and S dynamic and
run at two sizes each; the nodes the pattern leaves unread go to dead-node elimination.
"""

import numpy as np
import onnx
import pytest
from builder import ModelBuilder, assert_equivalent, ops, output_names, run_pass, top_ops

import onnxslim

SHAPE = ["N", "S", 8]
SIZES = ((2, 5), (3, 1))
IR_VERSION = 11  # opset 23 needs it


def fuse(model):
    fused, result = run_pass(model, "fuse-rms-norm", first=("infer-shapes",))
    cleaned, _ = run_pass(fused, "eliminate-dead-nodes")
    return cleaned, result


def feeds(dtype=np.float32, shape=SHAPE):
    result = []
    for seed, (n, s) in enumerate(SIZES):
        dims = [n if dim == "N" else s if dim == "S" else dim for dim in shape]
        result.append({"x": (np.random.default_rng(seed).standard_normal(dims) * 2).astype(dtype)})
    return result


def rms_norm_model(*, opset=23, dtype=np.float32, square="Pow", divide="Reciprocal", scale=(8,), epsilon=1e-6, shape=SHAPE,
                   axes=(-1,), bias=False):
    """Llama: x · Reciprocal(√(mean(x²) + ε)) · γ; T5 (legacy export): x · (1 / √(·)) · γ; or x / √(·)."""
    b = ModelBuilder(opset=opset, ir_version=IR_VERSION if opset >= 23 else None)
    x = b.input("x", shape, dtype)
    source = b.node("Identity", [x], ["source"])
    squared = b.node("Pow", [source, b.initializer("two", np.array(2.0, dtype))]) if square == "Pow" else b.node("Mul", [source, source])
    variance = b.node("ReduceMean", [squared, b.initializer("axes", np.array(axes, np.int64))])
    std = b.node("Sqrt", [b.node("Add", [variance, b.initializer("eps", np.array(epsilon, dtype))])])
    if divide == "Div":
        y = b.node("Div", [source, std])
    elif divide == "Reciprocal":
        y = b.node("Mul", [source, b.node("Reciprocal", [std])])
    else:
        y = b.node("Mul", [b.node("Div", [b.initializer("one", np.array(1.0, dtype)), std]), source])
    if scale is not None:
        weight = (np.random.default_rng(3).standard_normal(scale) * 0.5 + 1).astype(dtype)
        y = b.node("Mul", [b.initializer("weight", weight), y])
    if bias:
        y = b.node("Add", [y, b.initializer("bias", np.full([8], 0.25, dtype))])
    b.output(b.node("Neg", [y], ["y"]))
    return b


def assert_fused(model, expected=("Identity", "RMSNormalization", "Neg"), dtype=np.float32, shape=SHAPE):
    optimized, result = fuse(model)
    assert result.changed and result.counters["fused"] == 1
    assert top_ops(optimized.graph) == list(expected)
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized, feeds(dtype, shape))
    return optimized


def assert_kept(model, dtype=np.float32):
    optimized, result = fuse(model)
    assert not result.changed
    assert ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds(dtype))


def attributes(model):
    node = next(node for node in model.graph.node if node.op_type == "RMSNormalization")
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("divide", ["Div", "Reciprocal", "OneOver"])
def test_decomposed_rms_norm_becomes_rms_normalization(square, divide):
    optimized = assert_fused(rms_norm_model(square=square, divide=divide).build())
    assert attributes(optimized)["axis"] == -1 and attributes(optimized)["epsilon"] == pytest.approx(1e-6)


def test_without_weight_and_over_two_axes():
    optimized = assert_fused(rms_norm_model(scale=None, shape=["N", 4, 8], axes=(1, 2)).build(), shape=["N", 4, 8])
    assert attributes(optimized)["axis"] == -2


def test_float16_is_fused():
    assert_fused(rms_norm_model(dtype=np.float16, epsilon=1e-3).build(), dtype=np.float16)


def test_a_bias_stays_an_add_after_the_fused_node():
    assert_fused(rms_norm_model(bias=True).build(), expected=("Identity", "RMSNormalization", "Add", "Neg"))


def test_default_pipeline_fuses_and_is_a_fixed_point():
    model = rms_norm_model().build()
    optimized = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds()))
    assert ops(optimized)["RMSNormalization"] == 1 and sum(ops(optimized).values()) == 2
    assert onnxslim.optimize(optimized, verify=onnxslim.VerifyOptions(inputs=feeds())).SerializeToString() \
        == optimized.SerializeToString()


def test_layer_norm_at_opset_23_is_still_layer_normalization():
    """fuse-layer-norm runs first: x − mean is not left for an RMSNormalization of the difference."""
    b = ModelBuilder(opset=23, ir_version=IR_VERSION)
    b.input("x", SHAPE)
    axes = b.initializer("axes", np.array([-1], np.int64))
    centered = b.node("Sub", ["x", b.node("ReduceMean", ["x", axes])])
    variance = b.node("ReduceMean", [b.node("Mul", [centered, centered]), axes])
    std = b.node("Sqrt", [b.node("Add", [variance, b.initializer("eps", np.array(1e-5, np.float32))])])
    b.output(b.node("Div", [centered, std], ["y"]))
    model = b.build()
    optimized = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds()))
    assert top_ops(optimized.graph) == ["LayerNormalization"]


def test_below_opset_23_is_kept():
    assert_kept(rms_norm_model(opset=22).build())


def test_float64_is_kept():
    assert_kept(rms_norm_model(dtype=np.float64).build(), dtype=np.float64)


def test_without_epsilon_is_kept():
    assert_kept(rms_norm_model(epsilon=0.0).build())


def test_square_read_elsewhere_is_kept():
    b = rms_norm_model()
    squared = next(node.output[0] for node in b.nodes if node.op_type == "Pow")
    b.output(squared, np.float32, SHAPE)
    assert_kept(b.build())


def test_weight_varying_along_another_axis_stays_a_mul():
    model = rms_norm_model(scale=(4, 1), shape=["N", 4, 8]).build()
    optimized, result = fuse(model)
    assert result.counters["fused"] == 1
    assert top_ops(optimized.graph) == ["Identity", "RMSNormalization", "Mul", "Neg"]
    assert_equivalent(model, optimized, feeds(shape=["N", 4, 8]))
