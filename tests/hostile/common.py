"""Shared helpers of the hostile-input suite (issue 17: "never a wrong model on any input"): every
case that once broke onnxslim's promise, one test module per class of hostile input (calibration,
usage, files, interface, worker, generated, repairs). The promise: exit 0 only for a correct model,
1 only for "verification failed", 2 for bad input (one line, no traceback), 3 for our bug, 130 when
interrupted; the input file and every file it reads are byte-identical afterwards.

Here: the CLI runner, file digests, the small models several modules build, and the checks of a
one-line usage error. Imported as `from hostile.common import ...` (tests/conftest.py puts the
tests folder on sys.path; like tests/passes/, this folder has no __init__.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxslim.cli import cli


def _run_cli(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], prog_name="onnxslim")


def _digests(*paths: Path) -> dict[Path, str]:
    """sha256 of every file under the given paths (a folder: all its files)."""
    files = [file for path in paths for file in ([path] if path.is_file() else sorted(path.iterdir()))]
    return {file: hashlib.sha256(file.read_bytes()).hexdigest() for file in files}


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


def _model(nodes, inputs, outputs, initializers=(), value_info=(), opset=17, ir_version=8, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *domains])
    model.ir_version = ir_version
    return model


def _optimize_cli(tmp_path, model, *options):
    """Save `model`, run `onnxslim optimize` on it; returns (result, output path), and checks the
    input file is byte-identical afterwards."""
    source, destination = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    before = source.read_bytes()
    result = CliRunner().invoke(cli, ["optimize", str(source), str(destination), *map(str, options)], prog_name="onnxslim")
    assert source.read_bytes() == before
    return result, destination


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # onnxruntime's own optimizer trusts declared output shapes (it folds Shape of an output declared [1,4])
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _leftovers(folder: Path) -> list[str]:
    """Temp files or folders onnxslim stages its outputs in."""
    return sorted(path.name for path in folder.rglob(".onnxslim-*"))
