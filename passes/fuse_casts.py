"""Cast chains shortened: a widening Cast followed by another Cast becomes one Cast."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxslim.graph import can_merge, disconnect, find, interface_tensors, is_standard, merge_tensors, set_input, walk
from onnxslim.manager import PassContext, PassResult, register_pass

# (signed, bits) of the integer types; (significand bits with the implicit one, exponent bits) of the floats.
INTEGERS = {
    TensorProto.UINT8: (False, 8),
    TensorProto.INT8: (True, 8),
    TensorProto.UINT16: (False, 16),
    TensorProto.INT16: (True, 16),
    TensorProto.UINT32: (False, 32),
    TensorProto.INT32: (True, 32),
    TensorProto.UINT64: (False, 64),
    TensorProto.INT64: (True, 64),
}
FLOATS = {
    TensorProto.FLOAT16: (11, 5),
    TensorProto.BFLOAT16: (8, 8),
    TensorProto.FLOAT: (24, 8),
    TensorProto.DOUBLE: (53, 11),
}


def is_lossless(source: int, target: int) -> bool:
    """Whether casting `source` to `target` keeps every value exactly (so a later cast sees the same number).

    bool goes anywhere (0 and 1); integers into a wider integer of compatible sign, or into a float
    whose significand holds all their values; floats into a float at least as precise and as wide.
    Never float to integer, never to bool, never narrowing.
    """
    if source == target:
        return True
    if source == TensorProto.BOOL:
        return target in INTEGERS or target in FLOATS
    if source in INTEGERS and target in INTEGERS:
        (source_signed, source_bits), (target_signed, target_bits) = INTEGERS[source], INTEGERS[target]
        if source_signed:
            return target_signed and source_bits <= target_bits
        return source_bits <= target_bits if not target_signed else source_bits < target_bits
    if source in INTEGERS and target in FLOATS:
        signed, bits = INTEGERS[source]
        # |v| <= 2**(bits-1) for signed types, and a power of two is exact: bits-1 significand bits suffice.
        return (bits - 1 if signed else bits) <= FLOATS[target][0]
    if source in FLOATS and target in FLOATS:
        return FLOATS[source][0] <= FLOATS[target][0] and FLOATS[source][1] <= FLOATS[target][1]
    return False


@register_pass("fuse-casts")
def fuse_casts(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Turn Cast(Cast(x, A→B), B→C) into Cast(x, A→C), or into x when C is A, if A→B loses nothing.

    CastLike counts as a Cast when its target's dtype is known. Only when every reader of the
    first cast is such a cast, so the first one goes away.
    """
    interface = interface_tensors(graph)
    fused = removed = 0
    for subgraph in walk(graph):
        for first in find(subgraph, "Cast", "CastLike"):
            if not first.outputs:
                continue
            source, between = first.inputs[0], first.outputs[0]
            readers = list(between.outputs)
            source_type, between_type = _dtype(source), _target(first)
            if (
                id(between) in interface
                or not readers
                or source_type is None
                or between_type is None
                or not is_lossless(source_type, between_type)
                or not all(_fusable(second, between, source_type, between_type) for second in readers)
            ):
                continue
            for second in readers:
                set_input(second, 0, source)
            disconnect(first)  # unread now; disconnected, it no longer counts as a reader of `source`
            for second in readers:
                output = second.outputs[0]
                if _target(second) == source_type and can_merge(source, output, interface, subgraph):
                    disconnect(second)
                    merge_tensors(source, output, interface, subgraph)
                    removed += 1
                else:
                    fused += 1
    return PassResult(fused=fused, removed=removed)


def _fusable(second: gs.Node, between: gs.Tensor, source_type: int, between_type: int) -> bool:
    """Whether `second` casts `between` (its first input only) to a type the source can go to directly."""
    if second.op not in ("Cast", "CastLike") or not is_standard(second) or second.inputs[0] is not between:
        return False
    if not second.outputs:  # a node some rewrite left without results: dead-node elimination's, not ours
        return False
    if second.op == "CastLike" and second.inputs[1] is between:
        return False
    target = _target(second)
    if target is None or not (target == TensorProto.BOOL or target in INTEGERS or target in FLOATS):
        return False
    # An integer that went through a float reaches an integer type by float-to-integer conversion,
    # whose out-of-range results differ from the integer wrap-around of a direct cast: only if in range.
    if source_type in INTEGERS and between_type in FLOATS and target in INTEGERS:
        return is_lossless(source_type, target)
    return True


def _target(node: gs.Node) -> int | None:
    """The ONNX type a Cast or CastLike produces, if known."""
    if node.op == "Cast":
        target = node.attrs.get("to")
        return int(target) if target is not None else None
    return _dtype(node.inputs[1]) if len(node.inputs) > 1 else None


def _dtype(tensor: gs.Tensor) -> int | None:
    if tensor.dtype is None:
        return None
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)))
    except (KeyError, TypeError, ValueError):
        return None
