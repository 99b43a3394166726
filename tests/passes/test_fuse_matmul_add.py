"""fuse-matmul-add: Add(MatMul(A, B), C) becomes Gemm(A, B, C) when C broadcasts to [M, N] one way."""

import numpy as np
import onnx
import pytest
from builder import ModelBuilder, assert_equivalent, feeds_at_two_sizes, ops, random, run_pass, run_passes


def fuse(model):
    fused, result = run_pass(model, "fuse-matmul-add", first=("infer-shapes",))
    return run_passes(fused, "eliminate-dead-nodes"), result


def matmul_add(c_shape, *, a_shape=("m", 4), b_shape=(4, 6), c_input=True, dtype=np.float32, opset=17, c_first=False, tail="Neg"):
    """A, B (inputs) -> MatMul -> Add(C) -> tail -> y; C an input (or a constant) of `c_shape`."""
    b = ModelBuilder(opset=opset)
    a = b.input("a", list(a_shape), dtype=dtype)
    weight = b.input("b", list(b_shape), dtype=dtype)
    c = b.input("c", list(c_shape), dtype=dtype) if c_input else b.initializer("c", random(c_shape, seed=3, dtype=dtype))
    product = b.node("MatMul", [a, weight], ["product"])
    added = b.node("Add", [c, product] if c_first else [product, c], ["sum"])
    if tail is None:
        b.output(added)
    else:
        b.output(b.node(tail, [added], ["y"]))
    return b.build()


def assert_fused(model):
    optimized, result = fuse(model)
    assert result.counters["fused"] == 1
    assert ops(optimized)["Gemm"] == 1 and ops(optimized)["MatMul"] == 0 and ops(optimized)["Add"] == 0
    assert [value.name for value in optimized.graph.output] == [value.name for value in model.graph.output]
    assert_equivalent(model, optimized, feeds_at_two_sizes(model))
    _, again = run_pass(optimized, "fuse-matmul-add", first=("infer-shapes",))
    assert not again.changed
    return optimized


def assert_kept(model):
    optimized, result = fuse(model)
    assert not result.changed and ops(optimized) == ops(model)


@pytest.mark.parametrize("c_shape", [[6], [1, 6], ["m", 1], ["m", 6], [], [1], [1, 1]], ids=str)
def test_bias_that_broadcasts_to_the_product_is_gemms_c(c_shape):
    assert_fused(matmul_add(c_shape))


def test_constant_bias_per_row_and_column():
    assert_fused(matmul_add([3, 6], a_shape=(3, 4), c_input=False))


def test_c_on_the_left_of_the_add():
    assert_fused(matmul_add([6], c_first=True))


def test_add_output_that_is_a_graph_output_keeps_its_name():
    optimized = assert_fused(matmul_add(["m", 6], tail=None))
    assert optimized.graph.node[-1].op_type == "Gemm" and optimized.graph.node[-1].output[0] == "sum"


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_types(dtype):
    assert_fused(matmul_add([6], dtype=dtype))


@pytest.mark.parametrize("opset", [7, 9, 11])
def test_older_opsets(opset):
    assert_fused(matmul_add([1, 6], opset=opset))


@pytest.mark.parametrize(
    "c_shape",
    [[5, 6], ["n", 6], [1, 1, 6], [6, 1]],
    ids=["rows-fixed-but-m-dynamic", "another-symbol", "rank-3", "column-of-the-wrong-size"],
)
def test_bias_that_would_grow_the_product_is_kept(c_shape):
    """[m, 6] + [5, 6] is [5, 6] for m = 1: Gemm would refuse C, the Add broadcasts."""
    assert_kept(matmul_add(c_shape))


def test_rank_3_product_is_kept():
    assert_kept(matmul_add([6], a_shape=(2, "m", 4)))


def test_integers_are_kept():
    """Gemm takes integers from opset 9, but onnxruntime has no kernel for them."""
    assert_kept(matmul_add([6], dtype=np.int32))


def test_before_opset_7_is_kept():
    assert_kept(matmul_add([6], opset=6))


def test_product_read_elsewhere_is_kept():
    b = ModelBuilder()
    a, weight = b.input("a", ["m", 4]), b.input("b", [4, 6])
    product = b.node("MatMul", [a, weight])
    b.output(b.node("Add", [product, b.input("c", [6])], ["y"]))
    b.output(b.node("Relu", [product], ["z"]))
    assert_kept(b.build())


def test_c_computed_after_the_matmul_keeps_the_nodes_in_order():
    """C comes from nodes listed between the MatMul and the Add: the Gemm moves past them (it
    stood where the MatMul stood, reading C before C was computed: a model the checker refuses)."""
    b = ModelBuilder()
    x = b.input("x", ["N", 1])
    product = b.node("MatMul", [x, b.initializer("w", random([1, 1], 3))])
    c = b.node("Relu", [b.node("Relu", [x])])
    b.output(b.node("Add", [product, c], ["y"]))
    model = b.build()
    fused, result = fuse(model)
    assert result.counters["fused"] == 1 and ops(fused)["Gemm"] == 1
    onnx.checker.check_model(fused, full_check=True)
    assert_equivalent(model, fused, feeds_at_two_sizes(model))
