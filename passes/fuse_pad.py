"""A zero Pad of the spatial axes folded into the padding of the Conv or AveragePool that reads it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import bypass, constant_value, find, interface_tensors, is_empty, is_standard, known_rank, single_reader, walk
from onnxslim.manager import PassContext, PassResult, register_pass

PADS_AS_INPUT_OPSET = 11  # Pad-11 takes pads and the constant value as inputs; before, as attributes


@register_pass("fuse-pad")
def fuse_pad(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Fold a constant-mode, zero-valued Pad of the spatial axes into the pads of the Conv or AveragePool it feeds.

    An AveragePool takes it only with count_include_pad=1 (its own pads then count as zeros, like the
    Pad's); a MaxPool never does (its pads are -inf, not 0).
    """
    interface = interface_tensors(graph)
    fused = 0
    for subgraph in walk(graph):
        for pad in find(subgraph, "Pad"):
            if not pad.outputs:
                continue
            reader = single_reader(pad.outputs[0], interface)
            if reader is None or not is_standard(reader) or reader.inputs[0] is not pad.outputs[0]:
                continue
            rank = _input_rank(reader)
            amounts = _zero_pads(pad, graph.opset, rank) if rank is not None else None
            if amounts is None:
                continue
            begins, ends = amounts[:rank], amounts[rank:]
            if any(begins[:2]) or any(ends[:2]) or any(amount < 0 for amount in amounts):
                continue  # batch or channel padding, or cropping
            pads = _merged_pads(reader, begins[2:] + ends[2:])
            if pads is None or not bypass(pad, interface, subgraph):
                continue
            reader.attrs["pads"] = pads
            reader.attrs.pop("auto_pad", None)  # NOTSET (the default), or VALID whose pads were zeros
            fused += 1
    return PassResult(fused=fused)


def _input_rank(reader: gs.Node) -> int | None:
    if reader.op == "Conv" and len(reader.inputs) > 1:
        return known_rank(reader.inputs[1])
    if reader.op == "AveragePool" and "kernel_shape" in reader.attrs:
        return len(reader.attrs["kernel_shape"]) + 2
    return None


def _zero_pads(pad: gs.Node, opset: int, rank: int) -> list[int] | None:
    """The pads of every axis, [begin_0, ..., begin_r-1, end_0, ..., end_r-1], if `pad` pads with zeros."""
    mode = pad.attrs.get("mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if opset < PADS_AS_INPUT_OPSET:
        pads = pad.attrs.get("pads", pad.attrs.get("paddings"))  # `paddings` in Pad-1
        value, axes = pad.attrs.get("value", 0.0), None
    else:
        pads = constant_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
        value = 0.0
        if len(pad.inputs) > 2 and not is_empty(pad.inputs[2]):
            value = constant_value(pad.inputs[2])
        axes = None
        if len(pad.inputs) > 3 and not is_empty(pad.inputs[3]):  # Pad-18
            axes = constant_value(pad.inputs[3])
            if axes is None:
                return None
            axes = [int(axis) + rank if axis < 0 else int(axis) for axis in np.asarray(axes).reshape(-1)]
    if pads is None or value is None or np.any(np.asarray(value) != 0):
        return None
    pads = [int(amount) for amount in np.asarray(pads).reshape(-1)]
    axes = axes if axes is not None else list(range(rank))
    if len(pads) != 2 * len(axes) or len(set(axes)) != len(axes) or any(not 0 <= axis < rank for axis in axes):
        return None
    full = [0] * (2 * rank)
    for index, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[index], pads[len(axes) + index]
    return full


def _merged_pads(reader: gs.Node, spatial: list[int]) -> list[int] | None:
    """The reader's pads plus `spatial` ([begins..., ends...]), or None if it cannot take them."""
    auto_pad = reader.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None  # SAME_* pads depend on the input size, which the Pad changes
    own = list(reader.attrs.get("pads", [0] * len(spatial))) if auto_pad == "NOTSET" else [0] * len(spatial)
    if len(own) != len(spatial):
        return None
    merged = [int(a) + int(b) for a, b in zip(own, spatial)]
    if reader.op == "AveragePool":
        if reader.attrs.get("count_include_pad", 0) != 1 or reader.attrs.get("ceil_mode", 0) != 0:
            return None  # pads not counted would drop the Pad's zeros from the mean; ceil_mode treats pads apart
        kernel = list(reader.attrs["kernel_shape"])
        # onnxruntime refuses pooling pads as large as the kernel.
        if any(amount >= kernel[index % len(kernel)] for index, amount in enumerate(merged)):
            return None
    return merged
