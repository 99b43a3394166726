"""Option objects: what they refuse, the shorthands optimize() takes for them, and the command
line's option groups that build them."""

from types import SimpleNamespace

import click
import pytest
from builder import ModelBuilder, dead_node_model, random
from click.testing import CliRunner

import onnxslim
from onnxslim import api
from onnxslim.cli import cli
from onnxslim.cli_options import option_group
from onnxslim.options import CalibrationOptions, SimplifyOptions, VerifyOptions


def conv_net():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    h = x
    for index, (cin, cout) in enumerate(((3, 8), (8, 8))):
        h = b.node("Relu", [b.node("Conv", [h, b.initializer(f"w{index}", random([cout, cin, 3, 3], seed=index)),
                                            b.initializer(f"b{index}", random([cout], seed=10 + index))],
                                   pads=[1, 1, 1, 1])])
    b.output(b.node("GlobalAveragePool", [h], ["y"]))
    return b.build()


@pytest.mark.parametrize("make, message", [
    (lambda: SimplifyOptions(pipeline="default", passes="eliminate-dead-nodes"), "either a pipeline or a list"),
    (lambda: SimplifyOptions(pass_limit=-1), "pass limit"),
    (lambda: SimplifyOptions(pass_limit=1.5), "pass limit"),
    (lambda: SimplifyOptions(fold_size_cap=-2), "fold size cap"),
    (lambda: VerifyOptions(samples=0), "samples"),
    (lambda: VerifyOptions(seed=-1), "seed"),
    (lambda: VerifyOptions(tolerance=float("nan")), "tolerance"),
    (lambda: CalibrationOptions("random", limit=0), "calibration limit"),
    (lambda: onnxslim.QuantizeOptions(mode="int4"), "quantization mode"),
])
def test_an_option_object_refuses_a_bad_value_where_it_is_made(make, message):
    with pytest.raises(onnxslim.UsageError, match=message):
        make()


def test_one_pass_name_to_skip_is_one_name_not_its_letters():
    assert SimplifyOptions(skip="sink-transposes").skip == ("sink-transposes",)
    assert SimplifyOptions(skip=["a", "b"]).skip == ("a", "b")


def test_shorthands_run_as_their_option_objects():
    model, text = dead_node_model(), "eliminate-noops,eliminate-dead-nodes"
    short, short_report = onnxslim.optimize(model, simplify=text, verify=False, return_report=True)
    full, full_report = onnxslim.optimize(model, simplify=SimplifyOptions(pipeline=text),
                                          verify=VerifyOptions(enabled=False), return_report=True)
    assert short.SerializeToString() == full.SerializeToString()
    assert short_report.pipeline == full_report.pipeline == text
    assert short_report.verification is None and short_report.verification_skipped == "verification turned off"
    assert [node.op_type for node in short.graph.node] == ["Constant", "Add", "Relu"]  # Identity, Exp gone


def test_a_prune_ratio_is_prune_options_with_that_ratio():
    by_ratio = onnxslim.optimize(conv_net(), prune=0.5, verify=False)
    by_options = onnxslim.optimize(conv_net(), prune=onnxslim.PruneOptions(ratio=0.5), verify=False)
    assert by_ratio.SerializeToString() == by_options.SerializeToString()
    assert [tensor.dims[0] for tensor in by_ratio.graph.initializer if len(tensor.dims) == 4] == [4, 8]


def test_quantize_takes_int8_or_quantize_options():
    with pytest.raises(onnxslim.UsageError, match="only int8"):
        onnxslim.optimize(conv_net(), quantize="int4")
    short = onnxslim.optimize(conv_net(), quantize="int8", verify=False)
    full = onnxslim.optimize(conv_net(), quantize=onnxslim.QuantizeOptions(), verify=False)
    assert short.SerializeToString() == full.SerializeToString()


def test_the_fold_size_cap_is_part_of_the_pipeline_that_ran():
    _, report = onnxslim.optimize(dead_node_model(), simplify=SimplifyOptions(fold_size_cap=-1), verify=False,
                                  return_report=True)
    assert "fold-constants{size_cap=-1}" in report.pipeline


def test_the_command_line_hands_optimize_one_object_per_stage(tmp_path, monkeypatch):
    seen = {}
    optimize_file = api.optimize_file

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return optimize_file(*args, **kwargs)

    monkeypatch.setattr(api, "optimize_file", spy)
    source = tmp_path / "model.onnx"
    source.write_bytes(dead_node_model().SerializeToString())
    result = CliRunner().invoke(cli, [
        "optimize", str(source), str(tmp_path / "out.onnx"), "--skip", "fuse-gelu,sink-transposes", "--pass-limit", "50",
        "--no-verify", "--samples", "3", "--verify-shape", "x:2,3", "--force", "--min-cosine", "0.5", "-q",
    ])
    assert result.exit_code == 0, result.output
    assert seen["simplify"] == SimplifyOptions(skip=("fuse-gelu", "sink-transposes"), pass_limit=50, input_shapes={})
    assert seen["verify"] == VerifyOptions(enabled=False, verify_shapes={"x": [2, 3]}, samples=3, force=True,
                                           budget=onnxslim.FidelityBudget(min_cosine=0.5))
    assert seen["quantize"] is None and seen["prune"] is None and seen["progress"] is None


def test_an_option_group_in_two_blocks_fills_one_namespace_and_keeps_the_help_order():
    received = {}

    @click.command()
    @option_group("first", click.option("--a", default=1), click.option("--b", default=2))
    @click.option("--between", default=0)
    @option_group("first", click.option("--c", default=3))
    @option_group("second", click.option("--d", is_flag=True))
    def command(first, between, second):
        received.update(first=first, between=between, second=second)

    result = CliRunner().invoke(command, ["--c", "7", "--d"])
    assert result.exit_code == 0, result.output
    assert received == {"first": SimpleNamespace(a=1, b=2, c=7), "between": 0, "second": SimpleNamespace(d=True)}
    help_text = CliRunner().invoke(command, ["--help"]).output
    assert [help_text.index(flag) for flag in ("--a", "--b", "--between", "--c", "--d")] == sorted(
        help_text.index(flag) for flag in ("--a", "--b", "--between", "--c", "--d"))
