"""A Gemm between a Reshape that flattens x's leading dims and one that restores them, as MatMul (+ Add)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    constant_value,
    disconnect,
    interface_tensors,
    is_empty,
    is_standard,
    only_producer,
    set_inputs,
    single_reader,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

from ._shapes import FAILS, MAX_SYMBOLS, PartialValues, Size, dim_elements, product, reshaped, same_size, size_of, symbols_in, zero_cases

FLOATS = (np.float16, np.float32, np.float64)


@register_pass("fuse-reshaped-gemm")
def fuse_reshaped_gemm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace Reshape(Gemm(Reshape(x, [-1, K]), W, C), x's leading dims + [N]) by MatMul(x, W) + C.

    A Linear layer on a 3-D (or higher) input as both torch exporters write it. Only where the
    last target provably gives back x's leading dims (computed targets included, a symbolic dim
    of 0 included), with alpha = beta = 1, no transA, a constant weight when transB (it is stored
    transposed, so only when nothing else reads it) and a bias that broadcasts along the rows.
    """
    interface = interface_tensors(graph)
    names = None
    fused = 0
    for body in walk(graph):
        partial_of = PartialValues()
        for gemm in list(body.nodes):
            if gemm.op != "Gemm" or not is_standard(gemm) or len(gemm.outputs) != 1:
                continue
            match = _match(gemm, interface, partial_of)
            if match is None:
                continue
            first, last, weight = match
            if int(gemm.attrs.get("transB", 0)):
                if names is None:
                    names = unique_names(graph)
                values = np.ascontiguousarray(constant_value(weight).T)
                weight = gs.Constant(names(f"{weight.name}_transposed"), values)
            source = first.inputs[0]
            bias = gemm.inputs[2] if len(gemm.inputs) > 2 and not is_empty(gemm.inputs[2]) else None
            if bias is None:
                last.op = "MatMul"
                last.attrs.clear()
                set_inputs(last, [source, weight])
                disconnect(gemm)
            else:
                # The Gemm computes the product at x's rank now; its old 2-D annotation is stale.
                gemm.op = "MatMul"
                gemm.attrs.clear()
                set_inputs(gemm, [source, weight])
                gemm.outputs[0].shape = None
                last.op = "Add"
                last.attrs.clear()
                set_inputs(last, [gemm.outputs[0], bias])
            fused += 1
    return PassResult(fused=fused)


def _match(gemm: gs.Node, interface: set[int], partial_of: PartialValues):
    """(first Reshape, last Reshape, weight) when the rewrite is exact, else None."""
    attrs = gemm.attrs
    if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
        return None
    weight = gemm.inputs[1]
    if weight.dtype is None or np.dtype(weight.dtype) not in [np.dtype(dtype) for dtype in FLOATS]:
        return None
    if weight.shape is None or len(weight.shape) != 2 or not all(isinstance(dim, (int, np.integer)) and dim > 0 for dim in weight.shape):
        return None
    trans_b = int(attrs.get("transB", 0))
    if trans_b and (constant_value(weight) is None or len(weight.outputs) != 1):
        return None  # a transposed copy of a shared weight would add its bytes to the file
    depth, width = (int(weight.shape[1]), int(weight.shape[0])) if trans_b else (int(weight.shape[0]), int(weight.shape[1]))
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 and not is_empty(gemm.inputs[2]) else None
    if bias is not None and not _broadcasts_along_rows(bias, width):
        return None
    first = only_producer(gemm.inputs[0], op="Reshape")
    output = gemm.outputs[0]
    last = single_reader(output, interface)
    if first is None or len(first.inputs) != 2 or single_reader(gemm.inputs[0], interface) is not gemm:
        return None
    if last is None or last.op != "Reshape" or not is_standard(last) or len(last.inputs) != 2 or last.inputs[0] is not output:
        return None
    dims = dim_elements(first.inputs[0])
    if dims is None or len(dims) < 3 or any(isinstance(dim, int) and dim == 0 for dim in dims):
        return None  # a 2-D x is Gemm's own case
    if _restores_leading_dims(dims, first, last, depth, width, partial_of):
        return first, last, weight
    return None


def _broadcasts_along_rows(bias: gs.Tensor, width: int) -> bool:
    """Whether C has a shape that Gemm and Add both broadcast to [rows, N] the same way."""
    if bias.shape is None or bias.dtype is None:
        return False
    shape = list(bias.shape)
    if not all(isinstance(dim, (int, np.integer)) for dim in shape):
        return False
    return shape in ([], [1], [width], [1, 1], [1, width])


def _restores_leading_dims(dims, first: gs.Node, last: gs.Node, depth: int, width: int, partial_of) -> bool:
    """Whether the Reshapes around the Gemm give MatMul(x, W)'s shape wherever the chain runs.

    With every symbolic dim positive: the first Reshape gives [prod(x's leading dims), K] and the
    last one gives x's leading dims + [N]. With some symbolic dims 0: the chain fails at run time,
    or gives that same shape and x's last dim is K (so the MatMul runs too).
    """
    first_target, last_target = partial_of(first.inputs[1]), partial_of(last.inputs[1])
    if first_target is None or last_target is None or first_target[1] or last_target[1] or len(first_target[0]) != 2:
        return False
    symbols = symbols_in(dims, first_target[0], last_target[0])
    if len(symbols) > MAX_SYMBOLS:
        return False
    allow = [bool(first.attrs.get("allowzero", 0)), bool(last.attrs.get("allowzero", 0))]
    for zeros in zero_cases(symbols):
        sizes = [size_of(dim, zeros) for dim in dims]
        rows = reshaped(sizes, first_target[0], allow[0], zeros)
        if rows is FAILS and zeros:
            continue
        if rows is None or rows is FAILS:
            return False
        if not zeros and rows != [product(sizes[:-1]), sizes[-1]]:
            return False
        fits = same_size(rows[1], Size(depth))
        if fits is None or (fits is False and not zeros):
            return False
        if fits is False:
            continue  # the Gemm fails
        result = reshaped([rows[0], Size(width)], last_target[0], allow[1], zeros)
        if result is FAILS and zeros:
            continue
        if result is None or result is FAILS or result != sizes[:-1] + [Size(width)]:
            return False
        if same_size(sizes[-1], Size(depth)) is not True:
            return False  # the MatMul would fail where the chain runs
    return True
