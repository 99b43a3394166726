"""fold-constants: constant-only subgraphs become initializers, and the model never grows."""

import numpy as np
import onnx.numpy_helper
import pytest
from builder import (
    ModelBuilder,
    assert_equivalent,
    branches,
    initializer_names,
    ops,
    output_names,
    random,
    run_pass,
    run_passes,
    top_ops,
)


def fold(model, **options):
    return run_pass(model, "fold-constants", **options)


def fold_and_clean(model, **options):
    """fold-constants leaves the nodes it replaced to dead-node elimination, as the pipeline does."""
    folded, result = fold(model, **options)
    cleaned, _ = run_pass(folded, "eliminate-dead-nodes")
    return cleaned, result


def initializer_values(graph):
    return {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}


def test_constant_only_chain_folds_to_one_initializer():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    a = b.initializer("a", random([2, 3], seed=1))
    c = b.initializer("c", random([2, 3], seed=2))
    scaled = b.node("Mul", [b.node("Add", [a, c]), b.initializer("two", np.array(2, np.float32))], ["scaled"])
    b.output(b.node("Add", [x, scaled], ["y"]))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert result.changed and result.counters["folded"] == 1  # only the tensor a kept node reads is stored
    assert top_ops(folded.graph) == ["Add"]
    np.testing.assert_allclose(initializer_values(folded.graph)["scaled"], (random([2, 3], 1) + random([2, 3], 2)) * 2)
    assert folded.ByteSize() <= model.ByteSize()
    assert_equivalent(model, folded)


def test_shape_computation_from_lifted_constant_nodes_folds():
    """Exporters write shape arithmetic with Constant nodes; lift-constants makes it foldable."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    shape = b.node("Concat", [b.constant(np.array([2], np.int64)), b.constant(np.array([12], np.int64))], axis=0)
    b.output(b.node("Reshape", [x, shape], ["y"]))
    model = b.build()

    folded, result = fold(model)
    assert not result.changed  # Constant node outputs are not initializers yet

    folded, result = fold_and_clean(run_passes(model, "lift-constants"))
    assert result.counters["folded"] == 1
    assert top_ops(folded.graph) == ["Reshape"]
    assert_equivalent(model, folded)


def test_model_output_that_is_constant_keeps_its_name():
    b = ModelBuilder()
    x = b.input("x", [2])
    b.output(b.node("Relu", [x], ["y"]))
    a, c = b.initializer("a", np.ones(2, np.float32)), b.initializer("c", np.ones(2, np.float32))
    b.output(b.node("Add", [a, c], ["k"]))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert result.counters["folded"] == 1
    assert output_names(folded) == ["y", "k"]
    assert "k" not in initializer_names(folded.graph)  # a model output is never an initializer
    producer = next(node for node in folded.graph.node if "k" in node.output)
    assert producer.op_type == "Constant"
    assert_equivalent(model, folded)


def test_constant_model_output_that_is_also_read_keeps_the_graph_sorted():
    """The new Constant goes first: the Mul reading `k` must come after it."""
    b = ModelBuilder()
    x = b.input("x", [2])
    k = b.node("Add", [b.initializer("a", np.ones(2, np.float32)), b.initializer("c", np.ones(2, np.float32))], ["k"])
    b.output(b.node("Mul", [x, k], ["y"]))
    b.output(k)
    model = b.build()

    folded, _ = fold_and_clean(model)  # run_pass checks the model, topological order included

    assert top_ops(folded.graph) == ["Constant", "Mul"]
    assert_equivalent(model, folded)


def test_folding_inside_an_if_branch():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    outer = b.initializer("outer", random([2, 3], seed=3))
    then = b.branch()
    inner = then.initializer("inner", random([2, 3], seed=4))
    then.output(then.node("Mul", [x, then.node("Add", [outer, inner], ["sum"])]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert result.counters["folded"] == 1
    then_body, _ = branches(folded)
    assert top_ops(then_body) == ["Mul"] and "sum" in initializer_names(then_body)
    assert_equivalent(model, folded, [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])


def test_outer_constant_read_by_both_branches_is_folded_and_stored_once():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    total = b.node("Add", [b.initializer("a", random([2, 3], 5)), b.initializer("b", random([2, 3], 6))], ["total"])
    then = b.branch()
    then.output(then.node("Mul", [x, total]))
    other = b.branch()
    other.output(other.node("Sub", [x, total]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert result.counters["folded"] == 1 and top_ops(folded.graph) == ["If"]
    then_body, else_body = branches(folded)
    assert initializer_names(folded.graph) == {"total"}  # in the outer graph, not one copy per branch
    assert not then_body.initializer and not else_body.initializer
    assert folded.ByteSize() < model.ByteSize()
    assert_equivalent(model, folded, [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])


def test_multi_output_node_stores_the_outputs_that_are_read():
    b = ModelBuilder()
    x = b.input("x", [2, 2])
    first, second = b.node("Split", [b.initializer("w", random([4, 2], 7))], 2, axis=0)
    b.output(b.node("Add", [x, second], ["y"]))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert result.counters["folded"] == 1 and top_ops(folded.graph) == ["Add"]
    assert initializer_names(folded.graph) == {second}
    assert_equivalent(model, folded)


# ----------------------------------------------------------------------------- never fold


def test_random_ops_are_never_folded():
    """Shape(RandomNormalLike(c)) is deterministic, but the random node itself must stay."""
    b = ModelBuilder()
    x = b.input("x", [3])
    noise = b.node("RandomNormalLike", [b.initializer("c", np.zeros([3], np.float32))], seed=1.0)
    b.output(b.node("Add", [x, b.node("Cast", [b.node("Shape", [noise])], to=1)], ["y"]))
    b.output(b.node("RandomUniform", [], ["u"], shape=[2], dtype=1))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert not result.changed
    assert ops(folded) == ops(model)


def test_custom_domain_nodes_are_not_folded():
    b = ModelBuilder()
    b.use_domain("com.example")
    x = b.input("x", [2])
    custom = b.node("Mystery", [b.initializer("c", np.ones(2, np.float32))], domain="com.example")
    b.output(b.node("Add", [x, custom], ["y"]), np.float32, [2])
    model = b.build()

    folded, result = fold(model)

    assert not result.changed and ops(folded)["com.example::Mystery"] == 1


def test_nodes_reading_an_input_are_not_folded():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.output(b.node("Add", [x, b.initializer("a", random([2, 3], 1))], ["y"]))
    model = b.build()

    folded, result = fold(model)

    assert not result.changed and ops(folded) == ops(model)


# ----------------------------------------------------------------------------- size


def expand_model():
    """A scalar expanded to 100x100: folding would store 40 kB in place of a few bytes."""
    b = ModelBuilder()
    x = b.input("x", [100, 100])
    one, shape = b.initializer("one", np.array(1, np.float32)), b.initializer("shape", np.array([100, 100], np.int64))
    big = b.node("Expand", [one, shape])
    b.output(b.node("Add", [x, big], ["y"]))
    return b.build()


def test_fold_that_would_grow_the_model_stays_unfolded():
    model = expand_model()
    folded, result = fold_and_clean(model)

    assert not result.changed and result.counters["kept_for_size"] == 1
    assert ops(folded)["Expand"] == 1
    assert folded.ByteSize() <= model.ByteSize()


def test_fold_that_would_grow_the_model_is_skipped_when_shapes_are_known():
    """With inferred shapes the large result is not even computed."""
    model = expand_model()
    folded, result = run_pass(model, "fold-constants", first=("infer-shapes",))
    assert not result.changed and ops(folded)["Expand"] == 1


@pytest.mark.parametrize("size_cap", [-1, 40_000])
def test_size_cap_allows_a_growing_fold(size_cap):
    model = expand_model()
    folded, result = fold_and_clean(model, size_cap=size_cap)

    assert result.counters["folded"] == 1 and ops(folded)["Expand"] == 0
    assert folded.ByteSize() > model.ByteSize()
    assert_equivalent(model, folded)


def test_size_cap_below_the_result_keeps_it_unfolded():
    folded, result = fold_and_clean(expand_model(), size_cap=39_999)
    assert not result.changed and ops(folded)["Expand"] == 1


def test_initializer_read_by_a_folded_and_a_kept_node_is_not_counted_as_freed():
    """w stays for the Mul, so folding Add(w, c) would add a second copy of w's size."""
    b = ModelBuilder()
    x = b.input("x", [64])
    w = b.initializer("w", random([64], 8))
    shifted = b.node("Add", [w, b.initializer("c", np.array(1, np.float32))], ["shifted"])
    b.output(b.node("Mul", [x, w], ["y"]))
    b.output(b.node("Add", [x, shifted], ["z"]))
    model = b.build()

    folded, result = fold_and_clean(model, node_bytes=0)

    assert not result.changed and result.counters["kept_for_size"] == 1
    assert folded.ByteSize() <= model.ByteSize()
    assert_equivalent(model, folded)


def test_initializer_read_twice_inside_the_folded_cone_is_counted_once():
    """Concat(Add(w, w), w) frees w once (256 B) plus two nodes, less than the 512 B result."""
    b = ModelBuilder()
    x = b.input("x", [128])
    w = b.initializer("w", random([64], 9))
    joined = b.node("Concat", [b.node("Add", [w, w]), w], ["joined"], axis=0)
    b.output(b.node("Add", [x, joined], ["y"]))
    model = b.build()

    folded, result = fold_and_clean(model, node_bytes=0)

    assert not result.changed and result.counters["kept_for_size"] >= 1
    assert ops(folded) == ops(model)
    assert folded.ByteSize() <= model.ByteSize()


def test_fold_whose_result_replaces_its_inputs_is_stored():
    """Add(w, v) of two exclusive 256 B initializers stores 256 B: the model shrinks."""
    b = ModelBuilder()
    x = b.input("x", [64])
    total = b.node("Add", [b.initializer("w", random([64], 10)), b.initializer("v", random([64], 11))], ["total"])
    b.output(b.node("Mul", [x, total], ["y"]))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert result.counters["folded"] == 1 and initializer_names(folded.graph) == {"total"}
    assert folded.ByteSize() < model.ByteSize()
    assert_equivalent(model, folded)


def lstm_model(*, with_shapes: bool, grow: bool = False):
    """An exported LSTM's weight preparation: W [4H, I] and R [4H, H], read only by it, sliced
    into four gates, reordered by a Concat and unsqueezed to the LSTM's [1, 4H, .]. Each Slice
    alone frees nothing (W stays for the other three); all of them together free W and R and
    store tensors of the same size. `grow` adds a scalar expanded to the output's size."""
    hidden, features = 8, 4
    b = ModelBuilder()
    x = b.input("x", [3, 2, features])
    gates = [b.initializer(name, np.array([value], np.int64)) for name, value in
             (("g0", 0), ("g1", hidden), ("g2", 2 * hidden), ("g3", 3 * hidden), ("g4", 4 * hidden))]
    axis = b.initializer("axis", np.array([0], np.int64))

    def prepared(name, columns, seed):
        weight = b.initializer(name, random([4 * hidden, columns], seed))
        pieces = [b.node("Slice", [weight, gates[index], gates[index + 1], axis]) for index in range(4)]
        return b.node("Unsqueeze", [b.node("Concat", [pieces[0], pieces[3], pieces[1], pieces[2]], axis=0), axis])

    w, r = prepared("W", features, 20), prepared("R", hidden, 21)
    y = b.node("LSTM", [x, w, r], ["y"], hidden_size=hidden)
    if grow:
        filled = b.node("Expand", [b.initializer("one", np.array(1, np.float32)),
                                   b.initializer("shape", np.array([3, 1, 2, hidden], np.int64))])
        y = b.node("Add", [y, filled])
    b.output(b.node("Relu", [y], ["out"]))
    return b.build(), ("infer-shapes",) if with_shapes else ()


@pytest.mark.parametrize("with_shapes", [False, True])
def test_weight_preparation_that_frees_its_weights_is_folded(with_shapes):
    """The four Slices of one weight free it only together: counted per node (shapes known) or
    per cone of one slice, every fold was refused and an exported LSTM kept 3x its nodes."""
    model, first = lstm_model(with_shapes=with_shapes)
    folded, result = run_pass(model, "fold-constants", first=first)
    folded, _ = run_pass(folded, "eliminate-dead-nodes")

    assert result.counters["kept_for_size"] == 0
    assert top_ops(folded.graph) == ["LSTM", "Relu"]
    assert folded.ByteSize() < model.ByteSize()
    assert_equivalent(model, folded)


@pytest.mark.parametrize("with_shapes", [False, True])
def test_growing_fold_beside_a_shrinking_one_is_still_refused(with_shapes):
    model, first = lstm_model(with_shapes=with_shapes, grow=True)
    folded, result = run_pass(model, "fold-constants", first=first, node_bytes=0)
    folded, _ = run_pass(folded, "eliminate-dead-nodes")

    assert top_ops(folded.graph) == ["LSTM", "Expand", "Add", "Relu"]
    assert folded.ByteSize() < model.ByteSize()
    assert_equivalent(model, folded)


def test_weight_split_between_two_readers_is_folded_when_both_halves_are_stored():
    """w [2, 64] split in two halves, each read by its own Mul: storing one half alone frees
    nothing (the other Slice still reads w), storing both frees w. Credited half of w each."""
    b = ModelBuilder()
    x = b.input("x", [64])
    w = b.initializer("w", random([2, 64], 12))
    zero, one, two = (b.initializer(name, np.array([value], np.int64)) for name, value in (("i0", 0), ("i1", 1), ("i2", 2)))
    first = b.node("Slice", [w, zero, one])
    second = b.node("Slice", [w, one, two])
    b.output(b.node("Mul", [x, first], ["y"]))
    b.output(b.node("Mul", [x, second], ["z"]))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert result.counters["folded"] == 2 and ops(folded)["Slice"] == 0
    assert folded.ByteSize() < model.ByteSize()
    assert_equivalent(model, folded)


def test_weight_copied_for_two_readers_stays():
    """w [64] negated for one reader and doubled for another: both results are w's size, and
    together they replace one w: storing both would grow the model by w."""
    b = ModelBuilder()
    x = b.input("x", [64])
    w = b.initializer("w", random([64], 13))
    b.output(b.node("Mul", [x, b.node("Neg", [w])], ["y"]))
    b.output(b.node("Mul", [x, b.node("Add", [w, w])], ["z"]))
    model = b.build()

    folded, result = fold_and_clean(model, node_bytes=0)

    assert not result.changed and result.counters["kept_for_size"] == 2
    assert folded.ByteSize() <= model.ByteSize()


@pytest.mark.parametrize("model_name", ["chain", "expand", "shared", "branch"])
def test_folded_model_never_grows_without_a_node_allowance(model_name):
    models = {
        "chain": lambda: _chain_model(),
        "expand": expand_model,
        "shared": lambda: _shared_model(),
        "branch": lambda: _branch_model(),
    }
    model = models[model_name]()
    folded, _ = fold_and_clean(run_passes(model, "lift-constants", "eliminate-dead-nodes"), node_bytes=0)
    assert folded.ByteSize() <= model.ByteSize()


def anchor_model(steps):
    """A detector's anchors in miniature: a grid built from Range, Unsqueeze, Expand and Concat
    (`steps` × 2 float32 centres, more bytes than the few scalars it is made of)."""
    b = ModelBuilder()
    x = b.input("x", [steps, 2])
    start, limit, delta = (b.initializer(name, np.array(value, np.float32)) for name, value in (("start", 0.5), ("limit", steps + 0.5), ("delta", 1.0)))
    axis = b.initializer("axis", np.array([1], np.int64))
    centres = b.node("Unsqueeze", [b.node("Range", [start, limit, delta]), axis])
    scaled = b.node("Mul", [centres, b.initializer("stride", np.array(8.0, np.float32))])
    grid = b.node("Concat", [scaled, b.node("Neg", [scaled])], axis=1)
    b.output(b.node("Add", [x, grid], ["y"]))
    return b.build()


def test_fold_that_grows_the_file_by_less_than_its_nodes_are_worth_is_taken():
    """5 nodes computing 64 × 2 floats (512 B) from scalars: the file grows by ~500 B, within
    the default 512 B per node removed."""
    model = anchor_model(64)

    folded, result = fold_and_clean(model)

    assert result.counters["folded"] == 1 and top_ops(folded.graph) == ["Add"]
    assert 0 < folded.ByteSize() - model.ByteSize() <= 5 * 512
    assert_equivalent(model, folded)


def test_fold_that_grows_the_file_by_more_than_its_nodes_are_worth_stays():
    """The same 5 nodes computing 4096 × 2 floats (32 KB): not worth 5 nodes."""
    model = anchor_model(4096)

    folded, result = fold_and_clean(model)

    assert not result.changed and ops(folded) == ops(model)
    assert folded.ByteSize() <= model.ByteSize()


def _chain_model():
    b = ModelBuilder()
    x = b.input("x", [4, 4])
    w = b.constant(random([4, 4], 1))
    t = b.node("Transpose", [b.node("Mul", [w, b.constant(np.array(3, np.float32))])], perm=[1, 0])
    b.output(b.node("MatMul", [x, t]))
    return b.build()


def _shared_model():
    b = ModelBuilder()
    x = b.input("x", [16])
    w = b.initializer("w", random([16], 2))
    b.output(b.node("Add", [x, b.node("Tile", [w, b.initializer("reps", np.array([1], np.int64))])]))
    b.output(b.node("Mul", [x, w]))
    b.output(b.node("Sub", [x, b.node("Neg", [w])]))
    return b.build()


def _branch_model():
    b = ModelBuilder()
    x = b.input("x", [8])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    one, shape = then.constant(np.array(1, np.float32)), then.constant(np.array([8], np.int64))
    then.output(then.node("Add", [x, then.node("Expand", [one, shape])]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.if_node(condition, then, other))
    return b.build()


def test_branch_output_that_is_constant_keeps_its_name():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    ones = [then.initializer(name, np.ones([2, 3], np.float32)) for name in ("k1", "k2")]
    then.output(then.node("Add", ones, ["sum"]))
    other = b.branch()
    other.output(other.node("Abs", [x]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    folded, result = fold_and_clean(model)

    assert result.counters["folded"] == 1
    then_body, _ = branches(folded)
    assert top_ops(then_body) == ["Constant"] and [value.name for value in then_body.output] == ["sum"]
    assert_equivalent(model, folded, [{"x": random([2, 3]), "c": np.array(flag)} for flag in (True, False)])
