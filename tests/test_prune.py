"""Structured channel pruning: dependency groups, surgery, and the exactness check on every group type.

Each graph is cut at ratio 0.5 and must then equal, output for output, the original with the
removed channels' consumer weights zeroed (prune_model's second result): a surgery bug shows up
as a difference, pruning's own cost does not.
"""

import numpy as np
import onnx
import pytest
from builder import ModelBuilder, assert_equivalent, random
from click.testing import CliRunner

import onnxslim
from onnxslim.calibration import CalibrationData
from onnxslim.cli import cli
from onnxslim.errors import UsageError
from onnxslim.graph import op_histogram
from onnxslim.prune import PruneOptions, analyze, prune_model
from onnxslim.quantize import QuantizeOptions

rng_seed = iter(range(1000))


def weight(*shape):
    return random(list(shape), seed=next(rng_seed))


def conv(b, x, cin, cout, name, k=3, **attrs):
    attrs.setdefault("pads", [k // 2] * 4)
    return b.node("Conv", [x, b.initializer(f"{name}_w", weight(cout, cin, k, k)), b.initializer(f"{name}_b", weight(cout))],
                  [name], name=name, **attrs)


def cut(model, ratio=0.5, **choose):
    """Prune `model` at `ratio`; check the result is valid and exactly the zeroed original."""
    plan = analyze(model).choose(ratio, **choose)
    pruned, zeroed = prune_model(model, plan)
    onnx.checker.check_model(pruned, full_check=True)
    assert_equivalent(zeroed, pruned)
    return plan, pruned


def weights(model) -> dict[str, tuple]:
    return {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}


def pruned_dims(model) -> dict[str, tuple]:
    """Weight shapes by their names before the cut (the surgery names a cut weight '<name>_pruned')."""
    return {name.removesuffix("_pruned"): shape for name, shape in weights(model).items()}


def group_of(plan, producer):
    return next(group for group in plan.groups.values() if producer in group.producers)


# ----------------------------------------------------------------------------- group types


def test_conv_chain_cuts_rows_of_the_producer_and_columns_of_the_consumer():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    b.output(conv(b, b.node("Relu", [conv(b, x, 3, 8, "c1")]), 8, 4, "c2"))
    plan, pruned = cut(b.build())
    assert group_of(plan, "c1").prunable and group_of(plan, "c2").frozen == "graph output 'c2'"
    shapes = [dims for name, dims in weights(pruned).items() if len(dims) == 4]
    assert sorted(shapes) == [(4, 3, 3, 3), (4, 4, 3, 3)]  # c1 keeps 4 of 8 filters, c2 reads those 4


def test_batchnorm_pooling_and_per_channel_constants_are_cut_with_the_channels():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    c1 = conv(b, x, 3, 8, "c1")
    bn = b.node("BatchNormalization", [c1, b.initializer("g", weight(8)), b.initializer("beta", weight(8)),
                                       b.initializer("mean", weight(8)), b.initializer("var", np.abs(weight(8)) + 0.5)])
    scaled = b.node("Mul", [b.node("MaxPool", [b.node("Relu", [bn])], kernel_shape=[2, 2]), b.initializer("s", weight(8, 1, 1))])
    slope = b.node("PRelu", [scaled, b.initializer("slope", weight(8, 1, 1))])
    b.output(conv(b, slope, 8, 4, "c2"))
    plan, pruned = cut(b.build())
    assert group_of(plan, "c1").prunable
    dims = weights(pruned)
    assert all(dims[name][0] == 4 for name in dims if name.startswith(("g_", "beta_", "mean_", "var_", "s_", "slope_")))


def test_residual_add_ties_both_sides_into_one_group():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.node("Relu", [conv(b, x, 3, 8, "a")])
    inner = conv(b, b.node("Relu", [conv(b, a, 8, 6, "b1")]), 6, 8, "b2")
    joined = b.node("Add", [a, inner])
    b.output(conv(b, joined, 8, 4, "c"))
    plan, pruned = cut(b.build())
    group = group_of(plan, "a")
    assert set(group.producers) == {"a", "b2"} and set(group.consumers) >= {"b1", "c"}
    assert group_of(plan, "b1").prunable and group_of(plan, "b1") is not group


def test_depthwise_conv_is_a_member_and_its_group_attribute_follows():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    expand = conv(b, x, 3, 8, "expand", k=1)
    depthwise = b.node("Conv", [expand, b.initializer("dw_w", weight(8, 1, 3, 3)), b.initializer("dw_b", weight(8))],
                       ["dw"], name="dw", group=8, pads=[1, 1, 1, 1])
    b.output(conv(b, b.node("Relu", [depthwise]), 8, 4, "project", k=1))
    plan, pruned = cut(b.build())
    node = next(node for node in pruned.graph.node if node.name == "dw")
    assert next(a.i for a in node.attribute if a.name == "group") == 4


@pytest.mark.parametrize("out_per_group", [4, 8])
def test_grouped_conv_loses_whole_conv_groups_in_and_out(out_per_group):
    """ResNeXt's bottleneck: 1x1 to 16 channels, a 3x3 conv in 4 groups, 1x1 out. A conv-group
    goes with its 4 input channels and its filters; the weight keeps reading 4 channels a group."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    wide = 4 * out_per_group
    grouped = b.node("Conv", [b.node("Relu", [conv(b, x, 3, 16, "c1", k=1, pads=[0, 0, 0, 0])]),
                              b.initializer("g_w", weight(wide, 4, 3, 3)), b.initializer("g_b", weight(wide))],
                     ["g"], name="g", group=4, pads=[1, 1, 1, 1])
    b.output(conv(b, b.node("Relu", [grouped]), wide, 5, "c3", k=1, pads=[0, 0, 0, 0]))
    plan, pruned = cut(b.build())
    group = group_of(plan, "c1")
    assert group is group_of(plan, "g") and group.size == 4 and len(plan.kept[group.id]) == 2
    dims = pruned_dims(pruned)
    assert dims["c1_w"] == (8, 3, 1, 1) and dims["g_w"] == (wide // 2, 4, 3, 3) and dims["g_b"] == (wide // 2,)
    assert dims["c3_w"] == (5, wide // 2, 1, 1)
    node = next(node for node in pruned.graph.node if node.op_type == "Conv" and node.input[1].startswith("g_w"))
    assert onnx.helper.get_node_attr_value(node, "group") == 2


def test_squeeze_excitation_gates_of_a_grouped_conv_go_with_its_conv_groups():
    """RegNetY's block: the grouped conv's features are gated per channel by an SE branch. A removed
    conv-group takes its 4 channels' gates (the excite conv's rows) and their columns in the
    squeeze conv with it."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    inner = b.node("Relu", [conv(b, x, 3, 16, "c1", k=1, pads=[0, 0, 0, 0])])
    features = b.node("Relu", [b.node("Conv", [inner, b.initializer("g_w", weight(16, 4, 3, 3))], ["g"], name="g",
                                      group=4, pads=[1, 1, 1, 1])])
    squeezed = b.node("Relu", [conv(b, b.node("GlobalAveragePool", [features]), 16, 4, "se1", k=1, pads=[0, 0, 0, 0])])
    gate = b.node("Sigmoid", [conv(b, squeezed, 4, 16, "se2", k=1, pads=[0, 0, 0, 0])])
    b.output(conv(b, b.node("Mul", [features, gate]), 16, 5, "c3", k=1, pads=[0, 0, 0, 0]))
    plan, pruned = cut(b.build())
    group = group_of(plan, "g")
    assert group is group_of(plan, "c1") and group is group_of(plan, "se2") and len(plan.kept[group.id]) == 2
    dims = pruned_dims(pruned)
    assert dims["g_w"] == (8, 4, 3, 3) and dims["se1_w"] == (2, 8, 1, 1) and dims["se2_w"] == (8, 2, 1, 1)
    assert dims["se2_b"] == (8,) and dims["c3_w"] == (5, 8, 1, 1)


@pytest.mark.parametrize("after", ["InstanceNormalization", "depthwise"])
def test_what_reads_a_grouped_convs_blocks_is_cut_in_blocks_or_frozen(after):
    """InstanceNormalization's scale and bias lose whole blocks; a depthwise Conv counts channels
    in its group attribute, so it freezes the blocks it reads (an invalid model otherwise)."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    grouped = b.node("Conv", [b.node("Relu", [conv(b, x, 3, 16, "c1", k=1, pads=[0, 0, 0, 0])]),
                              b.initializer("g_w", weight(16, 4, 3, 3))], ["g"], name="g", group=4, pads=[1, 1, 1, 1])
    if after == "InstanceNormalization":
        read = b.node(after, [grouped, b.initializer("in_scale", weight(16)), b.initializer("in_bias", weight(16))])
    else:
        read = b.node("Conv", [grouped, b.initializer("dw_w", weight(16, 1, 3, 3))], name="dw", group=16, pads=[1, 1, 1, 1])
    b.output(conv(b, b.node("Relu", [read]), 16, 5, "c3", k=1, pads=[0, 0, 0, 0]))
    plan, pruned = cut(b.build())
    group = group_of(plan, "g")
    if after == "depthwise":
        assert "depthwise" in group.frozen and plan.kept == {}
    else:
        dims = pruned_dims(pruned)
        assert len(plan.kept[group.id]) == 2 and dims["in_scale"] == dims["in_bias"] == (8,)


def test_grouped_conv_block_with_a_residual_pruned_end_to_end():
    """The whole step on a ResNeXt block (residual Add around it): choice by activation, refit,
    the surgery check, and a valid model that runs."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    stem = b.node("Relu", [conv(b, x, 3, 16, "stem", k=1, pads=[0, 0, 0, 0])])
    inner = b.node("Relu", [conv(b, stem, 16, 16, "c1", k=1, pads=[0, 0, 0, 0])])
    grouped = b.node("Relu", [b.node("Conv", [inner, b.initializer("g_w", weight(16, 4, 3, 3))], ["g"], name="g",
                                     group=4, pads=[1, 1, 1, 1])])
    block = b.node("Add", [conv(b, grouped, 16, 16, "c3", k=1, pads=[0, 0, 0, 0]), stem])
    b.output(conv(b, b.node("Relu", [block]), 16, 4, "head", k=1, pads=[0, 0, 0, 0]))
    model = b.build()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=600 + i)} for i in range(32)])
    options = PruneOptions(ratio=0.5, check_surgery=True, allocation="uniform")
    pruned, report = onnxslim.optimize(model, prune=options, calibration=data, verify=False, return_report=True)
    assert report.pruning.surgery_exact is True
    grouped_row = next(row for row in report.pruning.groups if "g" in row["producers"])
    assert grouped_row["channels"] == 4 and grouped_row["kept"] < 4
    onnx.checker.check_model(pruned, full_check=True)
    assert report.pruning.fidelity["pruned + refit"]["sqnr_db"] >= report.pruning.fidelity["pruned"]["sqnr_db"] - 0.01


def test_squeeze_excitation_mul_ties_the_gate_to_the_features():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    features = b.node("Relu", [conv(b, x, 3, 8, "features")])
    pooled = b.node("GlobalAveragePool", [features])
    gate = b.node("Sigmoid", [conv(b, b.node("Relu", [conv(b, pooled, 8, 2, "squeeze", k=1)]), 2, 8, "excite", k=1)])
    b.output(conv(b, b.node("Mul", [features, gate]), 8, 4, "out", k=1))
    plan, _ = cut(b.build())
    assert set(group_of(plan, "features").producers) == {"features", "excite"}
    assert group_of(plan, "squeeze").prunable


def test_concat_lays_groups_side_by_side_at_their_offsets():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    left, right = conv(b, x, 3, 6, "left"), conv(b, x, 3, 4, "right")
    b.output(conv(b, b.node("Concat", [left, right], axis=1), 10, 4, "fuse", k=1))
    plan, pruned = cut(b.build())
    assert weights(pruned)[next(n for n in weights(pruned) if n.startswith("fuse_w"))][1] == 3 + 2


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape 0,-1", "Reshape -1,explicit"])
def test_flatten_into_gemm_cuts_blocks_of_channel_times_spatial(flatten):
    b = ModelBuilder()
    x = b.input("x", [1, 3, 4, 4])
    features = b.node("Relu", [conv(b, x, 3, 6, "c1")])
    if flatten == "Flatten":
        flat = b.node("Flatten", [features], axis=1)
    else:
        shape = [0, -1] if flatten == "Reshape 0,-1" else [-1, 6 * 16]
        flat = b.node("Reshape", [features, b.initializer("shape", np.array(shape, np.int64))])
    b.output(b.node("Gemm", [flat, b.initializer("fc_w", weight(5, 6 * 16)), b.initializer("fc_b", weight(5))],
                    ["y"], name="fc", transB=1))
    plan, pruned = cut(b.build())
    assert weights(pruned)[next(n for n in weights(pruned) if n.startswith("fc_w"))] == (5, 3 * 16)


def test_transformer_ffn_intermediate_neurons_are_a_group():
    b = ModelBuilder()
    x = b.input("x", [2, 4, 8])
    hidden = b.node("Add", [b.node("MatMul", [x, b.initializer("w1", weight(8, 16))], name="fc1"), b.initializer("b1", weight(16))])
    activated = b.node("Mul", [hidden, b.node("Sigmoid", [hidden])])  # SiLU: the group joins itself
    out = b.node("Add", [b.node("MatMul", [activated, b.initializer("w2", weight(16, 8))], name="fc2"), b.initializer("b2", weight(8))])
    b.output(b.node("Add", [out, x], ["y"]))  # the residual reads the graph input: the 8 model channels stay
    plan, pruned = cut(b.build())
    assert group_of(plan, "fc1").prunable and group_of(plan, "fc2").frozen
    dims = weights(pruned)
    assert dims[next(n for n in dims if n.startswith("w1"))] == (8, 8) and dims[next(n for n in dims if n.startswith("w2"))] == (8, 8)


def attention(b, x, heads=4, size=4, merge=None, keys=None):
    """BERT's self-attention as torch exports it: Q, K, V projections with biases, Reshape to
    [B, S, heads, size], Transpose, Q·Kᵀ scaled and masked, Softmax, ·V, back to [B, S, heads·size],
    and the output projection. `keys` replaces Kᵀ by another tensor; `merge` is the last Reshape's shape."""
    width = heads * size

    def project(name):
        product = b.node("MatMul", [x, b.initializer(f"{name}_w", weight(width, width))], name=name)
        return b.node("Add", [product, b.initializer(f"{name}_b", weight(width))])

    split = b.initializer("split", np.array([0, -1, heads, size], np.int64))
    q = b.node("Transpose", [b.node("Reshape", [project("q"), split])], perm=[0, 2, 1, 3])
    k = keys or b.node("Transpose", [b.node("Reshape", [project("k"), split])], perm=[0, 2, 3, 1])
    v = b.node("Transpose", [b.node("Reshape", [project("v"), split])], perm=[0, 2, 1, 3])
    scores = b.node("Mul", [b.node("MatMul", [q, k]), b.initializer("scale", np.array(size ** -0.5, np.float32))])
    probabilities = b.node("Softmax", [b.node("Add", [scores, b.input("mask", [2, 1, 1, 5])])], axis=-1)
    context = b.node("Transpose", [b.node("MatMul", [probabilities, v])], perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [context, b.initializer("merge", np.array(merge or [0, 0, width], np.int64))])
    out = b.node("Add", [b.node("MatMul", [merged, b.initializer("o_w", weight(width, width))], name="o"),
                         b.initializer("o_b", weight(width))])
    return b.node("Add", [out, x], ["y"])  # the residual keeps the model width


@pytest.mark.parametrize("merge", [None, [0, 0, -1]])
def test_attention_heads_are_a_group(merge):
    b = ModelBuilder()
    b.output(attention(b, b.input("x", [2, 5, 16]), merge=merge))
    plan, pruned = cut(b.build())  # 2 of 4 heads go
    heads = group_of(plan, "q")
    assert heads.size == 4 and heads.prunable and set(heads.producers) == {"q", "k", "v"} and heads.consumers == ["o"]
    dims = weights(pruned)
    for name in ("q_w", "k_w", "v_w"):
        assert dims[next(n for n in dims if n.startswith(name))] == (16, 8)
    assert dims[next(n for n in dims if n.startswith("o_w"))] == (8, 16)
    reshapes = {tuple(onnx.numpy_helper.to_array(t).tolist()) for t in pruned.graph.initializer if t.data_type == onnx.TensorProto.INT64 and t.dims}
    assert (0, -1, 2, 4) in reshapes and (merge is not None or (0, 0, 8) in reshapes), reshapes


def test_attention_heads_pruned_and_refit_end_to_end():
    b = ModelBuilder()
    b.output(attention(b, b.input("x", [2, 5, 16])))
    model = b.build()
    feeds = [{"x": random([2, 5, 16], seed=900 + i), "mask": np.zeros([2, 1, 1, 5], np.float32)} for i in range(8)]
    options = PruneOptions(ratio=0.5, allocation="uniform", check_surgery=True)
    # merge-parallel-matmuls joins the q, k and v layers (not in the default pipeline: added here).
    merging = onnxslim.Pipeline.parse(str(onnxslim.Pipeline.preset("default")).replace(
        "fuse-matmul-add,", "fuse-matmul-add,merge-parallel-matmuls,"))
    pruned, report = onnxslim.optimize(model, simplify=merging, prune=options,
                                       calibration=CalibrationData.from_feeds(model, feeds), return_report=True)
    onnx.checker.check_model(pruned, full_check=True)
    assert report.pruning.surgery_exact
    assert [g["kept"] for g in report.pruning.groups if "q" in g["producers"]] == [2]
    # The output projection reads the kept heads: the refit takes it on (random heads predict one
    # another poorly, so it may keep the pruned weights).
    assert report.pruning.reconstruction["o"]["status"] in ("refit", "kept"), report.pruning.reconstruction["o"]
    # The projections merge into one MatMul and a Split only after pruning, which plans on them one by one.
    assert op_histogram(pruned)["Split"] == 1 and op_histogram(pruned)["MatMul"] == 4


def test_attention_with_keys_from_elsewhere_keeps_its_heads():
    """Q·K where K does not come from a projection the plan tracks: Q's heads cannot be cut alone."""
    b = ModelBuilder()
    b.output(attention(b, b.input("x", [2, 5, 16]), keys=b.input("keys", [2, 4, 4, 5])))
    assert "MatMul" in frozen_reason(b.build(), "q")


def fused_attention(b, x, heads=4, size=4, separate_values=False):
    """A ViT/SVTR-style block: one projection makes Q, K and V, Reshape [B, N, 3, heads, size],
    Transpose(2, 0, 3, 1, 4), and Gather picks each part. `separate_values` takes V from a
    projection of its own instead (the fused V part then goes unused)."""
    width = heads * size
    qkv = b.node("Add", [b.node("MatMul", [x, b.initializer("qkv_w", weight(width, 3 * width))], name="qkv"),
                         b.initializer("qkv_b", weight(3 * width))])
    shape = b.initializer("parts", np.array([0, 0, 3, heads, size], np.int64))
    parts = b.node("Transpose", [b.node("Reshape", [qkv, shape])], perm=[2, 0, 3, 1, 4])
    q, k, v = (b.node("Gather", [parts, b.initializer(f"part{i}", np.array(i, np.int64))], axis=0) for i in range(3))
    if separate_values:
        values = b.node("Add", [b.node("MatMul", [x, b.initializer("v_w", weight(width, width))], name="v"),
                                b.initializer("v_b", weight(width))])
        split = b.initializer("split", np.array([0, -1, heads, size], np.int64))
        v = b.node("Transpose", [b.node("Reshape", [values, split])], perm=[0, 2, 1, 3])
    scores = b.node("Mul", [b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 1, 3, 2])]),
                            b.initializer("scale", np.array(size ** -0.5, np.float32))])
    context = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    merged = b.node("Reshape", [b.node("Transpose", [context], perm=[0, 2, 1, 3]),
                                b.initializer("merge", np.array([0, 0, width], np.int64))])
    out = b.node("Add", [b.node("MatMul", [merged, b.initializer("o_w", weight(width, width))], name="o"),
                         b.initializer("o_b", weight(width))])
    return b.node("Add", [out, x], ["y"])


def test_fused_qkv_projection_heads_are_a_group():
    b = ModelBuilder()
    b.output(fused_attention(b, b.input("x", [2, 5, 16])))
    plan, pruned = cut(b.build())
    heads = group_of(plan, "qkv")
    assert heads.size == 4 and heads.prunable and heads.producers == ["qkv"] and heads.consumers == ["o"]
    dims = weights(pruned)
    assert dims[next(n for n in dims if n.startswith("qkv_w"))] == (16, 24)  # 2 heads of 4 in each of Q, K, V
    assert dims[next(n for n in dims if n.startswith("o_w"))] == (8, 16)
    reshapes = {tuple(onnx.numpy_helper.to_array(t).tolist()) for t in pruned.graph.initializer if t.data_type == onnx.TensorProto.INT64 and t.dims}
    assert {(0, 0, 3, 2, 4), (0, 0, 8)} <= reshapes, reshapes


def test_heads_split_after_the_reshape_stay_counted_right():
    """[B, S, 3·H·D] -> [B, S, 3H, D], Transpose, then Split of the heads axis into Q, K and V: the
    Split divides the heads' group after the Reshape counted it; the Reshape must still count
    every part's kept heads."""
    b = ModelBuilder()
    x = b.input("x", [2, 5, 16])
    qkv = b.node("MatMul", [x, b.initializer("qkv_w", weight(16, 48))], name="qkv")
    heads = b.node("Transpose", [b.node("Reshape", [qkv, b.initializer("shape", np.array([0, 0, 12, 4], np.int64))])],
                   perm=[0, 2, 1, 3])
    q, k, v = b.node("Split", [heads, b.initializer("sizes", np.array([4, 4, 4], np.int64))], 3, axis=1)
    scores = b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 1, 3, 2])])
    context = b.node("Transpose", [b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [context, b.initializer("merge", np.array([0, 0, 16], np.int64))])
    b.output(b.node("Add", [b.node("MatMul", [merged, b.initializer("o_w", weight(16, 16))], name="o"), x], ["y"]))
    plan, pruned = cut(b.build())
    assert group_of(plan, "qkv").prunable
    reshapes = {tuple(onnx.numpy_helper.to_array(t).tolist()) for t in pruned.graph.initializer
                if t.data_type == onnx.TensorProto.INT64 and t.dims}
    assert (0, 0, 6, 4) in reshapes, reshapes  # 2 of 4 heads in each of the three parts


def test_slice_of_a_tensor_concatenated_with_itself_freezes_the_group():
    b = ModelBuilder()
    c1 = b.node("Relu", [conv(b, b.input("x", [1, 3, 8, 8]), 3, 4, "c1")])
    b.output(conv(b, sliced(b, b.node("Concat", [c1, c1], axis=1), [2], [6], [1]), 4, 4, "c2", k=1))
    assert "laid out twice" in frozen_reason(b.build(), "c1")


def test_fused_projection_whose_parts_go_different_ways_is_frozen():
    b = ModelBuilder()
    b.output(fused_attention(b, b.input("x", [2, 5, 16]), separate_values=True))
    plan = analyze(b.build())
    assert "fused projection" in group_of(plan, "qkv").frozen
    assert all(group.frozen for group in plan.groups.values() if "qkv" in group.producers)
    assert group_of(plan, "v").frozen  # tied to Q's and K's heads by the attention


def test_bn_criterion_keeps_the_channels_of_largest_gamma():
    """c1 -> BatchNormalization -> Relu -> c2. The simplified model has the BN folded into c1; the
    bn criterion still ranks c1's channels by the original |γ| (the BN output's scale), where the
    folded weights' norms (γ/σ·‖w‖) rank the other channels first."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    gamma = np.array([0.01, 5, 0.02, 4, 3, 0.03, 2, 0.04], np.float32)  # channels 1, 3, 4, 6 matter
    variance = np.where(gamma > 1, 1e4, 1e-4).astype(np.float32)
    c1 = b.node("Conv", [x, b.initializer("c1_w", weight(8, 3, 3, 3)), b.initializer("c1_b", weight(8))], ["c1"],
                name="c1", pads=[1, 1, 1, 1])
    bn = b.node("BatchNormalization", [c1, b.initializer("gamma", gamma), b.initializer("beta", weight(8)),
                                       b.initializer("mean", weight(8)), b.initializer("var", variance)])
    b.output(conv(b, b.node("Relu", [bn]), 8, 4, "c2", k=1))
    model = b.build()
    options = PruneOptions(ratio=0.5, criterion="bn", reconstruct=False, check_surgery=True)
    pruned, report = onnxslim.optimize(model, prune=options, return_report=True)
    assert report.pruning.surgery_exact
    assert any("1 of 2 layers scored by their BatchNormalization" in note for note in report.pruning.notes)
    kept = next(g["kept"] for g in report.pruning.groups if "c1" in g["producers"])
    assert kept == 4
    # The kept filters are c1's channels 1, 3, 4 and 6 (scaled by the folded BatchNormalization).
    original = weights_of(model)["c1_w"]
    folded = next(onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer if t.dims[:1] == [4] and len(t.dims) == 4
                  and t.dims[1] == 3)
    scale = gamma / np.sqrt(variance + 1e-5)
    np.testing.assert_allclose(folded, original[[1, 3, 4, 6]] * scale[[1, 3, 4, 6], None, None, None], rtol=1e-5, atol=1e-9)
    by_norm = analyze(onnxslim.optimize(model, verify=False)).choose(0.5)
    assert [kept.tolist() for kept in by_norm.kept.values()] == [[0, 2, 5, 7]]


def weights_of(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# ----------------------------------------------------------------------------- what freezes a group


def frozen_reason(model, producer):
    return group_of(analyze(model), producer).frozen


def c2f(b, x, sizes=True):
    """YOLOv8's C2f shape: a conv's channels (through SiLU) split in halves, the second half
    through another conv, then all three concatenated into a 1x1 conv."""
    c1 = conv(b, x, 3, 8, "c1")
    silu = b.node("Mul", [c1, b.node("Sigmoid", [c1])])
    inputs = [silu, b.initializer("sizes", np.array([4, 4], np.int64))] if sizes else [silu]
    first, second = b.node("Split", inputs, 2, axis=1)
    inner = conv(b, second, 4, 4, "inner")
    return conv(b, b.node("Concat", [first, second, inner], axis=1), 12, 4, "fuse", k=1)


def sliced(b, x, starts, ends, axes, steps=None):
    inputs = [x, b.initializer(f"starts{len(b.nodes)}", np.array(starts, np.int64)),
              b.initializer(f"ends{len(b.nodes)}", np.array(ends, np.int64)),
              b.initializer(f"axes{len(b.nodes)}", np.array(axes, np.int64))]
    if steps is not None:
        inputs.append(b.initializer(f"steps{len(b.nodes)}", np.array(steps, np.int64)))
    return b.node("Slice", inputs)


@pytest.mark.parametrize("bounds", [(2, 6), (-6, -2), (2, 2**62)])
def test_slice_on_the_channel_axis_divides_the_group(bounds):
    """c1's channels [2, 6) go to c2, all eight to c3: three groups, and the Slice's bounds follow the cut."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    c1 = b.node("Relu", [conv(b, x, 3, 8, "c1")])
    part = conv(b, sliced(b, c1, [bounds[0]], [bounds[1]], [1]), 6 if bounds[1] > 8 else 4, 4, "c2", k=1)
    b.output(b.node("Add", [part, conv(b, c1, 8, 4, "c3", k=1)], ["y"]))
    plan, pruned = cut(b.build())
    sizes = sorted(group.size for group in plan.groups.values() if "c1" in group.producers)
    assert sizes == ([2, 6] if bounds[1] > 8 else [2, 2, 4]), sizes
    slice_node = next(node for node in pruned.graph.node if node.op_type == "Slice")
    bounds_after = [onnx.numpy_helper.to_array(t).tolist() for name in slice_node.input[1:3]
                    for t in pruned.graph.initializer if t.name == name]
    assert bounds_after == ([[1], [3]] if bounds[1] <= 8 else [[1], [4]]), bounds_after


def test_slice_on_a_spatial_axis_passes_the_channels_on():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    b.output(conv(b, sliced(b, b.node("Relu", [conv(b, x, 3, 8, "c1")]), [1], [7], [2]), 8, 4, "c2"))
    plan, pruned = cut(b.build())
    assert group_of(plan, "c1").prunable and group_of(plan, "c1").consumers == ["c2"]


def test_slice_with_a_step_on_the_channel_axis_freezes_the_group():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    b.output(conv(b, sliced(b, b.node("Relu", [conv(b, x, 3, 8, "c1")]), [0], [8], [1], steps=[2]), 4, 4, "c2"))
    assert "step" in frozen_reason(b.build(), "c1")


def test_split_on_the_channel_axis_divides_the_group():
    b = ModelBuilder()
    b.output(c2f(b, b.input("x", [1, 3, 8, 8])))
    plan, pruned = cut(b.build())
    halves = [group for group in plan.groups.values() if "c1" in group.producers]
    assert sorted(group.size for group in halves) == [4, 4] and all(group.prunable for group in halves)
    assert sorted(row["producers"][0] for row in plan.describe() if row["group"] in {g.id for g in halves}) == \
        ["c1[0:4]", "c1[4:8]"]
    assert weights(pruned)[next(n for n in weights(pruned) if n.startswith("fuse_w"))][1] == 2 + 2 + 2
    split = next(node for node in pruned.graph.node if node.op_type == "Split")
    sizes = next(tensor for tensor in pruned.graph.initializer if tensor.name == split.input[1])
    assert onnx.numpy_helper.to_array(sizes).tolist() == [2, 2]


def test_split_without_sizes_gets_them_when_the_parts_are_pruned_unequally():
    b = ModelBuilder()
    b.output(c2f(b, b.input("x", [1, 3, 8, 8]), sizes=False))
    model = b.build()
    plan = analyze(model)
    first, second = sorted((group for group in plan.groups.values() if "c1" in group.producers), key=lambda g: g.id)
    pruned, zeroed = prune_model(model, plan.choose(0.0, ratios={first.id: 0.25, second.id: 0.5}))
    onnx.checker.check_model(pruned, full_check=True)
    assert_equivalent(zeroed, pruned)
    split = next(node for node in pruned.graph.node if node.op_type == "Split")
    sizes = next(tensor for tensor in pruned.graph.initializer if tensor.name == split.input[1])
    assert onnx.numpy_helper.to_array(sizes).tolist() == [3, 2]


def test_split_inside_a_group_tied_to_another_layer_freezes():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    joined = b.node("Add", [conv(b, x, 3, 8, "c1"), conv(b, x, 3, 8, "c2")])
    halves = b.node("Split", [joined, b.initializer("sizes", np.array([4, 4], np.int64))], 2, axis=1)
    b.output(b.node("Add", [halves[0], halves[1]], ["y"]))
    assert "Split" in frozen_reason(b.build(), "c1")


@pytest.mark.parametrize("reader", ["grouped", "softmax", "layernorm"])
def test_ops_that_mix_channels_freeze(reader):
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    c1 = conv(b, x, 3, 8, "c1")
    if reader == "grouped":  # reading two groups side by side (a Concat)
        both = b.node("Concat", [c1, conv(b, x, 3, 8, "c1b")], axis=1)
        b.output(b.node("Conv", [both, b.initializer("gw", weight(4, 8, 3, 3))], ["y"], group=2, pads=[1, 1, 1, 1]))
    elif reader == "softmax":
        b.output(b.node("Softmax", [c1], ["y"], axis=1))
    else:
        b.output(b.node("LayerNormalization", [c1, b.initializer("ln", np.ones([8, 8, 8], np.float32))], ["y"], axis=1))
    model = b.build()
    assert frozen_reason(model, "c1")
    assert analyze(model).choose(0.5).kept == {}  # nothing is cut
    if reader == "grouped":  # and the grouped Conv's own outputs make no group: the plan says so
        assert [why for _, why in analyze(model).ownerless] == ["grouped Conv whose input is not one group of whole channels"]


def test_choose_never_empties_a_group_and_rounds_to_a_multiple():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    b.output(conv(b, b.node("Relu", [conv(b, x, 3, 32, "c1")]), 32, 4, "c2"))
    plan = analyze(b.build())
    assert len(plan.choose(0.99).kept[0]) == 1
    assert len(plan.choose(0.3, round_to=8).kept[0]) == 24
    with pytest.raises(UsageError):
        plan.choose(1.0)


def test_the_weakest_channels_go():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    w = weight(6, 3, 3, 3)
    w[[1, 4]] *= 1e-3  # two nearly dead filters
    b.output(b.node("Conv", [b.node("Relu", [b.node("Conv", [x, b.initializer("w", w)], ["c1"], name="c1", pads=[1, 1, 1, 1])]),
                             b.initializer("w2", weight(4, 6, 1, 1))], ["y"], name="c2"))
    plan = analyze(b.build()).choose(2 / 6)
    assert list(plan.kept[0]) == [0, 2, 3, 5]
    row = plan.describe()[0]
    assert row["removed_score_share"] < 1e-3 and row["kept"] == 4  # the two removed filters carried next to nothing
    assert row["mac_share"] == pytest.approx(1.0)  # every multiply-add of c1 and c2 makes or reads its channels


def between(b, op, c1):
    """`op` between a producer of 8 channels (c1) and the layer that reads them; returns its output."""
    if op == "InstanceNormalization":
        return b.node(op, [c1, b.initializer("in_scale", weight(8)), b.initializer("in_bias", weight(8))])
    if op == "Resize":
        return b.node(op, [c1, "", b.initializer("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    if op == "Pad":
        return b.node(op, [c1, b.initializer("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    if op == "Dropout":
        return b.node(op, [c1])
    if op == "ReduceMean":
        return b.node(op, [c1], axes=[2, 3], keepdims=1)
    if op == "Squeeze+Unsqueeze":
        axes = b.initializer("axes", np.array([2, 3], np.int64))
        return b.node("Unsqueeze", [b.node("Squeeze", [b.node("GlobalAveragePool", [c1]), axes]), axes])
    raise AssertionError(op)


@pytest.mark.parametrize("op", ["InstanceNormalization", "Resize", "Pad", "Dropout", "ReduceMean", "Squeeze+Unsqueeze"])
def test_ops_that_carry_the_channels_are_cut_exactly(op):
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    b.output(conv(b, b.node("Relu", [between(b, op, conv(b, x, 3, 8, "c1"))]), 8, 4, "c2", k=1, pads=[0, 0, 0, 0]))
    plan, pruned = cut(b.build())
    assert group_of(plan, "c1").prunable and len(plan.kept[group_of(plan, "c1").id]) == 4
    dims = pruned_dims(pruned)
    assert dims["c2_w"] == (4, 4, 1, 1)
    assert all(dims[name] == (4,) for name in ("in_scale", "in_bias") if name in dims)


def test_conv_transpose_produces_and_consumes_channels():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    up = b.node("ConvTranspose", [b.node("Relu", [conv(b, x, 3, 8, "c1")]), b.initializer("ct_w", weight(8, 6, 2, 2)),
                                  b.initializer("ct_b", weight(6))], ["ct"], name="ct", strides=[2, 2])
    b.output(conv(b, b.node("Relu", [up]), 6, 4, "c2"))
    plan, pruned = cut(b.build())
    assert group_of(plan, "c1").prunable and group_of(plan, "ct").prunable
    dims = pruned_dims(pruned)
    assert dims["ct_w"] == (4, 3, 2, 2) and dims["ct_b"] == (3,) and dims["c2_w"] == (4, 3, 3, 3)


def test_gemm_chain_cuts_columns_of_the_producer_and_rows_of_the_consumer():
    b = ModelBuilder()
    x = b.input("x", [2, 6])
    hidden = b.node("Gemm", [x, b.initializer("g1_w", weight(8, 6)), b.initializer("g1_b", weight(8))], ["g1"],
                    name="g1", transB=1)
    b.output(b.node("Gemm", [b.node("Relu", [hidden]), b.initializer("g2_w", weight(8, 4)), b.initializer("g2_b", weight(4))],
                    ["y"], name="g2"))
    plan, pruned = cut(b.build())
    assert group_of(plan, "g1").prunable
    assert pruned_dims(pruned) == {"g1_w": (4, 6), "g1_b": (4,), "g2_w": (4, 4), "g2_b": (4,)}


def matmul_then_conv(depthwise=False):
    """A MatMul's features lie on the last axis of an NCHW tensor [1, 2, 5, 4]; a Conv reads axis 1.
    Pruning the MatMul's features would shrink the Conv's width, not its channels."""
    b = ModelBuilder()
    x = b.input("x", [1, 2, 5, 6])
    # own seeds (not weight()'s shared sequence): tests after these draw the same weights as before
    features = b.node("Relu", [b.node("MatMul", [x, b.initializer("mm_w", random([6, 4], seed=501))], name="mm")])
    shape = [2, 1, 3, 3] if depthwise else [3, 2, 3, 3]
    b.output(b.node("Conv", [features, b.initializer("conv_w", random(shape, seed=502))], ["y"], name="conv",
                    group=2 if depthwise else 1))
    return b.build()


@pytest.mark.parametrize("depthwise", [False, True])
def test_a_conv_reading_channels_off_its_channel_axis_freezes_them(depthwise):
    """Found by the fuzzer: the Conv took the MatMul's last-axis features for its input channels
    (an IndexError, an invalid model, or one onnxruntime cannot run)."""
    model = matmul_then_conv(depthwise)
    assert "not its channel axis" in frozen_reason(model, "mm")
    plan, pruned = cut(model)
    assert not plan.kept
    pruned, report = onnxslim.optimize(model, prune=0.5, calibration="random", return_report=True)
    onnx.checker.check_model(pruned, full_check=True)
    assert report.pruning.removed_channels == 0


def test_a_plan_applies_to_another_import_whose_nodes_come_in_another_order():
    """The plan names nodes by their first output, not their place in the node list: made on one
    import of a model, it cuts the same tensors of a copy whose (equally valid) order differs."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    b.output(conv(b, b.node("Relu", [conv(b, x, 3, 8, "a1")]), 8, 4, "a2", k=1))
    b.output(conv(b, b.node("Relu", [conv(b, x, 3, 6, "b1")]), 6, 4, "b2", k=1))
    model = b.build()
    reordered = onnx.ModelProto()
    reordered.CopyFrom(model)
    nodes = list(reordered.graph.node)
    del reordered.graph.node[:]
    reordered.graph.node.extend(nodes[3:] + nodes[:3])  # branch b first
    plan = analyze(model).choose(0.5)
    expected, _ = prune_model(model, plan)
    pruned, zeroed = prune_model(reordered, plan)
    onnx.checker.check_model(pruned, full_check=True)
    assert_equivalent(zeroed, pruned)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert pruned_dims(pruned)["a1_w"] == (4, 3, 3, 3) and pruned_dims(pruned)["b1_w"] == (3, 3, 3, 3)
    for tensor in expected.graph.initializer:
        np.testing.assert_array_equal(arrays[tensor.name], onnx.numpy_helper.to_array(tensor))


def test_a_cut_that_does_not_add_up_freezes_its_groups(monkeypatch):
    """The last line of defence: a rule that follows channels where they are not (here the Conv
    check switched off) leaves a tensor or weight whose extent is not its groups' channel count,
    and the group is frozen rather than cut into an invalid model."""
    from onnxslim.prune import layer_handlers

    monkeypatch.setattr(layer_handlers, "on_channel_axis", lambda analysis, node, source, weight: True)
    assert "does not hold the group's channels" in frozen_reason(matmul_then_conv(), "mm")


def test_mean_compensation_into_a_scalar_bias():
    """Found by the fuzzer: MatMul -> Relu -> MatMul with one output -> Add of a 0-d bias. Moving
    the removed features' mean into that bias made a numpy scalar, which the sensitivity
    measurement fed to onnxruntime (RuntimeError, exit 3)."""
    b = ModelBuilder()
    x = b.input("x", ["N", 1])
    hidden = b.node("Relu", [b.node("MatMul", [x, b.initializer("w1", random([1, 4], seed=505))], name="mm1")])
    projected = b.node("MatMul", [hidden, b.initializer("w2", random([4, 1], seed=506))], name="mm2")
    b.output(b.node("Add", [projected, b.initializer("bias", np.array(0.5, np.float32))], ["y"]))
    model = b.build()
    data = CalibrationData.from_feeds(model, [{"x": random([3, 1], seed=330 + i)} for i in range(4)])
    pruned, report = onnxslim.optimize(model, prune=0.5, calibration=data, return_report=True)
    assert report.pruning.removed_channels == 2
    onnx.checker.check_model(pruned, full_check=True)


@pytest.mark.parametrize("target, flatten", [([-1, 2], False), ([-1, 8], True), ([0, 8], True), ([1, -1], True)])
def test_a_reshape_to_minus_one_and_k_is_a_flatten_only_where_k_is_all_the_features(target, flatten):
    """Found by the fuzzer: Reshape of [1, 2, 2, 2] conv features to [-1, 2] gives [4, 2], no
    flatten, but was taken for one (its first entry -1) and rewritten to [0, -1] even with its
    group frozen: the pruned model's output came out [1, 8]. A flatten's shape is rewritten only
    where it is one and its channels are cut."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 4, 4])
    c1 = b.node("Relu", [b.node("Conv", [x, b.initializer("c1_w", random([8, 3, 3, 3], seed=503))], ["c1"], name="c1",
                                pads=[1, 1, 1, 1])])
    c2 = b.node("Conv", [c1, b.initializer("c2_w", random([2, 8, 1, 1], seed=504))], ["c2"], name="c2", strides=[2, 2])
    flat = b.node("Reshape", [c2, b.initializer("shape", np.array(target, np.int64))])
    b.output(b.node("Relu", [flat], ["y"]))
    plan, pruned = cut(b.build())
    assert group_of(plan, "c1").prunable  # cut: the model changes, and must stay exact
    assert (plan.flattens != []) == (flatten and target[1] != -1)
    assert ("not a flatten" in group_of(plan, "c2").frozen) == (not flatten)
    reshape = next(node for node in pruned.graph.node if node.op_type == "Reshape")
    shape = next(onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == reshape.input[1])
    assert shape.tolist() == target  # c2's group is frozen (a graph output reads it): nothing to rewrite


# ----------------------------------------------------------------------------- the whole step


def small_net():
    # Its own seeds: what the tests below check should not hang on which tests drew weights before.
    global rng_seed
    drawn, rng_seed = rng_seed, iter(range(900, 1000))
    try:
        return _small_net()
    finally:
        rng_seed = drawn


def _small_net():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.node("Relu", [conv(b, x, 3, 16, "a")])
    h = b.node("Relu", [conv(b, a, 16, 16, "b")])
    b.output(b.node("Gemm", [b.node("Flatten", [b.node("GlobalAveragePool", [h])]), b.initializer("fc", weight(10, 16)),
                             b.initializer("fcb", weight(10))], ["y"], name="fc", transB=1))
    return b.build()


def test_optimize_prunes_checks_the_surgery_and_refits():
    model = small_net()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=100 + i)} for i in range(48)])
    options = PruneOptions(ratio=0.5, check_surgery=True, allocation="uniform")
    pruned, report = onnxslim.optimize(model, prune=options, calibration=data, verify=False, return_report=True)
    pruning = report.pruning
    assert pruning.surgery_exact is True and pruning.removed_channels == 16
    assert pruning.parameters_after < 0.6 * pruning.parameters_before
    onnx.checker.check_model(pruned, full_check=True)
    assert pruning.fidelity["pruned + refit"]["sqnr_db"] > pruning.fidelity["pruned"]["sqnr_db"] + 3


def test_held_out_samples_are_not_fitted_and_measure_the_fidelity():
    from onnxslim.verify import FidelityPool, Runner

    model = small_net()
    feeds = [{"x": random([1, 3, 8, 8], seed=400 + i)} for i in range(24)]
    data = CalibrationData.from_feeds(model, feeds)
    options = PruneOptions(ratio=0.5, allocation="uniform", held_out=4)
    pruned, report = onnxslim.optimize(model, prune=options, calibration=data, verify=False, return_report=True)
    assert any("measured on 4 samples held out from pruning" in note for note in report.pruning.notes)
    pool = FidelityPool()
    reference, candidate = Runner(model), Runner(pruned)
    for feed in feeds[-4:]:
        pool.add(reference.run(feed)["y"], candidate.run(feed)["y"])
    assert report.pruning.fidelity["pruned + refit"]["sqnr_db"] == pytest.approx(pool.sqnr_db(), abs=1e-3)
    # the refit saw 20 samples, not the 4 held out: fitting on all 24 gives other weights
    everything = onnxslim.optimize(model, prune=PruneOptions(ratio=0.5, allocation="uniform"), calibration=data,
                                   verify=False)
    assert not all(np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
                   for a, b in zip(pruned.graph.initializer, everything.graph.initializer))
    with pytest.raises(onnxslim.OnnxSlimError, match="cannot hold out 24 of 24"):
        onnxslim.optimize(model, prune=PruneOptions(ratio=0.5, held_out=24), calibration=data, verify=False)


def test_prune_then_int8_in_one_optimize_call():
    model = small_net()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=200 + i)} for i in range(24)])
    options = PruneOptions(ratio=0.5, check_surgery=True, allocation="uniform")
    out, report = onnxslim.optimize(model, prune=options, quantize=QuantizeOptions(mode="full"), calibration=data,
                                    return_report=True)
    assert report.pruning.surgery_exact is True and report.pruning.removed_channels == 16
    assert report.quantization is not None and report.verification.passed
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in out.graph.node}
    # the int8 weights are the pruned ones: conv "b" keeps 8 of its 16 filters and reads 8 channels
    int8 = [tuple(t.dims) for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert sorted(int8) == [(8, 3, 3, 3), (8, 8, 3, 3)]


def test_a_surgery_bug_fails_the_check_and_writes_nothing(tmp_path, monkeypatch):
    from onnxslim.prune import driver as prune_module

    apply = prune_module.apply_plan

    def broken(model, plan, remove):
        result = apply(model, plan, remove)
        if remove:  # one kept weight off by 0.5: what a wrong index in the surgery would do
            tensor = next(t for t in result.graph.initializer if len(t.dims) == 4)
            array = onnx.numpy_helper.to_array(tensor).copy()
            array.flat[0] += 0.5
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
        return result

    monkeypatch.setattr(prune_module, "apply_plan", broken)
    data = CalibrationData.from_feeds(small_net(), [{"x": random([1, 3, 8, 8], seed=300 + i)} for i in range(8)])
    with pytest.raises(onnxslim.VerificationError, match="surgery check failed: NOT exact"):
        onnxslim.optimize(small_net(), prune=PruneOptions(ratio=0.5, check_surgery=True), calibration=data)
    path, out = tmp_path / "net.onnx", tmp_path / "out.onnx"
    onnx.save(small_net(), path)
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["optimize", str(path), str(out), "--prune", "0.5", "--check-surgery", "--quiet"])
    assert result.exit_code == onnxslim.VerificationError.exit_code and "NOT exact" in result.output and "Traceback" not in result.output
    assert not out.exists() and path.read_bytes() == before


@pytest.mark.parametrize("layer, error", [("fc", "invalid ONNX"), ("b_w", "pruning broke the model")])
def test_a_pruned_model_whose_shapes_do_not_fit_is_refused(monkeypatch, layer, error):
    """A consumer weight that reads one channel too many: onnx.checker's full check (strict shape
    inference) refuses the Gemm; onnx's Conv inference does not check input channels, so running
    the pruned model in onnxruntime, which every pruning does, catches the Conv."""
    from onnxslim.prune import driver as prune_module

    apply = prune_module.apply_plan

    def misfit(model, plan, remove):
        result = apply(model, plan, remove)
        if remove:
            tensor = next(t for t in result.graph.initializer if t.name.removesuffix("_pruned") == layer)
            array = onnx.numpy_helper.to_array(tensor)
            # axis 1 reads the inputs in both: Conv (out, in, k, k) and the transB Gemm (out, in)
            wider = np.concatenate([array, array[:, :1]], axis=1)  # one input channel more than arrive
            tensor.CopyFrom(onnx.numpy_helper.from_array(wider, tensor.name))
        return result

    monkeypatch.setattr(prune_module, "apply_plan", misfit)
    with pytest.raises(onnxslim.VerificationError, match=error):
        onnxslim.optimize(small_net(), prune=PruneOptions(ratio=0.5, allocation="uniform"), verify=False)


def test_outputs_whose_length_follows_the_data_may_change_it():
    """NonZero's count depends on the values, which pruning changes: only the rank and the dims the
    graph declares fixed must stay."""
    model = small_net()
    graph = model.graph
    graph.node.extend([onnx.helper.make_node("Greater", ["y", "zero"], ["positive"]),
                       onnx.helper.make_node("NonZero", ["positive"], ["where"])])
    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    graph.output.append(onnx.helper.make_tensor_value_info("where", onnx.TensorProto.INT64, [2, "count"]))
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=500 + i)} for i in range(8)])
    pruned, report = onnxslim.optimize(model, prune=PruneOptions(ratio=0.75, allocation="uniform"),
                                       calibration=data, verify=False, return_report=True)
    assert report.pruning.removed_channels == 24


def test_an_output_declared_against_its_graph_is_written_as_computed_before_pruning():
    """The contradiction made the model fail the full check before pruning (the pruned one got the
    ordinary check); the simplified model's output is now written as computed, and the pruned
    model passes the full check."""
    model = small_net()
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 11  # declared 11, computes 10
    pruned, report = onnxslim.optimize(model, prune=0.5, verify=False, return_report=True)
    assert report.pruning.removed_channels > 0
    assert any("declared [1,11], but the graph computes [1,10]" in note for note in report.notes), report.notes
    assert not any("full check before pruning too" in note for note in report.pruning.notes)
    onnx.checker.check_model(pruned, full_check=True)


def test_a_model_with_free_input_dims_and_no_data_is_pruned_and_said_not_run():
    b = ModelBuilder()
    x = b.input("x", [1, 3, "height", "width"])
    b.output(conv(b, b.node("Relu", [conv(b, x, 3, 8, "c1")]), 8, 4, "c2"))
    pruned, report = onnxslim.optimize(b.build(), prune=0.5, verify=False, return_report=True)
    assert report.pruning.removed_channels == 4
    assert any("not run in onnxruntime" in note and "height" in note for note in report.pruning.notes)


def test_held_out_needs_calibration_data():
    with pytest.raises(UsageError, match="--held-out needs calibration data"):
        onnxslim.optimize(small_net(), prune=PruneOptions(ratio=0.5, held_out=2), verify=False)
    with pytest.raises(UsageError, match="--held-out needs calibration data"):
        onnxslim.optimize(small_net(), quantize=QuantizeOptions(mode="weights", held_out=2),
                          verify=False)


def test_optimize_without_data_prunes_without_refit():
    pruned, report = onnxslim.optimize(small_net(), prune=0.25, verify=False, return_report=True)
    assert report.pruning.removed_channels == 8 and not report.pruning.reconstruction
    assert any("no calibration data" in note for note in report.pruning.notes)


def test_cli_prune_plan_and_bad_ratio(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(small_net(), path)
    result = CliRunner().invoke(cli, ["prune-plan", str(path)])
    assert result.exit_code == 0 and "graph output 'y'" in result.output and "2 of 3 groups prunable" in result.output
    assert "MACs" in result.output
    result = CliRunner().invoke(cli, ["optimize", str(path), str(tmp_path / "out.onnx"), "--prune", "1.5"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["optimize", str(path), str(tmp_path / "out.onnx"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "add --prune" in result.output
    result = CliRunner().invoke(cli, ["optimize", str(path), str(tmp_path / "out.onnx"), "--held-out", "2"])
    assert result.exit_code == 2 and "--held-out applies" in result.output
    result = CliRunner().invoke(cli, ["optimize", str(path), str(tmp_path / "out.onnx"), "--prune", "0.5", "--check-surgery",
                                      "--calibration", "random", "--quiet"])
    assert result.exit_code == 0, result.output
    assert onnx.load(tmp_path / "out.onnx").graph.initializer


def test_cli_pruning_alone_reports_progress_and_the_groups_cut(tmp_path, monkeypatch):
    seen = {}
    optimize_file = onnxslim.api.optimize_file

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return optimize_file(*args, **kwargs)

    monkeypatch.setattr(onnxslim.api, "optimize_file", spy)
    path = tmp_path / "net.onnx"
    onnx.save(small_net(), path)
    result = CliRunner().invoke(cli, ["optimize", str(path), str(tmp_path / "out.onnx"), "--prune", "0.5",
                                      "--calibration", "random", "--held-out", "2"])
    assert result.exit_code == 0, result.output
    assert seen["prune"].held_out == 2 and "measured on 2 samples held out" in result.output
    assert callable(seen["progress"])  # the refit's and the sensitivity runs' progress bar
    assert "groups cut" in result.output and "16 -> " in result.output


def test_cli_plot_writes_a_png(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(small_net(), path)
    result = CliRunner().invoke(cli, ["optimize", str(path), str(tmp_path / "out.onnx"), "--prune", "0.5", "--quiet",
                                      "--plot", str(tmp_path / "plot.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_allocation_prunes_where_it_costs_least():
    """Two branches summed: one is scaled by 100 on its way to the output, so its channels matter
    10^4 times more; the budget (half of all channels) must come out of the other branch."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    loud = b.node("Mul", [conv(b, b.node("Relu", [conv(b, x, 3, 8, "loud")]), 8, 4, "loud_out", k=1), b.initializer("gain", np.array(100, np.float32))])
    quiet = conv(b, b.node("Relu", [conv(b, x, 3, 8, "quiet")]), 8, 4, "quiet_out", k=1)
    b.output(b.node("Add", [loud, quiet], ["y"]))
    model = b.build()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=200 + i)} for i in range(4)])
    plan = analyze(model)
    from onnxslim.prune import allocate

    ratios = allocate(model, plan, data, 0.375)  # 6 of the 16 prunable channels
    assert ratios[group_of(plan, "quiet").id] == 0.75 and ratios[group_of(plan, "loud").id] == 0.0
    chosen = plan.choose(0.375, ratios=ratios)
    assert chosen.removed_channels == 6


def test_fidelity_target_finds_the_largest_ratio_that_meets_it():
    """conv1 has 8 filters, 3 of them dead (zero weights and bias): removing up to 3 channels is
    free, a 4th costs a lot. With a 60 dB target the search must remove exactly the 3 dead ones."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    w, bias = weight(8, 3, 3, 3), weight(8)
    w[[1, 4, 6]] = 0
    bias[[1, 4, 6]] = 0
    c1 = b.node("Conv", [x, b.initializer("w1", w), b.initializer("b1", bias)], ["c1"], name="c1", pads=[1, 1, 1, 1])
    b.output(conv(b, b.node("Relu", [c1]), 8, 4, "c2", k=1))
    model = b.build()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=300 + i)} for i in range(8)])
    from onnxslim.quantize import FidelityTarget

    options = PruneOptions(ratio=0.9, fidelity_target=FidelityTarget.parse("60dB"), reconstruct=False)
    _, report = onnxslim.optimize(model, prune=options, calibration=data, verify=False, return_report=True)
    assert report.pruning.removed_channels == 3 and report.pruning.target_met
    assert any("largest found" in note for note in report.pruning.notes)


def test_macs_budget_removes_that_share_of_multiply_adds():
    model = small_net()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=400 + i)} for i in range(8)])
    plan = analyze(model)
    assert plan.total_macs == 8 * 8 * (16 * 3 * 9 + 16 * 16 * 9) + 16 * 10  # two 3x3 convs on 8x8, the fc
    _, report = onnxslim.optimize(model, prune=PruneOptions(macs=0.3, reconstruct=False), calibration=data,
                                  verify=False, return_report=True)
    removed = 1 - report.pruning.macs_after / report.pruning.macs_before
    # Met, not just priced: the first-order allocation alone undershoots (in and out channels of
    # one layer compound, kept counts round down), so the budget grows until the cut is there.
    assert 0.3 <= removed < 0.4, removed


def test_parameters_budget_removes_that_share_of_parameters():
    model = small_net()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=500 + i)} for i in range(8)])
    _, report = onnxslim.optimize(model, prune=PruneOptions(ratio=0.0, parameters=0.3, reconstruct=False),
                                  calibration=data, verify=False, return_report=True)
    removed = 1 - report.pruning.parameters_after / report.pruning.parameters_before
    assert 0.3 <= removed < 0.4, removed  # met, as for MACs
    with pytest.raises(UsageError):
        PruneOptions(parameters=1.5)


def test_sensitivity_uses_as_many_samples_as_its_work_budget_allows(monkeypatch):
    from onnxslim.prune import allocation as pruning

    model = small_net()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=600 + i)} for i in range(12)])
    plan = analyze(model)
    assert pruning.sensitivity_samples(plan, data) == 12  # a tiny model: every sample
    runs = sum(group.prunable for group in plan.groups.values()) * len(pruning.SENSITIVITY_LEVELS)
    monkeypatch.setattr(pruning, "SENSITIVITY_WORK", 6 * runs * plan.total_macs)
    assert pruning.sensitivity_samples(plan, data) == 6
    monkeypatch.setattr(pruning, "SENSITIVITY_WORK", 1)
    assert pruning.sensitivity_samples(plan, data) == pruning.SENSITIVITY_SAMPLES  # never fewer


def test_split_sizes_in_the_attribute_before_opset_13():
    b = ModelBuilder(opset=11)
    x = b.input("x", [1, 3, 8, 8])
    c1 = conv(b, x, 3, 8, "c1")
    first, second = b.node("Split", [c1], 2, axis=1, split=[4, 4])
    b.output(conv(b, b.node("Concat", [first, conv(b, second, 4, 4, "inner")], axis=1), 8, 4, "fuse", k=1))
    plan, pruned = cut(b.build())
    split = next(node for node in pruned.graph.node if node.op_type == "Split")
    assert list(split.input) == [split.input[0]]
    assert next(attribute.ints for attribute in split.attribute if attribute.name == "split") == [2, 2]


def ffn():
    b = ModelBuilder()
    x = b.input("x", [2, 4, 8])
    # Fixed seeds (the property should not hang on which tests ran before); small weights and a
    # large bias: after the SiLU each neuron is mostly its mean.
    hidden = b.node("Add", [b.node("MatMul", [x, b.initializer("w1", random([8, 16], seed=610) * 0.3)], name="fc1"),
                            b.initializer("b1", random([16], seed=611) + 2)])  # a large positive mean after SiLU
    activated = b.node("Mul", [hidden, b.node("Sigmoid", [hidden])])
    b.output(b.node("Add", [b.node("MatMul", [activated, b.initializer("w2", random([16, 8], seed=612))], name="fc2"),
                            b.initializer("b2", random([8], seed=613))], ["y"]))
    return b.build(), [{"x": random([2, 4, 8], seed=700 + i)} for i in range(8)]


def shifted_convs():
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    # Small weights, a large bias: after the Relu each channel is mostly its mean.
    c1 = b.node("Conv", [x, b.initializer("w1", random([8, 3, 3, 3], seed=620) * 0.1),
                         b.initializer("b1", random([8], seed=621) + 2)], ["c1"], name="c1", pads=[1, 1, 1, 1])
    c2 = b.node("Conv", [b.node("Relu", [c1]), b.initializer("c2_w", random([4, 8, 1, 1], seed=622)),
                         b.initializer("c2_b", random([4], seed=623))], ["c2"], name="c2")
    b.output(c2)
    return b.build(), [{"x": random([1, 3, 8, 8], seed=800 + i)} for i in range(8)]


@pytest.mark.parametrize("network", [shifted_convs, ffn])
def test_mean_compensation_moves_removed_means_into_the_bias(network):
    """Half of the channels go, no refit: with compensation (Conv's bias, the Add after a MatMul)
    the outputs stay much closer, and the cut is still exact against the zeroed reference."""
    model, feeds = network()
    data = CalibrationData.from_feeds(model, feeds)
    sqnr = {}
    for compensate in (True, False):
        options = PruneOptions(ratio=0.5, reconstruct=False, allocation="uniform", compensate=compensate,
                               check_surgery=True)
        _, report = onnxslim.optimize(model, prune=options, calibration=data, verify=False,
                                      return_report=True)
        assert report.pruning.surgery_exact
        sqnr[compensate] = report.pruning.fidelity["pruned"]["sqnr_db"]
    assert sqnr[True] > sqnr[False] + 3, sqnr


def twin_channels_net():
    """c1's channels 0 and 1 are copies of one filter and the strongest; channel 4 is weak but
    like no other; c2 (1x1) reads all six."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    w1 = random([6, 3, 3, 3], seed=301)
    w1[1] = w1[0]
    w1[[0, 1]] *= 3
    w1[4] *= 0.3
    c1 = b.node("Conv", [x, b.initializer("w1", w1)], ["c1"], name="c1", pads=[1, 1, 1, 1])
    b.output(b.node("Conv", [b.node("Relu", [c1]), b.initializer("w2", random([4, 6, 1, 1], seed=302))], ["y"], name="c2"))
    return b.build()


@pytest.mark.parametrize("criterion, removed", [("activation", {4}), ("reconstruction", {0, 1})])
def test_reconstruction_criterion_removes_what_the_other_channels_predict(criterion, removed):
    from onnxslim.prune import activation_scores, input_moments

    model = twin_channels_net()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=300 + i)} for i in range(16)])
    plan = analyze(model)
    activation_scores(model, plan, input_moments(model, plan, data, grams=criterion == "reconstruction"))
    chosen = plan.choose(1 / 6)
    gone = set(range(6)) - set(chosen.kept[group_of(plan, "c1").id])
    assert len(gone) == 1 and gone <= removed  # by reconstruction: either copy


def idle_channel_net():
    """c1's channel 0 never fires on positive inputs (a negative filter, then Relu) but c2 reads it
    with weights ten times the others'; channel 5 fires weakly, and c2 reads it weakly too."""
    b = ModelBuilder()
    x = b.input("x", [1, 3, 8, 8])
    w1 = np.abs(random([6, 3, 3, 3], seed=311))
    w1[0] *= -1
    w1[5] *= 0.2
    w2 = np.abs(random([4, 6, 1, 1], seed=312)) + 0.5
    w2[:, 0] *= 10
    w2[:, 5] *= 0.2
    c1 = b.node("Conv", [x, b.initializer("w1", w1)], ["c1"], name="c1", pads=[1, 1, 1, 1])
    b.output(b.node("Conv", [b.node("Relu", [c1]), b.initializer("w2", w2)], ["y"], name="c2"))
    return b.build()


def test_a_channel_idle_on_the_calibration_data_ranks_by_its_weights():
    """Idle on every calibration sample, channel 0 would score 0 and go first; floored at
    IDLE_FLOOR of the mean E[x²], its large weights keep it, and the weak channel 5 goes."""
    from onnxslim.prune import activation_scores, input_moments

    model = idle_channel_net()
    feeds = [{"x": np.abs(random([1, 3, 8, 8], seed=320 + i))} for i in range(8)]
    data = CalibrationData.from_feeds(model, feeds)
    plan = analyze(model)
    moments = input_moments(model, plan, data)
    assert min(moment.square[0] for moment in moments.values()) == 0  # idle, as built
    activation_scores(model, plan, moments)
    chosen = plan.choose(1 / 6)
    assert set(range(6)) - set(chosen.kept[group_of(plan, "c1").id]) == {5}


def test_the_refit_wins_back_a_channel_the_reconstruction_criterion_removed():
    model = twin_channels_net()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=300 + i)} for i in range(16)])
    sqnr = {}
    for criterion in ("activation", "reconstruction"):
        options = PruneOptions(ratio=1 / 6, criterion=criterion, allocation="uniform")
        _, report = onnxslim.optimize(model, prune=options, calibration=data, verify=False, return_report=True)
        assert report.pruning.removed_channels == 1
        sqnr[criterion] = report.pruning.fidelity["pruned + refit"]["sqnr_db"]
    # The removed copy's work moves onto its twin: the output comes back all but exactly.
    assert sqnr["reconstruction"] > 40 and sqnr["reconstruction"] > sqnr["activation"] + 10


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("extra", ["sequence", "labels"])
def test_model_with_sequence_or_integer_outputs_is_pruned_end_to_end(extra, quantize):
    """Outputs that are not float tensors (a classifier's labels, a sequence of tensors as a
    ZipMap-like output) beside the scores: sensitivity, fidelity and the run check measure the
    numbers they hold. A sequence output once ended pruning in an internal error (isfinite of a list)."""
    b = ModelBuilder(opset=17)
    x = b.input("x", [1, 3, 8, 8])
    features = b.node("Relu", [conv(b, b.node("Relu", [conv(b, x, 3, 8, "c1")]), 8, 8, "c2")])
    scores = b.node("GlobalAveragePool", [features], ["scores"])
    b.output(scores)
    if extra == "sequence":
        b.node("SequenceConstruct", [scores, b.node("Neg", [scores])], ["pair"])
        b.outputs.append(onnx.helper.make_tensor_sequence_value_info("pair", onnx.TensorProto.FLOAT, None))
    else:
        b.output(b.node("ArgMax", [scores], ["label"], axis=1))
    model = b.build()
    data = CalibrationData.from_feeds(model, [{"x": random([1, 3, 8, 8], seed=700 + i)} for i in range(8)])

    pruned, report = onnxslim.optimize(model, prune=PruneOptions(ratio=0.25), quantize=quantize, calibration=data,
                                       return_report=True)

    onnx.checker.check_model(pruned, full_check=True)
    assert report.pruning.fidelity["pruned"]["sqnr_db"] > 0
    assert [output.name for output in pruned.graph.output] == [output.name for output in model.graph.output]
