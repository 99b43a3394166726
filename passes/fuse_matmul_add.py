"""A MatMul of two matrices followed by an Add that Gemm's C can hold, replaced by one Gemm."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import bypass, find, interface_tensors, is_standard, known_rank, set_inputs, single_reader, trusted_symbol, walk
from onnxslim.manager import PassContext, PassResult, register_pass

# Gemm broadcasts C unidirectionally from opset 7 (before, only with its `broadcast` attribute).
GEMM_BROADCAST_OPSET = 7
# The types Gemm takes in every opset from 7 (integers came with 9, bfloat16 with 13, and
# onnxruntime has kernels for none of them).
GEMM_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


@register_pass("fuse-matmul-add")
def fuse_matmul_add(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace Add(MatMul(A, B), C) by Gemm(A, B, C) when A and B are matrices and C broadcasts to A·B.

    Gemm adds C after broadcasting it to [M, N] one way only, so C's dims (at most two) must each
    be 1 or the result's own, known statically or by the same symbolic name: then the Add changes
    only values, never the shape, and the two compute the same for every input. Weights and C need
    not be constants (constant weights with a per-column bias are fuse-conv-affine's, which folds
    more into them); the MatMul's result must have no other reader.
    """
    if (graph.opset or GEMM_BROADCAST_OPSET) < GEMM_BROADCAST_OPSET:
        return PassResult(fused=0)
    interface = interface_tensors(graph)
    fused = 0
    for subgraph in walk(graph):
        for matmul in find(subgraph, "MatMul"):
            if matmul.outputs and _fuse(matmul, subgraph, interface):
                fused += 1
    return PassResult(fused=fused)


def _fuse(matmul: gs.Node, graph: gs.Graph, interface: set[int]) -> bool:
    if len(matmul.inputs) != 2 or len(matmul.outputs) != 1:
        return False
    a, b = matmul.inputs
    product = matmul.outputs[0]
    if known_rank(a) != 2 or known_rank(b) != 2 or _dtype(a) not in GEMM_DTYPES or _dtype(b) != _dtype(a):
        return False
    add = single_reader(product, interface)
    if add is None or add.op != "Add" or not is_standard(add) or len(add.inputs) != 2 or len(add.outputs) != 1:
        return False
    keep = 0 if add.inputs[0] is product else 1
    c = add.inputs[1 - keep]
    if c is product or _dtype(c) != _dtype(a) or not _broadcasts_to(c, (a.shape[0], b.shape[1])):
        return False
    if not bypass(add, interface, graph, keep=keep):
        return False
    matmul.op = "Gemm"
    matmul.attrs.clear()
    set_inputs(matmul, [a, b, c])
    _after_producer(matmul, c, graph)
    return True


def _after_producer(node: gs.Node, tensor: gs.Tensor, graph: gs.Graph) -> None:
    """Move `node` just past the node computing `tensor` when that one comes later in `graph`:
    the Gemm stands where the MatMul stood, and C may be computed between the MatMul and the Add
    (nodes stay in topological order; the Add's readers all come after C's producer)."""
    if not tensor.inputs:
        return
    nodes = graph.nodes
    indices = {id(item): index for index, item in enumerate(nodes)}  # by identity: gs.Node's == compares contents
    position, producer = indices[id(node)], indices.get(id(tensor.inputs[0]), -1)  # -1: an outer scope's
    if producer > position:
        nodes.insert(producer, nodes.pop(position))


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None  # a type numpy lacks (bfloat16, float8)


def _broadcasts_to(c: gs.Tensor, result: tuple) -> bool:
    """Whether C of known shape broadcasts to a [M, N] `result` without making it larger."""
    shape = c.shape
    if shape is None or len(shape) > 2:
        return False
    for dim, target in zip(reversed(list(shape)), reversed(result)):
        if isinstance(dim, (int, np.integer)) and dim == 1:
            continue
        if not _same_dim(dim, target):
            return False
    return True


def _same_dim(dim, target) -> bool:
    if isinstance(dim, (int, np.integer)) and isinstance(target, (int, np.integer)):
        return dim >= 0 and int(dim) == int(target)
    symbol = trusted_symbol(dim)
    return symbol is not None and symbol == trusted_symbol(target)
