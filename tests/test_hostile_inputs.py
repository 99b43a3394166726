"""Hostile and careless inputs (issue 17): every case that once broke onnxslim's promise.

The promise: exit 0 only for a correct model, 1 only for "verification failed", 2 for bad input
(one line, no traceback), 3 for our bug, 130 when interrupted; the input file and every file it
reads are byte-identical afterwards. Each section below is one class of hostile input.
"""

from __future__ import annotations

import hashlib
import math
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import ModelBuilder
from click.testing import CliRunner

from onnxslim.cli import cli
from onnxslim.verify import FidelityBudget, FidelityPool, Verifier


def _run_cli(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], prog_name="onnxslim")


def _digests(*paths: Path) -> dict[Path, str]:
    """sha256 of every file under the given paths (a folder: all its files)."""
    files = [file for path in paths for file in ([path] if path.is_file() else sorted(path.iterdir()))]
    return {file: hashlib.sha256(file.read_bytes()).hexdigest() for file in files}
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from onnxslim.cli import cli
import numpy as np
import onnx
import pytest

import onnxslim
from builder import ModelBuilder, assert_equivalent


# ----------------------------------------------------------------------------- calibration data: NaN, Inf, huge and zero-width ranges


def _calibration_net() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv -> Relu -> pool -> Gemm: every quantizer and every
    pruning criterion (bn reads the γ) has something to work on."""
    rng = np.random.default_rng(1700)

    def weight(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.node("Conv", [x, b.initializer("wa", weight(8, 3, 3, 3)), b.initializer("ba", weight(8))], pads=[1] * 4, name="a")
    normalized = b.node("BatchNormalization", [a, b.initializer("g", np.abs(weight(8)) + 0.1), b.initializer("beta", weight(8)),
                                               b.initializer("mu", weight(8)), b.initializer("var", np.abs(weight(8)) + 0.5)],
                        name="bn")
    h = b.node("Relu", [b.node("Conv", [b.node("Relu", [normalized]), b.initializer("wb", weight(8, 8, 3, 3)),
                                        b.initializer("bb", weight(8))], pads=[1] * 4, name="b")])
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    b.output(b.node("Gemm", [pooled, b.initializer("fc", weight(4, 8)), b.initializer("fcb", weight(4))], ["y"], name="fc",
                    transB=1))
    return b.build()


def _hostile_sample(kind: str, index: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    normal = rng.standard_normal([1, 3, 8, 8]).astype(np.float32)
    if kind == "one-inf":  # one infinity in the first sample only
        if index == 0:
            normal[0, 1, 2, 3] = np.inf
        return normal
    if kind == "all-nan":
        return np.full([1, 3, 8, 8], np.nan, np.float32)
    if kind == "huge":  # finite, but the model's sums overflow float32
        normal[0, :, 2, 3] = 3e38
        return normal
    if kind == "constant":  # a constant input: constant activations
        return np.full([1, 3, 8, 8], 0.5, np.float32)
    if kind == "denormal":
        return (normal * 1e-40).astype(np.float32)
    assert kind == "zeros"
    return np.zeros([1, 3, 8, 8], np.float32)

import json as _json
from pathlib import Path as _Path

import numpy as _np
import onnx as _onnx
import onnx_graphsurgeon as _gs
import onnxruntime as _ort
import pytest as _pytest
from click.testing import CliRunner as _CliRunner
from onnx import TensorProto as _T, helper as _helper, numpy_helper as _numpy_helper

import onnxslim as _onnxslim
from onnxslim.cli import cli as _cli
def _usage_model(width: int = 4) -> onnx.ModelProto:
    """y = x @ w (a width x width weight), then an Identity the default pipeline removes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])
    weight = numpy_helper.from_array(np.arange(width * width, dtype=np.float32).reshape(width, width) / width**2, "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Identity", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "small", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(arg) for arg in args], prog_name="onnxslim")


def _assert_usage_error(result, exit_code: int = 2) -> str:
    """The exit code, one 'onnxslim: error:' line (and at most click's hint after it), no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert lines[0].startswith("onnxslim: error: "), result.stderr
    if len(lines) == 2:
        assert lines[1].startswith("Try 'onnxslim ") and lines[1].endswith(" --help'."), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under `folder` (recursively) with its bytes and modification time."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()
    }


@pytest.fixture
def usage_folder(tmp_path, monkeypatch):
    """The cwd: model.onnx, ext.onnx reading its weight from weights.bin, a folder, a FIFO, and
    corrupt --inputs archives."""
    monkeypatch.chdir(tmp_path)
    onnx.save(_usage_model(), tmp_path / "model.onnx")
    onnx.save(_usage_model(), tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    (tmp_path / "a_folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    np.savez(tmp_path / "good.npz", x=np.ones([1, 4], np.float32))
    good = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "zip_garbage.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}, None], dtype=object))
    np.save(tmp_path / "one_array.npy", np.ones([1, 4], np.float32))
    return tmp_path


NESTED_500 = "fixpoint(" * 500 + "eliminate-dead-nodes" + ")" * 500
COMMAND_LINES = {
    "optimize": ["optimize", "model.onnx", "out.onnx"],
    "verify": ["verify", "model.onnx", "model.onnx"],
    "inspect": ["inspect", "model.onnx"],
    "prune-plan": ["prune-plan", "model.onnx"],
    "bench": ["bench", "model.onnx", "--runs", "1", "--warmup", "0"],
    "passes": ["passes"],
}
VERIFYING = ("optimize", "verify")
BAD_OPTIONS = (
    [(command, ["--bogus"]) for command in COMMAND_LINES]
    + [(command, options) for command in (*VERIFYING, "bench") for options in (
        ["--seed", "-1"], ["--samples", "0"], ["--json", "model.onnx"], ["--json", "/dev/null"], ["--json", "fifo"],
        ["--json", "a_folder"], ["--json", "no_folder/report.json"], ["--json", "x" * 300 + ".json"],
    )]
    + [(command, options) for command in VERIFYING for options in (
        ["--tolerance", "nan"], ["--tolerance", "inf"], ["--tolerance", "-1"], ["--min-cosine", "nan"],
        ["--min-cosine", "2"], ["--min-sqnr", "nan"], ["--min-sqnr", "inf"], ["--min-sqnr", "-inf"],
        ["--min-top1", "nan"], ["--min-top1", "1.5"], ["--inputs", "a_folder"], ["--inputs", "fifo"],
        ["--inputs", "/dev/zero"], ["--inputs", "truncated.npz"], ["--inputs", "zip_garbage.npz"],
        ["--inputs", "empty.npz"], ["--inputs", "pickled.npz"], ["--inputs", "one_array.npy"],
        ["--inputs", "missing.npz"], ["--verify-shape", "x:1,four"],
    )]
    + [("optimize", options) for options in (
        ["--json", "out.onnx"], ["--json", "out.onnx.data", "--external-data"],
        ["--prune", "nan"], ["--prune", "inf"], ["--prune", "1"], ["--prune-macs", "nan"], ["--prune-params", "inf"],
        ["--prune", "0.25", "--fidelity-target", "nan"], ["--prune", "0.25", "--fidelity-target", "cosine=inf"],
        ["--quantize", "int8", "--calibration", "random", "--fidelity-target", "nan"],
        ["--quantize", "int8", "--calibration", "random", "--fidelity-target", "sqnr=-inf"],
        ["--fold-size-cap", "abc"], ["--fold-size-cap", "-2"], ["--pass-limit", "-1"],
        ["--dump-dir", "model.onnx"], ["--dump-dir", "fifo"],
        ["--prune", "0.25", "--plot", "out.onnx"], ["--prune", "0.25", "--plot", "model.onnx"],
        ["--prune", "0.25", "--plot", "plot.png", "--json", "plot.png"], ["--prune", "0.25", "--plot", "fifo"],
        ["--passes", NESTED_500], ["--pipeline", NESTED_500],
        ["--passes", "fold-constants{size_cap=abc}"], ["--passes", "fold-constants{size_cap=nan}"],
        ["--pipeline", "eliminate-dead-nodes,fixpoint(fold-constants{size_cap=true})"],
    )]
    + [("optimize", [*lossy, "--calibration", data]) for lossy in (["--quantize", "int8"], ["--prune", "0.25"])
       for data in ("fifo", "/dev/zero", "zip_garbage.npz", "truncated.npz", "missing.npz", "x" * 300 + ".npz")]
    + [("bench", options) for options in (["--runs", "0"], ["--markdown", "model.onnx"], ["--markdown", "/dev/null"],
                                          ["--inputs", "fifo"], ["--inputs", "/dev/zero"], ["--calibration", "fifo"],
                                          ["--inputs", "zip_garbage.npz"], ["--inputs", "truncated.npz"])]
    + [("prune-plan", ["--ratio", value]) for value in ("nan", "inf", "-inf", "1", "-0.5")]
)


@pytest.mark.parametrize(("command", "options"), BAD_OPTIONS,
                         ids=[f"{command} {' '.join(options)[:60]}" for command, options in BAD_OPTIONS])
def test_every_command_refuses_a_bad_option_in_one_line_before_any_work(usage_folder, command, options):
    before = _files(usage_folder)
    _assert_usage_error(_invoke(*COMMAND_LINES[command], *options))
    assert _files(usage_folder) == before  # nothing written, the input and its external data untouched
    assert sorted(os.listdir(usage_folder)) == sorted(["a_folder", "fifo", *before])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", ["--min-cosine", "--min-sqnr", "--min-top1", "--tolerance"])
def test_a_non_finite_threshold_never_lets_two_different_models_match(usage_folder, option, value):
    onnx.save(_usage_model(), usage_folder / "other.onnx")
    other = onnx.load(usage_folder / "other.onnx")
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full([4, 4], 9.0, np.float32), "w"))
    onnx.save(other, usage_folder / "other.onnx")
    message = _assert_usage_error(_invoke("verify", "model.onnx", "other.onnx", option, value))
    assert option in message


@pytest.mark.parametrize("budget", [dict(min_cosine=math.nan), dict(min_sqnr_db=math.nan), dict(min_sqnr_db=math.inf),
                                    dict(min_top1=math.nan), dict(min_cosine=1.5), dict(min_top1=-0.1)])
def test_a_fidelity_budget_refuses_non_finite_and_out_of_range_thresholds(budget):
    with pytest.raises(onnxslim.UsageError):
        onnxslim.FidelityBudget(**budget)


def test_the_python_api_refuses_non_finite_tolerances_targets_and_negative_seeds(tmp_path):
    from onnxslim.quantize import FidelityTarget

    model = _usage_model()
    for options in (dict(tolerance=math.nan), dict(tolerance=math.inf), dict(tolerance=-1.0), dict(seed=-1),
                    dict(samples=0)):
        with pytest.raises(onnxslim.UsageError):
            onnxslim.verify(model, model, **options)
        with pytest.raises(onnxslim.UsageError):
            onnxslim.optimize(model, **options)
    for metric, value in (("cosine", math.nan), ("sqnr_db", math.nan), ("sqnr_db", math.inf), ("cosine", 2.0)):
        with pytest.raises(onnxslim.InputSpecError):
            FidelityTarget(metric, value)
    for text in ("nan", "nandB", "sqnr=inf", "cosine=nan", "-infdB"):
        with pytest.raises(onnxslim.InputSpecError):
            FidelityTarget.parse(text)


def test_pass_options_are_checked_against_their_declared_types_before_any_pass_runs():
    # fold-constants reads size_cap only when something folds: a model where nothing does
    # accepted 'abc' silently.
    for text in ("fold-constants{size_cap=abc}", "fold-constants{size_cap=1.5}", "fold-constants{size_cap=true}",
                 "quantize-int8{per_channel=3}"):
        with pytest.raises(onnxslim.PipelineError, match="takes"):
            onnxslim.Pipeline.parse(text).validate()
        with pytest.raises(onnxslim.PipelineError):
            onnxslim.optimize(_usage_model(), passes=text, verify=False)
    assert onnxslim.Pipeline.parse("fold-constants{size_cap=1e3}").steps[0].options == (("size_cap", 1000.0),)
    onnxslim.Pipeline.parse("fold-constants{size_cap=1e3}").validate()  # a whole number written as a float


def test_a_pipeline_nested_500_deep_is_a_pipeline_error_not_a_recursion_error():
    with pytest.raises(onnxslim.PipelineError, match="nested"):
        onnxslim.Pipeline.parse(NESTED_500)
    nested_32 = "fixpoint(" * 32 + "eliminate-dead-nodes" + ")" * 32
    assert str(onnxslim.Pipeline.parse(nested_32)) == nested_32


@pytest.mark.parametrize("name", ["truncated.npz", "zip_garbage.npz", "empty.npz", "pickled.npz", "one_array.npy"])
def test_a_corrupt_inputs_archive_is_an_input_error(usage_folder, name):
    with pytest.raises(onnxslim.InputSpecError, match=name):
        onnxslim.verify("model.onnx", "model.onnx", inputs=usage_folder / name)


def test_click_usage_errors_are_one_line_and_a_hint():
    result = _invoke("optimize", "model.onnx", "out.onnx", "--no-such-option")
    line = _assert_usage_error(result)
    assert "--no-such-option" in line
    assert result.stderr.splitlines()[1] == "Try 'onnxslim optimize --help'."
    assert "Usage:" not in result.output


def test_a_fifo_or_device_model_is_not_a_regular_file_and_is_not_read(tmp_path):
    """Opening a FIFO blocks until someone writes to it; /dev/zero never ends. The run is a
    subprocess, so a read that blocks fails the test by its timeout instead of hanging it (the
    sweep above runs every command on a FIFO in-process)."""
    os.mkfifo(tmp_path / "model.onnx")
    for model in (tmp_path / "model.onnx", Path("/dev/zero")):
        finished = subprocess.run([sys.executable, "-m", "onnxslim.cli", "inspect", str(model)],
                                  capture_output=True, text=True, timeout=60)
        assert finished.returncode == 2, finished.stderr
        assert finished.stderr.splitlines() == [f"onnxslim: error: {model} is not a regular file (a device, FIFO or "
                                                "socket), not an ONNX model file"]


def test_sigint_exits_130_with_one_line(tmp_path):
    """Ctrl-C in the middle of a pass: exit 130 and 'interrupted', no traceback."""
    onnx.save(_usage_model(), tmp_path / "model.onnx")
    started = tmp_path / "started"
    script = (
        "import sys, time, onnxslim\n"
        "from onnxslim.cli import main\n"
        "@onnxslim.register_pass('test-wait-for-ctrl-c')\n"
        "def wait(graph, ctx):\n"
        f"    open({str(started)!r}, 'w').close()\n"
        "    time.sleep(60)\n"
        "    return onnxslim.PassResult()\n"
        "sys.argv = ['onnxslim', 'optimize', 'model.onnx', 'out.onnx', '--passes', 'test-wait-for-ctrl-c']\n"
        "main()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), process.communicate(timeout=10)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line] == ["onnxslim: error: interrupted"]
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("args", [["inspect", "model.onnx"], ["inspect", "--json", "model.onnx"]])
def test_a_closed_stdout_ends_the_command_quietly(tmp_path, args):
    """`onnxslim inspect m.onnx | head -1`: the reader closed the pipe; exit 0, nothing on stderr."""
    onnx.save(_usage_model(), tmp_path / "model.onnx")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        finished = subprocess.run([sys.executable, "-m", "onnxslim.cli", *args], cwd=tmp_path, stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (finished.returncode, finished.stderr) == (0, "")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["inspect", "model.onnx"], ["inspect", "--json", "model.onnx"]])
def test_a_full_disk_under_stdout_is_one_line(tmp_path, args):
    onnx.save(_usage_model(), tmp_path / "model.onnx")
    with open("/dev/full", "w") as full:
        finished = subprocess.run([sys.executable, "-m", "onnxslim.cli", *args], cwd=tmp_path, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.splitlines() == ["onnxslim: error: cannot write the output: No space left on device"]


# ----------------------------------------------------------------------------- the model's interface: overridable inputs, dynamic dims, types


def _model(nodes, inputs, outputs, initializers=(), value_info=(), opset=17, ir_version=8, domains=()):
    graph = _helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    model = _helper.make_model(graph, opset_imports=[_helper.make_opsetid("", opset), *domains])
    model.ir_version = ir_version
    return model


def _optimize_cli(tmp_path, model, *options):
    """Save `model`, run `onnxslim optimize` on it; returns (result, output path), and checks the
    input file is byte-identical afterwards."""
    source, destination = tmp_path / "model.onnx", tmp_path / "out.onnx"
    _onnx.save(model, source)
    before = source.read_bytes()
    result = _CliRunner().invoke(_cli, ["optimize", str(source), str(destination), *map(str, options)], prog_name="onnxslim")
    assert source.read_bytes() == before
    return result, destination


def _one_line_error(result, exit_code=2) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), result.stderr
    return lines[0]


def _session(model):
    options = _ort.SessionOptions()
    options.log_severity_level = 3
    # onnxruntime's own optimizer trusts declared output shapes (it folds Shape of an output declared [1,4])
    options.graph_optimization_level = _ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return _ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _overridable_model():
    """y = x * s + b, with s and b inputs that have equal defaults (ones): constants to every pass
    that forgot they are inputs (fold, CSE, dedup), and a caller may feed them."""
    ones = _np.ones(4, _np.float32)
    return _model(
        [_helper.make_node("Mul", ["x", "s"], ["m"]), _helper.make_node("Add", ["m", "b"], ["y"])],
        [_helper.make_tensor_value_info(name, _T.FLOAT, [4]) for name in ("x", "s", "b")],
        [_helper.make_tensor_value_info("y", _T.FLOAT, [4])],
        [_numpy_helper.from_array(ones, "s"), _numpy_helper.from_array(ones.copy(), "b")],
    )


def test_an_input_that_is_also_an_initializer_stays_an_input(tmp_path):
    result, destination = _optimize_cli(tmp_path, _overridable_model())
    assert result.exit_code == 0, result.output
    optimized = _onnx.load(destination)
    assert [value.name for value in optimized.graph.input] == ["x", "s", "b"]
    assert {tensor.name for tensor in optimized.graph.initializer} == {"s", "b"}  # the defaults, both kept
    x = _np.arange(4, dtype=_np.float32)
    session = _session(optimized)
    assert _np.array_equal(session.run(None, {"x": x})[0], x + 1)  # the defaults
    s, b = _np.full(4, 3, _np.float32), _np.full(4, -2, _np.float32)
    assert _np.array_equal(session.run(None, {"x": x, "s": s, "b": b})[0], x * 3 - 2)  # overridden


def test_an_ir3_initializer_listed_as_input_is_still_a_constant():
    """IR 3 lists every initializer as an input; those are weights, and fold as before."""
    model = _overridable_model()
    model.ir_version = 3
    optimized = _onnxslim.optimize(model)
    assert [tensor.name for tensor in optimized.graph.initializer] == ["s"]  # equal weights shared


def test_the_inputs_given_by_an_npz_may_override_a_default(tmp_path):
    x = _np.arange(4, dtype=_np.float32)
    _np.savez(tmp_path / "inputs.npz", x=x, b=_np.full(4, 5, _np.float32))
    result, _ = _optimize_cli(tmp_path, _overridable_model(), "--inputs", tmp_path / "inputs.npz")
    assert result.exit_code == 0, result.output


def _baked_batch_model():
    """x:[N,4] -> Relu -> t, declared (wrongly) [1,4]; outputs Shape(t) and Neg(t)."""
    return _model(
        [_helper.make_node("Relu", ["x"], ["t"]), _helper.make_node("Shape", ["t"], ["s"]),
         _helper.make_node("Neg", ["t"], ["n"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, ["N", 4])],
        [_helper.make_tensor_value_info("s", _T.INT64, [2]), _helper.make_tensor_value_info("n", _T.FLOAT, ["N", 4])],
        value_info=[_helper.make_tensor_value_info("t", _T.FLOAT, [1, 4])],
    )


def test_a_wrong_value_info_does_not_bake_a_dynamic_dim_in(tmp_path):
    result, destination = _optimize_cli(tmp_path, _baked_batch_model())
    assert result.exit_code == 0, result.output
    shape, negated = _session(_onnx.load(destination)).run(None, {"x": _np.ones((2, 4), _np.float32)})
    assert shape.tolist() == [2, 4] and negated.shape == (2, 4)


def test_a_wrong_output_declaration_is_kept_but_not_trusted():
    model = _baked_batch_model()
    model.graph.output[1].CopyFrom(_helper.make_tensor_value_info("n", _T.FLOAT, [1, 4]))
    model.graph.output.append(_helper.make_tensor_value_info("t", _T.FLOAT, [1, 4]))
    model.graph.node.append(_helper.make_node("Shape", ["n"], ["s2"]))
    model.graph.output.append(_helper.make_tensor_value_info("s2", _T.INT64, [2]))
    optimized = _onnxslim.optimize(model)
    assert optimized.graph.output[1] == model.graph.output[1]  # the interface is as declared
    outputs = _session(optimized).run(None, {"x": _np.ones((3, 4), _np.float32)})
    assert outputs[0].tolist() == [3, 4] and outputs[3].tolist() == [3, 4]


def test_verification_runs_dynamic_dims_at_a_second_size():
    """A candidate with the batch baked in passes at batch 1 and fails at the second size."""
    model = _baked_batch_model()
    baked = _model(
        [_helper.make_node("Constant", [], ["s"], value=_numpy_helper.from_array(_np.array([1, 4], _np.int64))),
         _helper.make_node("Neg", ["x"], ["n0"]), _helper.make_node("Relu", ["n0"], ["r"]),
         _helper.make_node("Neg", ["r"], ["n"])],
        list(model.graph.input), list(model.graph.output),
    )
    report = _onnxslim.verify(model, baked)
    assert not report.passed and report.samples == 2
    assert any("second size: 'N' 2" in note for note in report.notes), report.notes
    assert "s:" in report.message


def test_dims_sharing_a_symbol_change_together_and_one_sample_still_gets_two_sizes():
    model = _model(
        [_helper.make_node("Add", ["a", "b"], ["y"])],
        [_helper.make_tensor_value_info("a", _T.FLOAT, ["N", 4]), _helper.make_tensor_value_info("b", _T.FLOAT, ["N", 4])],
        [_helper.make_tensor_value_info("y", _T.FLOAT, ["N", 4])],
    )
    report = _onnxslim.verify(model, model, samples=1)
    assert report.passed and report.samples == 2, report.notes


def test_a_dim_the_original_cannot_vary_is_named_not_skipped_silently():
    """The model declares N dynamic but only runs at N=1 (Reshape to [1,4]): the note says so."""
    model = _model(
        [_helper.make_node("Reshape", ["x", "target"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, ["N", 4])],
        [_helper.make_tensor_value_info("y", _T.FLOAT, [1, 4])],
        [_numpy_helper.from_array(_np.array([1, 4], _np.int64), "target")],
    )
    report = _onnxslim.verify(model, model)
    assert report.passed
    assert any("checked at one size only: 'N' 1" in note for note in report.notes), report.notes


def test_given_inputs_say_dynamic_dims_were_checked_at_one_size():
    model = _baked_batch_model()
    report = _onnxslim.verify(model, model, inputs=[{"x": _np.ones((2, 4), _np.float32)}])
    assert any("one size only" in note for note in report.notes), report.notes


def test_input_shape_dims_are_not_varied(tmp_path):
    result, destination = _optimize_cli(tmp_path, _baked_batch_model(), "--input-shape", "x:2,4")
    assert result.exit_code == 0, result.output
    optimized = _onnx.load(destination)
    assert [dim.dim_value for dim in optimized.graph.input[0].type.tensor_type.shape.dim] == [2, 4]


def _zipmap_model():
    """skl2onnx's classifier tail: probabilities -> ZipMap -> seq(map(int64, tensor(float)))."""
    kind = _helper.make_sequence_type_proto(_helper.make_map_type_proto(_T.INT64, _helper.make_tensor_type_proto(_T.FLOAT, None)))
    return _model(
        [_helper.make_node("Identity", ["x"], ["p"]), _helper.make_node("Softmax", ["p"], ["probabilities"]),
         _helper.make_node("ZipMap", ["probabilities"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, ["N", 3])],
        [_helper.make_tensor_value_info("probabilities", _T.FLOAT, ["N", 3]), _helper.make_value_info("z", kind)],
        domains=[_helper.make_opsetid("ai.onnx.ml", 3)],
    )


@_pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_sequence_and_map_types_survive_optimization(tmp_path, verify):
    model = _zipmap_model()
    result, destination = _optimize_cli(tmp_path, model, *([] if verify else ["--no-verify"]))
    assert result.exit_code == 0, result.output
    optimized = _onnx.load(destination)
    assert optimized.graph.output[1] == model.graph.output[1]
    _onnx.checker.check_model(optimized, full_check=True)
    assert _onnxslim.graph.count_nodes(optimized) == 2  # the Identity went


def test_optional_and_sparse_types_survive_the_round_trip():
    optional = _helper.make_optional_type_proto(_helper.make_tensor_type_proto(_T.FLOAT, [2]))
    model = _model(
        [_helper.make_node("Identity", ["x"], ["i"]), _helper.make_node("Optional", ["i"], ["o"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, [2])],
        [_helper.make_value_info("o", optional)],
        opset=18,
    )
    optimized = _onnxslim.optimize(model)
    assert optimized.graph.output[0] == model.graph.output[0]
    sparse = [_helper.make_sparse_tensor_value_info(name, _T.FLOAT, [4, 4]) for name in ("sp", "y")]
    model = _model([_helper.make_node("Identity", ["sp"], ["i"]), _helper.make_node("Identity", ["i"], ["y"])],
                   sparse[:1], sparse[1:])
    optimized = _onnxslim.optimize(model, verify=False)  # onnxruntime takes no sparse inputs
    assert optimized.graph.input[0] == sparse[0] and optimized.graph.output[0] == sparse[1]
    assert _onnxslim.graph.count_nodes(optimized) == 1


_MISFIT = "test-hostile-misfit-weight"


@_onnxslim.register_pass(_MISFIT, lossless=True)
def _misfit_weight(graph: _gs.Graph, ctx: _onnxslim.PassContext) -> _onnxslim.PassResult:
    """Test only: give every 2-D MatMul weight one row more: valid to the ordinary checker, not to
    strict shape inference (the full check)."""
    changed = 0
    for node in graph.nodes:
        weight = node.inputs[1] if node.op == "MatMul" and len(node.inputs) > 1 else None
        if isinstance(weight, _gs.Constant) and weight.values.ndim == 2 and weight.values.shape[0] == 4:
            weight.values = _np.zeros((5, weight.values.shape[1]), weight.values.dtype)
            changed += 1
    return _onnxslim.PassResult(changed=changed)


def test_an_invalid_result_is_never_written_even_without_verification(tmp_path):
    model = _model(
        [_helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, [2, 4])],
        [_helper.make_tensor_value_info("y", _T.FLOAT, [2, 3])],
        [_numpy_helper.from_array(_np.ones((4, 3), _np.float32), "w")],
    )
    result, destination = _optimize_cli(tmp_path, model, "--no-verify", "--passes", _MISFIT)
    message = _one_line_error(result, exit_code=1)
    assert "not valid ONNX" in message and not destination.exists()


def test_a_declared_zero_dim_is_fed_as_zero(tmp_path):
    model = _model(
        [_helper.make_node("Relu", ["x"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, [0, 4])],
        [_helper.make_tensor_value_info("y", _T.FLOAT, [0, 4])],
    )
    result, _ = _optimize_cli(tmp_path, model, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = _json.loads((tmp_path / "report.json").read_text())
    assert report["verification"]["input_shapes"] == {"x": [0, 4]}


@_pytest.mark.parametrize("elem_type", [_T.BOOL, _T.FLOAT16, _T.BFLOAT16, _T.INT8, _T.UINT64, _T.DOUBLE, _T.FLOAT],
                          ids=lambda kind: _T.DataType.Name(kind))
def test_a_scalar_input_of_any_type_is_fed_as_a_0d_array(tmp_path, elem_type):
    model = _model(
        [_helper.make_node("Identity", ["x"], ["i"]), _helper.make_node("Identity", ["i"], ["y"])],
        [_helper.make_tensor_value_info("x", elem_type, [])],
        [_helper.make_tensor_value_info("y", elem_type, [])],
    )
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert _onnxslim.graph.count_nodes(_onnx.load(destination)) == 1


def test_a_string_input_asks_for_real_inputs(tmp_path):
    model = _model(
        [_helper.make_node("Identity", ["x"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.STRING, [])],
        [_helper.make_tensor_value_info("y", _T.STRING, [])],
    )
    assert "--inputs" in _one_line_error(_optimize_cli(tmp_path, model)[0])


@_pytest.mark.parametrize("options", [(), ("--verify-shape", f"x:{2**40},{2**30}"), ("--input-shape", f"x:{2**62},4")],
                          ids=["declared", "verify-shape", "input-shape"])
def test_inputs_too_large_to_allocate_say_how_many_bytes(tmp_path, options):
    declared = [2**62, 4] if not options else ["N", "M"] if options[0] == "--verify-shape" else ["N", 4]
    model = _model(
        [_helper.make_node("Relu", ["x"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, declared)],
        [_helper.make_tensor_value_info("y", _T.FLOAT, declared)],
    )
    result, destination = _optimize_cli(tmp_path, model, *options)
    message = _one_line_error(result)
    assert "bytes" in message and "would need" in message and not destination.exists()




# What each set must give: exit 2 naming the first bad file, or a written, finite, valid model.
HOSTILE_SETS = {
    "one-inf": 0,  # the sample is skipped, with a warning naming it
    "all-nan": 2,
    "huge": 2,  # the float model's own outputs are NaN on it: no fidelity can be measured
    "constant": 0,
    "denormal": 0,
    "zeros": 0,
}
LOSSY_RUNS = {
    **{f"int8-{method}": ["--quantize", "int8", "--quantize-mode", "full", "--calibration-method", method]
       for method in ("minmax", "percentile", "entropy", "mse", "auto")},
    **{f"prune-{criterion}": ["--prune", "0.25", "--prune-criterion", criterion]
       for criterion in ("l2", "l1", "bn", "activation", "reconstruction")},
    "prune-activation-no-refit": ["--prune", "0.25", "--prune-criterion", "activation", "--no-reconstruct"],
    "prune-uniform": ["--prune", "0.5", "--prune-criterion", "reconstruction", "--prune-allocation", "uniform"],
}


@pytest.fixture(scope="module")
def hostile_sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    onnx.save(_calibration_net(), root / "net.onnx")
    for kind in HOSTILE_SETS:
        (root / kind).mkdir()
        for index in range(4):
            np.savez(root / kind / f"s{index}.npz", x=_hostile_sample(kind, index))
    return root


@pytest.mark.parametrize("run", LOSSY_RUNS)
@pytest.mark.parametrize("kind", HOSTILE_SETS)
def test_hostile_calibration_data_is_refused_or_gives_a_finite_valid_model(hostile_sets, tmp_path, caplog, kind, run):
    source, data, output = hostile_sets / "net.onnx", hostile_sets / kind, tmp_path / "out.onnx"
    before = _digests(source, data)
    result = _run_cli("optimize", source, output, "--calibration", data, *LOSSY_RUNS[run])
    assert _digests(source, data) == before
    assert "Traceback" not in result.output + result.stderr
    assert result.exit_code == HOSTILE_SETS[kind], result.output + result.stderr
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxslim: error: ") and "s0.npz" in lines[0], result.stderr
        assert not output.exists()
        return
    if kind == "one-inf":  # one warning line names the skipped file (on stderr outside pytest)
        (warning,) = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
        assert "s0.npz" in warning and "infinite" in warning and "s1.npz" not in warning
    assert "nan" not in result.output.lower().replace("nan or infinite", "")
    model = onnx.load(output)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = [np.random.default_rng(seed).standard_normal([1, 3, 8, 8]).astype(np.float32) for seed in range(3)]
    feeds += [_hostile_sample(kind, index) for index in range(1, 4)]  # the samples it calibrated on
    for feed in feeds:
        (values,) = session.run(None, {"x": feed})
        assert np.isfinite(values).all()
    for tensor in model.graph.initializer:  # scales, zero points, corrected biases, refit weights
        array = onnx.numpy_helper.to_array(tensor)
        if array.dtype.kind == "f":
            assert np.isfinite(array).all(), tensor.name


def _overflowing_net() -> onnx.ModelProto:
    """Exp -> Conv -> Relu -> Conv -> Sigmoid -> pool, all weights positive: an input of 100
    makes Exp, both Convs and the second Conv's input infinite, and the Sigmoid turns that back
    into 1, so the outputs stay finite while activations do not."""
    rng = np.random.default_rng(1701)
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.node("Conv", [b.node("Exp", [x]), b.initializer("wa", rng.uniform(0.01, 0.3, [8, 3, 3, 3]).astype(np.float32)),
                        b.initializer("ba", rng.uniform(0, 0.1, [8]).astype(np.float32))], pads=[1] * 4, name="a")
    h = b.node("Conv", [b.node("Relu", [a]), b.initializer("wb", rng.uniform(0.01, 0.1, [8, 8, 3, 3]).astype(np.float32)),
                        b.initializer("bb", -rng.uniform(1, 2, [8]).astype(np.float32))], pads=[1] * 4, name="b")
    b.output(b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Sigmoid", [h])])], ["y"]))
    return b.build()


@pytest.mark.parametrize("run", LOSSY_RUNS)
def test_activations_the_model_overflows_do_not_poison_calibration(tmp_path, run):
    model = _overflowing_net()
    onnx.save(model, tmp_path / "net.onnx")
    (tmp_path / "data").mkdir()
    for index in range(8):
        sample = np.random.default_rng(index).standard_normal([1, 3, 8, 8]).astype(np.float32)
        sample[0, index % 3, index, 7 - index] = 100.0  # exp(100) overflows float32
        np.savez(tmp_path / "data" / f"s{index}.npz", x=sample)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probe = np.load(tmp_path / "data" / "s0.npz")["x"]
    assert np.isfinite(session.run(None, {"x": probe})[0]).all()  # the premise: finite outputs, infinite activations
    result = _run_cli("optimize", tmp_path / "net.onnx", tmp_path / "out.onnx", "--calibration", tmp_path / "data",
                      *LOSSY_RUNS[run])
    assert result.exit_code in (0, 1), result.output + result.stderr  # 1: a fidelity budget honestly missed
    if result.exit_code == 1:
        assert "verification failed" in result.stderr and "nan" not in result.stderr.lower()
        return
    written = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(written, full_check=True)
    for tensor in written.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        assert array.dtype.kind != "f" or np.isfinite(array).all(), tensor.name
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    for index in range(8):
        (values,) = session.run(None, {"x": np.load(tmp_path / "data" / f"s{index}.npz")["x"]})
        assert np.isfinite(values).all()


def test_a_nan_fidelity_figure_fails_every_threshold():
    pool = FidelityPool()
    pool.add(np.ones([2, 4], np.float32), np.array([[1, 1, 1, 1], [1, np.nan, 1, 1]], np.float32))
    assert math.isnan(pool.cosine()) and math.isnan(pool.sqnr_db()) and math.isnan(pool.top1())
    assert "1 value(s) NaN or infinite" in pool.problem()
    assert math.isnan(FidelityPool.worst([0.9, pool.cosine()])) and math.isnan(FidelityPool.worst([pool.cosine(), 0.9]))
    agreeing = FidelityPool()  # the same NaN and the same infinity on both sides agree, like the lossless check
    agreeing.add(np.array([1.0, np.nan, -np.inf, 2.0]), np.array([1.0, np.nan, -np.inf, 2.0]))
    assert agreeing.problem() is None and agreeing.cosine() == pytest.approx(1.0) and agreeing.sqnr_db() == math.inf


@pytest.mark.parametrize("threshold", [{"min_cosine": 0.5}, {"min_sqnr_db": 0.0}, {"min_top1": 0.75}])
def test_lossy_verification_judges_the_finite_values_when_both_models_give_nan(threshold):
    """Both models give NaN at the same place (the lossless check lets that pass), and the
    candidate negates every other value: its figures once came out NaN, and NaN < threshold is
    False, so it passed; now the matching NaN is left out and the rest judged."""
    b = ModelBuilder()
    x = b.input("x", [2, 4])
    b.output(b.node("Mul", [x, b.initializer("k", np.ones([1, 4], np.float32))], ["y"]))
    reference = b.build()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    candidate.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(-np.ones([1, 4], np.float32), "k"))
    feeds = [{"x": np.array([[1, 2, 3, np.nan], [4, 3, 2, 1]], np.float32)}]
    report = Verifier(reference, inputs=feeds, budget=FidelityBudget(**threshold)).check(candidate)
    assert not report.passed and "nan" not in report.message.lower()
    assert report.outputs[0].cosine == pytest.approx(-1.0)


def test_lossy_verification_fails_nan_where_the_reference_is_finite():
    b = ModelBuilder()
    x = b.input("x", [1, 4])
    b.output(b.node("Mul", [x, b.initializer("k", np.ones([1, 4], np.float32))], ["y"]))
    reference = b.build()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    candidate.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([[1, 1, np.nan, 1]], np.float32), "k"))
    feeds = [{"x": np.array([[1, 2, 3, 4]], np.float32)}]
    report = Verifier(reference, inputs=feeds, budget=FidelityBudget(min_cosine=-1.0)).check(candidate)
    assert not report.passed
def _with_external_data(name: str, folder: Path, **entries: str) -> Path:
    """ext-style model `name` whose weight's external data reference gets `entries` (offset, length,
    location) as given, however wrong."""
    model = onnx.load(folder / "ext.onnx", load_external_data=False)
    tensor = model.graph.initializer[0]
    for key, value in entries.items():
        found = [entry for entry in tensor.external_data if entry.key == key]
        if found:
            found[0].value = value
        else:
            tensor.external_data.add(key=key, value=value)
    onnx.save(model, folder / name)
    return folder / name


def _no_ir_version(folder: Path) -> Path:
    model = _usage_model()
    model.ClearField("ir_version")
    onnx.save(model, folder / "no_ir_version.onnx")
    return folder / "no_ir_version.onnx"


def _short_weight(folder: Path) -> Path:
    """A 160x160 float weight (100 KiB, over the size the checker is shown) holding 100 bytes."""
    model = _usage_model(160)
    model.graph.initializer[0].raw_data = b"\0" * 100
    onnx.save(model, folder / "short_weight.onnx")
    return folder / "short_weight.onnx"


HOSTILE_MODELS = {
    "no ir_version": _no_ir_version,
    "weight shorter than its dims": _short_weight,
    "external data offset abc": lambda folder: _with_external_data("offset_abc.onnx", folder, offset="abc"),
    "external data offset -5": lambda folder: _with_external_data("offset_negative.onnx", folder, offset="-5"),
    "external data length abc": lambda folder: _with_external_data("length_abc.onnx", folder, length="abc"),
    "external data past the file's end": lambda folder: _with_external_data("past_end.onnx", folder, offset="64"),
    "external data location too long": lambda folder: _with_external_data("long.onnx", folder, location="w" * 300),
    "external data in a FIFO": lambda folder: _with_external_data("fifo_data.onnx", folder, location="fifo"),
    "external data missing": lambda folder: _with_external_data("missing_data.onnx", folder, location="gone.bin"),
    "model name too long": lambda folder: folder / ("m" * 300 + ".onnx"),
    "a FIFO": lambda folder: folder / "fifo",
    "a folder": lambda folder: folder / "a_folder",
}
LOADING_COMMANDS = {
    "optimize": lambda model: ["optimize", model, "out.onnx"],
    "optimize --no-verify": lambda model: ["optimize", model, "out.onnx", "--no-verify"],
    "verify": lambda model: ["verify", model, "model.onnx"],
    "inspect": lambda model: ["inspect", model],
    "inspect --json": lambda model: ["inspect", "--json", model],
    "prune-plan": lambda model: ["prune-plan", model],
    "bench": lambda model: ["bench", model, "--runs", "1", "--warmup", "0"],
}


@pytest.mark.parametrize("hostile", list(HOSTILE_MODELS))
@pytest.mark.parametrize("command", list(LOADING_COMMANDS))
def test_every_command_that_loads_a_model_refuses_a_broken_one_in_one_line(usage_folder, command, hostile):
    """inspect and prune-plan used to accept a short weight and a model without an IR version
    (prune-plan then failed with an internal error); external data offsets that are no numbers
    and names too long for the file system were internal errors everywhere."""
    model = HOSTILE_MODELS[hostile](usage_folder)
    before = _files(usage_folder)
    _assert_usage_error(_invoke(*LOADING_COMMANDS[command](model.name)))
    assert _files(usage_folder) == before
    assert not (usage_folder / "out.onnx").exists()


def test_a_model_refused_for_its_weights_names_the_weight_and_its_size(usage_folder):
    line = _assert_usage_error(_invoke("inspect", _short_weight(usage_folder).name))
    assert "'w'" in line and "100 bytes" in line and "160x160" in line


OUTPUTS_ON_THE_USERS_FILES = {
    "the input's external data": ["optimize", "ext.onnx", "weights.bin"],
    "the input's external data, with --overwrite": ["optimize", "ext.onnx", "weights.bin", "--overwrite"],
    "the input's external data, through ./": ["optimize", "ext.onnx", "./a_folder/../weights.bin"],
    "--json on the input's external data": ["optimize", "ext.onnx", "out.onnx", "--json", "weights.bin"],
    "--json on the input": ["optimize", "ext.onnx", "out.onnx", "--json", "ext.onnx"],
    "verify --json on the external data": ["verify", "ext.onnx", "model.onnx", "--json", "weights.bin"],
    "bench --json on the external data": ["bench", "ext.onnx", "--runs", "1", "--json", "weights.bin"],
    "bench --markdown on the external data": ["bench", "ext.onnx", "--runs", "1", "--markdown", "weights.bin"],
    "a device node": ["optimize", "ext.onnx", "/dev/null"],
    "a FIFO": ["optimize", "ext.onnx", "fifo"],
    "a folder": ["optimize", "ext.onnx", "a_folder"],
    "a name too long": ["optimize", "ext.onnx", "o" * 300 + ".onnx"],
    "a missing folder": ["optimize", "ext.onnx", "no_folder/out.onnx"],
    "a folder that is a file": ["optimize", "ext.onnx", "model.onnx/out.onnx"],
    "external data beside a name too long": ["optimize", "ext.onnx", "o" * 252 + ".onnx", "--external-data"],
    "--plot with a model's name": ["optimize", "ext.onnx", "out.onnx", "--prune", "0.25", "--plot", "out.onnx"],
    "--plot on the input": ["optimize", "ext.onnx", "out.onnx", "--prune", "0.25", "--plot", "ext.onnx"],
    "--plot on the --json report": ["optimize", "ext.onnx", "out.onnx", "--prune", "0.25", "--plot", "r.png",
                                    "--json", "r.png"],
}


@pytest.mark.parametrize("args", list(OUTPUTS_ON_THE_USERS_FILES.values()), ids=list(OUTPUTS_ON_THE_USERS_FILES))
def test_no_output_lands_on_a_file_the_input_reads_or_on_a_special_file(usage_folder, args):
    """`optimize m.onnx weights.bin` replaced the input's weights with the output model."""
    before = _files(usage_folder)
    _assert_usage_error(_invoke(*args))
    assert _files(usage_folder) == before  # the input, its external data and everything else
    assert sorted(os.listdir(usage_folder)) == sorted(["a_folder", "fifo", *before])
    assert stat.S_ISFIFO(os.stat(usage_folder / "fifo").st_mode)


def test_the_python_api_refuses_the_same_outputs(usage_folder):
    before = _files(usage_folder)
    for destination in ("weights.bin", "/dev/null", "fifo", "a_folder"):
        with pytest.raises(onnxslim.UsageError):
            onnxslim.optimize_file("ext.onnx", destination)
        with pytest.raises(onnxslim.UsageError):
            onnxslim.save(_usage_model(), destination, protect="ext.onnx")
    assert _files(usage_folder) == before


def test_a_run_on_a_dump_never_overwrites_it(usage_folder):
    """Re-running on a --dump-dir dump, with the same --dump-dir, wrote the new dumps over it."""
    result = _invoke("optimize", "ext.onnx", "out.onnx", "--dump-dir", "dumps")
    assert result.exit_code == 0, result.output
    assert (usage_folder / "dumps" / "000-input.onnx").is_file()
    before = _files(usage_folder)
    for dump_dir in ("dumps", "./dumps/", "a_folder/../dumps"):
        line = _assert_usage_error(_invoke("optimize", "dumps/000-input.onnx", "again.onnx", "--dump-dir", dump_dir))
        assert "000-input.onnx" in line
    (usage_folder / "onnxslim-verify-each").mkdir()
    shutil.copy(usage_folder / "model.onnx", usage_folder / "onnxslim-verify-each" / "003-fold-constants-after.onnx")
    before = _files(usage_folder)
    _assert_usage_error(_invoke("optimize", "onnxslim-verify-each/003-fold-constants-after.onnx", "again.onnx",
                                "--verify-each"))
    assert _files(usage_folder) == before
    # Another folder, or a file that is not named like a dump, is fine.
    assert _invoke("optimize", "dumps/000-input.onnx", "again.onnx", "--dump-dir", "other").exit_code == 0
    assert _files(usage_folder)["dumps/000-input.onnx"] == before["dumps/000-input.onnx"]


def test_optimizing_a_model_with_external_data_leaves_it_and_its_data_byte_identical(usage_folder):
    before = {name: _files(usage_folder)[name] for name in ("ext.onnx", "weights.bin")}
    for args in (["out.onnx"], ["out2.onnx", "--external-data"], ["out3.onnx", "--dump-dir", "dumps", "--verify-each"],
                 ["out4.onnx", "--json", "report.json"]):
        result = _invoke("optimize", "ext.onnx", *args)
        assert result.exit_code == 0, result.output
    _invoke("inspect", "ext.onnx")
    _invoke("verify", "ext.onnx", "out.onnx", "--json", "verify.json")
    _invoke("prune-plan", "ext.onnx")
    after = _files(usage_folder)
    assert {name: after[name] for name in before} == before


# ----------------------------------------------------------------------------- onnxruntime in a worker: crashes, hangs, memory


# ----------------------------------------------------------------------------- generated graphs and models onnxruntime already optimized

def test_fold_shapes_casts_to_small_integer_types_as_onnxruntime_does(tmp_path):
    """Cast(Shape(x)) to uint8 with a 300 dim, and a -1 cast to uint8: an internal error once."""
    model = _model(
        [_helper.make_node("Shape", ["x"], ["s"]), _helper.make_node("Cast", ["s"], ["c"], to=_T.UINT8),
         _helper.make_node("Cast", ["minus_one"], ["c2"], to=_T.UINT8),
         _helper.make_node("Concat", ["c", "c2"], ["u8"], axis=0),
         _helper.make_node("Cast", ["s"], ["i8"], to=_T.INT8), _helper.make_node("Size", ["x"], ["size"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, [300, 4])],
        [_helper.make_tensor_value_info("u8", _T.UINT8, [3]), _helper.make_tensor_value_info("i8", _T.INT8, [2]),
         _helper.make_tensor_value_info("size", _T.INT64, [])],
        [_numpy_helper.from_array(_np.array([-1], _np.int64), "minus_one")],
    )
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    optimized = _onnx.load(destination)
    assert _onnxslim.graph.count_nodes(optimized) == 3  # every output folded to a Constant
    u8, i8, size = _session(optimized).run(None, {"x": _np.zeros((300, 4), _np.float32)})
    assert u8.tolist() == [44, 4, 255] and i8.tolist() == [44, 4] and size == 1200


def test_a_float16_failure_is_judged_again_by_the_reference_evaluator():
    """A real difference stays a failure; the note says the reference evaluator agrees."""
    def rounded(scale):
        return _model(
            [_helper.make_node("Mul", ["x", "k"], ["m"]), _helper.make_node("Round", ["m"], ["y"])],
            [_helper.make_tensor_value_info("x", _T.FLOAT16, [64])],
            [_helper.make_tensor_value_info("y", _T.FLOAT16, [64])],
            [_numpy_helper.from_array(_np.array(scale, _np.float16), "k")],
        )
    report = _onnxslim.verify(rounded(8.0), rounded(8.5))
    assert not report.passed
    assert any("reference evaluator also finds the models differ" in note for note in report.notes), report.notes


def _small_network():
    """Conv+BN+Relu, MatMul+Add, a decomposed LayerNormalization and Gelu-like tail at opset 12
    (IR 6): what onnxruntime's offline optimizer fuses into FusedConv, FusedMatMul/Gemm,
    LayerNormalization (ONNX domain, opset 12: a schema only onnxruntime has) and NCHWc ops."""
    rng = _np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((8, 3, 3, 3)).astype(_np.float32) * 0.2,
        "scale": rng.uniform(0.5, 1.5, 8).astype(_np.float32), "bias": rng.standard_normal(8).astype(_np.float32),
        "mean": rng.standard_normal(8).astype(_np.float32) * 0.1, "var": rng.uniform(0.5, 1.5, 8).astype(_np.float32),
        "fc": rng.standard_normal((8, 16)).astype(_np.float32) * 0.3, "fc_b": rng.standard_normal(16).astype(_np.float32),
        "gamma": rng.uniform(0.5, 1.5, 16).astype(_np.float32), "beta": rng.standard_normal(16).astype(_np.float32),
        "two": _np.array(2.0, _np.float32), "eps": _np.array(1e-5, _np.float32),
    }
    nodes = [
        _helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        _helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"]),
        _helper.make_node("Relu", ["bn"], ["relu"]),
        _helper.make_node("ReduceMean", ["relu"], ["pooled"], axes=[2, 3], keepdims=0),
        _helper.make_node("Transpose", ["fc"], ["fc_t"], perm=[1, 0]),
        _helper.make_node("Transpose", ["fc_t"], ["fc_tt"], perm=[1, 0]),
        _helper.make_node("MatMul", ["pooled", "fc_tt"], ["mm"]),
        _helper.make_node("Add", ["mm", "fc_b"], ["h"]),
        _helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]),
        _helper.make_node("Sub", ["h", "mu"], ["centered"]),
        _helper.make_node("Pow", ["centered", "two"], ["squared"]),
        _helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        _helper.make_node("Add", ["variance", "eps"], ["shifted"]),
        _helper.make_node("Sqrt", ["shifted"], ["deviation"]),
        _helper.make_node("Div", ["centered", "deviation"], ["normed"]),
        _helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        _helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _model(nodes, [_helper.make_tensor_value_info("x", _T.FLOAT, ["N", 3, 16, 16])],
                  [_helper.make_tensor_value_info("y", _T.FLOAT, ["N", 16])],
                  [_numpy_helper.from_array(value, name) for name, value in weights.items()], opset=12, ir_version=6)


def _onnxruntime_optimized(source: _Path, level: str, destination: _Path) -> _Path:
    options = _ort.SessionOptions()
    options.graph_optimization_level = getattr(_ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(destination)
    options.log_severity_level = 3
    _ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return destination


@_pytest.mark.parametrize("level", ["ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_a_model_onnxruntime_already_optimized_optimizes_and_verifies(tmp_path, level):
    _onnx.save(_small_network(), tmp_path / "network.onnx")
    fused = _onnx.load(_onnxruntime_optimized(tmp_path / "network.onnx", level, tmp_path / "fused.onnx"))
    domains = {node.domain for node in fused.graph.node}
    if level != "ORT_ENABLE_BASIC":
        # the model this test is about: onnxruntime's fused ops, and LayerNormalization at opset 12
        assert "com.microsoft" in domains or "com.microsoft.nchwc" in domains, domains
        assert any(node.op_type == "LayerNormalization" and node.domain == "" for node in fused.graph.node)
    result, destination = _optimize_cli(tmp_path, fused, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = _json.loads((tmp_path / "report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["samples"] == 2
    _onnxslim.model.check_structure(_onnx.load(destination), full=True)


_CORPUS_SHAPES = {"ppocr-rec": "x:1,3,48,320", "ppocr-cls": "x:1,3,48,192", "light-squeezenet": None}


@_pytest.mark.corpus
@_pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
@_pytest.mark.parametrize("name", sorted(_CORPUS_SHAPES))
def test_corpus_models_onnxruntime_optimized_optimize_and_verify(tmp_path, name, level):
    import os

    source = _Path(os.environ.get("ONNXSLIM_CACHE", _Path(__file__).resolve().parents[1] / ".cache")) / "models" / f"{name}.onnx"
    if not source.is_file():
        _pytest.skip(f"{name} is not in the model cache (tools/fetch_models.py)")
    fused = _onnxruntime_optimized(source, level, tmp_path / "fused.onnx")
    shape = _CORPUS_SHAPES[name]
    result, destination = _optimize_cli(tmp_path, _onnx.load(fused), *(["--verify-shape", shape] if shape else []))
    assert result.exit_code == 0, result.output
    assert destination.is_file()
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



# ----------------------------------------------------------------------------- fuzzer findings


def _through_float16(scale=None, output=onnx.TensorProto.DOUBLE, last_cast=True) -> onnx.ModelProto:
    """x * 1.5 -> Conv -> Cast float16 -> Cast `output`: with `scale`, the Mul folded into the
    Conv's weight (what fold-scale-into-weights makes of it), a float32 rounding apart."""
    b = ModelBuilder(opset=17)
    x = b.input("x", [1, 1, 2, 2])
    weight = np.array([0.17922121], np.float32).reshape(1, 1, 1, 1)
    if scale is None:
        x = b.node("Mul", [x, b.initializer("s", np.array(1.5, np.float32))])
    else:
        weight = weight * np.float32(scale)
    half = b.node("Cast", [b.node("Conv", [x, b.initializer("w", weight)])], to=onnx.TensorProto.FLOAT16)
    b.output(b.node("Cast", [half], ["y"], to=output) if last_cast else b.node("Identity", [half], ["y"]))
    return b.build()


# One input where (x * 1.5) * w and x * (1.5 * w) round to float32 values a float16 step apart.
_FLIPS_FLOAT16 = {"x": np.array([-0.39039257, 1.0, 2.0, -0.5], np.float32).reshape(1, 1, 2, 2)}


def test_an_output_computed_through_float16_is_judged_by_float16s_tolerance(tmp_path):
    """Found by the fuzzer: a float64 output computed through a float16 Cast was held to float64's
    1e-6, so a correct rewrite (a Mul folded into a Conv, one float32 rounding apart upstream,
    one float16 step apart at the output) was refused. The least precise float type the output's
    computation passes through sets the tolerance."""
    original, folded = _through_float16(), _through_float16(scale=1.5)
    report = Verifier(original, inputs=[_FLIPS_FLOAT16]).check(folded)
    assert report.passed, report.message
    assert report.outputs[0].max_abs > 0  # the float16 step is there
    assert any("computed through float16" in note for note in report.notes), report.notes
    np.savez(tmp_path / "inputs.npz", **_FLIPS_FLOAT16)
    onnx.save(original, tmp_path / "m.onnx")
    result = _run_cli("optimize", tmp_path / "m.onnx", tmp_path / "out.onnx", "--inputs", tmp_path / "inputs.npz")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx").is_file()


def test_the_float16_floor_still_catches_a_wrong_result():
    """The looser tolerance is float16's, no more: 2 % off fails, and onnx's reference evaluator
    (asked because the output's computation is coarser than its type) agrees the models differ."""
    report = Verifier(_through_float16(), inputs=[_FLIPS_FLOAT16]).check(_through_float16(scale=1.5 * 1.02))
    assert not report.passed
    assert any("reference evaluator also finds the models differ" in note for note in report.notes), report.notes


def test_an_integer_output_computed_through_float16_asks_the_reference_evaluator():
    """Cast to an integer after float16 (the int-cast class): the comparison stays exact (a
    different integer is a different answer), but onnxruntime alone does not decide it: onnx's
    reference evaluator is asked, as for float16 outputs, since onnxruntime's kernels can differ
    from themselves by a float16 step. Here the step is real (float32 rounds x*1.5*w two ways)
    and both say so."""
    feed = {"x": (_FLIPS_FLOAT16["x"] * 2048).astype(np.float32)}  # large enough that a float16 step is an integer
    original = _through_float16(output=onnx.TensorProto.INT32)
    report = Verifier(original, inputs=[feed]).check(_through_float16(scale=1.5, output=onnx.TensorProto.INT32))
    assert not report.passed
    assert any("reference evaluator also finds the models differ" in note for note in report.notes), report.notes
    same = Verifier(original, inputs=[_FLIPS_FLOAT16]).check(_through_float16(scale=1.5, output=onnx.TensorProto.INT32))
    assert same.passed and not same.notes


def test_a_float64_output_computed_in_float64_keeps_float64s_tolerance():
    b = ModelBuilder(opset=17)
    x = b.input("x", [2, 2], np.float64)
    b.output(b.node("Mul", [x, b.initializer("s", np.array(1.5))], ["y"]))
    c = ModelBuilder(opset=17)
    y = c.input("x", [2, 2], np.float64)
    c.output(c.node("Mul", [y, c.initializer("s", np.array(1.5 * (1 + 1e-5)))], ["y"]))
    report = Verifier(b.build(), inputs=[{"x": np.ones([2, 2])}]).check(c.build())
    assert not report.passed and not report.notes
def test_precision_floors_follow_the_coarsest_float_upstream():
    """bfloat16 below float16, an integer output of float32 arithmetic; an input only cast (an
    input is data: no rewrite rounds it) or computed in the output's own type has no floor."""
    from onnxslim.verify import precision_floors

    b = ModelBuilder(opset=17)
    x = b.input("x", [2], np.float32)
    brain = b.node("Cast", [b.node("Cast", [x], to=onnx.TensorProto.BFLOAT16)], to=onnx.TensorProto.FLOAT16)
    b.output(b.node("Cast", [brain], ["through_bfloat16"], to=onnx.TensorProto.DOUBLE))
    b.output(b.node("Cast", [x], ["integer_of_input"], to=onnx.TensorProto.INT64))
    scaled = b.node("Mul", [x, b.initializer("s", np.array(1.5, np.float32))])
    b.output(b.node("Cast", [scaled], ["integer"], to=onnx.TensorProto.INT64))
    b.output(b.node("Relu", [b.node("Cast", [x], to=onnx.TensorProto.DOUBLE)], ["widened"]))
    b.output(b.node("Cast", [b.node("Cast", [x], to=onnx.TensorProto.DOUBLE)], ["narrowed"], to=onnx.TensorProto.FLOAT))
    b.output(b.node("Relu", [b.input("wide", [2], np.float64)], ["plain"]))
    floors = precision_floors(b.build())
    assert floors == {"through_bfloat16": onnx.TensorProto.BFLOAT16, "integer": onnx.TensorProto.FLOAT}, floors


def test_sqnr_of_a_tiny_signal_under_huge_noise_is_a_number():
    """Found by the fuzzer (quantize, exit 3 'math domain error'): signal / noise underflowed to 0
    before its log10. Both SQNR figures, per output and pooled, now give a (very negative) number."""
    from onnxslim.verify import sqnr_db

    reference, candidate = np.array([1e-160, 0.0]), np.array([1e150, 0.0])
    assert sqnr_db(reference, candidate) < -6000
    pool = FidelityPool()
    pool.add(reference, candidate)
    assert pool.sqnr_db() < -6000
