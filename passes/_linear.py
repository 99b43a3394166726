"""Linear layers with constant weights, and the per-channel scales and shifts they can absorb.

Shared by fuse-conv-bn, fuse-conv-affine and fold-scale-into-weights. A Conv, ConvTranspose, Gemm
or MatMul (with its bias Add) whose weights are constants is linear in its input x:

    layer(x)·s + t = layer'(x)     s, t per output channel: weights scaled, bias shifted
    layer(x·c)     = layer''(x)    c per input channel: weights scaled (zero padding stays zero)
    layer(x + t)   = layer'''(x)   t per input channel, only without padding: a constant bias term

Everything is computed in float64 and stored in the weight's dtype. Which axes of a weight hold
the channels, and where the bias sits, is onnxslim.layers' knowledge; this module rewrites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_value, is_empty, is_standard, known_dim, known_rank
from onnxslim.layers import BIAS_INPUT, LAYER_OPS, bias_add, channels, weight_axes

LINEAR_OPS = LAYER_OPS


@dataclass
class Linear:
    """A linear layer: `node`, and for a MatMul the Add after it that holds its bias (if any).

    The weight's dtype and shape are read without loading it; `weight` loads it when a fold needs it.
    """

    node: gs.Node
    dtype: np.dtype  # the weight's
    shape: tuple[int, ...]  # the weight's
    bias: np.ndarray | None  # as the layer adds it: Conv's B, Gemm's beta·C, the MatMul's bias constant
    in_channels: int
    out_channels: int
    output_rank: int | None  # None: a MatMul whose input rank is unknown
    bias_node: gs.Node | None = None  # MatMul only: Add(matmul, bias)

    @property
    def weight(self) -> np.ndarray:
        return constant_value(self.node.inputs[1])

    @property
    def output(self) -> gs.Tensor:
        return (self.bias_node or self.node).outputs[0]

    @property
    def output_channel_axis(self) -> int:
        """The channel axis of the output, counted from the end (0 = last)."""
        return self.output_rank - 2 if self.node.op in ("Conv", "ConvTranspose") else 0

    @property
    def input_rank(self) -> int | None:
        if self.node.op in ("Conv", "ConvTranspose"):
            return len(self.shape)
        if self.node.op == "Gemm":
            return 2
        return known_rank(self.node.inputs[0])

    @property
    def input_channel_axis(self) -> int:
        """The axis of the input that holds its channels (Gemm: K), counted from the end."""
        if self.node.op in ("Conv", "ConvTranspose"):
            return len(self.shape) - 2
        if self.node.op == "Gemm":
            return 1 if self.node.attrs.get("transA", 0) else 0
        return 0


def linear_layer(node: gs.Node, interface: set[int]) -> Linear | None:
    """`node` as a Linear if it is a standard Conv/ConvTranspose/Gemm/MatMul with constant float weights."""
    if node.op not in LINEAR_OPS or not is_standard(node) or len(node.inputs) < 2 or not node.outputs:
        return None
    metadata = _constant_metadata(node.inputs[1])
    if metadata is None or metadata[0].kind != "f" or 0 in metadata[1]:
        return None
    dtype, shape = metadata
    bias = None
    if len(node.inputs) > BIAS_INPUT and not is_empty(node.inputs[BIAS_INPUT]):
        bias = constant_value(node.inputs[BIAS_INPUT])
        if bias is None or bias.dtype != dtype:
            return None
    if node.op in ("Conv", "ConvTranspose"):
        if len(shape) < 3 or shape[0] % int(node.attrs.get("group", 1)):
            return None
        return Linear(node, dtype, shape, bias, *channels(node, shape), len(shape))
    if len(shape) != 2:
        return None
    if node.op == "Gemm":
        if bias is not None:
            bias = bias.astype(np.float64) * node.attrs.get("beta", 1.0)
        return Linear(node, dtype, shape, bias, *channels(node, shape), 2)
    # MatMul: an output rank is known only from the input's; a bias lives in the Add that reads it.
    # With a rank-2 B, MatMul's output has the rank of its input A.
    layer = Linear(node, dtype, shape, None, *channels(node, shape), known_rank(node.inputs[0]))
    found = bias_add(node) if id(node.outputs[0]) not in interface else None
    if found is not None:
        reader, index = found
        other = reader.inputs[index]
        value = constant_value(other)
        if value is not None and other is not node.outputs[0] and output_vector(layer, value) is not None:
            layer.bias_node, layer.bias = reader, value
    return layer


def _constant_metadata(tensor: gs.Tensor) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a constant without loading an initializer's values (None if not constant)."""
    if isinstance(tensor, gs.Constant):
        try:
            return np.dtype(tensor.dtype), tuple(int(dim) for dim in tensor.shape)
        except TypeError:
            return None  # a type numpy does not have (bfloat16, float8)
    value = constant_value(tensor)
    return (value.dtype, value.shape) if value is not None else None


def layer_producing(tensor: gs.Tensor, interface: set[int]) -> Linear | None:
    """The linear layer whose output is `tensor` (for a MatMul with a bias Add: the Add's output)."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or not is_standard(node):
        return None
    candidates = [node]
    if node.op == "Add":  # a MatMul's bias
        candidates = [operand.inputs[0] for operand in node.inputs if operand.inputs and operand.inputs[0].op == "MatMul"]
    for candidate in candidates:
        layer = linear_layer(candidate, interface)
        if layer is not None and layer.output is tensor:
            return layer
    return None


def channel_vector(value: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """`value` as one float64 number per channel, if it broadcasts against a rank-`rank` tensor
    with `channels` channels on `axis` (counted from the end) without changing that tensor's shape:
    every dim 1 but the channel one, which is 1 or `channels`. An unknown rank allows rank <= axis + 1."""
    if value is None or value.dtype.kind != "f":
        return None
    limit = rank if rank is not None else axis + 1
    if value.ndim > limit:
        return None
    for position, dim in enumerate(reversed(value.shape)):
        if dim != 1 and not (position == axis and dim == channels):
            return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)) if value.size <= channels else None


def output_vector(layer: Linear, value: np.ndarray | None) -> np.ndarray | None:
    """A constant as a per-output-channel vector of `layer`, or None."""
    if value is None or value.dtype != layer.dtype:
        return None
    return channel_vector(value, layer.output_rank, layer.output_channel_axis, layer.out_channels)


def input_vector(layer: Linear, value: np.ndarray | None, operand: gs.Tensor) -> np.ndarray | None:
    """A constant as a per-input-channel vector of `layer`, if `operand ∘ value` (an elementwise op
    with broadcasting) has the same shape as `operand`, so the layer may read `operand` instead."""
    if value is None or value.dtype != layer.dtype:
        return None
    rank, axis = layer.input_rank, layer.input_channel_axis
    vector = channel_vector(value, rank, axis, layer.in_channels)
    if vector is None or value.ndim == 0:
        return vector
    # The constant must not grow the operand: its rank (the layer input's), and the channel dim.
    operand_rank = known_rank(operand)
    if not ((operand_rank is not None and value.ndim <= operand_rank) or (rank is not None and value.ndim < rank)):
        return None
    channel_dim = value.shape[-1 - axis] if axis < value.ndim else 1
    if channel_dim != 1 and known_dim(operand, -1 - axis) != layer.in_channels:
        return None
    return vector


# ----------------------------------------------------------------------------- new weights


def scaled_output_weight(layer: Linear, scale: np.ndarray) -> np.ndarray:
    """W' with layer'(x) = layer(x)·scale, scale one number per output channel."""
    weight = layer.weight.astype(np.float64)
    if layer.node.op == "ConvTranspose":
        # W is [Cin, Cout/group, k...]: input channel ci of group g feeds outputs g·Cout/group + j.
        group = int(layer.node.attrs.get("group", 1))
        per_input = np.repeat(scale.reshape(group, weight.shape[1]), weight.shape[0] // group, axis=0)
        return weight * per_input.reshape(per_input.shape + (1,) * (weight.ndim - 2))
    return weight * _along(scale, weight_axes(layer.node, weight.ndim).output, weight.ndim)


def scaled_input_weight(layer: Linear, scale: np.ndarray) -> np.ndarray:
    """W' with layer'(x) = layer(x·scale), scale one number per input channel."""
    weight = layer.weight.astype(np.float64)
    if layer.node.op == "Conv":  # a grouped Conv's input axis counts one group's channels
        return weight * _per_input_of_conv(layer, scale).reshape(weight.shape[:2] + (1,) * (weight.ndim - 2))
    return weight * _along(scale, weight_axes(layer.node, weight.ndim).input, weight.ndim)


def _along(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """`vector` shaped to broadcast along `axis` of a rank-`rank` weight."""
    return vector.reshape(tuple(-1 if position == axis else 1 for position in range(rank)))


def input_shift_bias(layer: Linear, shift: np.ndarray) -> np.ndarray:
    """The per-output-channel constant layer(x + shift) − layer(x), for a layer without padding."""
    weight = layer.weight.astype(np.float64)
    op = layer.node.op
    if op == "Conv":
        per_input = _per_input_of_conv(layer, shift).reshape(weight.shape[:2] + (1,) * (weight.ndim - 2))
        return (weight * per_input).sum(axis=tuple(range(1, weight.ndim)))
    if op == "Gemm":
        alpha = layer.node.attrs.get("alpha", 1.0)
        return alpha * (weight @ shift if layer.node.attrs.get("transB", 0) else shift @ weight)
    return shift @ weight  # MatMul


def _per_input_of_conv(layer: Linear, vector: np.ndarray) -> np.ndarray:
    """[Cout, Cin/group]: the entry of `vector` (one per input channel) that W[o, j] multiplies."""
    group = int(layer.node.attrs.get("group", 1))
    out_channels, group_inputs = layer.shape[:2]
    first_input = (np.arange(out_channels) // (out_channels // group)) * group_inputs
    return vector[first_input[:, None] + np.arange(group_inputs)[None, :]]


def has_padding(node: gs.Node) -> bool:
    """Whether a Conv pads its input (then a shift of the input is not a constant of the output)."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    return auto_pad == "NOTSET" and any(int(pad) != 0 for pad in node.attrs.get("pads", []))


def changes_shared(layer: Linear, weight: np.ndarray | None, bias: np.ndarray | None) -> bool:
    """Whether the new `weight` would replace a tensor other nodes read too: the model would then
    hold both the old and the new weights, and grow. A shared `bias` may change: one number per
    channel is about what the folded node and its constant weighed (exporters share equal zero
    biases), so it is not asked about."""
    if weight is None:
        return False
    return any(reader is not layer.node for reader in layer.node.inputs[1].outputs)


def set_weights(layer: Linear, weight: np.ndarray | None, bias: np.ndarray | None, names) -> None:
    """Give the layer a new weight and/or bias, as new constants (stored in the weight's dtype).

    `bias` is what the layer adds: Conv's B, Gemm's C (whose beta becomes 1), or the constant
    operand of a MatMul's bias Add.
    """
    node, dtype = layer.node, layer.dtype
    if weight is not None:
        node.inputs[1] = gs.Constant(names(fused_name(node.inputs[1].name)), weight.astype(dtype))
    if bias is None:
        return
    if layer.bias_node is not None:
        index = next(index for index, tensor in enumerate(layer.bias_node.inputs) if tensor is not node.outputs[0])
        old = layer.bias_node.inputs[index]
        layer.bias_node.inputs[index] = gs.Constant(names(fused_name(old.name)), bias.astype(dtype))
        return
    if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
        name = fused_name(node.inputs[2].name)
    else:
        name = f"{node.name or node.outputs[0].name}_bias"
    constant = gs.Constant(names(name), np.asarray(bias).astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = constant
    else:
        node.inputs.append(constant)
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0


def fused_name(name: str) -> str:
    """name_fused, without piling up suffixes when a tensor is fused again (names() adds _1, _2...)."""
    return re.sub(r"_fused(_\d+)?$", "", name) + "_fused"


def output_affine(layer: Linear, scale: np.ndarray | None, shift: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """New (weight, bias) with layer'(x) = layer(x)·scale + shift, or None if not representable/finite."""
    weight = scaled_output_weight(layer, scale) if scale is not None else None
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    if layer.node.op == "MatMul" and layer.bias_node is None and shift is not None:
        return None  # no bias to hold the shift (fuse-conv-affine turns a rank-2 MatMul into a Gemm first)
    if bias is not None and scale is not None:
        bias = bias * _along_output(layer, scale, bias)
    if shift is not None:
        bias = (bias if bias is not None else 0.0) + _along_output(layer, shift, bias)
    if bias is not None and layer.bias_node is None and layer.node.op != "Gemm":
        bias = np.broadcast_to(bias, (layer.out_channels,))
    if (weight is not None and not np.all(np.isfinite(weight))) or (bias is not None and not np.all(np.isfinite(bias))):
        return None
    return weight, _unless_unchanged(layer, bias)


def _unless_unchanged(layer: Linear, bias: np.ndarray | None) -> np.ndarray | None:
    """None for a bias the layer already holds (a zero bias scaled), so it need not be replaced."""
    if bias is None or layer.bias is None or np.shape(bias) != np.shape(layer.bias):
        return bias
    return None if np.array_equal(np.asarray(bias).astype(layer.dtype), layer.bias.astype(layer.dtype)) else bias


def input_affine(layer: Linear, scale: np.ndarray | None, shift: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """New (weight, bias) with layer'(x) = layer(x·scale + shift), or None if not exact or not finite.

    A shift needs a layer without padding (the padded border would stay 0, not shift) that has
    somewhere to put a bias: not a ConvTranspose (its output overlaps), not a MatMul without bias Add.
    """
    weight = scaled_input_weight(layer, scale) if scale is not None else None
    bias = None  # unchanged unless there is a shift
    if shift is not None:
        op = layer.node.op
        if op == "ConvTranspose" or (op == "Conv" and has_padding(layer.node)) or (op == "MatMul" and layer.bias_node is None):
            return None
        added = input_shift_bias(layer, shift)  # with the weight before scaling: layer(x·a + t) = W(x·a) + W(t)
        bias = added if layer.bias is None else layer.bias.astype(np.float64) + _along_output(layer, added, layer.bias)
    if (weight is not None and not np.all(np.isfinite(weight))) or (bias is not None and not np.all(np.isfinite(bias))):
        return None
    return weight, bias


def _along_output(layer: Linear, vector: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """`vector` shaped to broadcast against the bias tensor the layer holds (its channels last)."""
    return vector if bias is None or bias.ndim <= 1 else vector.reshape((1,) * (bias.ndim - 1) + (-1,))


# ----------------------------------------------------------------------------- BatchNormalization


def batch_norm_parameters(bn: gs.Node, opset: int, interface: set[int]) -> list[np.ndarray] | None:
    """[γ, β, μ, var] of a BatchNormalization in inference mode whose statistics are constant vectors.

    None in training mode (it normalizes with the batch's statistics), with spatial=0 (opset < 9:
    statistics per activation), or when an output other than the first is read.
    """
    if not is_standard(bn) or len(bn.inputs) != 5 or not bn.outputs:
        return None
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
        return None
    if opset < 7 and not bn.attrs.get("is_test", 0):
        return None  # before opset 7 BatchNormalization trains unless is_test is set
    if any(not is_empty(output) and (output.outputs or id(output) in interface) for output in bn.outputs[1:]):
        return None
    values = [constant_value(tensor) for tensor in bn.inputs[1:]]
    if any(value is None or value.dtype.kind != "f" or value.ndim != 1 for value in values):
        return None
    if len({value.shape for value in values}) != 1:
        return None
    return values


def batch_norm_affine(parameters: list[np.ndarray], epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = x·s + t per channel: s = γ/√(var + ε), t = β − μ·s, in float64."""
    gamma, beta, mean, var = (value.astype(np.float64) for value in parameters)
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale


def as_affine(op: str, index: int, vector: np.ndarray) -> tuple[int, np.ndarray | None, np.ndarray | None] | None:
    """(index, scale, shift) with op(v, c) = v·scale + shift per channel, v being input `index` of
    the Add/Sub/Mul/Div and `vector` the other, constant, operand; None for c / v."""
    if op == "Add":
        return index, None, vector
    if op == "Sub":
        return (index, None, -vector) if index == 0 else (index, np.full_like(vector, -1.0), vector)
    if op == "Mul":
        return index, vector, None
    # v / c = v · (1/c): not bit-exact, but within one rounding of float32.
    if index == 1 or not np.all(vector != 0):
        return None
    return index, 1.0 / vector, None
