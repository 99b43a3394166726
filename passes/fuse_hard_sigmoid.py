"""Hard sigmoid and hard swish written out in arithmetic, replaced by the ONNX ops that compute them.

    clip(x + b, 0, h) / h       = HardSigmoid(x; alpha = 1/h, beta = b/h)     (opset 6+)
    x · clip(x + b, 0, h) / h   = x · HardSigmoid(x; 1/h, b/h)
    x · HardSigmoid(x; 1/6, ½)  = HardSwish(x)                                (opset 14+)

The clip may be Clip (bounds as attributes before opset 11, as inputs from 11), Min(Max(·, 0), h),
Max(Min(·, h), 0) or Min(Relu(·), h); the division may be a Mul by 1/h. HardSigmoid computes
alpha·x + beta where the original computed (x + b)/h: the same value to within a rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    constant_value,
    disconnect,
    find,
    insert_before,
    interface_tensors,
    is_empty,
    is_standard,
    known_rank,
    single_reader,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

HARD_SIGMOID_OPSET = 6
HARD_SWISH_OPSET = 14
CLIP_INPUTS_OPSET = 11
# alpha = 1/h and h·(1/h) = 1 hold to float32 rounding; anything further off is a different function.
TOLERANCE = 1e-6
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass
class HardSigmoid:
    """A matched clip(x + b, 0, h)·k with h·k = 1, and the tensor it computes."""

    x: gs.Tensor
    alpha: float
    beta: float
    multiplied: bool  # x·clip(...)·k: a hard swish with these parameters
    output: gs.Tensor
    last: gs.Node  # the node producing `output`; the new nodes go before it


@register_pass("fuse-hard-sigmoid")
def fuse_hard_sigmoid(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace clip(x + 3, 0, 6) / 6 by HardSigmoid, and x·HardSigmoid(x) by HardSwish (opset 14+)."""
    if graph.opset < HARD_SIGMOID_OPSET:
        return PassResult(hard_sigmoid=0, hard_swish=0)
    interface = interface_tensors(graph)
    names = unique_names(graph)
    hard_sigmoids = hard_swishes = 0
    for subgraph in walk(graph):
        for node in find(subgraph, "Div", "Mul"):
            match = _match(node, interface) if node.outputs else None
            if match is None:
                continue
            if match.multiplied and graph.opset >= HARD_SWISH_OPSET and _is_hard_swish(match.alpha, match.beta):
                _replace(subgraph, match.last, gs.Node("HardSwish", names("HardSwish"), inputs=[match.x]))
                hard_swishes += 1
                continue
            attrs = {"alpha": match.alpha, "beta": match.beta}
            if not match.multiplied:
                _replace(subgraph, match.last, gs.Node("HardSigmoid", names("HardSigmoid"), attrs, inputs=[match.x]))
            else:
                output = match.output
                gate = gs.Variable(names(f"{output.name}_hard_sigmoid"), dtype=output.dtype, shape=output.shape)
                sigmoid = gs.Node("HardSigmoid", names("HardSigmoid"), attrs, inputs=[match.x], outputs=[gate])
                insert_before(subgraph, match.last, sigmoid)
                _replace(subgraph, match.last, gs.Node("Mul", names("Mul"), inputs=[match.x, gate]))
            hard_sigmoids += 1
        if graph.opset >= HARD_SWISH_OPSET:
            for mul in find(subgraph, "Mul"):
                x = _hard_swish_input(mul, interface) if mul.outputs else None
                if x is not None:
                    _replace(subgraph, mul, gs.Node("HardSwish", names("HardSwish"), inputs=[x]))
                    hard_swishes += 1
    return PassResult(hard_sigmoid=hard_sigmoids, hard_swish=hard_swishes)


def _replace(graph: gs.Graph, old: gs.Node, new: gs.Node) -> None:
    """`new` computes `old`'s output (which keeps its name); `old` is disconnected for dead-node elimination."""
    output = old.outputs[0]
    disconnect(old)
    new.outputs.append(output)
    insert_before(graph, old, new)


def _is_hard_swish(alpha: float, beta: float) -> bool:
    return abs(alpha * 6 - 1) <= TOLERANCE and abs(beta * 2 - 1) <= TOLERANCE


# ----------------------------------------------------------------------------- matching


def _match(last: gs.Node, interface: set[int]) -> HardSigmoid | None:
    """`last` as the final ·k (Mul) or /h (Div) of clip(x + b, 0, h)/h or of x·clip(x + b, 0, h)/h."""
    if not is_standard(last) or len(last.inputs) != 2:
        return None
    if last.op == "Div":
        divisor = _scalar(last.inputs[1], last.inputs[0])
        factor = 1.0 / divisor if divisor else None
        scaled = last.inputs[0]
    else:
        constant_index = 1 if constant_value(last.inputs[1]) is not None else 0
        scaled = last.inputs[1 - constant_index]
        factor = _scalar(last.inputs[constant_index], scaled)
    if factor is None or single_reader(scaled, interface) is not last:
        return None
    clamp = _clamp(scaled, interface)
    multiplied = False
    if clamp is None:
        product = scaled.inputs[0] if scaled.inputs else None
        if product is None or product.op != "Mul" or not is_standard(product) or len(product.inputs) != 2:
            return None
        for gate_index in (0, 1):
            clamp = _clamp(product.inputs[gate_index], interface)
            if clamp is not None and single_reader(product.inputs[gate_index], interface) is product:
                break
        else:
            return None
        multiplied = True
        if clamp[0] is not product.inputs[1 - gate_index]:
            return None  # x·clip(y + b) with y ≠ x
    x, shift, high = clamp
    if abs(high * factor - 1) > TOLERANCE or not _float(x, last.inputs):
        return None
    return HardSigmoid(x, float(factor), float(shift * factor), multiplied, last.outputs[0], last)


def _clamp(tensor: gs.Tensor, interface: set[int]) -> tuple[gs.Tensor, float, float] | None:
    """(x, b, h) if `tensor` = clip(x + b, 0, h) (b = 0 without the Add), each step read only by the next."""
    bounds = _bounds(tensor, interface)
    if bounds is None:
        return None
    clamped, low, high = bounds
    if low != 0 or not np.isfinite(high) or high <= 0:
        return None
    add = clamped.inputs[0] if clamped.inputs else None
    if add is not None and add.op == "Add" and is_standard(add) and len(add.inputs) == 2 and single_reader(clamped, interface) is not None:
        for index in (0, 1):
            shift = _scalar(add.inputs[1 - index], add.inputs[index])
            if shift is not None and constant_value(add.inputs[index]) is None:
                return add.inputs[index], shift, high
    return clamped, 0.0, high


def _bounds(tensor: gs.Tensor, interface: set[int]) -> tuple[gs.Tensor, float, float] | None:
    """(y, low, high) if `tensor` = min(max(y, low), high): a Clip, a Relu, or Min/Max by constants
    (nested in either order, the inner one read only by the outer); a missing bound is infinite."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or not is_standard(node):
        return None
    if node.op == "Clip":
        return _clip_bounds(node)
    if node.op == "Relu":
        return node.inputs[0], 0.0, np.inf
    if node.op not in ("Min", "Max") or len(node.inputs) != 2:
        return None
    constant_index = 1 if constant_value(node.inputs[1]) is not None else 0
    inner = node.inputs[1 - constant_index]
    bound = _scalar(node.inputs[constant_index], inner)
    if bound is None:
        return None
    nested = _bounds(inner, interface) if single_reader(inner, interface) is node else None
    if node.op == "Max":
        if nested is not None and nested[1] == -np.inf:  # max(min(y, high), low)
            return nested[0], bound, nested[2]
        return inner, bound, np.inf
    if nested is not None and nested[2] == np.inf:  # min(max(y, low), high), min(relu(y), high)
        return nested[0], nested[1], bound
    return inner, -np.inf, bound


def _clip_bounds(clip: gs.Node) -> tuple[gs.Tensor, float, float] | None:
    if "min" in clip.attrs or "max" in clip.attrs or len(clip.inputs) == 1:
        return clip.inputs[0], float(clip.attrs.get("min", -np.inf)), float(clip.attrs.get("max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if len(clip.inputs) <= index or is_empty(clip.inputs[index]):
            bounds.append(default)
            continue
        value = constant_value(clip.inputs[index])
        if value is None or value.size != 1:
            return None
        bounds.append(float(value.reshape(-1)[0]))
    return clip.inputs[0], bounds[0], bounds[1]


def _scalar(tensor: gs.Tensor, operand: gs.Tensor) -> float | None:
    """The value of a one-element float constant, if broadcasting it against `operand` cannot grow the shape."""
    value = constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    rank = known_rank(operand)
    if value.ndim > 0 and (rank is None or value.ndim > rank):
        return None
    return float(value.reshape(-1)[0])


def _float(x: gs.Tensor, others: list[gs.Tensor]) -> bool:
    """HardSigmoid/HardSwish take float16/32/64: x's type, or that of the constants it was combined with."""
    dtypes = [tensor.dtype for tensor in [x, *others] if tensor.dtype is not None]
    return bool(dtypes) and all(np.dtype(dtype) in [np.dtype(t) for t in FLOAT_TYPES] for dtype in dtypes)


def _hard_swish_input(mul: gs.Node, interface: set[int]) -> gs.Tensor | None:
    """x if `mul` = x·HardSigmoid(x; 1/6, ½) and the HardSigmoid is read only by it."""
    if not is_standard(mul) or len(mul.inputs) != 2:
        return None
    for index in (0, 1):
        gate = mul.inputs[index]
        node = gate.inputs[0] if gate.inputs else None
        if node is None or node.op != "HardSigmoid" or not is_standard(node) or single_reader(gate, interface) is not mul:
            continue
        if node.inputs[0] is mul.inputs[1 - index] and _is_hard_swish(node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)):
            return node.inputs[0]
    return None
