"""onnxslim.quantize end to end: form chosen for the CPU, fidelity measured on held-out samples,
sensitive layers kept in float for a target, bias correction; and `optimize --quantize int8`."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from builder import ModelBuilder, ops, random
from click.testing import CliRunner

import onnxslim
from onnxslim.calibration import CalibrationData
from onnxslim.cli import cli
from onnxslim.errors import InputSpecError, UsageError
from onnxslim.quantize import FidelityTarget, QuantizeOptions, cpu_int8_support, quantize_model

EPYC = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_1 sse4_2 avx avx2 fma\n"
SAPPHIRE = "model name\t: Intel Xeon Platinum 8481C\nflags\t\t: sse4_1 avx2 avx512f avx512bw avx512_vnni amx_int8\n"
GRAVITON = "CPU part\t: 0xd40\nFeatures\t: fp asimd asimddp i8mm\n"


def conv_net(outlier: float = 1.0) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y.
    With outlier > 1, one output channel of the first Conv is that much larger than the others:
    one activation scale for all of them then wipes out the small channels."""
    b = ModelBuilder(opset=17)
    x = b.input("x", [1, 4, 8, 8])
    first = random([16, 4, 3, 3], seed=1) * 0.3
    first[0] *= outlier
    conv = b.node("Conv", [x, b.initializer("w1", first), b.initializer("b1", random([16], seed=2) * 0.1)], ["c1"],
                  pads=[1, 1, 1, 1], name="conv1")
    relu = b.node("Relu", [conv], ["r1"])
    second = random([16, 16, 3, 3], seed=3) * 0.2
    second[:, 0] /= outlier  # the model as a whole stays well scaled
    conv2 = b.node("Conv", [relu, b.initializer("w2", second), b.initializer("b2", random([16], seed=4) * 0.1)], ["c2"],
                   pads=[1, 1, 1, 1], name="conv2")
    relu2 = b.node("Relu", [conv2], ["r2"])
    pooled = b.node("GlobalAveragePool", [relu2], ["pool"])
    flat = b.node("Flatten", [pooled], ["flat"])
    y = b.node("Gemm", [flat, b.initializer("fc", random([10, 16], seed=5)), b.initializer("fc_bias", random([10], seed=6))],
               ["y"], transB=1, name="fc")
    b.output(y)
    return b.build()


def samples(model, count: int = 10, seed: int = 7) -> CalibrationData:
    rng = np.random.default_rng(seed)
    feeds = [{"x": np.abs(rng.standard_normal([1, 4, 8, 8])).astype(np.float32)} for _ in range(count)]
    return CalibrationData.from_feeds(model, feeds)


# ----------------------------------------------------------------------------- the CPU


def test_cpu_without_vnni_saturates_and_has_no_fast_int8():
    support = cpu_int8_support(EPYC)
    assert support.model == "AMD EPYC 7B12" and "avx2" in support.flags
    assert not support.fast_int8 and support.saturates
    assert "AVX2 but no VNNI" in support.reason


@pytest.mark.parametrize(("cpuinfo", "names"), [(SAPPHIRE, "AVX-512 VNNI"), (GRAVITON, "Arm dot product")])
def test_cpu_with_dot_products_is_fast_and_does_not_saturate(cpuinfo, names):
    support = cpu_int8_support(cpuinfo)
    assert support.fast_int8 and not support.saturates
    assert names in support.reason


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("text", "metric", "value"),
    [("30dB", "sqnr_db", 30.0), ("sqnr=25", "sqnr_db", 25.0), ("cosine=0.999", "cosine", 0.999), ("0.98", "cosine", 0.98),
     (" 40 dB ", "sqnr_db", 40.0)],
)
def test_fidelity_target_parses(text, metric, value):
    target = FidelityTarget.parse(text)
    assert (target.metric, target.value) == (metric, value)


@pytest.mark.parametrize("text", ["loud", "psnr=30", "cosine=2", "sqnr="])
def test_fidelity_target_rejects_bad_text(text):
    with pytest.raises(InputSpecError, match="fidelity-target"):
        FidelityTarget.parse(text)


def test_options_reject_unknown_mode_and_method():
    with pytest.raises(UsageError, match="mode"):
        QuantizeOptions(mode="int4")
    with pytest.raises(UsageError, match="method"):
        QuantizeOptions(method="magic")


# ----------------------------------------------------------------------------- quantize_model


def test_weights_mode_is_four_times_smaller_and_close():
    model = conv_net()
    simplified = onnxslim.optimize(model, verify=False)
    quantized, report = quantize_model(simplified, samples(model), QuantizeOptions(mode="weights"), cpu=cpu_int8_support(EPYC))
    assert report.mode == "weights" and report.activations == 0
    assert [layer.status for layer in report.layers] == ["int8"] * 3
    assert all(layer.weight_sqnr_db > 35 for layer in report.layers)
    assert report.fidelity["cosine"] > 0.999
    assert report.calibration_samples == 10 and report.evaluation_samples == 8  # all calibrate; the last 8 judge
    assert any("which calibration used too" in note for note in report.notes)
    assert "QuantizeLinear" not in ops(quantized)
    assert "bias correction on 3 layers" in report.notes


def test_full_mode_quantizes_activations_with_reduced_range_on_avx2():
    model = conv_net()
    simplified = onnxslim.optimize(model, verify=False)
    quantized, report = quantize_model(simplified, samples(model), QuantizeOptions(mode="full"), cpu=cpu_int8_support(EPYC))
    assert report.mode == "full" and report.activations > 0 and report.unranged == 0
    assert any("7-bit" in note for note in report.notes)
    dequantized = {node.input[0] for node in quantized.graph.node if node.op_type == "DequantizeLinear"}
    int8 = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in quantized.graph.initializer
            if tensor.data_type == onnx.TensorProto.INT8}
    # conv1, conv2 and fc (writing the graph output, which keeps its name) all become integer kernels
    weights = {name: value for name, value in int8.items() if value.ndim > 1}  # not fc's zero point
    assert len(weights) == 3 and set(weights) <= dequantized
    assert max(int(np.abs(weight).max()) for weight in weights.values()) <= 63
    assert [output.name for output in quantized.graph.output] == ["y"]
    assert report.fidelity["cosine"] > 0.99


def test_full_mode_needs_calibration_data():
    with pytest.raises(UsageError, match="calibration"):
        quantize_model(conv_net(), None, QuantizeOptions(mode="full"))


def test_auto_without_data_quantizes_weights_and_says_why():
    quantized, report = quantize_model(conv_net(), None, QuantizeOptions())
    assert report.mode == "weights" and "no calibration data" in report.reason
    assert not report.fidelity


def test_auto_measures_both_forms_and_gives_the_numbers():
    model = conv_net()
    simplified = onnxslim.optimize(model, verify=False)
    _, report = quantize_model(simplified, samples(model), QuantizeOptions(), cpu=cpu_int8_support(EPYC))
    assert report.mode in ("full", "weights")
    assert set(report.latency_ms) >= {"float", "full int8"}
    assert "ms float (1 thread" in report.reason
    assert report.target == "cosine >= 0.97"


def test_fidelity_target_keeps_the_most_sensitive_layers_in_float():
    model = conv_net(outlier=300.0)
    simplified = onnxslim.optimize(model, verify=False)
    data = samples(model)
    plain, plain_report = quantize_model(simplified, data, QuantizeOptions(mode="full", bias_correction=False))
    assert plain_report.fidelity["sqnr_db"] < 30  # the outlier channel ruins one activation scale
    target = FidelityTarget.parse("35dB")
    quantized, report = quantize_model(
        simplified, data, QuantizeOptions(mode="full", fidelity_target=target, bias_correction=False)
    )
    assert report.target_met and report.fidelity["sqnr_db"] >= 35
    kept = {layer.name for layer in report.layers if layer.status != "int8"}
    assert kept and kept <= {"conv1", "conv2"}  # the layers around the outlier tensor, nothing else
    assert all(layer.reason.endswith("for the fidelity target") for layer in report.layers if layer.status != "int8")
    ranked = sorted((layer for layer in report.layers), key=lambda layer: layer.sensitivity_sqnr_db)
    assert ranked[0].name in kept and ranked[-1].name == "fc"  # fc alone barely matters
    assert ranked[0].sensitivity_sqnr_db < ranked[-1].sensitivity_sqnr_db


def test_exclude_by_name_keeps_the_layer_float():
    model = conv_net()
    simplified = onnxslim.optimize(model, verify=False)
    _, report = quantize_model(simplified, samples(model), QuantizeOptions(mode="weights", exclude=("fc",)))
    statuses = {layer.name: (layer.status, layer.reason) for layer in report.layers}
    assert statuses["fc"] == ("float", "excluded (--exclude)") and statuses["conv1"][0] == "int8"


def test_bias_correction_removes_the_mean_shift_of_rounding():
    model = conv_net()
    simplified = onnxslim.optimize(model, verify=False)
    data = samples(model, count=20)
    _, corrected = quantize_model(simplified, data, QuantizeOptions(mode="weights", weight_form="dequantize"))
    _, plain = quantize_model(simplified, data, QuantizeOptions(mode="weights", weight_form="dequantize", bias_correction=False))
    assert corrected.fidelity["sqnr_db"] > plain.fidelity["sqnr_db"]


# ----------------------------------------------------------------------------- the API and the command line


def test_optimize_api_verifies_the_quantized_model_in_lossy_mode():
    model = conv_net()
    quantized, report = onnxslim.optimize(
        model, quantize=QuantizeOptions(mode="weights"), calibration=samples(model),
        return_report=True,
    )
    assert report.lossless_verification.passed and report.lossless_verification.mode == "lossless"
    assert report.verification.passed and report.verification.mode == "lossy"
    assert report.verification.budget["min_cosine"] == 0.95
    assert report.after.file_bytes < report.before.file_bytes
    data = report.to_dict()
    assert data["quantization"]["mode"] == "weights" and len(data["quantization"]["layers"]) == 3


def test_optimize_api_rejects_other_kinds():
    with pytest.raises(UsageError, match="only int8"):
        onnxslim.optimize(conv_net(), quantize="int4")


def write_samples(folder, model, count=6):
    folder.mkdir()
    for index, feed in enumerate(samples(model, count)):
        np.savez(folder / f"{index:02d}.npz", **feed)
    return folder


def run(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], prog_name="onnxslim")


def test_cli_quantizes_with_npz_calibration_and_writes_the_report(tmp_path):
    model = conv_net()
    onnx.save(model, tmp_path / "net.onnx")
    calibration = write_samples(tmp_path / "calibration", model)
    result = run("optimize", tmp_path / "net.onnx", tmp_path / "net.int8.onnx", "--quantize", "int8",
                 "--calibration", calibration, "--quantize-mode", "weights", "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    assert "quantization: int8 (weights)" in result.output and "verified" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantization"]["calibration_samples"] == 6 and report["quantization"]["evaluation_samples"] == 6
    assert report["verification"]["mode"] == "lossy"
    assert (tmp_path / "net.int8.onnx").stat().st_size < (tmp_path / "net.onnx").stat().st_size / 2


def test_cli_budget_miss_exits_1_and_writes_nothing(tmp_path):
    model = conv_net()
    onnx.save(model, tmp_path / "net.onnx")
    calibration = write_samples(tmp_path / "calibration", model)
    result = run("optimize", tmp_path / "net.onnx", tmp_path / "out.onnx", "--quantize", "int8", "--calibration", calibration,
                 "--quantize-mode", "weights", "--min-sqnr", "200")
    assert result.exit_code == 1
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calibration", "calib"], "--calibration applies to quantization"),
        (["--quantize", "int8", "--calibration", "missing-folder"], "calibration data not found"),
        (["--quantize", "int8", "--fidelity-target", "loud"], "fidelity-target"),
        (["--quantize", "int8", "--weight-form", "dequantize"], "--weight-form applies to --quantize-mode weights"),
    ],
)
def test_cli_quantization_usage_errors_are_one_line(tmp_path, extra, message):
    onnx.save(conv_net(), tmp_path / "net.onnx")
    before = (tmp_path / "net.onnx").read_bytes()
    result = run("optimize", tmp_path / "net.onnx", tmp_path / "out.onnx", *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert (tmp_path / "net.onnx").read_bytes() == before


def test_auto_does_not_search_layers_to_rescue_a_hopeless_full_model():
    model = conv_net(outlier=1000.0)  # one activation scale for all channels: full int8 is noise
    simplified = onnxslim.optimize(model, verify=False)
    _, report = quantize_model(simplified, samples(model), QuantizeOptions(bias_correction=False), cpu=cpu_int8_support(EPYC))
    assert report.mode == "weights" and report.fidelity["cosine"] > 0.99
    assert any("far from the floor" in note for note in report.notes)
    assert all(layer.sensitivity_sqnr_db is None for layer in report.layers)  # no layer-by-layer search ran


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
@pytest.mark.parametrize(
    "limits", [(0.0, 0.0), (0.5, 0.5), (-2.0, -2.0), (1e-42, 1e-41), (-1e-39, 1e-39), (-3.4e38, 3.4e38), (0.0, 3.4e38)]
)
def test_activation_scales_are_normal_finite_numbers_for_any_range(limits, activation_type, symmetric):
    """A zero-width range (a constant activation), one of denormal numbers and one at float32's
    ends: the scale is a normal float32 (never 0, denormal, inf or NaN) and every level dequantizes
    to a finite number."""
    from onnxslim.passes.quantize_qdq import _usable, activation_parameters

    assert _usable(limits)
    scale, zero_point = activation_parameters(limits, activation_type, symmetric)
    assert np.isfinite(scale) and scale >= np.finfo(np.float32).tiny
    info = np.iinfo(zero_point.dtype)
    levels = np.arange(info.min, info.max + 1, dtype=np.float32)
    assert np.isfinite((levels - np.float32(zero_point)) * scale).all()
    if 0 < abs(limits[1]) < 1e30 and limits[1] > 1e-30:  # an ordinary range is still held
        assert (info.max - float(zero_point)) * float(scale) >= limits[1] * (1 - 1e-6)


def test_ranges_that_are_not_numbers_leave_the_tensor_float():
    from onnxslim.passes.quantize_qdq import _usable

    for limits in [(math.nan, 1.0), (0.0, math.inf), (2.0, 1.0), None]:
        assert not _usable(limits)
