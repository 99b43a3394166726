"""eliminate-noops: each rule on the smallest graph that shows it, and the cases where it must not fire.

Most graphs are `x -> Relu -> <op> -> Neg -> y`, so the no-op sits between two real nodes and its
removal rewires a reader; the graph-output cases check that the model's interface keeps its names.
"""

import numpy as np
import onnx.helper as helper
import pytest
from builder import ModelBuilder, assert_equivalent, branches, ops, output_names, random, run_pass, top_ops

INT64_MAX = np.iinfo(np.int64).max


def sandwich(op, shape=(2, 3, 4), extra=(), *, opset=17, dtype=np.float32, outputs=1, **attrs):
    """x -> Relu -> op(relu, *extra) -> Neg -> y; `extra` items are arrays (initializers) or names."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", list(shape), dtype)
    relu = b.node("Relu", [x], ["relu"])
    names = [b.initializer(f"{op.lower()}_arg{index}", item) if not isinstance(item, str) else item
             for index, item in enumerate(extra)]
    result = b.node(op, [relu, *names], outputs, name="target", **attrs)
    first = result if isinstance(result, str) else result[0]
    b.output(b.node("Neg", [first], ["y"]))
    return b, result


def eliminate(model, first=()):
    return run_pass(model, "eliminate-noops", first=first)


def assert_removed(model, op, first=()):
    optimized, result = eliminate(model, first)
    assert result.changed and result.counters["removed"] == 1
    assert ops(optimized)[op] == ops(model)[op] - 1
    neg = next(node for node in optimized.graph.node if node.op_type == "Neg")
    assert list(neg.input) == ["relu"]  # the reader now reads the no-op's input
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized)
    return optimized


def assert_kept(model, op, feeds=None):
    optimized, result = eliminate(model)
    assert not result.changed and result.counters["removed"] == 0
    assert ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds)


# ----------------------------------------------------------------------------- Identity and Dropout


def test_identity_is_removed():
    b, _ = sandwich("Identity")
    assert_removed(b.build(), "Identity")


def test_chain_of_identities_goes_in_one_run():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    first = b.node("Identity", [b.node("Relu", [x])])
    b.output(b.node("Neg", [b.node("Identity", [first])]))
    model = b.build()

    optimized, result = eliminate(model)

    assert result.counters["removed"] == 2 and top_ops(optimized.graph) == ["Relu", "Neg"]
    assert_equivalent(model, optimized)


def test_identity_producing_a_graph_output_keeps_the_output_name():
    """The Relu writes `y` itself: the model's output name is its interface."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.output(b.node("Identity", [b.node("Relu", [x], ["relu"])], ["y"]))
    model = b.build()

    optimized, result = eliminate(model)

    assert result.counters["removed"] == 1
    assert top_ops(optimized.graph) == ["Relu"]
    assert list(optimized.graph.node[0].output) == ["y"] and output_names(optimized) == ["y"]
    assert_equivalent(model, optimized)


def test_identity_between_graph_input_and_output_stays():
    """Nothing could take the output's name: a graph input has no producer to rename."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.output(b.node("Identity", [x], ["y"]))
    assert_kept(b.build(), "Identity")


def test_identity_producing_a_graph_output_stays_when_its_input_has_other_readers():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    relu = b.node("Relu", [x], ["relu"])
    b.output(b.node("Identity", [relu], ["y"]))
    b.output(b.node("Neg", [relu], ["z"]))
    assert_kept(b.build(), "Identity")


def test_identity_between_two_graph_outputs_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    relu = b.output(b.node("Relu", [x], ["relu"]))
    b.output(b.node("Identity", [relu], ["y"]))
    assert_kept(b.build(), "Identity")


def test_identity_inside_a_branch_is_removed():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    then.output(then.node("Neg", [then.node("Identity", [then.node("Relu", [x])])]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    optimized, result = eliminate(model)

    assert result.counters["removed"] == 1
    assert top_ops(branches(optimized)[0]) == ["Relu", "Neg"]
    assert_equivalent(model, optimized, [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])


def test_identity_of_an_outer_value_stays_when_it_is_the_branch_output():
    """A body output must be produced in the body: the outer Relu may not take the branch output's name."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    relu = b.node("Relu", [x])
    then = b.branch()
    then.output(then.node("Identity", [relu]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    assert_kept(b.build(), "Identity", [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])


def test_custom_domain_identity_is_untouched():
    b = ModelBuilder()
    b.use_domain("com.example")
    x = b.input("x", [2])
    b.output(b.node("Neg", [b.node("Identity", [b.node("Relu", [x])], domain="com.example")]), np.float32, [2])
    model = b.build()

    optimized, result = eliminate(model)

    assert not result.changed and ops(optimized)["com.example::Identity"] == 1


def test_inference_dropout_is_removed():
    b, _ = sandwich("Dropout", extra=[np.array(0.5, np.float32)])
    assert_removed(b.build(), "Dropout")


def test_dropout_with_training_mode_false_is_removed():
    b, _ = sandwich("Dropout", extra=[np.array(0.5, np.float32), np.array(False)])
    assert_removed(b.build(), "Dropout")


@pytest.mark.parametrize("is_test, removed", [(1, 1), (0, 0)])
def test_dropout_before_opset_7_is_removed_only_with_is_test(is_test, removed):
    """Structure only: onnxruntime has no Dropout-6 kernel to compare with."""
    b, _ = sandwich("Dropout", opset=6, is_test=is_test)
    model = b.build()

    optimized, result = eliminate(model)

    assert result.counters["removed"] == removed
    assert ops(optimized)["Dropout"] == 1 - removed


def test_dropout_in_training_mode_stays():
    b, _ = sandwich("Dropout", extra=[np.array(0.0, np.float32), np.array(True)])  # ratio 0: runs deterministically
    assert_kept(b.build(), "Dropout")


def test_dropout_whose_training_mode_is_not_a_constant_stays():
    b, _ = sandwich("Dropout", extra=[np.array(0.0, np.float32), "training"])
    b.input("training", [], np.bool_)
    model = b.build()
    assert_kept(model, "Dropout", [{"x": random([2, 3, 4]), "training": np.array(False)}])


def test_dropout_whose_mask_is_read_stays():
    b, (_, mask) = sandwich("Dropout", outputs=2)
    b.output(mask, np.bool_, [2, 3, 4])
    assert_kept(b.build(), "Dropout")


def test_dropout_with_an_unread_mask_is_removed():
    b, _ = sandwich("Dropout", outputs=2)
    assert_removed(b.build(), "Dropout")


# ----------------------------------------------------------------------------- Cast


def test_cast_to_the_same_type_is_removed():
    b, cast = sandwich("Cast", to=helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)))
    b.annotate("relu", np.float32, [2, 3, 4])
    b.annotate(cast, np.float32, [2, 3, 4])
    assert_removed(b.build(), "Cast")


def test_cast_to_another_type_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    cast = b.node("Cast", [b.node("Relu", [x])], to=helper.np_dtype_to_tensor_dtype(np.dtype(np.float16)))
    b.annotate(cast, np.float16, [2, 3])
    b.output(b.node("Neg", [cast]))
    assert_kept(b.build(), "Cast")


def test_cast_of_a_graph_input_to_its_own_type_is_removed():
    b = ModelBuilder()
    x = b.input("x", [2, 3], np.int64)
    cast = b.node("Cast", [x], to=helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))
    b.annotate(cast, np.int64, [2, 3])
    b.output(b.node("Neg", [cast], ["y"]))
    model = b.build()

    optimized, result = eliminate(model)

    assert result.counters["removed"] == 1 and top_ops(optimized.graph) == ["Neg"]
    assert_equivalent(model, optimized)


def test_castlike_to_the_same_type_is_removed():
    b, _ = sandwich("CastLike", extra=[np.zeros([1], np.float32)])
    assert_removed(b.build(), "CastLike", first=("infer-shapes",))  # it annotates both sides of the CastLike


def test_cast_whose_input_type_is_unknown_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    cast = b.node("Cast", [b.node("Relu", [x])], to=helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)))
    b.output(b.node("Neg", [cast]))
    assert_kept(b.build(), "Cast")


# ----------------------------------------------------------------------------- shape ops


@pytest.mark.parametrize("shape", [[2, 3, 4], [0, 3, -1], [2, -1, 4]])
def test_reshape_to_the_same_shape_is_removed(shape):
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    reshaped = b.node("Reshape", [x, b.initializer("shape", np.array(shape, np.int64))])
    b.output(b.node("Neg", [reshaped], ["y"]))
    model = b.build()

    optimized, result = eliminate(model)

    assert result.counters["removed"] == 1 and top_ops(optimized.graph) == ["Neg"]
    assert_equivalent(model, optimized)


def shape_op_model(op: str, dims: list, shape: list):
    """x of `dims` (symbolic dims by name) -> op(x, constant `shape`) -> Neg."""
    b = ModelBuilder()
    x = b.input("x", dims)
    b.output(b.node("Neg", [b.node(op, [x, b.initializer("shape", np.array(shape, np.int64))])], ["y"]))
    return b.build()


def symbolic_feeds(dims: list, *sizes: dict) -> list[dict]:
    """One feed of x per {symbol: size}."""
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal([size.get(dim, dim) for dim in dims]).astype(np.float32)} for size in sizes]


@pytest.mark.parametrize("dims, shape", [
    (["N", 8], [0, -1]),  # an exporter's flatten of an already flat tensor
    (["N", 8], [-1, 8]),
    (["N", "M"], [-1, 0]),
    (["N", 3, "T"], [0, 3, 0]),
    (["N", 3, 4], [0, -1, 4]),
])
def test_reshape_that_keeps_every_dim_is_removed_whatever_the_symbolic_dims(dims, shape):
    """Verified at two sizes of each symbolic dim: the Reshape is an identity for all of them."""
    model = shape_op_model("Reshape", dims, shape)
    optimized, result = eliminate(model)
    assert result.counters["removed"] == 1 and top_ops(optimized.graph) == ["Neg"]
    feeds = symbolic_feeds(dims, {"N": 2, "M": 5, "T": 7}, {"N": 3, "M": 1, "T": 4})
    assert_equivalent(model, optimized, feeds)


@pytest.mark.parametrize("dims, shape", [
    (["N", "M"], [0, 8]),  # M is 8 only sometimes
    (["N", 8], [-1, 4]),
    (["N", "M"], [-1]),
    (["N", 8], [0, 0, -1]),
    (["N", 8, 2], [0, -1]),
])
def test_reshape_that_may_change_a_dim_stays(dims, shape):
    optimized, result = eliminate(shape_op_model("Reshape", dims, shape))
    assert result.counters["removed"] == 0


@pytest.mark.parametrize("shape", [[3, 2, 4], [6, 4], [2, 12, 1], [4, 3, 2]])
def test_reshape_that_changes_the_shape_stays(shape):
    b, _ = sandwich("Reshape", extra=[np.array(shape, np.int64)])
    b.annotate("relu", np.float32, [2, 3, 4])
    assert_kept(b.build(), "Reshape")


def test_reshape_of_an_intermediate_is_removed_once_shapes_are_inferred():
    b, _ = sandwich("Reshape", extra=[np.array([2, 3, 4], np.int64)])
    model = b.build()
    assert_kept(model, "Reshape")  # the Relu's output shape is unknown
    assert_removed(model, "Reshape", first=("infer-shapes",))


def test_expand_that_keeps_the_shape_is_removed():
    b, _ = sandwich("Expand", extra=[np.array([3, 1], np.int64)])
    b.annotate("relu", np.float32, [2, 3, 4])
    assert_removed(b.build(), "Expand", first=("infer-shapes",))


@pytest.mark.parametrize("dims, shape, removed", [
    (["N", 8], [1, 8], True),
    (["N", 8], [1], True),
    (["N", "M"], [1, 1], True),
    (["N", "M"], [1, 8], False),  # M may be 1, and then it grows to 8
    (["N", 8], [1, 1, 8], False),  # a longer rank
])
def test_expand_of_symbolic_dims_is_removed_only_where_no_dim_can_grow(dims, shape, removed):
    model = shape_op_model("Expand", dims, shape)
    optimized, result = eliminate(model)
    assert result.counters["removed"] == int(removed)
    feeds = symbolic_feeds(dims, {"N": 2, "M": 8}, {"N": 3, "M": 1})
    assert_equivalent(model, optimized, feeds)


def test_expand_that_grows_the_shape_stays():
    b, _ = sandwich("Expand", extra=[np.array([2, 2, 3, 4], np.int64)])
    b.annotate("relu", np.float32, [2, 3, 4])
    assert_kept(b.build(), "Expand")


def test_squeeze_without_axes_of_a_shape_without_ones_is_removed():
    b, _ = sandwich("Squeeze")
    b.annotate("relu", np.float32, [2, 3, 4])
    assert_removed(b.build(), "Squeeze", first=("infer-shapes",))


def test_squeeze_with_axes_stays():
    b, _ = sandwich("Squeeze", shape=(2, 1, 4), extra=[np.array([1], np.int64)])
    b.annotate("relu", np.float32, [2, 1, 4])
    assert_kept(b.build(), "Squeeze")


def test_squeeze_without_axes_of_a_shape_with_ones_stays():
    b, _ = sandwich("Squeeze", shape=(2, 1, 4))
    b.annotate("relu", np.float32, [2, 1, 4])
    assert_kept(b.build(), "Squeeze")


def test_identity_transpose_is_removed():
    b, _ = sandwich("Transpose", perm=[0, 1, 2])
    assert_removed(b.build(), "Transpose")


def test_transpose_without_perm_of_a_vector_is_removed():
    b, _ = sandwich("Transpose", shape=(5,))
    b.annotate("relu", np.float32, [5])
    assert_removed(b.build(), "Transpose", first=("infer-shapes",))


@pytest.mark.parametrize("perm", [[0, 2, 1], [2, 1, 0]])
def test_transpose_that_permutes_stays(perm):
    b, _ = sandwich("Transpose", perm=perm)
    assert_kept(b.build(), "Transpose")


def test_transpose_without_perm_of_a_matrix_stays():
    """No perm means "reverse the axes", which is a no-op only for rank <= 1."""
    b, _ = sandwich("Transpose", shape=(2, 3))
    b.annotate("relu", np.float32, [2, 3])
    assert_kept(b.build(), "Transpose")


def test_zero_pad_is_removed():
    b, _ = sandwich("Pad", extra=[np.zeros([6], np.int64)])
    assert_removed(b.build(), "Pad")


def test_zero_pad_attribute_before_opset_11_is_removed():
    b, _ = sandwich("Pad", opset=10, pads=[0] * 6)
    assert_removed(b.build(), "Pad")


def test_pad_with_non_zero_pads_stays():
    b, _ = sandwich("Pad", extra=[np.array([0, 0, 1, 0, 0, 0], np.int64)])
    assert_kept(b.build(), "Pad")


def test_pad_whose_pads_are_not_constant_stays():
    b, _ = sandwich("Pad", extra=["pads"])
    b.input("pads", [6], np.int64)
    assert_kept(b.build(), "Pad", [{"x": random([2, 3, 4]), "pads": np.zeros(6, np.int64)}])


# ----------------------------------------------------------------------------- Slice


def test_slice_of_everything_is_removed():
    b, _ = sandwich("Slice", extra=[np.array([0], np.int64), np.array([INT64_MAX], np.int64)])
    assert_removed(b.build(), "Slice")


def test_slice_to_the_dim_size_is_removed():
    b, _ = sandwich(
        "Slice", extra=[np.array([0, 0], np.int64), np.array([3, 4], np.int64), np.array([1, 2], np.int64)]
    )
    b.annotate("relu", np.float32, [2, 3, 4])
    assert_removed(b.build(), "Slice", first=("infer-shapes",))


def test_slice_attributes_before_opset_10_of_everything_are_removed():
    b, _ = sandwich("Slice", opset=9, starts=[0], ends=[INT64_MAX], axes=[1])
    assert_removed(b.build(), "Slice")


@pytest.mark.parametrize(
    "starts, ends, steps",
    [([1], [INT64_MAX], [1]), ([0], [2], [1]), ([0], [INT64_MAX], [2]), ([-1], [-INT64_MAX], [-1])],
    ids=["start-after-0", "end-before-dim", "step-2", "reversed"],
)
def test_slice_that_takes_a_part_stays(starts, ends, steps):
    extra = [np.array(values, np.int64) for values in (starts, ends, [1], steps)]
    b, _ = sandwich("Slice", extra=extra)
    b.annotate("relu", np.float32, [2, 3, 4])
    assert_kept(b.build(), "Slice")


def test_slice_to_a_given_end_of_an_unknown_shape_stays():
    b, _ = sandwich("Slice", extra=[np.array([0], np.int64), np.array([3], np.int64), np.array([1], np.int64)])
    assert_kept(b.build(), "Slice")  # the Relu's output shape is unknown, so 3 may cut it


def test_slice_whose_starts_are_not_constant_stays():
    b, _ = sandwich("Slice", extra=["starts", np.array([INT64_MAX], np.int64)])
    b.input("starts", [1], np.int64)
    assert_kept(b.build(), "Slice", [{"x": random([2, 3, 4]), "starts": np.array([1], np.int64)}])


# ----------------------------------------------------------------------------- one-input variadics


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
def test_variadic_op_with_one_input_is_removed(op):
    b, _ = sandwich(op)
    assert_removed(b.build(), op)


def test_concat_of_one_input_is_removed():
    b, _ = sandwich("Concat", axis=1)
    assert_removed(b.build(), "Concat")


def test_concat_of_two_inputs_stays():
    b, _ = sandwich("Concat", extra=["relu"], axis=1)
    assert_kept(b.build(), "Concat")


# ----------------------------------------------------------------------------- Split into one piece and Tile by ones


@pytest.mark.parametrize("opset, sizes, attrs", [
    (17, (), {"axis": 1}),                                      # no sizes: the whole axis
    (17, (np.array([3], np.int64),), {"axis": 1}),              # sizes as an input (opset 13+)
    (11, (), {"axis": -1, "split": [4]}),                       # sizes as an attribute
    (18, (), {"axis": 0, "num_outputs": 1}),
])
def test_split_into_one_piece_is_removed(opset, sizes, attrs):
    b, _ = sandwich("Split", extra=sizes, opset=opset, **attrs)
    assert_removed(b.build(), "Split", first=("infer-shapes",))


def test_split_into_one_piece_of_a_dynamic_axis_with_a_size_stays():
    """split=[4] of an axis of n: the original fails unless n is 4, and so must the result."""
    b = ModelBuilder(opset=17)
    x = b.input("x", ["n", 3], np.float32)
    relu = b.node("Relu", [x], ["relu"])
    piece = b.node("Split", [relu, b.initializer("sizes", np.array([4], np.int64))], ["piece"], axis=0)
    b.output(b.node("Neg", [piece], ["y"]))
    optimized, result = eliminate(b.build(), first=("infer-shapes",))
    assert not result.changed


def test_split_into_two_pieces_stays():
    b, _ = sandwich("Split", outputs=["a", "b"], axis=0)
    optimized, result = eliminate(b.build())
    assert not result.changed


def test_tile_by_ones_is_removed():
    b, _ = sandwich("Tile", extra=(np.ones(3, np.int64),))
    assert_removed(b.build(), "Tile")


def test_tile_that_repeats_stays():
    b, _ = sandwich("Tile", extra=(np.array([1, 2, 1], np.int64),))
    assert_kept(b.build(), "Tile")


# ----------------------------------------------------------------------------- neutral arithmetic


@pytest.mark.parametrize(
    "op, constant",
    [
        ("Add", np.array(0, np.float32)),
        ("Add", np.zeros([1], np.float32)),
        ("Add", np.zeros([1, 1, 1], np.float32)),
        ("Sub", np.array(0, np.float32)),
        ("Mul", np.array(1, np.float32)),
        ("Mul", np.ones([1, 1], np.float32)),
        ("Div", np.array(1, np.float32)),
    ],
)
def test_neutral_constant_on_the_right_is_removed(op, constant):
    b, _ = sandwich(op, extra=[constant])
    b.annotate("relu", np.float32, [2, 3, 4])
    assert_removed(b.build(), op, first=("infer-shapes",))


@pytest.mark.parametrize("op, neutral", [("Add", 0), ("Mul", 1)])
def test_neutral_constant_on_the_left_of_a_commutative_op_is_removed(op, neutral):
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    relu = b.node("Relu", [x], ["relu"])
    result = b.node(op, [b.initializer("neutral", np.array(neutral, np.float32)), relu])
    b.output(b.node("Neg", [result], ["y"]))
    assert_removed(b.build(), op)


@pytest.mark.parametrize("op, neutral", [("Sub", 0), ("Div", 1)])
def test_neutral_constant_on_the_left_of_a_non_commutative_op_stays(op, neutral):
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    relu = b.node("Relu", [x], ["relu"])
    result = b.node(op, [b.initializer("neutral", np.array(neutral, np.float32)), relu])
    b.output(b.node("Neg", [result], ["y"]))
    assert_kept(b.build(), op)


@pytest.mark.parametrize(
    "op, constant",
    [
        ("Add", np.array(1, np.float32)),
        ("Add", np.array([0, 0, 0, 1], np.float32)),
        ("Sub", np.array(2, np.float32)),
        ("Mul", np.array(0, np.float32)),
        ("Mul", np.array(-1, np.float32)),
        ("Div", np.array(2, np.float32)),
    ],
)
def test_non_neutral_constant_stays(op, constant):
    b, _ = sandwich(op, extra=[constant])
    b.annotate("relu", np.float32, [2, 3, 4])
    assert_kept(b.build(), op)


def test_add_of_a_zero_that_broadcasts_x_to_a_bigger_shape_stays():
    """x[3] + zeros[2, 3] has shape [2, 3]: the zero tensor is not neutral for the shape."""
    b = ModelBuilder()
    x = b.input("x", [3])
    total = b.node("Add", [x, b.initializer("zeros", np.zeros([2, 3], np.float32))])
    b.output(b.node("Neg", [total], ["y"]))
    assert_kept(b.build(), "Add")


def test_add_of_a_one_element_zero_of_higher_rank_stays():
    """x[3] + zeros[1, 1] has shape [1, 3]."""
    b = ModelBuilder()
    x = b.input("x", [3])
    total = b.node("Add", [x, b.initializer("zeros", np.zeros([1, 1], np.float32))])
    b.output(b.node("Neg", [total], ["y"]))
    assert_kept(b.build(), "Add")


def test_add_of_a_one_element_zero_of_unknown_relative_rank_stays():
    b, _ = sandwich("Add", extra=[np.zeros([1, 1, 1, 1], np.float32)])
    assert_kept(b.build(), "Add")


def test_add_of_two_variables_stays():
    b, _ = sandwich("Add", extra=["relu"])
    assert_kept(b.build(), "Add")


@pytest.mark.parametrize(
    "op, constant",
    [
        ("Add", np.zeros([4], np.float32)),
        ("Add", np.zeros([3, 4], np.float32)),
        ("Add", np.zeros([2, 3, 4], np.float32)),
        ("Add", np.zeros([1, 3, 1], np.float32)),
        ("Add", np.array([0.0, -0.0, 0.0, -0.0], np.float32)),
        ("Sub", np.zeros([2, 1, 4], np.float32)),
        ("Mul", np.ones([3, 4], np.float32)),
        ("Div", np.ones([4], np.float32)),
        ("Pow", np.ones([3, 1], np.float32)),
        ("Pow", np.ones([4], np.int64)),
    ],
)
def test_neutral_tensor_that_keeps_the_shape_is_removed(op, constant):
    """A zero or one tensor of several elements is as neutral as a scalar when broadcasting it
    against x gives x's shape."""
    b, _ = sandwich(op, extra=[constant])
    assert_removed(b.build(), op, first=("infer-shapes",))


@pytest.mark.parametrize("constant", [np.zeros([4], np.float32), np.zeros([1, 4], np.float32)])
def test_neutral_tensor_against_a_dynamic_dim_is_removed(constant):
    """x[N, 4] + zeros: the zeros' dims are 1 where x's is N, so N is what it was, at any size."""
    b = ModelBuilder()
    x = b.input("x", ["N", 4])
    relu = b.node("Relu", [x], ["relu"])
    b.output(b.node("Neg", [b.node("Add", [relu, b.initializer("zeros", constant)])], ["y"]))
    model = b.build()
    optimized = assert_removed(model, "Add", first=("infer-shapes",))
    assert_equivalent(model, optimized, [{"x": random([size, 4], size)} for size in (1, 5)])


def test_neutral_tensor_against_a_dynamic_dim_it_could_enlarge_stays():
    """x[N, 4] + zeros[2, 4] is [2, 4] when N is 1: not x."""
    b = ModelBuilder()
    x = b.input("x", ["N", 4])
    relu = b.node("Relu", [x], ["relu"])
    b.output(b.node("Neg", [b.node("Add", [relu, b.initializer("zeros", np.zeros([2, 4], np.float32))])], ["y"]))
    optimized, result = eliminate(b.build(), first=("infer-shapes",))
    assert not result.changed and ops(optimized)["Add"] == 1


@pytest.mark.parametrize(
    "op, constant",
    [
        ("Add", np.zeros([2, 2, 1, 4], np.float32)),  # one more dim
        ("Add", np.zeros([3, 4], np.float32)),  # x's 1 becomes 3
        ("Add", np.array([0, 0, 0, 1e-30], np.float32)),
        ("Mul", np.array([1, 1, 1, -1], np.float32)),
    ],
)
def test_tensor_that_is_not_neutral_or_changes_the_shape_stays(op, constant):
    b, _ = sandwich(op, shape=(2, 1, 4), extra=[constant])
    model = b.build()
    optimized, result = eliminate(model, first=("infer-shapes",))
    assert not result.changed and ops(optimized) == ops(model)


def test_pow_of_an_integer_by_one_stays():
    """onnxruntime computes an integer power in double: x**1 is not x beyond 2**53."""
    b, _ = sandwich("Pow", dtype=np.int64, extra=[np.ones([4], np.int64)])
    optimized, result = eliminate(b.build(check=False), first=("infer-shapes",))
    assert not result.changed


@pytest.mark.parametrize("op, constant", [("And", np.ones([4], np.bool_)), ("Or", np.zeros([3, 4], np.bool_)),
                                          ("Xor", np.zeros([1], np.bool_))])
def test_neutral_logic_is_removed(op, constant):
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    flag = b.node("Not", [x], ["relu"])  # named as sandwich's: the reader must read it afterwards
    b.output(b.node("Not", [b.node(op, [flag, b.initializer("neutral", constant)])], ["y"]))
    model = b.build()
    model.graph.input[0].type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(np.bool_))
    model.graph.output[0].type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(np.bool_))
    optimized, result = eliminate(model, first=("infer-shapes",))
    assert result.counters["removed"] == 1 and ops(optimized)[op] == 0
    assert_equivalent(model, optimized)


@pytest.mark.parametrize("op, neutral", [("BitwiseAnd", -1), ("BitwiseOr", 0), ("BitwiseXor", 0)])
def test_neutral_bitwise_operand_is_removed(op, neutral):
    b, _ = sandwich(op, opset=18, dtype=np.int32, extra=[np.full([3, 4], neutral, np.int32)])
    assert_removed(b.build(), op, first=("infer-shapes",))


def where_model(condition, a_shape, b_shape):
    """Where(c, Relu(a), Neg(b)) -> Abs -> y, with c a constant."""
    b = ModelBuilder()
    first = b.node("Relu", [b.input("a", a_shape)], ["first"])
    second = b.node("Neg", [b.input("b", b_shape)], ["second"])
    chosen = b.node("Where", [b.initializer("c", np.asarray(condition)), first, second])
    b.output(b.node("Abs", [chosen], ["y"]))
    return b.build()


@pytest.mark.parametrize("condition, a_shape, b_shape, kept", [
    (np.ones([3, 4], np.bool_), [2, 3, 4], [1, 4], "first"),
    (np.array(True), [2, 3, 4], [2, 3, 4], "first"),
    (np.zeros([1, 4], np.bool_), [2, 3, 4], [2, 3, 4], "second"),
    (np.array([False]), [3, 4], [2, 3, 4], "second"),
])
def test_where_with_a_constant_condition_is_its_side(condition, a_shape, b_shape, kept):
    model = where_model(condition, a_shape, b_shape)
    optimized, result = eliminate(model, first=("infer-shapes",))
    assert result.counters["removed"] == 1 and ops(optimized)["Where"] == 0
    abs_node = next(node for node in optimized.graph.node if node.op_type == "Abs")
    assert list(abs_node.input) == [kept]
    assert_equivalent(model, optimized)


@pytest.mark.parametrize("condition, a_shape, b_shape", [
    (np.array([True, False, True, True]), [2, 3, 4], [2, 3, 4]),  # mixed
    (np.ones([2, 3, 4], np.bool_), [3, 4], [3, 4]),  # the condition enlarges the side it picks
    (np.ones([4], np.bool_), [3, 4], [2, 3, 4]),  # the other side does
])
def test_where_that_mixes_or_broadcasts_stays(condition, a_shape, b_shape):
    model = where_model(condition, a_shape, b_shape)
    optimized, result = eliminate(model, first=("infer-shapes",))
    assert not result.changed and ops(optimized)["Where"] == 1


def test_identity_read_inside_branches_is_removed():
    """Body nodes that read the Identity's output from the outer scope are rewired too."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    copied = b.node("Identity", [b.node("Relu", [x], ["relu"])])
    then = b.branch()
    then.output(then.node("Neg", [copied]))
    other = b.branch()
    other.output(other.node("Abs", [copied]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    optimized, result = eliminate(model)

    assert result.counters["removed"] == 1 and ops(optimized)["Identity"] == 0
    then_body, else_body = branches(optimized)
    assert list(then_body.node[0].input) == ["relu"] and list(else_body.node[0].input) == ["relu"]
    assert_equivalent(model, optimized, [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])


def test_dropout_whose_mask_is_read_by_a_node_stays():
    b, (_, mask) = sandwich("Dropout", outputs=2)
    b.output(b.node("Not", [mask]))
    assert_kept(b.build(), "Dropout")
