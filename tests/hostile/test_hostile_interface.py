"""The model's interface (issue 17): an input that is also an initializer stays overridable; a wrong
value_info or output declaration is not trusted; dynamic dims are verified at two sizes (dims
sharing a symbol together); sequence, map, optional and sparse types survive the round trip; 0-d,
zero-size, string and too-large-to-allocate inputs are fed or refused as they should be, and an
invalid result is never written.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from hostile.common import _model, _optimize_cli, _session


def _one_line_error(result, exit_code=2) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), result.stderr
    return lines[0]


def _overridable_model():
    """y = x * s + b, with s and b inputs that have equal defaults (ones): constants to every pass
    that forgot they are inputs (fold, CSE, dedup), and a caller may feed them."""
    ones = np.ones(4, np.float32)
    return _model(
        [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]) for name in ("x", "s", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(ones, "s"), numpy_helper.from_array(ones.copy(), "b")],
    )


def test_an_input_that_is_also_an_initializer_stays_an_input(tmp_path):
    result, destination = _optimize_cli(tmp_path, _overridable_model())
    assert result.exit_code == 0, result.output
    optimized = onnx.load(destination)
    assert [value.name for value in optimized.graph.input] == ["x", "s", "b"]
    assert {tensor.name for tensor in optimized.graph.initializer} == {"s", "b"}  # the defaults, both kept
    x = np.arange(4, dtype=np.float32)
    session = _session(optimized)
    assert np.array_equal(session.run(None, {"x": x})[0], x + 1)  # the defaults
    s, b = np.full(4, 3, np.float32), np.full(4, -2, np.float32)
    assert np.array_equal(session.run(None, {"x": x, "s": s, "b": b})[0], x * 3 - 2)  # overridden


def test_an_ir3_initializer_listed_as_input_is_still_a_constant():
    """IR 3 lists every initializer as an input; those are weights, and fold as before."""
    model = _overridable_model()
    model.ir_version = 3
    optimized = onnxslim.optimize(model)
    # s, a constant of ones, makes x * s the no-op it is (before, only the equal weights were shared)
    assert [tensor.name for tensor in optimized.graph.initializer] == ["b"]
    assert [node.op_type for node in optimized.graph.node] == ["Add"]


def test_the_inputs_given_by_an_npz_may_override_a_default(tmp_path):
    x = np.arange(4, dtype=np.float32)
    np.savez(tmp_path / "inputs.npz", x=x, b=np.full(4, 5, np.float32))
    result, _ = _optimize_cli(tmp_path, _overridable_model(), "--inputs", tmp_path / "inputs.npz")
    assert result.exit_code == 0, result.output


def _baked_batch_model():
    """x:[N,4] -> Relu -> t, declared (wrongly) [1,4]; outputs Shape(t) and Neg(t)."""
    return _model(
        [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Shape", ["t"], ["s"]),
         helper.make_node("Neg", ["t"], ["n"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("s", TensorProto.INT64, [2]), helper.make_tensor_value_info("n", TensorProto.FLOAT, ["N", 4])],
        value_info=[helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])],
    )


def test_a_wrong_value_info_does_not_bake_a_dynamic_dim_in(tmp_path):
    result, destination = _optimize_cli(tmp_path, _baked_batch_model())
    assert result.exit_code == 0, result.output
    shape, negated = _session(onnx.load(destination)).run(None, {"x": np.ones((2, 4), np.float32)})
    assert shape.tolist() == [2, 4] and negated.shape == (2, 4)


def test_a_wrong_output_declaration_is_kept_but_not_trusted():
    model = _baked_batch_model()
    model.graph.output[1].CopyFrom(helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, 4]))
    model.graph.output.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4]))
    model.graph.node.append(helper.make_node("Shape", ["n"], ["s2"]))
    model.graph.output.append(helper.make_tensor_value_info("s2", TensorProto.INT64, [2]))
    optimized = onnxslim.optimize(model)
    assert optimized.graph.output[1] == model.graph.output[1]  # the interface is as declared
    outputs = _session(optimized).run(None, {"x": np.ones((3, 4), np.float32)})
    assert outputs[0].tolist() == [3, 4] and outputs[3].tolist() == [3, 4]


def test_verification_runs_dynamic_dims_at_a_second_size():
    """A candidate with the batch baked in passes at batch 1 and fails at the second size."""
    model = _baked_batch_model()
    baked = _model(
        [helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([1, 4], np.int64))),
         helper.make_node("Neg", ["x"], ["n0"]), helper.make_node("Relu", ["n0"], ["r"]),
         helper.make_node("Neg", ["r"], ["n"])],
        list(model.graph.input), list(model.graph.output),
    )
    report = onnxslim.verify(model, baked)
    assert not report.passed and report.samples == 2
    assert any("second size: 'N' 2" in note for note in report.notes), report.notes
    assert "s:" in report.message


def test_dims_sharing_a_symbol_change_together_and_one_sample_still_gets_two_sizes():
    model = _model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    report = onnxslim.verify(model, model, samples=1)
    assert report.passed and report.samples == 2, report.notes


def test_a_dim_the_original_cannot_vary_is_named_not_skipped_silently():
    """The model declares N dynamic but only runs at N=1 (Reshape to [1,4]): the note says so."""
    model = _model(
        [helper.make_node("Reshape", ["x", "target"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array([1, 4], np.int64), "target")],
    )
    report = onnxslim.verify(model, model)
    assert report.passed
    assert any("checked at one size only: 'N' 1" in note for note in report.notes), report.notes


def test_given_inputs_say_dynamic_dims_were_checked_at_one_size():
    model = _baked_batch_model()
    report = onnxslim.verify(model, model, inputs=[{"x": np.ones((2, 4), np.float32)}])
    assert any("one size only" in note for note in report.notes), report.notes


def test_input_shape_dims_are_not_varied(tmp_path):
    result, destination = _optimize_cli(tmp_path, _baked_batch_model(), "--input-shape", "x:2,4")
    assert result.exit_code == 0, result.output
    optimized = onnx.load(destination)
    assert [dim.dim_value for dim in optimized.graph.input[0].type.tensor_type.shape.dim] == [2, 4]


def _zipmap_model():
    """skl2onnx's classifier tail: probabilities -> ZipMap -> seq(map(int64, tensor(float)))."""
    kind = helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, None)))
    return _model(
        [helper.make_node("Identity", ["x"], ["p"]), helper.make_node("Softmax", ["p"], ["probabilities"]),
         helper.make_node("ZipMap", ["probabilities"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]), helper.make_value_info("z", kind)],
        domains=[helper.make_opsetid("ai.onnx.ml", 3)],
    )


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_sequence_and_map_types_survive_optimization(tmp_path, verify):
    model = _zipmap_model()
    result, destination = _optimize_cli(tmp_path, model, *([] if verify else ["--no-verify"]))
    assert result.exit_code == 0, result.output
    optimized = onnx.load(destination)
    assert optimized.graph.output[1] == model.graph.output[1]
    onnx.checker.check_model(optimized, full_check=True)
    assert onnxslim.graph.count_nodes(optimized) == 2  # the Identity went


def test_optional_and_sparse_types_survive_the_round_trip():
    optional = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    model = _model(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Optional", ["i"], ["o"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_value_info("o", optional)],
        opset=18,
    )
    optimized = onnxslim.optimize(model)
    assert optimized.graph.output[0] == model.graph.output[0]
    sparse = [helper.make_sparse_tensor_value_info(name, TensorProto.FLOAT, [4, 4]) for name in ("sp", "y")]
    model = _model([helper.make_node("Identity", ["sp"], ["i"]), helper.make_node("Identity", ["i"], ["y"])],
                   sparse[:1], sparse[1:])
    optimized = onnxslim.optimize(model, verify=False)  # onnxruntime takes no sparse inputs
    assert optimized.graph.input[0] == sparse[0] and optimized.graph.output[0] == sparse[1]
    assert onnxslim.graph.count_nodes(optimized) == 1


_MISFIT = "test-hostile-misfit-weight"


@onnxslim.register_pass(_MISFIT, lossless=True)
def _misfit_weight(graph: gs.Graph, ctx: onnxslim.PassContext) -> onnxslim.PassResult:
    """Test only: give every 2-D MatMul weight one row more: valid to the ordinary checker, not to
    strict shape inference (the full check)."""
    changed = 0
    for node in graph.nodes:
        weight = node.inputs[1] if node.op == "MatMul" and len(node.inputs) > 1 else None
        if isinstance(weight, gs.Constant) and weight.values.ndim == 2 and weight.values.shape[0] == 4:
            weight.values = np.zeros((5, weight.values.shape[1]), weight.values.dtype)
            changed += 1
    return onnxslim.PassResult(changed=changed)


def test_an_invalid_result_is_never_written_even_without_verification(tmp_path):
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )
    result, destination = _optimize_cli(tmp_path, model, "--no-verify", "--passes", _MISFIT)
    message = _one_line_error(result, exit_code=1)
    assert "not valid ONNX" in message and not destination.exists()


def test_a_declared_zero_dim_is_fed_as_zero(tmp_path):
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [0, 4])],
    )
    result, _ = _optimize_cli(tmp_path, model, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verification"]["input_shapes"] == {"x": [0, 4]}


@pytest.mark.parametrize("elem_type", [TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8, TensorProto.UINT64, TensorProto.DOUBLE, TensorProto.FLOAT],
                          ids=lambda kind: TensorProto.DataType.Name(kind))
def test_a_scalar_input_of_any_type_is_fed_as_a_0d_array(tmp_path, elem_type):
    model = _model(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Identity", ["i"], ["y"])],
        [helper.make_tensor_value_info("x", elem_type, [])],
        [helper.make_tensor_value_info("y", elem_type, [])],
    )
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert onnxslim.graph.count_nodes(onnx.load(destination)) == 1


def test_a_string_input_asks_for_real_inputs(tmp_path):
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.STRING, [])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [])],
    )
    assert "--inputs" in _one_line_error(_optimize_cli(tmp_path, model)[0])


@pytest.mark.parametrize("options", [(), ("--verify-shape", f"x:{2**40},{2**30}"), ("--input-shape", f"x:{2**62},4")],
                          ids=["declared", "verify-shape", "input-shape"])
def test_inputs_too_large_to_allocate_say_how_many_bytes(tmp_path, options):
    declared = [2**62, 4] if not options else ["N", "M"] if options[0] == "--verify-shape" else ["N", 4]
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, declared)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, declared)],
    )
    result, destination = _optimize_cli(tmp_path, model, *options)
    message = _one_line_error(result)
    assert "bytes" in message and "would need" in message and not destination.exists()


def _third_row_model():
    """y = x[2]: runs only where N >= 3."""
    return _model([helper.make_node("Gather", ["x", "index"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                  [numpy_helper.from_array(np.array(2, np.int64), "index")])


def test_a_model_that_needs_a_larger_size_is_checked_at_one():
    """N=3 given: the second size 2 does not run, 4 does; a candidate that baked N=3 in fails there."""
    model = _third_row_model()
    report = onnxslim.verify(model, model, verify_shapes={"x": [3, 4]})
    assert report.passed and report.samples == 2
    assert any("second size: 'N' 4" in note for note in report.notes), report.notes
    baked = _model([helper.make_node("Reshape", ["x", "shape"], ["fixed"]), helper.make_node("Gather", ["fixed", "index"], ["y"])],
                   list(model.graph.input), list(model.graph.output),
                   [numpy_helper.from_array(np.array(2, np.int64), "index"), numpy_helper.from_array(np.array([3, 4], np.int64), "shape")])
    assert not onnxslim.verify(model, baked, verify_shapes={"x": [3, 4]}).passed


def test_dims_that_vary_only_together_with_a_fallback_size():
    """x:[N,4] needs N >= 3 and z:[M,4] is added to x (M = N, under another name): every dim at its
    fallback size at once is what runs."""
    model = _model([helper.make_node("Add", ["x", "z"], ["sum"]), helper.make_node("Gather", ["sum", "index"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                   [numpy_helper.from_array(np.array(2, np.int64), "index")])
    report = onnxslim.verify(model, model, verify_shapes={"x": [3, 4], "z": [3, 4]})
    assert report.passed and report.samples == 2
    assert any("second size: 'N' 4, 'M' 4" in note for note in report.notes), report.notes


def test_a_model_that_does_not_run_at_the_default_batch_says_how_to_give_one(tmp_path):
    result, destination = _optimize_cli(tmp_path, _third_row_model())
    line = _one_line_error(result)
    assert "default sizes ('N' 1)" in line and "--verify-shape x:" in line, line
    assert not destination.exists()
