"""fuse-reshaped-gemm: Reshape(x, [-1, K]) -> Gemm -> Reshape(x's leading dims + [N]) becomes MatMul(x, W) + C."""

import numpy as np
import onnx
import onnxruntime as ort
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
