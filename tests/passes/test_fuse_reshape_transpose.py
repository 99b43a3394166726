"""fuse-reshape-transpose: Reshape -> Transpose -> Reshape that moves whole dims becomes one Transpose,
with targets computed at run time from Shape/Slice/Concat as the dynamo exporter writes them."""

import itertools

import numpy as np
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from builder import ModelBuilder, assert_equivalent, ops, random, run_pass

import onnxslim

INT64_MIN = np.iinfo(np.int64).min


class Chain:
    """x -> Reshape(x, first) -> Transpose(perm) -> Reshape(., last) -> y, targets built from pieces."""

    def __init__(self, dims, opset=18):
        self.b = ModelBuilder(opset=opset)
        self.x = self.b.input("x", dims)
        self.shape = self.b.node("Shape", [self.x], ["x_shape"])

    def const(self, values):
        return self.b.initializer(self.b.fresh("c"), np.array(values, np.int64))

    def slice(self, start, end, of=None):
        """Shape(x)[start:end] the exporter's way: Slice of the whole shape."""
        return self.b.node("Slice", [of or self.shape, self.const([start]), self.const([end])])

    def dims(self, start, end, tensor=None):
        """Shape(x, start, end): the Shape op's own attributes."""
        return self.b.node("Shape", [tensor or self.x], start=start, end=end)

    def build(self, first, perm, last, allowzero=(0, 0)):
        b = self.b
        merged = b.node("Reshape", [self.x, b.node("Concat", first, axis=0)], allowzero=allowzero[0])
        moved = b.node("Transpose", [merged], perm=perm)
        b.output(b.node("Reshape", [moved, b.node("Concat", last, axis=0)], ["y"], allowzero=allowzero[1]))
        return b.build()


def k_transpose(allowzero=(0, 0), heads=4):
    """The dynamo exporter's transpose(-2, -1) of k[B, H, S, D]: Reshape [-1, S, D], Transpose, Reshape [B, H, D, S]."""
    chain = Chain(["batch", heads, "seq", 8])
    seq = chain.slice(-2, -1)
    leading = chain.slice(INT64_MIN, -2)
    return chain.build([chain.const([-1]), seq, chain.const([8])], [0, 2, 1], [leading, chain.const([8]), seq], allowzero)


def feeds(*shapes):
    return [{"x": random(shape, seed=index)} for index, shape in enumerate(shapes)]


def fuse(model):
    return run_pass(model, "fuse-reshape-transpose", first=("infer-shapes",))


def perm_of(model):
    (node,) = [node for node in model.graph.node if node.op_type == "Transpose" and node.output[0] == "y"]
    return list(node.attribute[0].ints)


def test_dynamo_k_transpose_becomes_one_transpose():
    model = k_transpose()
    fused, result = fuse(model)
    assert result.counters["fused"] == 1
    assert perm_of(fused) == [0, 1, 3, 2]
    assert_equivalent(model, fused, feeds([2, 4, 3, 8], [3, 4, 5, 8]))
    # In the pipeline the whole shape chain dies with the Reshapes.
    optimized = onnxslim.optimize(model, verify=False)
    assert ops(optimized) == {"Transpose": 1}
    assert_equivalent(model, optimized, feeds([1, 4, 7, 8], [2, 4, 2, 8]))


def test_shape_start_end_attributes_and_gathered_dims():
    chain = Chain(["batch", 4, "seq", 8])
    batch, seq = chain.dims(0, 1), chain.dims(2, 3)
    heads = chain.b.node("Unsqueeze", [chain.b.node("Gather", [chain.shape, chain.const(1)], axis=0), chain.const([0])])
    model = chain.build([chain.const([-1]), seq, chain.const([8])], [0, 2, 1], [batch, heads, chain.const([8]), seq])
    fused, result = fuse(model)
    assert result.counters["fused"] == 1 and perm_of(fused) == [0, 1, 3, 2]
    assert_equivalent(model, fused, feeds([2, 4, 3, 8], [1, 4, 6, 8]))


def test_runs_of_several_dims_are_merged_and_split_back():
    # x[B, 2, 3, S] -> [B, 6, S] -> [B, S, 6] -> [B, S, 2, 3]  ==  Transpose(x, [0, 3, 1, 2])
    chain = Chain(["batch", 2, 3, "seq"])
    batch, seq = chain.dims(0, 1), chain.dims(3, 4)
    model = chain.build([batch, chain.const([6]), seq], [0, 2, 1], [batch, seq, chain.const([2, 3])], allowzero=(1, 1))
    fused, result = fuse(model)
    assert result.counters["fused"] == 1 and perm_of(fused) == [0, 3, 1, 2]
    assert_equivalent(model, fused, feeds([2, 2, 3, 5], [3, 2, 3, 1]))


def test_a_merged_run_moved_as_a_whole():
    # [B, H, S, D] -> [B*H, S, D] -> [S, B*H, D] -> [S, B, H, D]  ==  Transpose(x, [2, 0, 1, 3])
    # (allowzero=1: with 0, seq = batch = 0 would copy dims and run with another shape)
    chain = Chain(["batch", 4, "seq", 8])
    seq, leading = chain.slice(2, 3), chain.slice(0, 2)
    model = chain.build([chain.const([-1]), seq, chain.const([8])], [1, 0, 2], [seq, leading, chain.const([8])], allowzero=(1, 1))
    fused, result = fuse(model)
    assert result.counters["fused"] == 1 and perm_of(fused) == [2, 0, 1, 3]
    assert_equivalent(model, fused, feeds([2, 4, 3, 8], [3, 4, 2, 8]))


def test_static_targets_fuse_too():
    chain = Chain([2, 4, 3, 8])
    model = chain.build([chain.const([-1, 3, 8])], [0, 2, 1], [chain.const([2, 4, 8, 3])])
    fused, result = fuse(model)
    assert result.counters["fused"] == 1 and perm_of(fused) == [0, 1, 3, 2]
    assert_equivalent(model, fused)


def assert_unchanged(model, *shapes):
    fused, result = fuse(model)
    assert not result.changed
    assert ops(fused)["Reshape"] == 2
    if shapes:
        assert_equivalent(model, fused, feeds(*shapes))


def test_a_target_that_does_not_merge_runs_of_dims_stays():
    # [B, H, S, D] -> [-1, D, S] reads S x D as D x S: not a merge of whole dims.
    chain = Chain(["batch", 4, "seq", 8])
    seq, leading = chain.slice(2, 3), chain.slice(0, 2)
    model = chain.build([chain.const([-1, 8]), seq], [0, 2, 1], [leading, seq, chain.const([8])])
    assert_unchanged(model, [2, 4, 3, 8], [1, 4, 5, 8])


def test_a_dim_of_another_tensor_is_not_proven_equal():
    chain = Chain(["batch", 4, "seq", 8])
    other = chain.b.input("other", ["n", "m"])
    seq = chain.slice(2, 3)
    foreign = chain.dims(0, 1, tensor=other)  # the same size as batch in the feeds, not provably so
    model = chain.build([chain.const([-1]), seq, chain.const([8])], [0, 2, 1], [foreign, chain.const([4, 8]), seq])
    assert_unchanged(model)


def test_a_perm_the_last_target_does_not_follow_stays():
    # The Transpose moves the merged run to the middle, but the last Reshape splits as if it had not.
    chain = Chain(["batch", 4, "seq", 8])
    seq, leading = chain.slice(2, 3), chain.slice(0, 2)
    model = chain.build([chain.const([-1]), seq, chain.const([8])], [1, 0, 2], [leading, seq, chain.const([8])])
    assert_unchanged(model)


def test_a_zero_size_dim_that_changes_the_chains_result_stays():
    # With a symbolic head count, batch = heads = 0 lets the chain run and give [0, 8, 8, S]
    # (a computed 0 in an allowzero=0 target copies the input's dim), not Transpose's [0, 0, 8, S].
    model = k_transpose(heads="heads")
    assert_unchanged(model, [2, 4, 3, 8], [1, 2, 5, 8])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros([0, 0, 3, 8], np.float32)})[0].shape == (0, 8, 8, 3)
    # With allowzero=1 a computed 0 is a 0: the same chain is a Transpose for every size.
    fused, result = fuse(k_transpose(heads="heads", allowzero=(1, 1)))
    assert result.counters["fused"] == 1 and perm_of(fused) == [0, 1, 3, 2]


def test_static_heads_with_allowzero_0_is_exact_for_zero_sizes():
    # batch = 0 copies a 0; seq = 0 makes the last Reshape copy past the rank and fail: no case differs.
    model = k_transpose()
    fused, _ = fuse(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    zero_batch = {"x": np.zeros([0, 4, 3, 8], np.float32)}
    assert session.run(None, zero_batch)[0].shape == (0, 4, 8, 3)
    assert_equivalent(model, fused, [zero_batch])


def test_inside_an_if_branch():
    b = ModelBuilder(opset=18)
    x = b.input("x", ["batch", 4, "seq", 8])
    flag = b.input("flag", [], dtype=np.bool_)
    then = b.branch()
    shape = then.node("Shape", [x])
    seq = then.node("Slice", [shape, then.constant(np.array([-2], np.int64)), then.constant(np.array([-1], np.int64))])
    leading = then.node("Slice", [shape, then.constant(np.array([INT64_MIN], np.int64)), then.constant(np.array([-2], np.int64))])
    eight = then.constant(np.array([8], np.int64))
    first = then.node("Concat", [then.constant(np.array([-1], np.int64)), seq, eight], axis=0)
    moved = then.node("Transpose", [then.node("Reshape", [x, first])], perm=[0, 2, 1])
    then.output(then.node("Reshape", [moved, then.node("Concat", [leading, eight, seq], axis=0)]))
    otherwise = b.branch()
    otherwise.output(otherwise.node("Transpose", [x], perm=[0, 1, 3, 2]))
    b.output(b.if_node(flag, then, otherwise), np.float32, ["batch", 4, None, None])
    model = b.build()
    fused, result = fuse(model)
    assert result.counters["fused"] == 1
    cases = [{"x": random(shape, seed=1), "flag": np.array(flag)} for shape in ([2, 4, 3, 8], [1, 4, 6, 8]) for flag in (True, False)]
    assert_equivalent(model, fused, cases)


# ----------------------------------------------------------------------------- random chains, every size

PROFILE = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck), print_blob=False)


@st.composite
def chains(draw):
    """A Reshape -> Transpose -> Reshape chain over x with static and symbolic dims, targets built
    from Shape slices and constants; sometimes a -1, sometimes a wrong element (a swap)."""
    rank = draw(st.integers(2, 4))
    dims = [draw(st.sampled_from([1, 2, 3, f"d{axis}"])) for axis in range(rank)]
    cuts = sorted(draw(st.sets(st.integers(1, rank - 1), max_size=rank - 1)))
    runs = [list(range(start, end)) for start, end in zip([0, *cuts], [*cuts, rank])]
    order = draw(st.permutations(range(len(runs))))
    allowzero = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    chain = Chain(dims)

    def element(axes):
        if all(isinstance(dims[axis], int) for axis in axes):
            return chain.const([int(np.prod([dims[axis] for axis in axes]))])
        if len(axes) == 1:
            return chain.slice(axes[0], axes[0] + 1)
        return None  # a product of symbolic dims: only a -1 can say it

    def target(groups):
        pieces = [element(axes) for axes in groups]
        free = [index for index, piece in enumerate(pieces) if piece is None]
        if len(free) > 1:
            return None
        minus_one = free[0] if free else draw(st.sampled_from([None, *range(len(pieces))]))
        if minus_one is not None:
            pieces[minus_one] = chain.const([-1])
        if len(pieces) > 1 and draw(st.integers(0, 5)) == 0:
            first, second = draw(st.permutations(range(len(pieces))))[:2]
            pieces[first], pieces[second] = pieces[second], pieces[first]
        return pieces

    first = target(runs)
    last = target([[axis] for run in order for axis in runs[run]])
    if first is None or last is None:
        return None
    return chain.build(first, list(order), last, allowzero), dims


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@settings(max_examples=80, **PROFILE)
@given(case=chains())
def test_random_chains_agree_at_every_size_zero_included(case):
    if case is None:
        return
    model, dims = case
    fused, result = fuse(model)
    if not result.changed:
        return
    symbols = [axis for axis, dim in enumerate(dims) if isinstance(dim, str)]
    for sizes in itertools.product([0, 1, 2, 3], repeat=len(symbols)):
        shape = list(dims)
        for axis, size in zip(symbols, sizes):
            shape[axis] = size
        x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
        try:
            expected = run(model, x)
        except Exception:  # the chain fails for these sizes: the rewrite may do anything
            continue
        actual = run(fused, x)
        assert actual.shape == expected.shape, (dims, shape)
        np.testing.assert_array_equal(actual, expected)
