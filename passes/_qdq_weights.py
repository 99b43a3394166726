"""quantize-int8's weights: int8 values and their scales, the forms a graph reads them in
(DequantizeLinear, or Cast * scale folded back to float at load), bias correction, int8 lookup
tables and float16 biases. The formulas and names are described in passes/quantize_qdq.py.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import constant_value, is_empty, is_standard, set_input
from onnxslim.layers import bias_slot, output_axis

WEIGHT_LIMIT = 127  # symmetric int8 weights use [-127, 127], so -W quantizes to -W_q
# 7-bit weights for x86 CPUs without VNNI: their u8 x s8 kernel (vpmaddubsw) adds two products
# in 16 bits, which saturates for 255 * 127 * 2 but not for 255 * 63 * 2.
REDUCED_WEIGHT_LIMIT = 63
HALF_NORMAL_MIN = 2.0**-14
# Clipping ratios tried per output channel for the weight scale (see symmetric_int8).
CLIP_RATIOS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.87, 0.84, 0.8)
# A scale below float32's smallest normal number is no scale: the runtime flushes it to zero
# (x / 0) and the requantization of a fused kernel, s_in·s_w / s_out, underflows. Values that
# small all quantize to the zero point anyway, so such a range gets the scale 1.
SCALE_FLOOR = float(np.finfo(np.float32).tiny)
# Gather tables from this many elements up are stored as int8 rows (token embeddings).
TABLE_ELEMENTS = 4096


def float_weight(node: gs.Node) -> np.ndarray | None:
    """The layer's constant float32 weight (input 1), or None (absent, computed, already quantized)."""
    if len(node.inputs) < 2 or is_empty(node.inputs[1]) or not isinstance(node.inputs[1], gs.Constant):
        return None
    value = constant_value(node.inputs[1])
    if value is None or value.dtype != np.float32 or value.size == 0:
        return None
    if (node.op in ("Gemm", "MatMul") and value.ndim < 2) or (node.op.startswith("Conv") and value.ndim < 3):
        return None
    if not np.isfinite(value).all():  # no int8 scale holds a NaN or an infinity: the layer stays float
        return None
    return value


class WeightRewriter:
    """Writes int8 weights into one graph for one run of quantize-int8. Its rewrites share the
    graph's name allocator `names`, `compact` (float16 scales and biases), the weight `cache`
    (see weight_int8) and the input `means` of bias correction (see _correct_bias);
    `corrected_biases` counts the biases corrected so far."""

    def __init__(self, graph: gs.Graph, names, *, compact: bool, cache: dict | None, means: Mapping[str, np.ndarray]):
        self.graph, self.names = graph, names
        self.compact, self.cache, self.means = compact, cache, means
        self.corrected_biases = 0

    def quantize_layers(self, layers: list[gs.Node], *, per_channel: bool, form: str, limit: int) -> int:
        """Replace each layer's constant weight by its int8 `form` ("dequantize" or "cast-mul");
        returns how many weights. A layer with an input mean has its bias corrected."""
        names = self.names
        replaced: dict[tuple[int, int | None], gs.Variable] = {}  # (weight tensor id, axis) -> float weight
        rounded: dict[tuple[int, int | None], tuple[np.ndarray, np.ndarray]] = {}
        layer_ids = {id(node) for node in layers}
        for node in layers:
            value = float_weight(node)
            if value is None:
                continue
            weight = node.inputs[1]
            axis = output_axis(node, value.ndim) if per_channel else None
            key = (id(weight), axis)
            if key not in replaced:
                quantized, scale = weight_int8(self.cache, weight.name, value, axis, limit, self.compact)
                index = len(replaced)
                values = _int8_values(weight, quantized, all(id(reader) in layer_ids for reader in weight.outputs), names)
                new_nodes: list[gs.Node] = []
                if form == "dequantize":
                    # Compact: a float16 scale behind a Cast (onnxruntime folds it before fusing QDQ
                    # groups) and, for a Conv, no zero point (it defaults to 0; QGemm wants one).
                    factor = _stored_scale(new_nodes, scale, f"s{index}", names)
                    omit_zero_point = self.compact and node.op == "Conv"
                    zero_point = [] if omit_zero_point else [gs.Constant(names(f"z{index}"), np.zeros_like(scale, dtype=np.int8))]
                    output = gs.Variable(names(f"w{index}"), dtype=np.float32, shape=list(value.shape))
                    new_nodes.append(
                        gs.Node(
                            "DequantizeLinear",
                            attrs={"axis": axis} if axis is not None else {},
                            inputs=[values, factor, *zero_point],
                            outputs=[output],
                        )
                    )
                else:
                    output = _cast_times_scale(new_nodes, values, along(scale, axis, value.ndim),
                                               (f"c{index}", f"s{index}", f"w{index}"), names)
                self.graph.nodes[0:0] = new_nodes  # constant expressions: first, so order stays topological
                replaced[key] = output
                rounded[key] = (quantized, scale)
            set_input(node, 1, replaced[key])
            if node.name in self.means and _correct_bias(node, value, *rounded[key], axis, self.means[node.name], names):
                self.corrected_biases += 1
        return len(replaced)

    def quantize_tables(self, excluded: Collection[str]) -> int:
        """Lookup tables (Gather from a large float32 constant, e.g. token embeddings) become int8 rows
        with one scale per row, always in the Cast * scale form: a table is not part of any integer
        kernel, and onnxruntime folds the expression back to float at load."""
        graph, names = self.graph, self.names
        replaced: dict[int, gs.Variable] = {}
        for node in graph.nodes:
            if node.op != "Gather" or not is_standard(node) or node.name in excluded or "Gather" in excluded:
                continue
            table = node.inputs[0]
            value = constant_value(table) if isinstance(table, gs.Constant) else None
            if value is None or value.dtype != np.float32 or value.ndim < 2 or value.size < TABLE_ELEMENTS:
                continue
            if not np.isfinite(value).all():
                continue
            if int(node.attrs.get("axis", 0)) != 0:
                continue
            if id(table) not in replaced:
                index = len(replaced)
                quantized, scale = weight_int8(self.cache, table.name, value, 0, WEIGHT_LIMIT, self.compact)
                values = _int8_values(table, quantized, all(reader.op == "Gather" for reader in table.outputs), names)
                new_nodes: list[gs.Node] = []
                output = _cast_times_scale(new_nodes, values, along(scale, 0, value.ndim),
                                           (f"tc{index}", f"ts{index}", f"t{index}"), names)
                graph.nodes[0:0] = new_nodes
                replaced[id(table)] = output
            set_input(node, 0, replaced[id(table)])
        return len(replaced)

    def compact_biases(self, layers: list[gs.Node]) -> int:
        """Store the float32 biases of the quantized layers as float16 (see half_fits): a Conv's or
        Gemm's bias input, and the constant of an Add that alone reads a MatMul's output (a Linear
        layer's bias, which beside int8 weights weighs a visible share of a small model's head)."""
        new_nodes: list[gs.Node] = []
        compacted: dict[int, gs.Variable] = {}
        for node, slot in _bias_slots(layers):
            tensor = node.inputs[slot]
            bias = constant_value(tensor)
            if bias is None or bias.dtype != np.float32 or not half_fits(bias):
                continue
            if id(tensor) not in compacted:
                compacted[id(tensor)] = _half_constant(new_nodes, bias, f"b{len(compacted)}", self.names)
            set_input(node, slot, compacted[id(tensor)])
        self.graph.nodes[0:0] = new_nodes
        return len(compacted)


def along(scale: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    """Per-channel `scale` shaped to broadcast along `axis` of a rank-`rank` tensor (as is when
    axis is None: one scale per tensor)."""
    return scale if axis is None else np.expand_dims(scale, tuple(dim for dim in range(rank) if dim != axis))


def weight_int8(
    cache: dict | None, name: str, value: np.ndarray, axis: int | None, limit: int, compact: bool
) -> tuple[np.ndarray, np.ndarray]:
    """symmetric_int8 with a float16 scale when `compact` and float16 holds it, remembered in
    `cache` (by weight name, shape and settings) when one is given: the quantizer builds the
    same model's weights many times (fidelity target, bias correction, the report)."""
    key = (name, value.shape, axis, limit, compact)
    if cache is not None and key in cache:
        return cache[key]
    quantized, scale = symmetric_int8(value, axis, limit, np.float16 if compact else np.float32)
    if compact and not half_scales_fit(scale):
        quantized, scale = symmetric_int8(value, axis, limit)
    if cache is not None:
        cache[key] = (quantized, scale)
    return quantized, scale


def symmetric_int8(
    value: np.ndarray, axis: int | None, limit: int = WEIGHT_LIMIT, scale_type: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """(W_q int8 in [-limit, limit], scale of `scale_type`): one scale per slice along `axis`, or
    a scalar scale when axis is None.

    Each slice's scale is the one of CLIP_RATIOS x max |W| that gives the smallest squared
    rounding error: clipping a few outliers often buys a finer step for all other weights.
    Rounding divides by the scale as stored (float16 scales too), so dequantizing reproduces
    what was rounded.
    """
    weight = value.astype(np.float64)
    rows = weight.reshape(1, -1) if axis is None else np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    peak = np.abs(rows).max(axis=1)
    best_scale, best_error = None, None
    # A float16 scale stays normal: in a layer whose largest step is at least 2^-8, a channel
    # whose weights are all below 2^-14 * limit (a channel BatchNormalization switched off) gets
    # the step 2^-14; its weights then err by at most 2^-15, 64 times below the layer's largest
    # step. A layer of tiny weights throughout keeps float32 scales (see half_fits' callers).
    floor = SCALE_FLOOR  # a denormal float32 scale is flushed to zero by the runtime
    if scale_type == np.float16 and peak.max(initial=0.0) / limit >= 2.0**-8:
        floor = HALF_NORMAL_MIN
    for ratio in CLIP_RATIOS:
        raw = np.where(peak > 0, np.maximum(peak * ratio / limit, floor), 1.0)  # an all-zero row: any scale is exact
        scale = _stored(raw, scale_type)
        error = ((np.clip(np.rint(rows / scale[:, None]), -limit, limit) * scale[:, None] - rows) ** 2).sum(axis=1)
        if best_scale is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error
            best_scale, best_error = np.where(better, scale, best_scale), np.minimum(error, best_error)
    stored = best_scale if axis is not None else best_scale.reshape(())
    broadcast = along(stored, axis, weight.ndim)
    quantized = np.clip(np.rint(weight / broadcast), -limit, limit).astype(np.int8)
    return quantized, stored.astype(scale_type)


def _stored(scale: np.ndarray, scale_type: type) -> np.ndarray:
    """`scale` as it will be stored (rounded to `scale_type`), in float64 for the arithmetic."""
    return scale.astype(scale_type).astype(np.float64)


def _int8_values(tensor: gs.Constant, quantized: np.ndarray, exclusive: bool, names) -> gs.Constant:
    """The int8 values of a float constant. When only quantized nodes read the float constant
    (`exclusive`) they take its name, and the float constant, renamed, goes as dead."""
    values = gs.Constant(tensor.name if exclusive and tensor.name else names(f"{tensor.name}_q"), quantized)
    if exclusive:
        tensor.name = names(f"{tensor.name}_float")
    return values


def _stored_scale(new_nodes: list, scale: np.ndarray, name: str, names) -> gs.Tensor:
    """A scale as a float32 constant, or a float16 one behind a Cast (see _half_constant)."""
    if scale.dtype == np.float16:
        return _half_constant(new_nodes, scale, name, names)
    return gs.Constant(names(name), scale)


def _cast_times_scale(new_nodes: list, values: gs.Constant, scale: np.ndarray, tensor_names: tuple, names) -> gs.Variable:
    """Cast(values) * scale, the float view onnxruntime folds at load; `tensor_names` names the
    cast, the scale and the product."""
    cast_name, scale_name, output_name = tensor_names
    shape = list(values.shape)
    widened = gs.Variable(names(cast_name), dtype=np.float32, shape=shape)
    new_nodes.append(gs.Node("Cast", attrs={"to": 1}, inputs=[values], outputs=[widened]))  # 1 = FLOAT
    factor = _stored_scale(new_nodes, scale, scale_name, names)
    output = gs.Variable(names(output_name), dtype=np.float32, shape=shape)
    new_nodes.append(gs.Node("Mul", inputs=[widened, factor], outputs=[output]))
    return output


def _correct_bias(
    node: gs.Node, value: np.ndarray, quantized: np.ndarray, scale: np.ndarray, axis: int | None, mean: np.ndarray, names
) -> bool:
    """Fold the expected output shift of the layer's weight rounding into its bias (Conv, Gemm):
    b' = b - (W_q - W) . E[x], with E[x] the per-channel input mean (padding ignored)."""
    if node.op not in ("Conv", "Gemm") or (node.op == "Gemm" and node.attrs.get("transA", 0)):
        return False
    broadcast = along(scale.astype(np.float64), axis, value.ndim)
    error = quantized * broadcast - value.astype(np.float64)
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        out_channels, per_group_in = value.shape[0], value.shape[1]
        if mean.shape != (per_group_in * group,):
            return False
        summed = error.reshape(out_channels, per_group_in, -1).sum(axis=2)  # [Cout, Cin/g]
        group_of = np.arange(out_channels) // (out_channels // group)
        shift = (summed * mean.reshape(group, per_group_in)[group_of]).sum(axis=1)
    else:
        weight_error = error.T if node.attrs.get("transB", 0) else error  # [K, N]
        if mean.shape != (weight_error.shape[0],):
            return False
        shift = (mean @ weight_error) * float(node.attrs.get("alpha", 1.0))
    if not np.isfinite(shift).all():  # an input mean too large for its products: no correction
        return False
    bias_slot = 2
    if len(node.inputs) > bias_slot and not is_empty(node.inputs[bias_slot]):
        bias = constant_value(node.inputs[bias_slot])
        if bias is None or bias.dtype != np.float32 or bias.shape != shift.shape:
            return False
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if beta == 0:  # the bias is not read
            return False
        new_bias = bias.astype(np.float64) - shift / beta
    else:
        new_bias = -shift
    with np.errstate(over="ignore"):
        new_bias = new_bias.astype(np.float32)
    if not np.isfinite(new_bias).all():  # beyond float32: the bias stays as it was
        return False
    if node.op == "Gemm" and not (len(node.inputs) > bias_slot and not is_empty(node.inputs[bias_slot])):
        node.attrs["beta"] = 1.0
    constant = gs.Constant(names(f"{node.inputs[1].name}_b"), new_bias)
    if len(node.inputs) > bias_slot:
        set_input(node, bias_slot, constant)
    else:
        node.inputs.append(constant)
    return True


def half_fits(value: np.ndarray) -> bool:
    """Whether float16 holds `value` (a scale or a bias) well enough: finite and below 60000, so
    each value is kept to about 5e-4 relative, or to 3e-8 absolute where float16 turns subnormal
    (below 2^-14: the bias of a channel whose BatchNormalization all but switched it off)."""
    return bool(np.all(np.isfinite(value)) and np.abs(value).max(initial=0.0) < 60000)


def half_scales_fit(scale: np.ndarray) -> bool:
    """Whether float16 holds these scales to about 5e-4 relative: normal numbers only."""
    positive = np.abs(scale[scale != 0])
    return half_fits(scale) and bool(positive.size == 0 or positive.min() >= HALF_NORMAL_MIN)


def _half_constant(graph_nodes: list, value: np.ndarray, name: str, names) -> gs.Variable:
    """`value` stored as float16 under `name`h, read through a Cast to float32 named `name`."""
    output = gs.Variable(names(name), dtype=np.float32, shape=list(value.shape))
    graph_nodes.append(
        gs.Node("Cast", attrs={"to": 1}, inputs=[gs.Constant(names(f"{name}h"), value.astype(np.float16))], outputs=[output])
    )
    return output


def _bias_slots(layers: list[gs.Node]) -> list[tuple[gs.Node, int]]:
    """The layers' biases that are initializers (a MatMul's: a vector)."""
    slots = []
    for node in layers:
        slot = bias_slot(node)
        if slot is None or not isinstance(slot[0].inputs[slot[1]], gs.Constant):
            continue
        shape = slot[0].inputs[slot[1]].shape
        if node.op != "MatMul" or (shape and len(shape) == 1):
            slots.append(slot)
    return slots

