"""Hostile and careless inputs (issue 17): every case that once broke onnxslim's promise.

The promise: exit 0 only for a correct model, 1 only for "verification failed", 2 for bad input
(one line, no traceback), 3 for our bug, 130 when interrupted; the input file and every file it
reads are byte-identical afterwards. Each section below is one class of hostile input.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import ModelBuilder
from click.testing import CliRunner

from onnxslim.cli import cli
from onnxslim.verify import FidelityBudget, FidelityPool, Verifier


def _run_cli(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], prog_name="onnxslim")


def _digests(*paths: Path) -> dict[Path, str]:
    """sha256 of every file under the given paths (a folder: all its files)."""
    files = [file for path in paths for file in ([path] if path.is_file() else sorted(path.iterdir()))]
    return {file: hashlib.sha256(file.read_bytes()).hexdigest() for file in files}


# ----------------------------------------------------------------------------- calibration data: NaN, Inf, huge and zero-width ranges


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

import json as _json
from pathlib import Path as _Path

import numpy as _np
import onnx as _onnx
import onnx_graphsurgeon as _gs
import onnxruntime as _ort
import pytest as _pytest
from click.testing import CliRunner as _CliRunner
from onnx import TensorProto as _T, helper as _helper, numpy_helper as _numpy_helper

import onnxslim as _onnxslim
from onnxslim.cli import cli as _cli


def _model(nodes, inputs, outputs, initializers=(), value_info=(), opset=17, ir_version=8, domains=()):
    graph = _helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    model = _helper.make_model(graph, opset_imports=[_helper.make_opsetid("", opset), *domains])
    model.ir_version = ir_version
    return model


def _optimize_cli(tmp_path, model, *options):
    """Save `model`, run `onnxslim optimize` on it; returns (result, output path), and checks the
    input file is byte-identical afterwards."""
    source, destination = tmp_path / "model.onnx", tmp_path / "out.onnx"
    _onnx.save(model, source)
    before = source.read_bytes()
    result = _CliRunner().invoke(_cli, ["optimize", str(source), str(destination), *map(str, options)], prog_name="onnxslim")
    assert source.read_bytes() == before
    return result, destination


def _one_line_error(result, exit_code=2) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), result.stderr
    return lines[0]


def _session(model):
    options = _ort.SessionOptions()
    options.log_severity_level = 3
    # onnxruntime's own optimizer trusts declared output shapes (it folds Shape of an output declared [1,4])
    options.graph_optimization_level = _ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return _ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _overridable_model():
    """y = x * s + b, with s and b inputs that have equal defaults (ones): constants to every pass
    that forgot they are inputs (fold, CSE, dedup), and a caller may feed them."""
    ones = _np.ones(4, _np.float32)
    return _model(
        [_helper.make_node("Mul", ["x", "s"], ["m"]), _helper.make_node("Add", ["m", "b"], ["y"])],
        [_helper.make_tensor_value_info(name, _T.FLOAT, [4]) for name in ("x", "s", "b")],
        [_helper.make_tensor_value_info("y", _T.FLOAT, [4])],
        [_numpy_helper.from_array(ones, "s"), _numpy_helper.from_array(ones.copy(), "b")],
    )


def test_an_input_that_is_also_an_initializer_stays_an_input(tmp_path):
    result, destination = _optimize_cli(tmp_path, _overridable_model())
    assert result.exit_code == 0, result.output
    optimized = _onnx.load(destination)
    assert [value.name for value in optimized.graph.input] == ["x", "s", "b"]
    assert {tensor.name for tensor in optimized.graph.initializer} == {"s", "b"}  # the defaults, both kept
    x = _np.arange(4, dtype=_np.float32)
    session = _session(optimized)
    assert _np.array_equal(session.run(None, {"x": x})[0], x + 1)  # the defaults
    s, b = _np.full(4, 3, _np.float32), _np.full(4, -2, _np.float32)
    assert _np.array_equal(session.run(None, {"x": x, "s": s, "b": b})[0], x * 3 - 2)  # overridden


def test_an_ir3_initializer_listed_as_input_is_still_a_constant():
    """IR 3 lists every initializer as an input; those are weights, and fold as before."""
    model = _overridable_model()
    model.ir_version = 3
    optimized = _onnxslim.optimize(model)
    assert [tensor.name for tensor in optimized.graph.initializer] == ["s"]  # equal weights shared


def test_the_inputs_given_by_an_npz_may_override_a_default(tmp_path):
    x = _np.arange(4, dtype=_np.float32)
    _np.savez(tmp_path / "inputs.npz", x=x, b=_np.full(4, 5, _np.float32))
    result, _ = _optimize_cli(tmp_path, _overridable_model(), "--inputs", tmp_path / "inputs.npz")
    assert result.exit_code == 0, result.output


def _baked_batch_model():
    """x:[N,4] -> Relu -> t, declared (wrongly) [1,4]; outputs Shape(t) and Neg(t)."""
    return _model(
        [_helper.make_node("Relu", ["x"], ["t"]), _helper.make_node("Shape", ["t"], ["s"]),
         _helper.make_node("Neg", ["t"], ["n"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, ["N", 4])],
        [_helper.make_tensor_value_info("s", _T.INT64, [2]), _helper.make_tensor_value_info("n", _T.FLOAT, ["N", 4])],
        value_info=[_helper.make_tensor_value_info("t", _T.FLOAT, [1, 4])],
    )


def test_a_wrong_value_info_does_not_bake_a_dynamic_dim_in(tmp_path):
    result, destination = _optimize_cli(tmp_path, _baked_batch_model())
    assert result.exit_code == 0, result.output
    shape, negated = _session(_onnx.load(destination)).run(None, {"x": _np.ones((2, 4), _np.float32)})
    assert shape.tolist() == [2, 4] and negated.shape == (2, 4)


def test_a_wrong_output_declaration_is_kept_but_not_trusted():
    model = _baked_batch_model()
    model.graph.output[1].CopyFrom(_helper.make_tensor_value_info("n", _T.FLOAT, [1, 4]))
    model.graph.output.append(_helper.make_tensor_value_info("t", _T.FLOAT, [1, 4]))
    model.graph.node.append(_helper.make_node("Shape", ["n"], ["s2"]))
    model.graph.output.append(_helper.make_tensor_value_info("s2", _T.INT64, [2]))
    optimized = _onnxslim.optimize(model)
    assert optimized.graph.output[1] == model.graph.output[1]  # the interface is as declared
    outputs = _session(optimized).run(None, {"x": _np.ones((3, 4), _np.float32)})
    assert outputs[0].tolist() == [3, 4] and outputs[3].tolist() == [3, 4]


def test_verification_runs_dynamic_dims_at_a_second_size():
    """A candidate with the batch baked in passes at batch 1 and fails at the second size."""
    model = _baked_batch_model()
    baked = _model(
        [_helper.make_node("Constant", [], ["s"], value=_numpy_helper.from_array(_np.array([1, 4], _np.int64))),
         _helper.make_node("Neg", ["x"], ["n0"]), _helper.make_node("Relu", ["n0"], ["r"]),
         _helper.make_node("Neg", ["r"], ["n"])],
        list(model.graph.input), list(model.graph.output),
    )
    report = _onnxslim.verify(model, baked)
    assert not report.passed and report.samples == 2
    assert any("second size: 'N' 2" in note for note in report.notes), report.notes
    assert "s:" in report.message


def test_dims_sharing_a_symbol_change_together_and_one_sample_still_gets_two_sizes():
    model = _model(
        [_helper.make_node("Add", ["a", "b"], ["y"])],
        [_helper.make_tensor_value_info("a", _T.FLOAT, ["N", 4]), _helper.make_tensor_value_info("b", _T.FLOAT, ["N", 4])],
        [_helper.make_tensor_value_info("y", _T.FLOAT, ["N", 4])],
    )
    report = _onnxslim.verify(model, model, samples=1)
    assert report.passed and report.samples == 2, report.notes


def test_a_dim_the_original_cannot_vary_is_named_not_skipped_silently():
    """The model declares N dynamic but only runs at N=1 (Reshape to [1,4]): the note says so."""
    model = _model(
        [_helper.make_node("Reshape", ["x", "target"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, ["N", 4])],
        [_helper.make_tensor_value_info("y", _T.FLOAT, [1, 4])],
        [_numpy_helper.from_array(_np.array([1, 4], _np.int64), "target")],
    )
    report = _onnxslim.verify(model, model)
    assert report.passed
    assert any("checked at one size only: 'N' 1" in note for note in report.notes), report.notes


def test_given_inputs_say_dynamic_dims_were_checked_at_one_size():
    model = _baked_batch_model()
    report = _onnxslim.verify(model, model, inputs=[{"x": _np.ones((2, 4), _np.float32)}])
    assert any("one size only" in note for note in report.notes), report.notes


def test_input_shape_dims_are_not_varied(tmp_path):
    result, destination = _optimize_cli(tmp_path, _baked_batch_model(), "--input-shape", "x:2,4")
    assert result.exit_code == 0, result.output
    optimized = _onnx.load(destination)
    assert [dim.dim_value for dim in optimized.graph.input[0].type.tensor_type.shape.dim] == [2, 4]


def _zipmap_model():
    """skl2onnx's classifier tail: probabilities -> ZipMap -> seq(map(int64, tensor(float)))."""
    kind = _helper.make_sequence_type_proto(_helper.make_map_type_proto(_T.INT64, _helper.make_tensor_type_proto(_T.FLOAT, None)))
    return _model(
        [_helper.make_node("Identity", ["x"], ["p"]), _helper.make_node("Softmax", ["p"], ["probabilities"]),
         _helper.make_node("ZipMap", ["probabilities"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, ["N", 3])],
        [_helper.make_tensor_value_info("probabilities", _T.FLOAT, ["N", 3]), _helper.make_value_info("z", kind)],
        domains=[_helper.make_opsetid("ai.onnx.ml", 3)],
    )


@_pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_sequence_and_map_types_survive_optimization(tmp_path, verify):
    model = _zipmap_model()
    result, destination = _optimize_cli(tmp_path, model, *([] if verify else ["--no-verify"]))
    assert result.exit_code == 0, result.output
    optimized = _onnx.load(destination)
    assert optimized.graph.output[1] == model.graph.output[1]
    _onnx.checker.check_model(optimized, full_check=True)
    assert _onnxslim.graph.count_nodes(optimized) == 2  # the Identity went


def test_optional_and_sparse_types_survive_the_round_trip():
    optional = _helper.make_optional_type_proto(_helper.make_tensor_type_proto(_T.FLOAT, [2]))
    model = _model(
        [_helper.make_node("Identity", ["x"], ["i"]), _helper.make_node("Optional", ["i"], ["o"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, [2])],
        [_helper.make_value_info("o", optional)],
        opset=18,
    )
    optimized = _onnxslim.optimize(model)
    assert optimized.graph.output[0] == model.graph.output[0]
    sparse = [_helper.make_sparse_tensor_value_info(name, _T.FLOAT, [4, 4]) for name in ("sp", "y")]
    model = _model([_helper.make_node("Identity", ["sp"], ["i"]), _helper.make_node("Identity", ["i"], ["y"])],
                   sparse[:1], sparse[1:])
    optimized = _onnxslim.optimize(model, verify=False)  # onnxruntime takes no sparse inputs
    assert optimized.graph.input[0] == sparse[0] and optimized.graph.output[0] == sparse[1]
    assert _onnxslim.graph.count_nodes(optimized) == 1


_MISFIT = "test-hostile-misfit-weight"


@_onnxslim.register_pass(_MISFIT, lossless=True)
def _misfit_weight(graph: _gs.Graph, ctx: _onnxslim.PassContext) -> _onnxslim.PassResult:
    """Test only: give every 2-D MatMul weight one row more: valid to the ordinary checker, not to
    strict shape inference (the full check)."""
    changed = 0
    for node in graph.nodes:
        weight = node.inputs[1] if node.op == "MatMul" and len(node.inputs) > 1 else None
        if isinstance(weight, _gs.Constant) and weight.values.ndim == 2 and weight.values.shape[0] == 4:
            weight.values = _np.zeros((5, weight.values.shape[1]), weight.values.dtype)
            changed += 1
    return _onnxslim.PassResult(changed=changed)


def test_an_invalid_result_is_never_written_even_without_verification(tmp_path):
    model = _model(
        [_helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, [2, 4])],
        [_helper.make_tensor_value_info("y", _T.FLOAT, [2, 3])],
        [_numpy_helper.from_array(_np.ones((4, 3), _np.float32), "w")],
    )
    result, destination = _optimize_cli(tmp_path, model, "--no-verify", "--passes", _MISFIT)
    message = _one_line_error(result, exit_code=1)
    assert "not valid ONNX" in message and not destination.exists()


def test_a_declared_zero_dim_is_fed_as_zero(tmp_path):
    model = _model(
        [_helper.make_node("Relu", ["x"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, [0, 4])],
        [_helper.make_tensor_value_info("y", _T.FLOAT, [0, 4])],
    )
    result, _ = _optimize_cli(tmp_path, model, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = _json.loads((tmp_path / "report.json").read_text())
    assert report["verification"]["input_shapes"] == {"x": [0, 4]}


@_pytest.mark.parametrize("elem_type", [_T.BOOL, _T.FLOAT16, _T.BFLOAT16, _T.INT8, _T.UINT64, _T.DOUBLE, _T.FLOAT],
                          ids=lambda kind: _T.DataType.Name(kind))
def test_a_scalar_input_of_any_type_is_fed_as_a_0d_array(tmp_path, elem_type):
    model = _model(
        [_helper.make_node("Identity", ["x"], ["i"]), _helper.make_node("Identity", ["i"], ["y"])],
        [_helper.make_tensor_value_info("x", elem_type, [])],
        [_helper.make_tensor_value_info("y", elem_type, [])],
    )
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert _onnxslim.graph.count_nodes(_onnx.load(destination)) == 1


def test_a_string_input_asks_for_real_inputs(tmp_path):
    model = _model(
        [_helper.make_node("Identity", ["x"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.STRING, [])],
        [_helper.make_tensor_value_info("y", _T.STRING, [])],
    )
    assert "--inputs" in _one_line_error(_optimize_cli(tmp_path, model)[0])


@_pytest.mark.parametrize("options", [(), ("--verify-shape", f"x:{2**40},{2**30}"), ("--input-shape", f"x:{2**62},4")],
                          ids=["declared", "verify-shape", "input-shape"])
def test_inputs_too_large_to_allocate_say_how_many_bytes(tmp_path, options):
    declared = [2**62, 4] if not options else ["N", "M"] if options[0] == "--verify-shape" else ["N", 4]
    model = _model(
        [_helper.make_node("Relu", ["x"], ["y"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, declared)],
        [_helper.make_tensor_value_info("y", _T.FLOAT, declared)],
    )
    result, destination = _optimize_cli(tmp_path, model, *options)
    message = _one_line_error(result)
    assert "bytes" in message and "would need" in message and not destination.exists()




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


# ----------------------------------------------------------------------------- generated graphs and models onnxruntime already optimized

def test_fold_shapes_casts_to_small_integer_types_as_onnxruntime_does(tmp_path):
    """Cast(Shape(x)) to uint8 with a 300 dim, and a -1 cast to uint8: an internal error once."""
    model = _model(
        [_helper.make_node("Shape", ["x"], ["s"]), _helper.make_node("Cast", ["s"], ["c"], to=_T.UINT8),
         _helper.make_node("Cast", ["minus_one"], ["c2"], to=_T.UINT8),
         _helper.make_node("Concat", ["c", "c2"], ["u8"], axis=0),
         _helper.make_node("Cast", ["s"], ["i8"], to=_T.INT8), _helper.make_node("Size", ["x"], ["size"])],
        [_helper.make_tensor_value_info("x", _T.FLOAT, [300, 4])],
        [_helper.make_tensor_value_info("u8", _T.UINT8, [3]), _helper.make_tensor_value_info("i8", _T.INT8, [2]),
         _helper.make_tensor_value_info("size", _T.INT64, [])],
        [_numpy_helper.from_array(_np.array([-1], _np.int64), "minus_one")],
    )
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    optimized = _onnx.load(destination)
    assert _onnxslim.graph.count_nodes(optimized) == 3  # every output folded to a Constant
    u8, i8, size = _session(optimized).run(None, {"x": _np.zeros((300, 4), _np.float32)})
    assert u8.tolist() == [44, 4, 255] and i8.tolist() == [44, 4] and size == 1200


def test_a_float16_failure_is_judged_again_by_the_reference_evaluator():
    """A real difference stays a failure; the note says the reference evaluator agrees."""
    def rounded(scale):
        return _model(
            [_helper.make_node("Mul", ["x", "k"], ["m"]), _helper.make_node("Round", ["m"], ["y"])],
            [_helper.make_tensor_value_info("x", _T.FLOAT16, [64])],
            [_helper.make_tensor_value_info("y", _T.FLOAT16, [64])],
            [_numpy_helper.from_array(_np.array(scale, _np.float16), "k")],
        )
    report = _onnxslim.verify(rounded(8.0), rounded(8.5))
    assert not report.passed
    assert any("reference evaluator also finds the models differ" in note for note in report.notes), report.notes


def _small_network():
    """Conv+BN+Relu, MatMul+Add, a decomposed LayerNormalization and Gelu-like tail at opset 12
    (IR 6): what onnxruntime's offline optimizer fuses into FusedConv, FusedMatMul/Gemm,
    LayerNormalization (ONNX domain, opset 12: a schema only onnxruntime has) and NCHWc ops."""
    rng = _np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((8, 3, 3, 3)).astype(_np.float32) * 0.2,
        "scale": rng.uniform(0.5, 1.5, 8).astype(_np.float32), "bias": rng.standard_normal(8).astype(_np.float32),
        "mean": rng.standard_normal(8).astype(_np.float32) * 0.1, "var": rng.uniform(0.5, 1.5, 8).astype(_np.float32),
        "fc": rng.standard_normal((8, 16)).astype(_np.float32) * 0.3, "fc_b": rng.standard_normal(16).astype(_np.float32),
        "gamma": rng.uniform(0.5, 1.5, 16).astype(_np.float32), "beta": rng.standard_normal(16).astype(_np.float32),
        "two": _np.array(2.0, _np.float32), "eps": _np.array(1e-5, _np.float32),
    }
    nodes = [
        _helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        _helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"]),
        _helper.make_node("Relu", ["bn"], ["relu"]),
        _helper.make_node("ReduceMean", ["relu"], ["pooled"], axes=[2, 3], keepdims=0),
        _helper.make_node("Transpose", ["fc"], ["fc_t"], perm=[1, 0]),
        _helper.make_node("Transpose", ["fc_t"], ["fc_tt"], perm=[1, 0]),
        _helper.make_node("MatMul", ["pooled", "fc_tt"], ["mm"]),
        _helper.make_node("Add", ["mm", "fc_b"], ["h"]),
        _helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]),
        _helper.make_node("Sub", ["h", "mu"], ["centered"]),
        _helper.make_node("Pow", ["centered", "two"], ["squared"]),
        _helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        _helper.make_node("Add", ["variance", "eps"], ["shifted"]),
        _helper.make_node("Sqrt", ["shifted"], ["deviation"]),
        _helper.make_node("Div", ["centered", "deviation"], ["normed"]),
        _helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        _helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _model(nodes, [_helper.make_tensor_value_info("x", _T.FLOAT, ["N", 3, 16, 16])],
                  [_helper.make_tensor_value_info("y", _T.FLOAT, ["N", 16])],
                  [_numpy_helper.from_array(value, name) for name, value in weights.items()], opset=12, ir_version=6)


def _onnxruntime_optimized(source: _Path, level: str, destination: _Path) -> _Path:
    options = _ort.SessionOptions()
    options.graph_optimization_level = getattr(_ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(destination)
    options.log_severity_level = 3
    _ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return destination


@_pytest.mark.parametrize("level", ["ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_a_model_onnxruntime_already_optimized_optimizes_and_verifies(tmp_path, level):
    _onnx.save(_small_network(), tmp_path / "network.onnx")
    fused = _onnx.load(_onnxruntime_optimized(tmp_path / "network.onnx", level, tmp_path / "fused.onnx"))
    domains = {node.domain for node in fused.graph.node}
    if level != "ORT_ENABLE_BASIC":
        # the model this test is about: onnxruntime's fused ops, and LayerNormalization at opset 12
        assert "com.microsoft" in domains or "com.microsoft.nchwc" in domains, domains
        assert any(node.op_type == "LayerNormalization" and node.domain == "" for node in fused.graph.node)
    result, destination = _optimize_cli(tmp_path, fused, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = _json.loads((tmp_path / "report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["samples"] == 2
    _onnxslim.model.check_structure(_onnx.load(destination), full=True)


_CORPUS_SHAPES = {"ppocr-rec": "x:1,3,48,320", "ppocr-cls": "x:1,3,48,192", "light-squeezenet": None}


@_pytest.mark.corpus
@_pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
@_pytest.mark.parametrize("name", sorted(_CORPUS_SHAPES))
def test_corpus_models_onnxruntime_optimized_optimize_and_verify(tmp_path, name, level):
    import os

    source = _Path(os.environ.get("ONNXSLIM_CACHE", _Path(__file__).resolve().parents[1] / ".cache")) / "models" / f"{name}.onnx"
    if not source.is_file():
        _pytest.skip(f"{name} is not in the model cache (tools/fetch_models.py)")
    fused = _onnxruntime_optimized(source, level, tmp_path / "fused.onnx")
    shape = _CORPUS_SHAPES[name]
    result, destination = _optimize_cli(tmp_path, _onnx.load(fused), *(["--verify-shape", shape] if shape else []))
    assert result.exit_code == 0, result.output
    assert destination.is_file()
