"""The command line: exit codes, one-line errors, reports, atomic output, the input left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from onnxslim.cli import cli

BREAK_PASS = "test-cli-break"


@onnxslim.register_pass(BREAK_PASS, lossless=False)
def set_weights_to_one_half(graph: gs.Graph, ctx: onnxslim.PassContext) -> onnxslim.PassResult:
    """Test only: overwrite every float initializer with 0.5, so the model computes something else."""
    changed = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32 and not np.all(tensor.values == 0.5):
            tensor.values = np.full_like(tensor.values, 0.5)
            changed += 1
    return onnxslim.PassResult(overwritten=changed)  # idempotent: a second run finds nothing to change


# ----------------------------------------------------------------------------- models


def tiny_model(*, dynamic: bool = False, weight_scale: float = 0.1) -> onnx.ModelProto:
    """y = x @ w + (c + c): a Constant to lift and fold, an Identity to remove (5 nodes -> 2)."""
    width = "n" if dynamic else 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) * weight_scale, "w")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones([4], np.float32), "c_value")),
        helper.make_node("Add", ["c", "c"], ["c2"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Identity", ["h"], ["h2"]),
        helper.make_node("Add", ["h2", "c2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_model() -> onnx.ModelProto:
    """An If whose branches hold a Relu and a Neg+Abs: inspect must count the nodes inside."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e0"]), helper.make_node("Abs", ["e0"], ["e"])],
        "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    node = helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)
    graph = helper.make_graph([node], "with_if", [x, flag], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder that is also the cwd, holding model.onnx."""
    monkeypatch.chdir(tmp_path)
    onnx.save(tiny_model(), tmp_path / "model.onnx")
    return tmp_path


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def run(*args: str):
    return CliRunner().invoke(cli, [str(arg) for arg in args], prog_name="onnxslim")


def assert_one_line_error(result, exit_code: int = 2) -> str:
    """Exactly one stderr line starting 'onnxslim: error:', the given exit code, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxslim: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("onnxslim")
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnxslim.cli"]


def run_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*console_script(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- bad input


def _missing(folder: Path) -> Path:
    return folder / "missing.onnx"


def _directory(folder: Path) -> Path:
    (folder / "a_folder.onnx").mkdir()
    return folder / "a_folder.onnx"


def _empty(folder: Path) -> Path:
    (folder / "empty.onnx").write_bytes(b"")
    return folder / "empty.onnx"


def _random_bytes(folder: Path) -> Path:
    (folder / "random.onnx").write_bytes(np.random.default_rng(7).bytes(4096))
    return folder / "random.onnx"


def _truncated(folder: Path) -> Path:
    data = (folder / "model.onnx").read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return folder / "truncated.onnx"


def _external_data_missing(folder: Path) -> Path:
    (folder / "ext").mkdir()
    onnx.save_model(tiny_model(), folder / "ext" / "model.onnx", save_as_external_data=True, location="w.data", size_threshold=0)
    (folder / "ext" / "w.data").unlink()
    return folder / "ext" / "model.onnx"


def _invalid_graph(folder: Path) -> Path:
    model = tiny_model()
    model.graph.node[2].input[1] = "nowhere"  # parses, but reads a tensor nothing defines
    onnx.save(model, folder / "invalid.onnx")
    return folder / "invalid.onnx"


BAD_SOURCES = {
    "missing": _missing,
    "directory": _directory,
    "empty": _empty,
    "random-bytes": _random_bytes,
    "truncated": _truncated,
    "external-data-missing": _external_data_missing,
    "invalid-graph": _invalid_graph,
}


@pytest.mark.parametrize("make_source", BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_bad_input_is_one_line_and_exit_2(workdir, make_source):
    source = make_source(workdir)
    before = snapshot(source) if source.is_file() else None
    listing = sorted(os.listdir(workdir))
    result = run("optimize", source, workdir / "out.onnx")
    message = assert_one_line_error(result)
    assert source.name in message
    if before is not None:
        assert snapshot(source) == before
    assert sorted(os.listdir(workdir)) == listing  # no output, no temp files


def test_missing_external_data_error_names_the_file(workdir):
    result = run("optimize", _external_data_missing(workdir), "out.onnx")
    assert "w.data" in assert_one_line_error(result)


@pytest.mark.parametrize(
    "destination",
    ["model.onnx", "./model.onnx", "sub/../model.onnx", "{abs}", "link.onnx"],
    ids=["same", "dot-relative", "dotdot-relative", "absolute", "symlink"],
)
def test_output_equal_to_input_is_refused(workdir, destination):
    (workdir / "sub").mkdir()
    (workdir / "link.onnx").symlink_to("model.onnx")
    source = workdir / "model.onnx"
    before = snapshot(source)
    listing = sorted(os.listdir(workdir))
    result = run("optimize", "model.onnx", destination.format(abs=source))
    assert "input model" in assert_one_line_error(result)
    assert snapshot(source) == before
    assert (workdir / "link.onnx").is_symlink()
    assert sorted(os.listdir(workdir)) == listing


@pytest.mark.parametrize("command", ["optimize", "verify"])
@pytest.mark.parametrize("report", ["model.onnx", "./model.onnx", "other.onnx"])
def test_json_report_never_lands_on_a_model(workdir, command, report):
    onnx.save(tiny_model(), workdir / "other.onnx")
    models = {name: snapshot(workdir / name) for name in ("model.onnx", "other.onnx")}
    result = run(command, "model.onnx", "other.onnx", "--json", report)
    assert "--json" in assert_one_line_error(result)
    assert {name: snapshot(workdir / name) for name in models} == models
    assert sorted(os.listdir(workdir)) == ["model.onnx", "other.onnx"]


@pytest.mark.parametrize("command", ["optimize", "verify"])
def test_json_report_folder_missing_is_found_before_anything_is_written(workdir, command):
    result = run(command, "model.onnx", "out.onnx" if command == "optimize" else "model.onnx", "--json", "no/report.json")
    assert "no/report.json" in assert_one_line_error(result)
    assert sorted(os.listdir(workdir)) == ["model.onnx"]


def test_unknown_pass_is_a_usage_error(workdir):
    result = run("optimize", "model.onnx", "out.onnx", "--passes", "fold-constants,no-such-pass")
    assert "no-such-pass" in assert_one_line_error(result)
    assert not (workdir / "out.onnx").exists()


@pytest.mark.parametrize("spec", ["x=1,4", "x:1,four", ":1,4", "x:1,-4"])
def test_bad_verify_shape_is_a_usage_error(workdir, spec):
    result = run("optimize", "model.onnx", "out.onnx", "--verify-shape", spec)
    assert spec in assert_one_line_error(result)
    assert not (workdir / "out.onnx").exists()


def test_dynamic_dim_without_verify_shape_names_the_dim(workdir):
    onnx.save(tiny_model(dynamic=True), workdir / "dynamic.onnx")
    result = run("optimize", "dynamic.onnx", "out.onnx")
    message = assert_one_line_error(result)
    assert "'n'" in message and "dim 1" in message and "--verify-shape x:" in message
    assert not (workdir / "out.onnx").exists()


def test_verify_shape_makes_a_dynamic_model_verifiable_and_keeps_it_dynamic(workdir):
    onnx.save(tiny_model(dynamic=True), workdir / "dynamic.onnx")
    result = run("optimize", "dynamic.onnx", "out.onnx", "--verify-shape", "x:1,4")
    assert result.exit_code == 0, result.output
    dims = onnx.load(workdir / "out.onnx").graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_param == "n"


def custom_op_model() -> onnx.ModelProto:
    """A node of a domain onnxruntime does not know: it can be optimized but not verified."""
    model = tiny_model()
    model.graph.node[3].op_type, model.graph.node[3].domain = "Mystery", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def test_model_onnxruntime_cannot_run_is_one_line_and_no_verify_skips(workdir):
    onnx.save(custom_op_model(), workdir / "custom.onnx")
    result = run("optimize", "custom.onnx", "out.onnx")
    assert "--no-verify" in assert_one_line_error(result)
    assert sorted(os.listdir(workdir)) == ["custom.onnx", "model.onnx"]
    result = run("optimize", "custom.onnx", "out.onnx", "--no-verify", "--json", "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "report.json").read_text())
    assert report["verdict"].startswith("not verified") and report["verification"] is None
    assert "com.example::Mystery" in report["after"]["ops"]


def test_debug_shows_the_traceback(workdir):
    result = run("optimize", "missing.onnx", "out.onnx", "--debug")
    assert isinstance(result.exception, onnxslim.ModelLoadError)
    result = run("--debug", "optimize", "missing.onnx", "out.onnx")
    assert isinstance(result.exception, onnxslim.ModelLoadError)


# ----------------------------------------------------------------------------- end to end, as a process


def test_process_bad_input_exit_2_without_traceback(workdir):
    (workdir / "truncated.onnx").write_bytes((workdir / "model.onnx").read_bytes()[:100])
    for source in ("missing.onnx", "truncated.onnx"):
        completed = run_process("optimize", source, "out.onnx", cwd=workdir)
        assert completed.returncode == 2, completed.stderr
        assert completed.stderr.splitlines() == [completed.stderr.strip()]
        assert completed.stderr.startswith("onnxslim: error: ")
        assert "Traceback" not in completed.stdout + completed.stderr
    assert not (workdir / "out.onnx").exists()


def test_process_debug_prints_traceback(workdir):
    completed = run_process("optimize", "missing.onnx", "out.onnx", "--debug", cwd=workdir)
    assert completed.returncode != 0
    assert "Traceback" in completed.stderr and "ModelLoadError" in completed.stderr


def test_process_success_and_unknown_pass(workdir):
    completed = run_process("optimize", "model.onnx", "out.onnx", cwd=workdir)
    assert completed.returncode == 0, completed.stderr
    assert "verified" in completed.stdout
    assert sorted(os.listdir(workdir)) == ["model.onnx", "out.onnx"]
    # The test-only pass is not registered in that process: an unknown pass is a usage error.
    completed = run_process("optimize", "model.onnx", "broken.onnx", "--passes", BREAK_PASS, cwd=workdir)
    assert completed.returncode == 2 and BREAK_PASS in completed.stderr
    assert "Traceback" not in completed.stderr


# ----------------------------------------------------------------------------- success


def test_optimize_writes_output_and_json_report(workdir):
    source = workdir / "model.onnx"
    before = snapshot(source)
    result = run("optimize", "model.onnx", "out.onnx", "--json", "report.json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert snapshot(source) == before
    assert sorted(os.listdir(workdir)) == ["model.onnx", "out.onnx", "report.json"]  # no temp files left

    optimized = onnx.load(workdir / "out.onnx")
    onnx.checker.check_model(optimized)
    assert [node.op_type for node in optimized.graph.node] == ["Gemm"]  # MatMul + bias Add fused

    report = json.loads((workdir / "report.json").read_text())
    assert report["verdict"] == "verified"
    assert report["before"]["nodes"] == 5
    assert report["after"]["nodes"] == 1
    assert report["output"] == "out.onnx"
    assert report["pipeline"] == str(onnxslim.resolve_pipeline())
    assert onnxslim.Pipeline.parse(report["pipeline"]) == onnxslim.resolve_pipeline()
    assert report["verification"]["passed"] is True
    assert "verified: 5 -> 1 nodes" in result.stdout


def test_optimize_with_passes_reports_that_pipeline(workdir):
    result = run("optimize", "model.onnx", "out.onnx", "--passes", "eliminate-noops", "--json", "report.json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "report.json").read_text())
    assert report["pipeline"] == "eliminate-noops"
    assert (report["before"]["nodes"], report["after"]["nodes"]) == (5, 4)


# ----------------------------------------------------------------------------- verification failure


def test_failing_model_without_force_writes_nothing_but_the_json(workdir):
    source = workdir / "model.onnx"
    before = snapshot(source)
    result = run("optimize", "model.onnx", "out.onnx", "--passes", BREAK_PASS, "--json", "report.json")
    line = assert_one_line_error(result, exit_code=1)
    assert "verification failed" in line
    assert not (workdir / "out.onnx").exists()
    assert sorted(os.listdir(workdir)) == ["model.onnx", "report.json"]
    assert snapshot(source) == before
    report = json.loads((workdir / "report.json").read_text())
    assert report["verdict"] == "FAILED"
    assert report["pipeline"] == BREAK_PASS
    assert report["verification"]["passed"] is False
    assert report["output"] is None


def test_failing_model_with_force_is_written_and_exits_1(workdir):
    result = run("optimize", "model.onnx", "out.onnx", "--passes", BREAK_PASS, "--force", "--json", "report.json")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert sorted(os.listdir(workdir)) == ["model.onnx", "out.onnx", "report.json"]
    written = onnx.load(workdir / "out.onnx")
    assert np.all(numpy_helper.to_array(written.graph.initializer[0]) == 0.5)
    report = json.loads((workdir / "report.json").read_text())
    assert report["verdict"] == "FAILED"
    assert report["output"] == "out.onnx"
    assert any("force" in note for note in report["notes"])
    assert "FAILED" in result.stdout


# ----------------------------------------------------------------------------- verify


def test_verify_a_model_against_itself(workdir):
    result = run("verify", "model.onnx", "model.onnx", "--json", "verify.json")
    assert result.exit_code == 0, result.output
    assert json.loads((workdir / "verify.json").read_text())["passed"] is True


def test_verify_a_model_with_a_changed_weight(workdir):
    onnx.save(tiny_model(weight_scale=0.2), workdir / "changed.onnx")
    result = run("verify", "model.onnx", "changed.onnx", "--json", "verify.json")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    report = json.loads((workdir / "verify.json").read_text())
    assert report["passed"] is False
    assert report["outputs"][0]["name"] == "y" and report["outputs"][0]["passed"] is False


def test_verify_with_inputs_file_of_wrong_names(workdir):
    np.savez(workdir / "inputs.npz", not_x=np.zeros([1, 4], np.float32))
    result = run("verify", "model.onnx", "model.onnx", "--inputs", "inputs.npz")
    message = assert_one_line_error(result)
    assert "not_x" in message and "x" in message


# ----------------------------------------------------------------------------- passes, inspect


def test_passes_lists_every_registered_pass():
    result = run("passes")
    assert result.exit_code == 0, result.output
    names = [spec.name for spec in onnxslim.registered_passes()]
    assert BREAK_PASS in names and "fold-constants" in names
    listed = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert set(names) <= listed
    assert "Test only: overwrite every float initializer" in result.stdout


def test_inspect_counts_nodes_inside_if_branches(workdir):
    onnx.save(if_model(), workdir / "if.onnx")
    result = run("inspect", "if.onnx")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "4 nodes" in text
    for name in ("x", "flag", "y", "BOOL", "FLOAT"):
        assert name in text
    ops = dict(line.split() for line in text.splitlines() if line.split()[:1] in (["If"], ["Relu"], ["Neg"], ["Abs"]))
    assert ops == {"If": "1", "Relu": "1", "Neg": "1", "Abs": "1"}


def test_inspect_json(workdir):
    onnx.save(if_model(), workdir / "if.onnx")
    result = run("inspect", "if.onnx", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["nodes"] == 4
    assert summary["ops"] == {"Abs": 1, "If": 1, "Neg": 1, "Relu": 1}
    assert summary["inputs"] == [
        {"name": "x", "dtype": "FLOAT", "shape": [2]},
        {"name": "flag", "dtype": "BOOL", "shape": []},
    ]
    assert summary["outputs"] == [{"name": "y", "dtype": "FLOAT", "shape": [2]}]
    assert summary["opsets"] == {"ai.onnx": 17}


def test_inspect_a_bad_file_is_one_line(workdir):
    (workdir / "empty.onnx").write_bytes(b"")
    assert "empty" in assert_one_line_error(run("inspect", "empty.onnx"))


# ----------------------------------------------------------------------------- writing the output


def test_output_folder_missing_or_a_directory_is_one_line(workdir):
    (workdir / "a_folder").mkdir()
    for destination in ("no/such/folder/out.onnx", "a_folder"):
        result = run("optimize", "model.onnx", destination)
        assert_one_line_error(result)
    assert sorted(os.listdir(workdir)) == ["a_folder", "model.onnx"]
    assert os.listdir(workdir / "a_folder") == []


def test_a_write_that_fails_midway_leaves_no_temp_files(workdir, monkeypatch):
    def fail_after_partial_write(model, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", fail_after_partial_write)
    result = run("optimize", "model.onnx", "out.onnx")
    assert "No space left" in assert_one_line_error(result)
    assert sorted(os.listdir(workdir)) == ["model.onnx"]
