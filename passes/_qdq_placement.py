"""quantize-int8's activations: which tensors get a QuantizeLinear -> DequantizeLinear pair so
that onnxruntime's QDQ fusions fire (`plan`; the rules are in passes/quantize_qdq.py's docstring),
their 8-bit parameters from calibrated ranges, and the pairs themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_value, is_empty, is_standard, producer, replace_all_uses, set_output

from ._qdq_weights import SCALE_FLOOR, float_weight

# Ops onnxruntime runs on 8-bit data with their own scales (QLinearAdd, QLinearConcat, ...).
INT8_OPS = frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax"})
# Ops that only move or select values: onnxruntime drops their Q/DQ when input and output share
# a scale and zero point, so their output takes the input's parameters.
DATA_MOVEMENT_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize", "Slice", "Gather", "Split"}
)
# Activations that a following QuantizeLinear makes redundant when its range starts at their floor.
ABSORBED_ACTIVATIONS = frozenset({"Relu", "Clip"})
ACTIVATION_TYPES = {"uint8": (np.uint8, 0, 255), "int8": (np.int8, -128, 127)}
# A range's bounds are capped at half of float32's largest number: dequantizing the range's
# ends (q - z)·s, rounding z included, must stay a float32 number, not become an infinity.
RANGE_LIMIT = float(np.finfo(np.float32).max) / 2


@dataclass
class Placement:
    """Which activation tensors get a Q/DQ pair: `calibrated` need a range of their own (in graph
    order); `shared` maps a data-movement op's output to the tensor whose parameters it reuses."""

    calibrated: list[gs.Tensor] = field(default_factory=list)
    shared: dict[int, gs.Tensor] = field(default_factory=dict)  # id(output) -> source tensor
    outputs: dict[int, gs.Tensor] = field(default_factory=dict)  # id -> tensor, shared ones
    groups: dict[int, list[gs.Tensor]] = field(default_factory=dict)  # id(layer) -> tensors it needs quantized

    def tensor_names(self) -> list[str]:
        return [tensor.name for tensor in self.calibrated]

    def ranged(self, ranges: dict) -> set[int]:
        """Ids of the placed tensors that will be quantized with these ranges."""
        found = {id(tensor) for tensor in self.calibrated if usable_range(ranges.get(tensor.name))}
        for key, source in self.shared.items():  # graph order: a chain's source comes first
            if id(source) in found:
                found.add(key)
        return found


def plan(graph: gs.Graph, layers: list[gs.Node]) -> Placement:
    """The activation tensors to quantize so that onnxruntime's QDQ fusions fire (quantize_qdq's docstring).

    An int8 chain only continues where an 8-bit value serves something downstream (see
    _served_tensors): a Sigmoid whose output only feeds the final float Concat stays float.
    """
    interface = {id(tensor) for tensor in graph.outputs}
    served = _served_tensors(graph, layers)
    chosen: dict[int, gs.Tensor] = {}
    placement = Placement()
    layer_ids = {id(node) for node in layers}

    def choose(tensor: gs.Tensor, output_allowed: bool = False) -> None:
        if id(tensor) in chosen or not _is_float_activation(tensor) or (id(tensor) in interface and not output_allowed):
            return
        chosen[id(tensor)] = tensor
        placement.calibrated.append(tensor)

    def output_side(node: gs.Node) -> list[gs.Tensor]:
        sides = []
        for output in node.outputs:
            reader = _absorbing_reader(output, interface)
            sides.append(reader.outputs[0] if reader is not None else output)
        return sides

    for node in graph.nodes:
        if id(node) in layer_ids:
            inputs = _activation_inputs(node)
            outputs = output_side(node)
            for tensor in inputs:
                choose(tensor)
            for tensor in outputs:  # even if nothing else wants it, and even a graph output: fusion does
                choose(tensor, output_allowed=producer(tensor) is node)
            placement.groups[id(node)] = inputs + outputs
            continue
        if not is_standard(node):
            continue
        inputs = [tensor for tensor in node.inputs if not is_empty(tensor)]
        if node.op in DATA_MOVEMENT_OPS and inputs and id(inputs[0]) in chosen:
            for output in node.outputs:
                if _is_float_activation(output) and id(output) in served and id(output) not in interface and id(output) not in chosen:
                    chosen[id(output)] = output
                    placement.shared[id(output)] = inputs[0]
            continue
        outputs = [tensor for tensor in output_side(node) if id(tensor) in served]
        if node.op in INT8_OPS and outputs and any(id(tensor) in chosen for tensor in inputs):
            for tensor in inputs + outputs:
                choose(tensor)
    placement.outputs = {key: chosen[key] for key in placement.shared}
    return placement


def _served_tensors(graph: gs.Graph, layers: list[gs.Node]) -> set[int]:
    """Ids of the tensors whose 8-bit value something downstream uses. Walking the graph
    backwards: a quantized layer uses its inputs in 8 bits; an int8 op, a data-movement op or a
    Relu/Clip does when one of its outputs is used in 8 bits itself."""
    layer_ids = {id(node) for node in layers}
    served: set[int] = set()
    for node in reversed(graph.nodes):
        if id(node) in layer_ids:
            uses = True
        elif node.op in INT8_OPS or node.op in DATA_MOVEMENT_OPS or node.op in ABSORBED_ACTIVATIONS:
            uses = any(id(output) in served for output in node.outputs)
        else:
            uses = False
        if uses:
            served.update(id(tensor) for tensor in node.inputs)
    return served


def _is_float_activation(tensor: gs.Tensor) -> bool:
    """A float32 tensor computed at run time that is not quantized already (not the output of a
    DequantizeLinear, not read by a QuantizeLinear)."""
    if constant_value(tensor) is not None or _is_dequantized(tensor) or _is_constant_expression(tensor):
        return False
    if any(reader.op == "QuantizeLinear" for reader in tensor.outputs):
        return False
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def _absorbing_reader(tensor: gs.Tensor, interface: set[int]) -> gs.Node | None:
    """The Relu/Clip that alone reads `tensor`, whose output a QuantizeLinear can stand in for."""
    if id(tensor) in interface or len(tensor.outputs) != 1:
        return None
    reader = tensor.outputs[0]
    if reader.op not in ABSORBED_ACTIVATIONS or not is_standard(reader) or reader.inputs[0] is not tensor:
        return None
    if reader.op == "Clip" and any(constant_value(bound) is None for bound in reader.inputs[1:] if not is_empty(bound)):
        return None
    return reader


def _activation_inputs(node: gs.Node) -> list[gs.Tensor]:
    """A layer's float32 activation inputs (MatMul: both operands) that are not constants."""
    slots = [0, 1] if node.op == "MatMul" else [0]
    weight_is_float = len(node.inputs) > 1 and (float_weight(node) is not None or _is_dequantized(node.inputs[1]))
    found = []
    for slot in slots:
        if slot >= len(node.inputs) or is_empty(node.inputs[slot]):
            continue
        tensor = node.inputs[slot]
        if constant_value(tensor) is not None or _is_dequantized(tensor) or _is_constant_expression(tensor):
            continue
        if tensor.dtype is None and weight_is_float:
            tensor.dtype = np.float32  # a layer's data input has its weight's type
        if tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32:
            found.append(tensor)
    return found


def _is_constant_expression(tensor: gs.Tensor, depth: int = 3) -> bool:
    """Whether `tensor` is computed from constants only by Cast/Mul (the int8 weight forms)."""
    if isinstance(tensor, gs.Constant):
        return True
    node = producer(tensor)
    if node is None or depth == 0 or node.op not in ("Cast", "Mul"):
        return False
    return all(_is_constant_expression(source, depth - 1) for source in node.inputs if not is_empty(source))


def _is_dequantized(tensor: gs.Tensor) -> bool:
    node = producer(tensor)
    return node is not None and node.op == "DequantizeLinear"



def quantize_activations(
    graph: gs.Graph, placement: Placement, ranges: dict, activation_type: str, symmetric: bool, names
) -> tuple[int, int]:
    """A QuantizeLinear -> DequantizeLinear pair after each placed tensor's producer, read by all its
    readers; returns (tensors quantized, tensors left float for want of a range)."""
    parameters: dict[int, tuple[gs.Constant, gs.Constant]] = {}
    unranged = 0
    for index, tensor in enumerate(placement.calibrated):
        limits = ranges.get(tensor.name)
        if not usable_range(limits):
            unranged += 1
            continue
        scale, zero_point = activation_parameters(limits, activation_type, symmetric)
        parameters[id(tensor)] = (
            gs.Constant(names(f"as{index}"), scale),
            gs.Constant(names(f"az{index}"), zero_point),
        )
    for key, output in placement.outputs.items():
        source = placement.shared[key]
        if id(source) in parameters:
            parameters[key] = parameters[id(source)]
    pairs: dict[int, list[gs.Node]] = {}  # id(producer) or 0 for graph inputs -> new nodes after it
    interface = {id(tensor) for tensor in graph.outputs}
    tensors = {id(tensor): tensor for tensor in placement.calibrated} | placement.outputs
    for index, (key, (scale, zero_point)) in enumerate(parameters.items()):
        tensor = tensors[key]
        quantized = gs.Variable(names(f"aq{index}"), dtype=zero_point.values.dtype.type, shape=tensor.shape)
        dequantized = gs.Variable(names(f"a{index}"), dtype=np.float32, shape=tensor.shape)
        if id(tensor) in interface:
            # A graph output keeps its name: the layer writes a new tensor, the pair ends in the output.
            raw = gs.Variable(names(f"r{index}"), dtype=tensor.dtype, shape=tensor.shape)
            layer = producer(tensor)
            set_output(layer, next(slot for slot, output in enumerate(layer.outputs) if output is tensor), raw)
            replace_all_uses(tensor, raw)
            tensor, dequantized = raw, tensor
        else:
            replace_all_uses(tensor, dequantized)
        quantize = gs.Node(
            "QuantizeLinear", inputs=[tensor, scale, zero_point], outputs=[quantized]
        )
        dequantize = gs.Node(
            "DequantizeLinear",
            inputs=[quantized, scale, zero_point],
            outputs=[dequantized],
        )
        source = producer(tensor)
        pairs.setdefault(id(source) if source is not None else 0, []).extend([quantize, dequantize])
    ordered = list(pairs.get(0, []))
    for node in graph.nodes:
        ordered.append(node)
        ordered.extend(pairs.get(id(node), []))
    graph.nodes = ordered
    return len(parameters), unranged


def usable_range(limits) -> bool:
    """Whether `limits` is a calibrated range: finite (low, high) with low <= high."""
    return limits is not None and len(limits) == 2 and all(np.isfinite(limits)) and limits[0] <= limits[1]


def activation_parameters(limits, activation_type: str, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32 scalar, zero point scalar of the activation type) for a calibrated (low, high):
    always a normal, finite scale and a zero point in the type's range, whatever the range."""
    dtype, qmin, qmax = ACTIVATION_TYPES[activation_type]
    low = min(max(float(limits[0]), -RANGE_LIMIT), 0.0)
    high = max(min(float(limits[1]), RANGE_LIMIT), 0.0)
    if symmetric:
        scale = max(-low, high) / 127
        zero_point = 0 if activation_type == "int8" else 128
    else:
        scale = (high - low) / (qmax - qmin)
    if not np.float32(scale) >= SCALE_FLOOR:  # a zero-width range, or one of denormal numbers
        scale = 1.0
    if not symmetric:
        zero_point = int(np.clip(qmin - round(low / float(np.float32(scale))), qmin, qmax))
    return np.array(scale, dtype=np.float32), np.array(zero_point, dtype=dtype)
