"""Differential fuzzer: random valid ONNX models, optimized by onnxslim, compared in onnxruntime.

    python tools/fuzz.py --minutes 60 --jobs 2            # the lossless pipeline
    python tools/fuzz.py --minutes 10 --quantize int8     # the lossy paths: invalid, crash, hang, NaN
    python tools/fuzz.py --minutes 10 --prune 0.3

Each case is a model from tools/fuzz_graphs.py (hypothesis strategies). The oracle runs it in a
forked child with a time limit, so a segfault, SIGFPE or hang in onnxruntime or onnxslim is a
class, never the fuzzer's death:
  ok        the optimized model computes what the original computes (at both sizes of N); where
            onnxruntime's results differ but onnx.reference says the two models agree, also ok
            (counted as "reference-decided")
  wrong     different outputs, or onnxruntime fails on the optimized model where the original ran
            (with its graph optimizations off, or on as users run it)
  invalid   the optimized model fails onnx.checker's full check, or onnxruntime cannot load it
  crash     onnxslim raised something other than a clean refusal, or its process died
  refused   onnxslim refused (exit code 2) a valid model that onnxruntime runs, or did not refuse
            one that never returns (feature endless-loop: exit 2 is right)
  timeout   onnxslim (or the optimized model) did not finish within the time limit
  unstable  lossless mode: the optimized model, ok, optimized again (verification off) comes out
            different: the pipeline is not a fixed point
  fidelity-nan   lossy modes: the optimized model gives NaN where the original is finite
In the lossy modes an exit 2 is ok ("refused as expected") where the calibration samples leave
nothing to measure: none is finite (feature nonfinite-calibration), or the original itself computes
NaN/Inf on one that is.
A generated model that fails the checker or onnxruntime itself is "skipped" (a generator bug:
there should be none). Lossy modes count invalid, crash, refused, timeout and fidelity-nan only.

Each failure is shrunk by hypothesis and saved under .cache/fuzz/ as NAME.onnx plus NAME.py, a
pytest case to paste. Exit code: 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import faulthandler
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import resource
import select
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = REPO / ".cache" / "fuzz"


# tools/ is not a package and not installed: its siblings import by name, as the other tools' do.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import fuzz_graphs  # noqa: E402 — needs HERE on sys.path

FAILURES = ("wrong", "invalid", "crash", "refused", "timeout", "fidelity-nan", "unstable")
CLASSES = ("ok",) + FAILURES + ("skipped",)
# Per-dtype tolerance on float outputs, relative to the output's largest finite magnitude (at least 1):
# rewrites reassociate (a fused BatchNormalization rounds once where the original rounded twice).
TOLERANCE = {"float16": 2e-2, "float32": 1e-4, "float64": 1e-9}
CASE_SECONDS = 30.0
# onnxruntime's time limit for a model that never returns (endless-loop): a few of them fit in a case.
ENDLESS_RUN_SECONDS = 4


@dataclasses.dataclass
class Outcome:
    kind: str  # one of CLASSES
    stage: str = ""  # where it happened: check-original, run-original, optimize, check-optimized, ...
    detail: str = ""
    reference_decided: bool = False
    expected_refusal: bool = False  # lossy modes: exit 2 where the calibration data leaves nothing to measure
    fired: tuple = ()  # the passes that changed something: whether the generator reaches them

    def line(self) -> str:
        return f"{self.kind} at {self.stage}: {self.detail}" if self.stage else self.kind


@dataclasses.dataclass
class Mode:
    quantize: str | None = None
    prune: float | None = None

    @property
    def lossy(self) -> bool:
        return self.quantize is not None or self.prune is not None

    def label(self) -> str:
        return f"quantize-{self.quantize}" if self.quantize else (f"prune-{self.prune}" if self.prune else "lossless")


# -- the oracle (runs in a forked child) -------------------------------------------------------


def _session(model: onnx.ModelProto, deployed: bool = False):
    """An onnxruntime session with its graph optimizations off, or (`deployed`) at their default
    level, as a user runs the model."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # its own log lines (a failing node) would flood the fuzzer's output
    options = ort.SessionOptions()
    # onnxruntime's own rewrites would hide a bad one of ours; one thread: the fuzzer runs jobs in parallel.
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if deployed
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    options.enable_mem_pattern = False  # its buffer plan from one size of N misfires at the other
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session, feeds) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def mismatch(expected: np.ndarray, actual: np.ndarray, tolerance: float | None = None) -> str | None:
    """Why `actual` is not `expected` (None when it is): dtype, shape, NaN/Inf positions, values
    within `tolerance` (default: the dtype's) times the largest finite magnitude (at least 1)."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype} instead of {expected.dtype}"
    if expected.shape != actual.shape:
        return f"shape {list(actual.shape)} instead of {list(expected.shape)}"
    if expected.dtype.kind != "f":
        differ = int(np.sum(expected != actual))
        return f"{differ} of {expected.size} elements differ" if differ else None
    wide_expected, wide_actual = expected.astype(np.float64), actual.astype(np.float64)
    nan_expected, nan_actual = np.isnan(wide_expected), np.isnan(wide_actual)
    if (nan_expected != nan_actual).any():
        return f"NaN at {int(np.sum(nan_expected != nan_actual))} other positions"
    infinite = np.isinf(wide_expected) | np.isinf(wide_actual)
    if (wide_expected[infinite] != wide_actual[infinite]).any():
        return "an infinity differs"
    finite = ~(nan_expected | infinite)
    if not finite.any():
        return None
    scale = max(1.0, float(np.abs(wide_expected[finite]).max()))
    error = float(np.abs(wide_expected[finite] - wide_actual[finite]).max())
    allowed = max(tolerance or 0.0, TOLERANCE[expected.dtype.name]) * scale
    return f"max abs difference {error:.3g} > {allowed:.3g}" if error > allowed else None


def _compare(expected: dict, actual: dict, tolerance: float | None = None) -> str | None:
    if list(expected) != list(actual):
        return f"outputs {list(actual)} instead of {list(expected)}"
    for name in expected:
        why = mismatch(expected[name], actual[name], tolerance)
        if why is not None:
            return f"output {name}: {why}"
    return None


def _reference_outputs(model: onnx.ModelProto, feeds: dict) -> dict:
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    names = [output.name for output in model.graph.output]
    return dict(zip(names, evaluator.run(None, feeds)))


def _optimize(model: onnx.ModelProto, mode: Mode, samples: list[dict], lossy: dict, report_stage):
    """onnxslim.optimize with its own verification, forced: the oracle judges the model it returns
    and also holds the verifier to account (a correct model it calls wrong is "refused", a wrong
    one it calls verified is a silent wrong result)."""
    import onnxslim

    report_stage("optimize")
    initialized = {init.name for init in model.graph.initializer}
    shapes = {}
    for value_info in model.graph.input:
        if value_info.name not in initialized:
            dims = value_info.type.tensor_type.shape.dim
            shapes[value_info.name] = [d.dim_value if d.HasField("dim_value") else fuzz_graphs.SIZES[0] for d in dims]
    kwargs = {}
    if mode.lossy:
        from onnxslim.calibration import CalibrationData
        from onnxslim.prune import PruneOptions
        from onnxslim.quantize import QuantizeOptions

        kwargs = dict(calibration=CalibrationData.from_feeds(model, samples))
        if mode.quantize:
            kwargs["quantize"] = QuantizeOptions(mode=lossy.get("quantize_mode", "auto"),
                                                         method=lossy.get("method", "auto"))
        if mode.prune:
            # check_surgery: the pruned model must equal the original with the removed channels'
            # weights zeroed, exactly; a surgery bug is a wrong model, which no fidelity figure shows.
            kwargs["prune"] = PruneOptions(ratio=mode.prune, check_surgery=True,
                                           criterion=lossy.get("criterion", "auto"),
                                           allocation=lossy.get("allocation", "sensitivity"))
    verify = onnxslim.VerifyOptions(verify_shapes=shapes, force=True)
    optimized, report = onnxslim.optimize(model, verify=verify, return_report=True, **kwargs)
    fired = {execution.name for execution in report.run.executions if execution.changed}
    # The lossy steps are no passes: say whether they did anything (the generator must reach them).
    if getattr(report, "pruning", None) is not None and report.pruning.removed_channels:
        fired.add("(pruned channels)")
    quantization = getattr(report, "quantization", None)
    if quantization is not None and any(node.op_type == "QuantizeLinear" for node in optimized.graph.node):
        fired.add("(int8 activations)")
    elif quantization is not None and quantization.mode == "weights":
        fired.add("(int8 weights only)")
    return optimized, tuple(sorted(fired)), report.verification


def check_model(model: onnx.ModelProto, mode: Mode = Mode(), input_seed: int = 0, report_stage=lambda stage: None,
                lossy: dict | None = None) -> Outcome:
    """The oracle, in this process: classify what onnxslim does to `model` (see the module docstring).
    `lossy`: the lossy modes' options (fuzz_graphs.Case.lossy): which calibration samples hold
    NaN/Inf (fuzz_graphs.calibration_feeds), the quantization mode and method, the pruning
    criterion and allocation."""
    lossy = lossy or {}
    import onnxslim

    stage = "check-original"
    report_stage(stage)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return Outcome("skipped", stage, _first_line(error))
    if fuzz_graphs.never_ends(model):
        return _check_endless(model, mode, report_stage)
    stage = "run-original"
    report_stage(stage)
    try:
        session = _session(model)
        feeds = {size: fuzz_graphs.make_feeds(model, size, input_seed) for size in fuzz_graphs.SIZES}
        expected = {size: _run(session, feeds[size]) for size in fuzz_graphs.SIZES}
    except Exception as error:  # onnxruntime's errors are untyped: any failure means the generator erred
        return Outcome("skipped", stage, _first_line(error))

    samples = fuzz_graphs.calibration_feeds(model, lossy.get("calibration", "finite"), input_seed) if mode.lossy else []
    try:
        optimized, fired, verification = _optimize(model, mode, samples, lossy, report_stage)
    except onnxslim.VerificationError as error:  # forced: only the checker's verdict, or pruning's surgery check
        kind = "wrong" if "surgery" in str(error) else "invalid"
        return Outcome(kind, "optimize", _first_line(error))
    except onnxslim.OnnxSlimError as error:
        line = f"{type(error).__name__} (exit {error.exit_code}): {_first_line(error)}"
        nonfinite = any(word in line for word in ("NaN", "infinit", "finite"))
        if error.exit_code == 2 and mode.lossy and nonfinite and _nothing_to_calibrate_on(session, samples):
            return Outcome("ok", "optimize", line, expected_refusal=True)
        if error.exit_code == 2 and "crashed running the original model" in line:
            # onnxslim's own inputs take a path of the original that kills onnxruntime (an If branch
            # dividing INT64_MIN by -1 that the fuzzer's inputs do not take): the model cannot be
            # verified as it is, and one line with exit 2 is the contract.
            return Outcome("ok", "optimize", line, expected_refusal=True)
        return Outcome("refused" if error.exit_code == 2 else "crash", "optimize", line)
    except Exception as error:  # everything else is our bug: the class being looked for
        return Outcome("crash", "optimize", f"{type(error).__name__}: {_first_line(error)} [{_where(error)}]")

    stage = "check-optimized"
    report_stage(stage)
    try:
        onnx.checker.check_model(optimized, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return Outcome("invalid", stage, _first_line(error))
    stage = "load-optimized"
    report_stage(stage)
    try:
        candidate = _session(optimized)
    except Exception as error:
        return Outcome("invalid", stage, _first_line(error))
    changed = _interface_change(model, optimized)
    if changed is not None:
        return Outcome("wrong", "interface", changed, fired=fired)
    stage = "run-optimized"
    report_stage(stage)
    actual = {}
    for size in fuzz_graphs.SIZES:
        try:
            actual[size] = _run(candidate, feeds[size])
        except Exception as error:
            return Outcome("wrong", stage, f"N={size}: onnxruntime fails where the original ran: {_first_line(error)}")
    deployed = _runs_deployed(model, optimized, feeds, actual, report_stage)
    if deployed is not None:
        return Outcome("wrong", "run-deployed", deployed, fired=fired)
    outcome = _judge_lossy(expected, actual) if mode.lossy else _judge(model, optimized, feeds, expected, actual, report_stage)
    outcome.fired = fired
    if mode.lossy or verification is None:
        return outcome
    if outcome.kind == "ok" and not verification.passed:
        return Outcome("refused", "verify", f"onnxslim's verification fails a correct model: {verification.message}",
                       fired=fired)
    if outcome.kind == "wrong" and verification.passed:
        outcome.detail += " (and onnxslim's verification passed it)"
    if outcome.kind == "ok":
        report_stage("optimize-again")
        unstable = _optimized_again(optimized)
        if unstable is not None:
            return Outcome(*unstable, fired=fired)
    return outcome


def _optimized_again(optimized: onnx.ModelProto) -> tuple[str, str, str] | None:
    """The default pipeline is a fixed point: its output, optimized again, is the same bytes.
    Verification is off (the first run's output was just judged); a difference is "unstable",
    and onnxslim failing on its own output is a crash."""
    import onnxslim
    from onnxslim.graph import count_nodes

    try:
        again = onnxslim.optimize(optimized, verify=False)
    except Exception as error:  # onnxslim refusing or failing on its own output is our bug either way
        return "crash", "optimize-again", f"{type(error).__name__}: {_first_line(error)} [{_where(error)}]"
    if again.SerializeToString() == optimized.SerializeToString():
        return None
    before, after = count_nodes(optimized), count_nodes(again)
    if before != after:
        return "unstable", "optimize-again", f"optimizing the output again: {before} -> {after} nodes"
    return "unstable", "optimize-again", f"optimizing the output again: {_first_difference(optimized, again)}"


def _first_difference(first: onnx.ModelProto, second: onnx.ModelProto) -> str:
    """Where two models of as many nodes differ first: a node, an initializer, a value_info, else elsewhere."""
    for kind, old, new in (("node", first.graph.node, second.graph.node),
                           ("initializer", first.graph.initializer, second.graph.initializer),
                           ("value_info", first.graph.value_info, second.graph.value_info),
                           ("output", first.graph.output, second.graph.output)):
        if len(old) != len(new):
            return f"{len(old)} -> {len(new)} {kind}s"
        for index, (a, b) in enumerate(zip(old, new)):
            if a != b:
                what = getattr(a, "op_type", "") or getattr(a, "name", "")
                return f"{kind} {index} ({what}) differs"
    return "the same graph, other bytes (opset, metadata or a body)"


def _check_endless(model: onnx.ModelProto, mode: Mode, report_stage) -> Outcome:
    """A model that never returns (a Loop without end) cannot be verified: onnxslim must say so,
    exit 2, within the time limit (a hang is "timeout", the class being looked for)."""
    import onnxslim
    from onnxslim.runtime import TIME_LIMIT_VARIABLE

    # The worker's time limit, well inside the case's: a fold tried whole and then node by node,
    # and the reference run, must each end before the case is called a hang.
    previous = os.environ.get(TIME_LIMIT_VARIABLE)
    os.environ[TIME_LIMIT_VARIABLE] = str(ENDLESS_RUN_SECONDS)
    try:
        _, fired, verification = _optimize(model, mode, fuzz_graphs.calibration_feeds(model) if mode.lossy else [], {},
                                           report_stage)
    except onnxslim.OnnxSlimError as error:
        line = f"{type(error).__name__} (exit {error.exit_code}): {_first_line(error)}"
        return Outcome("ok", "optimize", line, expected_refusal=True) if error.exit_code == 2 else \
            Outcome("crash", "optimize", line)
    except Exception as error:
        return Outcome("crash", "optimize", f"{type(error).__name__}: {_first_line(error)} [{_where(error)}]")
    finally:
        if previous is None:
            os.environ.pop(TIME_LIMIT_VARIABLE, None)
        else:
            os.environ[TIME_LIMIT_VARIABLE] = previous
    if verification is not None and verification.passed:
        return Outcome("wrong", "verify", "a model that never returns was verified", fired=fired)
    return Outcome("refused", "optimize", "a model that never returns was not refused", fired=fired)


def _runs_deployed(model, optimized, feeds: dict, actual: dict, report_stage) -> str | None:
    """Why the optimized model fails under onnxruntime's own optimizations where the original runs
    (None when it runs, with the shapes and types it gives without them). Users run models that
    way: a fusion that meets a shape onnxslim declared wrongly (a Gemm's input reshape built from a
    baked-in dim) fails only there. Values are not compared: onnxruntime's fusions round differently.

    Both sessions run in onnxslim's onnxruntime worker, not in the case server: onnxruntime's own
    optimizer can die of a signal on the original (SIGFPE folding Div(INT64_MIN, -1)), and that
    must come back as "the original fails too", not take the oracle down with it."""
    from onnxslim.runtime import Session

    report_stage("run-deployed")
    try:
        original = Session(model, label="the original", optimized=True, threads=1)
        for size in fuzz_graphs.SIZES:
            original.run(None, feeds[size])
    except Exception:  # onnxruntime's optimizer fails the original too: not onnxslim's doing
        return None
    try:
        candidate = Session(optimized, label="the optimized model", optimized=True, threads=1)
        for size in fuzz_graphs.SIZES:
            got = dict(zip(candidate.output_names, candidate.run(None, feeds[size])))
            for name, value in actual[size].items():
                if name in got and (got[name].shape, got[name].dtype) != (value.shape, value.dtype):
                    return (f"N={size}: output {name} is {got[name].dtype}{list(got[name].shape)} with onnxruntime's "
                            f"optimizations, {value.dtype}{list(value.shape)} without")
    except Exception as error:
        return f"N={size}: onnxruntime fails on it with its optimizations on, where the original runs: {_first_line(error)}"
    return None


def _nothing_to_calibrate_on(session, samples: list[dict]) -> bool:
    """Whether a lossy mode's refusal (exit 2) is the right answer: no calibration sample is finite,
    or the original itself computes NaN/Inf on one that is (no fidelity can be measured there)."""
    finite = [sample for sample in samples
              if all(array.dtype.kind != "f" or np.isfinite(array).all() for array in sample.values())]
    if not finite:
        return True
    for sample in finite:
        for value in _run(session, sample).values():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                return True
    return False


def _interface_change(original: onnx.ModelProto, optimized: onnx.ModelProto) -> str | None:
    """The model's inputs and outputs never change: names, element types and ranks."""
    def interface(model):
        return [(info.name, info.type.tensor_type.elem_type, len(info.type.tensor_type.shape.dim))
                for info in model.graph.input], [
                (info.name, info.type.tensor_type.elem_type, len(info.type.tensor_type.shape.dim))
                for info in model.graph.output]
    (inputs, outputs), (new_inputs, new_outputs) = interface(original), interface(optimized)
    if inputs != new_inputs:
        return f"inputs {[i[0] for i in new_inputs]} instead of {[i[0] for i in inputs]}" if [
            i[0] for i in inputs] != [i[0] for i in new_inputs] else "an input's type or rank changed"
    if outputs != new_outputs:
        return "an output's name, type or rank changed"
    return None


def coarsest_float(model: onnx.ModelProto) -> str:
    """The least precise float type the model computes in: a float64 output computed in float32
    carries float32's rounding, so it gets float32's tolerance."""
    elem_types = {init.data_type for init in model.graph.initializer}
    elem_types |= {info.type.tensor_type.elem_type for info in [*model.graph.input, *model.graph.output]}
    for node in _all_nodes(model.graph):
        elem_types |= {attribute.i for attribute in node.attribute if attribute.name == "to"}
        if node.op_type == "ConstantOfShape":
            elem_types.add(onnx.TensorProto.FLOAT)
    for name, elem in (("float16", onnx.TensorProto.FLOAT16), ("float32", onnx.TensorProto.FLOAT)):
        if elem in elem_types:
            return name
    return "float64"


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _all_nodes(attribute.g)


def _judge(model, optimized, feeds, expected, actual, report_stage) -> Outcome:
    tolerance = TOLERANCE[coarsest_float(model)]
    for size in fuzz_graphs.SIZES:
        why = _compare(expected[size], actual[size], tolerance)
        if why is None:
            continue
        report_stage("reference")
        try:
            agreed = _compare(_reference_outputs(model, feeds[size]), _reference_outputs(optimized, feeds[size]), tolerance)
        except Exception as error:  # the reference evaluator lacks some kernels: onnxruntime's verdict stands
            return Outcome("wrong", "compare", f"N={size}: {why} (onnx.reference could not decide: {_first_line(error)})")
        if agreed is not None:
            return Outcome("wrong", "compare", f"N={size}: {why}; onnx.reference agrees they differ: {agreed}")
        return Outcome("ok", "compare", f"N={size}: onnxruntime: {why}; onnx.reference: the same", reference_decided=True)
    return Outcome("ok")


def _judge_lossy(expected: dict, actual: dict) -> Outcome:
    for size in expected:
        if list(expected[size]) != list(actual[size]):
            return Outcome("wrong", "compare", f"outputs {list(actual[size])} instead of {list(expected[size])}")
        for name, value in expected[size].items():
            got = actual[size][name]
            if value.shape != got.shape or value.dtype != got.dtype:
                return Outcome("wrong", "compare", f"N={size}: output {name}: {mismatch(value, got)}")
            if value.dtype.kind == "f" and (np.isnan(got) & ~np.isnan(value)).any():
                return Outcome("fidelity-nan", "compare", f"N={size}: output {name} is NaN where the original is not")
    return Outcome("ok")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if "site-packages" not in frame.filename] or frames
    frame = ours[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


# -- isolation: cases run in a forked case server ---------------------------------------------


def preload() -> None:
    """Import what every child needs once, in the parent: a child that imports onnxruntime and
    onnxslim itself spends half a second on it, twenty times a small case's work."""
    import onnx.reference  # noqa: F401
    import onnxruntime  # noqa: F401

    import onnxslim  # noqa: F401


def isolated(function, *args, timeout: float = CASE_SECONDS):
    """function(*args, report_stage=...) in a forked child: (result, None), or (None, Outcome) when the
    child died or ran out of time (the Outcome says at which stage).

    The child is a case server (CaseServer) that runs one case after another until one kills it or
    runs out of time; then the next case gets a new one. Forked, not spawned: it inherits onnx,
    onnxslim and onnxruntime already imported. Kept across cases: onnxslim's onnxruntime worker,
    which each new process would start anew (a third of a second, more than a small case's work),
    lives as long as the server does.
    """
    global _server
    for attempt in range(2):
        if _server is None or _server.owner != os.getpid():
            _server = CaseServer()
        try:
            _server.send((function, args))
            break
        except BrokenPipeError:  # the server died between cases: a new one takes the case
            _server.kill()
            _server = None
            if attempt:
                raise
    server = _server
    stage, result, error, finished = "start", None, None, False
    deadline = time.monotonic() + timeout
    while not finished:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            server.kill()
            _server = None
            return None, Outcome("timeout", stage, f"no result within {timeout:g} s")
        message = server.receive(remaining)
        if message is None:
            continue
        if message is EOFError:  # it died: how is the outcome
            status = server.reap()
            _server = None
            if os.WIFSIGNALED(status):
                name = signal.Signals(os.WTERMSIG(status)).name
                return None, Outcome("crash", stage, f"the process died of {name}")
            return None, Outcome("crash", stage, f"the process exited with status {os.WEXITSTATUS(status)}")
        kind, payload = message
        if kind == "stage":
            stage = payload
        elif kind == "result":
            result, finished = payload, True
        else:
            error, finished = payload, True
    if error is not None:
        return None, Outcome("crash", stage, f"the oracle raised {error}")
    return result, None


_server: CaseServer | None = None


class CaseServer:
    """A forked child that runs the cases `isolated` sends it, one after another, and reports each
    one's stages and result through a pipe (4-byte length, then a pickle)."""

    def __init__(self):
        preload()
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(request_write)
            os.close(reply_read)
            _serve(request_read, reply_write)  # never returns
        os.close(request_read)
        os.close(reply_write)
        self.owner, self.pid = os.getpid(), pid
        self.requests = request_write
        self.replies = os.fdopen(reply_read, "rb", buffering=0)
        self.buffer = b""

    def send(self, message) -> None:
        data = pickle.dumps(message)
        view = memoryview(len(data).to_bytes(4, "little") + data)
        while view:
            view = view[os.write(self.requests, view):]

    def receive(self, timeout: float):
        """The next message; None if none came within `timeout`; EOFError (the class) if the server is gone."""
        while True:
            if len(self.buffer) >= 4 and len(self.buffer) >= 4 + int.from_bytes(self.buffer[:4], "little"):
                size = int.from_bytes(self.buffer[:4], "little")
                message = pickle.loads(self.buffer[4:4 + size])
                self.buffer = self.buffer[4 + size:]
                return message
            ready, _, _ = select.select([self.replies], [], [], timeout)
            if not ready:
                return None
            chunk = self.replies.read(1 << 16)
            if not chunk:
                return EOFError
            self.buffer += chunk

    def reap(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self._close()
        return status

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.reap()

    def _close(self) -> None:
        for close in (lambda: os.close(self.requests), self.replies.close):
            try:
                close()
            except OSError:
                pass


def _serve(requests: int, replies: int) -> None:
    """The case server's loop: run each case, report it, until the parent closes the pipe."""
    # A SIGFPE or SIGSEGV is a result here: no core dump of a few hundred MB for each.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    faulthandler.disable()  # pytest's would print every crash's stack; the parent reports it
    # Warnings (random calibration) and onnxruntime's own prints, once per case, would bury the
    # fuzzer's output; what matters comes back through the pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)

    def report_stage(stage):
        _send(replies, ("stage", stage))

    with os.fdopen(requests, "rb") as pipe:
        while True:
            head = pipe.read(4)
            if len(head) < 4:
                os._exit(0)
            data = pipe.read(int.from_bytes(head, "little"))
            try:
                function, args = pickle.loads(data)
                result = function(*args, report_stage=report_stage)
                _send(replies, ("result", result))
            except BaseException as error:  # reported to the parent, which classifies it
                _send(replies, ("error", f"{type(error).__name__}: {_first_line(error)} [{_where(error)}]"))


def _send(fd: int, message) -> None:
    data = pickle.dumps(message)
    os.write(fd, len(data).to_bytes(4, "little") + data)


def run_case(model: onnx.ModelProto, mode: Mode = Mode(), input_seed: int = 0, timeout: float = CASE_SECONDS,
             lossy: dict | None = None) -> Outcome:
    """check_model in a forked child. A death or hang while the original runs is the generator's
    fault (skipped); anywhere after, it is onnxslim's or its output's."""
    outcome, failure = isolated(_check_in_child, model.SerializeToString(), mode, input_seed, lossy, timeout=timeout)
    if failure is None:
        return outcome
    if failure.stage in ("start", "check-original", "run-original"):
        return Outcome("skipped", failure.stage, failure.detail)
    return failure


def _check_in_child(model_bytes: bytes, mode: Mode, input_seed: int, lossy: dict | None, report_stage) -> Outcome:
    return check_model(onnx.load_from_string(model_bytes), mode, input_seed, report_stage, lossy)


# -- onnxruntime's CPU kernels -----------------------------------------------------------------


def supported_kernels() -> dict[str, dict[str, list[str]]]:
    """Per opset and op, the dtypes onnxruntime's CPU provider loads (probed once, cached per version)."""
    import onnxruntime

    path = CACHE / f"kernels-onnx{onnx.__version__}-ort{onnxruntime.__version__}.json"
    if path.exists():
        return json.loads(path.read_text())
    kernels, failure = isolated(_probe_kernels, timeout=120)
    if failure is not None:
        raise RuntimeError(f"probing onnxruntime's kernels failed: {failure.line()}")
    CACHE.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(kernels, indent=1, sort_keys=True))
    os.replace(temporary, path)
    return kernels


def _probe_kernels(report_stage) -> dict[str, dict[str, list[str]]]:
    kernels: dict[str, dict[str, list[str]]] = {}
    for opset in fuzz_graphs.OPSETS:
        found = kernels.setdefault(str(opset), {})
        for op, dtype, model in fuzz_graphs.kernel_probe_models(opset):
            found.setdefault(op, [])
            try:
                _session(model)
            except Exception:  # NOT_IMPLEMENTED: no kernel for this type at this opset
                continue
            found[op].append(dtype)
    return kernels


# -- hypothesis: generate, check, shrink -------------------------------------------------------


class CaseFailed(Exception):
    """Raised inside a hypothesis test so it shrinks the case; one subclass per class (see FAILURE_TYPES)."""


# Failures whose fix is another change's: the CI profile (tests/test_fuzz.py) tolerates an outcome
# whose detail contains one of these; delete an entry when its fix lands. tools/fuzz.py reports them.
KNOWN_OPEN_SIGNATURES: dict[str, str] = {}

FAILURE_TYPES = {kind: type(f"Fuzz_{kind.replace('-', '_')}", (CaseFailed,), {}) for kind in FAILURES}


def failure_repr(outcome: Outcome) -> str:
    return outcome.line()


def search(seed: int, examples: int, mode: Mode, features, kernels, on_outcome, shrink_budget: int = 300,
           database=None, derandomize: bool = False, deadline_at: float | None = None):
    """One hypothesis run of `examples` cases. Calls on_outcome(case, outcome) for every case it
    generates (not for shrink steps) and returns {kind: (case, outcome)} of the shrunk failures."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, seed as hypothesis_seed, settings

    strategy = fuzz_graphs.models(features=features, kernels=kernels, lossy=mode.lossy)
    best: dict[str, tuple] = {}
    state = {"shrinking": 0}

    @settings(max_examples=examples, deadline=None, database=database, derandomize=derandomize,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck), print_blob=False,
              report_multiple_bugs=True, verbosity=Verbosity.quiet)
    @given(case=strategy)
    def fuzz(case):
        model_bytes = case.model.SerializeToString()
        if best:
            state["shrinking"] += 1
            # Past the budget only the best repro so far still fails: hypothesis stops shrinking
            # (and its final replay of that repro fails as before).
            if state["shrinking"] > shrink_budget and all(model_bytes != seen[2] for seen in best.values()):
                return
        elif deadline_at is not None and time.monotonic() > deadline_at:
            return
        outcome = run_case(case.model, mode, case.input_seed, lossy=case.lossy)
        if not best:
            on_outcome(case, outcome)
        if outcome.kind in FAILURES:
            best[outcome.kind] = (case, outcome, model_bytes)
            raise FAILURE_TYPES[outcome.kind](outcome.line())

    if not derandomize:
        fuzz = hypothesis_seed(seed)(fuzz)
    try:
        fuzz()
    except (CaseFailed, BaseExceptionGroup):
        pass
    return {kind: (case, outcome) for kind, (case, outcome, _) in best.items()}


# -- saving a repro ----------------------------------------------------------------------------


def save_repro(case, outcome: Outcome, mode: Mode, folder: Path = CACHE) -> Path:
    """NAME.onnx and NAME.py (a pytest case to paste) in `folder`; returns the .onnx path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = case.model.SerializeToString()
    name = f"{mode.label()}-{outcome.kind}-{hashlib.sha256(data).hexdigest()[:10]}"
    path = folder / f"{name}.onnx"
    path.write_bytes(data)
    (folder / f"{name}.py").write_text(pytest_case(case, outcome, mode, name))
    return path


def pytest_case(case, outcome: Outcome, mode: Mode, name: str) -> str:
    """A test function that rebuilds the model (onnx's text syntax where it round-trips, else the
    serialized bytes) and asserts the oracle calls it ok."""
    text = None
    try:
        import onnx.parser
        import onnx.printer

        printed = onnx.printer.to_text(case.model)
        if onnx.parser.parse_model(printed).SerializeToString() == case.model.SerializeToString():
            text = printed
    except Exception:  # the printer or parser does not cover this model: embed its bytes instead
        text = None
    if text is not None:
        build = f"    model = onnx.parser.parse_model('''\n{text}\n''')\n"
    else:  # the bytes, with the text (floats rounded) to read
        encoded = base64.b64encode(case.model.SerializeToString()).decode()
        try:
            readable = "".join(f"    # {line}\n" for line in onnx.printer.to_text(case.model.graph).splitlines())
        except Exception:  # the printer does not cover this model; the bytes are enough
            readable = ""
        build = f"{readable}    model = onnx.load_from_string(base64.b64decode('{encoded}'))\n"
    mode_text = f"fuzz.Mode(quantize={mode.quantize!r}, prune={mode.prune!r})"
    function = name.replace("-", "_").replace(".", "_")
    return (
        "# Found by tools/fuzz.py; paste into tests/ (fuzz = tools/fuzz.py loaded by path, as tests/test_fuzz.py does).\n"
        "import base64\n\nimport onnx\nimport onnx.parser\n\n\n"
        f"def test_{function}():\n"
        f"    {outcome.line()!r}\n"
        f"{build}"
        f"    outcome = fuzz.run_case(model, {mode_text}, input_seed={case.input_seed}"
        f"{f', lossy={case.lossy!r}' if mode.lossy else ''})\n"
        "    assert outcome.kind == 'ok', outcome.line()\n"
    )


# -- the command line --------------------------------------------------------------------------


def _worker(job: int, args, kernels, features, queue) -> None:
    """One job: hypothesis runs of `chunk` cases with fresh seeds until the time is up."""
    mode = Mode(quantize=args.quantize, prune=args.prune)
    deadline = time.monotonic() + args.minutes * 60
    for run in range(10**9):
        if time.monotonic() >= deadline:
            break
        seed = args.seed * 1_000_003 + job * 10_007 + run

        def on_outcome(case, outcome):
            notes = ("reference-decided",) * outcome.reference_decided + ("refused as expected",) * outcome.expected_refusal
            queue.put(("outcome", outcome.kind, notes, outcome.line() if outcome.kind != "ok" else "", outcome.fired))

        found = search(seed, args.chunk, mode, features, kernels, on_outcome, deadline_at=deadline)
        for kind, (case, outcome) in found.items():
            path = save_repro(case, outcome, mode)
            queue.put(("repro", kind, str(path), outcome.line()))
    queue.put(("done", job))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk", type=int, default=200, help="cases per hypothesis run (fresh seed each)")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--prune", type=float, metavar="RATIO")
    parser.add_argument("--skip-feature", action="append", default=[], choices=fuzz_graphs.FEATURES,
                        help="leave a generator feature out (repeatable)")
    parser.add_argument("--skip-known", action="store_true",
                        help="leave out the features that make known open bugs fire (fuzz_graphs.KNOWN_OPEN)")
    args = parser.parse_args(argv)
    if args.prune is not None and not 0 < args.prune < 1:
        parser.error("--prune takes a ratio between 0 and 1")
    features = set(fuzz_graphs.FEATURES) - set(args.skip_feature)
    if args.skip_known:
        features -= set(fuzz_graphs.KNOWN_OPEN)
    kernels = supported_kernels()
    mode = Mode(quantize=args.quantize, prune=args.prune)
    print(f"fuzzing {mode.label()} for {args.minutes:g} min with {args.jobs} jobs, seed {args.seed}; "
          f"features: {', '.join(sorted(features)) or 'none'}", flush=True)

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_worker, args=(job, args, kernels, frozenset(features), queue), daemon=True)
               for job in range(args.jobs)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    counts = {kind: 0 for kind in CLASSES}
    decided = {"reference-decided": 0, "refused as expected": 0}
    repros = []
    details: dict[str, int] = {}
    fired: dict[str, int] = {}
    running = len(workers)
    last_print = started
    try:
        while running:
            try:
                message = queue.get(timeout=5)
            except Exception:  # queue.Empty: print progress below
                message = None
            if message is not None:
                if message[0] == "outcome":
                    counts[message[1]] += 1
                    for name in message[4]:
                        fired[name] = fired.get(name, 0) + 1
                    for note in message[2]:
                        decided[note] += 1
                    if message[1] != "ok":
                        details[message[3]] = details.get(message[3], 0) + 1
                elif message[0] == "repro":
                    repros.append(message[1:])
                    print(f"  {message[1]}: {message[3]}\n    saved {message[2]}", flush=True)
                else:
                    running -= 1
            if time.monotonic() - last_print > 30:
                last_print = time.monotonic()
                print(_summary(counts, decided, last_print - started), flush=True)
    except KeyboardInterrupt:
        for worker in workers:
            worker.terminate()
        print("interrupted", flush=True)
    for worker in workers:
        worker.join(timeout=10)
    elapsed = time.monotonic() - started
    print(_summary(counts, decided, elapsed), flush=True)
    for line, count in sorted(details.items(), key=lambda item: -item[1])[:20]:
        print(f"  {count:5d}  {line}")
    total = sum(counts.values()) or 1
    print("passes that changed the graph (share of graphs): " + ", ".join(
        f"{name} {count / total:.0%}" for name, count in sorted(fired.items(), key=lambda item: -item[1])))
    failed = sum(counts[kind] for kind in FAILURES)
    print(f"{len(repros)} shrunk repro(s) in {CACHE}" if repros else
          ("no failures" if not failed else f"{failed} failure(s), none shrunk yet"), flush=True)
    return 1 if failed else 0


def _summary(counts: dict, decided: dict[str, int], elapsed: float) -> str:
    total = sum(counts.values())
    rate = total / elapsed if elapsed else 0.0
    classes = ", ".join(f"{kind} {counts[kind]}" for kind in CLASSES if counts[kind] or kind in ("ok", "wrong"))
    notes = ", ".join(f"{note} {count}" for note, count in decided.items() if count or note == "reference-decided")
    return f"{total} graphs in {elapsed:.0f} s ({rate:.2f}/s, {rate * 3600:.0f}/h): {classes} (of which ok: {notes})"


if __name__ == "__main__":
    sys.exit(main())
