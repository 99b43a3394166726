"""The export manifest, the onnxruntime-optimized variants and how the bench resolves their names:
everything about the wide corpus that needs neither torch nor the exports themselves."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper
from tool_loader import load_tool

export_models = load_tool("export_models")
ort_variants = load_tool("ort_variants")
bench_peers = load_tool("bench_peers")

MANIFEST = export_models.load_manifest()
# The exports made before the wide corpus: the legacy exporter only.
LEGACY_ONLY = {"resnet50", "mobilenetv2", "efficientnet-b0", "regnet-y-400mf", "vit-b16", "bert-base"}


def _entry(**fields) -> dict:
    entry = {"exporter": "torchscript", "torch": "2.14.1", "verify_shapes": [{"input": [1, 3]}, {"input": [2, 3]}]}
    entry.update(fields)
    return entry


def _write_manifest(tmp_path, name: str, entry: dict):
    lines = [f"[models.{name}]"]
    for key, value in entry.items():
        if key == "verify_shapes":
            shapes = ", ".join("{ " + ", ".join(f"{k} = {v}" for k, v in shape.items()) + " }" for shape in value)
            lines.append(f"verify_shapes = [{shapes}]")
        elif isinstance(value, str):
            lines.append(f"{key} = {value!r}".replace("'", '"'))
        else:
            lines.append(f"{key} = {value}")
    path = tmp_path / "exports.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_torch_architecture_is_there_with_both_exporters_or_a_reason():
    by_recipe: dict[str, dict[str, dict]] = {}
    for name, entry in MANIFEST.items():
        recipe = export_models.recipe_name(name, entry)
        by_recipe.setdefault(recipe, {})[entry.get("exporter", "torchscript")] = entry
    for recipe, entries in by_recipe.items():
        if recipe in LEGACY_ONLY or "skl2onnx" in entries:
            continue
        assert set(entries) == {"torchscript", "dynamo"}, recipe
        assert entries["torchscript"].get("opset", export_models.DEFAULT_OPSET) == 17, recipe
        assert entries["dynamo"]["opset"] >= 20, recipe
        assert "skipped" not in entries["torchscript"], recipe
    for wanted in ("gpt2-kv", "llama-kv", "bert-tiny", "t5-encoder", "vit-tiny", "convnext-mini", "ssdlite", "mask-rcnn-mini",
                   "lstm", "gru", "sklearn-logreg", "sklearn-gbdt"):
        assert wanted in by_recipe


def test_every_pin_in_the_manifest_is_what_the_venv_installs():
    installed = dict(requirement.split("==") for requirement in export_models.VENV_REQUIREMENTS)
    for name, entry in MANIFEST.items():
        for package in export_models.PINNED_PACKAGES:
            if package in entry:
                assert installed[package] == entry[package], (name, package)
        if entry.get("exporter") == "dynamo":
            assert entry.get("onnxscript") == installed["onnxscript"], name


def test_second_verification_shape_differs_for_every_input():
    for name, entry in MANIFEST.items():
        first, second = entry["verify_shapes"][:2]
        assert set(first) == set(second), name
        for input_name, dims in first.items():
            assert len(dims) == len(second[input_name]), (name, input_name)
            assert dims != second[input_name], (name, input_name)


def test_skipped_models_say_why_and_are_neither_exported_nor_benched():
    skipped = [name for name, entry in MANIFEST.items() if "skipped" in entry]
    assert skipped, "the dynamo export of the detector is recorded as skipped"
    exportable = export_models.exportable(MANIFEST)
    for name in skipped:
        reason = MANIFEST[name]["skipped"]
        assert reason.strip() and "\n" not in reason
        assert name not in exportable
        with pytest.raises(export_models.ExportError, match="is not exported"):
            export_models.ensure_exported(name)  # refused before any venv is made
        with pytest.raises(bench_peers.BenchError, match="not exported"):
            bench_peers.manifest_models([name])
        with pytest.raises(ort_variants.VariantError, match="is not exported"):
            ort_variants.base_entry(f"{name}-ort-all")


@pytest.mark.parametrize("fields, message", [
    ({"recipe": "no-such-recipe"}, "names recipe"),
    ({"exporter": "tflite"}, "unknown exporter"),
    ({"exporter": "skl2onnx", "skl2onnx": "1.20.0"}, "cannot be exported with skl2onnx"),
    ({"recipe": "sklearn-gbdt"}, "cannot be exported with torchscript"),
    ({"torch": None}, "lacks verify_shapes or torch"),
    ({"opset": "17"}, "opset must be an integer"),
    ({"skipped": ""}, "one-line reason"),
    ({"skipped": "first\nsecond"}, "one-line reason"),
])
def test_a_broken_manifest_entry_is_refused_by_name(tmp_path, fields, message):
    entry = _entry(**fields)
    entry = {key: value for key, value in entry.items() if value is not None}
    path = _write_manifest(tmp_path, "resnet50", entry)
    with pytest.raises(export_models.ExportError, match=message):
        export_models.load_manifest(path)


def test_a_well_formed_entry_loads_with_its_recipe(tmp_path):
    path = _write_manifest(tmp_path, "mini-dynamo", _entry(recipe="gru", exporter="dynamo", opset=20))
    models = export_models.load_manifest(path)
    assert export_models.recipe_name("mini-dynamo", models["mini-dynamo"]) == "gru"
    assert export_models.exportable(models) == ["mini-dynamo"]


def test_variant_names_split_into_base_and_level():
    assert ort_variants.split("vit-b16-ort-all") == ("vit-b16", "ort-all")
    assert ort_variants.split("gpt2-kv-dynamo-ort-extended") == ("gpt2-kv-dynamo", "ort-extended")
    assert ort_variants.split("vit-b16") is None
    assert ort_variants.split("ort-all") is None
    assert ort_variants.variant_names("ppocr-det") == ["ppocr-det-ort-extended", "ppocr-det-ort-all"]
    entry, group = ort_variants.base_entry("ppocr-det-ort-all")
    assert group == "corpus" and entry["verify_shapes"]
    assert ort_variants.base_entry("lstm-legacy-ort-extended")[1] == "exports"


def test_unknown_models_and_variants_are_refused_by_the_bench():
    with pytest.raises(bench_peers.BenchError, match="unknown model"):
        bench_peers.manifest_models(["no-such-model-ort-all"])
    with pytest.raises(ort_variants.VariantError, match="no model"):
        ort_variants.base_entry("no-such-model-ort-all")


def _layer_norm_model() -> onnx.ModelProto:
    """x -> decomposed LayerNorm -> + bias: onnxruntime's extended level fuses it."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["centered"]),
        helper.make_node("Pow", ["centered", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["variance", "epsilon"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["deviation"]),
        helper.make_node("Div", ["centered", "deviation"], ["normalized"]),
        helper.make_node("Mul", ["normalized", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    initializers = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("epsilon", TensorProto.FLOAT, [], [1e-5]),
        onnx.numpy_helper.from_array((1 + 0.1 * rng.standard_normal(8)).astype(np.float32), "scale"),
        onnx.numpy_helper.from_array((0.02 * rng.standard_normal(8)).astype(np.float32), "offset"),
    ]
    graph = helper.make_graph(nodes, "layer_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("level", list(ort_variants.LEVELS.values()))
def test_a_variant_is_the_model_as_onnxruntime_optimizes_it(tmp_path, level):
    source, target = tmp_path / "model.onnx", tmp_path / "out" / "model-variant.onnx"
    onnx.save(_layer_norm_model(), source)
    before = source.read_bytes()
    ort_variants.make_variant(source, target, level)
    assert source.read_bytes() == before
    optimized = onnx.load(str(target))
    assert [node.op_type for node in optimized.graph.node] == ["LayerNormalization"]
    assert [path.name for path in target.parent.iterdir()] == [target.name]  # no partial file left
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    expected = onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    actual = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5, atol=1e-5)


def test_a_model_onnxruntime_refuses_makes_no_variant(tmp_path):
    source, target = tmp_path / "broken.onnx", tmp_path / "broken-ort-all.onnx"
    source.write_bytes(b"not a model")
    with pytest.raises(ort_variants.VariantError, match="broken.onnx"):
        ort_variants.make_variant(source, target, "ORT_ENABLE_ALL")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.onnx"]


def test_op_counts_include_bodies_and_name_other_domains():
    measure = bench_peers.measure
    then_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
                                    "then", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Gelu", ["x"], ["w"], domain="com.microsoft")], "else", [],
                                    [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["out"], then_branch=then_branch, else_branch=else_branch),
                               helper.make_node("Relu", ["out"], ["final"])], "g", [], [])
    assert measure.op_counts(graph) == {"If": 1, "Relu": 3, "com.microsoft.Gelu": 1}
    assert sum(measure.op_counts(graph).values()) == measure.count_nodes(graph)


def _result(nodes: int, ops: dict[str, int], verdict: str = "ok") -> dict:
    return {"status": "ok", "verdict": verdict, "nodes": nodes, "op_counts": ops}


def test_the_report_shows_by_op_type_where_the_best_verified_peer_leaves_fewer_nodes():
    tools = {key: {"label": bench_peers.TOOLS[key].label} for key in ("ours", "onnxsim", "onnxslim")}
    models = [
        {"name": "loses", "results": {"ours": _result(6, {"Add": 2, "Slice": 3, "Unsqueeze": 1}),
                                      "onnxsim": _result(3, {"Add": 2, "Gather": 1}),
                                      "onnxslim": _result(2, {"Add": 2}, verdict="mismatch")}},
        {"name": "wins", "results": {"ours": _result(2, {"Add": 2}), "onnxsim": _result(3, {"Add": 3})}},
        {"name": "broken", "error": "the original does not run"},
    ]
    lines = bench_peers._losses_lines({"tools": tools, "models": models})
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| model")]
    assert rows == ["| loses | 6 | onnxsim | 3 | Slice +3, Unsqueeze +1, Gather -1 |"]
    assert bench_peers._losses_lines({"tools": tools, "models": models[1:]}) == []
