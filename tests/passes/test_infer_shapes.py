"""infer-shapes: annotates tensors with dtypes and shapes, changes no computation, reports "unchanged"."""

import numpy as np
import onnx
import pytest
import onnxslim
from builder import ModelBuilder, assert_equivalent, ops, random, run_pass
from onnxslim.graph import walk
from onnxslim.model import to_graph


def annotate(model):
    graph = to_graph(model)
    result = onnxslim.get_pass("infer-shapes")(graph, onnxslim.PassContext())
    return graph, result


def tensor(graph, name):
    return next(tensor for subgraph in walk(graph) for tensor in subgraph.tensors().values() if tensor.name == name)


def conv_model(weight_shape=(4, 3, 3, 3)):
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    w = b.initializer("w", random(weight_shape, seed=1))
    conv = b.node("Conv", [x, w], ["conv"], pads=[1, 1, 1, 1])
    relu = b.node("Relu", [conv], ["relu"])
    b.output(b.node("Flatten", [relu], ["y"]))
    return b.build()


def test_intermediate_tensors_get_dtypes_and_shapes():
    graph, result = annotate(conv_model())

    assert result.counters["annotated"] == 5  # dtype and shape of `conv` and `relu`, the shape of the output `y`
    assert tensor(graph, "conv").shape == [1, 4, 8, 8] and tensor(graph, "conv").dtype == np.float32
    assert tensor(graph, "relu").shape == [1, 4, 8, 8]
    assert tensor(graph, "y").shape == [1, 256]


def test_annotation_is_not_a_change_and_computes_the_same():
    """It must never make a fixed-point group go round again."""
    model = conv_model()
    annotated, result = run_pass(model, "infer-shapes")

    assert not result.changed
    assert ops(annotated) == ops(model)
    assert_equivalent(model, annotated)


def test_large_weights_still_give_shapes():
    """Weights above the data-propagation limit are handed over as typed inputs, not values."""
    graph, _ = annotate(conv_model(weight_shape=(64, 3, 3, 3)))  # 1728 elements
    assert tensor(graph, "conv").shape == [1, 64, 8, 8]
    assert isinstance(tensor(graph, "w"), onnxslim.model.gs.Constant)  # the graph keeps its weight


def test_shape_computations_propagate_values():
    """data_prop: Reshape by a Shape-derived tensor gets a static shape."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    shape = b.node("Shape", [x], ["shape"])
    b.output(b.node("Reshape", [b.node("Relu", [x], ["relu"]), shape], ["y"]))
    graph, _ = annotate(b.build())
    assert tensor(graph, "y").shape == [2, 3, 4]


def test_dynamic_dims_keep_their_names():
    b = ModelBuilder()
    x = b.input("x", ["batch", 3])
    b.output(b.node("Neg", [b.node("Relu", [x], ["relu"])], ["y"]))
    graph, _ = annotate(b.build())
    assert tensor(graph, "relu").shape == ["batch", 3]


def test_a_wrong_annotation_gives_way_to_what_the_graph_computes():
    """A value_info is a claim onnxruntime does not enforce: x:[N,4] -> Relu declared [1,4] is
    [N,4], and a pass that trusted [1,4] would bake the batch size into the model."""
    b = ModelBuilder()
    x = b.input("x", ["N", 4])
    relu = b.annotate(b.node("Relu", [x], ["relu"]), np.float32, [1, 4])
    b.output(b.node("Neg", [relu], ["y"]), np.float32, [1, 4])
    graph, result = annotate(b.build())

    assert tensor(graph, "relu").shape == ["N", 4] and tensor(graph, "y").shape == ["N", 4]
    assert result.counters["annotated"] == 2


def test_a_symbolic_dim_the_graph_computes_static_is_static():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    relu = b.annotate(b.node("Relu", [x], ["relu"]), np.float32, ["n", 3])
    b.output(b.node("Neg", [relu], ["y"]))
    graph, result = annotate(b.build())

    assert tensor(graph, "relu").shape == [2, 3] and tensor(graph, "y").shape == [2, 3]


def test_tensors_inside_if_branches_are_annotated():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    then.output(then.node("Neg", [then.node("Relu", [x], ["inner"])]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    graph, result = annotate(b.build())

    assert result.counters["annotated"] >= 2
    assert tensor(graph, "inner").shape == [2, 3] and tensor(graph, "inner").dtype == np.float32


def test_ir_version_3_model_is_annotated():
    """IR 3 lists initializers as inputs; inference still works and the export keeps that listing."""
    b = ModelBuilder(opset=8, ir_version=3)
    x = b.input("x", [2, 3])
    bias = b.initializer("bias", np.ones([3], np.float32))
    b.output(b.node("Neg", [b.node("Add", [x, bias], ["sum"])], ["y"]))
    model = b.build()

    graph, _ = annotate(model)
    assert tensor(graph, "sum").shape == [2, 3]

    annotated, _ = run_pass(model, "infer-shapes")
    assert annotated.ir_version == 3 and "bias" in {value.name for value in annotated.graph.input}
    assert_equivalent(model, annotated)


def test_uninferable_custom_op_leaves_tensors_unannotated():
    b = ModelBuilder()
    b.use_domain("com.example")
    x = b.input("x", [2, 3])
    custom = b.node("Mystery", [x], ["custom"], domain="com.example")
    b.output(b.node("Neg", [custom], ["y"]), np.float32, [2, 3])
    graph, _ = annotate(b.build())
    assert tensor(graph, "custom").shape is None


def test_branches_are_annotated_after_constants_were_lifted():
    """Lifted Constant nodes wait, disconnected, for dead-node elimination; bodies must still be matched up."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    shifted = b.node("Add", [x, b.constant(np.ones([3], np.float32))])
    then = b.branch()
    then.output(then.node("Neg", [then.node("Relu", [shifted], ["inner"])]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    graph = to_graph(b.build())
    onnxslim.get_pass("lift-constants")(graph, onnxslim.PassContext())

    onnxslim.get_pass("infer-shapes")(graph, onnxslim.PassContext())

    assert tensor(graph, "inner").shape == [2, 3]


# ----------------------------------------------------------------------------- dims onnx names itself

def computed_reshape_model(batch):
    """x -> Reshape(x, Max(a, c)) -> Expand(., [.., 12]) -> Relu. Inference cannot read a shape
    computed by Max (no data propagation through it): the Reshape's dims start as onnx's own
    `unk__N` names and become known once fold-constants turns Max into a constant, which also
    makes the Expand a no-op."""
    b = ModelBuilder()
    x = b.input("x", [batch, 3, 4])
    target = b.node("Max", [b.initializer("a", np.array([-1, 12], np.int64)), b.initializer("c", np.array([-1, 1], np.int64))])
    if batch == "N":  # the batch from Shape, divided by 1: inference propagates no value through Div
        one = b.initializer("one", np.array([1], np.int64))
        batch_size = b.node("Div", [b.node("Shape", [x], end=1), one])
        width = b.node("Slice", [target, one, b.initializer("two", np.array([2], np.int64))])
        target = b.node("Concat", [batch_size, width], axis=0)
    reshaped = b.node("Reshape", [x, target], ["reshaped"])
    expanded = b.node("Expand", [reshaped, b.initializer("e", np.array([1, 12], np.int64))], ["expanded"])
    b.output(b.node("Relu", [expanded], ["y"]))
    return b.build()


def test_a_dim_inference_named_itself_is_inferred_again_after_a_fold():
    """An `unk__N` dim says "not known yet", not "settled": once a rewrite upstream resolves it,
    the next infer-shapes must run and find it (it used to be skipped as complete)."""
    graph, _ = annotate(computed_reshape_model(2))
    assert all(isinstance(dim, str) and dim.startswith("unk__") for dim in tensor(graph, "reshaped").shape)

    onnxslim.get_pass("fold-constants")(graph, onnxslim.PassContext())
    result = onnxslim.get_pass("infer-shapes")(graph, onnxslim.PassContext())

    assert tensor(graph, "reshaped").shape == [2, 12] and tensor(graph, "y").shape == [2, 12]
    assert result.counters.get("skipped") is None and result.counters["annotated"] >= 2


def test_a_dim_inference_named_itself_gives_way_to_the_models_name():
    """onnx keeps a dim name it is handed over the one it computes: the made-up name must not be
    handed back, or the Reshape would stay [unk__0, 12] instead of [N, 12]."""
    graph, _ = annotate(computed_reshape_model("N"))
    assert tensor(graph, "reshaped").shape[0].startswith("unk__")

    onnxslim.get_pass("eliminate-noops")(graph, onnxslim.PassContext())  # x / 1
    onnxslim.get_pass("fold-constants")(graph, onnxslim.PassContext())
    onnxslim.get_pass("infer-shapes")(graph, onnxslim.PassContext())

    assert tensor(graph, "reshaped").shape == ["N", 12] and tensor(graph, "y").shape == ["N", 12]


def test_names_from_an_earlier_inference_are_not_kept():
    """Each inference numbers its names from unk__0: a name kept from an earlier one could meet
    the same name given to another size now, and passes read one name as one size. A tensor the
    latest inference says nothing about forgets the name an earlier one gave it."""
    b = ModelBuilder()
    b.use_domain("com.example")
    x = b.input("x", [2, 3])
    first = b.node("NonZero", [b.node("Relu", [x])], ["first"])
    second = b.node("NonZero", [b.node("Neg", [x])], ["second"])
    b.output(first)
    b.output(second)
    graph = to_graph(b.build())
    onnxslim.get_pass("infer-shapes")(graph, onnxslim.PassContext())
    assert tensor(graph, "first").shape[1] == "unk__0" and tensor(graph, "second").shape[1] == "unk__1"

    # a rewrite: `first` computed by an op inference knows nothing of
    producer = tensor(graph, "first").inputs[0]
    producer.op, producer.domain = "Mystery", "com.example"
    onnxslim.get_pass("infer-shapes")(graph, onnxslim.PassContext())

    assert tensor(graph, "second").shape[1] == "unk__0"  # numbered afresh
    assert tensor(graph, "first").shape == [2, None]


@pytest.mark.parametrize("batch", [2, "N"])
def test_optimize_is_a_fixed_point_when_a_fold_resolves_made_up_dims(batch):
    """The first run must find what the second would: the Expand is a no-op once the Reshape
    before it has known dims, and the output optimized again is the same bytes."""
    model = computed_reshape_model(batch)
    once = onnxslim.optimize(model, verify=False)
    twice = onnxslim.optimize(once, verify=False)

    assert "Expand" not in ops(once) or batch == "N"
    assert twice.SerializeToString() == once.SerializeToString()
    assert_equivalent(model, once, {"x": random([2, 3, 4])})


def test_written_value_info_carries_no_made_up_names():
    """value_info the input had is written back with onnx's made-up dims unnamed: their numbers
    depend on which of the pipeline's inferences gave them, and a second run gives others."""
    b = ModelBuilder()
    x = b.input("x", ["N", 3])
    dead = b.node("NonZero", [b.node("Neg", [x])])  # numbered first by the first inference, then removed
    b.node("Shape", [dead], ["unused"])
    kept = b.node("NonZero", [b.node("Relu", [x])], ["kept"])
    b.annotate(kept, np.int64, None)
    b.output(b.node("Neg", [kept], ["y"]))
    model = b.build()
    once = onnxslim.optimize(model, verify=False)
    twice = onnxslim.optimize(once, verify=False)

    value = next(value for value in once.graph.value_info if value.name == "kept")
    assert [dim.dim_value or dim.dim_param for dim in value.type.tensor_type.shape.dim] == [2, ""]
    assert twice.SerializeToString() == once.SerializeToString()


@pytest.mark.parametrize("domain, op", [("com.microsoft", "QuickGelu"), ("com.microsoft", "FastGelu"),
                                        ("", "SimplifiedLayerNormalization")])
def test_onnxruntime_fused_ops_keep_their_inputs_shape_and_inference_goes_on_past_them(domain, op):
    """onnx has no schema for onnxruntime's fused ops (its offline optimizer writes them, one in
    the default domain): their first output has their first input's type and shape, so what
    follows is inferred too, and the Shape read of it folds."""
    b = ModelBuilder()
    if domain:
        b.use_domain(domain)
    x = b.input("x", ["N", 3, 4])
    inputs = [x] if op != "SimplifiedLayerNormalization" else [x, b.initializer("scale", random([4], seed=2))]
    fused = b.node(op, inputs, ["fused"], domain=domain)
    relu = b.node("Relu", [fused], ["after"])
    last = b.node("Gather", [b.node("Shape", [relu]), b.initializer("two", np.array(2, np.int64))])
    b.output(b.node("Mul", [relu, b.node("Cast", [last], to=1)], ["y"]), np.float32, ["N", 3, 4])
    model = b.build(check=not op.startswith("Simplified"))  # the checker knows no such default-domain op

    graph, _ = annotate(model)
    assert tensor(graph, "fused").shape == ["N", 3, 4] and tensor(graph, "fused").dtype == np.float32
    assert tensor(graph, "after").shape == ["N", 3, 4]
    optimized = onnxslim.optimize(model)
    assert "Shape" not in ops(optimized)  # the last dim, 4, is known past the fused op
    assert_equivalent(model, optimized)


def test_a_chain_of_onnxruntime_fused_ops_is_typed_in_one_inference():
    """One infer-shapes run types every op of a chain (a block per layer, as ConvNeXt's BiasGelu):
    when it typed only a few, the rest waited for later rounds of the fixed point, and a second
    optimize of the output, with fewer rounds, wrote other shapes (not a fixed point)."""
    b = ModelBuilder()
    b.use_domain("com.microsoft")
    current = b.input("x", ["N", 3, 4])
    for index in range(6):
        current = b.node("QuickGelu", [b.node("Relu", [current])], [f"gelu{index}"], domain="com.microsoft")
    b.output(b.node("Neg", [current], ["y"]), np.float32, ["N", 3, 4])
    graph, _ = annotate(b.build())
    assert [tensor(graph, f"gelu{index}").shape for index in range(6)] == [["N", 3, 4]] * 6


def sliced_to_a_computed_count(loop=False):
    """masks[n, 1, 4, 4] sliced on axis 0 to a computed count (as a detector keeps its detections):
    onnx's inference loses every dim of the Slice; the unsliced ones are the input's. With `loop`,
    a Loop body reads the sliced masks, one per iteration, and takes the shape of one."""
    b = ModelBuilder()
    masks = b.input("masks", ["n", 1, 4, 4])
    keep = b.input("keep", [1], np.int64)
    zero = b.initializer("zero", np.array([0], np.int64))
    sliced = b.node("Slice", [masks, zero, b.node("Abs", [keep], ["count"]), zero], ["sliced"])
    padded = b.node("Pad", [sliced, b.initializer("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], ["padded"])
    if not loop:
        b.output(padded, np.float32, None)
        return b.build()
    body = b.branch()
    body.inputs = [
        onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
        onnx.helper.make_tensor_value_info("condition_in", onnx.TensorProto.BOOL, []),
    ]
    one = body.node("Gather", [padded, "i"], ["one"], axis=0)
    body.output(body.node("Identity", ["condition_in"]), np.bool_, [])
    body.output(body.node("Shape", [one], ["one_shape"]), np.int64, [3])
    trips = b.node("Squeeze", [b.node("Shape", [sliced], start=0, end=1)], ["trips"])
    b.output(b.node("Loop", [trips, ""], ["shapes"], body=body.graph()), np.int64, [None, 3])
    return b.build()


def test_a_slice_with_a_computed_end_keeps_the_dims_it_does_not_slice():
    graph, _ = annotate(sliced_to_a_computed_count())

    assert tensor(graph, "sliced").shape[1:] == [1, 4, 4]
    assert tensor(graph, "padded").shape[1:] == [1, 6, 6]  # and what follows is inferred from them


def test_a_loop_body_sees_the_dims_kept_past_a_slice_and_folds_their_shape():
    model = sliced_to_a_computed_count(loop=True)

    graph, _ = annotate(model)
    optimized = onnxslim.optimize(model, verify=False)

    assert tensor(graph, "one").shape == [1, 6, 6]
    assert ops(optimized)["Shape"] == 1  # the body's Shape is a constant now; the trip count's stays
    feeds = [{"masks": random([size, 1, 4, 4], seed=size), "keep": np.array([count], np.int64)} for size, count in ((2, 1), (5, 4))]
    assert_equivalent(model, optimized, feeds)
    assert onnxslim.optimize(optimized, verify=False) == optimized


@pytest.mark.parametrize("axes", [None, [-1]])
def test_the_axes_a_slice_slices_are_given_or_the_first_ones_and_only_they_change(axes):
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    end = b.node("Abs", [b.input("end", [1], np.int64)], ["end_abs"])
    start = b.initializer("start", np.array([0], np.int64))
    inputs = [x, start, end] + ([b.initializer("axes", np.array(axes, np.int64))] if axes else [])
    b.output(b.node("Slice", inputs, ["y"]), np.float32, None)

    graph, _ = annotate(b.build())

    shape = tensor(graph, "y").shape
    assert shape[1:] == [3, 4] if axes is None else (shape[:2] == [2, 3] and not isinstance(shape[2], int))
