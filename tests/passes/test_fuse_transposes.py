"""fuse-transposes: Transpose(Transpose(x)) becomes one Transpose, or nothing when the two cancel."""

import numpy as np
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

    assert result.counters == {"fused": 1, "cancelled": 0}
    assert top_ops(fused.graph) == ["Relu", "Transpose", "Neg"] and perm_of(fused) == composed
    assert_equivalent(model, fused)


@pytest.mark.parametrize("first_perm, second_perm", [([0, 2, 1], [0, 2, 1]), ([1, 2, 0], [2, 0, 1])])
def test_transposes_that_cancel_disappear(first_perm, second_perm):
    model = chain(first_perm, second_perm).build()

    fused, result = fuse(model)

    assert result.counters == {"fused": 0, "cancelled": 1}
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

    assert result.counters == {"fused": 1, "cancelled": 1}
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
