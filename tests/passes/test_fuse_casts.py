"""fuse-casts: Cast(Cast(x, A→B), B→C) becomes Cast(x, A→C) when A→B loses nothing, and never otherwise."""

import ml_dtypes
import numpy as np
import onnx.helper as helper
import pytest
from builder import ModelBuilder, assert_equivalent, ops, output_names, run_pass, run_passes, top_ops
from onnx import TensorProto

from onnxslim.passes.fuse_casts import is_lossless


def fuse(model):
    fused, result = run_pass(model, "fuse-casts")
    return run_passes(fused, "eliminate-dead-nodes"), result


def type_of(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def casts(source, between, target):
    """x (of type source) -> Cast(between) -> Cast(target) -> Identity -> y."""
    b = ModelBuilder()
    x = b.input("x", [6], source)
    first = b.node("Cast", [x], ["between"], to=type_of(between))
    second = b.node("Cast", [first], ["second"], to=type_of(target))
    b.output(b.node("Identity", [second], ["y"]))
    return b


def feeds_for(dtype):
    if np.dtype(dtype) == np.bool_:
        return [{"x": np.array([True, False, True, True, False, False])}]
    if np.dtype(dtype).kind == "f":
        return [{"x": np.array([-2.5, -0.0, 0.5, 1.75, 300.0, 65504.0], dtype)}]
    info = np.iinfo(dtype)
    return [{"x": np.array([info.min, -1 if info.min < 0 else 0, 0, 1, 200 % (info.max + 1), info.max], dtype)}]


@pytest.mark.parametrize(
    "source, between, target",
    [
        (np.float16, np.float32, np.float64),
        (np.int32, np.int64, np.float32),
        (np.uint8, np.int32, np.float16),
        (np.int8, np.float32, np.int32),  # int8 fits in int32: the float detour is exact
        (np.bool_, np.float32, np.int64),
        (np.int16, np.int64, np.int8),  # wrap-around of the same integer either way
    ],
)
def test_widening_cast_then_cast_becomes_one_cast(source, between, target):
    model = casts(source, between, target).build()

    fused, result = fuse(model)

    assert result.counters == {"fused": 1, "removed": 0}
    cast = next(node for node in fused.graph.node if node.op_type == "Cast")
    assert ops(fused)["Cast"] == 1 and list(cast.input) == ["x"] and cast.attribute[0].i == type_of(target)
    assert_equivalent(model, fused, feeds_for(source))


@pytest.mark.parametrize(
    "source, between", [(np.float16, np.float32), (np.int32, np.int64), (np.bool_, np.float32), (np.uint8, np.int16)]
)
def test_widening_cast_back_to_the_source_type_disappears(source, between):
    model = casts(source, between, source).build()

    fused, result = fuse(model)

    assert result.counters == {"fused": 0, "removed": 1}
    assert top_ops(fused.graph) == ["Identity"] and list(fused.graph.node[0].input) == ["x"]
    assert_equivalent(model, fused, feeds_for(source))


def test_castlike_counts_as_a_cast_when_its_target_type_is_known():
    b = ModelBuilder()
    x = b.input("x", [6], np.float16)
    like = b.initializer("like", np.zeros([1], np.float64))
    first = b.node("Cast", [x], ["between"], to=TensorProto.FLOAT)
    b.output(b.node("Identity", [b.node("CastLike", [first, like], ["second"])], ["y"]))
    model = b.build()

    fused, result = fuse(model)

    assert result.counters["fused"] == 1 and ops(fused)["Cast"] == 0
    assert list(next(node for node in fused.graph.node if node.op_type == "CastLike").input) == ["x", "like"]
    assert_equivalent(model, fused, feeds_for(np.float16))


def test_removed_pair_writing_a_graph_output_leaves_the_producer_writing_it():
    b = ModelBuilder()
    x = b.input("x", [6], np.float16)
    relu = b.node("Relu", [x], ["relu"])
    first = b.node("Cast", [relu], ["between"], to=TensorProto.FLOAT)
    b.output(b.node("Cast", [first], ["y"], to=TensorProto.FLOAT16))
    b.annotate("relu", np.float16, [6])
    model = b.build()

    fused, result = fuse(model)

    assert result.counters["removed"] == 1 and top_ops(fused.graph) == ["Relu"]
    assert list(fused.graph.node[0].output) == ["y"] and output_names(fused) == ["y"]
    assert_equivalent(model, fused, feeds_for(np.float16))


def test_a_second_run_changes_nothing():
    fused, _ = fuse(casts(np.float16, np.float32, np.float64).build())
    _, result = run_pass(fused, "fuse-casts")
    assert not result.changed


# ----------------------------------------------------------------------------- must not fire


@pytest.mark.parametrize(
    "source, between, target",
    [
        (np.float32, np.float16, np.float32),  # narrowing: rounds
        (np.float32, np.int32, np.float32),  # float to integer: truncates
        (np.int32, np.float32, np.int64),  # int32 does not fit float32's significand
        (np.int64, np.int32, np.int64),  # narrowing integer
        (np.int8, np.uint8, np.int32),  # signed to unsigned
        (np.float32, np.bool_, np.float32),  # to bool
        (np.float16, ml_dtypes.bfloat16, np.float32),  # fewer significand bits
        (np.uint8, np.float32, np.int8),  # float-to-integer overflow is not integer wrap-around
    ],
)
def test_lossy_first_cast_is_kept(source, between, target):
    model = casts(source, between, target).build()

    fused, result = fuse(model)

    assert not result.changed and ops(fused)["Cast"] == 2
    assert_equivalent(model, fused, feeds_for(source))


def test_first_cast_with_another_reader_is_kept():
    b = ModelBuilder()
    x = b.input("x", [6], np.float16)
    first = b.node("Cast", [x], ["between"], to=TensorProto.FLOAT)
    b.output(b.node("Cast", [first], ["y"], to=TensorProto.DOUBLE))
    b.output(b.node("Neg", [first], ["z"]))
    model = b.build()

    fused, result = fuse(model)

    assert not result.changed and ops(fused)["Cast"] == 2


def test_cast_of_a_value_of_unknown_type_is_kept():
    b = ModelBuilder()
    b.use_domain("com.example")
    x = b.input("x", [6])
    custom = b.node("Mystery", [x], ["custom"], domain="com.example")
    first = b.node("Cast", [custom], ["between"], to=TensorProto.DOUBLE)
    b.output(b.node("Cast", [first], ["y"], to=TensorProto.FLOAT), np.float32, [6])
    model = b.build(check=False)

    fused, result = run_pass(model, "fuse-casts")

    assert not result.changed and ops(fused)["Cast"] == 2


def test_lossless_table():
    assert is_lossless(TensorProto.BOOL, TensorProto.FLOAT16)
    assert is_lossless(TensorProto.UINT16, TensorProto.FLOAT) and not is_lossless(TensorProto.INT32, TensorProto.FLOAT)
    assert is_lossless(TensorProto.UINT32, TensorProto.INT64) and not is_lossless(TensorProto.UINT32, TensorProto.INT32)
    assert is_lossless(TensorProto.BFLOAT16, TensorProto.FLOAT) and not is_lossless(TensorProto.FLOAT16, TensorProto.BFLOAT16)
    assert not is_lossless(TensorProto.FLOAT, TensorProto.INT64) and not is_lossless(TensorProto.INT8, TensorProto.BOOL)
