"""fuse-reshapes: chains of view ops become one Reshape of the chain's input, or nothing.

Dynamic models must stay dynamic: every dynamic case is checked at two input sizes.
"""

import numpy as np
import onnx.numpy_helper
import pytest
from builder import ModelBuilder, assert_equivalent, ops, output_names, random, run_pass, run_passes, top_ops


def fuse(model, first=()):
    fused, result = run_pass(model, "fuse-reshapes", first=first)
    return run_passes(fused, "eliminate-dead-nodes"), result


def target_of(model, index=0):
    """The constant target of the `index`-th Reshape."""
    node = [node for node in model.graph.node if node.op_type == "Reshape"][index]
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    return initializers[node.input[1]].tolist()


def feeds(shapes, seeds=(0, 1)):
    """One feed per shape dict (name -> shape), seeded."""
    return [{name: random(shape, seed) for name, shape in shape_set.items()} for shape_set, seed in zip(shapes, seeds)]


def view_chain(shape, *steps, opset=17):
    """x -> Relu -> steps... -> Neg -> y; a step is (op, target-or-axes, attrs)."""
    b = ModelBuilder(opset=opset)
    x = b.input("x", shape)
    current = b.node("Relu", [x], ["relu"])
    for op, argument, attrs in steps:
        inputs = [current]
        if argument is not None:
            inputs.append(b.initializer(b.fresh(f"{op.lower()}_arg"), np.array(argument, np.int64)))
        current = b.node(op, inputs, **attrs)
    b.output(b.node("Neg", [current], ["y"]))
    return b


# ----------------------------------------------------------------------------- chains


def test_reshape_of_a_reshape_becomes_one_reshape():
    model = view_chain([2, 3, 4], ("Reshape", [6, 4], {}), ("Reshape", [2, 12], {})).build()

    fused, result = fuse(model)

    assert result.counters["fused"] == 1 and top_ops(fused.graph) == ["Relu", "Reshape", "Neg"]
    assert target_of(fused) == [2, 12] and list(fused.graph.node[1].input)[0] == "relu"
    assert_equivalent(model, fused)


def test_reshape_chain_of_unknown_shape_fuses_when_the_last_target_needs_no_dim():
    """No shape is known, and none is needed: the last target has no 0."""
    b = view_chain(["N", 12], ("Reshape", [-1, 4], {}), ("Reshape", [3, -1], {}))
    model = b.build()

    fused, result = fuse(model)

    assert result.counters["fused"] == 1 and target_of(fused) == [3, -1]
    assert_equivalent(model, fused, feeds([{"x": [2, 12]}, {"x": [5, 12]}]))


def test_dynamic_batch_stays_a_copied_dim():
    model = view_chain(["N", 3, 4], ("Reshape", [0, 12], {}), ("Reshape", [0, 2, 6], {})).build()

    fused, result = fuse(model, first=("infer-shapes",))

    assert result.counters["fused"] == 1 and target_of(fused) == [0, 2, 6]
    assert_equivalent(model, fused, feeds([{"x": [1, 3, 4]}, {"x": [3, 3, 4]}]))


def test_reshape_there_and_back_disappears():
    model = view_chain(["N", 3, 4], ("Reshape", [0, 12], {}), ("Reshape", [0, 3, 4], {})).build()

    fused, result = fuse(model, first=("infer-shapes",))

    assert result.counters["cancelled"] == 1 and top_ops(fused.graph) == ["Relu", "Neg"]
    assert_equivalent(model, fused, feeds([{"x": [1, 3, 4]}, {"x": [3, 3, 4]}]))


def test_flatten_then_reshape_becomes_one_reshape():
    model = view_chain([2, 3, 4], ("Flatten", None, {"axis": 2}), ("Reshape", [3, 8], {})).build()

    fused, result = fuse(model, first=("infer-shapes",))

    assert result.counters["fused"] == 1 and ops(fused)["Flatten"] == 0 and target_of(fused) == [3, 8]
    assert_equivalent(model, fused)


def test_unsqueeze_then_flatten_with_a_dynamic_batch_keeps_it_dynamic():
    model = view_chain(["N", 3, 4], ("Unsqueeze", [1], {}), ("Flatten", None, {"axis": 1})).build()

    fused, result = fuse(model, first=("infer-shapes",))

    assert result.counters["fused"] == 1 and target_of(fused) == [0, 12]
    assert_equivalent(model, fused, feeds([{"x": [1, 3, 4]}, {"x": [4, 3, 4]}]))


@pytest.mark.parametrize(
    "steps",
    [
        [("Unsqueeze", [0, 2], {}), ("Squeeze", [2, 0], {})],
        [("Unsqueeze", [-1], {}), ("Squeeze", [-1], {})],
    ],
    ids=["unsqueeze-squeeze", "negative-axes"],
)
def test_unsqueeze_then_squeeze_of_the_same_axes_cancels_without_knowing_the_rank(steps):
    model = view_chain([2, 3], *steps).build()

    fused, result = fuse(model)  # no shapes inferred: the Relu's output rank is unknown

    assert result.counters["cancelled"] == 1 and top_ops(fused.graph) == ["Relu", "Neg"]
    assert_equivalent(model, fused)


def test_squeeze_then_unsqueeze_of_the_same_axes_cancels():
    model = view_chain([2, 1, 3], ("Squeeze", [1], {}), ("Unsqueeze", [1], {})).build()

    fused, result = fuse(model)

    assert result.counters["cancelled"] == 1 and top_ops(fused.graph) == ["Relu", "Neg"]
    assert_equivalent(model, fused)


def test_squeeze_and_unsqueeze_attributes_before_opset_13():
    b = view_chain([2, 3], ("Unsqueeze", None, {"axes": [0]}), ("Squeeze", None, {"axes": [0]}), opset=11)
    model = b.build()

    fused, result = fuse(model)

    assert result.counters["cancelled"] == 1 and top_ops(fused.graph) == ["Relu", "Neg"]
    assert_equivalent(model, fused)


def axes_of(model, op):
    node = next(node for node in model.graph.node if node.op_type == op)
    attribute = next((attribute for attribute in node.attribute if attribute.name == "axes"), None)
    if attribute is not None:
        return list(attribute.ints)
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    return initializers[node.input[1]].tolist()


@pytest.mark.parametrize(
    "op, shape, first, second, merged",
    [
        ("Unsqueeze", ["N", "S"], [1], [2], [1, 2]),  # BERT's attention mask: [N, S] -> [N, 1, 1, S]
        ("Unsqueeze", [2, 3], [0], [0], [0, 1]),
        ("Unsqueeze", [2, 3], [-1], [1], [1, 3]),
        ("Squeeze", [1, 2, 1, 3, 1], [0], [1], [0, 2]),
        ("Squeeze", [1, 2, 1, 3, 1], [-1], [0], [0, 4]),
    ],
)
def test_two_unsqueezes_or_two_squeezes_become_one(op, shape, first, second, merged):
    """Exact for any dims, dynamic ones included: the op stays what it was, with the axes of both."""
    model = view_chain(shape, (op, first, {}), (op, second, {})).build()

    fused, result = fuse(model, first=("infer-shapes",))

    assert result.counters["fused"] == 1 and ops(fused)[op] == 1 and ops(fused)["Reshape"] == 0
    assert axes_of(fused, op) == merged
    concrete = [dim if isinstance(dim, int) else 3 + index for index, dim in enumerate(shape)]
    assert_equivalent(model, fused, feeds([{"x": concrete}]))


def test_two_unsqueezes_of_unknown_rank_with_non_negative_axes():
    model = view_chain([2, 3], ("Unsqueeze", None, {"axes": [1]}), ("Unsqueeze", None, {"axes": [0]}), opset=11).build()

    fused, result = fuse(model)  # without shapes

    assert result.counters["fused"] == 1 and axes_of(fused, "Unsqueeze") == [0, 2]
    assert_equivalent(model, fused)


def test_three_view_ops_become_one_reshape_in_one_run():
    model = view_chain(
        ["N", 2, 6], ("Unsqueeze", [0], {}), ("Reshape", [1, 0, 12], {}), ("Squeeze", [0], {})
    ).build()

    fused, result = fuse(model, first=("infer-shapes",))

    assert ops(fused)["Reshape"] == 1 and ops(fused)["Squeeze"] == ops(fused)["Unsqueeze"] == 0
    assert target_of(fused) == [0, 12]
    assert_equivalent(model, fused, feeds([{"x": [1, 2, 6]}, {"x": [3, 2, 6]}]))
    _, again = run_pass(fused, "fuse-reshapes", first=("infer-shapes",))
    assert not again.changed


def test_chain_ending_in_a_graph_output_keeps_the_output_name():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    first = b.node("Reshape", [b.node("Relu", [x]), b.initializer("s1", np.array([6, 4], np.int64))])
    b.output(b.node("Reshape", [first, b.initializer("s2", np.array([24], np.int64))], ["y"]))
    model = b.build()

    fused, result = fuse(model)

    assert result.counters["fused"] == 1 and top_ops(fused.graph) == ["Relu", "Reshape"]
    assert list(fused.graph.node[1].output) == ["y"] and output_names(fused) == ["y"]
    assert_equivalent(model, fused)


def attention_split(shape, target, perm, squeeze_axes, *, extra_reader=False):
    """x -> Relu -> Reshape(target) -> Transpose(perm) -> Squeeze(axes) -> Neg -> y (torch MHA's q, k, v split)."""
    b = ModelBuilder()
    x = b.input("x", shape)
    reshaped = b.node("Reshape", [b.node("Relu", [x], ["relu"]), b.initializer("target", np.array(target, np.int64))])
    transposed = b.node("Transpose", [reshaped], ["transposed"], perm=perm)
    squeezed = b.node("Squeeze", [transposed, b.initializer("axes", np.array(squeeze_axes, np.int64))])
    b.output(b.node("Neg", [squeezed], ["y"]))
    if extra_reader:
        b.output(b.node("Abs", [transposed], ["z"]))
    return b.build()


def perm_of(model):
    node = next(node for node in model.graph.node if node.op_type == "Transpose")
    return list(next(attribute for attribute in node.attribute if attribute.name == "perm").ints)


def test_squeeze_after_a_transpose_moves_into_the_reshape_before_it():
    """[S, N, 36] -> [1, S, N, 3, 12] -> [3, S, N, 1, 12] -> [3, S, N, 12] is [S, N, 3, 12] transposed."""
    model = attention_split([5, "N", 36], [1, 5, -1, 3, 12], [3, 1, 2, 0, 4], [3])

    fused, result = fuse(model, first=("infer-shapes",))

    assert result.counters["fused"] == 1 and top_ops(fused.graph) == ["Relu", "Reshape", "Transpose", "Neg"]
    assert target_of(fused) == [5, -1, 3, 12] and perm_of(fused) == [2, 0, 1, 3]
    assert_equivalent(model, fused, feeds([{"x": [5, 1, 36]}, {"x": [5, 2, 36]}]))


def test_squeeze_after_a_transpose_whose_output_has_another_reader_stays():
    model = attention_split([5, 2, 36], [1, 5, -1, 3, 12], [3, 1, 2, 0, 4], [3], extra_reader=True)

    fused, result = fuse(model, first=("infer-shapes",))

    assert not result.changed and ops(fused)["Squeeze"] == 1
    assert_equivalent(model, fused)


# ----------------------------------------------------------------------------- chains that stay


def test_copied_dim_of_an_unknown_intermediate_stays():
    """[N, 12] -> [4, -1] -> [2, 0, -1]: the second 0 copies the intermediate's 3N, not x's 12."""
    model = view_chain(["N", 12], ("Reshape", [4, -1], {}), ("Reshape", [2, 0, -1], {})).build()

    fused, result = fuse(model)

    assert not result.changed and ops(fused)["Reshape"] == 2
    assert_equivalent(model, fused, feeds([{"x": [2, 12]}, {"x": [4, 12]}]))


def test_merged_dynamic_dims_become_the_one_minus_one():
    """[N, M, 4] -> [N*M, 4] -> [1, N*M, 4]: no constant holds N*M, but -1 says it, and every other
    entry is a known positive size, so -1 cannot fail where the original runs."""
    model = view_chain(["N", "M", 4], ("Reshape", [-1, 4], {}), ("Unsqueeze", [0], {})).build()

    fused, result = fuse(model, first=("infer-shapes",))

    assert result.counters["fused"] == 1 and target_of(fused) == [1, -1, 4]
    assert_equivalent(model, fused, feeds([{"x": [2, 3, 4]}, {"x": [1, 5, 4]}]))


def test_flatten_of_dynamic_dims_becomes_the_one_minus_one():
    model = view_chain(["N", "M", 4], ("Unsqueeze", [3], {}), ("Flatten", None, {"axis": 3})).build()

    fused, result = fuse(model, first=("infer-shapes",))

    assert result.counters["fused"] == 1 and target_of(fused) == [-1, 1]
    assert_equivalent(model, fused, feeds([{"x": [2, 3, 4]}, {"x": [1, 5, 4]}]))


def test_minus_one_beside_a_copied_dim_only_where_the_last_reshape_has_it():
    """A -1 beside a copied dim fails on an empty batch (the other entries multiply to 0).
    [N, M, 4] -> Unsqueeze(3) -> Reshape [0, -1] gives [N, M*4]: the last Reshape has that -1
    itself, so [0, -1] on x fails exactly when the original does. [N, M, 4] -> Flatten(1) ->
    Unsqueeze(2) gives [N, M*4, 1]: [0, -1, 1] would fail on an empty batch where the original runs."""
    model = view_chain(["N", "M", 4], ("Unsqueeze", [3], {}), ("Reshape", [0, -1], {})).build()
    fused, result = fuse(model, first=("infer-shapes",))
    assert result.counters["fused"] == 1 and target_of(fused) == [0, -1]

    model = view_chain(["N", "M", 4], ("Flatten", None, {"axis": 1}), ("Unsqueeze", [2], {})).build()
    fused, result = fuse(model, first=("infer-shapes",))
    assert not result.changed and ops(fused)["Unsqueeze"] == 1
    assert_equivalent(model, fused, feeds([{"x": [2, 3, 4]}, {"x": [0, 3, 4]}]))  # the empty batch runs


def test_unsqueeze_then_squeeze_of_other_axes_stays():
    model = view_chain([2, 1], ("Unsqueeze", [0], {}), ("Squeeze", [2], {})).build()

    fused, result = fuse(model)  # without shapes the rank is unknown, so the axes cannot be matched

    assert not result.changed
    assert_equivalent(model, fused)


def test_intermediate_with_another_reader_stays():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    first = b.node("Reshape", [b.node("Relu", [x]), b.initializer("s1", np.array([6, 4], np.int64))])
    b.output(b.node("Reshape", [first, b.initializer("s2", np.array([24], np.int64))], ["y"]))
    b.output(b.node("Neg", [first], ["z"]))
    model = b.build()

    fused, result = fuse(model)

    assert not result.changed and ops(fused)["Reshape"] == 2
