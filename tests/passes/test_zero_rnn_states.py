"""eliminate-zero-rnn-states: zero initial states and full-length sequence_lens of LSTM/GRU/RNN are omitted."""

import numpy as np
import onnx.numpy_helper
from onnx.reference import ReferenceEvaluator
import pytest
from builder import ModelBuilder, assert_equivalent, feeds_at_two_sizes, ops, random, run_pass, run_passes

HIDDEN, FEATURES, SEQ = 5, 3, 4
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def omit(model):
    optimized, result = run_pass(model, "eliminate-zero-rnn-states", first=("infer-shapes",))
    return run_passes(optimized, "eliminate-dead-nodes"), result


def recurrent(op="LSTM", *, initial_h="zeros", initial_c="zeros", batch="batch", sequence_lens=None, directions=1, peepholes=False, layout=0, opset=17):
    """x[seq, batch, 3] -> op (hidden 5) -> Y, Y_h; initial states given as `initial_h`/`initial_c` say:
    "zeros" (a constant), "shape" (ConstantOfShape of a shape computed from x), "expand"
    (Expand of a zero scalar to that shape), "negative-zeros", "random", or None (omitted)."""
    b = ModelBuilder(opset=opset)
    x_shape = [SEQ, batch, FEATURES] if layout == 0 else [batch, SEQ, FEATURES]
    x = b.input("x", x_shape)
    gates = GATES[op] * HIDDEN
    w = b.initializer("w", random([directions, gates, FEATURES], seed=1))
    r = b.initializer("r", random([directions, gates, HIDDEN], seed=2))
    bias = b.initializer("bias", random([directions, 2 * gates], seed=3))
    lens = "" if sequence_lens is None else b.initializer("lens", np.asarray(sequence_lens, np.int32))
    inputs = [x, w, r, bias, lens, _state(b, x, initial_h, directions, layout, 4)]
    if op == "LSTM":
        inputs.append(_state(b, x, initial_c, directions, layout, 5))
        if peepholes:
            inputs.append(b.initializer("p", random([directions, 3 * HIDDEN], seed=6)))
    while inputs[-1] == "":
        inputs.pop()
    attrs = {"hidden_size": HIDDEN}
    if directions == 2:
        attrs["direction"] = "bidirectional"
    if layout:
        attrs["layout"] = layout
    outputs = b.node(op, inputs, 3 if op == "LSTM" else 2, **attrs)
    b.output(b.node("Neg", [outputs[0]], ["y"]))
    b.output(b.node("Neg", [outputs[1]], ["y_h"]))
    return b.build()


def _state(b, x, kind, directions, layout, seed):
    if kind is None:
        return ""
    state_shape = [directions, 2, HIDDEN] if layout == 0 else [2, directions, HIDDEN]
    if kind in ("zeros", "negative-zeros", "random"):
        value = {"zeros": np.zeros, "negative-zeros": lambda shape: np.full(shape, -0.0)}.get(kind, lambda shape: random(shape, seed=seed))
        return b.initializer(b.fresh("state"), np.asarray(value(state_shape), np.float32))
    # The batch dim of x, between the other two dims of the state (as exporters build it).
    batch = b.node("Gather", [b.node("Shape", [x]), b.initializer(b.fresh("axis"), np.array([1 - layout], np.int64))])
    outer = b.initializer(b.fresh("outer"), np.array([directions], np.int64))
    hidden = b.initializer(b.fresh("hidden"), np.array([HIDDEN], np.int64))
    shape = b.node("Concat", [outer, batch, hidden] if layout == 0 else [batch, outer, hidden], axis=0)
    if kind == "shape":
        # initial_h's says its value; initial_c's takes the default (a float 0).
        fill = {"value": onnx.numpy_helper.from_array(np.zeros([1], np.float32))} if seed == 4 else {}
        return b.node("ConstantOfShape", [shape], **fill)
    if kind == "sliced":  # zeros for two stacked layers, the second layer's taken (torch's export)
        layers = b.node("Concat", [b.initializer(b.fresh("layers"), np.array([2 * directions], np.int64)), batch, hidden] if layout == 0 else [batch, b.initializer(b.fresh("layers"), np.array([2 * directions], np.int64)), hidden], axis=0)
        bounds = [b.initializer(b.fresh("bound"), np.array([value], np.int64)) for value in (directions, 2 * directions, layout)]
        return b.node("Slice", [b.node("ConstantOfShape", [layers]), *bounds])
    if kind == "cast":
        return b.node("Cast", [b.node("ConstantOfShape", [shape], value=onnx.numpy_helper.from_array(np.zeros([1], np.float64)))], to=onnx.TensorProto.FLOAT)
    if kind in ("expand", "expand-ones"):
        fill = np.zeros([1], np.float32) if kind == "expand" else np.ones([1], np.float32)
        return b.node("Expand", [b.initializer(b.fresh("fill"), fill), shape])
    raise ValueError(kind)


def _batch(kind):
    """A constant state fixes the batch; one computed from x's shape follows it."""
    return 2 if kind == "zeros" else "batch"


def assert_omitted(model, omitted, *, left_inputs):
    optimized, result = omit(model)
    assert result.counters["omitted"] == omitted
    node = next(node for node in optimized.graph.node if node.op_type in GATES)
    assert list(node.input) == left_inputs
    assert_equivalent(model, optimized, feeds_at_two_sizes(model))
    _, again = run_pass(optimized, "eliminate-zero-rnn-states", first=("infer-shapes",))
    assert not again.changed
    return optimized


@pytest.mark.parametrize("kind", ["zeros", "shape", "expand", "sliced", "cast"])
def test_zero_lstm_states_are_omitted(kind):
    optimized = assert_omitted(recurrent(initial_h=kind, initial_c=kind, batch=_batch(kind)), 2, left_inputs=["x", "w", "r", "bias"])
    # The shape computation that built them is dead.
    assert set(ops(optimized)) == {"LSTM", "Neg"}


@pytest.mark.parametrize("op", ["GRU", "RNN"])
@pytest.mark.parametrize("kind", ["zeros", "shape"])
def test_zero_gru_and_rnn_states_are_omitted(op, kind):
    assert_omitted(recurrent(op, initial_h=kind, batch=_batch(kind)), 1, left_inputs=["x", "w", "r", "bias"])


def test_bidirectional():
    model = recurrent(initial_h="shape", initial_c="zeros", batch=2, directions=2)
    assert_omitted(model, 2, left_inputs=["x", "w", "r", "bias"])


def test_batch_first_layout():
    """onnxruntime refuses layout=1, so onnx's reference evaluator compares."""
    model = recurrent("GRU", initial_h="shape", batch=2, sequence_lens=[SEQ, SEQ], layout=1, opset=14)
    optimized, result = omit(model)
    assert result.counters["omitted"] == 2 and ops(optimized) == {"GRU": 1, "Neg": 2}
    for feed in feeds_at_two_sizes(model):
        for expected, actual in zip(ReferenceEvaluator(model).run(None, feed), ReferenceEvaluator(optimized).run(None, feed)):
            np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_a_state_before_a_kept_input_becomes_an_empty_name():
    model = recurrent(initial_h="random", initial_c="zeros", batch=2, peepholes=True)
    assert_omitted(model, 1, left_inputs=["x", "w", "r", "bias", "", model.graph.node[-3].input[5], "", "p"])


@pytest.mark.parametrize("kind", ["random", "negative-zeros", "expand-ones"])
def test_states_that_are_not_positive_zeros_are_kept(kind):
    _, result = omit(recurrent("GRU", initial_h=kind, batch=2))
    assert not result.changed


def test_full_length_sequence_lens_is_omitted():
    model = recurrent("GRU", initial_h=None, batch=2, sequence_lens=[SEQ, SEQ])
    assert_omitted(model, 1, left_inputs=["x", "w", "r", "bias"])


@pytest.mark.parametrize("lengths, batch", [([SEQ, SEQ - 1], 2), ([SEQ, SEQ], "batch"), ([SEQ], 2)], ids=["shorter", "dynamic-batch", "wrong-size"])
def test_other_sequence_lens_are_kept(lengths, batch):
    model = recurrent("GRU", initial_h=None, batch=batch, sequence_lens=lengths)
    _, result = omit(model)
    assert not result.changed
