"""fuse-slice-squeeze: Squeeze(Slice(x, i, i+1, axis=a), a) becomes Gather(x, i, axis=a)."""

import numpy as np
import pytest
from builder import ModelBuilder, assert_equivalent, ops, run_pass, run_passes, top_ops

INT64_MAX = np.iinfo(np.int64).max


def fuse(model):
    fused, result = run_pass(model, "fuse-slice-squeeze")
    return run_passes(fused, "eliminate-dead-nodes"), result


def slice_squeeze(start, end, axis, squeeze_axis, *, opset=17, shape=(3, 4, 5)):
    """x -> Relu -> Slice(start, end, axis) -> Squeeze(squeeze_axis) -> Neg -> y."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", list(shape))
    relu = b.node("Relu", [x], ["relu"])
    if opset < 10:
        sliced = b.node("Slice", [relu], starts=[start], ends=[end], axes=[axis])
    else:
        bounds = [np.array([value], np.int64) for value in (start, end, axis)]
        sliced = b.node("Slice", [relu, *(b.initializer(b.fresh("bound"), value) for value in bounds)])
    if opset < 13:
        squeezed = b.node("Squeeze", [sliced], axes=[squeeze_axis])
    else:
        squeezed = b.node("Squeeze", [sliced, b.initializer("axes", np.array([squeeze_axis], np.int64))])
    b.output(b.node("Neg", [squeezed], ["y"]))
    return b.build()


def gather_index(model):
    gather = next(node for node in model.graph.node if node.op_type == "Gather")
    index = next(tensor for tensor in model.graph.initializer if tensor.name == gather.input[1])
    axis = next(attribute.i for attribute in gather.attribute if attribute.name == "axis")
    return int(np.frombuffer(index.raw_data, np.int64)[0]) if index.raw_data else index.int64_data[0], axis


@pytest.mark.parametrize(
    "start, end, axis, index",
    [(1, 2, 0, 1), (0, 1, 1, 0), (-1, INT64_MAX, 2, -1), (-2, -1, 1, -2), (2, 3, -1, 2)],
    ids=["second", "first", "last-to-the-end", "negative", "negative-axis"],
)
def test_slice_of_one_index_then_squeeze_becomes_gather(start, end, axis, index):
    model = slice_squeeze(start, end, axis, axis)

    fused, result = fuse(model)

    assert result.counters["fused"] == 1 and top_ops(fused.graph) == ["Relu", "Gather", "Neg"]
    assert gather_index(fused) == (index, axis)
    assert_equivalent(model, fused)


@pytest.mark.parametrize("opset", [9, 11])
def test_attribute_forms_before_opsets_10_and_13(opset):
    model = slice_squeeze(1, 2, 1, 1, opset=opset)

    fused, result = fuse(model)

    assert result.counters["fused"] == 1 and ops(fused)["Slice"] == 0 and ops(fused)["Gather"] == 1
    assert_equivalent(model, fused)


def test_a_second_run_changes_nothing():
    fused, _ = fuse(slice_squeeze(1, 2, 0, 0))
    _, result = run_pass(fused, "fuse-slice-squeeze")
    assert not result.changed


# ----------------------------------------------------------------------------- must not fire


@pytest.mark.parametrize(
    "start, end, axis, squeeze_axis, shape",
    [(0, 2, 0, 1, (2, 1, 5)), (2, INT64_MAX, 0, 0, (3, 4, 5)), (1, 2, 0, 1, (3, 1, 5))],
    ids=["two-indices", "to-the-end-of-an-axis", "other-axis"],
)
def test_slices_that_are_not_one_index_of_the_squeezed_axis_stay(start, end, axis, squeeze_axis, shape):
    model = slice_squeeze(start, end, axis, squeeze_axis, shape=shape)

    fused, result = fuse(model)

    assert not result.changed and ops(fused)["Gather"] == 0
    assert_equivalent(model, fused)


def test_slice_with_another_reader_stays():
    b = ModelBuilder()
    x = b.input("x", [3, 4])
    start, end = b.initializer("start", np.array([1], np.int64)), b.initializer("end", np.array([2], np.int64))
    sliced = b.node("Slice", [x, start, end])
    b.output(b.node("Squeeze", [sliced, b.initializer("axes", np.array([0], np.int64))], ["y"]))
    b.output(b.node("Neg", [sliced], ["z"]))
    model = b.build()

    fused, result = fuse(model)

    assert not result.changed and ops(fused) == ops(model)
    assert_equivalent(model, fused)


def test_negative_index_before_opset_11_stays():
    """Gather took negative indices only from opset 11 on."""
    model = slice_squeeze(-1, INT64_MAX, 0, 0, opset=10)

    fused, result = fuse(model)

    assert not result.changed and ops(fused)["Gather"] == 0
    assert_equivalent(model, fused)
