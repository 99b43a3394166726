"""Hostile and careless inputs (issue 17): every case that once broke onnxslim's promise.

The promise: exit 0 only for a correct model, 1 only for "verification failed", 2 for bad input
(one line, no traceback), 3 for our bug, 130 when interrupted; the input file and every file it
reads are byte-identical afterwards. Each section below is one class of hostile input.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxslim
from builder import ModelBuilder, assert_equivalent


# ----------------------------------------------------------------------------- calibration data: NaN, Inf, huge and zero-width ranges


# ----------------------------------------------------------------------------- thresholds, tolerances and other usage


# ----------------------------------------------------------------------------- the model's interface: overridable inputs, dynamic dims, types


# ----------------------------------------------------------------------------- the user's files


# ----------------------------------------------------------------------------- onnxruntime in a worker: crashes, hangs, memory


# ----------------------------------------------------------------------------- generated graphs and models onnxruntime already optimized
@pytest.mark.parametrize("op, attrs", [("Cast", {"to": onnx.TensorProto.FLOAT16}), ("Transpose", {"perm": [1, 0]})])
def test_chain_whose_last_result_folds_to_a_model_output(op, attrs):
    """Found by tools/fuzz.py: Expand(c, Shape(x)) is a constant once x's shape is static, so
    fold-constants gives the model output (the chain's last result) to a Constant node; its old
    producer kept reading the chain's middle, and fuse-casts / fuse-transposes rewired that reader
    without results (IndexError, exit 3)."""
    b = ModelBuilder(opset=17)
    x = b.input("x", [2, 3], np.bool_)
    shape = b.node("Shape", [x])
    expanded = b.node("Expand", [b.initializer("c", np.zeros([1, 1], np.bool_)), shape])
    first_attrs = {"to": onnx.TensorProto.FLOAT} if op == "Cast" else {"perm": [1, 0]}
    middle = b.node(op, [expanded], **first_attrs)
    b.output(b.node(op, [middle], **attrs))
    model = b.build()
    optimized = onnxslim.optimize(model)
    assert [node.op_type for node in optimized.graph.node] == ["Constant"]
    assert_equivalent(model, optimized)

