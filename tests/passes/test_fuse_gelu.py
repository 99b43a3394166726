"""fuse-gelu: GELU written in arithmetic (erf or tanh form, any grouping) becomes Gelu (opset 20+).

Graphs are `x -> Identity -> gelu -> Neg -> y` with x of shape [N, S, 8], N and S dynamic and run
at two sizes each, values in [-4, 4]; the nodes the pattern leaves unread go to dead-node elimination.
"""

import math

import numpy as np
import onnx
import pytest
from builder import ModelBuilder, assert_equivalent, ops, output_names, run_pass, top_ops

import onnxslim

SHAPE = ["N", "S", 8]
SIZES = ((2, 5), (3, 1))
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def fuse(model):
    fused, result = run_pass(model, "fuse-gelu", first=("infer-shapes",))
    cleaned, _ = run_pass(fused, "eliminate-dead-nodes")
    return cleaned, result


def feeds(dtype=np.float32):
    result = []
    for seed, (n, s) in enumerate(SIZES):
        rng = np.random.default_rng(seed)
        result.append({"x": rng.uniform(-4, 4, [n, s, 8]).astype(dtype)})
    return result


class Gelu:
    """Builds GELU variants on `self.x`; `c(value)` is a one-element constant of the model's dtype."""

    def __init__(self, opset=20, dtype=np.float32, constant_shape=()):
        self.b = ModelBuilder(opset=opset)
        self.dtype, self.constant_shape = dtype, constant_shape
        self.b.input("x", SHAPE, dtype)
        self.x = self.b.node("Identity", ["x"], ["source"])

    def c(self, value):
        return self.b.initializer(self.b.fresh("c"), np.full(self.constant_shape, value, self.dtype))

    def op(self, op_type, *inputs):
        return self.b.node(op_type, list(inputs))

    def build(self, y):
        self.b.output(self.b.node("Neg", [y], ["y"]))
        return self.b.build()


def legacy_erf(g, sqrt2=1.4142135623730951):
    """torch.onnx (dynamo=False) and torchlib: (x · (erf(x / √2) + 1)) · ½."""
    gate = g.op("Add", g.op("Erf", g.op("Div", g.x, g.c(sqrt2))), g.c(1.0))
    return g.op("Mul", g.op("Mul", g.x, gate), g.c(0.5))


def half_first_erf(g):
    """x · ½ first, erf(x · 1/√2)."""
    gate = g.op("Add", g.c(1.0), g.op("Erf", g.op("Mul", g.x, g.c(0.7071067811865476))))
    return g.op("Mul", g.op("Mul", g.x, g.c(0.5)), gate)


def halved_by_division_erf(g):
    """x / 2 · (1 + erf(x / √2)), the product grouped to the right."""
    gate = g.op("Add", g.c(1.0), g.op("Erf", g.op("Div", g.x, g.c(1.41421356))))
    return g.op("Mul", g.op("Div", g.x, g.c(2.0)), gate)


def gpt2_tanh(g, cube="Pow", exponent=None):
    """GPT-2's NewGELU: 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))."""
    x = g.x
    if cube == "Pow":
        cubed = g.op("Pow", x, exponent if exponent is not None else g.c(3.0))
    else:
        cubed = g.op("Mul", g.op("Mul", x, x), x)
    inner = g.op("Mul", g.c(SQRT_2_OVER_PI), g.op("Add", x, g.op("Mul", g.c(0.044715), cubed)))
    gate = g.op("Add", g.c(1.0), g.op("Tanh", inner))
    return g.op("Mul", g.op("Mul", g.c(0.5), x), gate)


def fast_tanh(g):
    """FastGELU: x · ½ · (1 + tanh(x · 0.7978845608 · (1 + 0.044715 · x · x)))."""
    x = g.x
    inner = g.op("Mul", g.op("Mul", x, g.c(0.7978845608)), g.op("Add", g.c(1.0), g.op("Mul", g.op("Mul", g.c(0.044715), x), x)))
    return g.op("Mul", x, g.op("Mul", g.c(0.5), g.op("Add", g.op("Tanh", inner), g.c(1.0))))


def gelu_node(model):
    return next(node for node in model.graph.node if node.op_type == "Gelu")


def approximate(model):
    return {a.name: onnx.helper.get_attribute_value(a) for a in gelu_node(model).attribute}.get("approximate", b"none")


def assert_fused(model, counter):
    optimized, result = fuse(model)
    assert result.changed and result.counters[counter] == 1
    assert top_ops(optimized.graph) == ["Identity", "Gelu", "Neg"]
    assert output_names(optimized) == output_names(model)
    assert_equivalent(model, optimized, feeds())
    return optimized


def assert_kept(model, dtype=np.float32):
    optimized, result = fuse(model)
    assert not result.changed
    assert ops(optimized) == ops(model)
    assert_equivalent(model, optimized, feeds(dtype))


# ----------------------------------------------------------------------------- fused


@pytest.mark.parametrize("form", [legacy_erf, half_first_erf, halved_by_division_erf])
def test_erf_gelu_becomes_gelu(form):
    g = Gelu()
    optimized = assert_fused(g.build(form(g)), "erf")
    assert approximate(optimized) == b"none"


@pytest.mark.parametrize("cube", ["Pow", "Mul"])
def test_gpt2_tanh_gelu_becomes_tanh_gelu(cube):
    g = Gelu()
    optimized = assert_fused(g.build(gpt2_tanh(g, cube)), "tanh")
    assert approximate(optimized) == b"tanh"


def test_integer_exponent_and_fast_gelu_grouping():
    g = Gelu()
    assert_fused(g.build(gpt2_tanh(g, exponent=g.b.initializer("three", np.array(3, np.int64)))), "tanh")
    g = Gelu()
    assert_fused(g.build(fast_tanh(g)), "tanh")


def test_rank_1_constants_are_scalars():
    g = Gelu(constant_shape=(1,))
    assert_fused(g.build(legacy_erf(g)), "erf")


def test_gelu_producing_a_graph_output_keeps_the_output_name():
    g = Gelu()
    y = g.b.output(g.b.node("Mul", [g.op("Mul", g.x, g.op("Add", g.op("Erf", g.op("Div", g.x, g.c(1.4142135))), g.c(1.0))), g.c(0.5)], ["y"]))
    model = g.b.build()
    optimized, _ = fuse(model)
    assert top_ops(optimized.graph) == ["Identity", "Gelu"] and list(optimized.graph.node[1].output) == [y]
    assert_equivalent(model, optimized, feeds())


def test_default_pipeline_fuses_and_is_a_fixed_point():
    g = Gelu()
    model = g.build(gpt2_tanh(g))
    optimized = onnxslim.optimize(model, verify=onnxslim.VerifyOptions(inputs=feeds()))
    assert ops(optimized)["Gelu"] == 1 and sum(ops(optimized).values()) == 2
    assert onnxslim.optimize(optimized, verify=onnxslim.VerifyOptions(inputs=feeds())).SerializeToString() \
        == optimized.SerializeToString()


# ----------------------------------------------------------------------------- kept


def test_below_opset_20_is_kept():
    g = Gelu(opset=19)
    assert_kept(g.build(legacy_erf(g)))


@pytest.mark.parametrize("dtype", [np.float16])
def test_float16_is_kept(dtype):
    """onnxruntime has no float16 Gelu kernel: it expands the schema's function, no faster than the original."""
    g = Gelu(dtype=dtype)
    assert_kept(g.build(legacy_erf(g)), dtype)


@pytest.mark.parametrize("sqrt2", [1.41, 1.4143])
def test_other_constants_are_kept(sqrt2):
    g = Gelu()
    assert_kept(g.build(legacy_erf(g, sqrt2)))


def test_other_factor_is_kept():
    g = Gelu()
    gate = g.op("Add", g.op("Erf", g.op("Div", g.x, g.c(1.4142135623730951))), g.c(1.0))
    assert_kept(g.build(g.op("Mul", g.op("Mul", g.x, gate), g.c(0.25))))


def test_erf_of_another_tensor_is_kept():
    g = Gelu()
    other = g.op("Neg", g.x)
    gate = g.op("Add", g.op("Erf", g.op("Div", other, g.c(1.4142135623730951))), g.c(1.0))
    assert_kept(g.build(g.op("Mul", g.op("Mul", g.x, gate), g.c(0.5))))


def test_gate_read_elsewhere_is_kept():
    g = Gelu()
    gate = g.op("Add", g.op("Erf", g.op("Div", g.x, g.c(1.4142135623730951))), g.c(1.0))
    g.b.output(gate, np.float32, SHAPE)
    assert_kept(g.build(g.op("Mul", g.op("Mul", g.x, gate), g.c(0.5))))


def test_constant_that_raises_the_rank_is_kept():
    """½ of shape [1, 1, 1, 1] makes the result rank 4; Gelu(x) is rank 3."""
    g = Gelu()
    gate = g.op("Add", g.op("Erf", g.op("Div", g.x, g.c(1.4142135623730951))), g.c(1.0))
    half = g.b.initializer("half", np.full([1, 1, 1, 1], 0.5, np.float32))
    g.b.output(g.b.node("Mul", [g.op("Mul", g.x, gate), half], ["y"]))
    model = g.b.build()
    optimized, result = fuse(model)
    assert not result.changed
    assert_equivalent(model, optimized, feeds())
