"""INT8 post-training quantization in QDQ form: QuantizeLinear/DequantizeLinear pairs around the
float graph, which onnxruntime (and TensorRT, OpenVINO) fuse into integer kernels.

Weights of Conv, ConvTranspose, Gemm and MatMul become int8 initializers read through a
DequantizeLinear: symmetric (zero point 0, range [-127, 127]), one scale per output channel

    scale_c = max |W_c| / 127        W_q = clip(round(W / scale_c), -127, 127)

Per-channel needs DequantizeLinear's `axis` (opset 13); before that one scale per tensor is used.
Biases stay float: onnxruntime's QDQ fusions accept a float bias, and that is always exact.

Activations read by those layers get one QuantizeLinear -> DequantizeLinear pair per tensor,
shared by every quantized reader, from the calibrated range in `ctx.calibration`
(tensor name -> (low, high)). The range is widened to hold 0 (zero padding must be exact):

    uint8/int8 asymmetric: scale = (high - low) / 255, zero point = qmin - round(low / scale)
    symmetric:             scale = max(|low|, |high|) / 127, zero point 0 (int8) or 128 (uint8)

`weight_only` quantizes only the weights: a file about 4x smaller that still computes in float.

Limits, for now: only the main graph (If/Loop/Scan bodies are left float), only float32
tensors, custom domains are left alone, and a tensor without a calibrated range stays float.
A weight that other (unquantized) nodes read too stays in the model beside its int8 copy.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.errors import UsageError
from onnxslim.graph import constant_value, find, insert_before, is_empty, producer, unique_names
from onnxslim.manager import PassContext, PassResult, register_pass

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPSET = 10  # QuantizeLinear / DequantizeLinear
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis`
WEIGHT_LIMIT = 127  # symmetric int8 weights use [-127, 127], so -W quantizes to -W_q
ACTIVATION_TYPES = {"uint8": (np.uint8, 0, 255), "int8": (np.int8, -128, 127)}


@register_pass("quantize-int8", lossless=False)
def quantize_int8(
    graph: gs.Graph,
    ctx: PassContext,
    *,
    per_channel: bool = True,
    activation_type: str = "uint8",
    symmetric_activations: bool = False,
    weight_only: bool = False,
    exclude: str = "",
) -> PassResult:
    """Quantize Conv/Gemm/MatMul weights to int8 and their inputs to 8 bits (QDQ), from calibrated ranges."""
    if activation_type not in ACTIVATION_TYPES:
        raise UsageError(f"quantize-int8: activation_type must be uint8 or int8, not '{activation_type}'")
    ranges = ctx.calibration
    if not weight_only and ranges is None:
        raise UsageError(
            "quantize-int8 needs activation ranges from calibration data (give calibration samples), "
            "or weight_only=True to quantize only the weights"
        )
    if not weight_only and not isinstance(ranges, dict):
        raise UsageError(f"quantize-int8: calibration must map tensor names to (low, high), not {type(ranges).__name__}")
    opset = graph.opset or 0
    if opset < QDQ_OPSET:
        raise UsageError(f"quantize-int8 needs opset {QDQ_OPSET} or later (QuantizeLinear); the model has opset {opset}")
    if per_channel and opset < PER_CHANNEL_OPSET:
        ctx.logger.info("quantize-int8: opset %d < %d, weights get one scale per tensor", opset, PER_CHANNEL_OPSET)
        per_channel = False

    layers = quantizable_layers(graph, exclude)
    names = unique_names(graph)
    weights = _quantize_weights(graph, layers, per_channel, names)
    activations = unranged = 0
    if not weight_only:
        activations, unranged = _quantize_activations(graph, layers, ranges, activation_type, symmetric_activations, names)
    return PassResult(changed=bool(weights or activations), weights=weights, activations=activations, unranged=unranged)


def quantizable_layers(graph: gs.Graph, exclude: str = "") -> list[gs.Node]:
    """The main graph's standard Conv/ConvTranspose/Gemm/MatMul nodes not excluded by name or op type."""
    excluded = {item.strip() for item in exclude.split(",") if item.strip()}
    return [node for node in find(graph, *QUANTIZED_OPS) if node.name not in excluded and node.op not in excluded]


def activation_tensors(graph: gs.Graph, exclude: str = "") -> list[str]:
    """Names of the tensors quantize-int8 wants a calibrated range for, in graph order."""
    return list(dict.fromkeys(tensor.name for node in quantizable_layers(graph, exclude) for _, tensor in _activation_inputs(node)))


# ----------------------------------------------------------------------------- weights


def _weight_axis(node: gs.Node, rank: int) -> int:
    """The output-channel axis of a layer's weight."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1  # [Cin, Cout/group, k...]
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return rank - 1  # MatMul: [..., K, N]


def _float_weight(node: gs.Node) -> np.ndarray | None:
    """The layer's constant float32 weight (input 1), or None (absent, computed, already dequantized)."""
    if len(node.inputs) < 2 or is_empty(node.inputs[1]):
        return None
    value = constant_value(node.inputs[1])
    if value is None or value.dtype != np.float32 or value.size == 0:
        return None
    if (node.op in ("Gemm", "MatMul") and value.ndim < 2) or (node.op.startswith("Conv") and value.ndim < 3):
        return None
    return value


def _quantize_weights(graph: gs.Graph, layers: list[gs.Node], per_channel: bool, names) -> int:
    """Give each layer's constant weight an int8 copy behind a DequantizeLinear; returns how many weights."""
    dequantized: dict[tuple[int, int | None], gs.Variable] = {}  # (weight tensor id, axis) -> DQ output
    for node in layers:
        value = _float_weight(node)
        if value is None:
            continue
        weight = node.inputs[1]
        axis = _weight_axis(node, value.ndim) if per_channel else None
        key = (id(weight), axis)
        if key not in dequantized:
            quantized, scale = _symmetric_int8(value, axis)
            base = weight.name or f"{node.name}_weight"
            zero_point = np.zeros_like(scale, dtype=np.int8)
            output = gs.Variable(names(f"{base}_dequantized"), dtype=np.float32, shape=list(value.shape))
            dequantize = gs.Node(
                "DequantizeLinear",
                name=names(f"{base}_DequantizeLinear"),
                attrs={"axis": axis} if axis is not None else {},
                inputs=[
                    gs.Constant(names(f"{base}_quantized"), quantized),
                    gs.Constant(names(f"{base}_scale"), scale),
                    gs.Constant(names(f"{base}_zero_point"), zero_point),
                ],
                outputs=[output],
            )
            insert_before(graph, node, dequantize)
            dequantized[key] = output
        node.inputs[1] = dequantized[key]
    return len(dequantized)


def _symmetric_int8(value: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(W_q int8, scale float32): one scale per slice along `axis`, or a scalar scale when axis is None."""
    weight = value.astype(np.float64)
    if axis is None:
        scale = np.array(np.abs(weight).max() / WEIGHT_LIMIT)
        broadcast = scale
    else:
        reduced = tuple(dim for dim in range(weight.ndim) if dim != axis)
        scale = np.abs(weight).max(axis=reduced) / WEIGHT_LIMIT
        broadcast = np.expand_dims(scale, reduced)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero channel: any scale is exact
    broadcast = np.where(broadcast > 0, broadcast, 1.0)
    # Divide by the float32 scale that is stored, so dequantizing reproduces what was rounded.
    quantized = np.clip(np.rint(weight / broadcast.astype(np.float32)), -WEIGHT_LIMIT, WEIGHT_LIMIT).astype(np.int8)
    return quantized, scale


# ----------------------------------------------------------------------------- activations


def _activation_inputs(node: gs.Node) -> list[tuple[int, gs.Tensor]]:
    """(slot, tensor) of a layer's float32 activation inputs that are not already dequantized.

    A layer's data input has its weight's type, so an untyped input next to a float32 weight is float32.
    """
    slots = [0, 1] if node.op == "MatMul" else [0]
    weight_is_float = len(node.inputs) > 1 and (_float_weight(node) is not None or _is_dequantized(node.inputs[1]))
    found = []
    for slot in slots:
        if slot >= len(node.inputs):
            continue
        tensor = node.inputs[slot]
        if isinstance(tensor, gs.Constant) or constant_value(tensor) is not None or _is_dequantized(tensor):
            continue
        dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else None
        if dtype == np.float32 or (dtype is None and weight_is_float):
            found.append((slot, tensor))
    return found


def _is_dequantized(tensor: gs.Tensor) -> bool:
    node = producer(tensor)
    return node is not None and node.op == "DequantizeLinear"


def _quantize_activations(
    graph: gs.Graph, layers: list[gs.Node], ranges: dict, activation_type: str, symmetric: bool, names
) -> tuple[int, int]:
    """One QuantizeLinear -> DequantizeLinear pair per calibrated activation, read by every quantized
    layer that read the activation; returns (tensors quantized, tensors left float for want of a range)."""
    dequantized: dict[int, gs.Variable] = {}
    unranged: set[int] = set()
    for node in layers:
        for slot, tensor in _activation_inputs(node):
            if id(tensor) not in dequantized:
                limits = ranges.get(tensor.name)
                if limits is None or not all(np.isfinite(limits)):
                    unranged.add(id(tensor))
                    continue
                scale, zero_point = _activation_parameters(limits, activation_type, symmetric)
                base = tensor.name
                quantized = gs.Variable(names(f"{base}_quantized"), dtype=zero_point.dtype.type, shape=tensor.shape)
                output = gs.Variable(names(f"{base}_dequantized"), dtype=np.float32, shape=tensor.shape)
                scale_constant = gs.Constant(names(f"{base}_scale"), scale)
                zero_point_constant = gs.Constant(names(f"{base}_zero_point"), zero_point)
                quantize = gs.Node(
                    "QuantizeLinear",
                    name=names(f"{base}_QuantizeLinear"),
                    inputs=[tensor, scale_constant, zero_point_constant],
                    outputs=[quantized],
                )
                dequantize = gs.Node(
                    "DequantizeLinear",
                    name=names(f"{base}_DequantizeLinear"),
                    inputs=[quantized, scale_constant, zero_point_constant],
                    outputs=[output],
                )
                # Before the first quantized reader: the tensor is defined by then, so order stays topological.
                insert_before(graph, node, quantize, dequantize)
                dequantized[id(tensor)] = output
            if id(tensor) in dequantized:
                node.inputs[slot] = dequantized[id(tensor)]
    return len(dequantized), len(unranged)


def _activation_parameters(limits, activation_type: str, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32 scalar, zero point scalar of the activation type) for a calibrated (low, high)."""
    dtype, qmin, qmax = ACTIVATION_TYPES[activation_type]
    low, high = min(float(limits[0]), 0.0), max(float(limits[1]), 0.0)
    if symmetric:
        bound = max(-low, high)
        scale = bound / 127 if bound > 0 else 1.0
        zero_point = 0 if activation_type == "int8" else 128
    else:
        scale = (high - low) / (qmax - qmin) if high > low else 1.0
        zero_point = int(np.clip(qmin - round(low / np.float32(scale)), qmin, qmax))
    return np.array(scale, dtype=np.float32), np.array(zero_point, dtype=dtype)
