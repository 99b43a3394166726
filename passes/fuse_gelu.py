"""GELU written out in arithmetic, replaced by Gelu (opset 20+).

    ½ · x · (1 + erf(x / √2))                          = Gelu(x)
    ½ · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))  = Gelu(x; approximate="tanh")

The product may be grouped and ordered any way (x·½ first or last, ½ as x / 2); the argument of
erf/tanh is read as a polynomial in x, so x / 1.4142 and x · 0.7071 match, as do x³ written as
Pow(x, 3) or x·x·x and the factored form √(2/π) · x · (1 + 0.044715 · x²). Constants match to a
relative 1e-6: their float32 rounding (6e-8) and literals written with six significant digits.

Only float32 is fused. onnxruntime has a Gelu kernel for float32 alone and runs other types
through the schema's function body, Casts and all: on float16 the tanh form ran slower than the
arithmetic it replaces and the erf form no faster; float64 Erf has no kernel at all. In float32
Gelu is faster than either written-out form with onnxruntime's optimizations off, and matches the
FastGelu/Gelu contrib ops that onnxruntime's own fusions make of the arithmetic when they are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_value, disconnect, find, insert_before, interface_tensors, is_standard, known_rank, single_reader, unique_names, walk
from onnxslim.manager import PassContext, PassResult, register_pass

GELU_OPSET = 20
FUSED_TYPES = (np.dtype(np.float32),)
FLOAT_TYPES = tuple(np.dtype(dtype) for dtype in (np.float16, np.float32, np.float64))
TOLERANCE = 1e-6
ERF_ARGUMENT = {1: 1 / math.sqrt(2)}
TANH_SCALE = math.sqrt(2 / math.pi)
TANH_ARGUMENT = {1: TANH_SCALE, 3: TANH_SCALE * 0.044715}
# Deep enough for every grouping of the tanh argument; a polynomial never needs more.
MAX_DEPTH = 8
MAX_DEGREE = 3

Polynomial = dict[int, float]  # power of x -> coefficient


@dataclass
class Gelu:
    x: gs.Tensor
    approximate: str  # "none" (erf) or "tanh"


@register_pass("fuse-gelu")
def fuse_gelu(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace ½·x·(1 + erf(x/√2)) and its tanh approximation by Gelu (opset 20+, float32)."""
    if (graph.opset or 0) < GELU_OPSET:
        return PassResult(erf=0, tanh=0)
    interface = interface_tensors(graph)
    names = unique_names(graph)
    counts = {"none": 0, "tanh": 0}
    for subgraph in walk(graph):
        for mul in find(subgraph, "Mul"):
            match = _match(mul, interface) if len(mul.outputs) == 1 else None
            if match is None:
                continue
            output = mul.outputs[0]
            attrs = {"approximate": match.approximate} if match.approximate != "none" else {}
            node = gs.Node("Gelu", names("Gelu"), attrs, inputs=[match.x])
            disconnect(mul)
            node.outputs.append(output)
            insert_before(subgraph, mul, node)
            counts[match.approximate] += 1
    return PassResult(erf=counts["none"], tanh=counts["tanh"])


# ----------------------------------------------------------------------------- matching


def is_gelu(root: gs.Node, interface: set[int]) -> bool:
    """`root` is the last Mul (or Div) of a GELU written out, in any float type: a pattern that
    onnxruntime fuses itself where this pass does not (below opset 20, other types), so other
    rewrites leave it whole."""
    return _match(root, interface, FLOAT_TYPES) is not None


def _match(root: gs.Node, interface: set[int], types: tuple[np.dtype, ...] = FUSED_TYPES) -> Gelu | None:
    """`root` as the last Mul of ½ · x · (1 + f(p(x))), f = erf or tanh."""
    product = _product(root, interface)
    if product is None:
        return None
    coefficient, factors, constants = product
    if len(factors) != 2 or not _close(coefficient, 0.5):
        return None
    for gate_index in (0, 1):
        x, gate = factors[1 - gate_index], factors[gate_index]
        found = _gate(gate, x, interface, types)
        if found is not None and all(_fits(constant, x) for constant in constants):
            return Gelu(x, found)
    return None


def _product(root: gs.Node, interface: set[int]) -> tuple[float, list[gs.Tensor], list[gs.Tensor]] | None:
    """(c, [f₁, f₂ …], constants) with root's output = c · f₁ · f₂ …, through Muls and Divs by
    one-element constants, each inner step read only by the next."""
    coefficient, factors, constants = 1.0, [], []
    pending = [(root, tensor) for tensor in root.inputs]
    while pending:
        parent, tensor = pending.pop()
        divide = parent.op == "Div" and tensor is parent.inputs[1]
        value = _scalar(tensor)
        if value is not None:
            if value == 0 and divide:
                return None
            coefficient = coefficient / value if divide else coefficient * value
            constants.append(tensor)
            continue
        if divide:
            return None  # a division by a variable
        node = tensor.inputs[0] if tensor.inputs else None
        if (
            node is not None
            and node.op in ("Mul", "Div")
            and is_standard(node)
            and len(node.inputs) == 2
            and single_reader(tensor, interface) is parent
        ):
            pending.extend((node, inner) for inner in node.inputs)
        else:
            factors.append(tensor)
        if len(factors) > 2:
            return None
    return coefficient, factors, constants


def _gate(gate: gs.Tensor, x: gs.Tensor, interface: set[int], types: tuple[np.dtype, ...]) -> str | None:
    """"none" if gate = 1 + erf(x/√2), "tanh" if 1 + tanh(√(2/π)(x + 0.044715x³)), each step read once."""
    add = gate.inputs[0] if gate.inputs else None
    # The gate is a factor of the product: its one reader is the product's Mul.
    if add is None or add.op != "Add" or not is_standard(add) or len(add.inputs) != 2 or single_reader(gate, interface) is None:
        return None
    for one_index in (0, 1):
        one, inner = add.inputs[one_index], add.inputs[1 - one_index]
        if _scalar(one) != 1.0 or not _fits(one, x) or np.dtype(constant_value(one).dtype) not in types:
            continue
        function = inner.inputs[0] if inner.inputs else None
        if function is None or function.op not in ("Erf", "Tanh") or not is_standard(function):
            continue
        if single_reader(inner, interface) is not add:
            continue
        polynomial = _polynomial(function.inputs[0], x, function, interface, MAX_DEPTH)
        expected = ERF_ARGUMENT if function.op == "Erf" else TANH_ARGUMENT
        if polynomial is not None and _same_polynomial(polynomial, expected):
            return "none" if function.op == "Erf" else "tanh"
    return None


def _polynomial(tensor: gs.Tensor, x: gs.Tensor, reader: gs.Node, interface: set[int], depth: int) -> Polynomial | None:
    """`tensor` as a polynomial in x built from one-element constants with +, −, ·, / by a constant
    and Pow by 2 or 3; every node between x and `reader` read only by the next."""
    if tensor is x:
        return {1: 1.0}
    value = _scalar(tensor)
    if value is not None:
        return {0: value} if _fits(tensor, x) else None
    node = tensor.inputs[0] if tensor.inputs else None
    if (
        depth == 0
        or node is None
        or not is_standard(node)
        or len(node.inputs) != 2
        or single_reader(tensor, interface) is not reader
    ):
        return None
    if node.op == "Pow":
        exponent = constant_value(node.inputs[1])
        base = _polynomial(node.inputs[0], x, node, interface, depth - 1)
        if base is None or exponent is None or exponent.size != 1 or not _fits(node.inputs[1], x):
            return None
        exponent = float(exponent.reshape(-1)[0])
        if exponent not in (2.0, 3.0):
            return None
        result: Polynomial | None = {0: 1.0}
        for _ in range(int(exponent)):
            result = _multiply(result, base)
            if result is None:
                return None
        return result
    if node.op == "Div":
        divisor = _scalar(node.inputs[1])
        numerator = _polynomial(node.inputs[0], x, node, interface, depth - 1)
        if numerator is None or not divisor or not _fits(node.inputs[1], x):
            return None
        return {power: coefficient / divisor for power, coefficient in numerator.items()}
    if node.op not in ("Add", "Sub", "Mul"):
        return None
    left = _polynomial(node.inputs[0], x, node, interface, depth - 1)
    right = _polynomial(node.inputs[1], x, node, interface, depth - 1) if left is not None else None
    if right is None:
        return None
    if node.op == "Mul":
        return _multiply(left, right)
    sign = 1.0 if node.op == "Add" else -1.0
    result = dict(left)
    for power, coefficient in right.items():
        result[power] = result.get(power, 0.0) + sign * coefficient
    return result


def _multiply(left: Polynomial, right: Polynomial) -> Polynomial | None:
    result: Polynomial = {}
    for power_left, left_coefficient in left.items():
        for power_right, right_coefficient in right.items():
            power = power_left + power_right
            if power > MAX_DEGREE:
                return None
            result[power] = result.get(power, 0.0) + left_coefficient * right_coefficient
    return result


def _same_polynomial(found: Polynomial, expected: Polynomial) -> bool:
    powers = set(found) | set(expected)
    return all(_close(found.get(power, 0.0), expected.get(power, 0.0)) for power in powers)


def _close(value: float, expected: float) -> bool:
    return abs(value - expected) <= TOLERANCE * abs(expected)


def _scalar(tensor: gs.Tensor) -> float | None:
    """The value of a one-element float constant."""
    value = constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


def _fits(constant: gs.Tensor, x: gs.Tensor) -> bool:
    """Broadcasting a one-element constant against x cannot raise x's rank."""
    rank = known_rank(constant)
    return rank == 0 or (known_rank(x) is not None and rank <= known_rank(x))
