"""onnxslim.layers: the channel axes it names are the ones onnxruntime computes with, its bias
slots are where the bias sits, and its multiply-adds of a batch are the batch times one sample's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from builder import ModelBuilder
from onnxslim.layers import bias_slot, channels, multiply_adds, weight_axes
from onnxslim.model import to_graph

# (op, attributes, input shape, weight shape, output channel axis of the output)
LAYERS = [
    ("Conv", {}, [1, 4, 5, 5], [6, 4, 3, 3], 1),
    ("Conv", {"group": 2}, [1, 4, 5, 5], [6, 2, 3, 3], 1),
    ("ConvTranspose", {}, [1, 4, 5, 5], [4, 6, 3, 3], 1),
    ("ConvTranspose", {"group": 2}, [1, 4, 5, 5], [4, 3, 3, 3], 1),
    ("Gemm", {}, [3, 4], [4, 6], 1),
    ("Gemm", {"transB": 1}, [3, 4], [6, 4], 1),
    ("MatMul", {}, [2, 3, 4], [4, 6], 2),
]


def _run(op, attrs, input_shape, weight, feed):
    b = ModelBuilder()
    x = b.input("x", input_shape)
    b.output(b.node(op, [x, b.initializer("w", weight)], **attrs))
    model = b.build()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model, session.run(None, {"x": feed})[0]


@pytest.mark.parametrize("op, attrs, input_shape, weight_shape, channel_axis", LAYERS)
def test_weight_axes_are_the_channels_onnxruntime_computes(op, attrs, input_shape, weight_shape, channel_axis):
    rng = np.random.default_rng(0)
    feed = rng.uniform(0.5, 1.0, input_shape).astype(np.float32)
    model, _ = _run(op, attrs, input_shape, np.ones(weight_shape, np.float32), feed)
    node = to_graph(model).nodes[0]
    axes = weight_axes(node, len(weight_shape))
    in_channels, out_channels = channels(node, weight_shape)
    assert in_channels == input_shape[channel_axis if op != "Gemm" else 1]
    for proto_or_node in (node, model.graph.node[0]):
        assert weight_axes(proto_or_node, len(weight_shape)) == axes
    # A weight with one output slice set moves only that slice's output channel(s).
    weight = np.zeros(weight_shape, np.float32)
    index = [slice(None)] * len(weight_shape)
    index[axes.output] = 1
    weight[tuple(index)] = 1.0
    _, output = _run(op, attrs, input_shape, weight, feed)
    assert output.shape[channel_axis] == out_channels
    moved = np.flatnonzero(np.abs(output).sum(axis=tuple(a for a in range(output.ndim) if a != channel_axis)))
    per_slice = out_channels // weight_shape[axes.output]  # a grouped ConvTranspose: one per group
    assert len(moved) == per_slice and 1 in moved


@pytest.mark.parametrize("op, attrs, input_shape, weight_shape, channel_axis", LAYERS)
def test_multiply_adds_of_a_batch_are_the_batch_times_one_sample(op, attrs, input_shape, weight_shape, channel_axis):
    feed = np.ones(input_shape, np.float32)
    _, output = _run(op, attrs, input_shape, np.ones(weight_shape, np.float32), feed)
    whole = multiply_adds(op, attrs, input_shape, weight_shape, output.shape)
    one = multiply_adds(op, attrs, input_shape, weight_shape, output.shape, per_sample=True)
    assert whole == input_shape[0] * one
    # Every product adds one: with ones in, the outputs sum to the multiply-adds (no padding here).
    assert whole == int(output.sum())
    unknown = ["N", *output.shape[1:]]  # a symbolic batch: one sample's count still known
    assert multiply_adds(op, attrs, ["N", *input_shape[1:]], weight_shape, unknown, per_sample=True) == one
    assert multiply_adds(op, attrs, ["N", *input_shape[1:]], weight_shape, unknown) is None


def test_bias_slots():
    b = ModelBuilder()
    x = b.input("x", [2, 4])
    gemm = b.node("Gemm", [x, b.initializer("w", np.ones([4, 4], np.float32)), b.initializer("c", np.ones(4, np.float32))])
    product = b.node("MatMul", [gemm, b.initializer("m", np.ones([4, 3], np.float32))])
    b.output(b.node("Add", [b.initializer("bias", np.ones(3, np.float32)), product]))
    graph = to_graph(b.build())
    gemm_node, matmul_node, add_node = graph.nodes
    assert bias_slot(gemm_node) == (gemm_node, 2)
    assert bias_slot(matmul_node) == (add_node, 0)
    assert bias_slot(add_node) is None
