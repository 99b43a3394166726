"""quantize-int8: int8 weights behind DequantizeLinear, activations through QuantizeLinear/DequantizeLinear.

Models are `x -> Conv -> Relu -> Flatten -> Gemm/MatMul -> y` with random weights; activation
ranges come from onnxslim.calibration.calibrate_ranges on random samples like the verifier's.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import ModelBuilder, ops, output_names, random

import onnxslim
from onnxslim.calibration import calibrate_ranges
from onnxslim.model import to_graph, to_model
from onnxslim.passes.quantize_qdq import activation_tensors


def conv_model(*, opset=17, channels=64, head="Gemm", trans_b=1):
    b = ModelBuilder(opset=opset)
    x = b.input("x", [1, 8, 8, 8])
    weight = b.initializer("w", random([channels, 8, 3, 3], seed=1) * 0.2)
    conv = b.node("Conv", [x, weight, b.initializer("bias", random([channels], seed=2))], ["conv"], pads=[1, 1, 1, 1], name="conv")
    relu = b.node("Relu", [conv], ["relu"])
    pooled = b.node("GlobalAveragePool", [relu], ["pool"])
    flat = b.node("Flatten", [pooled], ["flat"])
    if head == "Gemm":
        shape = [10, channels] if trans_b else [channels, 10]
        y = b.node("Gemm", [flat, b.initializer("fc", random(shape, seed=3)), b.initializer("fc_bias", random([10], seed=4))], ["y"], transB=trans_b, name="fc")
    else:
        y = b.node("MatMul", [flat, b.initializer("fc", random([channels, 10], seed=3))], ["y"], name="fc")
    b.output(y)
    return b.build()


def samples(count=8, seed=5):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal([1, 8, 8, 8]).astype(np.float32)} for _ in range(count)]


def ranges_for(model, exclude=""):
    return calibrate_ranges(model, samples(), activation_tensors(to_graph(model), exclude))


def quantize(model, ranges=None, **options):
    graph = to_graph(model)
    result = onnxslim.get_pass("quantize-int8")(graph, onnxslim.PassContext(calibration=ranges), **options)
    quantized = to_model(graph, model)
    onnx.checker.check_model(quantized, full_check=True)
    return quantized, result


def cosine_passes(model, quantized, cosine):
    report = onnxslim.verify(model, quantized, inputs=samples(3, seed=9), budget=onnxslim.FidelityBudget(min_cosine=cosine))
    assert report.passed, report.message


def runs(model, feed=None):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed or samples(1)[0])


def dequantize_of(model, weight):
    return next(node for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input[0] == f"{weight}_quantized")


def initializer(model, name):
    return next(onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer if tensor.name == name)


# ----------------------------------------------------------------------------- weight-only


def test_weight_only_is_four_times_smaller_and_close():
    model = conv_model(channels=256)
    quantized, result = quantize(model, weight_only=True)
    assert result.counters["weights"] == 2 and result.counters["activations"] == 0
    assert ops(quantized)["DequantizeLinear"] == 2 and ops(quantized)["QuantizeLinear"] == 0
    assert len(quantized.SerializeToString()) < len(model.SerializeToString()) / 3.5
    assert initializer(quantized, "w_quantized").dtype == np.int8
    assert initializer(quantized, "bias").dtype == np.float32  # biases stay float
    assert output_names(quantized) == output_names(model)
    runs(quantized)
    cosine_passes(model, quantized, 0.999)


def test_weight_only_needs_no_calibration():
    quantize(conv_model(), None, weight_only=True)


@pytest.mark.parametrize(("head", "trans_b", "axis"), [("Gemm", 1, 0), ("Gemm", 0, 1), ("MatMul", 0, 1)])
def test_weights_are_per_output_channel(head, trans_b, axis):
    model = conv_model(head=head, trans_b=trans_b)
    quantized, _ = quantize(model, weight_only=True)
    attrs = {attribute.name: attribute.i for attribute in dequantize_of(quantized, "w").attribute}
    assert attrs == {"axis": 0} and initializer(quantized, "w_scale").shape == (64,)
    attrs = {attribute.name: attribute.i for attribute in dequantize_of(quantized, "fc").attribute}
    assert attrs == {"axis": axis} and initializer(quantized, "fc_scale").shape == (10,)
    assert not initializer(quantized, "fc_zero_point").any()
    cosine_passes(model, quantized, 0.999)


def test_opset_11_falls_back_to_per_tensor_weights():
    model = conv_model(opset=11)
    quantized, result = quantize(model, ranges_for(model))
    assert result.counters["weights"] == 2
    for weight in ("w", "fc"):
        node = dequantize_of(quantized, weight)
        assert not node.attribute and initializer(quantized, f"{weight}_scale").shape == ()
    runs(quantized)
    cosine_passes(model, quantized, 0.99)


def test_per_channel_can_be_turned_off():
    quantized, _ = quantize(conv_model(), weight_only=True, per_channel=False)
    assert initializer(quantized, "w_scale").shape == ()


# ----------------------------------------------------------------------------- full QDQ


@pytest.mark.parametrize(
    ("activation_type", "symmetric"), [("uint8", False), ("int8", False), ("int8", True), ("uint8", True)]
)
def test_full_qdq_runs_and_stays_close(activation_type, symmetric):
    model = conv_model()
    quantized, result = quantize(model, ranges_for(model), activation_type=activation_type, symmetric_activations=symmetric)
    assert result.counters == {"weights": 2, "activations": 2, "unranged": 0}
    assert ops(quantized)["QuantizeLinear"] == 2 and ops(quantized)["DequantizeLinear"] == 4
    zero_point = initializer(quantized, "x_zero_point")
    assert zero_point.dtype == np.dtype(activation_type)
    if symmetric:
        assert int(zero_point) == (0 if activation_type == "int8" else 128)
    conv = next(node for node in quantized.graph.node if node.op_type == "Conv")
    assert list(conv.input[:2]) == ["x_dequantized", "w_dequantized"]
    assert [value.name for value in quantized.graph.input] == ["x"]  # the interface keeps its names
    assert output_names(quantized) == output_names(model)
    runs(quantized)
    cosine_passes(model, quantized, 0.99)


def test_activation_parameters_hold_zero_and_the_range():
    model = conv_model()
    quantized, _ = quantize(model, {"x": (0.5, 2.0), "flat": (-1.0, 3.0)})
    # [0.5, 2] widens to [0, 2]: zero point 0; [-1, 3]: scale 4/255, zero point round(255/4) = 64.
    assert float(initializer(quantized, "x_scale")) == pytest.approx(2 / 255)
    assert int(initializer(quantized, "x_zero_point")) == 0
    assert float(initializer(quantized, "flat_scale")) == pytest.approx(4 / 255)
    assert int(initializer(quantized, "flat_zero_point")) == 64


def test_one_pair_per_tensor_shared_by_its_readers():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 6, 6])
    left = b.node("Conv", [x, b.initializer("w1", random([4, 4, 1, 1], seed=1))], ["left"])
    right = b.node("Conv", [x, b.initializer("w2", random([4, 4, 1, 1], seed=2))], ["right"])
    b.output(b.node("Add", [left, right], ["y"]))
    model = b.build()
    quantized, result = quantize(model, {"x": (-3.0, 3.0)})
    assert result.counters["activations"] == 1 and ops(quantized)["QuantizeLinear"] == 1
    assert [node.input[0] for node in quantized.graph.node if node.op_type == "Conv"] == ["x_dequantized"] * 2
    runs(quantized, {"x": random([1, 4, 6, 6], seed=3)})


def test_tensor_without_range_stays_float():
    model = conv_model()
    quantized, result = quantize(model, {"x": (-4.0, 4.0)})
    assert result.counters["activations"] == 1 and result.counters["unranged"] == 1
    gemm = next(node for node in quantized.graph.node if node.op_type == "Gemm")
    assert gemm.input[0] == "flat"


def test_matmul_of_two_activations_quantizes_both():
    b = ModelBuilder()
    a = b.input("a", [2, 3])
    c = b.input("c", [3, 4])
    b.output(b.node("MatMul", [a, c], ["y"]))
    model = b.build()
    quantized, result = quantize(model, {"a": (-2.0, 2.0), "c": (-1.0, 1.0)})
    assert result.counters == {"weights": 0, "activations": 2, "unranged": 0}
    matmul = next(node for node in quantized.graph.node if node.op_type == "MatMul")
    assert list(matmul.input) == ["a_dequantized", "c_dequantized"]


# ----------------------------------------------------------------------------- where it must not fire


def test_missing_calibration_is_a_usage_error():
    with pytest.raises(onnxslim.UsageError, match="calibration"):
        quantize(conv_model(), None)


def test_unknown_activation_type_is_a_usage_error():
    with pytest.raises(onnxslim.UsageError, match="activation_type"):
        quantize(conv_model(), {}, activation_type="int4")


@pytest.mark.parametrize("exclude", ["Gemm", "fc", " fc , Relu"])
def test_exclude_by_op_type_or_name_leaves_the_layer_float(exclude):
    model = conv_model()
    quantized, result = quantize(model, ranges_for(model, exclude), exclude=exclude)
    assert result.counters["weights"] == 1 and result.counters["activations"] == 1
    gemm = next(node for node in quantized.graph.node if node.op_type == "Gemm")
    assert list(gemm.input) == ["flat", "fc", "fc_bias"]
    assert initializer(quantized, "fc").dtype == np.float32
    assert "flat" not in activation_tensors(to_graph(model), exclude)
    cosine_passes(model, quantized, 0.99)


def test_custom_domain_nodes_are_left_alone():
    b = ModelBuilder()
    b.use_domain("custom.domain")
    x = b.input("x", [2, 3])
    y = b.node("MatMul", [x, b.initializer("w", random([3, 4]))], ["y"], domain="custom.domain")
    b.output(y, np.float32, [2, 4])
    model = b.build(check=False)
    graph = to_graph(model)
    result = onnxslim.get_pass("quantize-int8")(graph, onnxslim.PassContext(calibration={"x": (-1.0, 1.0)}))
    assert not result.changed


def test_second_run_changes_nothing():
    model = conv_model()
    ranges = ranges_for(model)
    once, _ = quantize(model, ranges)
    twice, result = quantize(once, ranges)
    assert not result.changed and result.counters == {"weights": 0, "activations": 0, "unranged": 0}
    assert twice.SerializeToString() == once.SerializeToString()


def test_same_input_gives_same_bytes():
    model = conv_model()
    ranges = ranges_for(model)
    assert quantize(model, ranges)[0].SerializeToString() == quantize(model, ranges)[0].SerializeToString()


def test_registered_as_lossy():
    spec = onnxslim.get_pass("quantize-int8")
    assert not spec.lossless
    assert spec.options == {
        "per_channel": True,
        "activation_type": "uint8",
        "symmetric_activations": False,
        "weight_only": False,
        "exclude": "",
    }
