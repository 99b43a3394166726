"""fold-scale-into-weights: per-input-channel constant arithmetic before a linear layer folded into it.

Most graphs are `x -> Relu -> <op>(relu, c) -> Conv -> y`; the Relu makes the scaled tensor an
intermediate whose shape comes from shape inference, as in real models.
"""

import numpy as np
import pytest
from builder import ModelBuilder, assert_equivalent, ops, output_names, random, run_pass, top_ops


def fold(model):
    return run_pass(model, "fold-scale-into-weights", first=("infer-shapes",))


def per_channel(shape, seed=5, low=0.5, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def before_conv(op, constant, *, pads=(1, 1, 1, 1), group=1, conv="Conv", input_shape=(1, 4, 5, 5), constant_first=False, outputs=6):
    """x -> Relu -> op(relu, constant) -> conv (4 input channels, `outputs` output channels) -> y."""
    b = ModelBuilder()
    x = b.input("x", list(input_shape))
    relu = b.node("Relu", [x], ["relu"])
    c = b.initializer("c", constant)
    scaled = b.node(op, [c, relu] if constant_first else [relu, c], ["scaled"])
    shape = [outputs, 4 // group, 3, 3] if conv == "Conv" else [4, outputs // group, 3, 3]
    weights = [b.initializer("w", random(shape, seed=1)), b.initializer("bias", random([outputs], seed=2))]
    b.output(b.node(conv, [scaled, *weights], ["y"], pads=list(pads), group=group))
    return b


def assert_folded(model, layer="Conv", counter="folded", first=("Relu",)):
    optimized, result = fold(model)
    assert result.changed and result.counters[counter] == 1
    assert top_ops(optimized.graph) == [*first, layer]
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized)
    return optimized


def assert_kept(model, feeds=None):
    optimized, result = fold(model)
    assert not result.changed
    assert ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds)


# ----------------------------------------------------------------------------- scales


@pytest.mark.parametrize("shape", [[], [1], [4, 1, 1], [1, 4, 1, 1]], ids=str)
@pytest.mark.parametrize("op", ["Mul", "Div"])
def test_scale_before_padded_conv_is_folded(op, shape):
    """Conv(x·c, W) = Conv(x, W·c): the zero padding is zero either way."""
    assert_folded(before_conv(op, per_channel(shape)).build())


def test_scale_on_the_left_is_folded():
    assert_folded(before_conv("Mul", per_channel([4, 1, 1]), constant_first=True).build())


@pytest.mark.parametrize("group", [2, 4])
def test_per_channel_scale_before_grouped_conv_is_folded(group):
    """Input channel ci of group g is W[o, ci − g·Cin/group] for the outputs o of group g."""
    assert_folded(before_conv("Mul", per_channel([1, 4, 1, 1]), group=group, outputs=8).build())


@pytest.mark.parametrize("group", [1, 2])
def test_per_channel_scale_before_conv_transpose_is_folded(group):
    assert_folded(before_conv("Mul", per_channel([4, 1, 1]), conv="ConvTranspose", group=group).build(), layer="ConvTranspose")


def test_per_column_scale_before_matmul_is_folded():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    scaled = b.node("Mul", [b.node("Relu", [x]), b.initializer("c", per_channel([4]))])
    b.output(b.node("MatMul", [scaled, b.initializer("w", random([4, 5], seed=1))], ["y"]))
    assert_folded(b.build(), layer="MatMul")


@pytest.mark.parametrize("transposed_a, transposed_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_scale_of_gemm_inner_dim_is_folded(transposed_a, transposed_b):
    """K is A's last axis, or its first with transA; B's first axis, or its last with transB."""
    b = ModelBuilder()
    x = b.input("x", [4, 3] if transposed_a else [3, 4])
    constant = per_channel([4, 1] if transposed_a else [1, 4])
    scaled = b.node("Mul", [b.node("Relu", [x]), b.initializer("c", constant)])
    weight = b.initializer("w", random([5, 4] if transposed_b else [4, 5], seed=1))
    b.output(b.node("Gemm", [scaled, weight, b.initializer("bias", random([5], seed=2))], ["y"], transA=transposed_a, transB=transposed_b, alpha=0.5))
    assert_folded(b.build(), layer="Gemm")


# ----------------------------------------------------------------------------- shifts


@pytest.mark.parametrize("op, constant_first", [("Add", False), ("Add", True), ("Sub", False), ("Sub", True)])
def test_shift_before_unpadded_conv_becomes_bias(op, constant_first):
    assert_folded(before_conv(op, per_channel([1, 4, 1, 1]), pads=(0, 0, 0, 0), constant_first=constant_first).build())


def test_shift_before_unpadded_grouped_conv_becomes_bias():
    assert_folded(before_conv("Add", per_channel([4, 1, 1]), pads=(0, 0, 0, 0), group=2).build())


def test_shift_before_gemm_becomes_bias():
    b = ModelBuilder()
    x = b.input("x", [3, 4])
    shifted = b.node("Add", [b.node("Relu", [x]), b.initializer("t", per_channel([4]))])
    weight = b.initializer("w", random([5, 4], seed=1))
    b.output(b.node("Gemm", [shifted, weight, b.initializer("bias", random([5], seed=2))], ["y"], transB=1, alpha=0.5, beta=3.0))
    assert_folded(b.build(), layer="Gemm")


def test_layer_norm_affine_before_matmul_with_bias_folds_into_both():
    """LayerNorm's ·γ + β before a MatMul + bias: γ scales the rows of W, β·W joins the bias."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    scaled = b.node("Mul", [b.node("Relu", [x]), b.initializer("gamma", per_channel([4]))])
    shifted = b.node("Add", [scaled, b.initializer("beta", per_channel([4], seed=6))])
    product = b.node("MatMul", [shifted, b.initializer("w", random([4, 5], seed=1))])
    b.output(b.node("Add", [product, b.initializer("bias", random([5], seed=2))], ["y"]))
    model = b.build()

    optimized, result = fold(model)

    assert result.counters["folded"] == 2 and top_ops(optimized.graph) == ["Relu", "MatMul", "Add"]
    assert_equivalent(model, optimized)


def test_scale_then_shift_before_padded_conv_keeps_only_the_shift():
    """(x·s) + t = (x + t/s)·s: the scale folds, the shift stays before the padding."""
    b = ModelBuilder()
    x = b.input("x", [1, 4, 5, 5])
    scaled = b.node("Mul", [b.node("Relu", [x]), b.initializer("s", per_channel([1, 4, 1, 1]))])
    shifted = b.node("Add", [scaled, b.initializer("t", per_channel([1], seed=6, low=-1, high=1))])
    b.output(b.node("Conv", [shifted, b.initializer("w", random([6, 4, 3, 3], seed=1))], ["y"], pads=[1, 1, 1, 1]))
    model = b.build()

    optimized, result = fold(model)

    assert result.counters == {"folded": 0, "reordered": 1, "merged": 0}
    optimized, _ = run_pass(optimized, "eliminate-dead-nodes")  # the Mul is left unread, not disconnected
    assert top_ops(optimized.graph) == ["Relu", "Add", "Conv"]
    assert_equivalent(model, optimized)


# ----------------------------------------------------------------------------- must not fire


def test_shift_before_padded_conv_stays():
    """The border would see the padding's 0, not the shift: not a constant of the output."""
    assert_kept(before_conv("Add", per_channel([1, 4, 1, 1])).build())


def test_shift_before_conv_transpose_stays():
    assert_kept(before_conv("Add", per_channel([4, 1, 1]), pads=(0, 0, 0, 0), conv="ConvTranspose").build())


def test_shift_before_matmul_without_bias_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    shifted = b.node("Add", [b.node("Relu", [x]), b.initializer("t", per_channel([4]))])
    b.output(b.node("MatMul", [shifted, b.initializer("w", random([4, 5], seed=1))], ["y"]))
    assert_kept(b.build())


def test_scale_that_broadcasts_one_channel_to_many_stays():
    """x[1, 1, 5, 5]·c[1, 4, 1, 1] has 4 channels; the Conv cannot read x instead."""
    assert_kept(before_conv("Mul", per_channel([1, 4, 1, 1]), input_shape=(1, 1, 5, 5)).build())


@pytest.mark.parametrize("shape", [[1, 1, 1, 5], [1, 4, 5, 1], [2, 4, 1, 1]], ids=str)
def test_scale_that_varies_spatially_or_grows_stays(shape):
    assert_kept(before_conv("Mul", per_channel(shape)).build())


def test_division_of_a_constant_by_the_input_stays():
    assert_kept(before_conv("Div", per_channel([4, 1, 1]), constant_first=True).build())


def test_scale_read_elsewhere_stays():
    b = before_conv("Mul", per_channel([4, 1, 1]))
    b.output(b.node("Abs", ["scaled"], ["z"]))
    assert_kept(b.build())


def test_scale_of_a_variable_stays():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 5, 5])
    s = b.input("s", [1, 4, 1, 1])
    scaled = b.node("Mul", [b.node("Relu", [x]), s])
    b.output(b.node("Conv", [scaled, b.initializer("w", random([6, 4, 3, 3], seed=1))], ["y"], pads=[1, 1, 1, 1]))
    assert_kept(b.build(), [{"x": random([1, 4, 5, 5]), "s": random([1, 4, 1, 1], seed=2)}])


def test_conv_with_shared_weights_stays():
    b = before_conv("Mul", per_channel([4, 1, 1]))
    b.output(b.node("Conv", ["relu", "w", "bias"], ["other"], pads=[1, 1, 1, 1]))
    assert_kept(b.build())


# ----------------------------------------------------------------------------- MatMul of activations


def scaled_product(first=("Mul", 0.5), second=("Div", 4.0), *, shared=False):
    """MatMul(q ∘ a, k ∘ b) with q, k activations, as ViT's attention scales both q and k by d^-1/4."""
    b = ModelBuilder()
    q, k = b.input("q", [2, 3, 4]), b.input("k", [2, 4, 5])
    operands = []
    for name, tensor, scaling in (("a", q, first), ("b", k, second)):
        if scaling is None:
            operands.append(tensor)
            continue
        op, value = scaling
        operands.append(b.node(op, [tensor, b.initializer(name, np.array([value], np.float32))], [f"{name}_scaled"]))
    b.output(b.node("Softmax", [b.node("MatMul", operands, ["scores"])], ["y"], axis=-1))
    if shared:
        b.output(b.node("Abs", ["a_scaled"], ["z"]))
    return b


def product_feeds():
    return [{"q": random([2, 3, 4], seed), "k": random([2, 4, 5], seed + 1)} for seed in (0, 2)]


def test_scalars_on_both_matmul_operands_become_one_on_its_output():
    model = scaled_product().build()

    optimized, result = fold(model)
    optimized, _ = run_pass(optimized, "eliminate-dead-nodes")

    assert result.counters["merged"] == 1
    assert top_ops(optimized.graph) == ["MatMul", "Mul", "Softmax"]
    assert_equivalent(model, optimized, product_feeds())


@pytest.mark.parametrize("options", [{"second": None}, {"shared": True}], ids=["one-operand-scaled", "scaled-operand-read-elsewhere"])
def test_matmul_with_a_scale_on_one_operand_only_stays(options):
    model = scaled_product(**options).build()
    optimized, result = fold(model)
    assert not result.changed and ops(optimized) == ops(model)
    assert_equivalent(model, optimized, product_feeds())


# ----------------------------------------------------------------------------- a GELU's ½ stays where it is


@pytest.mark.parametrize("divide", [False, True], ids=["times-half", "over-two"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_half_of_a_written_out_gelu_before_matmul_stays(divide, dtype):
    """(x·(1 + erf(x/√2)))·½ → MatMul, below opset 20 (no Gelu op): folding the ½ into the weights
    would hide the GELU from onnxruntime, whose own fusion (Gelu, BiasGelu) made a ViT export
    run 4 % faster than with the ½ folded."""
    b = ModelBuilder(opset=17)
    x = b.input("x", [2, 3, 4], dtype)
    h = b.node("Relu", [x], ["h"])
    scalar = lambda name, value: b.initializer(name, np.array(value, dtype))  # noqa: E731
    erf = b.node("Erf", [b.node("Div", [h, scalar("root2", 1.4142135)])])
    gate = b.node("Add", [erf, scalar("one", 1.0)])
    product = b.node("Mul", [h, gate])
    half = b.node("Div", [product, scalar("two", 2.0)]) if divide else b.node("Mul", [product, scalar("half", 0.5)])
    b.output(b.node("MatMul", [half, b.initializer("w", random([4, 5], seed=1).astype(dtype))], ["y"]))
    model = b.build()

    optimized, result = fold(model)

    assert not result.changed and ops(optimized) == ops(model)
