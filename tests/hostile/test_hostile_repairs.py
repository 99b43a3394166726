"""Models onnxruntime runs that onnx.checker refuses (issue 17): each is repaired where the repair
cannot change what the model computes (node order, a graph name, a missing output shape, an opset
import onnxruntime assumes, identical duplicates), else refused in one line saying how to fix it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from hostile.common import _digests, _run_cli


def _checker_model(nodes=None, inputs=None, outputs=None, initializers=(), domains=(), opset=17):
    """x:[2,4] -> Relu -> t -> Neg -> y, or the nodes given; IR 8."""
    if nodes is None:
        nodes = [helper.make_node("Relu", ["x"], ["t"], name="relu"), helper.make_node("Neg", ["t"], ["y"], name="neg")]
    graph = helper.make_graph(nodes, "g", inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *domains])
    model.ir_version = 8
    return model


def _unsorted_with_a_body():
    """Nodes in reverse order, and an If whose branch reads a name produced after it in the file."""
    then_branch = helper.make_graph([helper.make_node("Neg", ["t"], ["a"])], "then", [],
                                    [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4])])
    else_branch = helper.make_graph([helper.make_node("Abs", ["t"], ["b"])], "else", [],
                                    [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="if"),
             helper.make_node("Relu", ["x"], ["t"], name="relu")]
    return _checker_model(nodes, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                         helper.make_tensor_value_info("c", TensorProto.BOOL, [])])


def _reversed_nodes():
    model = _checker_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    return model


def _unnamed_graph():
    model = _checker_model()
    model.graph.name = ""
    return model


def _shapeless(kind, name, clear_type=False):
    def make():
        model = _checker_model()
        value = next(value for value in getattr(model.graph, kind) if value.name == name)
        if clear_type:
            value.ClearField("type")
        else:
            value.type.tensor_type.ClearField("shape")
        return model
    return make


def _custom_op(domains=(), op="FastGelu", domain="com.microsoft", shapeless_output=False, **attrs):
    def make():
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None if shapeless_output else [2, 4])
        return _checker_model([helper.make_node(op, ["x"], ["y"], domain=domain, name="op", **attrs)],
                              outputs=[output], domains=domains)
    return make


def _weight(values=1.0, name="w"):
    return numpy_helper.from_array(np.full((2, 4), values, np.float32), name)


def _added(*initializers):
    def make():
        return _checker_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], initializers=initializers)
    return make


def _held_twice(typed_values):
    def make():
        weight = _weight()
        weight.float_data.extend([typed_values] * 8)
        return _added(weight)()
    return make


def _metadata(*pairs):
    def make():
        model = _checker_model()
        for key, value in pairs:
            model.metadata_props.add(key=key, value=value)
        return model
    return make


def _denoted():
    model = _checker_model()
    model.graph.input[0].type.denotation = "TENSOR"
    model.graph.input[0].type.tensor_type.shape.dim[0].denotation = "DATA_BATCH"
    return model


def _declared_wrong():
    return _checker_model(outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])])


def _undefined_name():
    return _checker_model([helper.make_node("Add", ["x", "nowhere"], ["y"], name="add")])


def _cycle():
    return _checker_model([helper.make_node("Add", ["x", "b"], ["a"], name="first"),
                           helper.make_node("Neg", ["a"], ["b"], name="second"),
                           helper.make_node("Relu", ["a"], ["y"], name="third")])


# (model, options, outcome, text): a repaired model's note (None where no note is due) or a refused
# one's error line. All but the last two run in onnxruntime as they are.
REPAIRED, REFUSED = "repaired", "refused"
CHECKER_CASES = {
    "nodes not in topological order": (_reversed_nodes, (), REPAIRED, "not in topological order"),
    "a body reading a name produced later": (_unsorted_with_a_body, (), REPAIRED, "sorted, 2 of 2 nodes moved"),
    "no graph name": (_unnamed_graph, (), REPAIRED, "graph had no name"),
    "an output without a shape": (_shapeless("output", "y"), (), REPAIRED, "output 'y' declared no shape"),
    "an output without a type": (_shapeless("output", "y", clear_type=True), (), REPAIRED, "output 'y' declared no type"),
    "an input without a shape, rank given": (_shapeless("input", "x"), ("--verify-shape", "x:2,4"), REPAIRED,
                                             "input 'x' declared no shape"),
    "a com.microsoft op without its opset import": (_custom_op(), (), REPAIRED, "imported at version 1"),
    "an ai.onnx.ml op without its opset import": (_custom_op(op="Normalizer", domain="ai.onnx.ml", norm="L2"), (),
                                                  REPAIRED, "uses domain 'ai.onnx.ml' without importing it"),
    "an initializer copied under one name": (_added(_weight(), _weight()), (), REPAIRED, "identical copies"),
    "an initializer without a name": (_added(_weight(), _weight(name="")), (), REPAIRED, "had no name"),
    "raw_data and float_data equal": (_held_twice(1.0), (), REPAIRED, "the typed copy, equal to raw_data, dropped"),
    "a metadata key twice, one value": (_metadata(("a", "1"), ("a", "1")), (), REPAIRED, "one entry kept per key"),
    "a metadata key twice, two values": (_metadata(("a", "1"), ("a", "2")), (), REPAIRED, "the last value"),
    "denotations on an input": (_denoted, (), REPAIRED, None),
    "an output declared with a shape the graph does not compute": (
        _declared_wrong, (), REPAIRED, "output 'y' is declared [3,5], but the graph computes [2,4]"),
    # refused: more than one meaning, or what to write is not ours to guess
    "an input without a shape": (_shapeless("input", "x"), (), REFUSED, "--verify-shape x:DIMS"),
    "an initializer twice, two values": (_added(_weight(), _weight(2.0)), (), REFUSED, "defined more than once with different"),
    "raw_data and float_data differ": (_held_twice(2.0), (), REFUSED, "holds its values twice"),
    "an output no inference can shape": (
        _custom_op(domains=[helper.make_opsetid("com.microsoft", 1)], op="Gelu", shapeless_output=True), (), REFUSED,
        "finds none (it comes from com.microsoft::Gelu)"),
    # onnxruntime refuses these too; the line says what is wrong instead of "not topologically sorted"
    "a node reading an undefined name": (_undefined_name, (), REFUSED, "reads 'nowhere', which no node"),
    "a cycle": (_cycle, (), REFUSED, "the graph has a cycle"),
}
ORT_REFUSES = {"a node reading an undefined name", "a cycle"}


def _checker_feed(model):
    shapes = {"x": (2, 4), "c": ()}
    return {value.name: (np.array(True) if value.name == "c" else np.linspace(-2, 2, 8, dtype=np.float32).reshape(shapes[value.name]))
            for value in model.graph.input if value.name in shapes}


def _runs(model_bytes):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, _checker_feed(onnx.load_from_string(model_bytes)))


@pytest.mark.parametrize("case", list(CHECKER_CASES))
def test_a_model_onnxruntime_runs_is_repaired_or_refused_in_one_line(tmp_path, case):
    make, options, outcome, expected = CHECKER_CASES[case]
    model = make()
    refused = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
    with pytest.raises(refused) if case != "denotations on an input" else contextlib.nullcontext():
        onnx.checker.check_model(model, full_check=True)
    if case not in ORT_REFUSES:
        reference = _runs(model.SerializeToString())  # the premise: onnxruntime runs it as it is
    source, destination = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    before = _digests(source)
    result = _run_cli("optimize", source, destination, *options)
    assert _digests(source) == before
    if outcome == REFUSED:
        assert result.exit_code == 2, (result.output, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxslim: error: ") and expected in lines[0], result.stderr
        assert not destination.exists()
        return
    assert result.exit_code == 0, (result.output, result.stderr)
    notes = " ".join(result.stdout[result.stdout.find("note: "):].split()) if "note: " in result.stdout else ""
    assert (expected is None) == (not notes) and (expected is None or expected in notes), result.stdout
    written = onnx.load(destination)
    onnx.checker.check_model(written, full_check=True)
    for kind in ("input", "output"):  # the interface: names, order and element types as declared
        declared = [(value.name, value.type.tensor_type.elem_type) for value in getattr(model.graph, kind)]
        got = [(value.name, value.type.tensor_type.elem_type) for value in getattr(written.graph, kind)]
        assert [name for name, _ in got] == [name for name, _ in declared]
        assert all(old in (0, new) for (_, old), (_, new) in zip(declared, got))
    for old, new in zip(model.graph.input, written.graph.input):
        if old.type.tensor_type.HasField("shape"):
            assert old.type == new.type
    for actual, wanted in zip(_runs(written.SerializeToString()), reference, strict=True):
        np.testing.assert_array_equal(actual, wanted)
    given = model.SerializeToString()  # the Python API repairs a copy of the caller's proto
    shapes = {"x": [2, 4]} if "--verify-shape" in options else None
    onnx.checker.check_model(onnxslim.optimize(model, verify=onnxslim.VerifyOptions(verify_shapes=shapes)),
                             full_check=True)
    assert model.SerializeToString() == given
