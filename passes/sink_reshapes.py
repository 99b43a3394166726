"""A Reshape moved past the elementwise ops after it, to the Reshapes that end them."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_value, find, interface_tensors, is_empty, is_standard, known_dim, known_rank, replace_all_uses, walk
from onnxslim.manager import PassContext, PassResult, register_pass

# Ops that compute each element of their output from the elements at the same position of their
# inputs (inputs of one shape), whatever the layout: a Reshape moves no data, so they commute with it.
ELEMENTWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitwiseAnd", "BitwiseNot",
    "BitwiseOr", "BitwiseXor", "Cast", "Ceil", "Celu", "Clip", "Cos", "Cosh", "Div", "Elu", "Equal", "Erf",
    "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "IsInf",
    "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Not", "Or",
    "Pow", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign",
    "Sqrt", "Sub", "Tan", "Tanh", "ThresholdedRelu", "Where", "Xor",
})
# Regions larger than this are not followed (a whole network of elementwise ops is rare and costly).
REGION_LIMIT = 64


@register_pass("sink-reshapes")
def sink_reshapes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Move a Reshape past the elementwise ops it feeds when they all end in Reshapes, where it cancels.

    Reshape(x) → elementwise ops → Reshape(·, s) (a Linear's 2-D Gemm, then GELU on the 3-D view,
    then the 2-D view for the next Gemm) computes the same as the elementwise ops on x itself:
    a Reshape moves no data, so each element meets the same elements and constants, as long as
    each constant is one number, or one per element of a last axis both views share. The first
    Reshape goes; the last ones reshape x's layout instead (and vanish when that is their target).
    Their targets must hold no 0 (which copies a dim of the data, and the data's dims change)
    unless allowzero makes it a 0.
    """
    interface = interface_tensors(graph)
    sunk = 0
    for subgraph in walk(graph):
        members = {id(node) for node in subgraph.nodes}
        for reshape in find(subgraph, "Reshape"):
            if reshape.outputs and _sink(reshape, members, interface):
                sunk += 1
    return PassResult(sunk=sunk)


def _sink(reshape: gs.Node, members: set[int], interface: set[int]) -> bool:
    if len(reshape.inputs) != 2:
        return False
    source, viewed = reshape.inputs[0], reshape.outputs[0]
    ranks = (known_rank(source), known_rank(viewed))
    if None in ranks or id(viewed) in interface or not viewed.outputs:
        return False
    last = known_dim(source, -1)
    shared_last = last if last is not None and known_dim(viewed, -1) == last else None
    region: list[gs.Node] = []
    seen: set[int] = set()
    pending = [viewed]
    inside = {id(viewed)}
    while pending:
        tensor = pending.pop()
        for reader in tensor.outputs:
            if id(reader) in seen:
                continue
            if id(reader) not in members or not is_standard(reader):
                return False
            if reader.op == "Reshape" and reader.inputs[0] is tensor and reader.inputs[1] is not tensor:
                if not _ends_region(reader):
                    return False
                continue
            if reader.op not in ELEMENTWISE or len(reader.outputs) != 1 or len(region) >= REGION_LIMIT:
                return False
            seen.add(id(reader))
            region.append(reader)
            output = reader.outputs[0]
            if id(output) in interface:
                return False
            inside.add(id(output))
            pending.append(output)
    if not region:
        return False
    for node in region:
        for operand in node.inputs:
            if id(operand) not in inside and not is_empty(operand) and not _layout_free(operand, min(ranks), shared_last):
                return False
    replace_all_uses(viewed, source)
    for node in region:  # their shapes are the source's now; shape inference tells them again
        node.outputs[0].shape = None
    return True


def _ends_region(reshape: gs.Node) -> bool:
    """A Reshape whose target is a constant that does not read its data's dims (no 0, or allowzero)."""
    target = constant_value(reshape.inputs[1])
    return target is not None and (bool(reshape.attrs.get("allowzero", 0)) or bool(np.all(np.asarray(target) != 0)))


def _layout_free(operand: gs.Tensor, rank: int, shared_last: int | None) -> bool:
    """A constant that meets every element the same in both views: one number, or one per element
    of a last axis of `shared_last` elements both views have; with no more dims than either view."""
    value = constant_value(operand)
    if value is None or value.ndim > rank:
        return False
    if value.size == 1:
        return True
    return shared_last is not None and value.shape[-1] == shared_last and all(dim == 1 for dim in value.shape[:-1])
