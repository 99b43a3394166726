"""eliminate-common-subexpressions: nodes computing the same value are merged, and the cases where they must not be."""

import numpy as np
import onnx
from onnx import TensorProto, helper
from builder import (
    ModelBuilder,
    assert_equivalent,
    branches,
    feeds_at_two_sizes,
    ops,
    output_names,
    random,
    run_pass,
    run_passes,
    top_ops,
)


def cse(model):
    return run_pass(model, "eliminate-common-subexpressions")


def cse_and_clean(model):
    """The pass leaves the merged duplicates to dead-node elimination, as the pipeline does."""
    merged, result = cse(model)
    return run_passes(merged, "eliminate-dead-nodes"), result


def two_readers(first_op, second_op, first_inputs, second_inputs, *, first_attrs=None, second_attrs=None, **options):
    """x -> Relu -> (first_op, second_op) -> Add -> y: two candidate nodes whose results meet."""
    b = ModelBuilder(**options)
    x = b.input("x", [2, 3])
    relu = b.node("Relu", [x], ["relu"])
    names = {"relu": relu, "x": x}
    first = b.node(first_op, [names.get(name, name) for name in first_inputs], ["first"], **(first_attrs or {}))
    second = b.node(second_op, [names.get(name, name) for name in second_inputs], ["second"], **(second_attrs or {}))
    b.output(b.node("Add", [first, second], ["y"]))
    return b


def assert_merged(model, op, count=1):
    optimized, result = cse_and_clean(model)
    assert result.changed and result.counters["merged"] == count
    assert ops(optimized)[op] == ops(model)[op] - count
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized)
    return optimized


def assert_not_merged(model, feeds=None):
    optimized, result = cse_and_clean(model)
    assert not result.changed and result.counters["merged"] == 0
    assert ops(optimized) == ops(model)
    if feeds is not False:
        assert_equivalent(model, optimized, feeds)


# ----------------------------------------------------------------------------- merging


def test_two_identical_nodes_become_one():
    model = two_readers("Sigmoid", "Sigmoid", ["relu"], ["relu"]).build()

    optimized = assert_merged(model, "Sigmoid")

    add = next(node for node in optimized.graph.node if node.op_type == "Add")
    assert list(add.input) == ["first", "first"]  # the reader of the duplicate reads the first


def test_a_duplicated_chain_goes_in_one_run():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    left = b.node("Neg", [b.node("Exp", [x])])
    right = b.node("Neg", [b.node("Exp", [x])])
    b.output(b.node("Add", [left, right], ["y"]))
    model = b.build()

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 2 and top_ops(optimized.graph) == ["Exp", "Neg", "Add"]
    assert_equivalent(model, optimized)


def test_equal_attributes_merge():
    model = two_readers(
        "Transpose", "Transpose", ["relu"], ["relu"], first_attrs={"perm": [1, 0]}, second_attrs={"perm": [1, 0]}
    ).build()
    assert_merged(model, "Transpose")


def test_equal_constants_count_as_the_same_input():
    """Two initializers with the same dtype, shape and bytes: exporters write many such small constants."""
    b = two_readers("Mul", "Mul", ["relu", "two_a"], ["relu", "two_b"])
    b.initializer("two_a", np.array(2, np.float32))
    b.initializer("two_b", np.array(2, np.float32))
    assert_merged(b.build(), "Mul")


def test_nodes_with_several_outputs_merge_output_by_output():
    b = ModelBuilder()
    x = b.input("x", [4, 3])
    first = b.node("Split", [x], 2, axis=0)
    second = b.node("Split", [x], 2, axis=0)
    b.output(b.node("Sub", [first[0], second[1]], ["y"]))
    b.output(b.node("Sub", [second[0], first[1]], ["z"]))
    model = b.build()

    optimized = assert_merged(model, "Split")

    split = next(node for node in optimized.graph.node if node.op_type == "Split")
    subs = [list(node.input) for node in optimized.graph.node if node.op_type == "Sub"]
    assert subs == [list(split.output), list(split.output)]


def test_duplicate_writing_a_graph_output_hands_its_name_to_the_kept_node():
    """The model output `y` keeps its name: the first Relu writes it, and the Neg reads it."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    first = b.node("Relu", [x], ["first"])
    b.output(b.node("Neg", [first], ["z"]))
    b.output(b.node("Relu", [x], ["y"]))
    model = b.build()

    optimized = assert_merged(model, "Relu")

    relu, neg = optimized.graph.node
    assert list(relu.output) == ["y"] and list(neg.input) == ["y"]
    assert output_names(optimized) == ["z", "y"]


def test_duplicates_in_a_branch_merge_and_body_readers_of_outer_duplicates_are_rewired():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    outer_first = b.node("Exp", [x], ["outer_first"])
    outer_second = b.node("Exp", [x], ["outer_second"])
    then = b.branch()
    then.output(then.node("Add", [then.node("Abs", [outer_second]), then.node("Abs", [outer_second])]))
    other = b.branch()
    other.output(other.node("Neg", [outer_first]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 2 and ops(optimized)["Exp"] == 1 and ops(optimized)["Abs"] == 1
    then_body, _ = branches(optimized)
    assert list(then_body.node[0].input) == ["outer_first"]
    feeds = [{"x": random([2, 3], seed), "c": np.array(flag)} for seed, flag in ((0, True), (1, False))]
    assert_equivalent(model, optimized, feeds)


def test_duplicates_in_a_loop_body_merge_and_a_body_output_keeps_its_name():
    """The second Mul writes the body output `next`: the kept Mul takes that name."""
    b = ModelBuilder()
    x = b.input("x", [3])
    weight = b.initializer("w", random([3], seed=7))
    body = b.branch()
    body.inputs = [
        helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
        helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("accumulated", TensorProto.FLOAT, [3]),
    ]
    scaled = body.node("Mul", ["accumulated", weight], ["scaled"])
    body.output(body.node("Identity", ["condition_in"]), np.bool_, [])
    body.output(body.node("Mul", ["accumulated", weight], ["next"]), np.float32, [3])
    body.output(body.node("Add", [scaled, "next"]), np.float32, [3])
    trips, keep_going = b.initializer("trips", np.array(3, np.int64)), b.initializer("keep_going", np.array(True))
    y, sums = b.node("Loop", [trips, keep_going, x], ["y", "sums"], body=body.graph())
    b.output(y, np.float32, [3])
    b.output(sums, np.float32, [3, 3])
    model = b.build()

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 1
    loop = next(node for node in optimized.graph.node if node.op_type == "Loop")
    (optimized_body,) = [attribute.g for attribute in loop.attribute]
    assert top_ops(optimized_body) == ["Mul", "Identity", "Add"]
    assert list(optimized_body.node[0].output) == ["next"] and list(optimized_body.node[2].input) == ["next", "next"]
    assert_equivalent(model, optimized)


# ----------------------------------------------------------------------------- across scopes


def shape_in_both_scopes(*, outer_after_if=False, branch_output=False):
    """x[n, 3] -> Shape -> Gather(1): computed at the top level and again in the then branch.
    The condition is an input, so both branches are exercised at two sizes of n."""
    b = ModelBuilder()
    x = b.input("x", ["n", 3])
    condition = b.input("c", [], np.bool_)
    axis = b.initializer("axis", np.array(1, np.int64))

    def outer():
        return b.node("Gather", [b.node("Shape", [x], ["outer_shape"]), axis], ["outer_width"], axis=0)

    width = None if outer_after_if else outer()
    then = b.branch()
    inner = then.node("Gather", [then.node("Shape", [x], ["inner_shape"]), axis], ["inner_width"], axis=0)
    if branch_output:
        then.output(inner)
    else:
        then.output(then.node("Mul", [inner, inner], ["then_out"]))
    other = b.branch()
    other.output(other.node("Neg", [axis], ["else_out"]))
    chosen = b.if_node(condition, then, other)
    if outer_after_if:
        width = outer()
    b.output(b.node("Add", [chosen, width], ["y"]))
    return b.build()


def feeds_for_both_branches(model):
    return [{**feed, "c": np.array(flag)} for feed in feeds_at_two_sizes(model) for flag in (True, False)]


def test_a_branch_node_repeating_an_outer_one_reads_the_outer_value():
    model = shape_in_both_scopes()

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 2  # the Shape, then the Gather that now reads the outer Shape
    then_body, _ = branches(optimized)
    assert top_ops(then_body) == ["Mul"] and list(then_body.node[0].input) == ["outer_width", "outer_width"]
    assert ops(optimized)["Shape"] == 1 and ops(optimized)["Gather"] == 1
    assert_equivalent(model, optimized, feeds_for_both_branches(model))
    again, second = cse_and_clean(optimized)
    assert not second.changed and again == optimized


def test_an_outer_node_after_the_if_is_not_read_by_its_branch():
    """The If runs before that node: its branch cannot read what is computed later."""
    model = shape_in_both_scopes(outer_after_if=True)

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 0 and ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds_for_both_branches(model))


def test_a_branch_output_is_still_computed_in_the_branch():
    """A body output must be produced inside the body; the Shape before it still merges."""
    model = shape_in_both_scopes(branch_output=True)

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 1
    then_body, _ = branches(optimized)
    assert top_ops(then_body) == ["Gather"] and list(then_body.node[0].input) == ["outer_shape", "axis"]
    assert_equivalent(model, optimized, feeds_for_both_branches(model))


def test_a_node_two_bodies_deep_reads_the_top_level_value():
    b = ModelBuilder()
    x = b.input("x", ["n", 3])
    first, second = b.input("c", [], np.bool_), b.input("d", [], np.bool_)
    outer = b.node("Exp", [x], ["outer_exp"])
    inner_then = b.branch()
    inner_then.output(inner_then.node("Abs", [inner_then.node("Exp", [x], ["inner_exp"])], ["deep_out"]))
    inner_else = b.branch()
    inner_else.output(inner_else.node("Neg", [x], ["deep_neg"]))
    then = b.branch()
    then.output(then.if_node(second, inner_then, inner_else))
    other = b.branch()
    other.output(other.node("Sigmoid", [x], ["else_out"]))
    b.output(b.node("Add", [b.if_node(first, then, other), outer], ["y"]))
    model = b.build()

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 1 and ops(optimized)["Exp"] == 1
    feeds = [
        {**feed, "c": np.array(c), "d": np.array(d)}
        for feed in feeds_at_two_sizes(model)
        for c in (True, False)
        for d in (True, False)
    ]
    assert_equivalent(model, optimized, feeds)


def test_a_loop_invariant_node_repeating_an_outer_one_reads_the_outer_value():
    """Also when the loop runs no iteration: the outer node runs anyway, the body not at all."""
    b = ModelBuilder()
    x = b.input("x", ["n"])
    trips = b.input("trips", [], np.int64)
    keep_going = b.initializer("keep_going", np.array(True))
    outer = b.node("Exp", [x], ["outer_exp"])
    body = b.branch()
    body.inputs = [
        helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
        helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("accumulated", TensorProto.FLOAT, ["n"]),
    ]
    body.output(body.node("Identity", ["condition_in"]), np.bool_, [])
    body.output(body.node("Add", ["accumulated", body.node("Exp", [x], ["inner_exp"])], ["next"]), np.float32, ["n"])
    (total,) = [b.node("Loop", [trips, keep_going, x], ["total"], body=body.graph())]
    b.output(b.node("Mul", [total, outer], ["y"]), np.float32, ["n"])
    model = b.build()

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 1 and ops(optimized)["Exp"] == 1
    feeds = [{"x": feed["x"], "trips": np.array(count, np.int64)} for feed in feeds_at_two_sizes(model) for count in (0, 3)]
    assert_equivalent(model, optimized, feeds)


def both_branches(then_ops, else_ops, *, local_constant=False):
    """x[n, 3], c -> If: each branch applies its chain of ops to x ending in a Mul by 2; a chain is
    a list of (op, attrs). With `local_constant` the branches read their own initializer."""
    b = ModelBuilder()
    x = b.input("x", ["n", 3])
    condition = b.input("c", [], np.bool_)
    two = b.initializer("two", np.array(2.0, np.float32))

    def branch(chain):
        body = b.branch()
        value = x
        for op, attrs in chain:
            if local_constant and op == "Add":
                body.initializers.append(onnx.numpy_helper.from_array(np.full([3], 0.5, np.float32), body.fresh("half")))
                value = body.node("Add", [value, body.initializers[-1].name])
            else:
                value = body.node(op, [value], **attrs)
        body.output(body.node("Mul", [value, two]))
        return body

    b.output(b.if_node(condition, branch(then_ops), branch(else_ops)), np.float32, ["n", 3])
    return b.build()


def hoist(model):
    optimized, result = cse_and_clean(model)
    assert_equivalent(model, optimized, feeds_for_both_branches(model))
    again, second = cse_and_clean(optimized)
    assert not second.changed and again == optimized
    return optimized, result


def test_what_both_branches_compute_from_outer_values_is_computed_once_before_the_if():
    model = both_branches([("Exp", {}), ("Abs", {}), ("Neg", {})], [("Exp", {}), ("Abs", {}), ("Sigmoid", {})])

    optimized, result = hoist(model)

    assert result.counters["hoisted"] == 2 and ops(optimized)["Exp"] == 1 and ops(optimized)["Abs"] == 1
    assert top_ops(optimized.graph) == ["Exp", "Abs", "If"]
    then_body, else_body = branches(optimized)
    assert top_ops(then_body) == ["Neg", "Mul"] and top_ops(else_body) == ["Sigmoid", "Mul"]


def test_a_node_only_one_branch_computes_stays_there():
    model = both_branches([("Exp", {})], [("Softplus", {})])

    optimized, result = hoist(model)

    assert result.counters["hoisted"] == 0 and ops(optimized) == ops(model)
    assert top_ops(optimized.graph) == ["If"]


def test_nodes_that_differ_in_an_attribute_stay_in_their_branches():
    model = both_branches([("Softmax", {"axis": 0})], [("Softmax", {"axis": 1})])

    optimized, result = hoist(model)

    assert result.counters["hoisted"] == 0 and top_ops(optimized.graph) == ["If"]


def test_a_branch_output_is_not_hoisted():
    """Both branches end in Mul(x', 2) of equal values: each still writes its own output."""
    model = both_branches([("Exp", {})], [("Exp", {})])

    optimized, result = hoist(model)

    assert result.counters["hoisted"] == 1
    then_body, else_body = branches(optimized)
    assert top_ops(then_body) == ["Mul"] and top_ops(else_body) == ["Mul"]


def test_a_hoisted_node_takes_the_branch_initializer_it_reads_along():
    model = both_branches([("Add", {}), ("Exp", {})], [("Add", {}), ("Neg", {})], local_constant=True)

    optimized, result = hoist(model)

    assert result.counters["hoisted"] == 1 and top_ops(optimized.graph) == ["Add", "If"]


def test_an_if_in_a_loop_body_hoists_into_the_loop_body_not_out_of_the_loop():
    """The loop may run no iteration: nothing leaves it, though every iteration computes it."""
    b = ModelBuilder()
    x = b.input("x", ["n"])
    trips = b.input("trips", [], np.int64)
    condition = b.input("c", [], np.bool_)
    keep_going = b.initializer("keep_going", np.array(True))
    body = b.branch()
    body.inputs = [
        helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
        helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("accumulated", TensorProto.FLOAT, ["n"]),
    ]
    then, other = b.branch(), b.branch()
    then.output(then.node("Neg", [then.node("Exp", [x])]))
    other.output(other.node("Abs", [other.node("Exp", [x])]))
    body.output(body.node("Identity", ["condition_in"]), np.bool_, [])
    body.output(body.node("Add", ["accumulated", body.if_node(condition, then, other)], ["next"]), np.float32, ["n"])
    b.output(b.node("Loop", [trips, keep_going, x], ["total"], body=body.graph()), np.float32, ["n"])
    model = b.build()

    optimized, result = cse_and_clean(model)

    assert result.counters["hoisted"] == 1
    loop = next(node for node in optimized.graph.node if node.op_type == "Loop")
    (loop_body,) = [attribute.g for attribute in loop.attribute]
    assert top_ops(optimized.graph) == ["Loop"] and top_ops(loop_body) == ["Identity", "Exp", "If", "Add"]
    feeds = [
        {"x": feed["x"], "trips": np.array(count, np.int64), "c": np.array(flag)}
        for feed in feeds_at_two_sizes(model)
        for count in (0, 2)
        for flag in (True, False)
    ]
    assert_equivalent(model, optimized, feeds)


def test_a_second_run_changes_nothing():
    model = two_readers("Sigmoid", "Sigmoid", ["relu"], ["relu"]).build()
    once, _ = cse_and_clean(model)
    _, result = cse(once)
    assert not result.changed


def test_readers_met_before_a_name_handover_still_merge_in_the_same_run():
    """Once the kept Relu writes `y`, the Neg that read its old output and the Neg of `y` are duplicates."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    first_neg = b.node("Neg", [b.node("Relu", [x], ["first"])])
    y = b.output(b.node("Relu", [x], ["y"]))
    b.output(b.node("Add", [first_neg, b.node("Neg", [y])], ["z"]))
    model = b.build()

    optimized, result = cse_and_clean(model)

    assert result.counters["merged"] == 2 and top_ops(optimized.graph) == ["Relu", "Neg", "Add"]
    assert output_names(optimized) == ["y", "z"]
    assert_equivalent(model, optimized)
    _, again = cse(optimized)
    assert not again.changed


# ----------------------------------------------------------------------------- must not merge


def test_different_attributes_do_not_merge():
    b = ModelBuilder()
    x = b.input("x", [3, 3])
    first = b.node("Transpose", [x], ["first"], perm=[1, 0])
    second = b.node("Transpose", [x], ["second"], perm=[0, 1])
    b.output(b.node("Add", [first, second], ["y"]))
    assert_not_merged(b.build())


def test_zero_and_negative_zero_attributes_do_not_merge():
    """0.0 == -0.0 in Python, but they are different floats: attributes compare by bits."""
    model = two_readers(
        "LeakyRelu", "LeakyRelu", ["relu"], ["relu"], first_attrs={"alpha": 0.0}, second_attrs={"alpha": -0.0}
    ).build()
    assert_not_merged(model)


def test_zero_and_negative_zero_constants_do_not_merge():
    b = two_readers("Max", "Max", ["relu", "low_a"], ["relu", "low_b"])
    b.initializer("low_a", np.array(0.0, np.float32))
    b.initializer("low_b", np.array(-0.0, np.float32))
    assert_not_merged(b.build())


def test_swapped_inputs_do_not_merge():
    assert_not_merged(two_readers("Sub", "Sub", ["relu", "x"], ["x", "relu"]).build())


def test_constants_of_other_values_or_types_do_not_merge():
    b = two_readers("Mul", "Mul", ["relu", "a"], ["relu", "b"])
    b.initializer("a", np.array(2, np.float32))
    b.initializer("b", np.array([2], np.float32))  # same bytes, another shape
    assert_not_merged(b.build())


def test_nondeterministic_nodes_do_not_merge():
    model = two_readers("RandomUniformLike", "RandomUniformLike", ["relu"], ["relu"]).build()
    assert_not_merged(model, feeds=False)  # random outputs: structure only


def test_custom_domain_nodes_do_not_merge():
    b = ModelBuilder()
    b.use_domain("com.example")
    x = b.input("x", [2])
    first = b.node("Sample", [x], ["first"], domain="com.example")
    second = b.node("Sample", [x], ["second"], domain="com.example")
    b.output(b.node("Add", [first, second], ["y"]), np.float32, [2])
    model = b.build(check=False)

    optimized, result = run_pass(model, "eliminate-common-subexpressions")

    assert not result.changed and ops(optimized)["com.example::Sample"] == 2


def test_nodes_owning_subgraphs_do_not_merge():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    ifs = []
    for _ in range(2):
        then, other = b.branch(), b.branch()
        then.output(then.node("Relu", [x]))
        other.output(other.node("Neg", [x]))
        ifs.append(b.if_node(condition, then, other))
    b.output(b.node("Add", ifs, ["y"]))
    model = b.build()
    feeds = [{"x": random([2, 3], seed), "c": np.array(flag)} for seed, flag in ((0, True), (1, False))]
    assert_not_merged(model, feeds)


def test_two_duplicates_that_are_both_graph_outputs_stay():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.output(b.node("Relu", [x], ["y"]))
    b.output(b.node("Relu", [x], ["z"]))
    assert_not_merged(b.build())

