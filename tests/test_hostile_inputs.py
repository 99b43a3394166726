"""Hostile and careless inputs (issue 17): every case that once broke onnxslim's promise.

The promise: exit 0 only for a correct model, 1 only for "verification failed", 2 for bad input
(one line, no traceback), 3 for our bug, 130 when interrupted; the input file and every file it
reads are byte-identical afterwards. Each section below is one class of hostile input.
"""

from __future__ import annotations

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
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from onnxslim.cli import cli


# ----------------------------------------------------------------------------- calibration data: NaN, Inf, huge and zero-width ranges


# ----------------------------------------------------------------------------- thresholds, tolerances and other usage


def _model(width: int = 4) -> onnx.ModelProto:
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
    onnx.save(_model(), tmp_path / "model.onnx")
    onnx.save(_model(), tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
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
    onnx.save(_model(), usage_folder / "other.onnx")
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

    model = _model()
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
            onnxslim.optimize(_model(), passes=text, verify=False)
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
    onnx.save(_model(), tmp_path / "model.onnx")
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
    onnx.save(_model(), tmp_path / "model.onnx")
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
    onnx.save(_model(), tmp_path / "model.onnx")
    with open("/dev/full", "w") as full:
        finished = subprocess.run([sys.executable, "-m", "onnxslim.cli", *args], cwd=tmp_path, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.splitlines() == ["onnxslim: error: cannot write the output: No space left on device"]


# ----------------------------------------------------------------------------- the model's interface: overridable inputs, dynamic dims, types


# ----------------------------------------------------------------------------- the user's files


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
    model = _model()
    model.ClearField("ir_version")
    onnx.save(model, folder / "no_ir_version.onnx")
    return folder / "no_ir_version.onnx"


def _short_weight(folder: Path) -> Path:
    """A 160x160 float weight (100 KiB, over the size the checker is shown) holding 100 bytes."""
    model = _model(160)
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
            onnxslim.save(_model(), destination, protect="ext.onnx")
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
