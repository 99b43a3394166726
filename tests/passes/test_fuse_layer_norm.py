"""fuse-layer-norm: a decomposed layer normalization becomes LayerNormalization (opset 17+).

Graphs are `x -> Identity -> layer norm -> Neg -> y` with x of shape [N, S, 8], N and S dynamic
and run at two sizes each; the nodes the pattern leaves unread go to dead-node elimination.
"""

import numpy as np
import onnx
import pytest
from builder import ModelBuilder, assert_equivalent, ops, output_names, run_pass, top_ops

import onnxslim

SHAPE = ["N", "S", 8]
SIZES = ((2, 5), (3, 1))


def fuse(model):
    fused, result = run_pass(model, "fuse-layer-norm", first=("infer-shapes",))
    cleaned, _ = run_pass(fused, "eliminate-dead-nodes")
    return cleaned, result


def feeds(dtype=np.float32, shape=SHAPE):
    result = []
    for seed, (n, s) in enumerate(SIZES):
        dims = [n if dim == "N" else s if dim == "S" else dim for dim in shape]
        rng = np.random.default_rng(seed)
        result.append({"x": (rng.standard_normal(dims) * 2 + 0.5).astype(dtype)})
    return result


def mean(b, tensor, axes, opset, **attrs):
    if opset >= 18:
        return b.node("ReduceMean", [tensor, b.initializer(b.fresh("axes"), np.array(axes, np.int64))], **attrs)
    return b.node("ReduceMean", [tensor], axes=axes, **attrs)


def layer_norm_model(
    *,
    opset=17,
    dtype=np.float32,
    axes=(-1,),
    square="Pow",
    divide="Div",
    scale=(8,),
    bias=(8,),
    epsilon=1e-5,
    shape=SHAPE,
    eps_first=False,
):
    """x − mean, squared, averaged, + ε, √, divided (three ways), · scale, + bias."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", shape, dtype)
    source = b.node("Identity", [x], ["source"])
    rng = np.random.default_rng(7)
    centered = b.node("Sub", [source, mean(b, source, list(axes), opset)])
    if square == "Pow":
        squared = b.node("Pow", [centered, b.initializer("two", np.array(2.0, dtype))])
    else:
        squared = b.node("Mul", [centered, centered])
    eps = b.initializer("eps", np.array(epsilon, dtype))
    variance = mean(b, squared, list(axes), opset)
    std = b.node("Sqrt", [b.node("Add", [eps, variance] if eps_first else [variance, eps])])
    if divide == "Div":
        y = b.node("Div", [centered, std])
    elif divide == "Reciprocal":
        y = b.node("Mul", [b.node("Reciprocal", [std]), centered])
    else:
        y = b.node("Mul", [centered, b.node("Div", [b.initializer("one", np.array(1.0, dtype)), std])])
    if scale is not None:
        y = b.node("Mul", [y, b.initializer("gamma", (rng.standard_normal(scale) * 0.5 + 1).astype(dtype))])
    if bias is not None:
        y = b.node("Add", [b.initializer("beta", (rng.standard_normal(bias) * 0.1).astype(dtype)), y])
    b.output(b.node("Neg", [y], ["y"]))
    return b


def layer_norm_node(model):
    return next(node for node in model.graph.node if node.op_type == "LayerNormalization")


def attributes(node):
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def assert_fused(model, dtype=np.float32, shape=SHAPE):
    optimized, result = fuse(model)
    assert result.changed and result.counters["fused"] == 1
    assert top_ops(optimized.graph) == ["Identity", "LayerNormalization", "Neg"]
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized, feeds(dtype, shape))
    return optimized


def assert_kept(model, dtype=np.float32, shape=SHAPE):
    optimized, result = fuse(model)
    assert not result.changed
    assert ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds(dtype, shape))


# ----------------------------------------------------------------------------- fused


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("divide", ["Div", "Reciprocal", "OneOver"])
def test_decomposed_layer_norm_becomes_layer_normalization(opset, square, divide):
    optimized = assert_fused(layer_norm_model(opset=opset, square=square, divide=divide).build())
    node = layer_norm_node(optimized)
    assert attributes(node)["axis"] == -1 and attributes(node)["epsilon"] == pytest.approx(1e-5)
    assert len(node.input) == 3


def test_epsilon_added_first_and_positive_axes():
    assert_fused(layer_norm_model(axes=(2,), eps_first=True).build())


def test_two_trailing_axes_give_axis_minus_2_and_a_matrix_scale():
    optimized = assert_fused(layer_norm_model(shape=["N", 4, 8], axes=(-2, -1), scale=(4, 8), bias=(1, 8)).build(), shape=["N", 4, 8])
    node = layer_norm_node(optimized)
    assert attributes(node)["axis"] == -2
    scale = next(t for t in optimized.graph.initializer if t.name == node.input[1])
    assert list(scale.dims) == [4, 8]


def test_without_scale_and_bias_the_scale_is_ones_and_the_bias_omitted():
    optimized = assert_fused(layer_norm_model(scale=None, bias=None).build())
    node = layer_norm_node(optimized)
    assert len(node.input) == 2
    scale = next(t for t in optimized.graph.initializer if t.name == node.input[1])
    assert np.array_equal(onnx.numpy_helper.to_array(scale), np.ones(8, np.float32))


def test_bias_without_scale_and_scalar_scale():
    assert_fused(layer_norm_model(scale=None).build())
    assert_fused(layer_norm_model(scale=(1, 1, 1), bias=()).build())


def test_float16_layer_norm_is_fused():
    """LayerNormalization computes float16 statistics in float32: within float16 rounding of the original."""
    assert_fused(layer_norm_model(dtype=np.float16, epsilon=1e-3).build(), dtype=np.float16)


def test_layer_norm_producing_a_graph_output_keeps_the_output_name():
    b = layer_norm_model()
    b.outputs.clear()
    b.nodes.pop()  # the Neg
    last = b.nodes[-1].output[0]
    b.output(last)
    model = b.build()
    optimized, _ = fuse(model)
    assert top_ops(optimized.graph) == ["Identity", "LayerNormalization"] and list(optimized.graph.node[1].output) == [last]
    assert_equivalent(model, optimized, feeds())


def test_layer_norm_inside_an_if_branch_is_fused():
    inner = layer_norm_model()
    b = ModelBuilder(opset=17)
    b.input("x", SHAPE)
    b.input("flag", [], np.bool_)
    then_branch, else_branch = b.branch(), b.branch()
    then_branch.nodes.extend(inner.nodes)
    then_branch.initializers.extend(inner.initializers)
    then_branch.output("y", np.float32, SHAPE)
    else_branch.output(else_branch.node("Neg", ["x"]), np.float32, SHAPE)
    b.output(b.if_node("flag", then_branch, else_branch), np.float32, SHAPE)
    model = b.build()
    optimized = onnxslim.optimize(
        model, simplify=onnxslim.SimplifyOptions(passes="infer-shapes,fuse-layer-norm,eliminate-dead-nodes"), verify=False
    )
    assert ops(optimized)["LayerNormalization"] == 1 and ops(optimized)["ReduceMean"] == 0
    for flag in (True, False):
        assert_equivalent(model, optimized, [{**feed, "flag": np.array(flag)} for feed in feeds()])


def test_default_pipeline_fuses_and_is_a_fixed_point():
    model = layer_norm_model().build()
    optimized = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds()))
    assert ops(optimized)["LayerNormalization"] == 1 and sum(ops(optimized).values()) == 2  # the Identity goes too
    assert onnxslim.optimize(optimized, verify=onnxslim.VerifyOptions(inputs=feeds())).SerializeToString() \
        == optimized.SerializeToString()


# ----------------------------------------------------------------------------- kept


def test_below_opset_17_is_kept():
    assert_kept(layer_norm_model(opset=16).build())


@pytest.mark.parametrize("dtype", [np.float64])
def test_float64_is_kept(dtype):
    """The schema computes the statistics in float32: coarser than the original's float64 math."""
    assert_kept(layer_norm_model(dtype=dtype).build(), dtype=dtype)


def test_a_leading_axis_is_kept():
    assert_kept(layer_norm_model(shape=["N", 4, 8], axes=(1,), scale=None, bias=None).build(), shape=["N", 4, 8])


def test_different_axes_of_mean_and_variance_are_kept():
    b = layer_norm_model(shape=["N", 4, 8], axes=(-2, -1), scale=None, bias=None)
    variance = next(node for node in b.nodes if node.op_type == "ReduceMean" and node.input[0] != "source")
    del variance.attribute[:]
    variance.attribute.append(onnx.helper.make_attribute("axes", [-1]))
    assert_kept(b.build(), shape=["N", 4, 8])


def test_keepdims_0_is_kept():
    """x[i, j] − mean(x[j, :]) on an [8, 8] x: a mean without keepdims broadcasts along the other axis."""
    b = layer_norm_model(shape=[8, 8], scale=None, bias=None)
    for node in b.nodes:
        if node.op_type == "ReduceMean":
            node.attribute.append(onnx.helper.make_attribute("keepdims", 0))
    assert_kept(b.build(), shape=[8, 8])


@pytest.mark.parametrize(
    "scale, why",
    [((4, 1), "varies along axis 1, which is not normalized"), ((1, 1, 1, 8), "makes the output rank 4"), ((4, 8), "broadcasts [N, 4, 1] up")],
)
def test_scale_that_is_not_per_normalized_element_stays_a_mul(scale, why):
    shape = ["N", 4, 1] if scale == (4, 8) else ["N", 4, 8]
    model = layer_norm_model(shape=shape, scale=scale, bias=None).build()
    optimized, result = fuse(model)
    assert result.counters["fused"] == 1, why
    assert top_ops(optimized.graph) == ["Identity", "LayerNormalization", "Mul", "Neg"]
    assert_equivalent(model, optimized, feeds(shape=shape))


def test_without_epsilon_is_kept():
    """Without ε a constant row is 0/0 = NaN in the original; the fused kernel need not say so."""
    assert_kept(layer_norm_model(epsilon=0.0).build())


def test_centered_value_read_elsewhere_is_kept():
    b = layer_norm_model()
    centered = next(node.output[0] for node in b.nodes if node.op_type == "Sub")
    b.output(centered, np.float32, SHAPE)
    assert_kept(b.build())


def test_dynamic_normalized_dim_is_kept():
    assert_kept(layer_norm_model(shape=["N", "S", "S"], scale=None, bias=None).build(), shape=["N", "S", "S"])


def test_mean_of_another_tensor_is_kept():
    b = layer_norm_model()
    sub = next(node for node in b.nodes if node.op_type == "Sub")
    sub.input[0] = "x"  # x − mean(Identity(x)): the same values, but not the same tensor
    assert_kept(b.build())
