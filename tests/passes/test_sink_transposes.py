"""sink-transposes: elementwise ops run before a Transpose instead of after it, where Transposes cancel.

The usual case is a ConvNeXt block as the dynamo exporter writes it: Conv (NCHW) → Transpose to
NHWC → LayerNorm → Linear → act → Linear → Transpose to NCHW → Mul(layer scale) → Add(residual,
itself a Transpose to NCHW of an NHWC value) → the next block's Transpose to NHWC.
"""

import numpy as np
import onnxslim
import pytest
from builder import ModelBuilder, assert_equivalent, feeds_at_two_sizes, ops, random, run_pass, run_passes

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
C = 4


def sink(model):
    sunk, result = run_pass(model, "sink-transposes", first=("infer-shapes",))
    return run_passes(sunk, "fuse-transposes", "eliminate-dead-nodes"), result


def transposes(model) -> int:
    return ops(model)["Transpose"]


def convnext_like(blocks: int = 2, *, tail_transpose: bool = True, opset: int = 17):
    """A stem and `blocks` ConvNeXt blocks on the residual stream, then a LayerNorm on NHWC."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", ["batch", 3, "height", "width"])
    seed = iter(range(100))

    def weight(*shape):
        return b.initializer(b.fresh("w"), random(shape, seed=next(seed)) * 0.3)

    def layer_norm(value):
        return b.node("LayerNormalization", [value, weight(C), weight(C)], axis=-1)

    stem = b.node("Conv", [x, weight(C, 3, 1, 1), weight(C)])
    stream = b.node("Transpose", [layer_norm(b.node("Transpose", [stem], perm=TO_NHWC))], perm=TO_NCHW)
    for _ in range(blocks):
        depthwise = b.node("Conv", [stream, weight(C, 1, 3, 3), weight(C)], group=C, pads=[1, 1, 1, 1])
        hidden = b.node("MatMul", [layer_norm(b.node("Transpose", [depthwise], perm=TO_NHWC)), weight(C, 2 * C)])
        hidden = b.node("Relu", [b.node("Add", [hidden, weight(2 * C)])])
        back = b.node("Add", [b.node("MatMul", [hidden, weight(2 * C, C)]), weight(C)])
        scaled = b.node("Mul", [weight(C, 1, 1), b.node("Transpose", [back], perm=TO_NCHW)])
        stream = b.node("Add", [scaled, stream])
    if tail_transpose:
        b.output(layer_norm(b.node("Transpose", [stream], perm=TO_NHWC)), np.float32, ["batch", "height", "width", C])
    else:
        b.output(b.node("Identity", [stream], ["y"]))
    return b.build()


def feeds(model, sizes=(3, 5)):
    return feeds_at_two_sizes(model, sizes=sizes)


# ----------------------------------------------------------------------------- what it rewrites


def test_convnext_blocks_keep_the_residual_stream_in_nhwc():
    model = convnext_like()
    optimized, result = sink(model)
    # Block 1 keeps the stream NHWC with one Transpose to NCHW for block 2's Conv; block 2's
    # Transpose to NCHW and the tail's Transpose to NHWC cancel.
    assert result.counters["sunk"] == 1 and result.counters["transposes_removed"] == 2
    assert transposes(optimized) == transposes(model) - 2
    assert_equivalent(model, optimized, feeds(model))


def test_the_default_pipeline_folds_the_layer_scales_into_the_linears():
    """Run on NHWC values the layer scale is a per-column constant after a MatMul + bias."""
    model = convnext_like()
    optimized = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds(model)))
    without = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds(model)),
                                simplify=onnxslim.SimplifyOptions(skip=["sink-transposes"]))
    assert transposes(optimized) == transposes(without) - 2
    assert ops(optimized)["Mul"] == 0 < ops(without)["Mul"]
    assert_equivalent(model, optimized, feeds(model))
    again, report = onnxslim.optimize(optimized, verify=onnxslim.VerifyOptions(inputs=feeds(model)), return_report=True)
    assert not any(execution.changed for execution in report.run.executions)
    assert again.SerializeToString() == optimized.SerializeToString()


def linear_then_layer_scale(*, shared_weight: bool = False):
    """A block whose residual stream is a Conv's output (no NHWC copy of it exists):
    Conv → T → MatMul + bias → T⁻¹ → Mul(layer scale [C, 1, 1]) → Add(stream)."""
    b = ModelBuilder()
    x = b.input("x", ["batch", C, "height", "width"])
    stream = b.node("Conv", [x, b.initializer("stem", random([C, C, 1, 1], seed=1))])
    weight = b.initializer("w", random([C, C], seed=2))
    hidden = b.node("Add", [b.node("MatMul", [b.node("Transpose", [stream], perm=TO_NHWC), weight]), b.initializer("bias", random([C], seed=3))])
    scaled = b.node("Mul", [b.initializer("scale", random([C, 1, 1], seed=4)), b.node("Transpose", [hidden], perm=TO_NCHW)])
    b.output(b.node("Add", [scaled, stream], ["y"]))
    if shared_weight:  # a new weight for this MatMul alone would keep both in the model
        b.output(b.node("MatMul", [b.input("other", ["rows", C]), weight], ["z"]))
    return b.build()


def test_a_layer_scale_behind_a_transpose_reaches_its_linear():
    """The Transpose back to NCHW moves past the Mul (as many Transposes), and the Mul, now right
    after the MatMul's bias, folds into its weights."""
    model = linear_then_layer_scale()
    optimized, result = sink(model)
    assert result.counters == {"sunk": 1, "transposes_removed": 0, "to_fold": 1}
    assert [node.op_type for node in optimized.graph.node][-3:] == ["Mul", "Transpose", "Add"]
    assert_equivalent(model, optimized, feeds(model))
    pipeline = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds(model)))
    assert ops(pipeline)["Mul"] == 0 and ops(pipeline)["Transpose"] == 2
    assert_equivalent(model, pipeline, feeds(model))


def test_a_layer_scale_is_left_where_the_weight_is_shared():
    _, result = sink(linear_then_layer_scale(shared_weight=True))
    assert not result.changed


def test_a_transpose_and_its_inverse_around_unary_ops_cancel():
    b = ModelBuilder()
    x = b.input("x", ["n", 3, 4])
    moved = b.node("Transpose", [x], perm=[2, 0, 1])
    clipped = b.node("Clip", [b.node("Sigmoid", [b.node("Relu", [moved])]), b.initializer("low", np.array(0.1, np.float32)),
                              b.initializer("high", np.array(0.8, np.float32))])
    b.output(b.node("Transpose", [b.node("Cast", [clipped], to=10)], ["y"], perm=[1, 2, 0]))
    model = b.build()
    optimized, result = sink(model)
    assert result.counters["transposes_removed"] == 2 and transposes(optimized) == 0
    assert optimized.graph.output[0].name == "y"
    assert_equivalent(model, optimized, feeds(model))


def test_inputs_transposed_alike_are_combined_first():
    """Add(T(a), T(b)) → the graph output: two Transposes before, one after (the output keeps its name and shape)."""
    b = ModelBuilder()
    a, c = b.input("a", ["n", 2, 3, 4]), b.input("b", ["n", 2, 3, 4])
    summed = b.node("Add", [b.node("Transpose", [a], perm=TO_NHWC), b.node("Transpose", [c], perm=TO_NHWC)])
    b.output(b.node("Mul", [summed, b.initializer("half", np.array(0.5, np.float32))], ["y"]))
    model = b.build()
    optimized, result = sink(model)
    assert result.counters["transposes_removed"] == 1 and transposes(optimized) == 1
    added = next(node for node in optimized.graph.node if node.op_type == "Add")
    assert list(added.input) == ["a", "b"]  # the one Transpose left is the Add's (the Mul needs none less)
    assert optimized.graph.output[0] == model.graph.output[0]
    assert_equivalent(model, optimized, feeds(model))


@pytest.mark.parametrize(
    "constant",
    [
        np.linspace(0.5, 2, 3, dtype=np.float32).reshape(3, 1, 1),  # per channel, lower rank
        np.linspace(0.5, 2, 2 * 3 * 5, dtype=np.float32).reshape(1, 3, 2, 5),  # full rank, every axis
        np.linspace(0.5, 2, 5, dtype=np.float32),  # one per element of the last axis
        np.array(1.5, np.float32),  # a scalar
        np.array([[1.5]], np.float32),  # one number with a rank
    ],
    ids=["channel", "full-rank", "last-axis", "scalar", "one-number"],
)
def test_constants_are_permuted_back(constant):
    b = ModelBuilder()
    x = b.input("x", ["n", 2, 5, 3])
    moved = b.node("Transpose", [x], perm=[0, 3, 1, 2])
    scaled = b.node("Sub", [b.node("Div", [moved, b.initializer("c", constant)]), b.initializer("d", constant * 3)])
    b.output(b.node("Transpose", [scaled], ["y"], perm=[0, 2, 3, 1]))
    model = b.build()
    optimized, result = sink(model)
    assert result.changed and transposes(optimized) == 0
    assert_equivalent(model, optimized, feeds(model))


def test_where_and_comparisons_of_several_dtypes():
    b = ModelBuilder()
    x, z = b.input("x", ["n", 3, 4], np.int64), b.input("z", ["n", 3, 4], np.int64)
    tx, tz = (b.node("Transpose", [value], perm=[1, 2, 0]) for value in (x, z))
    condition = b.node("And", [b.node("Greater", [tx, tz]), b.node("Not", [b.node("Equal", [tx, b.initializer("k", np.array([[1], [2], [3], [0]], np.int64))])])])
    chosen = b.node("Where", [condition, b.node("Cast", [tx], to=1), b.initializer("minus", np.array(-1.0, np.float32))])
    b.output(b.node("Transpose", [chosen], ["y"], perm=[2, 0, 1]))
    model = b.build()
    optimized, result = sink(model)
    assert result.changed and transposes(optimized) == 0
    assert_equivalent(model, optimized, feeds(model))


def test_float16_and_the_default_permutation():
    b = ModelBuilder()
    x = b.input("x", ["n", 3, 4], np.float16)
    moved = b.node("Transpose", [x])  # no perm: reverses the axes
    added = b.node("Add", [moved, b.initializer("bias", np.linspace(-1, 1, 3, dtype=np.float16).reshape(3, 1))])
    b.output(b.node("Transpose", [b.node("Tanh", [added])], ["y"]))
    model = b.build()
    optimized, result = sink(model)
    assert result.changed and transposes(optimized) == 0
    assert_equivalent(model, optimized, feeds(model))


def test_a_transpose_that_is_a_graph_output_stays():
    """T(x) is an output and feeds Relu → T⁻¹: the Relu runs on x, T(x) stays for the output."""
    b = ModelBuilder()
    x = b.input("x", ["n", 3, 4])
    moved = b.node("Transpose", [x], ["t"], perm=[0, 2, 1])
    b.output(moved)
    b.output(b.node("Transpose", [b.node("Relu", [moved])], ["y"], perm=[0, 2, 1]))
    model = b.build()
    optimized, result = sink(model)
    assert result.counters["transposes_removed"] == 1 and transposes(optimized) == 1
    assert [value.name for value in optimized.graph.output] == ["t", "y"]
    assert_equivalent(model, optimized, feeds(model))


def test_inside_an_if_branch():
    b = ModelBuilder()
    x, condition = b.input("x", ["n", 3, 4]), b.input("c", [], np.bool_)
    then = b.branch()
    then.output(then.node("Transpose", [then.node("Exp", [then.node("Transpose", [x], perm=[2, 0, 1])])], perm=[1, 2, 0]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other), np.float32, ["n", 3, 4])
    model = b.build()
    optimized, result = sink(model)
    assert result.counters["transposes_removed"] == 2 and transposes(optimized) == 0
    feeds_both = [{**feed, "c": np.array(flag)} for feed in feeds(model) for flag in (True, False)]
    assert_equivalent(model, optimized, feeds_both)


# ----------------------------------------------------------------------------- what it leaves


def test_a_lower_rank_input_that_is_not_a_constant_is_kept():
    """Add(T(x), v) with v an input of shape [4]: v would need a layout of its own."""
    b = ModelBuilder()
    x, v = b.input("x", ["n", 4, 4]), b.input("v", [4])
    added = b.node("Add", [b.node("Transpose", [x], perm=[0, 2, 1]), v])
    b.output(b.node("Transpose", [added], ["y"], perm=[0, 2, 1]))
    _, result = sink(b.build())
    assert not result.changed


@pytest.mark.parametrize("shape, taken", [([], True), ([1], False)], ids=["scalar", "declared-one"])
def test_values_that_are_one_number(shape, taken):
    """A scalar input broadcasts alike in any layout; a value declared [1] is not trusted to be one number."""
    b = ModelBuilder()
    x, s = b.input("x", ["n", 3, 4]), b.input("s", shape)
    scaled = b.node("Mul", [b.node("Transpose", [x], perm=[2, 0, 1]), s])
    b.output(b.node("Transpose", [scaled], ["y"], perm=[1, 2, 0]))
    model = b.build()
    optimized, result = sink(model)
    assert result.changed == taken
    assert_equivalent(model, optimized, feeds(model))


def test_a_transpose_read_by_a_layout_dependent_op_is_kept():
    b = ModelBuilder()
    x = b.input("x", ["n", 3, 4])
    moved = b.node("Transpose", [x], perm=[0, 2, 1])
    b.output(b.node("ReduceSum", [b.node("Relu", [moved]), b.initializer("axes", np.array([1], np.int64))], ["y"]))
    _, result = sink(b.build())
    assert not result.changed


def test_transposes_of_another_permutation_are_kept():
    b = ModelBuilder()
    a, c = b.input("a", ["n", 3, 3, 3]), b.input("b", ["n", 3, 3, 3])
    added = b.node("Add", [b.node("Transpose", [a], perm=TO_NHWC), b.node("Transpose", [c], perm=[0, 3, 2, 1])])
    b.output(b.node("Transpose", [added], ["y"], perm=TO_NCHW))
    _, result = sink(b.build())
    assert not result.changed


@pytest.mark.parametrize("reader", ["Conv", "output"])
def test_a_push_that_saves_no_transpose_is_not_taken(reader):
    """T(x) → Mul(c) → a Conv or a graph output: one Transpose before, one after; nothing is gained."""
    b = ModelBuilder()
    x = b.input("x", ["n", 4, 4, 2])
    scaled = b.node("Mul", [b.node("Transpose", [x], perm=TO_NCHW), b.initializer("c", np.linspace(1, 2, 2, dtype=np.float32).reshape(2, 1, 1))])
    if reader == "Conv":
        b.output(b.node("Conv", [scaled, b.initializer("w", random([2, 2, 1, 1]))], ["y"]))
    else:
        b.output(scaled)
    _, result = sink(b.build())
    assert not result.changed


def test_a_constant_of_higher_rank_is_kept():
    b = ModelBuilder()
    x = b.input("x", ["n", 3])
    added = b.node("Add", [b.node("Transpose", [x], perm=[1, 0]), b.initializer("c", np.ones([2, 3, 1], np.float32))])
    b.output(b.node("Transpose", [added], ["y"], perm=[0, 2, 1]))
    _, result = sink(b.build())
    assert not result.changed


def test_legacy_broadcasting_opsets_are_left_alone():
    b = ModelBuilder(opset=7)
    x = b.input("x", [2, 3, 4])
    moved = b.node("Transpose", [x], perm=[0, 2, 1])
    b.output(b.node("Transpose", [b.node("Relu", [moved])], ["y"], perm=[0, 2, 1]))
    _, result = sink(b.build())
    assert not result.changed


# ----------------------------------------------------------------------------- a fixed point


@pytest.mark.parametrize("tail_transpose", [True, False])
def test_a_second_run_changes_nothing(tail_transpose):
    model = convnext_like(blocks=3, tail_transpose=tail_transpose)
    once, _ = sink(model)
    twice, result = sink(once)
    assert not result.changed
    assert twice.SerializeToString() == once.SerializeToString()
    assert_equivalent(model, once, feeds(model))
