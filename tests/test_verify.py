"""Verification: shape specs, input shapes, output comparison, fidelity budgets, given inputs."""

from __future__ import annotations

import importlib
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from onnxslim.verify import FidelityBudget, compare, input_shapes, parse_shape_specs, tolerance_for


def model_with_inputs(*inputs: tuple[str, list]) -> onnx.ModelProto:
    """Each input passes through an Identity; dims are ints or dim_param names (None: unknown)."""
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in inputs]
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, dims) for name, dims in inputs]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _ in inputs]
    return helper.make_model(helper.make_graph(nodes, "inputs", values, outputs), opset_imports=[helper.make_opsetid("", 17)])


def constant_output_model(values) -> onnx.ModelProto:
    """y = x * 0 + c: its output is exactly `values` whatever x is, so the metrics are known."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, len(values)])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, len(values)])
    zero = numpy_helper.from_array(np.zeros([1], np.float32), "zero")
    c = numpy_helper.from_array(np.asarray([values], np.float32), "c")
    nodes = [helper.make_node("Mul", ["x", "zero"], ["h"]), helper.make_node("Add", ["h", "c"], ["y"])]
    return helper.make_model(
        helper.make_graph(nodes, "constant_output", [x], [y], [zero, c]), opset_imports=[helper.make_opsetid("", 17)]
    )


# ----------------------------------------------------------------------------- parse_shape_specs


@pytest.mark.parametrize(
    "specs, expected",
    [
        (["x:1,3,224,224"], {"x": [1, 3, 224, 224]}),
        (["x:1x3x8x8"], {"x": [1, 3, 8, 8]}),
        (["x:1, 4", "mask:2,7"], {"x": [1, 4], "mask": [2, 7]}),
        (["scope:input:1,2"], {"scope:input": [1, 2]}),  # the last colon separates the dims
        (["x:0,4"], {"x": [0, 4]}),
        ([], {}),
        (None, {}),
    ],
)
def test_parse_shape_specs(specs, expected):
    assert parse_shape_specs(specs) == expected


@pytest.mark.parametrize("spec", ["x", "x=1,2", ":1,2", "x:a,2", "x:1.5", "x:-1,2", "x:1;2"])
def test_parse_shape_specs_rejects(spec):
    with pytest.raises(onnxslim.InputSpecError, match="NAME:1,3,224,224|negative"):
        parse_shape_specs([spec])


# ----------------------------------------------------------------------------- input_shapes


def test_static_shapes_need_nothing():
    shapes, notes = input_shapes(model_with_inputs(("x", [2, 3]), ("y", [4])))
    assert shapes == {"x": [2, 3], "y": [4]}
    assert notes == []


def test_dynamic_batch_defaults_to_one_with_a_note():
    shapes, notes = input_shapes(model_with_inputs(("x", ["batch", 3])))
    assert shapes == {"x": [1, 3]}
    assert len(notes) == 1 and "'batch'" in notes[0] and "1" in notes[0]


def test_missing_dynamic_dim_is_an_error_naming_the_dim():
    model = model_with_inputs(("image", ["N", 3, "height", 640]))
    with pytest.raises(onnxslim.InputSpecError) as raised:
        input_shapes(model)
    message = str(raised.value)
    assert "'image'" in message and "dim 2" in message and "'height'" in message
    assert "--verify-shape image:1,3,?,640" in message


def test_given_shape_wins_and_is_checked():
    model = model_with_inputs(("image", ["N", 3, "height", 640]), ("other", [2]))
    shapes, notes = input_shapes(model, {"image": [2, 3, 320, 640]})
    assert shapes == {"image": [2, 3, 320, 640], "other": [2]}
    assert notes == []
    with pytest.raises(onnxslim.InputSpecError, match="rank 4"):
        input_shapes(model, {"image": [1, 3, 320]})


def test_unknown_input_name_is_an_error():
    model = model_with_inputs(("x", [1]), ("y", [1]))
    with pytest.raises(onnxslim.InputSpecError) as raised:
        input_shapes(model, {"z": [1]})
    assert "z" in str(raised.value) and "x, y" in str(raised.value)


# ----------------------------------------------------------------------------- compare


def test_integers_compare_exactly_whatever_the_tolerance():
    reference = np.array([1, 2, 3], np.int64)
    assert compare("i", reference, reference.copy()).passed
    different = compare("i", reference, np.array([1, 2, 4], np.int64), tolerance=10.0)
    assert not different.passed
    assert different.needed_tolerance == math.inf
    assert different.max_abs == 1.0
    assert "exact" in different.problem
    assert not compare("b", np.array([True, False]), np.array([True, True])).passed
    assert tolerance_for(np.int64) is None and tolerance_for(np.float32) == 1e-3


def test_dtype_and_shape_mismatch_fail():
    reference = np.zeros([2, 3], np.float32)
    dtype = compare("y", reference, reference.astype(np.float64))
    assert not dtype.passed and "dtype" in dtype.problem
    shape = compare("y", reference, np.zeros([3, 2], np.float32))
    assert not shape.passed and "shape" in shape.problem
    scalar = compare("y", np.float32(1), np.ones([1], np.float32))
    assert not scalar.passed


def test_nan_and_infinity_must_match():
    nan = np.float32(np.nan)
    assert compare("y", np.array([1, nan], np.float32), np.array([1, nan], np.float32)).passed
    appears = compare("y", np.array([1, 2], np.float32), np.array([1, nan], np.float32))
    assert not appears.passed and appears.needed_tolerance == math.inf
    assert not compare("y", np.array([1, nan], np.float32), np.array([1, 2], np.float32)).passed
    inf = np.float32(np.inf)
    assert compare("y", np.array([inf, -inf], np.float32), np.array([inf, -inf], np.float32)).passed
    assert not compare("y", np.array([inf], np.float32), np.array([-inf], np.float32)).passed
    assert not compare("y", np.array([1e30], np.float32), np.array([inf], np.float32), tolerance=1e9).passed


def test_needed_tolerance_is_reported_and_is_the_boundary():
    reference = np.array([2.0, -4.0, 0.5], np.float32)
    candidate = np.array([2.01, -4.0, 0.5], np.float32)
    comparison = compare("y", reference, candidate)
    # |c - r| / (0.1 * scale + |r|) with scale = max(1, max |r|) = 4
    expected = (np.float64(candidate[0]) - np.float64(reference[0])) / (0.4 + 2.0)
    assert comparison.needed_tolerance == pytest.approx(expected, rel=1e-12)
    assert comparison.max_abs == pytest.approx(0.01, rel=1e-4)
    assert comparison.max_rel == pytest.approx(0.005, rel=1e-4)
    assert comparison.tolerance == 1e-3 and not comparison.passed  # default float32 tolerance
    assert "needs tolerance" in comparison.problem
    assert compare("y", reference, candidate, tolerance=expected * (1 + 1e-9)).passed
    assert not compare("y", reference, candidate, tolerance=expected * (1 - 1e-9)).passed


def test_default_float32_tolerance_boundary():
    reference = np.ones(1, np.float64)  # scale 1: needed = |d| / 1.1; float64 keeps the boundary exact
    just_under = compare("y", reference.astype(np.float32), np.float32(1 + 1.1e-3 * 0.99) * np.ones(1, np.float32))
    just_over = compare("y", reference.astype(np.float32), np.float32(1 + 1.1e-3 * 1.01) * np.ones(1, np.float32))
    assert just_under.needed_tolerance < 1e-3 < just_over.needed_tolerance
    assert just_under.passed and not just_over.passed


def test_cosine_and_sqnr_on_a_known_pair():
    comparison = compare("y", np.array([3, 4], np.float32), np.array([4, 3], np.float32), tolerance=1.0)
    assert comparison.cosine == pytest.approx(24 / 25)
    assert comparison.sqnr_db == pytest.approx(10 * math.log10(25 / 2))
    orthogonal = compare("y", np.array([1, 0], np.float32), np.array([0, 1], np.float32), tolerance=10.0)
    assert orthogonal.cosine == pytest.approx(0.0)
    assert orthogonal.sqnr_db == pytest.approx(10 * math.log10(1 / 2))
    same = compare("y", np.array([3, 4], np.float32), np.array([3, 4], np.float32))
    assert (same.cosine, same.sqnr_db, same.needed_tolerance) == (pytest.approx(1.0), math.inf, 0.0)


# ----------------------------------------------------------------------------- lossy budget


REFERENCE = constant_output_model([3.0, 4.0])
CANDIDATE = constant_output_model([4.0, 3.0])  # cosine 0.96, SQNR 10.97 dB, top-1 disagrees


def test_without_a_budget_the_lossless_check_fails():
    report = onnxslim.verify(REFERENCE, CANDIDATE)
    assert report.mode == "lossless" and not report.passed
    assert onnxslim.verify(REFERENCE, REFERENCE).passed


@pytest.mark.parametrize(
    "budget, passed",
    [
        (FidelityBudget(min_cosine=0.95), True),
        (FidelityBudget(min_cosine=0.97), False),
        (FidelityBudget(min_sqnr_db=10.9), True),
        (FidelityBudget(min_sqnr_db=11.0), False),
        (FidelityBudget(min_cosine=0.95, min_sqnr_db=10.0), True),
        (FidelityBudget(min_cosine=0.95, min_sqnr_db=12.0), False),
        (FidelityBudget(min_top1=0.5), False),
    ],
)
def test_lossy_budget(budget, passed):
    report = onnxslim.verify(REFERENCE, CANDIDATE, budget=budget)
    assert report.mode == "lossy"
    assert report.passed is passed
    (output,) = report.outputs
    assert output.cosine == pytest.approx(0.96, abs=1e-6)
    assert output.sqnr_db == pytest.approx(10 * math.log10(12.5), abs=1e-4)
    assert output.top1_agreement == 0.0
    if not passed:
        assert output.problem and "verification failed" in report.message


def test_lossy_budget_still_requires_the_same_shape():
    wider = constant_output_model([3.0, 4.0, 0.0])
    report = onnxslim.verify(REFERENCE, wider, budget=FidelityBudget(min_cosine=0.0))
    assert not report.passed


# ----------------------------------------------------------------------------- given inputs


def test_inputs_npz_with_wrong_names(tmp_path):
    np.savez(tmp_path / "inputs.npz", image=np.zeros([1, 2], np.float32))
    with pytest.raises(onnxslim.InputSpecError, match="missing x.*not inputs of the model: image"):
        onnxslim.verify(REFERENCE, REFERENCE, inputs=tmp_path / "inputs.npz")


def test_inputs_npz_with_the_right_names(tmp_path):
    np.savez(tmp_path / "inputs.npz", x=np.full([1, 2], 5, np.float32))
    report = onnxslim.verify(REFERENCE, REFERENCE, inputs=str(tmp_path / "inputs.npz"))
    assert report.passed and report.input_source == "given" and report.samples == 1


def test_inputs_file_missing_or_unreadable(tmp_path):
    with pytest.raises(onnxslim.InputSpecError, match="not found"):
        onnxslim.verify(REFERENCE, REFERENCE, inputs=tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(onnxslim.InputSpecError, match="not a readable .npz"):
        onnxslim.verify(REFERENCE, REFERENCE, inputs=tmp_path / "junk.npz")


verify_module = importlib.import_module("onnxslim.verify")  # onnxslim.verify is the function


def _fp16_floor_model(op: str = "Floor") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["t"]), helper.make_node(op, ["t"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 8])],
        [numpy_helper.from_array(np.array(3.7, np.float16), "k")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _OneStepApart(verify_module.Runner):
    """The candidate's onnxruntime run with every value one unit up: what a float16 kernel that
    rounds a Mul a step apart in another context makes of a Floor."""

    def run(self, feed):
        return {name: value + np.float16(1) for name, value in super().run(feed).items()}


@pytest.mark.parametrize("candidate_op, passes", [("Floor", True), ("Ceil", False)])
def test_onnx_reference_decides_when_onnxruntime_float16_runs_disagree(monkeypatch, candidate_op, passes):
    """onnxruntime's two float16 runs differ by a whole unit: the reference evaluator, run on both
    models, decides. The same model (Floor) passes after all, with a note saying so; a model that
    computes something else (Ceil) still fails, and the note says the evaluator agrees."""
    verifier = verify_module.Verifier(_fp16_floor_model(), samples=2, seed=0)
    monkeypatch.setattr(verify_module, "Runner", _OneStepApart)
    report = verifier.check(_fp16_floor_model(candidate_op))
    assert report.passed is passes, report
    notes = " ".join(report.notes)
    if passes:
        assert "reference evaluator computes the same for both models" in notes
    else:
        assert "reference evaluator also finds the models differ" in notes
