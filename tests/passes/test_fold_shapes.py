"""fold-shapes: Shape/Size chains decided by static dims become constants; dynamic dims stay computed."""

import numpy as np
import onnx
import pytest
from builder import ModelBuilder, assert_equivalent, branches, ops, output_names, random, run_pass, top_ops

import onnxslim


def reshape_by_own_dims(shape, pick, opset=17):
    """x -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), i)) for i in pick, [-1])) -> Relu -> y."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", shape)
    dims = b.node("Shape", [x], ["dims"])
    parts = []
    for index in pick:
        gathered = b.node("Gather", [dims, b.initializer(f"index{index}", np.array(index, np.int64))], axis=0)
        parts.append(b.node("Unsqueeze", [gathered, b.initializer(f"axes{index}", np.array([0], np.int64))]))
    parts.append(b.initializer("rest", np.array([-1], np.int64)))
    target = b.node("Concat", parts, ["target"], axis=0)
    b.output(b.node("Relu", [b.node("Reshape", [x, target])], ["y"]))
    return b.build()


def fold(model):
    return run_pass(model, "fold-shapes", first=("infer-shapes",))


def test_static_dims_fold_the_whole_chain_to_the_reshape_target():
    model = reshape_by_own_dims([2, 3, 4, 5], pick=[0, 1])
    optimized, result = fold(model)
    assert result.counters["folded"] >= 1
    folded = onnxslim.optimize(
        model, simplify=onnxslim.SimplifyOptions(passes="infer-shapes,fixpoint(fold-shapes,fold-constants,eliminate-dead-nodes)")
    )
    assert ops(folded) == {"Reshape": 1, "Relu": 1}
    target = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}["target"]
    assert target.tolist() == [2, 3, -1]
    assert_equivalent(model, folded)


def test_dynamic_dim_is_never_baked_in():
    model = reshape_by_own_dims(["batch", 3, 4, 5], pick=[0, 1])
    folded = onnxslim.optimize(
        model,
        simplify=onnxslim.SimplifyOptions(passes="infer-shapes,fixpoint(fold-shapes,fold-constants,eliminate-dead-nodes)"),
        verify=onnxslim.VerifyOptions(verify_shapes={"x": [2, 3, 4, 5]}),
    )
    # The batch element is the input's own dim 0: Reshape copies it (0) instead of baking in 2.
    assert ops(folded) == {"Reshape": 1, "Relu": 1}
    target = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert [value.tolist() for value in target.values()] == [[0, 3, -1]]
    for batch in (1, 3):
        report = onnxslim.verify(model, folded, verify_shapes={"x": [batch, 3, 4, 5]})
        assert report.passed, report.message


def test_size_of_static_tensor_folds():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    size = b.node("Size", [x])
    b.output(b.node("Add", [b.node("Cast", [size], to=onnx.TensorProto.FLOAT), x], ["y"]))
    model = b.build()
    optimized, result = fold(model)
    assert result.counters["folded"] == 1 and ops(optimized)["Size"] == 0
    assert_equivalent(model, optimized)


def test_shape_with_start_end_attributes():
    b = ModelBuilder(opset=15)
    x = b.input("x", ["n", 3, 4])
    tail = b.node("Shape", [x], start=1)
    b.output(b.node("Reshape", [x, b.node("Concat", [b.initializer("minus_one", np.array([-1], np.int64)), tail], axis=0)], ["y"]))
    model = b.build()
    optimized, result = fold(model)
    assert result.counters["folded"] >= 1 and ops(optimized)["Shape"] == 0
    assert_equivalent(model, optimized, {"x": random([2, 3, 4])})


def test_slice_of_shape_keeps_dynamic_part():
    b = ModelBuilder()
    x = b.input("x", ["n", 3, "w"])
    dims = b.node("Shape", [x])
    head = b.node("Slice", [dims, b.initializer("s", np.array([1], np.int64)), b.initializer("e", np.array([2], np.int64))])
    whole = b.node("Slice", [dims, b.initializer("s0", np.array([0], np.int64)), b.initializer("e0", np.array([3], np.int64))])
    b.output(head, np.int64, [1])
    b.output(whole, np.int64, [3])
    model = b.build()
    optimized, result = fold(model)
    assert result.counters["folded"] == 1  # [3] is static; the whole shape is not
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized, {"x": random([2, 3, 5])})


def test_dynamic_shape_does_not_fire():
    b = ModelBuilder()
    x = b.input("x", ["n", "c"])
    b.output(b.node("Shape", [x], ["y"]), np.int64, [2])
    model = b.build()
    _, result = fold(model)
    assert not result.changed


def test_input_shape_makes_the_model_static_and_folds_more(tmp_path):
    model = reshape_by_own_dims(["batch", 3, 4, 5], pick=[0, 1])
    static, report = onnxslim.optimize(model, simplify=onnxslim.SimplifyOptions(input_shapes={"x": [2, 3, 4, 5]}),
                                       return_report=True)
    assert report.verification.passed
    assert "Shape" not in ops(static)
    dims = [d.dim_value for d in static.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 4, 5]


def test_input_shape_rejects_a_conflicting_static_dim():
    model = reshape_by_own_dims(["batch", 3, 4, 5], pick=[0])
    with pytest.raises(onnxslim.InputSpecError, match="dim 1 is fixed at 3"):
        onnxslim.optimize(model, simplify=onnxslim.SimplifyOptions(input_shapes={"x": [2, 4, 4, 5]}))


def attention_style_reshape(allowzero=0):
    """x[n,6,4] -> Reshape(x, Concat([Mul(Shape(x)[0], 2)], [3], [4])): a target with one computed dim."""
    b = ModelBuilder()
    x = b.input("x", ["n", 6, 4])
    batch = b.node("Gather", [b.node("Shape", [x]), b.initializer("zero", np.array(0, np.int64))], axis=0)
    doubled = b.node("Mul", [batch, b.initializer("two", np.array(2, np.int64))])
    first = b.node("Unsqueeze", [doubled, b.initializer("axes", np.array([0], np.int64))])
    target = b.node("Concat", [first, b.initializer("rest", np.array([3, 4], np.int64))], ["target"], axis=0)
    b.output(b.node("Relu", [b.node("Reshape", [x, target], allowzero=allowzero)], ["y"]))
    return b.build()


def test_reshape_target_with_one_dynamic_element_becomes_minus_one():
    model = attention_style_reshape()
    folded = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(verify_shapes={"x": [2, 6, 4]}))
    assert ops(folded) == {"Reshape": 1, "Relu": 1}  # the shape arithmetic is gone
    target = [onnx.numpy_helper.to_array(t) for t in folded.graph.initializer][0]
    assert target.tolist() == [-1, 3, 4]
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "n"  # still dynamic
    for batch in (1, 5):
        report = onnxslim.verify(model, folded, verify_shapes={"x": [batch, 6, 4]})
        assert report.passed, report.message


def test_reshape_target_rule_does_not_fire_with_allowzero():
    model = attention_style_reshape(allowzero=1)
    folded = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(verify_shapes={"x": [2, 6, 4]}))
    assert ops(folded)["Shape"] == 1 and ops(folded)["Concat"] == 1


def test_reshape_target_elements_equal_to_the_input_dims_become_zero():
    """BERT's view(batch, -1, heads, dim): the batch element is the input's own dim 0 -> 0 (copy)."""
    b = ModelBuilder()
    x = b.input("x", ["batch", "seq", 8])
    batch = b.node("Gather", [b.node("Shape", [x]), b.initializer("zero", np.array(0, np.int64))], axis=0)
    first = b.node("Unsqueeze", [batch, b.initializer("axes", np.array([0], np.int64))])
    rest = b.initializer("rest", np.array([-1, 2, 4], np.int64))
    target = b.node("Concat", [first, rest], ["target"], axis=0)
    b.output(b.node("Relu", [b.node("Reshape", [x, target])], ["y"]))
    model = b.build()
    folded = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(verify_shapes={"x": [2, 3, 8]}))
    assert ops(folded) == {"Reshape": 1, "Relu": 1}
    assert [onnx.numpy_helper.to_array(t) for t in folded.graph.initializer][0].tolist() == [0, -1, 2, 4]
    for shape in ([1, 5, 8], [3, 2, 8]):
        report = onnxslim.verify(model, folded, verify_shapes={"x": shape})
        assert report.passed, report.message


def test_no_new_minus_one_beside_a_copied_dim():
    """[Shape(b)[0], Shape(a)[1], 2] must not become [0, -1, 2]: with an empty batch the
    original runs, while -1 beside a 0-size product is undetermined and runtimes reject it."""
    b = ModelBuilder()
    a = b.input("a", ["N", "T"])
    data = b.input("b", ["N", "S"])
    zero, one, two = (b.initializer(name, np.array([value], np.int64)) for name, value in (("i0", 0), ("i1", 1), ("i2", 2)))
    batch = b.node("Slice", [b.node("Shape", [data]), zero, one])
    tokens = b.node("Slice", [b.node("Shape", [a]), one, two])
    target = b.node("Concat", [batch, tokens, b.initializer("last", np.array([2], np.int64))], axis=0)
    b.output(b.node("Reshape", [data, target], ["y"]))
    model = b.build()
    optimized, result = fold(model)
    assert result.counters["reshape_targets"] == 0
    assert_equivalent(model, optimized, {"a": np.zeros([0, 3], np.float32), "b": np.zeros([0, 6], np.float32)})


def test_placeholder_dim_names_are_not_equal_sizes():
    """Exporters write "?" for any unknown dim; two "?" dims are not the same size."""
    b = ModelBuilder()
    a = b.input("a", ["?", "?", 4])
    data = b.input("b", ["?", "?", 8])
    zero, two = b.initializer("i0", np.array([0], np.int64)), b.initializer("i2", np.array([2], np.int64))
    pieces = b.node("Slice", [b.node("Shape", [a]), zero, two])
    target = b.node("Concat", [pieces, b.initializer("split", np.array([2, 4], np.int64))], axis=0)
    b.output(b.node("Reshape", [data, target], ["y"]))
    model = b.build()
    optimized, result = fold(model)
    assert result.counters["reshape_targets"] == 0
    assert_equivalent(model, optimized, {"a": np.ones([3, 5, 4], np.float32), "b": np.ones([5, 3, 8], np.float32)})


def test_minus_one_beside_a_copy_when_an_upstream_reshape_already_rejects_empty_inputs():
    """YOLOv8's DFL head: Reshape(x, [b, 4, 16, A]) where x comes from Reshape(., [0, 82, -1]).
    An empty batch already fails upstream, so [0, 4, 16, -1] changes nothing the model computes."""
    b = ModelBuilder()
    image = b.input("image", ["batch", 64, 2, 3])
    flat = b.node("Reshape", [image, b.initializer("flat_shape", np.array([0, 64, -1], np.int64))], ["flat"])
    dims = b.node("Shape", [flat])
    batch = b.node("Unsqueeze", [b.node("Gather", [dims, b.initializer("i0", np.array(0, np.int64))], axis=0),
                                 b.initializer("ax", np.array([0], np.int64))])
    anchors = b.node("Unsqueeze", [b.node("Gather", [dims, b.initializer("i2", np.array(2, np.int64))], axis=0),
                                   b.initializer("ax2", np.array([0], np.int64))])
    target = b.node("Concat", [batch, b.initializer("mid", np.array([4, 16], np.int64)), anchors], ["target"], axis=0)
    b.output(b.node("Relu", [b.node("Reshape", [flat, target])], ["y"]))
    model = b.build()
    folded = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(verify_shapes={"image": [2, 64, 2, 3]}))
    assert set(ops(folded)) == {"Reshape", "Relu"}  # the shape arithmetic is gone (fuse-reshapes may merge the two)
    for batch_size in (1, 3):
        report = onnxslim.verify(model, folded, verify_shapes={"image": [batch_size, 64, 2, 3]})
        assert report.passed, report.message


def test_minus_one_beside_a_copy_stays_refused_without_such_an_upstream_reshape():
    b = ModelBuilder()
    x = b.input("x", ["batch", 64, "anchors"])
    dims = b.node("Shape", [x])
    batch = b.node("Unsqueeze", [b.node("Gather", [dims, b.initializer("i0", np.array(0, np.int64))], axis=0),
                                 b.initializer("ax", np.array([0], np.int64))])
    anchors = b.node("Unsqueeze", [b.node("Gather", [dims, b.initializer("i2", np.array(2, np.int64))], axis=0),
                                   b.initializer("ax2", np.array([0], np.int64))])
    target = b.node("Concat", [batch, b.initializer("mid", np.array([4, 16], np.int64)), anchors], ["target"], axis=0)
    b.output(b.node("Relu", [b.node("Reshape", [x, target])], ["y"]))
    model = b.build()
    optimized, result = fold(model)
    assert result.counters["reshape_targets"] == 0
    assert_equivalent(model, optimized, {"x": np.zeros([0, 64, 5], np.float32)})


def test_an_unnamed_dynamic_dim_read_from_the_tensor_itself_is_copied():
    # x's dim 0 has no symbol; Shape(x)[0] is still x's own dim 0, so the target element becomes 0.
    model = reshape_by_own_dims([None, 3, 4, 5], pick=[0])
    optimized, result = fold(model)
    assert result.counters["reshape_targets"] == 1
    folded = onnxslim.optimize(model, verify=False)
    assert ops(folded) == {"Reshape": 1, "Relu": 1}
    target = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert [value.tolist() for value in target.values()] == [[0, -1]]
    assert_equivalent(model, folded, [{"x": random([batch, 3, 4, 5])} for batch in (1, 3)])


def torch_expand(extra=None):
    """The legacy exporter's x.expand(batch, 3, 4): Where(Equal(shape, -1 * ones), ones, shape) -> Expand.

    `extra` replaces the middle element of the shape by a computed int64 input (which may be -1).
    """
    b = ModelBuilder(opset=17)
    x = b.input("x", ["batch", 1, 4])
    batch = b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [x]), b.initializer("zero", np.array(0, np.int64))], axis=0),
                                 b.initializer("axes", np.array([0], np.int64))])
    middle = b.input("extra", [1], dtype=np.int64) if extra else b.initializer("three", np.array([3], np.int64))
    shape = b.node("Concat", [batch, middle, b.initializer("four", np.array([4], np.int64))], axis=0)
    ones = b.node("ConstantOfShape", [b.initializer("length", np.array([3], np.int64))],
                  value=onnx.numpy_helper.from_array(np.array([1], np.int64)))
    minus_ones = b.node("Mul", [ones, b.initializer("minus_one", np.array(-1, np.int64))])
    chosen = b.node("Where", [b.node("Equal", [shape, minus_ones]), ones, shape])
    b.output(b.node("Expand", [x, chosen], ["y"]))
    return b.build()


def test_torch_expand_mask_is_decided_by_the_shape_values():
    model = torch_expand()
    optimized, result = fold(model)
    assert result.counters["selections"] == 1
    folded = onnxslim.optimize(model, verify=False)
    assert not {"Where", "Equal", "ConstantOfShape", "Mul"} & set(ops(folded))
    assert_equivalent(model, folded, [{"x": random([batch, 1, 4])} for batch in (1, 3)])


def test_a_shape_element_that_may_be_minus_one_keeps_the_where():
    model = torch_expand(extra=True)
    optimized, result = fold(model)
    assert result.counters["selections"] == 0 and ops(optimized)["Where"] == 1
    cases = [{"x": random([2, 1, 4]), "extra": np.array([value], np.int64)} for value in (-1, 1, 3)]
    assert_equivalent(model, optimized, cases)


@pytest.mark.parametrize("op", ["Add", "Equal", "Where"])
def test_empty_integer_operands_are_not_decided(op):
    # Broadcasting an empty vector gives an empty one (a generated graph divided by its length).
    b = ModelBuilder()
    x = b.input("x", [0], dtype=np.int64)
    if op == "Where":
        condition = b.node("Equal", [x, x])
        b.output(b.node("Where", [condition, x, x], ["y"]))
    else:
        b.output(b.node(op, [x, x], ["y"]))
    model = b.build()
    optimized, _ = fold(model)
    assert_equivalent(model, optimized, {"x": np.zeros([0], np.int64)})


def test_a_body_reads_what_the_outer_graph_knows_of_a_shape():
    """Shape(x[n, 4]) is computed at the top level (n is dynamic); a branch gathers its static
    element: that folds in the branch as it would at the top level, the dynamic one does not."""
    b = ModelBuilder()
    x = b.input("x", ["n", 4])
    condition = b.input("c", [], np.bool_)
    shape = b.node("Shape", [x], ["shape"])
    then = b.branch()
    width = then.node("Gather", [shape, b.initializer("one", np.array(1, np.int64))], ["width"], axis=0)
    then.output(then.node("Mul", [width, width], ["then_out"]), np.int64, [])
    other = b.branch()
    count = other.node("Gather", [shape, b.initializer("zero", np.array(0, np.int64))], ["count"], axis=0)
    other.output(other.node("Neg", [count], ["else_out"]), np.int64, [])
    b.output(b.if_node(condition, then, other), np.int64, [])
    model = b.build()

    optimized, result = run_pass(model, "fold-shapes", first=("infer-shapes",))

    # The static width folds, and so does width * width (the Mul rule of shape arithmetic).
    assert result.counters["folded"] == 2
    then_body, else_body = branches(optimized)
    assert "Gather" not in top_ops(then_body) and top_ops(else_body) == ["Gather", "Neg"]
    feeds = [{"x": random([size, 4]), "c": np.array(flag)} for size in (2, 5) for flag in (True, False)]
    assert_equivalent(model, optimized, feeds)
