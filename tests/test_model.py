"""Model I/O: paths and ModelProtos, what survives a round trip, external data, IR 3, the input left alone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim
import onnxslim.exporter
import onnxslim.importer
import onnxslim.model
from onnxslim.model import load, save, to_graph, to_model

WEIGHT = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)  # 4 kB: above save()'s 1 kB inline limit


def weight_model(*, ir_version: int | None = None, opset: int = 17) -> onnx.ModelProto:
    """y = x @ (w + w), then an Identity: the Add folds into a new initializer, the Identity goes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])
    nodes = [
        helper.make_node("Add", ["w", "w"], ["w2"]),
        helper.make_node("MatMul", ["x", "w2"], ["h"]),
        helper.make_node("Identity", ["h"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "weights", [x], [y], [numpy_helper.from_array(WEIGHT, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def annotated_model() -> onnx.ModelProto:
    """Metadata, doc strings, producer, a custom domain at version 2 and a model-local function."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    double = helper.make_function(
        "local.functions", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    constant = numpy_helper.from_array(np.ones([1, 4], np.float32), "k")
    nodes = [
        helper.make_node("Double", ["x"], ["h"], domain="local.functions"),
        helper.make_node("Identity", ["h"], ["y"]),
        # Constant input, unknown op: folding must leave it alone.
        helper.make_node("Mystery", ["k"], ["z"], domain="com.example", alpha=2.0),
    ]
    graph = helper.make_graph(nodes, "annotated", [x], [y, z], [constant], doc_string="graph doc")
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("com.example", 2),
            helper.make_opsetid("local.functions", 1),
        ],
        functions=[double],
        producer_name="exporter",
        producer_version="9.9",
        doc_string="model doc",
        model_version=7,
        domain="ai.test",
    )
    helper.set_model_props(model, {"author": "someone", "license": "Apache-2.0"})
    return model


def function_model() -> onnx.ModelProto:
    """Only a model-local function (onnxruntime can run it), so the result can be verified."""
    model = annotated_model()
    del model.graph.node[2], model.graph.output[1], model.graph.initializer[:]
    del model.opset_import[1]
    return model


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


# ----------------------------------------------------------------------------- load


def test_load_from_path_and_from_model_proto(tmp_path):
    model = weight_model()
    onnx.save(model, tmp_path / "m.onnx")
    from_path = load(tmp_path / "m.onnx")
    assert from_path == model
    assert load(str(tmp_path / "m.onnx")) == model
    assert load(model) is model


def test_load_checks_a_model_proto():
    model = weight_model()
    model.graph.node[1].input[1] = "nowhere"
    with pytest.raises(onnxslim.ModelLoadError, match="invalid ONNX model"):
        load(model)
    assert load(model, check=False) is model


def test_load_errors_say_what_is_wrong(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 100)
    for name, expected in [("missing.onnx", "no such file"), ("empty.onnx", "is empty"), ("junk.onnx", "not an ONNX model")]:
        with pytest.raises(onnxslim.ModelLoadError, match=expected):
            load(tmp_path / name)
    with pytest.raises(onnxslim.ModelLoadError, match="directory"):
        load(tmp_path)


# ----------------------------------------------------------------------------- what survives


def test_everything_the_graph_does_not_hold_survives_a_round_trip(tmp_path):
    model = annotated_model()
    onnx.save(model, tmp_path / "in.onnx")
    loaded = load(tmp_path / "in.onnx")
    save(to_model(to_graph(loaded), loaded), tmp_path / "out.onnx")
    result = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(result)

    assert {prop.key: prop.value for prop in result.metadata_props} == {"author": "someone", "license": "Apache-2.0"}
    assert result.doc_string == "model doc"
    assert result.graph.doc_string == "graph doc"
    assert (result.producer_name, result.producer_version) == ("exporter", "9.9")
    assert (result.model_version, result.domain, result.ir_version) == (7, "ai.test", model.ir_version)
    assert {opset.domain: opset.version for opset in result.opset_import} == {
        "": 17, "com.example": 2, "local.functions": 1,
    }
    assert [(function.domain, function.name) for function in result.functions] == [("local.functions", "Double")]
    assert result.functions[0] == model.functions[0]
    assert [node for node in result.graph.node if node.domain == "com.example"] == [model.graph.node[2]]


def test_optimize_leaves_custom_domain_node_and_functions_alone(tmp_path):
    model = annotated_model()
    optimized = onnxslim.optimize(model, verify=False)  # onnxruntime cannot run com.example::Mystery
    onnx.checker.check_model(optimized)
    assert [node.op_type for node in optimized.graph.node] == ["Double", "Mystery"]
    assert optimized.graph.node[1] == model.graph.node[2]
    assert initializers(optimized).keys() == {"k"}
    assert {opset.domain: opset.version for opset in optimized.opset_import}["com.example"] == 2
    assert list(optimized.functions) == list(model.functions)
    assert [prop.key for prop in optimized.metadata_props] == ["author", "license"]


def test_model_local_function_runs_and_verifies():
    optimized, report = onnxslim.optimize(function_model(), return_report=True)
    assert report.verdict == "verified"
    assert [node.op_type for node in optimized.graph.node] == ["Double"]
    assert len(optimized.functions) == 1


# ----------------------------------------------------------------------------- external data


def save_with_external_data(model: onnx.ModelProto, path: Path, location: str = "w.data") -> None:
    onnx.save_model(model, path, save_as_external_data=True, location=location, size_threshold=0)


def test_external_data_model_round_trips_through_optimize_file(tmp_path):
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    save_with_external_data(weight_model(), source)
    before = {name: snapshot(source.parent / name) for name in ("model.onnx", "w.data")}

    report = onnxslim.optimize_file(source, tmp_path / "out.onnx")
    assert report.verdict == "verified"
    assert {name: snapshot(source.parent / name) for name in before} == before
    optimized = load(tmp_path / "out.onnx")
    (folded,) = initializers(optimized).values()
    np.testing.assert_array_equal(folded, WEIGHT + WEIGHT)

    onnxslim.optimize_file(source, tmp_path / "kept.onnx", simplify=onnxslim.SimplifyOptions(passes="eliminate-noops"),
                           external_data=True)
    assert (tmp_path / "kept.onnx.data").is_file()
    np.testing.assert_array_equal(initializers(load(tmp_path / "kept.onnx"))["w"], WEIGHT)


def test_save_external_data_writes_beside_the_model_and_loads_from_another_cwd(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    save(weight_model(), Path("out") / "model.onnx", external_data=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "out" / "model.onnx.data").stat().st_size == WEIGHT.nbytes
    header = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False)
    assert onnx.external_data_helper.uses_external_data(header.graph.initializer[0])

    monkeypatch.chdir(tmp_path / "elsewhere")
    np.testing.assert_array_equal(initializers(load(tmp_path / "out" / "model.onnx"))["w"], WEIGHT)
    monkeypatch.chdir(tmp_path / "out")
    np.testing.assert_array_equal(initializers(load("model.onnx"))["w"], WEIGHT)


def test_save_switches_to_external_data_past_the_threshold(tmp_path, monkeypatch):
    save(weight_model(), tmp_path / "small.onnx")
    assert os.listdir(tmp_path) == ["small.onnx"]

    monkeypatch.setattr(onnxslim.model, "EXTERNAL_DATA_THRESHOLD", 1000)
    save(weight_model(), tmp_path / "large.onnx")
    assert (tmp_path / "large.onnx.data").stat().st_size == WEIGHT.nbytes
    assert (tmp_path / "large.onnx").stat().st_size < 1000
    np.testing.assert_array_equal(initializers(load(tmp_path / "large.onnx"))["w"], WEIGHT)
    save(weight_model(), tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    assert sorted(os.listdir(tmp_path)) == ["inline.onnx", "large.onnx", "large.onnx.data", "small.onnx"]


def test_output_data_file_never_overwrites_the_input_data_file(tmp_path):
    """The input's weights live in a file named like the output's data file: writing it would change the input."""
    source = tmp_path / "model.onnx"
    save_with_external_data(weight_model(), source, location="out.onnx.data")
    before = {name: snapshot(tmp_path / name) for name in ("model.onnx", "out.onnx.data")}
    with pytest.raises(onnxslim.UsageError, match="out.onnx.data"):
        onnxslim.optimize_file(source, tmp_path / "out.onnx", external_data=True)
    assert {name: snapshot(tmp_path / name) for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "out.onnx.data"]
    np.testing.assert_array_equal(initializers(load(source))["w"], WEIGHT)


# ----------------------------------------------------------------------------- IR 3


def ir3_model() -> onnx.ModelProto:
    """IR 3 (opset 8): every initializer is also a graph input; one initializer is unused."""
    model = weight_model(ir_version=3, opset=8)
    unused = numpy_helper.from_array(np.ones([3], np.float32), "unused")
    model.graph.initializer.append(unused)
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    onnx.checker.check_model(model)
    return model


def test_ir3_model_stays_valid_ir3_after_optimize(tmp_path):
    onnx.save(ir3_model(), tmp_path / "ir3.onnx")
    report = onnxslim.optimize_file(tmp_path / "ir3.onnx", tmp_path / "out.onnx")
    assert report.verdict == "verified"
    assert report.before.inputs == report.after.inputs == [{"name": "x", "dtype": "FLOAT", "shape": [1, 32]}]
    optimized = onnx.load(tmp_path / "out.onnx")
    assert optimized.ir_version == 3
    onnx.checker.check_model(optimized)
    assert [node.op_type for node in optimized.graph.node] == ["MatMul"]
    listed = {value.name for value in optimized.graph.input}
    assert {tensor.name for tensor in optimized.graph.initializer} <= listed
    assert "x" in listed


# ----------------------------------------------------------------------------- the input is never modified


def test_optimize_file_never_modifies_the_input(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(weight_model(), source)
    before = snapshot(source)
    onnxslim.optimize_file(source, tmp_path / "out.onnx")
    assert snapshot(source) == before
    with pytest.raises(onnxslim.UsageError):
        onnxslim.optimize_file(source, source)
    with pytest.raises(onnxslim.UsageError):
        onnxslim.optimize_file(source, tmp_path / "sub" / ".." / "model.onnx")
    assert snapshot(source) == before
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "out.onnx"]


def test_overwrite_input_is_explicit(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(weight_model(), source)
    onnxslim.optimize_file(source, source, overwrite_input=True)
    assert [node.op_type for node in onnx.load(source).graph.node] == ["MatMul"]
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_an_invalid_model_proto_is_reported_as_bad_input_not_as_a_pass_bug():
    """ModelProtos from the caller are checked lazily, only when the result fails the checker."""
    import onnx.helper as oh

    graph = oh.make_graph(
        [oh.make_node("Relu", ["missing"], ["y"])],
        "invalid",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(onnxslim.ModelLoadError, match="invalid ONNX model"):
        onnxslim.optimize(model, verify=False)


# ----------------------------------------------------------------------------- graph conversion


def conversion_model() -> onnx.ModelProto:
    """What import writes directly and what it leaves to onnx-graphsurgeon: initializers (one of a
    type numpy lacks), tensor attributes, symbolic and unknown dims, an omitted optional input,
    a custom domain, an If body."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    half = helper.make_tensor("half", TensorProto.BFLOAT16, [1], [16128])
    branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n"])], "branch", [], [helper.make_tensor_value_info("n", TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["w"], value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Clip", ["x", "", "m"], ["clipped"], name="clip"),
        helper.make_node("Mystery", ["clipped", "half"], ["m2"], domain="com.example", alpha=2.0, names=["a", "b"]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        helper.make_node("Conv", ["x", "w"], ["z"], kernel_shape=[1], pads=[0, 0]),
    ]
    value_info = [helper.make_tensor_value_info("clipped", TensorProto.FLOAT, ["batch", 3, "n"])]
    graph = helper.make_graph(
        nodes, "conversion", [x, c, helper.make_tensor_value_info("m", TensorProto.FLOAT, [])],
        [y, helper.make_tensor_value_info("z", TensorProto.FLOAT, None), helper.make_tensor_value_info("m2", TensorProto.FLOAT, None)],
        [shape, half], value_info=value_info,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


def described(graph) -> list:
    """A graph as plain data: every node's fields and every tensor's, edges by tensor name, bodies included."""

    def tensor(t):
        fields = {key: value for key, value in vars(t).items() if key not in ("inputs", "outputs", "_values")}
        if isinstance(t, onnxslim.model.gs.Constant):
            fields["values"] = (type(t._values).__name__, list(t._values.shape), str(t._values.dtype), t._values.nbytes)
        fields["shape"] = None if fields.get("shape") is None else list(fields["shape"])
        readers = [node.name or node.op for node in t.outputs]
        writers = [node.name or node.op for node in t.inputs]
        return type(t).__name__, fields, readers, writers

    def attribute(value):
        if isinstance(value, onnxslim.model.gs.Graph):
            return described(value)
        return tensor(value) if isinstance(value, onnxslim.model.gs.Tensor) else value

    return [
        (node.op, node.name, node.domain, {key: attribute(value) for key, value in node.attrs.items()},
         [tensor(t) for t in node.inputs], [tensor(t) for t in node.outputs])
        for node in graph.nodes
    ] + [[tensor(t) for t in graph.inputs], [tensor(t) for t in graph.outputs]]


def test_import_builds_the_graph_onnx_graphsurgeon_builds():
    """The same graph, but for the declared shapes to_graph leaves to inference (all but the inputs')
    and the types numpy lacks (bfloat16 here), which are ml_dtypes' types, not onnx-graphsurgeon's ONNX enum."""
    model = conversion_model()
    reference = onnxslim.model.gs.import_onnx(model)
    onnxslim.importer._keep_input_shapes_only(reference, model.graph)
    onnxslim.importer._settle_constants(reference)
    assert described(to_graph(model)) == described(reference)


def test_a_proto_writer_reuses_a_tensor_type_only_for_the_same_dims():
    """Written types are reused by value, and 1 == 1.0 == True: only an int dim is a dim_value."""
    gs = onnxslim.model.gs
    tensors = [
        gs.Variable("a", np.float32, [1, "n", None]),
        gs.Variable("b", np.float32, [1.0, "n", None]),
        gs.Variable("c", np.float32, [True, "n", None]),
        gs.Variable("d", np.float32, [np.int64(1), "n", None]),
        gs.Variable("e", np.float32, []),
        gs.Variable("f", np.float32, None),
        gs.Variable("g", np.float32, [1, "n", None]),
    ]
    writer = onnxslim.exporter.ProtoWriter()
    for tensor in tensors:
        alone = onnxslim.exporter.ProtoWriter().value_info(onnx.ValueInfoProto(), tensor)
        assert writer.value_info(onnx.ValueInfoProto(), tensor) == alone
    assert not writer.value_info(onnx.ValueInfoProto(), tensors[1]).type.tensor_type.shape.dim[0].HasField("dim_value")
