"""fuse-pad: a zero Pad of the spatial axes folded into the pads of the Conv or AveragePool that reads it.

Graphs are `x -> Relu -> Pad -> Conv/pool -> y`; the Conv has pads of its own, which add up.
"""

import numpy as np
from builder import ModelBuilder, assert_equivalent, ops, output_names, random, run_pass, top_ops


def fuse(model):
    return run_pass(model, "fuse-pad")


def pad_then(reader="Conv", pads=(0, 0, 1, 2, 0, 0, 2, 1), *, opset=17, value=None, mode=None, axes=None, **attrs):
    """x[1, 3, 6, 6] -> Relu -> Pad -> reader -> y. Pads as an input from opset 11, an attribute before."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", [1, 3, 6, 6])
    relu = b.node("Relu", [x], ["relu"])
    pad_attrs = {"mode": mode} if mode else {}
    if opset < 11:
        padded = b.node("Pad", [relu], ["padded"], pads=list(pads), **pad_attrs, **({"value": value} if value is not None else {}))
    else:
        inputs = [relu, b.initializer("pads", np.array(pads, np.int64))]
        if value is not None or axes is not None:
            inputs.append(b.initializer("value", np.array(value or 0, np.float32)) if value is not None else "")
        if axes is not None:
            inputs.append(b.initializer("axes", np.array(axes, np.int64)))
        padded = b.node("Pad", inputs, ["padded"], **pad_attrs)
    if reader == "Conv":
        attrs.setdefault("pads", [1, 1, 1, 1])
        b.output(b.node("Conv", [padded, b.initializer("w", random([4, 3, 3, 3], seed=1))], ["y"], **attrs))
    else:
        b.output(b.node(reader, [padded], ["y"], kernel_shape=[3, 3], **attrs))
    return b


def assert_fused(model, reader="Conv", pads=None):
    optimized, result = fuse(model)
    assert result.changed and result.counters["fused"] == 1
    assert top_ops(optimized.graph) == ["Relu", reader]
    node = optimized.graph.node[-1]
    assert list(node.input)[0] == "relu" and output_names(optimized) == output_names(model)
    if pads is not None:
        assert list(next(a for a in node.attribute if a.name == "pads").ints) == pads
    assert_equivalent(model, optimized)


def assert_kept(model):
    optimized, result = fuse(model)
    assert not result.changed and ops(optimized) == ops(model)
    assert_equivalent(model, optimized)


# ----------------------------------------------------------------------------- folding


def test_pad_before_conv_is_added_to_its_pads():
    assert_fused(pad_then().build(), pads=[2, 3, 3, 2])


def test_pad_with_explicit_zero_value_before_conv_is_folded():
    assert_fused(pad_then(value=0.0).build(), pads=[2, 3, 3, 2])


def test_pad_attribute_before_opset_11_is_folded():
    assert_fused(pad_then(opset=10).build(), pads=[2, 3, 3, 2])


def test_pad_with_axes_at_opset_18_is_folded():
    assert_fused(pad_then(pads=(1, 2, 2, 1), axes=[2, -1], opset=18).build(), pads=[2, 3, 3, 2])


def padded(reader, pads=(0, 0, 1, 1, 0, 0, 1, 1), channels=3, **attrs):
    """x[1, channels, 6, 6] -> Relu -> Pad(pads) -> reader(**attrs) -> y, the reader's attributes as given."""
    b = ModelBuilder()
    x = b.input("x", [1, channels, 6, 6])
    pad = b.node("Pad", [b.node("Relu", [x], ["relu"]), b.initializer("pads", np.array(pads, np.int64))], ["padded"])
    inputs = [pad, b.initializer("w", random([4, 3, 3, 3], seed=1))] if reader == "Conv" else [pad]
    b.output(b.node(reader, inputs, ["y"], **attrs))
    return b


def test_pad_before_conv_without_pads_is_folded():
    assert_fused(padded("Conv").build(), pads=[1, 1, 1, 1])


def test_pad_before_conv_with_valid_auto_pad_is_folded():
    assert_fused(padded("Conv", auto_pad="VALID").build(), pads=[1, 1, 1, 1])


def test_pad_before_average_pool_counting_pads_is_folded():
    assert_fused(pad_then("AveragePool", pads=(0, 0, 1, 0, 0, 0, 0, 1), count_include_pad=1).build(), "AveragePool", [1, 0, 0, 1])


# ----------------------------------------------------------------------------- must not fire


def test_pad_before_average_pool_not_counting_pads_stays():
    """With count_include_pad=0 the pool's own pads are left out of the mean, the Pad's zeros are not."""
    assert_kept(pad_then("AveragePool", pads=(0, 0, 1, 0, 0, 0, 0, 1)).build())


def test_pad_before_max_pool_stays():
    """MaxPool pads with -inf, the Pad with 0: a window of negative values would change."""
    assert_kept(padded("MaxPool", kernel_shape=[3, 3]).build())


def test_pad_with_a_non_zero_value_stays():
    assert_kept(pad_then(value=1.0).build())


def test_reflect_pad_stays():
    assert_kept(pad_then(mode="reflect").build())


def test_pad_of_the_channel_axis_stays():
    assert_kept(padded("Conv", pads=(0, 1, 1, 1, 0, 0, 1, 1), channels=2).build())


def test_negative_pad_stays():
    assert_kept(pad_then(pads=(0, 0, -1, 0, 0, 0, 0, 0)).build())


def test_pad_before_conv_with_same_auto_pad_stays():
    assert_kept(padded("Conv", auto_pad="SAME_UPPER").build())


def test_pad_read_elsewhere_stays():
    b = pad_then()
    b.output(b.node("Abs", ["padded"], ["z"]))
    assert_kept(b.build())


def test_pad_feeding_the_conv_weight_stays():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 6, 6])
    w = b.input("w", [4, 3, 1, 1])
    padded = b.node("Pad", [w, b.initializer("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    b.output(b.node("Conv", [x, padded], ["y"]))
    model = b.build()
    optimized, result = fuse(model)
    assert not result.changed and ops(optimized) == ops(model)


def test_pad_as_wide_as_the_pool_kernel_stays():
    """onnxruntime refuses pooling pads that are not smaller than the kernel."""
    assert_kept(padded("AveragePool", pads=(0, 0, 3, 0, 0, 0, 0, 0), kernel_shape=[3, 3], count_include_pad=1).build())


def test_pad_before_ceil_mode_average_pool_stays():
    assert_kept(padded("AveragePool", kernel_shape=[3, 3], strides=[2, 2], count_include_pad=1, ceil_mode=1).build())
