"""The pass manager: pipeline texts, the registry, fixed points, limits, verify-each and failures."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from builder import ModelBuilder, ops, random, run_pass
from builder import dead_node_model as small_model

import onnxslim
from onnxslim import manager
from onnxslim.manager import DEFAULT_FIXPOINT_ROUNDS, Fixpoint, PassCall, PassManager, Pipeline
from onnxslim.model import to_graph, to_model

# ----------------------------------------------------------------------------- test-only passes


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: passes a test registers disappear after it."""
    onnxslim.registered_passes()  # discover the real passes before copying
    monkeypatch.setattr(manager, "_REGISTRY", dict(manager._REGISTRY))
    return manager._REGISTRY


@pytest.fixture
def always_changed(registry):
    @onnxslim.register_pass("test-always-changed")
    def always_changed(graph, ctx):
        """Claims a change every time (a pass that never converges)."""
        return onnxslim.PassResult(changed=True)

    return "test-always-changed"


@pytest.fixture
def break_add(registry):
    @onnxslim.register_pass("test-break-add")
    def break_add(graph, ctx):
        """Turns every Add into a Sub (a deliberately wrong rewrite)."""
        broken = 0
        for node in graph.nodes:
            if node.op == "Add":
                node.op = "Sub"
                broken += 1
        return onnxslim.PassResult(broken=broken)

    return "test-break-add"


@pytest.fixture
def crash(registry):
    @onnxslim.register_pass("test-crash")
    def crash(graph, ctx):
        """Raises, as a buggy pass would."""
        raise KeyError("no such tensor")

    return "test-crash"


# ----------------------------------------------------------------------------- pipeline texts


@pytest.mark.parametrize(
    "text",
    [
        "eliminate-noops",
        "lift-constants,infer-shapes,fixpoint(eliminate-noops,fold-constants,eliminate-dead-nodes)",
        "fixpoint[3](eliminate-noops,eliminate-dead-nodes)",
        "fixpoint(eliminate-noops,fixpoint[2](fold-constants,eliminate-dead-nodes))",
        "fold-constants{size_cap=1024}",
        "fold-constants{size_cap=-1},fixpoint(fold-constants{size_cap=1024},eliminate-dead-nodes)",
    ],
)
def test_pipeline_text_round_trips(text):
    pipeline = Pipeline.parse(text)
    assert str(pipeline) == text
    assert Pipeline.parse(str(pipeline)) == pipeline
    pipeline.validate()


def test_pipeline_text_parses_to_steps():
    pipeline = Pipeline.parse("lift-constants, fixpoint[3]( fold-constants{size-cap=1024}, fixpoint(eliminate-noops) )")
    assert pipeline.steps == (
        PassCall("lift-constants"),
        Fixpoint((PassCall("fold-constants", (("size_cap", 1024),)), Fixpoint((PassCall("eliminate-noops"),))), 3),
    )
    assert str(pipeline) == "lift-constants,fixpoint[3](fold-constants{size_cap=1024},fixpoint(eliminate-noops))"


def test_default_fixpoint_bound_is_not_printed():
    assert str(Pipeline.parse(f"fixpoint[{DEFAULT_FIXPOINT_ROUNDS}](eliminate-noops)")) == "fixpoint(eliminate-noops)"


def test_option_values_keep_their_types():
    call = Pipeline.parse("p{a=1,b=-2,c=0.5,d=true,e=False,f=word}").steps[0]
    assert dict(call.options) == {"a": 1, "b": -2, "c": 0.5, "d": True, "e": False, "f": "word"}
    assert str(call) == "p{a=1,b=-2,c=0.5,d=true,e=false,f=word}"


def test_default_preset_parses_and_round_trips():
    pipeline = Pipeline.preset("default")
    assert Pipeline.parse(str(pipeline)) == pipeline
    assert set(pipeline.pass_names()) <= {spec.name for spec in onnxslim.registered_passes()}
    assert pipeline.is_lossless()


@pytest.mark.parametrize(
    "text",
    ["", "fixpoint(", "fixpoint()", "a,,b", "a{x}", "a{x=1", "fixpoint[0](a)", "fixpoint[x](a)", "a)", "a b", "a;b"],
)
def test_malformed_pipeline_text_is_a_pipeline_error(text):
    with pytest.raises(onnxslim.PipelineError):
        Pipeline.parse(text)


def test_unknown_pass_is_a_pipeline_error():
    with pytest.raises(onnxslim.PipelineError, match="unknown pass 'no-such-pass'") as error:
        Pipeline.parse("eliminate-noops,fixpoint(no-such-pass)").validate()
    assert "eliminate-noops" in str(error.value)  # the message lists the known passes
    with pytest.raises(onnxslim.PipelineError, match="no-such-pass"):
        onnxslim.optimize(small_model(), simplify=onnxslim.SimplifyOptions(passes="no-such-pass"))


def test_bad_option_is_a_pipeline_error():
    with pytest.raises(onnxslim.PipelineError, match="no option bogus.*size_cap"):
        Pipeline.parse("fold-constants{bogus=1}").validate()
    with pytest.raises(onnxslim.PipelineError, match="takes: none"):
        Pipeline.parse("eliminate-noops{size_cap=1}").validate()
    with pytest.raises(onnxslim.PipelineError):
        onnxslim.get_pass("fold-constants")(gs.Graph(), onnxslim.PassContext(), bogus=1)


def test_without_removes_passes_and_empty_fixpoints():
    pipeline = Pipeline.parse("lift-constants,fixpoint(eliminate-noops,fold-constants),fixpoint(eliminate-dead-nodes)")
    without_fold = pipeline.without(["fold-constants"])
    assert str(without_fold) == "lift-constants,fixpoint(eliminate-noops),fixpoint(eliminate-dead-nodes)"
    without_two = pipeline.without(["eliminate-dead-nodes", "lift-constants"])
    assert str(without_two) == "fixpoint(eliminate-noops,fold-constants)"
    with pytest.raises(onnxslim.PipelineError):
        pipeline.without(["no-such-pass"])


def test_skip_removes_a_pass_from_the_run():
    model = small_model()
    optimized, report = onnxslim.optimize(model, simplify=onnxslim.SimplifyOptions(skip=["eliminate-noops"]),
                                          return_report=True)
    assert "eliminate-noops" not in report.pipeline
    default = set(Pipeline.preset("default").pass_names())
    assert "eliminate-noops" in default
    assert {execution.name for execution in report.run.executions} == default - {"eliminate-noops"}
    assert ops(optimized)["Identity"] == 1


def test_with_options_sets_an_option_everywhere():
    pipeline = Pipeline.parse("fold-constants,fixpoint(fold-constants{size_cap=5},eliminate-dead-nodes)")
    assert str(pipeline.with_options("fold-constants", size_cap=-1)) == (
        "fold-constants{size_cap=-1},fixpoint(fold-constants{size_cap=-1},eliminate-dead-nodes)"
    )


def test_pass_names_must_be_kebab_case(registry):
    with pytest.raises(ValueError):
        onnxslim.register_pass("Not_Kebab")(lambda graph, ctx: onnxslim.PassResult())


def test_a_name_cannot_be_registered_twice(always_changed):
    with pytest.raises(ValueError, match="already registered"):
        onnxslim.register_pass(always_changed)(lambda graph, ctx: onnxslim.PassResult())


def test_registered_pass_exposes_summary_options_and_losslessness():
    fold = onnxslim.get_pass("fold-constants")
    assert fold.summary.startswith("Evaluate nodes whose inputs are all constants")
    assert fold.options == {"size_cap": 0, "node_bytes": 512} and fold.lossless


# ----------------------------------------------------------------------------- running


def test_fixpoint_stops_at_its_bound_and_records_it(always_changed):
    pipeline = Pipeline.parse(f"fixpoint[3]({always_changed})")
    record = PassManager(pipeline).run(to_graph(small_model()))

    assert [execution.name for execution in record.executions] == [always_changed] * 3
    assert record.unconverged == [f"fixpoint[3]({always_changed})"]


def test_fixpoint_stops_when_nothing_changes():
    pipeline = Pipeline.parse("lift-constants,fixpoint(eliminate-noops,fold-constants,eliminate-dead-nodes)")
    record = PassManager(pipeline).run(to_graph(small_model()))

    names = [execution.name for execution in record.executions]
    assert names[0] == "lift-constants"
    assert len(names) == 1 + 3 * 2  # one round that changes, one that confirms nothing does
    assert not any(execution.changed for execution in record.executions[-3:])
    assert record.unconverged == []


def test_executions_measure_nodes_and_bytes():
    record = PassManager(Pipeline.parse("eliminate-dead-nodes")).run(to_graph(small_model()))
    (execution,) = record.executions
    assert execution.index == 1 and execution.changed
    assert (execution.nodes_before, execution.nodes_after) == (5, 4)
    assert execution.counters == {"nodes": 1, "initializers": 0}


def test_pass_limit_stops_after_n_executions():
    model = small_model()
    optimized, report = onnxslim.optimize(model, simplify=onnxslim.SimplifyOptions(pass_limit=2), return_report=True)

    assert [execution.name for execution in report.run.executions] == ["lift-constants", "infer-shapes"]
    assert report.run.stopped_at_limit
    assert ops(optimized)["Identity"] == 1 and ops(optimized)["Constant"] == 0  # lifted, nothing else
    assert report.verification.passed


def test_pass_limit_zero_runs_nothing():
    model = small_model()
    optimized, report = onnxslim.optimize(model, simplify=onnxslim.SimplifyOptions(pass_limit=0), return_report=True)
    assert report.run.executions == [] and report.run.stopped_at_limit
    assert ops(optimized) == ops(model)


def test_pass_limit_above_the_run_changes_nothing():
    _, report = onnxslim.optimize(small_model(), simplify=onnxslim.SimplifyOptions(pass_limit=100), return_report=True)
    assert not report.run.stopped_at_limit


def test_a_pass_that_raises_is_a_pass_failure_naming_it(crash):
    with pytest.raises(onnxslim.PassFailure, match=f"pass '{crash}'.*KeyError.*no such tensor"):
        onnxslim.optimize(small_model(), simplify=onnxslim.SimplifyOptions(passes=f"eliminate-noops,{crash}"))


def test_a_pass_that_returns_no_result_is_a_pass_failure(registry):
    @onnxslim.register_pass("test-no-result")
    def no_result(graph, ctx):
        """Forgets to return a PassResult."""

    with pytest.raises(onnxslim.PassFailure, match="test-no-result.*NoneType"):
        onnxslim.optimize(small_model(), simplify=onnxslim.SimplifyOptions(passes="test-no-result"))


def test_the_input_model_is_never_modified():
    model = small_model()
    before = model.SerializeToString()
    onnxslim.optimize(model)
    assert model.SerializeToString() == before


def test_same_model_and_pipeline_give_the_same_bytes():
    first = onnxslim.optimize(small_model()).SerializeToString()
    second = onnxslim.optimize(small_model()).SerializeToString()
    assert first == second


# ----------------------------------------------------------------------------- verify-each


def add_model():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    bias = b.initializer("bias", random([3], seed=2))
    b.output(b.node("Relu", [b.node("Add", [b.node("Identity", [x]), bias])], ["y"]))
    return b.build()


def test_verify_each_names_the_pass_that_broke_the_model(break_add, tmp_path):
    model = add_model()
    with pytest.raises(onnxslim.VerificationError, match=f"pass '{break_add}'") as error:
        onnxslim.optimize(
            model, simplify=onnxslim.SimplifyOptions(passes=f"eliminate-noops,{break_add},eliminate-dead-nodes",
                                                     verify_each=True, dump_dir=tmp_path)
        )

    before, after = tmp_path / f"002-{break_add}-before.onnx", tmp_path / f"002-{break_add}-after.onnx"
    assert str(before) in str(error.value) and str(after) in str(error.value)
    before_model, after_model = onnx.load(before), onnx.load(after)
    assert ops(before_model)["Add"] == 1 and ops(before_model)["Identity"] == 0  # after eliminate-noops
    assert ops(after_model)["Sub"] == 1 and ops(after_model)["Add"] == 0
    assert onnxslim.verify(model, before_model).passed
    assert not onnxslim.verify(model, after_model).passed
    assert not (tmp_path / "003-eliminate-dead-nodes.onnx").exists()  # the run stopped at the broken pass


def test_without_verify_each_the_final_check_still_fails(break_add):
    with pytest.raises(onnxslim.VerificationError) as error:
        onnxslim.optimize(add_model(), simplify=onnxslim.SimplifyOptions(passes=f"eliminate-noops,{break_add}"))
    assert break_add not in str(error.value)  # only verify-each can say which pass it was


def test_verify_each_passes_the_default_pipeline(tmp_path):
    """Every intermediate model of the default pipeline is valid and equivalent (lifted Constants included)."""
    model = small_model()
    optimized, report = onnxslim.optimize(model, simplify=onnxslim.SimplifyOptions(verify_each=True, dump_dir=tmp_path),
                                          return_report=True)

    assert report.verification.passed
    dumped = sorted(path.name for path in tmp_path.glob("*.onnx"))
    assert dumped[0] == "000-input.onnx" and len(dumped) == 1 + sum(e.changed for e in report.run.executions)
    for path in tmp_path.glob("*.onnx"):
        onnx.checker.check_model(onnx.load(path))


# ----------------------------------------------------------------------------- idempotence


def idempotence_models():
    conv = ModelBuilder()
    x = conv.input("x", [1, 3, 8, 8])
    weight = conv.node("Mul", [conv.constant(random([4, 3, 3, 3], seed=3)), conv.constant(np.array(2, np.float32))])
    y = conv.node("Conv", [conv.node("Identity", [x]), weight], pads=[1, 1, 1, 1])
    batch, rest = conv.constant(np.array([1], np.int64)), conv.constant(np.array([-1], np.int64))
    shape = conv.node("Concat", [batch, rest], axis=0)
    conv.node("Exp", [y])
    conv.output(conv.node("Reshape", [conv.node("Dropout", [y]), shape], ["y"]))

    noops = ModelBuilder()
    x = noops.input("x", [2, 3, 4])
    zero = noops.initializer("zero", np.array(0, np.float32))
    a = noops.node("Transpose", [noops.node("Add", [x, zero])], perm=[0, 1, 2])
    b = noops.node("Reshape", [noops.node("Relu", [a]), noops.initializer("shape", np.array([2, 3, 4], np.int64))])
    bounds = [
        noops.initializer(name, np.array([value], np.int64)) for name, value in (("starts", 0), ("ends", 3), ("axes", 1))
    ]
    c = noops.node("Slice", [b, *bounds])
    noops.output(noops.node("Identity", [noops.node("Identity", [c])], ["y"]))

    branch = ModelBuilder()
    x = branch.input("x", [2, 3])
    condition = branch.input("c", [], np.bool_)
    then = branch.branch()
    then.node("Exp", [x])
    negated = then.node("Neg", [then.constant(np.ones([3], np.float32))])
    then.output(then.node("Add", [then.node("Identity", [x]), negated]))
    other = branch.branch()
    other.output(other.node("Mul", [x, other.constant(np.array(1, np.float32))]))
    branch.output(branch.node("Identity", [branch.node("Relu", [branch.if_node(condition, then, other)])], ["y"]))

    return {"conv": conv.build(), "noops": noops.build(), "branch": branch.build(), "small": small_model()}


IDEMPOTENCE_MODELS = idempotence_models()


def real_passes():
    return [spec.name for spec in onnxslim.registered_passes() if not spec.name.startswith("test-")]


# Passes that need calibration data run here in the mode that needs none.
OPTIONS_WITHOUT_DATA = {"quantize-int8": {"mode": "weights"}}


@pytest.mark.parametrize("model_name", sorted(IDEMPOTENCE_MODELS))
@pytest.mark.parametrize("pass_name", real_passes())
def test_every_pass_is_idempotent(pass_name, model_name):
    """Run each pass twice on one graph (as a fixed point does): the second run changes nothing."""
    model = IDEMPOTENCE_MODELS[model_name]
    graph = to_graph(model)
    spec = onnxslim.get_pass(pass_name)
    options = OPTIONS_WITHOUT_DATA.get(pass_name, {})
    spec(graph, onnxslim.PassContext(), **options)
    once = to_model(graph, model).SerializeToString()

    second = spec(graph, onnxslim.PassContext(), **options)

    assert not second.changed, f"{pass_name} changed {model_name} again: {second}"
    assert to_model(graph, model).SerializeToString() == once


@pytest.mark.parametrize("model_name", sorted(IDEMPOTENCE_MODELS))
@pytest.mark.parametrize("pass_name", real_passes())
def test_every_pass_is_idempotent_across_export(pass_name, model_name):
    """The same after a round trip through ONNX (what a second `onnxslim optimize` sees)."""
    options = OPTIONS_WITHOUT_DATA.get(pass_name, {})
    once, _ = run_pass(IDEMPOTENCE_MODELS[model_name], pass_name, **options)
    _, second = run_pass(once, pass_name, **options)
    assert not second.changed, f"{pass_name} changed {model_name} again after export: {second}"


@pytest.mark.parametrize("model_name", sorted(IDEMPOTENCE_MODELS))
def test_default_pipeline_is_idempotent(model_name):
    model = IDEMPOTENCE_MODELS[model_name]
    feeds = None if model_name != "branch" else [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)]
    once = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds))
    twice, report = onnxslim.optimize(once, verify=onnxslim.VerifyOptions(inputs=feeds), return_report=True)
    assert not any(execution.changed for execution in report.run.executions)
    assert twice.SerializeToString() == once.SerializeToString()
