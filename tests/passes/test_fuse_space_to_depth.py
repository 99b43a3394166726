"""fuse-space-to-depth: a Focus layer (four strided Slices + Concat on channels) becomes SpaceToDepth.

The input is x[batch, 3, h, w] with every dim but channels dynamic, checked at two even sizes
(an odd height or width makes the original's Concat fail, and SpaceToDepth too).
"""

import numpy as np
import pytest
from builder import ModelBuilder, assert_equivalent, feeds_at_two_sizes, ops, random, run_pass, run_passes

INT64_MAX = np.iinfo(np.int64).max
YOLO_ORDER = [(0, 0), (1, 0), (0, 1), (1, 1)]  # x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]


def fuse(model):
    fused, result = run_pass(model, "fuse-space-to-depth", first=("infer-shapes",))
    return run_passes(fused, "eliminate-dead-nodes"), result


def focus(order=YOLO_ORDER, *, reader="Conv", per_axis=False, shape=("batch", 3, "h", "w"), dtype=np.float32, step=2, end=INT64_MAX, axes=(2, 3), concat_axis=1, group=1, opset=17):
    """x -> Relu -> four Slices (one per offset of `order`) -> Concat -> reader -> y."""
    b = ModelBuilder(opset=opset)
    x = b.node("Relu", [b.input("x", list(shape), dtype=dtype)], ["relu"])

    def constant(values):
        return b.initializer(b.fresh("bound"), np.array(values, np.int64))

    rows = {}
    pieces = []
    for row, column in order:
        if per_axis:  # x[:, :, i::2] shared by both of its column picks, then [..., j::2]
            if row not in rows:
                rows[row] = b.node("Slice", [x, constant([row]), constant([end]), constant([axes[0]]), constant([step])])
            pieces.append(b.node("Slice", [rows[row], constant([column]), constant([end]), constant([axes[1]]), constant([step])]))
        else:
            pieces.append(b.node("Slice", [x, constant([row, column]), constant([end, end]), constant(list(axes)), constant([step, step])]))
    joined = b.node("Concat", pieces, axis=concat_axis)
    if reader == "Conv":
        weight = b.initializer("w", random([8, 12 // group, 3, 3], seed=1, dtype=dtype))
        result = b.node("Conv", [joined, weight, b.initializer("bias", random([8], seed=2, dtype=dtype))], pads=[1, 1, 1, 1], group=group)
    else:
        result = b.node(reader, [joined])
    b.output(b.node("Neg", [result], ["y"]))
    return b.build()


def assert_fused(model, nodes):
    optimized, result = fuse(model)
    assert result.counters["fused"] == 1
    assert ops(optimized) == nodes
    assert_equivalent(model, optimized, feeds_at_two_sizes(model, sizes=(4, 6)))
    _, again = run_pass(optimized, "fuse-space-to-depth", first=("infer-shapes",))
    assert not again.changed
    return optimized


def assert_kept(model):
    _, result = fuse(model)
    assert not result.changed


def test_focus_before_a_conv_is_one_space_to_depth():
    assert_fused(focus(), {"Relu": 1, "SpaceToDepth": 1, "Conv": 1, "Neg": 1})


def test_focus_with_one_slice_per_axis():
    assert_fused(focus(per_axis=True), {"Relu": 1, "SpaceToDepth": 1, "Conv": 1, "Neg": 1})


def test_focus_read_by_another_op_gathers_its_channels():
    assert_fused(focus(reader="Sigmoid"), {"Relu": 1, "SpaceToDepth": 1, "Gather": 1, "Sigmoid": 1, "Neg": 1})


def test_space_to_depth_order_needs_no_gather():
    assert_fused(focus([(0, 0), (0, 1), (1, 0), (1, 1)], reader="Sigmoid"), {"Relu": 1, "SpaceToDepth": 1, "Sigmoid": 1, "Neg": 1})


@pytest.mark.parametrize("order", [[(1, 1), (0, 0), (1, 0), (0, 1)], [(0, 1), (1, 1), (0, 0), (1, 0)]], ids=str)
def test_any_order(order):
    assert_fused(focus(order), {"Relu": 1, "SpaceToDepth": 1, "Conv": 1, "Neg": 1})
    assert_fused(focus(order, reader="Sigmoid"), {"Relu": 1, "SpaceToDepth": 1, "Gather": 1, "Sigmoid": 1, "Neg": 1})


def test_negative_axes_and_static_ends():
    model = focus(shape=("batch", 3, 8, 8), end=8, axes=(-2, -1), concat_axis=-3)
    assert_fused(model, {"Relu": 1, "SpaceToDepth": 1, "Conv": 1, "Neg": 1})


def test_grouped_conv_gathers_instead():
    """A permutation of input channels that crosses groups is not a permutation of the weight's."""
    assert_fused(focus(group=2), {"Relu": 1, "SpaceToDepth": 1, "Gather": 1, "Conv": 1, "Neg": 1})


def test_other_float_types():
    assert_fused(focus(dtype=np.float16), {"Relu": 1, "SpaceToDepth": 1, "Conv": 1, "Neg": 1})
    # onnxruntime has no double Conv
    assert_fused(focus(dtype=np.float64, reader="Sigmoid"), {"Relu": 1, "SpaceToDepth": 1, "Gather": 1, "Sigmoid": 1, "Neg": 1})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"order": [(0, 0), (1, 0), (0, 1), (0, 0)]},
        {"step": 3},
        {"end": 100},
        {"concat_axis": 2, "reader": "Sigmoid"},
        {"axes": (1, 3)},
        {"opset": 9},
    ],
    ids=["repeated-offset", "step-3", "end-not-to-the-end", "concat-on-rows", "channel-axis", "opset-9"],
)
def test_other_slicing_is_kept(kwargs):
    if kwargs.get("opset") == 9:  # no strided Slice before opset 10: only the pass's guard is tested
        b = ModelBuilder(opset=9)
        x = b.input("x", [1, 3, 4, 4])
        b.output(b.node("Concat", [b.node("Slice", [x], starts=[0], ends=[2], axes=[2]) for _ in range(4)], ["y"], axis=1))
        assert_kept(b.build())
        return
    assert_kept(focus(**kwargs))


def test_slices_of_two_sources_are_kept():
    b = ModelBuilder()
    x, z = b.input("x", [1, 3, 4, 4]), b.input("z", [1, 3, 4, 4])
    pieces = []
    for index, (row, column) in enumerate(YOLO_ORDER):
        bounds = [np.array(values, np.int64) for values in ([row, column], [INT64_MAX] * 2, [2, 3], [2, 2])]
        pieces.append(b.node("Slice", [x if index else z, *(b.initializer(b.fresh("bound"), value) for value in bounds)]))
    b.output(b.node("Concat", pieces, ["y"], axis=1))
    assert_kept(b.build())


def test_integer_images_are_kept():
    assert_kept(focus(reader="Identity", dtype=np.int32))


def test_shared_slice_is_kept():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 4, 4])
    pieces = []
    for row, column in YOLO_ORDER:
        bounds = [np.array(values, np.int64) for values in ([row, column], [INT64_MAX] * 2, [2, 3], [2, 2])]
        pieces.append(b.node("Slice", [x, *(b.initializer(b.fresh("bound"), value) for value in bounds)]))
    b.output(b.node("Concat", pieces, ["y"], axis=1))
    b.output(b.node("Neg", [pieces[0]], ["z"]))
    assert_kept(b.build())
