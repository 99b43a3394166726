"""deduplicate-initializers: equal constants become one tensor; different ones never do."""

import numpy as np
import onnx
from builder import ModelBuilder, assert_equivalent, branches, initializer_names, random, run_pass, run_passes
from onnxslim import PassContext, get_pass
from onnxslim.model import to_graph, to_model

FEEDS = [{"x": random([2, 3], seed), "c": np.array(flag)} for seed, flag in ((0, True), (1, False))]


def deduplicate(model):
    """Deduplicate, then drop the initializers nobody reads any more (as the pipeline does)."""
    merged, result = run_pass(model, "deduplicate-initializers")
    return run_passes(merged, "eliminate-dead-nodes"), result


def adds_of(*constants):
    """x -> Add(x, c) for each constant, summed: y = sum(x + c_i)."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    total = None
    for index, value in enumerate(constants):
        term = b.node("Add", [x, b.initializer(f"c{index}", value)])
        total = term if total is None else b.node("Add", [total, term])
    b.output(b.node("Identity", [total], ["y"]))
    return b.build()


def node_inputs(graph, op):
    return [list(node.input) for node in graph.node if node.op_type == op]


def test_equal_constants_become_one():
    model = adds_of(np.ones([3], np.float32), np.ones([3], np.float32), np.full([3], 2, np.float32))

    optimized, result = deduplicate(model)

    assert result.changed and result.counters["merged"] == 1
    assert initializer_names(optimized.graph) == {"c0", "c2"}
    assert node_inputs(optimized.graph, "Add")[:2] == [["x", "c0"], ["x", "c0"]]
    assert_equivalent(model, optimized)


def test_small_integer_constants_are_shared():
    """The many 0, 1 and -1 int64 tensors exporters write for shape arithmetic."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4])
    first = b.node("Unsqueeze", [x, b.initializer("axis_a", np.array([0], np.int64))])
    second = b.node("Unsqueeze", [first, b.initializer("axis_b", np.array([0], np.int64))])
    b.output(b.node("Squeeze", [second, b.initializer("axis_c", np.array([0], np.int64))], ["y"]))
    model = b.build()

    optimized, result = deduplicate(model)

    assert result.counters["merged"] == 2 and initializer_names(optimized.graph) == {"axis_a"}
    assert_equivalent(model, optimized)


def test_a_second_run_changes_nothing():
    model = adds_of(np.ones([3], np.float32), np.ones([3], np.float32))
    once, _ = deduplicate(model)
    _, result = run_pass(once, "deduplicate-initializers")
    assert not result.changed


def test_a_body_constant_equal_to_an_outer_one_reads_the_outer_one():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    outer = b.node("Mul", [x, b.initializer("outer_scale", np.full([3], 3, np.float32))])
    then = b.branch()
    then.output(then.node("Mul", [x, then.initializer("inner_scale", np.full([3], 3, np.float32))]))
    other = b.branch()
    other.output(other.node("Neg", [x]))
    b.output(b.node("Add", [outer, b.if_node(condition, then, other)], ["y"]))
    model = b.build()

    optimized, result = deduplicate(model)

    assert result.counters["merged"] == 1
    then_body, _ = branches(optimized)
    assert not then_body.initializer and list(then_body.node[0].input) == ["x", "outer_scale"]
    assert initializer_names(optimized.graph) == {"outer_scale"}
    assert_equivalent(model, optimized, FEEDS)


def test_equal_constants_of_sibling_bodies_become_one_in_the_enclosing_graph():
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    then = b.branch()
    then.output(then.node("Mul", [x, then.initializer("then_scale", np.full([3], 3, np.float32))]))
    other = b.branch()
    other.output(other.node("Add", [x, other.initializer("else_shift", np.full([3], 3, np.float32))]))
    b.output(b.if_node(condition, then, other))
    model = b.build()

    optimized, result = deduplicate(model)

    assert result.counters["merged"] == 1
    then_body, else_body = branches(optimized)
    kept = then_body.node[0].input[1]
    assert kept in ("then_scale", "else_shift") and else_body.node[0].input[1] == kept
    assert initializer_names(optimized.graph) == {kept}  # export keeps one copy, in the common graph
    assert not then_body.initializer and not else_body.initializer
    assert_equivalent(model, optimized, FEEDS)


# ----------------------------------------------------------------------------- must not merge


def test_same_bytes_of_another_dtype_or_shape_stay_apart():
    """0.0f and int32 0 have the same four bytes; [1.0] and 1.0 the same value."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    cast = b.node("Cast", [x], to=onnx.TensorProto.INT32)
    as_int = b.node("Add", [cast, b.initializer("zero_int", np.array(0, np.int32))])
    as_float = b.node("Add", [x, b.initializer("zero_float", np.array(0, np.float32))])
    scaled = b.node("Mul", [as_float, b.initializer("one_vector", np.array([1], np.float32))])
    scaled = b.node("Mul", [scaled, b.initializer("one_scalar", np.array(1, np.float32))])
    b.output(b.node("Identity", [as_int], ["i"]))
    b.output(b.node("Identity", [scaled], ["y"]))
    model = b.build()

    optimized, result = deduplicate(model)

    assert not result.changed
    assert initializer_names(optimized.graph) == initializer_names(model.graph)
    assert_equivalent(model, optimized)


def test_zero_and_negative_zero_stay_apart():
    model = adds_of(np.zeros([3], np.float32), np.full([3], -0.0, np.float32))
    optimized, result = deduplicate(model)
    assert not result.changed and initializer_names(optimized.graph) == {"c0", "c1"}


def test_a_name_shared_by_different_tensors_of_sibling_bodies_is_not_kept_for_others():
    """Each branch has its own `scale` and `shift`, and each one's `shift` equals the other's `scale`.
    Were a branch to read the other's `scale`, it would hold two different tensors named `scale`."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    condition = b.input("c", [], np.bool_)
    bodies = []
    for scale, shift in ((3, 5), (5, 3)):
        body = b.branch()
        scaled = body.node("Mul", [x, body.initializer("scale", np.full([3], scale, np.float32))])
        body.output(body.node("Add", [scaled, body.initializer("shift", np.full([3], shift, np.float32))]))
        bodies.append(body)
    b.output(b.if_node(condition, *bodies))
    model = b.build()

    graph = to_graph(model)
    result = get_pass("deduplicate-initializers")(graph, PassContext())
    optimized = to_model(graph, model)
    onnx.checker.check_model(optimized)

    assert not result.changed
    assert all(initializer_names(body) == {"scale", "shift"} for body in branches(optimized))
    assert_equivalent(model, optimized, FEEDS)


def test_a_small_integer_constant_stays_in_the_body_that_reads_it():
    """onnx's inference of a body does not see outer initializers' values: an Unsqueeze reading
    its axes from one would lose its shape, and the Concat of that with the known [1, 1] would be
    inferred as empty, which the checker rejects. Float constants are still shared."""
    b = ModelBuilder()
    x = b.input("x", [1, 1, 4, 4])
    h = b.input("h", [], np.int64)
    condition = b.input("c", [], np.bool_)
    b.initializer("axes", np.array([0], np.int64))
    scale = b.initializer("scale", np.full([1], 0.5, np.float32))
    then = b.branch()
    axes = then.initializer("axes_in_branch", np.array([0], np.int64))
    size = then.node("Unsqueeze", [h, axes])
    sizes = then.node("Concat", [then.initializer("ones", np.array([1, 1], np.int64)), size, size], axis=0)
    resized = then.node("Resize", [x, "", "", sizes], mode="nearest")
    then.output(then.node("Mul", [resized, then.initializer("half", np.full([1], 0.5, np.float32))]), np.float32, [1, 1, None, None])
    other = b.branch()
    other.output(other.node("Mul", [x, scale]), np.float32, [1, 1, None, None])
    outer_axes = b.node("Unsqueeze", [h, "axes"], ["outer_size"])
    b.output(b.if_node(condition, then, other), np.float32, [1, 1, None, None])
    b.output(outer_axes, np.int64, [1])
    model = b.build()

    optimized, result = deduplicate(model)

    assert result.counters["merged"] == 1  # the float half, not the axes
    then_body, _ = branches(optimized)
    assert {tensor.name for tensor in then_body.initializer} == {"axes_in_branch", "ones"}
    onnx.checker.check_model(optimized, full_check=True)
    feeds = [{"x": random([1, 1, 4, 4]), "h": np.array(size, np.int64), "c": np.array(flag)} for size in (2, 6) for flag in (True, False)]
    assert_equivalent(model, optimized, feeds)
