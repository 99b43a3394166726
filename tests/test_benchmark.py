"""`onnxslim bench`: MACs and parameters from shapes, fidelity against the first model, the files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from builder import ModelBuilder, random
from onnxslim.benchmark import (
    SQNR_CAP_DB,
    BenchOptions,
    benchmark,
    count_macs,
    count_parameters,
    find_energy_meter,
    looks_like_class_scores,
)
from onnxslim.cli import cli
from onnxslim.errors import InputSpecError

FAST = {"runs": 3, "warmup": 1, "measure_memory": False}


def classifier(weight: np.ndarray) -> onnx.ModelProto:
    """scores [4, 5] = x [4, 8] @ weight: class scores, so top-1 agreement applies."""
    b = ModelBuilder()
    x = b.input("x", [4, 8])
    b.output(b.node("Gemm", [x, b.initializer("w", weight)]))
    return b.build()


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


# ----------------------------------------------------------------------------- MACs and parameters


def test_conv_macs_follow_stride_pads_and_groups():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 9, 9])
    w = b.initializer("w", np.ones([8, 2, 3, 3], np.float32))
    b.output(b.node("Conv", [x, w], group=2, strides=[2, 2], pads=[1, 1, 1, 1]))
    count = count_macs(b.build(), {"x": [1, 4, 9, 9]})
    # output [1, 8, 5, 5] ((9 + 2 - 3) / 2 + 1 = 5); each element sums 4/2 channels x 3x3
    assert (count.macs, count.layers, count.unknown_layers) == (8 * 5 * 5 * 2 * 3 * 3, 1, 0)


def test_conv_transpose_macs_scatter_every_input_element():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 5, 5])
    w = b.initializer("w", np.ones([4, 3, 3, 3], np.float32))
    b.output(b.node("ConvTranspose", [x, w], strides=[2, 2]))
    assert count_macs(b.build(), {"x": [1, 4, 5, 5]}).macs == 4 * 5 * 5 * 3 * 3 * 3


def test_gemm_and_matmul_macs():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    h = b.node("Gemm", [x, b.initializer("b", np.ones([4, 3], np.float32))], transB=1)  # [2, 3] x [3, 4]
    y = b.node("MatMul", [b.node("Reshape", [h, b.initializer("s", np.array([2, 1, 4]))]),
                          b.initializer("m", np.ones([4, 6], np.float32))])  # [2, 1, 4] x [4, 6]
    b.output(y)
    count = count_macs(b.build(), {"x": [2, 3]})
    assert (count.macs, count.layers, count.unknown_layers) == (2 * 3 * 4 + 2 * 1 * 6 * 4, 2, 0)


def test_integer_layers_count_like_their_float_forms():
    b = ModelBuilder()
    x = b.input("x", [1, 4, 6, 6], dtype=np.uint8)
    scale, zero = b.initializer("scale", np.float32(0.1)), b.initializer("zero", np.uint8(128))
    w = b.initializer("w", np.ones([8, 4, 3, 3], np.int8))
    w_zero = b.initializer("w_zero", np.int8(0))
    y = b.node("QLinearConv", [x, scale, zero, w, scale, w_zero, scale, zero])  # [1, 8, 4, 4]
    flat = b.node("Reshape", [y, b.initializer("s", np.array([1, 128]))])
    b.output(b.node("MatMulInteger", [flat, b.initializer("m", np.ones([128, 3], np.uint8))]))
    count = count_macs(b.build(), {"x": [1, 4, 6, 6]})
    assert (count.macs, count.unknown_layers) == (8 * 4 * 4 * 4 * 3 * 3 + 128 * 3, 0)


def test_a_layer_of_unknown_shape_is_counted_as_unknown():
    b = ModelBuilder()
    x = b.input("x", ["n", 3])
    b.output(b.node("MatMul", [x, b.initializer("m", np.ones([3, 2], np.float32))]))
    count = count_macs(b.build(), {})  # the dynamic dim is left dynamic
    assert (count.macs, count.layers, count.unknown_layers) == (0, 1, 1)


def test_parameters_count_initializers_constants_and_bodies():
    b = ModelBuilder()
    flag = b.input("flag", [], dtype=np.bool_)
    x = b.input("x", [5])
    then_branch, else_branch = b.branch(), b.branch()
    for body, value in ((then_branch, 1.0), (else_branch, 2.0)):
        body.output(body.constant(np.full([5], value, np.float32)), np.float32, [5])
    chosen = b.if_node(flag, then_branch, else_branch)
    scaled = b.node("Mul", [b.node("Add", [x, chosen]), b.constant(np.ones([5], np.float32))])
    b.output(b.node("Add", [scaled, b.initializer("w", np.ones([5], np.float32))]))
    assert count_parameters(b.build()) == 5 + 5 + 5 + 5  # w, the Constant, one Constant per branch


# ----------------------------------------------------------------------------- fidelity


def test_the_same_model_twice_is_identical(tmp_path):
    path = save(classifier(random([8, 5])), tmp_path / "model.onnx")
    report = benchmark([path, path], BenchOptions(**FAST))
    (output,) = report.models[1].fidelity
    assert output.cosine == pytest.approx(1.0)
    assert output.sqnr_db == SQNR_CAP_DB
    assert output.top1 == 1.0
    assert report.random_inputs and "RANDOM" in report.input_source


def test_a_perturbed_copy_loses_fidelity_and_top1_is_measured(tmp_path):
    weight = random([8, 5])
    original = save(classifier(weight), tmp_path / "original.onnx")
    perturbed = save(classifier(weight + 0.3 * random([8, 5], seed=1)), tmp_path / "perturbed.onnx")
    report = benchmark([original, perturbed], BenchOptions(samples=4, **FAST))
    worst = report.models[1].worst_fidelity()
    assert worst.cosine < 1.0
    assert worst.sqnr_db < 40
    assert worst.top1 is not None and 0.0 <= worst.top1 <= 1.0
    assert report.samples == 4
    assert report.models[0].fidelity == []  # the reference is not compared with itself


def test_inputs_come_from_a_folder_of_npz_samples(tmp_path):
    path = save(classifier(random([8, 5])), tmp_path / "model.onnx")
    (tmp_path / "data").mkdir()
    for index in range(3):
        np.savez(tmp_path / "data" / f"{index}.npz", x=random([4, 8], seed=index))
    report = benchmark([path, path], BenchOptions(data=tmp_path / "data", samples=2, **FAST))
    assert not report.random_inputs
    assert report.samples == 2 and ".npz files" in report.input_source


def test_class_scores_are_told_from_feature_maps():
    assert looks_like_class_scores(np.zeros([1, 1000], np.float32))
    assert looks_like_class_scores(np.zeros([1, 1, 10], np.float32))
    assert not looks_like_class_scores(np.zeros([1, 16, 8, 8], np.float32))
    assert not looks_like_class_scores(np.zeros([4, 1], np.float32))
    assert not looks_like_class_scores(np.zeros([4, 5], np.int64))


def test_a_dynamic_dim_without_a_shape_is_one_clear_error(tmp_path):
    b = ModelBuilder()
    b.output(b.node("Relu", [b.input("x", [1, "n"])]))
    path = save(b.build(), tmp_path / "dynamic.onnx")
    with pytest.raises(InputSpecError, match="--input-shape x:1,N"):
        benchmark([path], BenchOptions(**FAST))
    report = benchmark([path], BenchOptions(input_shapes={"x": [1, 7]}, **FAST))
    assert report.input_shapes == {"x": [1, 7]}


# ----------------------------------------------------------------------------- energy


def test_energy_counters_are_package_zones_and_wrap(tmp_path):
    powercap = tmp_path / "powercap"
    for zone, name, value in (
        ("intel-rapl:0", "package-0", "900"),
        ("intel-rapl:0:0", "core", "5"),  # part of the package: not added again
        ("intel-rapl-mmio:0", "package-0", "7"),  # the same package through MMIO
    ):
        (powercap / zone).mkdir(parents=True)
        (powercap / zone / "name").write_text(name + "\n")
        (powercap / zone / "energy_uj").write_text(value + "\n")
        (powercap / zone / "max_energy_range_uj").write_text("999\n")
    meter, problem = find_energy_meter(powercap, tmp_path / "hwmon")
    assert problem == "" and [path.parent.name for path in meter.paths] == ["intel-rapl:0"]
    assert meter.joules([900], [100]) == pytest.approx(200e-6)  # 900 -> 999 -> 0 -> 100: 200 µJ
    meter.close()
    assert find_energy_meter(tmp_path / "none", tmp_path / "none") == (None, "no readable RAPL counter")


# ----------------------------------------------------------------------------- the command line


def test_cli_prints_the_table_and_writes_json_and_markdown(tmp_path):
    weight = random([8, 5])
    original = save(classifier(weight), tmp_path / "original.onnx")
    smaller = save(classifier(weight + 0.01 * random([8, 5], seed=2)), tmp_path / "other.onnx")
    before = original.read_bytes(), smaller.read_bytes()
    result = CliRunner().invoke(cli, [
        "bench", str(original), str(smaller), "--runs", "3", "--warmup", "1", "--samples", "2",
        "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md"),
    ])
    assert result.exit_code == 0, result.output
    for label in ("file size", "parameters", "MACs", "latency 1 thread, median", "peak memory", "energy / run", "SQNR dB"):
        assert label in result.output
    assert "random inputs" in result.output and "Conv, ConvTranspose, Gemm, MatMul" in result.output
    assert (original.read_bytes(), smaller.read_bytes()) == before  # the models are only read

    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"reference", "models", "mac_ops", "machine", "input_shapes", "random_inputs", "runs", "warmup"} <= set(data)
    model = data["models"][1]
    assert {"path", "file_bytes", "parameters", "macs", "latency_one_thread", "latency_all_threads",
            "peak_memory_bytes", "energy_joules_per_run", "fidelity", "worst_fidelity", "ratios"} <= set(model)
    assert model["macs"]["macs"] == 4 * 8 * 5 and model["latency_one_thread"]["runs"] == 3
    energy = model["energy_joules_per_run"]
    assert (energy is None and data["energy_problem"]) or energy >= 0  # n/a with a reason, or a measurement
    assert model["peak_memory_bytes"] is None or model["peak_memory_bytes"] > 0

    markdown = (tmp_path / "bench.md").read_text()
    assert markdown.startswith("|  | original.onnx | other.onnx |\n|---|---:|---:|")
    assert "| file size |" in markdown and "onnxruntime" in markdown and "logical cores" in markdown


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error:")
    return lines[0]


def test_cli_missing_model_is_one_line(tmp_path):
    path = save(classifier(random([8, 5])), tmp_path / "model.onnx")
    line = one_line_error(CliRunner().invoke(cli, ["bench", str(path), str(tmp_path / "missing.onnx")]))
    assert "no such file" in line


def test_cli_not_a_model_is_one_line(tmp_path):
    (tmp_path / "notes.onnx").write_text("not a model")
    line = one_line_error(CliRunner().invoke(cli, ["bench", str(tmp_path / "notes.onnx")]))
    assert "not an ONNX model" in line


def test_cli_models_with_other_inputs_are_one_line(tmp_path):
    b = ModelBuilder()
    b.output(b.node("Relu", [b.input("image", [4, 8])]))
    first = save(classifier(random([8, 5])), tmp_path / "first.onnx")
    other = save(b.build(), tmp_path / "other.onnx")
    line = one_line_error(CliRunner().invoke(cli, ["bench", str(first), str(other)]))
    assert "different inputs" in line and "image" in line


def test_cli_unwritable_report_path_fails_before_measuring(tmp_path):
    path = save(classifier(random([8, 5])), tmp_path / "model.onnx")
    line = one_line_error(CliRunner().invoke(cli, ["bench", str(path), "--markdown", str(tmp_path / "no" / "b.md")]))
    assert "--markdown" in line
    line = one_line_error(CliRunner().invoke(cli, ["bench", str(path), "--json", str(path)]))
    assert "is the input model" in line
