"""Careless usage (issue 17): bad options, non-finite thresholds and tolerances, option sweeps over
every command, click's usage errors, pipelines nested deep or 100 kB long, shapes and sample counts
refused before any work, corrupt --inputs archives, control characters and odd file names in
arguments, Ctrl-C and SIGTERM, and a closed or full stdout: each is exit 2 (or 130/143) with one
line and no traceback, never a wrong model.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from hostile.common import _assert_usage_error, _files, _invoke, _leftovers, _usage_model


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
            onnxslim.optimize(model, verify=onnxslim.VerifyOptions(**options))
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
            onnxslim.optimize(_usage_model(), simplify=onnxslim.SimplifyOptions(passes=text), verify=False)
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


def test_onnxruntime_prints_nothing_at_import_where_home_cannot_be_written(tmp_path):
    """A service account's HOME (here /dev/null, which even root cannot write under): onnxruntime's
    telemetry printed its own coloured 'Failed to persist telemetry device ID' line on every command."""
    onnx.save(_usage_model(), tmp_path / "model.onnx")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    environment["HOME"] = "/dev/null"
    finished = subprocess.run([sys.executable, "-m", "onnxslim.cli", "optimize", "model.onnx", "out.onnx"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, env=environment)
    assert (finished.returncode, finished.stderr) == (0, "")


@pytest.mark.parametrize("args", [["inspect", "missing\nname.onnx"], ["optimize", "model.onnx", "no\nfolder/out.onnx"],
                                  ["optimize", "model.onnx", "out.onnx", "--passes", "fold\nconstants"]])
def test_a_control_character_in_an_argument_is_escaped_not_a_line_break(usage_folder, args):
    """The error line was cut at the newline in the file name: 'no such file: missing' named
    another file."""
    line = _assert_usage_error(_invoke(*args))
    assert next(argument for argument in args if "\n" in argument).replace("\n", "\\n") in line, line


def test_arguments_with_spaces_unicode_and_leading_dashes_are_plain_file_names(usage_folder):
    shutil.copy("model.onnx", "my model ü.onnx")
    shutil.copy("model.onnx", "-dash.onnx")
    assert _invoke("optimize", "my model ü.onnx", "out ü.onnx").exit_code == 0
    assert _invoke("optimize", "--", "-dash.onnx", "-out.onnx").exit_code == 0
    assert onnx.load("out ü.onnx").graph.node and onnx.load("-out.onnx").graph.node


def _dynamic_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--verify-shape", "x:1,,4", "dims must be integers"),  # the empty dim was dropped: x:1,4
    ("--verify-shape", "x:,4", "dims must be integers"),
    ("--verify-shape", "x:1,3", "dim 1 is fixed at 4, the given shape says 3"),  # was onnxruntime's INVALID_ARGUMENT
    ("--input-shape", "x:1,,4", "dims must be integers"),
    ("--passes", "", "the pipeline is empty"),  # ran the default pipeline
    ("--passes", "fold-constants{size_cap=1,size-cap=2}", "option 'size_cap' twice"),  # the last one won
    ("--samples", "1000000000", "give fewer --samples"),  # took 16 GB of memory before it was stopped
])
def test_shapes_pipelines_and_counts_that_were_taken_silently_or_too_late_are_refused(usage_folder, option, value,
                                                                                     expected):
    onnx.save(_dynamic_model(), "dynamic.onnx")
    line = _assert_usage_error(_invoke("optimize", "dynamic.onnx", "out.onnx", option, value))
    assert expected in line, line
    assert not Path("out.onnx").exists()


def test_a_shape_given_twice_is_refused_not_overridden(usage_folder):
    onnx.save(_dynamic_model(), "dynamic.onnx")
    for option in ("--verify-shape", "--input-shape"):
        line = _assert_usage_error(_invoke("optimize", "dynamic.onnx", "out.onnx", option, "x:1,4", option, "x:2,4"))
        assert "the shape of 'x' is given twice (x:1,4 and x:2,4)" in line
    assert "given twice" in _assert_usage_error(_invoke("bench", "dynamic.onnx", "--input-shape", "x:1,4",
                                                        "--input-shape", "x:3,4"))


def test_a_scalar_shape_and_a_name_with_colons_still_parse():
    from onnxslim.verify import parse_shape_specs

    assert parse_shape_specs(["s:", "a:b:2x4", "x: 1, 3"]) == {"s": [], "a:b": [2, 4], "x": [1, 3]}


def test_huge_sample_counts_are_refused_before_anything_is_allocated(usage_folder):
    for args in (["bench", "model.onnx", "--samples", "99999999999"],
                 ["verify", "model.onnx", "model.onnx", "--samples", "10000000"],
                 ["optimize", "model.onnx", "out.onnx", "--quantize", "int8", "--calibration", "random",
                  "--calibration-limit", "1000000000"]):
        _assert_usage_error(_invoke(*args))


def test_a_pipeline_text_of_100_kb_gives_a_short_line(usage_folder):
    for text in ("x" * 100_000, "fixpoint(" + "x" * 100_000, "fold-constants{" + "k" * 100_000 + "=1}",
                 "fold-constants," + "é" * 100_000):
        line = _assert_usage_error(_invoke("optimize", "model.onnx", "out.onnx", "--passes", text))
        assert len(line) < 1000, len(line)


@pytest.mark.parametrize("option", ["--json"])
@pytest.mark.parametrize("command", [["verify", "model.onnx", "model.onnx"], ["bench", "model.onnx", "--runs", "1"],
                                     ["optimize", "model.onnx", "out.onnx"]])
def test_a_report_to_stdout_is_refused_not_written_to_a_file_named_dash(usage_folder, command, option):
    line = _assert_usage_error(_invoke(*command, option, "-"))
    assert "cannot go to stdout ('-')" in line
    assert not Path("-").exists() and not Path("out.onnx").exists()


_SIGTERM_SCRIPT = """
import sys, time, onnx, onnxslim
from pathlib import Path
from onnxslim.cli import main

def stuck(model, path, *args, **kwargs):  # half the model written, then a long wait
    Path(path).write_bytes(model.SerializeToString()[:10])
    Path("started").touch()
    time.sleep(60)

if sys.argv[1] == "write":
    onnx.save_model = stuck
else:
    @onnxslim.register_pass("test-wait-for-sigterm")
    def wait(graph, ctx):
        Path("started").touch()
        time.sleep(60)
        return onnxslim.PassResult()
sys.argv = ["onnxslim", "optimize", "model.onnx", "out.onnx", "--json", "report.json",
            *(["--passes", "test-wait-for-sigterm"] if sys.argv[1] == "pass" else [])]
main()
"""


@pytest.mark.parametrize("during", ["pass", "write"])
def test_sigterm_ends_the_run_as_ctrl_c_does_with_its_own_exit_code(tmp_path, during):
    """A build system or a service manager stops a job with SIGTERM: its default action killed
    onnxslim at once, leaving the staged output in .onnxslim-* beside the destination, and no line."""
    onnx.save(_usage_model(), tmp_path / "model.onnx")
    before = _files(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, during], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "started").exists(), process.communicate(timeout=10)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.splitlines() == ["onnxslim: error: terminated"]
    (tmp_path / "started").unlink()
    assert _files(tmp_path) == before
    assert _leftovers(tmp_path) == []
