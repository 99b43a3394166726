"""fuse-transposes: Transpose(Transpose(x)) becomes one Transpose, or nothing when the two cancel."""

import numpy as np
import onnx.numpy_helper
import pytest
from builder import ModelBuilder, assert_equivalent, branches, ops, output_names, random, run_pass, run_passes, top_ops


def fuse(model):
    """Infer shapes, fuse, then remove the first Transposes left unread (as the pipeline does)."""
    fused, result = run_pass(model, "fuse-transposes", first=("infer-shapes",))
    return run_passes(fused, "eliminate-dead-nodes"), result


def chain(first_perm, second_perm, shape=(2, 3, 4)):
    """x -> Relu -> Transpose(first) -> Transpose(second) -> Neg -> y."""
    b = ModelBuilder()
    x = b.input("x", list(shape))
    first_attrs = {} if first_perm is None else {"perm": first_perm}
    first = b.node("Transpose", [b.node("Relu", [x], ["relu"])], ["between"], **first_attrs)
    second = b.node("Transpose", [first], ["second"], perm=second_perm)
    b.output(b.node("Neg", [second], ["y"]))
    return b


def perm_of(model):
    node = next(node for node in model.graph.node if node.op_type == "Transpose")
    return list(next(attribute for attribute in node.attribute if attribute.name == "perm").ints)


@pytest.mark.parametrize(
    "first_perm, second_perm, composed",
    [([1, 2, 0], [0, 2, 1], [1, 0, 2]), ([0, 2, 1], [2, 0, 1], [1, 0, 2]), ([2, 0, 1], [2, 0, 1], [1, 2, 0])],
)
def test_two_transposes_become_one(first_perm, second_perm, composed):
    model = chain(first_perm, second_perm).build()

    fused, result = fuse(model)

    assert result.counters == {"fused": 1, "cancelled": 0, "as_reshape": 0}
    assert top_ops(fused.graph) == ["Relu", "Transpose", "Neg"] and perm_of(fused) == composed
    assert_equivalent(model, fused)


@pytest.mark.parametrize("first_perm, second_perm", [([0, 2, 1], [0, 2, 1]), ([1, 2, 0], [2, 0, 1])])
def test_transposes_that_cancel_disappear(first_perm, second_perm):
    model = chain(first_perm, second_perm).build()

    fused, result = fuse(model)

    assert result.counters == {"fused": 0, "cancelled": 1, "as_reshape": 0}
    assert top_ops(fused.graph) == ["Relu", "Neg"] and list(fused.graph.node[1].input) == ["relu"]
    assert_equivalent(model, fused)


def test_first_transpose_without_perm_reverses_the_known_rank():
    b = chain(None, [2, 1, 0])
    b.annotate("relu", np.float32, [2, 3, 4])
    model = b.build()

    fused, result = fuse(model)

    assert result.counters["cancelled"] == 1 and top_ops(fused.graph) == ["Relu", "Neg"]
    assert_equivalent(model, fused)


def test_every_transpose_reader_is_composed_and_the_first_goes():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    first = b.node("Transpose", [b.node("Relu", [x])], perm=[1, 2, 0])
    b.output(b.node("Transpose", [first], ["y"], perm=[2, 0, 1]))
    b.output(b.node("Transpose", [first], ["z"], perm=[0, 2, 1]))
    model = b.build()

    fused, result = fuse(model)

    assert result.counters == {"fused": 1, "cancelled": 1, "as_reshape": 0}
    assert ops(fused)["Transpose"] == 1 and output_names(fused) == ["y", "z"]
    assert list(fused.graph.node[0].output) == ["y"]  # the cancelled pair: the Relu writes `y` itself
    assert_equivalent(model, fused)


def test_transposes_in_a_branch_are_fused():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    first = then.node("Transpose", [then.node("Relu", [x])], perm=[1, 2, 0])
    then.output(then.node("Transpose", [first], perm=[0, 2, 1]))
    other = b.branch()
    other.output(other.node("Transpose", [x], perm=[1, 0, 2]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    fused, result = fuse(model)

    assert result.counters["fused"] == 1 and top_ops(branches(fused)[0]) == ["Relu", "Transpose"]
    feeds = [{"x": random([2, 3, 4], seed), "c": np.array(flag)} for seed, flag in ((0, True), (1, False))]
    assert_equivalent(model, fused, feeds)


def test_a_second_run_changes_nothing():
    fused, _ = fuse(chain([1, 2, 0], [0, 2, 1]).build())
    _, result = run_pass(fused, "fuse-transposes")
    assert not result.changed


# ----------------------------------------------------------------------------- must not fire


def test_first_transpose_with_another_reader_stays():
    """Composing would leave the first Transpose for its other reader: no node saved."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    first = b.node("Transpose", [b.node("Relu", [x])], perm=[1, 2, 0])
    b.output(b.node("Transpose", [first], ["y"], perm=[0, 2, 1]))
    b.output(b.node("Neg", [first], ["z"]))
    model = b.build()

    fused, result = fuse(model)

    assert not result.changed and ops(fused) == ops(model)
    assert_equivalent(model, fused)


def test_first_transpose_writing_a_graph_output_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    first = b.output(b.node("Transpose", [b.node("Relu", [x])], ["between"], perm=[1, 2, 0]))
    b.output(b.node("Transpose", [first], ["y"], perm=[0, 2, 1]))
    model = b.build()

    fused, result = fuse(model)

    assert not result.changed and ops(fused) == ops(model)


def test_first_transpose_without_perm_of_unknown_rank_stays():
    model = chain(None, [2, 1, 0]).build()
    fused, result = run_pass(model, "fuse-transposes")  # no shape inference: the Relu's rank is unknown
    assert not result.changed and ops(fused) == ops(model)
    assert_equivalent(model, fused)


# ----------------------------------------------------------------------------- a Transpose of size-1 axes as a Reshape


def unit_axes(shape, perm):
    """x -> Relu -> Transpose(perm) -> Neg -> y."""
    b = ModelBuilder()
    x = b.input("x", list(shape))
    moved = b.node("Transpose", [b.node("Relu", [x], ["relu"])], ["moved"], perm=perm)
    b.output(b.node("Neg", [moved], ["y"]))
    return b.build()


def reshape_target(model):
    node = next(node for node in model.graph.node if node.op_type == "Reshape")
    initializer = next(tensor for tensor in model.graph.initializer if tensor.name == node.input[1])
    return list(onnx.numpy_helper.to_array(initializer))


@pytest.mark.parametrize("shape, perm, target", [
    ((1, 6, 91, 1, 1), [0, 3, 4, 1, 2], [1, 1, 1, 6, 91]),   # a detector head's 1×1 level
    ((2, 1, 5), [1, 0, 2], [1, 2, 5]),
    (("n", 7, 1), [0, 2, 1], [0, 1, 7]),                     # a dynamic dim in place is copied
    ((1, "n", 4), [1, 0, 2], [-1, 1, 4]),                    # one that moves is -1
])
def test_transpose_that_moves_only_size_1_axes_becomes_a_reshape(shape, perm, target):
    model = unit_axes(shape, perm)

    fused, result = fuse(model)

    assert result.counters["as_reshape"] == 1
    assert top_ops(fused.graph) == ["Relu", "Reshape", "Neg"] and reshape_target(fused) == target
    sizes = [{"x": np.ones([3 if isinstance(dim, str) else dim for dim in shape], np.float32)},
             {"x": random([5 if isinstance(dim, str) else dim for dim in shape])}]
    assert_equivalent(model, fused, sizes)


def test_transpose_of_a_zero_size_dynamic_dim_as_reshape_still_runs():
    model = unit_axes((1, "n", 4), [1, 0, 2])
    fused, _ = fuse(model)
    assert_equivalent(model, fused, {"x": np.ones([1, 0, 4], np.float32)})


@pytest.mark.parametrize("shape, perm", [
    ((2, 3, 1), [1, 0, 2]),             # two axes of size 2 and 3 swap
    (("n", "m", 1), [2, 1, 0]),         # two dynamic dims move: no target says that
    (("n", 1, "m"), [1, 0, 2]),         # one moves (-1), one is copied (0): ambiguous with a 0-size dim
    ((0, 1, 3), [1, 0, 2]),             # a zero-size static dim
    (("n", 3, 4), [0, 1, 2]),           # the identity: eliminate-noops' job
])
def test_transpose_that_reorders_data_or_is_ambiguous_stays(shape, perm):
    fused, result = fuse(unit_axes(shape, perm))
    assert result.counters["as_reshape"] == 0 and "Transpose" in top_ops(fused.graph)
