"""fuse-conv-affine: per-channel constant arithmetic after a Conv/ConvTranspose/Gemm/MatMul folded into it.

Most graphs are `x -> Conv -> <op>(conv, c) -> Neg -> y`; the Conv output is [1, 6, 5, 5], so a
constant may broadcast along the channel axis only ([6, 1, 1], [1, 6, 1, 1], scalars).
"""

import numpy as np
import onnx.numpy_helper
import pytest
from builder import ModelBuilder, assert_equivalent, ops, output_names, random, run_pass, top_ops


def fuse(model):
    return run_pass(model, "fuse-conv-affine", first=("infer-shapes",))


def conv_then(op, constant, *, constant_first=False, bias=True, conv="Conv", group=1):
    """x[1, 4, 5, 5] -> conv (6 output channels) -> op(conv, constant) -> Neg -> y."""
    b = ModelBuilder()
    x = b.input("x", [1, 4, 5, 5])
    shape = [6, 4 // group, 3, 3] if conv == "Conv" else [4, 6 // group, 3, 3]
    inputs = [x, b.initializer("w", random(shape, seed=1))] + ([b.initializer("bias", random([6], seed=2))] if bias else [])
    produced = b.node(conv, inputs, ["conv"], pads=[1, 1, 1, 1], group=group)
    c = b.initializer("c", constant)
    result = b.node(op, [c, produced] if constant_first else [produced, c], ["affine"])
    b.output(b.node("Neg", [result], ["y"]))
    return b


def assert_fused(model, folded=1, layer="Conv"):
    optimized, result = fuse(model)
    assert result.changed and result.counters["fused"] == folded
    assert top_ops(optimized.graph) == [layer, "Neg"]
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized)
    return optimized


def assert_kept(model, feeds=None):
    optimized, result = fuse(model)
    assert not result.changed
    assert ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds)


def per_channel(shape, seed=5, low=0.5, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# ----------------------------------------------------------------------------- Conv


@pytest.mark.parametrize("shape", [[6, 1, 1], [1, 6, 1, 1], [], [1], [1, 1, 1, 1]], ids=str)
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_per_channel_constant_after_conv_is_folded(op, shape):
    assert_fused(conv_then(op, per_channel(shape)).build())


@pytest.mark.parametrize("op", ["Add", "Mul", "Sub"])
def test_constant_on_the_left_is_folded(op):
    """c + y, c·y, and c − y = y·(−1) + c."""
    assert_fused(conv_then(op, per_channel([6, 1, 1]), constant_first=True).build())


def test_add_after_a_conv_without_bias_creates_the_bias():
    optimized = assert_fused(conv_then("Add", per_channel([1, 6, 1, 1]), bias=False).build())
    assert len(optimized.graph.node[0].input) == 3


def test_mul_then_add_after_conv_fold_in_one_run():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 5, 5])
    conv = b.node("Conv", [x, b.initializer("w", random([6, 4, 3, 3], seed=1))], pads=[1, 1, 1, 1])
    scaled = b.node("Mul", [b.initializer("s", per_channel([6, 1, 1])), conv])
    shifted = b.node("Add", [scaled, b.initializer("t", per_channel([1], seed=6))])
    b.output(b.node("Relu", [shifted], ["y"]))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters["fused"] == 2 and top_ops(optimized.graph) == ["Conv", "Relu"]
    assert_equivalent(model, optimized)


def test_affine_producing_a_graph_output_keeps_the_output_name():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 5, 5])
    conv = b.node("Conv", [x, b.initializer("w", random([6, 4, 3, 3], seed=1))], ["conv"], pads=[1, 1, 1, 1])
    b.output(b.node("Mul", [conv, b.initializer("s", per_channel([6, 1, 1]))], ["y"]))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters["fused"] == 1 and top_ops(optimized.graph) == ["Conv"]
    assert list(optimized.graph.node[0].output) == ["y"] and output_names(optimized) == ["y"]
    assert_equivalent(model, optimized)


@pytest.mark.parametrize("group", [1, 2])
def test_per_channel_mul_after_conv_transpose_is_folded(group):
    """ConvTranspose weights are [Cin, Cout/group, k...]: the scale of output channel o is not W[o]."""
    assert_fused(conv_then("Mul", per_channel([6, 1, 1]), conv="ConvTranspose", group=group).build(), layer="ConvTranspose")


def test_per_channel_add_after_grouped_conv_is_folded():
    assert_fused(conv_then("Add", per_channel([6, 1, 1]), group=2).build())


# ----------------------------------------------------------------------------- Gemm and MatMul


@pytest.mark.parametrize("transposed", [0, 1])
@pytest.mark.parametrize("op, shape", [("Mul", [5]), ("Add", [1, 5]), ("Div", []), ("Sub", [5])])
def test_per_column_constant_after_gemm_is_folded(op, shape, transposed):
    b = ModelBuilder()
    x = b.input("x", [3, 4])
    weight = b.initializer("w", random([5, 4] if transposed else [4, 5], seed=1))
    gemm = b.node("Gemm", [x, weight, b.initializer("c", random([5], seed=2))], transB=transposed, alpha=0.5, beta=2.0)
    b.output(b.node("Neg", [b.node(op, [gemm, b.initializer("k", per_channel(shape))])], ["y"]))
    assert_fused(b.build(), layer="Gemm")


def test_matmul_of_a_matrix_plus_bias_becomes_gemm():
    b = ModelBuilder()
    x = b.input("x", [3, 4])
    product = b.node("MatMul", [x, b.initializer("w", random([4, 5], seed=1))])
    biased = b.node("Add", [product, b.initializer("bias", random([5], seed=2))])
    b.output(b.node("Neg", [b.node("Mul", [biased, b.initializer("s", per_channel([5]))])], ["y"]))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters == {"fused": 1, "gemm": 1, "moved": 0}
    assert top_ops(optimized.graph) == ["Gemm", "Neg"]
    assert_equivalent(model, optimized)


def test_mul_after_batched_matmul_and_bias_is_folded_into_both():
    """A rank-3 MatMul cannot be a Gemm; its bias Add stays and takes the scale."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    product = b.node("MatMul", [x, b.initializer("w", random([4, 5], seed=1))])
    biased = b.node("Add", [product, b.initializer("bias", random([5], seed=2))])
    b.output(b.node("Neg", [b.node("Mul", [biased, b.initializer("s", per_channel([1, 1, 5]))])], ["y"]))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters == {"fused": 1, "gemm": 0, "moved": 0}
    assert top_ops(optimized.graph) == ["MatMul", "Add", "Neg"]
    assert_equivalent(model, optimized)


def test_mul_after_matmul_without_bias_scales_its_columns():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    product = b.node("MatMul", [x, b.initializer("w", random([4, 5], seed=1))])
    b.output(b.node("Neg", [b.node("Mul", [product, b.initializer("s", per_channel([5]))])], ["y"]))
    assert_fused(b.build(), layer="MatMul")


# ----------------------------------------------------------------------------- must not fire


def test_constant_along_the_width_axis_stays():
    """[6] right-aligns with the last axis (width 6 here), not the channels."""
    b = ModelBuilder()
    x = b.input("x", [1, 4, 6, 6])
    conv = b.node("Conv", [x, b.initializer("w", random([6, 4, 3, 3], seed=1))], pads=[1, 1, 1, 1])
    b.output(b.node("Neg", [b.node("Mul", [conv, b.initializer("s", per_channel([6]))])], ["y"]))
    assert_kept(b.build())


@pytest.mark.parametrize("shape", [[2, 6, 1, 1], [1, 1, 6, 1, 1], [1, 6, 5, 5]], ids=str)
def test_constant_that_grows_or_varies_spatially_stays(shape):
    assert_kept(conv_then("Add", per_channel(shape)).build())


def test_division_of_a_constant_by_the_conv_stays():
    assert_kept(conv_then("Div", per_channel([6, 1, 1]), constant_first=True).build())


def test_affine_of_a_conv_output_read_elsewhere_stays():
    b = conv_then("Mul", per_channel([6, 1, 1]))
    b.output(b.node("Abs", ["conv"], ["z"]))
    assert_kept(b.build())


def test_add_of_a_variable_stays():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 5, 5])
    shift = b.input("t", [1, 6, 1, 1])
    conv = b.node("Conv", [x, b.initializer("w", random([6, 4, 3, 3], seed=1))], pads=[1, 1, 1, 1])
    b.output(b.node("Neg", [b.node("Add", [conv, shift])], ["y"]))
    assert_kept(b.build(), [{"x": random([1, 4, 5, 5]), "t": random([1, 6, 1, 1], seed=3)}])


def test_conv_with_shared_weights_stays():
    b = conv_then("Mul", per_channel([6, 1, 1]))
    b.output(b.node("Conv", ["x", "w", "bias"], ["other"], pads=[1, 1, 1, 1]))
    assert_kept(b.build())


def test_add_after_batched_matmul_stays_a_matmul():
    """MatMul + bias on a rank-3 input is already as small as it gets."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    product = b.node("MatMul", [x, b.initializer("w", random([4, 5], seed=1))])
    b.output(b.node("Neg", [b.node("Add", [product, b.initializer("bias", random([5], seed=2))])], ["y"]))
    assert_kept(b.build())


def test_integer_matmul_stays():
    b = ModelBuilder()
    x = b.input("x", [3, 4], np.int64)
    product = b.node("MatMul", [x, b.initializer("w", np.ones([4, 5], np.int64))])
    b.output(b.node("Neg", [b.node("Add", [product, b.initializer("bias", np.arange(5, dtype=np.int64))])], ["y"]))
    assert_kept(b.build(), [{"x": np.arange(12, dtype=np.int64).reshape(3, 4)}])


# ----------------------------------------------------------------------------- BatchNormalization


def batch_norm_then(*constants, ops_=("Mul", "Add"), width=5):
    """x[1, 6, 4, width] -> Relu -> BatchNormalization -> ops_[i](·, constants[i])... -> Relu -> y."""
    b = ModelBuilder()
    x = b.input("x", [1, 6, 4, width])
    rng = np.random.default_rng(7)
    statistics = [rng.uniform(0.5, 2, 6), rng.standard_normal(6), rng.standard_normal(6), rng.uniform(0.1, 3, 6)]
    names = [b.initializer(name, value.astype(np.float32)) for name, value in zip(("gamma", "beta", "mean", "var"), statistics)]
    value = b.node("BatchNormalization", [b.node("Relu", [x]), *names], ["bn"])
    for index, (op, constant) in enumerate(zip(ops_, constants)):
        value = b.node(op, [value, b.initializer(f"c{index}", constant)])
    b.output(b.node("Relu", [value], ["y"]))
    return b


def test_mul_and_add_after_batch_norm_go_into_its_parameters():
    """BN(x)·s + t is a BatchNormalization with γ·s and β·s + t (pre-activation DenseNet blocks)."""
    model = batch_norm_then(per_channel([6, 1, 1]), per_channel([1, 6, 1, 1], seed=6)).build()

    optimized, result = fuse(model)

    assert result.counters["fused"] == 2 and top_ops(optimized.graph) == ["Relu", "BatchNormalization", "Relu"]
    assert_equivalent(model, optimized)


@pytest.mark.parametrize("op", ["Sub", "Div"])
def test_scalar_arithmetic_after_batch_norm_goes_into_its_parameters(op):
    model = batch_norm_then(per_channel([]), ops_=(op,)).build()
    optimized, result = fuse(model)
    assert result.counters["fused"] == 1 and top_ops(optimized.graph) == ["Relu", "BatchNormalization", "Relu"]
    assert_equivalent(model, optimized)


def test_constant_along_the_width_after_batch_norm_stays():
    """[6] right-aligns with the width (6 here), not BN's channels."""
    assert_kept(batch_norm_then(per_channel([6]), ops_=("Mul",), width=6).build())


def test_arithmetic_after_a_training_batch_norm_stays():
    b = ModelBuilder(opset=15)
    x = b.input("x", [2, 6, 4, 5])
    rng = np.random.default_rng(7)
    statistics = [b.initializer(name, rng.uniform(0.5, 2, 6).astype(np.float32)) for name in ("gamma", "beta", "mean", "var")]
    y, running_mean, _ = b.node("BatchNormalization", [x, *statistics], 3, training_mode=1)
    b.output(b.node("Mul", [y, b.initializer("s", per_channel([6, 1, 1]))], ["y"]))
    b.output(running_mean)
    model = b.build()
    optimized, result = fuse(model)
    assert not result.changed and ops(optimized) == ops(model)


def test_add_after_a_conv_whose_bias_is_shared_gives_it_its_own_bias():
    """The other Conv keeps reading the old bias; one number per channel is all the copy costs."""
    b = conv_then("Add", per_channel([6, 1, 1]))
    b.output(b.node("Conv", ["x", b.initializer("w2", random([6, 4, 3, 3], seed=3)), "bias"], ["other"], pads=[1, 1, 1, 1]))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters["fused"] == 1 and ops(optimized)["Add"] == 0
    biases = {node.output[0]: node.input[2] for node in optimized.graph.node if node.op_type == "Conv"}
    assert biases["other"] == "bias" and biases["conv"] != "bias"
    assert_equivalent(model, optimized)


# ----------------------------------------------------------------------------- scalars reaching a layer upstream


def attention_scores(divisor=8.0, *, shared_query=False, key_first=False):
    """q = x·Wq + bq and k = x·Wk + bk, split into 2 heads of 4: (q·kᵀ)/divisor, as BERT and ViT export it."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8])
    heads = b.initializer("heads", np.array([1, 3, 2, 4], np.int64))

    def project(name, seed):
        product = b.node("MatMul", [x, b.initializer(f"w{name}", random([8, 8], seed=seed))])
        biased = b.node("Add", [product, b.initializer(f"b{name}", random([8], seed=seed + 1))], [f"{name}_projected"])
        return b.node("Reshape", [biased, heads])

    query = b.node("Transpose", [project("q", 1)], perm=[0, 2, 1, 3])
    key = b.node("Transpose", [project("k", 3)], perm=[0, 2, 3, 1])
    scores = b.node("MatMul", [key, query] if key_first else [query, key])
    scaled = b.node("Div", [scores, b.initializer("scale", np.array(divisor, np.float32))])
    b.output(b.node("Softmax", [scaled], ["y"], axis=-1))
    if shared_query:
        b.output(b.node("Abs", ["q_projected"], ["z"]))
    return b


@pytest.mark.parametrize("key_first", [False, True])
def test_attention_scale_moves_into_a_projection(key_first):
    model = attention_scores(key_first=key_first).build()

    optimized, result = fuse(model)

    assert result.counters["moved"] == 1 and ops(optimized)["Div"] == 0
    assert_equivalent(model, optimized)


def test_attention_scale_with_a_projection_read_elsewhere_moves_into_the_other():
    model = attention_scores(shared_query=True).build()
    optimized, result = fuse(model)
    assert result.counters["moved"] == 1 and ops(optimized)["Div"] == 0
    assert_equivalent(model, optimized)


def merged_attention_scores(axis=-1, *, opset=17, sizes=(8, 8, 8)):
    """One MatMul + Add for q, k and v, Split on its last axis (as merge-parallel-matmuls leaves
    them, or GPT-2 exports them): (q·kᵀ)/8 · v."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", [1, 3, 8])
    product = b.node("MatMul", [x, b.initializer("w", random([8, 24], seed=1))])
    biased = b.node("Add", [product, b.initializer("b", random([24], seed=2))])
    if opset >= 13:
        parts = b.node("Split", [biased, b.initializer("sizes", np.array(sizes, np.int64))], 3, axis=axis)
    else:
        parts = b.node("Split", [biased], 3, axis=axis, split=list(sizes))
    heads = b.initializer("heads", np.array([1, 3, 2, 4], np.int64))
    query, key, value = (b.node("Reshape", [part, heads]) for part in parts)
    scores = b.node("MatMul", [b.node("Transpose", [query], perm=[0, 2, 1, 3]), b.node("Transpose", [key], perm=[0, 2, 3, 1])])
    scaled = b.node("Div", [scores, b.initializer("scale", np.array(8.0, np.float32))])
    b.output(b.node("MatMul", [b.node("Softmax", [scaled], axis=-1), b.node("Transpose", [value], perm=[0, 2, 1, 3])], ["y"]))
    return b.build()


@pytest.mark.parametrize("axis, opset", [(-1, 17), (2, 17), (2, 11)])
def test_attention_scale_moves_into_the_query_columns_of_a_merged_projection(axis, opset):
    model = merged_attention_scores(axis, opset=opset)

    optimized, result = fuse(model)

    assert result.counters["moved"] == 1 and ops(optimized)["Div"] == 0
    weights = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in optimized.graph.initializer}
    weight = weights[next(node.input[1] for node in optimized.graph.node if node.op_type == "MatMul")]
    original = random([8, 24], seed=1)
    np.testing.assert_allclose(weight[:, :8], original[:, :8] / 8, rtol=1e-6)
    np.testing.assert_array_equal(weight[:, 8:], original[:, 8:])  # key and value columns untouched
    assert_equivalent(model, optimized)


def test_scale_on_a_part_of_a_split_of_another_axis_stays():
    model = merged_attention_scores(axis=1, sizes=(1, 1, 1))
    _, result = fuse(model)
    assert result.counters["moved"] == 0


def test_scale_after_a_non_linear_op_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 4])
    product = b.node("MatMul", [x, b.initializer("w", random([4, 5], seed=1))])
    b.output(b.node("Mul", [b.node("Relu", [b.node("Transpose", [product], perm=[1, 0])]), b.initializer("s", np.array(-2, np.float32))], ["y"]))
    assert_kept(b.build())


def test_scale_whose_path_is_read_elsewhere_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 4])
    product = b.node("MatMul", [x, b.initializer("w", random([4, 5], seed=1))])
    moved = b.node("Transpose", [product], ["moved"], perm=[1, 0])
    b.output(b.node("Mul", [moved, b.initializer("s", np.array(3, np.float32))], ["y"]))
    b.output(b.node("Abs", [moved], ["z"]))
    assert_kept(b.build())


def test_scale_after_a_conv_whose_shared_bias_is_zero_is_folded():
    """A zero bias scaled stays zero: the shared tensor is kept as it is (exporters share equal constants)."""
    b = ModelBuilder()
    x = b.input("x", [1, 4, 5, 5])
    zeros = b.initializer("zeros", np.zeros([6], np.float32))
    conv = b.node("Conv", [x, b.initializer("w", random([6, 4, 3, 3], seed=1)), zeros], pads=[1, 1, 1, 1])
    b.output(b.node("Neg", [b.node("Mul", [conv, b.initializer("s", per_channel([6, 1, 1]))])], ["y"]))
    b.output(b.node("Conv", [x, b.initializer("w2", random([6, 4, 3, 3], seed=2)), zeros], ["other"], pads=[1, 1, 1, 1]))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters["fused"] == 1 and ops(optimized)["Mul"] == 0
    assert all(node.input[2] == "zeros" for node in optimized.graph.node if node.op_type == "Conv")
    assert_equivalent(model, optimized)
