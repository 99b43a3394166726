"""sink-reshapes: Reshape → elementwise ops → Reshape runs the elementwise ops on the first Reshape's input.

The usual case: a Linear on 2-D rows (Gemm), its GELU on the [batch, seq, features] view, and the
2-D view again for the next Gemm.
"""

import numpy as np
import pytest
from builder import ModelBuilder, assert_equivalent, feeds_at_two_sizes, ops, run_pass, run_passes


def sink(model):
    sunk, result = run_pass(model, "sink-reshapes", first=("infer-shapes",))
    return run_passes(sunk, "eliminate-dead-nodes", "infer-shapes", "eliminate-noops", "eliminate-dead-nodes"), result


def gelu_between_views(*, constant=np.array(0.5, np.float32), target=(-1, 8), extra_reader=None, allowzero=0):
    """x[rows, 8] -> Relu -> Reshape [-1, 2, 8] -> tanh-GELU-like ops (with `constant`) -> Reshape `target` -> Neg."""
    b = ModelBuilder()
    x = b.input("x", ["rows", 8])
    rows = b.node("Relu", [x])
    view = b.node("Reshape", [rows, b.initializer("view_shape", np.array([-1, 2, 8], np.int64))], ["view"], allowzero=allowzero)
    cubed = b.node("Pow", [view, b.initializer("three", np.array(3.0, np.float32))])
    inner = b.node("Add", [view, b.node("Mul", [cubed, b.initializer("c", np.array(0.044715, np.float32))])])
    tanh = b.node("Tanh", [b.node("Mul", [inner, b.initializer("k", constant)])])
    gelu = b.node("Mul", [b.node("Mul", [view, b.initializer("half", np.array(0.5, np.float32))]),
                          b.node("Add", [tanh, b.initializer("one", np.array(1.0, np.float32))])], ["gelu"])
    if extra_reader is not None:
        b.output(b.node(extra_reader, [gelu], ["z"]))
    flat = b.node("Reshape", [gelu, b.initializer("flat_shape", np.array(target, np.int64))], allowzero=allowzero)
    b.output(b.node("Neg", [flat], ["y"]))
    return b.build()


def feeds(model):
    return feeds_at_two_sizes(model, sizes=(2, 6))  # rows: a multiple of 2


def test_gelu_between_two_views_runs_on_the_rows():
    model = gelu_between_views()
    optimized, result = sink(model)
    assert result.counters["sunk"] == 1
    # Only the last Reshape is left, a no-op now (reshaping the rows to their own shape).
    assert [node.input[1] for node in optimized.graph.node if node.op_type == "Reshape"] == ["flat_shape"]
    assert_equivalent(model, optimized, feeds(model))
    _, again = run_pass(optimized, "sink-reshapes", first=("infer-shapes",))
    assert not again.changed


def test_allowzero_reshapes():
    """As the dynamo exporter writes them: allowzero=1 reads no dims even where a target has a 0."""
    model = gelu_between_views(allowzero=1)
    optimized, result = sink(model)
    assert result.counters["sunk"] == 1
    assert_equivalent(model, optimized, feeds(model))


def test_per_feature_constant_of_the_shared_last_axis():
    model = gelu_between_views(constant=np.linspace(0.5, 1.5, 8).astype(np.float32))
    optimized, result = sink(model)
    assert result.counters["sunk"] == 1
    assert_equivalent(model, optimized, feeds(model))


def test_other_final_target_stays_a_reshape():
    model = gelu_between_views(target=(-1, 4))
    optimized, result = sink(model)
    assert result.counters["sunk"] == 1 and ops(optimized)["Reshape"] == 1
    assert_equivalent(model, optimized, feeds(model))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"constant": np.linspace(0.5, 1.5, 16).astype(np.float32).reshape(2, 8)},  # varies along the view's middle axis
        {"target": (0, -1)},  # 0 copies a dim of the data
        {"extra_reader": "Shape"},  # a reader that sees the layout
        {"extra_reader": "Identity"},  # an Identity that is a graph output: the view stays visible
    ],
    ids=["constant-along-another-axis", "target-with-zero", "layout-reader", "graph-output"],
)
def test_layout_dependent_regions_are_kept(kwargs):
    model = gelu_between_views(**kwargs)
    _, result = sink(model)
    assert not result.changed


def test_a_view_that_changes_the_last_axis_with_a_vector_is_kept():
    """[rows, 8] viewed as [rows, 2, 4] + a 4-vector: the vector meets other elements in the rows' layout."""
    b = ModelBuilder()
    x = b.input("x", ["rows", 8])
    view = b.node("Reshape", [x, b.initializer("view_shape", np.array([-1, 2, 4], np.int64))])
    added = b.node("Add", [view, b.initializer("v", np.arange(4, dtype=np.float32))])
    b.output(b.node("Reshape", [added, b.initializer("flat_shape", np.array([-1, 8], np.int64))], ["y"]))
    _, result = sink(b.build())
    assert not result.changed


def test_two_sided_region_with_another_input_is_kept():
    b = ModelBuilder()
    x, other = b.input("x", ["rows", 8]), b.input("o", [1, 2, 8])
    view = b.node("Reshape", [x, b.initializer("view_shape", np.array([-1, 2, 8], np.int64))])
    added = b.node("Add", [view, other])
    b.output(b.node("Reshape", [added, b.initializer("flat_shape", np.array([-1, 8], np.int64))], ["y"]))
    _, result = sink(b.build())
    assert not result.changed
