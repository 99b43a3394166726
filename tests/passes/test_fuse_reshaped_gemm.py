"""fuse-reshaped-gemm: Reshape(x, [-1, K]) -> Gemm -> Reshape(x's leading dims + [N]) becomes MatMul(x, W) + C."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from builder import ModelBuilder, assert_equivalent, ops, random, run_pass

import onnxslim


def linear(
    dims=("batch", "seq", 16), *, allowzero=1, trans_b=0, bias=(8,), alpha=1.0, leading=None, dtype=np.float32, opset=18
):
    """The exporters' Linear on a 3-D input: the last target is Concat(Shape(x, 0, 1), Shape(x, 1, 2), [N])."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", list(dims), dtype=dtype)
    weight = random([8, 16] if trans_b else [16, 8], seed=7).astype(dtype)
    inputs = [b.node("Reshape", [x, b.initializer("flat", np.array([-1, 16], np.int64))], allowzero=allowzero)]
    inputs.append(b.initializer("W", weight))
    if bias is not None:
        inputs.append(b.initializer("C", random(list(bias), seed=8).astype(dtype)))
    gemm = b.node("Gemm", inputs, transB=trans_b, alpha=alpha)
    if leading is None:
        leading = [b.node("Shape", [x], start=0, end=1), b.node("Shape", [x], start=1, end=2)]
    else:
        leading = leading(b)
    target = b.node("Concat", [*leading, b.initializer("width", np.array([8], np.int64))], axis=0)
    b.output(b.node("Reshape", [gemm, target], ["y"], allowzero=allowzero))
    return b.build()


def feeds(*shapes, dtype=np.float32):
    return [{"x": random(shape, seed=index, dtype=dtype)} for index, shape in enumerate(shapes)]


def fuse(model):
    return run_pass(model, "fuse-reshaped-gemm", first=("infer-shapes",))


def test_dynamo_linear_becomes_matmul_and_add():
    model = linear()
    fused, result = fuse(model)
    assert result.counters["fused"] == 1
    assert [node.op_type for node in fused.graph.node if node.op_type in ("MatMul", "Add", "Gemm")] == ["MatMul", "Add"]
    assert_equivalent(model, fused, feeds([2, 3, 16], [1, 5, 16]))
    optimized = onnxslim.optimize(model, verify=False)
    assert ops(optimized) == {"MatMul": 1, "Add": 1}  # the Reshapes and the shape chain are gone
    assert [dim.dim_param for dim in optimized.graph.output[0].type.tensor_type.shape.dim[:2]] == ["batch", "seq"]
    assert_equivalent(model, optimized, feeds([4, 1, 16], [2, 6, 16]))


def test_trans_b_stores_the_weight_transposed():
    model = linear(trans_b=1)
    fused, result = fuse(model)
    assert result.counters["fused"] == 1
    weights = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in fused.graph.initializer}
    (matmul,) = [node for node in fused.graph.node if node.op_type == "MatMul"]
    assert weights[matmul.input[1]].shape == (16, 8)
    assert_equivalent(model, fused, feeds([2, 3, 16], [1, 5, 16]))


def test_without_bias_one_matmul():
    model = linear(bias=None)
    fused, result = fuse(model)
    assert result.counters["fused"] == 1
    assert [node.op_type for node in fused.graph.node if node.op_type in ("MatMul", "Add", "Gemm")] == ["MatMul"]
    assert_equivalent(model, fused, feeds([2, 3, 16], [1, 5, 16]))


def test_bias_of_shape_1_n_and_float16():
    model = linear(bias=(1, 8), dtype=np.float16)
    fused, result = fuse(model)
    assert result.counters["fused"] == 1
    assert_equivalent(model, fused, feeds([2, 3, 16], [1, 5, 16], dtype=np.float16))


def test_four_dim_input_and_the_exporters_slice_of_shape():
    b = ModelBuilder(opset=18)
    x = b.input("x", ["batch", 2, "seq", 16])
    shape = b.node("Shape", [x])
    head = b.node("Slice", [shape, b.initializer("s", np.array([0], np.int64)), b.initializer("e", np.array([-1], np.int64))])
    flat = b.node("Reshape", [x, b.initializer("flat", np.array([-1, 16], np.int64))], allowzero=1)
    gemm = b.node("Gemm", [flat, b.initializer("W", random([16, 8], seed=3)), b.initializer("C", random([8], seed=4))])
    target = b.node("Concat", [head, b.initializer("width", np.array([8], np.int64))], axis=0)
    b.output(b.node("Reshape", [gemm, target], ["y"], allowzero=1))
    model = b.build()
    fused, result = fuse(model)
    assert result.counters["fused"] == 1
    assert_equivalent(model, fused, feeds([2, 2, 3, 16], [1, 2, 5, 16]))


def assert_unchanged(model, *shapes):
    fused, result = fuse(model)
    assert not result.changed
    assert ops(fused)["Gemm"] == 1 and ops(fused)["Reshape"] == 2
    if shapes:
        assert_equivalent(model, fused, feeds(*shapes))


def test_leading_dims_in_the_wrong_order_stay():
    b_model = linear()
    # the same chain, with the last target's two leading pieces swapped: [seq, batch, N]
    concat = next(node for node in b_model.graph.node if node.op_type == "Concat")
    concat.input[0], concat.input[1] = concat.input[1], concat.input[0]
    assert_unchanged(b_model, [2, 3, 16], [3, 2, 16])


def test_dims_of_another_tensor_are_not_proven_equal():
    model = linear(leading=lambda b: [b.node("Shape", [b.input("other", ["n", "m"])], start=0, end=2)])
    assert_unchanged(model)


def test_alpha_stays():
    assert_unchanged(linear(alpha=0.5), [2, 3, 16])


def test_two_dim_input_stays():
    b = ModelBuilder(opset=18)
    x = b.input("x", ["rows", 16])
    flat = b.node("Reshape", [x, b.initializer("flat", np.array([-1, 16], np.int64))])
    gemm = b.node("Gemm", [flat, b.initializer("W", random([16, 8], seed=3))])
    b.output(b.node("Reshape", [gemm, b.node("Concat", [b.node("Shape", [x], end=1), b.initializer("w", np.array([8], np.int64))], axis=0)], ["y"]))
    _, result = fuse(b.build())
    assert not result.changed


def test_allowzero_0_where_batch_and_seq_0_run_with_another_shape_stays():
    # The legacy exporter's Linear: with batch = seq = 0 the last Reshape's computed 0 copies the
    # Gemm's N into dim 1 and runs, giving [0, 8, 8] where MatMul gives [0, 0, 8].
    model = linear(allowzero=0)
    assert_unchanged(model, [2, 3, 16], [1, 5, 16])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros([0, 0, 16], np.float32)})[0].shape == (0, 8, 8)


def test_allowzero_0_with_a_static_leading_dim_is_exact():
    # Only seq is symbolic: seq = 0 makes the last Reshape copy N into dim 1 and fail on the count.
    model = linear(dims=(2, "seq", 16), allowzero=0)
    fused, result = fuse(model)
    assert result.counters["fused"] == 1
    assert_equivalent(model, fused, feeds([2, 3, 16], [2, 5, 16]))


def test_a_shared_weight_with_trans_b_stays():
    model = linear(trans_b=1)
    # a second reader of W: a transposed copy would add its bytes to the file
    model.graph.node.append(onnx.helper.make_node("Identity", ["W"], ["w_copy"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, [8, 16]))
    assert_unchanged(model)


# ----------------------------------------------------------------------------- random targets, every size

PROFILE = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck), print_blob=False)


@st.composite
def linears(draw):
    """x[lead..., 16] -> Reshape [-1, 16] (or [lead-product, -1]) -> Gemm -> Reshape to lead + [8], the
    last target's pieces from Shape(x) slices, constants or a -1, sometimes two of them swapped."""
    lead = [draw(st.sampled_from([1, 2, 3, f"d{axis}"])) for axis in range(draw(st.integers(2, 3)))]
    allowzero = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    b = ModelBuilder(opset=18)
    x = b.input("x", [*lead, 16])
    const = lambda values: b.initializer(b.fresh("c"), np.array(values, np.int64))  # noqa: E731
    flat = b.node("Reshape", [x, const([-1, 16])], allowzero=allowzero[0])
    gemm = b.node("Gemm", [flat, b.initializer("W", random([16, 8], seed=3)), b.initializer("C", random([8], seed=4))])
    pieces = [const([dim]) if isinstance(dim, int) else b.node("Shape", [x], start=axis, end=axis + 1) for axis, dim in enumerate(lead)]
    pieces.append(const([8]))
    choice = draw(st.sampled_from([None, *range(len(pieces))]))
    if choice is not None:
        pieces[choice] = const([-1])
    if draw(st.integers(0, 4)) == 0:
        first, second = draw(st.permutations(range(len(pieces))))[:2]
        pieces[first], pieces[second] = pieces[second], pieces[first]
    b.output(b.node("Reshape", [gemm, b.node("Concat", pieces, axis=0)], ["y"], allowzero=allowzero[1]))
    return b.build(), lead


@settings(max_examples=60, **PROFILE)
@given(case=linears())
def test_random_linears_agree_at_every_size_zero_included(case):
    model, lead = case
    fused, result = fuse(model)
    if not result.changed:
        return
    symbols = [axis for axis, dim in enumerate(lead) if isinstance(dim, str)]
    originals = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rewritten = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    for sizes in itertools.product([0, 1, 2, 3], repeat=len(symbols)):
        shape = [*lead, 16]
        for axis, size in zip(symbols, sizes):
            shape[axis] = size
        x = random(shape, seed=sum(sizes))
        try:
            expected = originals.run(None, {"x": x})[0]
        except Exception:  # the chain fails for these sizes: the rewrite may do anything
            continue
        actual = rewritten.run(None, {"x": x})[0]
        assert actual.shape == expected.shape, (lead, shape)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
