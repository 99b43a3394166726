"""onnxruntime in a worker (issue 17): a model may crash onnxruntime (SIGFPE), hang it or make it
allocate terabytes; it runs in a worker process (onnxslim.runtime), so each is one line and exit 2,
never our process dying, hanging or printing onnxruntime's log, and Ctrl-C stops it at once. These
run the real console script: a signal or a log line on file descriptor 2 is only seen from outside.
"""

from __future__ import annotations

import os
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


INT64_MIN = np.iinfo(np.int64).min


def _int64_model(nodes, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _division_overflow_model() -> onnx.ModelProto:
    """x + INT64_MIN / -1 with both operands constants: the fold and the run both divide."""
    return _int64_model(
        [helper.make_node("Div", ["a", "b"], ["q"]), helper.make_node("Add", ["x", "q"], ["y"])],
        [numpy_helper.from_array(np.array([INT64_MIN], np.int64), "a"), numpy_helper.from_array(np.array([-1], np.int64), "b")],
    )


def _endless_loop_model() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["v"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph([helper.make_node("Loop", ["", "", "x"], ["y"], body=body)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _allocation_bomb_model() -> onnx.ModelProto:
    """ConstantOfShape of 2^40 floats (4 TiB) added to the input."""
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["s"], ["c"]), helper.make_node("Add", ["c", "x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1 << 40])],
        [numpy_helper.from_array(np.array([1 << 40], np.int64), "s")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _onnxslim_process(*args, timeout_seconds: str | None = None, **popen) -> subprocess.Popen:
    script = Path(sys.executable).with_name("onnxslim")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from onnxslim.cli import main; main()"]
    environment = dict(os.environ)
    if timeout_seconds is not None:
        environment["ONNXSLIM_RUN_TIMEOUT"] = timeout_seconds
    return subprocess.Popen([*command, *map(str, args)], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), stderr
    return lines[0]


def _saved(model: onnx.ModelProto, path: Path) -> tuple[Path, bytes]:
    onnx.save(model, path)
    return path, path.read_bytes()


def test_int64_division_overflow_is_one_line_exit_2_not_sigfpe(tmp_path):
    source, before = _saved(_division_overflow_model(), tmp_path / "model.onnx")
    code, _, stderr = _finish(_onnxslim_process("optimize", source, tmp_path / "out.onnx"))
    assert code == 2  # not -SIGFPE: folding crashed the worker, and verification named the model
    assert "crashed running the original model (SIGFPE" in _one_error_line(stderr)
    assert not (tmp_path / "out.onnx").exists()
    assert source.read_bytes() == before


def test_a_fold_that_crashes_onnxruntime_is_not_taken():
    optimized = onnxslim.optimize(_division_overflow_model(), simplify=onnxslim.SimplifyOptions(passes="fold-constants"),
                                  verify=False)
    assert [node.op_type for node in optimized.graph.node] == ["Div", "Add"]


def test_int64_division_overflow_in_verify_is_exit_2(tmp_path):
    source, before = _saved(_division_overflow_model(), tmp_path / "model.onnx")
    code, _, stderr = _finish(_onnxslim_process("verify", source, source))
    assert code == 2
    assert "SIGFPE" in _one_error_line(stderr)
    assert source.read_bytes() == before


def test_a_candidate_that_crashes_onnxruntime_fails_verification(tmp_path):
    # What the wrapped-around division gives, as a constant: the reference runs.
    reference = _int64_model([helper.make_node("Add", ["x", "q"], ["y"])],
                             [numpy_helper.from_array(np.array([INT64_MIN], np.int64), "q")])
    reference_path, _ = _saved(reference, tmp_path / "reference.onnx")
    candidate_path, before = _saved(_division_overflow_model(), tmp_path / "candidate.onnx")
    code, stdout, stderr = _finish(_onnxslim_process("verify", reference_path, candidate_path))
    assert code == 1, stderr
    assert "verification failed" in stdout and "SIGFPE" in stdout
    assert stderr == ""
    assert candidate_path.read_bytes() == before


def test_an_endless_loop_stops_at_the_time_limit_exit_2(tmp_path):
    source, before = _saved(_endless_loop_model(), tmp_path / "model.onnx")
    started = time.monotonic()
    code, _, stderr = _finish(_onnxslim_process("optimize", source, tmp_path / "out.onnx", timeout_seconds="2"))
    assert code == 2
    assert "did not finish running the original model within 2 s" in _one_error_line(stderr)
    assert time.monotonic() - started < 60
    assert source.read_bytes() == before


def test_an_allocation_bomb_is_one_line_without_onnxruntime_log(tmp_path):
    source, before = _saved(_allocation_bomb_model(), tmp_path / "model.onnx")
    code, _, stderr = _finish(_onnxslim_process("optimize", source, tmp_path / "out.onnx"))
    assert code == 2
    line = _one_error_line(stderr)  # and nothing else: onnxruntime's own log line never gets here
    assert "ran out of memory running the original model" in line and "4.0 TiB" in line
    assert source.read_bytes() == before


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker through /proc")
def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a running process (Linux /proc), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ctrl_c_stops_a_hanging_optimize_with_exit_130(tmp_path):
    source, before = _saved(_endless_loop_model(), tmp_path / "model.onnx")
    process = _onnxslim_process("optimize", source, tmp_path / "out.onnx")
    deadline = time.monotonic() + 60
    while not (workers := _children(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers, "no worker process started"
    # The endless run is under way once the worker has spent more CPU than its start-up takes
    # (under 1.5 s even on a loaded machine); a fixed sleep could interrupt our own start-up instead.
    while max(_cpu_seconds(pid) for pid in workers) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    code, _, stderr = _finish(process, timeout=30)
    assert time.monotonic() - interrupted < 2
    assert code == 130
    assert _one_error_line(stderr) == "onnxslim: error: interrupted"
    assert not any(_running(pid) for pid in workers)
    assert not (tmp_path / "out.onnx").exists()
    assert source.read_bytes() == before
