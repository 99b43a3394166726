"""onnxslim.runtime: onnxruntime in a worker process, reused, restarted after a crash, bounded in
time and memory, interruptible, and giving the outputs onnxruntime gives in process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim import runtime
from onnxslim.errors import RuntimeCrash, RuntimeOutOfMemory, RuntimeTimeout, VerificationUnavailable, WorkerFailure

INT64_MIN = np.iinfo(np.int64).min


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def relu_model() -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])


def divide_model() -> onnx.ModelProto:
    """x / -1 on int64: SIGFPE on x86 for x = INT64_MIN."""
    minus_one = numpy_helper.from_array(np.array([-1], np.int64), "m")
    return _model([helper.make_node("Div", ["x", "m"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.INT64, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.INT64, [1])], [minus_one])


def endless_loop_model() -> onnx.ModelProto:
    """A Loop with neither a trip count nor a condition: it never ends."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["v"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
    )
    return _model([helper.make_node("Loop", ["", "", "x"], ["y"], body=body)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])


def allocation_bomb_model() -> onnx.ModelProto:
    """ConstantOfShape of 2^40 floats: 4 TiB."""
    shape = numpy_helper.from_array(np.array([1 << 40], np.int64), "s")
    return _model([helper.make_node("ConstantOfShape", ["s"], ["c"]), helper.make_node("Add", ["c", "x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1 << 40])], [shape])


X = np.array([[-1, 2, 3], [4, -5, 6]], np.float32)


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as not reaped, so as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sessions_share_one_worker_across_calls():
    first, second = runtime.Session(relu_model()), runtime.Session(relu_model())
    pid = runtime.worker_pid()
    for _ in range(3):
        np.testing.assert_array_equal(first.run(None, {"x": X})[0], np.maximum(X, 0))
        np.testing.assert_array_equal(second.run(["y"], {"x": X})[0], np.maximum(X, 0))
    assert runtime.worker_pid() == pid and pid is not None
    assert first.input_names == ["x"] and first.output_names == ["y"]


def test_outputs_are_what_onnxruntime_gives_in_process():
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal([8, 3, 3, 3]).astype(np.float32), "w")
    model = _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Softmax", ["c"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [weight])
    feed = {"x": rng.standard_normal([1, 3, 16, 16]).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)
    actual = runtime.Session(model).run(None, feed)
    np.testing.assert_array_equal(actual[0], expected[0])
    assert actual[0].flags.writeable  # like onnxruntime's own outputs


def test_large_tensors_travel_intact():
    big = np.random.default_rng(1).standard_normal([4, 1 << 20]).astype(np.float32)  # 16 MiB
    model = _model([helper.make_node("Identity", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(big.shape))],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(big.shape))])
    np.testing.assert_array_equal(runtime.Session(model).run(None, {"x": big})[0], big)


def test_outputs_kept_are_not_overwritten_by_later_replies():
    # Large replies come through reused shared memory: a region is written again only once
    # every array of the reply it held is gone.
    shape = [1 << 19]  # 2 MiB of float32
    model = _model([helper.make_node("Identity", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    session = runtime.Session(model)
    kept = [session.run(None, {"x": np.full(shape, index, np.float32)})[0] for index in range(6)]
    for _ in range(6):
        session.run(None, {"x": np.full(shape, -1, np.float32)})  # dropped at once: its region is reused
    for index, output in enumerate(kept):
        assert output.flags.writeable and (output == index).all()
    output[:] = 7  # writable, and private to this reply
    assert (session.run(None, {"x": np.zeros(shape, np.float32)})[0] == 0).all()


def test_defaults_stay_in_the_worker_and_a_feed_overrides_them():
    model = _model([helper.make_node("Add", ["x", "b"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    session = runtime.Session(model, defaults={"b": np.ones(3, np.float32)})
    np.testing.assert_array_equal(session.run(None, {"x": X})[0], X + 1)
    np.testing.assert_array_equal(session.run(None, {"x": X, "b": np.full(3, 2, np.float32)})[0], X + 2)


def test_a_crash_is_typed_and_the_next_call_gets_a_new_worker():
    survivor = runtime.Session(relu_model())
    before = runtime.worker_pid()
    crashing = runtime.Session(divide_model(), label="original model")
    with pytest.raises(RuntimeCrash, match=r"crashed running the original model \(SIGFPE"):
        crashing.run(None, {"x": np.array([INT64_MIN], np.int64)})
    assert RuntimeCrash.exit_code == 2
    assert runtime.worker_pid() is None and not _alive(before)  # reaped: no zombie
    # Sessions of the dead worker reload themselves in the new one.
    np.testing.assert_array_equal(survivor.run(None, {"x": X})[0], np.maximum(X, 0))
    np.testing.assert_array_equal(crashing.run(None, {"x": np.array([6], np.int64)})[0], [-6])
    assert runtime.worker_pid() not in (None, before)


def test_a_run_over_the_time_limit_is_stopped(monkeypatch):
    monkeypatch.setenv(runtime.TIME_LIMIT_VARIABLE, "1")
    session = runtime.Session(endless_loop_model(), label="original model")
    pid = runtime.worker_pid()
    started = time.monotonic()
    with pytest.raises(RuntimeTimeout, match=r"did not finish running the original model within 1 s"):
        session.run(None, {"x": np.ones(1, np.float32)})
    assert time.monotonic() - started < 5
    assert not _alive(pid)
    np.testing.assert_array_equal(runtime.Session(relu_model()).run(None, {"x": X})[0], np.maximum(X, 0))


def test_an_allocation_bomb_is_out_of_memory():
    session = runtime.Session(allocation_bomb_model(), label="original model")
    with pytest.raises(RuntimeOutOfMemory, match=r"ran out of memory running the original model .*4\.0 TiB"):
        session.run(None, {"x": np.ones(1, np.float32)})


def test_the_memory_limit_holds_and_threads_still_run(monkeypatch):
    monkeypatch.setenv(runtime.MEMORY_LIMIT_VARIABLE, "1G")
    try:
        # 256 MiB of output fits (onnxruntime's thread pool and arena work under the limit)...
        model = _model([helper.make_node("ConstantOfShape", ["s"], ["y"])],
                       [helper.make_tensor_value_info("s", TensorProto.INT64, [1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        session = runtime.Session(model, threads=2)
        assert session.run(None, {"s": np.array([1 << 26], np.int64)})[0].shape == (1 << 26,)
        # ...and 2 GiB does not, although the machine has it.
        with pytest.raises(RuntimeOutOfMemory, match="limit 1.0 GiB"):
            session.run(None, {"s": np.array([1 << 29], np.int64)})
    finally:
        runtime.shutdown()  # the next test's worker gets the default limit


def test_a_model_onnxruntime_rejects_is_verification_unavailable():
    model = _model([helper.make_node("Mystery", ["x"], ["y"], domain="com.example")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(VerificationUnavailable, match="onnxruntime cannot load the model to test: ") as caught:
        runtime.Session(model, label="model to test")
    assert type(caught.value) is VerificationUnavailable
    assert "Mystery" in str(caught.value.__cause__)  # onnxruntime's own text, as in process


def test_bad_limits_are_our_error(monkeypatch):
    monkeypatch.setenv(runtime.TIME_LIMIT_VARIABLE, "soon")
    with pytest.raises(WorkerFailure, match="ONNXSLIM_RUN_TIMEOUT"):
        runtime.Session(relu_model())


def test_ctrl_c_while_waiting_kills_the_worker_at_once():
    session = runtime.Session(endless_loop_model())
    pid = runtime.worker_pid()
    main = threading.get_ident()
    timer = threading.Timer(0.5, signal.pthread_kill, args=(main, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        session.run(None, {"x": np.ones(1, np.float32)})
    timer.join()
    assert time.monotonic() - started < 2
    assert not _alive(pid) and runtime.worker_pid() is None


def test_the_worker_dies_with_its_parent(tmp_path):
    script = (
        "import sys\n"
        "from onnxslim import runtime\n"
        "runtime.start()\n"
        "print(runtime.worker_pid(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert _alive(pid)
    parent.kill()  # no atexit, no cleanup: only the lifeline tells the worker
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Whether `pid` runs (an orphan's zombie is its new parent's to reap, not ours)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
