"""Writes models/demo/tinynet.onnx: the small model the README's quick start optimizes.

A 32x32 image classifier written the way exporters often write models: weights in Constant
nodes, a weight computed from constants at run time, Identity and Dropout left in, a Reshape
to the shape the tensor already has and an Add of zero. Deterministic: the same bytes every run.

    python tools/make_demo_model.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUTPUT = Path(__file__).resolve().parents[1] / "models" / "demo" / "tinynet.onnx"


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(20261124)

    def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"{name}_constant", value=numpy_helper.from_array(array, name))

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    nodes = [
        constant("conv1_w", weights(16, 3, 3, 3)),
        constant("conv1_b", np.zeros(16, np.float32)),
        constant("bn_scale", rng.uniform(0.5, 1.5, 16).astype(np.float32)),
        constant("bn_bias", rng.uniform(-0.1, 0.1, 16).astype(np.float32)),
        constant("bn_mean", rng.uniform(-0.1, 0.1, 16).astype(np.float32)),
        constant("bn_var", rng.uniform(0.5, 1.5, 16).astype(np.float32)),
        constant("conv2_w_raw", weights(32, 16, 3, 3)),
        constant("conv2_w_gain", np.array(0.5, np.float32)),
        constant("keep_shape", np.array([1, 16, 32, 32], np.int64)),
        constant("zero", np.array(0.0, np.float32)),
        constant("fc_w", weights(10, 32)),
        constant("fc_b", np.zeros(10, np.float32)),
        helper.make_node("Conv", ["image", "conv1_w", "conv1_b"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["conv1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn1"], name="bn1"
        ),
        helper.make_node("Relu", ["bn1"], ["relu1"], name="relu1"),
        helper.make_node("Identity", ["relu1"], ["relu1_copy"], name="copy"),
        helper.make_node("Dropout", ["relu1_copy"], ["dropped"], name="dropout"),
        helper.make_node("Reshape", ["dropped", "keep_shape"], ["reshaped"], name="same_shape"),
        # A weight computed from constants at run time: folded once, offline.
        helper.make_node("Mul", ["conv2_w_raw", "conv2_w_gain"], ["conv2_w"], name="scale_weight"),
        helper.make_node("Conv", ["reshaped", "conv2_w"], ["conv2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Add", ["conv2", "zero"], ["conv2_plus_zero"], name="add_zero"),
        helper.make_node("Relu", ["conv2_plus_zero"], ["relu2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tinynet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxslim-demo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str]) -> int:
    output = Path(argv[0]) if argv else OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build(), str(output))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
