"""Reshape -> Transpose -> Reshape that only moves whole dims, as one Transpose."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph import interface_tensors, is_standard, only_producer, set_inputs, single_reader, walk
from onnxslim.manager import PassContext, PassResult, register_pass

from ._shapes import (
    FAILS,
    MAX_SYMBOLS,
    PartialValues,
    Size,
    dim_elements,
    product,
    reshaped,
    size_of,
    symbols_in,
    zero_cases,
)


@register_pass("fuse-reshape-transpose")
def fuse_reshape_transpose(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace Reshape -> Transpose -> Reshape that only moves runs of x's dims by one Transpose of x.

    The first Reshape merges runs of consecutive dims of x, the Transpose permutes the runs and
    the last Reshape splits them again into the same dims.
    Targets may be computed at run time (Shape/Slice/Gather/Concat of tensors, as the dynamo
    exporter writes them): each element must provably be the size it stands for, for every size
    of x, a symbolic dim of 0 included (see `_permutation`).
    """
    interface = interface_tensors(graph)
    fused = 0
    for body in walk(graph):
        partial_of = PartialValues()
        for last in list(body.nodes):
            if last.op != "Reshape" or not is_standard(last) or len(last.inputs) != 2 or not last.outputs:
                continue
            transpose = only_producer(last.inputs[0], op="Transpose")
            if transpose is None or single_reader(last.inputs[0], interface) is not last:
                continue
            first = only_producer(transpose.inputs[0], op="Reshape")
            if first is None or len(first.inputs) != 2 or single_reader(transpose.inputs[0], interface) is not transpose:
                continue
            perm = _permutation(first, transpose, last, partial_of)
            if perm is None:
                continue
            source = first.inputs[0]
            last.op = "Transpose"
            last.attrs.clear()
            last.attrs["perm"] = perm
            set_inputs(last, [source])  # the Reshapes and the first Transpose are left to dead-node elimination
            fused += 1
    return PassResult(fused=fused)


def _permutation(first: gs.Node, transpose: gs.Node, last: gs.Node, partial_of: PartialValues) -> list[int] | None:
    """The perm P with last(transpose(first(x))) == Transpose(x, P) wherever the chain runs, else None.

    With every symbolic dim positive: the first Reshape's dims are products of consecutive runs
    of x's dims, and the last one's are x's dims in the order the Transpose puts the runs in.
    Then each case of some symbolic dims being 0: the chain fails at run time (a -1 beside a 0,
    a count that does not match, a 0 copying a dim past the rank), or gives the same shape.
    """
    dims = dim_elements(first.inputs[0])
    first_target = partial_of(first.inputs[1])
    last_target = partial_of(last.inputs[1])
    if dims is None or first_target is None or last_target is None or first_target[1] or last_target[1]:
        return None
    if any(isinstance(dim, int) and dim == 0 for dim in dims):
        return None  # always empty: nothing to gain, and the sizes below assume positive static dims
    order = transpose.attrs.get("perm")
    order = list(range(len(first_target[0])))[::-1] if order is None else [int(axis) for axis in order]
    if sorted(order) != list(range(len(first_target[0]))):
        return None
    symbols = symbols_in(dims, first_target[0], last_target[0])
    if len(symbols) > MAX_SYMBOLS:
        return None
    allow = [bool(first.attrs.get("allowzero", 0)), bool(last.attrs.get("allowzero", 0))]
    perm = None
    for zeros in zero_cases(symbols):
        sizes = [size_of(dim, zeros) for dim in dims]
        merged = reshaped(sizes, first_target[0], allow[0], zeros)
        if merged is FAILS:
            if not zeros:
                return None  # the chain never runs: leave it as it is
            continue
        if merged is None:
            return None
        if perm is None:  # the first case has no zeros: it decides the runs
            runs = _runs(sizes, merged)
            if runs is None:
                return None
            perm = [axis for run in order for axis in runs[run]]
        final = reshaped([merged[axis] for axis in order], last_target[0], allow[1], zeros)
        if final is FAILS and zeros:
            continue
        if final is None or final is FAILS or final != [sizes[axis] for axis in perm]:
            return None
    return perm


def _runs(sizes: list[Size], merged: list[Size]) -> list[list[int]] | None:
    """The consecutive runs of x's dims whose products are the merged dims (each run non-empty)."""
    runs: list[list[int]] = []
    axis = 0
    for target in merged:
        run = [axis] if axis < len(sizes) else []
        while run and product(sizes[index] for index in run) != target and run[-1] + 1 < len(sizes):
            run.append(run[-1] + 1)
        if not run or product(sizes[index] for index in run) != target:
            return None
        runs.append(run)
        axis = run[-1] + 1
    if runs and all(size == Size(1) for size in sizes[axis:]):
        runs[-1].extend(range(axis, len(sizes)))  # trailing dims of size 1 join the last run
        axis = len(sizes)
    return runs if axis == len(sizes) else None
