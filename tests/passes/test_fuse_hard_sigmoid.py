"""fuse-hard-sigmoid: hard sigmoid and hard swish written in arithmetic become HardSigmoid / HardSwish.

Graphs are `x -> Relu... -> pattern -> Neg -> y` with x = Conv-like input values in [-5, 5], so
both clamp bounds are crossed; the nodes the pattern leaves unread go to dead-node elimination.
"""

import numpy as np
import pytest
from builder import ModelBuilder, assert_equivalent, branches, ops, output_names, run_pass, top_ops

SHAPE = [2, 3, 4, 4]


def fuse(model):
    fused, result = run_pass(model, "fuse-hard-sigmoid", first=("infer-shapes",))
    cleaned, _ = run_pass(fused, "eliminate-dead-nodes")
    return cleaned, result


def feeds():
    return [{"x": np.random.default_rng(seed).uniform(-5, 5, SHAPE).astype(np.float32)} for seed in (0, 1)]


def scalar(b, value, name, shape=()):
    return b.initializer(name, np.full(shape, value, np.float32))


def clamp(b, y, low=0.0, high=6.0, *, form="Clip", opset=11):
    """clip(y, low, high) as Clip (inputs from opset 11, attributes before), Min(Max), Max(Min) or Min(Relu)."""
    if form == "Clip":
        if opset < 11:
            return b.node("Clip", [y], min=low, max=high)
        return b.node("Clip", [y, scalar(b, low, "low"), scalar(b, high, "high")])
    if form == "MinMax":
        return b.node("Min", [b.node("Max", [y, scalar(b, low, "low")]), scalar(b, high, "high")])
    if form == "MaxMin":
        return b.node("Max", [scalar(b, low, "low"), b.node("Min", [y, scalar(b, high, "high")])])
    assert form == "MinRelu" and low == 0
    return b.node("Min", [b.node("Relu", [y]), scalar(b, high, "high")])


def hard_sigmoid_model(*, opset=11, shift=3.0, high=6.0, low=0.0, divisor=6.0, form="Clip", scale_by="Div", shift_shape=()):
    b = ModelBuilder(opset=opset)
    x = b.input("x", SHAPE)
    source = b.node("Identity", [x], ["source"])
    clamped = clamp(b, b.node("Add", [source, scalar(b, shift, "shift", shift_shape)]), low, high, form=form, opset=opset)
    if scale_by == "Div":
        gate = b.node("Div", [clamped, scalar(b, divisor, "divisor")])
    else:
        gate = b.node("Mul", [scalar(b, np.float32(1) / np.float32(divisor), "factor"), clamped])
    b.output(b.node("Neg", [gate], ["y"]))
    return b


def hard_swish_model(*, opset=11, shift=3.0, high=6.0, divisor=6.0, gate_input=None):
    """Paddle's hardswish: x · clip(x + 3, 0, 6) / 6 (the Div after the Mul)."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", SHAPE)
    source = b.node("Identity", [x], ["source"])
    gated = b.node("Add", [gate_input or source, scalar(b, shift, "shift")])
    product = b.node("Mul", [source, clamp(b, gated, 0.0, high, opset=opset)])
    b.output(b.node("Neg", [b.node("Div", [product, scalar(b, divisor, "divisor")])], ["y"]))
    return b


def attributes(model, op):
    node = next(node for node in model.graph.node if node.op_type == op)
    return {attribute.name: attribute.f for attribute in node.attribute}


def assert_fused(model, expected_ops, counter):
    optimized, result = fuse(model)
    assert result.changed and result.counters[counter] == 1
    assert top_ops(optimized.graph) == expected_ops
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized, feeds())
    return optimized


def assert_kept(model):
    optimized, result = fuse(model)
    assert not result.changed
    assert ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds())


# ----------------------------------------------------------------------------- HardSigmoid


@pytest.mark.parametrize("form", ["Clip", "MinMax", "MaxMin", "MinRelu"])
@pytest.mark.parametrize("scale_by", ["Div", "Mul"])
def test_clip_of_x_plus_3_over_6_becomes_hard_sigmoid(form, scale_by):
    optimized = assert_fused(hard_sigmoid_model(form=form, scale_by=scale_by).build(), ["Identity", "HardSigmoid", "Neg"], "hard_sigmoid")
    alpha, beta = attributes(optimized, "HardSigmoid").values()
    assert alpha == pytest.approx(1 / 6) and beta == pytest.approx(0.5)


def test_clip_attributes_before_opset_11_become_hard_sigmoid():
    assert_fused(hard_sigmoid_model(opset=10).build(), ["Identity", "HardSigmoid", "Neg"], "hard_sigmoid")


def test_other_shift_and_bound_give_their_alpha_and_beta():
    """clip(x + 1, 0, 4)/4 = HardSigmoid(x; 1/4, 1/4)."""
    optimized = assert_fused(hard_sigmoid_model(shift=1.0, high=4.0, divisor=4.0).build(), ["Identity", "HardSigmoid", "Neg"], "hard_sigmoid")
    assert attributes(optimized, "HardSigmoid") == {"alpha": 0.25, "beta": 0.25}


def test_one_element_shift_of_rank_1_is_a_scalar():
    assert_fused(hard_sigmoid_model(shift_shape=(1,)).build(), ["Identity", "HardSigmoid", "Neg"], "hard_sigmoid")


def test_hard_sigmoid_producing_a_graph_output_keeps_the_output_name():
    b = ModelBuilder(opset=11)
    x = b.input("x", SHAPE)
    clamped = clamp(b, b.node("Add", [x, scalar(b, 3.0, "three")]))
    b.output(b.node("Div", [clamped, scalar(b, 6.0, "six")], ["y"]))
    model = b.build()

    optimized, _ = fuse(model)

    assert top_ops(optimized.graph) == ["HardSigmoid"] and list(optimized.graph.node[0].output) == ["y"]
    assert_equivalent(model, optimized, feeds())


# ----------------------------------------------------------------------------- HardSwish


def test_paddle_hard_swish_before_opset_14_becomes_x_times_hard_sigmoid():
    assert_fused(hard_swish_model().build(), ["Identity", "HardSigmoid", "Mul", "Neg"], "hard_sigmoid")


def test_paddle_hard_swish_from_opset_14_becomes_hard_swish():
    assert_fused(hard_swish_model(opset=14).build(), ["Identity", "HardSwish", "Neg"], "hard_swish")


def test_x_times_hard_sigmoid_from_opset_14_becomes_hard_swish():
    b = ModelBuilder(opset=14)
    x = b.input("x", SHAPE)
    source = b.node("Identity", [x])
    gate = b.node("HardSigmoid", [source], alpha=1 / 6, beta=0.5)
    b.output(b.node("Neg", [b.node("Mul", [gate, source])], ["y"]))
    assert_fused(b.build(), ["Identity", "HardSwish", "Neg"], "hard_swish")


def test_x_times_clip_over_6_from_opset_14_becomes_hard_swish():
    """x · (clip(x + 3, 0, 6)/6): HardSigmoid first, then HardSwish, in one run."""
    b = ModelBuilder(opset=14)
    x = b.input("x", SHAPE)
    source = b.node("Identity", [x])
    gate = b.node("Div", [clamp(b, b.node("Add", [source, scalar(b, 3.0, "three")])), scalar(b, 6.0, "six")])
    b.output(b.node("Neg", [b.node("Mul", [source, gate])], ["y"]))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters == {"hard_sigmoid": 1, "hard_swish": 1}
    assert top_ops(optimized.graph) == ["Identity", "HardSwish", "Neg"]
    assert_equivalent(model, optimized, feeds())


# ----------------------------------------------------------------------------- must not fire


def test_x_times_hard_sigmoid_before_opset_14_stays():
    b = ModelBuilder(opset=13)
    x = b.input("x", SHAPE)
    source = b.node("Identity", [x])
    b.output(b.node("Neg", [b.node("Mul", [source, b.node("HardSigmoid", [source], alpha=1 / 6, beta=0.5)])], ["y"]))
    assert_kept(b.build())


def test_x_times_hard_sigmoid_with_other_parameters_stays():
    """Paddle's hardsigmoid has slope 0.2: x·HardSigmoid(x; 0.2, 0.5) is not HardSwish."""
    b = ModelBuilder(opset=14)
    x = b.input("x", SHAPE)
    source = b.node("Identity", [x])
    b.output(b.node("Neg", [b.node("Mul", [source, b.node("HardSigmoid", [source], alpha=0.2, beta=0.5)])], ["y"]))
    assert_kept(b.build())


@pytest.mark.parametrize(
    "options",
    [{"divisor": 3.0}, {"low": -1.0}, {"low": 1.0}, {"high": 5.0}],
    ids=["divisor-not-the-bound", "negative-lower-bound", "positive-lower-bound", "bound-not-the-divisor"],
)
def test_clip_whose_bounds_do_not_make_a_hard_sigmoid_stays(options):
    assert_kept(hard_sigmoid_model(**options).build())


def test_per_channel_shift_stays_an_add_before_the_hard_sigmoid():
    """HardSigmoid has one beta: a shift per channel stays, and the clamp becomes HardSigmoid(y; 1/6, 0)."""
    b = ModelBuilder(opset=11)
    x = b.input("x", SHAPE)
    shift = b.initializer("shift", np.arange(3, dtype=np.float32).reshape(3, 1, 1))
    clamped = clamp(b, b.node("Add", [x, shift]))
    b.output(b.node("Neg", [b.node("Div", [clamped, scalar(b, 6.0, "six")])], ["y"]))
    optimized = assert_fused(b.build(), ["Add", "HardSigmoid", "Neg"], "hard_sigmoid")
    assert attributes(optimized, "HardSigmoid")["beta"] == 0


def test_hard_swish_whose_gate_reads_another_tensor_stays():
    """x · clip(z + 3, 0, 6)/6 with z ≠ x is not a hard swish."""
    b = hard_swish_model(gate_input="other")
    b.node("Relu", ["x"], ["other"])
    b.nodes.insert(0, b.nodes.pop())  # the Relu first, so the graph stays sorted
    assert_kept(b.build())


def test_clip_read_elsewhere_stays():
    b = hard_sigmoid_model()
    clip = next(node for node in b.nodes if node.op_type == "Clip")
    b.output(b.node("Abs", [clip.output[0]], ["z"]))
    assert_kept(b.build())


def test_opset_below_6_stays():
    b = ModelBuilder(opset=5)
    x = b.input("x", SHAPE)
    clamped = b.node("Clip", [b.node("Add", [x, scalar(b, 3.0, "three")])], min=0.0, max=6.0)
    b.output(b.node("Neg", [b.node("Div", [clamped, scalar(b, 6.0, "six")])], ["y"]), np.float32, SHAPE)
    model = b.build()
    optimized, result = run_pass(model, "fuse-hard-sigmoid")
    assert not result.changed and ops(optimized) == ops(model)


def test_hard_swish_inside_a_branch_is_replaced_there():
    """The new nodes go into the branch, before the node they replace; x comes from the outer graph."""
    b = ModelBuilder(opset=11)
    x = b.input("x", SHAPE)
    condition = b.input("c", [], np.bool_)
    source = b.node("Identity", [x], ["source"])
    then = b.branch()
    gated = then.node("Clip", [then.node("Add", [source, scalar(b, 3.0, "three")]), scalar(b, 0.0, "zero"), scalar(b, 6.0, "six")])
    then.output(then.node("Div", [then.node("Mul", [source, gated]), "six"]))
    other = b.branch()
    other.output(other.node("Neg", [source]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    optimized, result = fuse(model)

    assert result.counters["hard_sigmoid"] == 1
    assert top_ops(branches(optimized)[0]) == ["HardSigmoid", "Mul"]
    inputs = [{**feed, "c": np.array(flag)} for feed in feeds() for flag in (True, False)]
    assert_equivalent(model, optimized, inputs)
