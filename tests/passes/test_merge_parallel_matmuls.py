"""merge-parallel-matmuls: x·W₁ + b₁, x·W₂ + b₂, ... become one MatMul (+ one Add) and a Split.

The input is x[batch, seq, 8] with dynamic batch and seq (the verifier runs each at two sizes).
"""

import numpy as np
import pytest
from builder import ModelBuilder, assert_equivalent, feeds_at_two_sizes, ops, random, run_pass, run_passes


def merge(model):
    merged, result = run_pass(model, "merge-parallel-matmuls", first=("infer-shapes",))
    return run_passes(merged, "eliminate-dead-nodes"), result


def projections(columns=(8, 8, 8), *, bias_shapes=None, opset=17, shape=("batch", "seq", 8), dtype=np.float32, bias_first=False):
    """x -> Relu -> MatMul(W_i) [-> Add(b_i)] -> Neg -> y_i, one branch per entry of `columns`."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", list(shape), dtype=dtype)
    relu = b.node("Relu", [x], ["relu"])
    for index, width in enumerate(columns):
        result = b.node("MatMul", [relu, b.initializer(f"w{index}", random([shape[-1], width], seed=index, dtype=dtype))])
        if bias_shapes is not None and bias_shapes[index] is not None:
            bias = b.initializer(f"b{index}", random(bias_shapes[index], seed=10 + index, dtype=dtype))
            result = b.node("Add", [bias, result] if bias_first else [result, bias])
        b.output(b.node("Neg", [result], [f"y{index}"]))
    return b.build()


def assert_merged(model, *, merged=3, nodes=None):
    optimized, result = merge(model)
    assert result.counters["merged"] == merged
    if nodes is not None:
        assert ops(optimized) == nodes
    assert [value.name for value in optimized.graph.output] == [value.name for value in model.graph.output]
    assert_equivalent(model, optimized, feeds_at_two_sizes(model))
    _, again = run_pass(optimized, "merge-parallel-matmuls", first=("infer-shapes",))
    assert not again.changed
    return optimized


def test_query_key_value_projections_with_biases_become_three_nodes():
    model = projections((8, 8, 8), bias_shapes=[[8]] * 3)
    assert_merged(model, nodes={"Relu": 1, "MatMul": 1, "Add": 1, "Split": 1, "Neg": 3})


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_sizes_are_an_attribute_before_opset_13_and_an_input_from_13(opset):
    optimized = assert_merged(projections((4, 8, 6), bias_shapes=[[4], [8], [6]], opset=opset))
    split = next(node for node in optimized.graph.node if node.op_type == "Split")
    assert (len(split.input) == 2) == (opset >= 13)
    assert [attribute.name for attribute in split.attribute] == (["axis"] if opset >= 13 else ["axis", "split"])


@pytest.mark.parametrize(
    "bias_shapes",
    [[[1, 1, 4], [1, 8], [6]], [[1], [], [1, 1, 6]], [[4], [1], [1, 1, 1]]],
    ids=["leading-ones", "scalar-like", "one-element"],
)
def test_biases_that_broadcast_along_the_columns_merge(bias_shapes):
    assert_merged(projections((4, 8, 6), bias_shapes=bias_shapes), nodes={"Relu": 1, "MatMul": 1, "Add": 1, "Split": 1, "Neg": 3})


def test_bias_on_the_left_of_the_add_merges():
    assert_merged(projections((4, 8, 6), bias_shapes=[[4], [8], [6]], bias_first=True))


def test_three_matmuls_without_bias_become_two_nodes():
    assert_merged(projections((4, 8, 6)), nodes={"Relu": 1, "MatMul": 1, "Split": 1, "Neg": 3})


def test_two_matmuls_without_bias_are_left_alone():
    """Two MatMuls become a MatMul and a Split: no fewer nodes."""
    _, result = merge(projections((4, 8)))
    assert not result.changed


def test_branches_with_and_without_bias_merge_separately():
    """Two with a bias merge with their Adds; the bias-free one stays (no zero bias is invented)."""
    model = projections((4, 8, 6), bias_shapes=[[4], None, [6]])
    assert_merged(model, merged=2, nodes={"Relu": 1, "MatMul": 2, "Add": 1, "Split": 1, "Neg": 3})


def test_bias_that_would_add_dims_is_not_merged_into_the_group():
    """[seq, 8] + [1, 1, 8] is [1, seq, 8]: the Add grows the rank, so it stays as it is."""
    model = projections((8, 8, 8), bias_shapes=[[1, 1, 8], [8], [8]], shape=("seq", 8))
    assert_merged(model, merged=2, nodes={"Relu": 1, "MatMul": 2, "Add": 2, "Split": 1, "Neg": 3})


def test_bias_along_rows_is_not_merged():
    model = projections((8, 8, 8), bias_shapes=[[3, 8], [3, 8], [3, 8]], shape=("batch", 3, 8))
    _, result = merge(model)
    assert result.counters["merged"] == 3  # the MatMuls merge; the Adds stay
    optimized, _ = merge(model)
    assert ops(optimized)["Add"] == 3
    assert_equivalent(model, optimized, feeds_at_two_sizes(model))


def test_vector_input_merges():
    assert_merged(projections((4, 8, 6), bias_shapes=[[4], [8], [6]], shape=(8,)))


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_other_dtypes_merge(dtype):
    assert_merged(projections((4, 8, 6), bias_shapes=[[4], [8], [6]], dtype=dtype))


def test_graph_outputs_keep_their_names():
    b = ModelBuilder()
    x = b.input("x", ["batch", 8])
    for index in range(3):
        b.output(b.node("MatMul", [x, b.initializer(f"w{index}", random([8, 5], seed=index))], [f"y{index}"]))
    assert_merged(b.build(), nodes={"MatMul": 1, "Split": 1})


def test_shared_weight_is_not_merged():
    """The concatenated copy would add the shared weight's bytes to the model."""
    b = ModelBuilder()
    x = b.input("x", ["batch", 8])
    w = b.initializer("w", random([8, 8], seed=1))
    for index in range(3):
        b.output(b.node("MatMul", [x, b.initializer(f"w{index}", random([8, 8], seed=index))], [f"y{index}"]))
    b.output(b.node("MatMul", [b.node("Relu", [x]), w], ["z0"]))
    b.output(b.node("MatMul", [x, w], ["z1"]))
    _, result = merge(b.build())
    assert result.counters["merged"] == 3


def test_weights_of_other_dtypes_or_inner_sizes_are_not_mixed():
    b = ModelBuilder()
    x = b.input("x", ["batch", 8])
    b.output(b.node("MatMul", [x, b.initializer("w0", random([8, 4], seed=0))], ["y0"]))
    b.output(b.node("MatMul", [x, b.initializer("w1", random([8, 4], seed=1))], ["y1"]))
    b.output(b.node("MatMul", [b.node("Relu", [x]), b.initializer("w2", random([8, 4], seed=2))], ["y2"]))
    _, result = merge(b.build())
    assert not result.changed


def test_constant_on_the_left_is_not_merged():
    b = ModelBuilder()
    x = b.input("x", [8, "n"])
    for index in range(3):
        b.output(b.node("MatMul", [b.initializer(f"w{index}", random([5, 8], seed=index)), x], [f"y{index}"]))
    _, result = merge(b.build())
    assert not result.changed


def gemms(trans_b=(0, 1, 0), *, alpha=(1.0, 1.0, 1.0), beta=(1.0, 1.0, 1.0), bias_shapes=([4], [1, 8], None), opset=17):
    b = ModelBuilder(opset=opset)
    x = b.input("x", ["batch", 8])
    for index, (transposed, width) in enumerate(zip(trans_b, (4, 8, 6))):
        weight = random([width, 8] if transposed else [8, width], seed=index)
        inputs = [x, b.initializer(f"w{index}", weight)]
        if bias_shapes[index] is not None:
            inputs.append(b.initializer(f"c{index}", random(bias_shapes[index], seed=10 + index)))
        b.output(b.node("Gemm", inputs, [f"y{index}"], transB=transposed, alpha=alpha[index], beta=beta[index]))
    return b.build()


def test_gemms_transposed_or_not_merge():
    assert_merged(gemms(bias_shapes=([4], [1, 8], [6])), nodes={"Gemm": 1, "Split": 1})


@pytest.mark.parametrize("trans_b", [(1, 1, 1), (0, 0, 0)])
def test_gemms_keep_the_first_ones_layout(trans_b):
    optimized = assert_merged(gemms(trans_b, alpha=(0.5,) * 3, beta=(2.0,) * 3, bias_shapes=([4], [8], [6])))
    gemm = next(node for node in optimized.graph.node if node.op_type == "Gemm")
    attributes = {attribute.name: attribute for attribute in gemm.attribute}
    assert attributes["transB"].i == trans_b[0] and attributes["alpha"].f == 0.5 and attributes["beta"].f == 2.0


def test_only_gemms_that_scale_alike_merge():
    b = ModelBuilder()
    x = b.input("x", ["batch", 8])
    for index, alpha in enumerate((1.0, 2.0, 1.0, 1.0)):
        inputs = [x, b.initializer(f"w{index}", random([8, 4], seed=index)), b.initializer(f"c{index}", random([4], seed=index))]
        b.output(b.node("Gemm", inputs, [f"y{index}"], alpha=alpha))
    assert_merged(b.build(), merged=3, nodes={"Gemm": 2, "Split": 1})


def test_two_gemms_are_left_alone():
    """Two Gemms (their biases inside) become a Gemm and a Split: no fewer nodes."""
    b = ModelBuilder()
    x = b.input("x", ["batch", 8])
    for index in range(2):
        inputs = [x, b.initializer(f"w{index}", random([8, 4], seed=index)), b.initializer(f"c{index}", random([4], seed=index))]
        b.output(b.node("Gemm", inputs, [f"y{index}"]))
    _, result = merge(b.build())
    assert not result.changed


def test_gemm_bias_per_row_is_not_merged():
    b = ModelBuilder()
    x = b.input("x", [3, 8])
    for index in range(3):
        inputs = [x, b.initializer(f"w{index}", random([8, 4], seed=index)), b.initializer(f"c{index}", random([3, 4], seed=index))]
        b.output(b.node("Gemm", inputs, [f"y{index}"]))
    _, result = merge(b.build())
    assert not result.changed


def test_inside_an_if_branch():
    b = ModelBuilder()
    x = b.input("x", ["batch", 8])
    condition = b.input("c", [], dtype=np.bool_)
    branches = []
    for flavour in range(2):
        branch = b.branch()
        results = [branch.node("MatMul", [x, branch.initializer(branch.fresh("w"), random([8, 4], seed=flavour * 3 + index))]) for index in range(3)]
        branch.output(branch.node("Concat", results, axis=1), np.float32, ["batch", 12])
        branches.append(branch)
    b.output(b.if_node(condition, *branches))
    model = b.build()
    optimized = assert_merged(model, merged=6)
    assert ops(optimized)["MatMul"] == 2 and ops(optimized)["Split"] == 2
