"""Inputs of LSTM/GRU/RNN that say what omitting them says: zero initial states, full sequence lengths."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_node_value, constant_value, find, is_empty, known_dim, only_producer, set_inputs, walk
from onnxslim.manager import PassContext, PassResult, register_pass

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
SEQUENCE_LENS, INITIAL_H, INITIAL_C = 4, 5, 6
# Ops whose result holds only values of their first input (a Cast keeps +0 a +0 in every type).
VALUE_MOVING_OPS = frozenset({"Expand", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Identity", "Gather", "Tile", "Split", "Cast"})
# How many such ops are followed back to the zero.
ZERO_REACH = 8


@register_pass("eliminate-zero-rnn-states")
def eliminate_zero_rnn_states(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Omit an LSTM/GRU/RNN's all-zero initial states and a sequence_lens that is every sequence's full length.

    An omitted initial_h/initial_c is zeros, so an all-zero constant, or a ConstantOfShape/Expand
    of zero (exporters build one from Shape(x) for a dynamic batch, and slice it per layer), says
    nothing the op does not assume; once omitted, its shape computation dies. A zero with its sign bit set is kept: −0
    can reach a result that is zero and flip its sign. An omitted sequence_lens means full length,
    so a constant one equal to the (static) sequence length everywhere goes too.
    """
    omitted = 0
    for subgraph in walk(graph):
        for node in find(subgraph, *RECURRENT_OPS):
            inputs = list(node.inputs)
            slots = [INITIAL_H, INITIAL_C] if node.op == "LSTM" else [INITIAL_H]
            empty = [slot for slot in slots if slot < len(inputs) and not is_empty(inputs[slot]) and _is_zero(inputs[slot])]
            if SEQUENCE_LENS < len(inputs) and not is_empty(inputs[SEQUENCE_LENS]) and _is_full_length(node, inputs[SEQUENCE_LENS]):
                empty.append(SEQUENCE_LENS)
            if not empty:
                continue
            for slot in empty:
                inputs[slot] = gs.Variable.empty()
            while inputs and is_empty(inputs[-1]):
                inputs.pop()  # trailing omitted inputs may be left out altogether
            set_inputs(node, inputs)
            omitted += len(empty)
    return PassResult(omitted=omitted)


def _is_zero(tensor: gs.Tensor, reach: int = ZERO_REACH) -> bool:
    """Whether `tensor` is +0 everywhere: a constant, ConstantOfShape(·, 0), or such a tensor
    moved about by ops whose results are values of their data input (a Slice per layer of one
    zero state for all layers, as torch exports a stacked LSTM)."""
    value = constant_value(tensor)
    if value is not None:
        return _all_positive_zero(value)
    node = only_producer(tensor)
    if node is None or reach == 0 or not node.inputs:
        return False
    if node.op == "ConstantOfShape":
        if "value" not in node.attrs:
            return True  # the default value is a float 0
        fill = constant_node_value(node)
        return fill is not None and _all_positive_zero(fill)
    if node.op in VALUE_MOVING_OPS:
        return _is_zero(node.inputs[0], reach - 1)
    if node.op == "Concat":
        return all(_is_zero(part, reach - 1) for part in node.inputs)
    return False


def _all_positive_zero(value: np.ndarray) -> bool:
    value = np.asarray(value)
    if value.dtype.kind not in "fiu":
        return False
    return bool(np.all(value == 0)) and not (value.dtype.kind == "f" and np.any(np.signbit(value)))


def _is_full_length(node: gs.Node, sequence_lens: gs.Tensor) -> bool:
    """Whether sequence_lens is a constant equal to X's static sequence length for every batch entry."""
    value = constant_value(sequence_lens)
    if value is None or value.dtype.kind not in "iu" or value.ndim != 1:
        return False
    layout = int(node.attrs.get("layout", 0))  # 0: X is [seq, batch, input]; 1: [batch, seq, input]
    length, batch = known_dim(node.inputs[0], layout), known_dim(node.inputs[0], 1 - layout)
    return length is not None and batch == value.shape[0] and bool(np.all(value == length))
