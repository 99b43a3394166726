"""Hostile calibration data (issue 17): NaN, Inf, huge, denormal and zero-width samples are refused
in one line naming the first bad file, or give a written, finite, valid model; activations the model
itself overflows do not poison calibration; a NaN fidelity figure fails every threshold, and lossy
verification judges the finite values when both models give NaN, and fails NaN where the reference
is finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import ModelBuilder

from onnxslim.verify import FidelityBudget, FidelityPool, Verifier
from hostile.common import _digests, _run_cli


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
