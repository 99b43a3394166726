"""The differential fuzzer's CI profile and its oracle.

About 300 random valid graphs (tools/fuzz_graphs.py) go through the default pipeline and must come
out ok: never wrong, invalid, crashed, refused or hung. A smaller lossy profile quantizes and prunes.
derandomize=True: the same graphs on every run, so CI is deterministic; tools/fuzz.py runs long with
fresh seeds. Features that make a known open bug fire (fuzz_graphs.KNOWN_OPEN) are left out here.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import HealthCheck, given, settings

from tool_loader import load_tool
from builder import ModelBuilder



fuzz = load_tool("fuzz")
fuzz_graphs = fuzz.fuzz_graphs

CI_FEATURES = frozenset(fuzz_graphs.FEATURES) - set(fuzz_graphs.KNOWN_OPEN)
PROFILE = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
               print_blob=False)


@pytest.fixture(scope="module")
def kernels():
    return fuzz.supported_kernels()


def _known_open(outcome) -> bool:
    return any(signature in outcome.detail for signature in fuzz.KNOWN_OPEN_SIGNATURES)


def _fuzz(kernels, mode, examples: int, max_blocks: int = 14) -> Counter:
    """Run `examples` generated graphs through the oracle; fails (and shrinks) on any failure class."""
    counts: Counter = Counter()

    @settings(max_examples=examples, **PROFILE)
    @given(case=fuzz_graphs.models(features=CI_FEATURES, kernels=kernels, lossy=mode.lossy, max_blocks=max_blocks))
    def check(case):
        outcome = fuzz.run_case(case.model, mode, case.input_seed, lossy=case.lossy)
        counts[outcome.kind] += 1
        if outcome.kind == "skipped" and "SIGFPE" in outcome.detail:
            counts["original-dies"] += 1  # hostile-integers: onnxruntime itself dies on the original
        if outcome.kind in fuzz.FAILURES and not _known_open(outcome):
            pytest.fail(f"{outcome.line()}; {case!r}")

    check()
    return counts


def test_lossless_profile(kernels):
    counts = _fuzz(kernels, fuzz.Mode(), examples=300)
    # The generator makes valid models: onnx.checker and onnxruntime accept (nearly) all it makes.
    # Originals that kill onnxruntime (SIGFPE on INT64_MIN / -1, feature hostile-integers) are what
    # that feature is for, not a generator error: 2-8 % of a sample, so they have a bound of their own.
    total = sum(counts[kind] for kind in fuzz.CLASSES)
    assert counts["skipped"] - counts["original-dies"] <= 0.03 * total, counts
    assert counts["original-dies"] <= 0.12 * total, counts
    assert total >= 300



def test_quantize_profile(kernels):
    counts = _fuzz(kernels, fuzz.Mode(quantize="int8"), examples=10, max_blocks=4)
    assert counts["ok"] >= 5, counts


def test_prune_profile(kernels):
    counts = _fuzz(kernels, fuzz.Mode(prune=0.3), examples=30, max_blocks=6)
    assert counts["ok"] >= 25, counts


def test_generated_models_pass_the_full_check_and_reach_the_passes(kernels):
    """The generator's promise (valid, both sizes run) and its point (the passes fire)."""
    fired: Counter = Counter()
    cases = []

    @settings(max_examples=100, **PROFILE)
    @given(case=fuzz_graphs.models(features=CI_FEATURES, kernels=kernels))
    def collect(case):
        cases.append(case)

    collect()
    for case in cases:
        onnx.checker.check_model(case.model, full_check=True)
        outcome = fuzz.run_case(case.model, fuzz.Mode(), case.input_seed)
        fired.update(outcome.fired)
    for name in ("fold-constants", "fold-shapes", "eliminate-common-subexpressions", "eliminate-noops", "fuse-reshapes",
                 "fuse-conv-affine"):
        assert fired[name] > 0, (name, fired)


# -- the oracle --------------------------------------------------------------------------------


def test_mismatch_compares_nan_and_infinity_positions_and_scales_the_tolerance():
    same = np.array([np.nan, np.inf, -0.0, 1000.0], np.float32)
    assert fuzz.mismatch(same, np.array([np.nan, np.inf, 0.0, 1000.05], np.float32)) is None  # 5e-5 of the scale
    assert "NaN" in fuzz.mismatch(same, np.array([1.0, np.inf, 0.0, 1000.0], np.float32))
    assert "infinity" in fuzz.mismatch(same, np.array([np.nan, -np.inf, 0.0, 1000.0], np.float32))
    assert "difference" in fuzz.mismatch(same, np.array([np.nan, np.inf, 0.0, 1001.0], np.float32))
    assert "shape" in fuzz.mismatch(np.zeros([1, 2]), np.zeros([2, 1]))
    assert "elements differ" in fuzz.mismatch(np.array([1, 2]), np.array([1, 3]))


def _die(signal_number, report_stage):
    report_stage("optimize")
    os.kill(os.getpid(), signal_number)


def _hang(report_stage):
    report_stage("optimize")
    time.sleep(60)


def test_a_child_that_dies_or_hangs_is_a_class_not_the_fuzzers_death():
    _, outcome = fuzz.isolated(_die, signal.SIGSEGV)
    assert (outcome.kind, outcome.stage) == ("crash", "optimize")
    assert "SIGSEGV" in outcome.detail
    started = time.monotonic()
    _, outcome = fuzz.isolated(_hang, timeout=1)
    assert (outcome.kind, outcome.stage) == ("timeout", "optimize")
    assert time.monotonic() - started < 10


def test_an_input_dropped_from_the_interface_is_wrong():
    """The oracle's interface check, on a model whose optimized copy lost an overridable input
    (fed with a value of its own, as a caller overriding the default would)."""
    b = ModelBuilder(opset=17)
    x = b.input("x", [2, 3])
    b.output(b.node("Add", [x, b.initializer("bias", np.ones([2, 3], np.float32))]))
    model = b.build()
    model.graph.input.append(onnx.helper.make_tensor_value_info("bias", onnx.TensorProto.FLOAT, [2, 3]))
    dropped = onnx.ModelProto()
    dropped.CopyFrom(model)
    del dropped.graph.input[1]
    assert "instead of" in fuzz._interface_change(model, dropped)
    assert set(fuzz_graphs.make_feeds(model, 3)) == {"x", "bias"}


def test_an_original_that_kills_onnxruntimes_own_optimizer_is_not_a_crash():
    """onnxruntime's optimizer (ORT_ENABLE_ALL) folds Div(INT64_MIN, -1) in a branch no input
    takes and dies of SIGFPE loading the original. The oracle's deployed check runs in onnxslim's
    worker, so that death says "the original fails there too", not "the oracle crashed"."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, int64[2] x) => (int64[2] y) {
            y = If (c) <
                then_branch = t () => (int64[2] a) { a = Neg (x) },
                else_branch = e () => (int64[2] b) {
                    low = Constant <value = int64 {-9223372036854775808}> ()
                    m1 = Constant <value = int64 {-1}> ()
                    q = Div (low, m1)
                    b = Add (x, q)
                }
            >
        }
    """)
    from onnxslim.errors import RuntimeCrash
    from onnxslim.runtime import Session

    with pytest.raises(RuntimeCrash, match="SIGFPE"):  # the premise: onnxruntime's optimizer dies on it
        Session(model, optimized=True)
    # Before, this took the process running it (the case server; here, pytest) down with SIGFPE.
    assert fuzz._runs_deployed(model, model, {size: {"c": np.array(True), "x": np.arange(2)}
                                              for size in fuzz_graphs.SIZES}, {}, lambda stage: None) is None


def test_a_failure_is_saved_with_a_pytest_case_that_rebuilds_it(tmp_path):
    b = ModelBuilder(opset=17)
    b.output(b.node("Relu", [b.input("x", ["N", 3])]))
    case = fuzz_graphs.Case(model=b.build())
    outcome = fuzz.Outcome("wrong", "compare", "made up")
    path = fuzz.save_repro(case, outcome, fuzz.Mode(), folder=tmp_path)
    assert onnx.load(path) == case.model
    source = path.with_suffix(".py").read_text()
    namespace = {"onnx": onnx, "fuzz": fuzz, "base64": __import__("base64")}
    exec(compile(source, str(path.with_suffix(".py")), "exec"), namespace)
    test = next(value for name, value in namespace.items() if name.startswith("test_"))
    test()  # the made-up failure is not one: the pasted case passes
