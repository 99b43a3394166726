"""INT8 post-training quantization: int8 weights, and in `full` mode QuantizeLinear/DequantizeLinear
pairs on the activations, placed so onnxruntime (and TensorRT, OpenVINO) fuse them into integer
kernels.

Weights of Conv, ConvTranspose, Gemm and MatMul become int8, symmetric (zero point 0, range
[-127, 127]), one scale per output channel:

    scale_c = max |W_c| / 127        W_q = clip(round(W / scale_c), -127, 127)

Biases stay float: onnxruntime's QDQ Conv/Gemm fusions quantize a float bias themselves.
Lookup tables (Gather from a large float constant, e.g. token embeddings) become int8 rows with
one scale per row, in both modes and always as Cast * scale (folded back to float at load).

With `compact` (the default) scales and the quantized layers' biases are stored as float16
behind a Cast (when float16 holds them: `half_fits`) and weight zero points are left out (they
default to 0). onnxruntime folds those Casts when it loads the model, before it fuses QDQ
groups; their rounding (about 5e-4 relative) is far below the int8 weights' own, and in a small
model they would otherwise weigh a visible share of the file.

Two modes:

- `weights`: only the weights are int8; activations and arithmetic stay float. The file is about
  4x smaller. With `weight_form=cast-mul` (the default here) each weight is `Cast(W_q) * scale`,
  a constant expression onnxruntime folds back to float32 when the session loads, so inference
  runs exactly as fast as the float model. `weight_form=dequantize` writes a DequantizeLinear
  instead (the QDQ form other runtimes read), which onnxruntime runs on every inference.
- `full`: weights behind DequantizeLinear (per channel needs opset 13 for its `axis`; below that
  one scale per tensor), and activation tensors through QuantizeLinear -> DequantizeLinear, from
  the calibrated ranges (`ctx.calibration`: tensor name -> (low, high)). Placement follows
  onnxruntime's QDQ fusion rules (see `plan`):
  * every float input and the output of each quantized layer, so DQ -> Conv -> Q becomes
    QLinearConv (and MatMul, Gemm likewise);
  * a Relu or Clip that alone reads a quantized output is left inside the group and the Q goes
    after it: with the Q's zero point at the bottom of its range onnxruntime drops the Relu/Clip;
  * int8 chains continue through Add, Mul, Concat, pooling, Sigmoid, LeakyRelu, Softmax and the
    data-movement ops (Reshape, Transpose, Squeeze, Unsqueeze, Flatten, MaxPool, Resize, Slice,
    Gather, Split) when one of their inputs is quantized and their output's 8-bit value serves
    something downstream (a layer, or another such op). Data-movement ops get no new range:
    their output shares the input's scale and zero point, which lets onnxruntime run them on
    the 8-bit data directly;
  * graph outputs stay float, except a layer's own output (a classifier's Gemm): it gets a pair
    too, so the layer becomes an integer kernel (QGemm), and the output keeps its name. A layer
    that cannot become an integer kernel (a tensor it needs has no range) gets the Cast * scale
    weight of weights mode instead of a DequantizeLinear that would run on every inference.
  Activation parameters, with the range widened to hold 0 (zero padding must be exact):

      uint8/int8 asymmetric: scale = (high - low) / 255, zero point = qmin - round(low / scale)
      symmetric:             scale = max(|low|, |high|) / 127, zero point 0 (int8) or 128 (uint8)

Names are short: in a small model long ones would weigh more than its int8 weights. A weight's
int8 values keep the weight's name (when no other node reads the float weight); its scale is
s<i>, zero point z<i>, float view w<i> (c<i> the cast), float16 values end in h, biases b<i>;
activation i gets scale as<i>, zero point az<i>, 8-bit values aq<i> and float view a<i> (the
QuantizeLinear reads the original tensor, so its name stays in the graph); new nodes are unnamed.

Limits: only the main graph (If/Loop/Scan bodies are left float), only float32 tensors, custom
domains are left alone, and a tensor without a calibrated range stays float. A weight that
other, unquantized nodes read too stays in the model beside its int8 copy.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.errors import UsageError
from onnxslim.graph import (
    constant_value,
    is_empty,
    is_standard,
    producer,
    replace_all_uses,
    set_input,
    set_output,
    unique_names,
)
from onnxslim.layers import LAYER_OPS, bias_slot
from onnxslim.layers import output_axis as weight_axis  # quantize imports it from here
from onnxslim.manager import PassContext, PassResult, register_pass

# Ops onnxruntime runs on 8-bit data with their own scales (QLinearAdd, QLinearConcat, ...).
INT8_OPS = frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax"})
# Ops that only move or select values: onnxruntime drops their Q/DQ when input and output share
# a scale and zero point, so their output takes the input's parameters.
DATA_MOVEMENT_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize", "Slice", "Gather", "Split"}
)
# Activations that a following QuantizeLinear makes redundant when its range starts at their floor.
ABSORBED_ACTIVATIONS = frozenset({"Relu", "Clip"})
QDQ_OPSET = 10  # QuantizeLinear / DequantizeLinear
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis`
WEIGHT_LIMIT = 127  # symmetric int8 weights use [-127, 127], so -W quantizes to -W_q
# 7-bit weights for x86 CPUs without VNNI: their u8 x s8 kernel (vpmaddubsw) adds two products
# in 16 bits, which saturates for 255 * 127 * 2 but not for 255 * 63 * 2.
REDUCED_WEIGHT_LIMIT = 63
HALF_NORMAL_MIN = 2.0**-14
# Clipping ratios tried per output channel for the weight scale (see symmetric_int8).
CLIP_RATIOS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.87, 0.84, 0.8)
ACTIVATION_TYPES = {"uint8": (np.uint8, 0, 255), "int8": (np.int8, -128, 127)}
# A range's bounds are capped at half of float32's largest number: dequantizing the range's
# ends (q - z)·s, rounding z included, must stay a float32 number, not become an infinity.
RANGE_LIMIT = float(np.finfo(np.float32).max) / 2
# A scale below float32's smallest normal number is no scale: the runtime flushes it to zero
# (x / 0) and the requantization of a fused kernel, s_in·s_w / s_out, underflows. Values that
# small all quantize to the zero point anyway, so such a range gets the scale 1.
SCALE_FLOOR = float(np.finfo(np.float32).tiny)
MODES = ("full", "weights")
# Gather tables from this many elements up are stored as int8 rows (token embeddings).
TABLE_ELEMENTS = 4096
WEIGHT_FORMS = ("cast-mul", "dequantize")


@dataclass(frozen=True)
class Int8Settings:
    """What quantize-int8 does, with the types a caller means: the pass's options (name lists as
    sets, not comma-separated text) and what a pipeline text cannot carry (ranges, the weight
    cache, input means). onnxslim.quantize builds one per model it tries."""

    mode: str = "full"  # or "weights"
    per_channel: bool = True
    activation_type: str = "uint8"  # or "int8"
    symmetric_activations: bool = False
    weight_form: str = ""  # "cast-mul" or "dequantize"; "" the mode's own
    exclude: frozenset[str] = frozenset()  # layer names or op types left float
    include: frozenset[str] = frozenset()  # when given, only the layers it names
    float_compute: frozenset[str] = frozenset()  # full mode: layers computing in float from int8 weights
    reduce_range: bool = False  # 7-bit weights (see REDUCED_WEIGHT_LIMIT)
    compact: bool = True
    ranges: Mapping[str, tuple] | None = None  # calibrated activation ranges, tensor name -> (low, high)
    # Quantized weights are remembered here across runs over the same weights (see weight_int8).
    weight_cache: dict | None = None
    # Layer name -> per-channel mean of its input over calibration data, for bias correction (see _correct_bias).
    input_means: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def weight_limit(self) -> int:
        return REDUCED_WEIGHT_LIMIT if self.reduce_range else WEIGHT_LIMIT


@register_pass("quantize-int8", lossless=False)
def quantize_int8(
    graph: gs.Graph,
    ctx: PassContext,
    *,
    mode: str = "full",
    per_channel: bool = True,
    activation_type: str = "uint8",
    symmetric_activations: bool = False,
    weight_form: str = "",
    exclude: str = "",
    include: str = "",
    reduce_range: bool = False,
    compact: bool = True,
    float_compute: str = "",
) -> PassResult:
    """Quantize Conv/Gemm/MatMul weights to int8 and, in full mode, activations to 8 bits (QDQ) from calibrated ranges."""
    settings = Int8Settings(
        mode=mode, per_channel=per_channel, activation_type=activation_type, symmetric_activations=symmetric_activations,
        weight_form=weight_form, exclude=name_set(exclude), include=name_set(include), float_compute=name_set(float_compute),
        reduce_range=reduce_range, compact=compact, ranges=ctx.calibration,
    )
    return quantize_graph(graph, settings, ctx.logger)


def quantize_graph(graph: gs.Graph, settings: Int8Settings, logger: logging.Logger) -> PassResult:
    """The quantize-int8 pass on `graph`, in place, as `settings` say."""
    mode, ranges = settings.mode, settings.ranges
    if mode not in MODES:
        raise UsageError(f"quantize-int8: mode must be {' or '.join(MODES)}, not '{mode}'")
    if settings.activation_type not in ACTIVATION_TYPES:
        raise UsageError(f"quantize-int8: activation_type must be uint8 or int8, not '{settings.activation_type}'")
    weight_form = settings.weight_form or ("cast-mul" if mode == "weights" else "dequantize")
    if weight_form not in WEIGHT_FORMS:
        raise UsageError(f"quantize-int8: weight_form must be {' or '.join(WEIGHT_FORMS)}, not '{weight_form}'")
    if mode == "full" and weight_form != "dequantize":
        raise UsageError("quantize-int8: full mode needs weight_form=dequantize (the QDQ form the runtimes fuse)")
    if mode == "full" and not isinstance(ranges, dict):
        raise UsageError(
            "quantize-int8 in full mode needs activation ranges from calibration data "
            "(a dict of tensor name -> (low, high)), or mode=weights to quantize only the weights"
        )
    opset = graph.opset or 0
    if weight_form == "dequantize" and opset < QDQ_OPSET:
        raise UsageError(f"quantize-int8 needs opset {QDQ_OPSET} or later (DequantizeLinear); the model has opset {opset}")
    per_channel = settings.per_channel
    if weight_form == "dequantize" and per_channel and opset < PER_CHANNEL_OPSET:
        logger.info("quantize-int8: opset %d < %d, weights get one scale per tensor", opset, PER_CHANNEL_OPSET)
        per_channel = False

    layers = quantizable_layers(graph, settings.exclude, settings.include)
    names = unique_names(graph)
    compact, cache, means = settings.compact, settings.weight_cache, settings.input_means
    corrected = [0]
    activations = unranged = 0
    if mode == "full":
        # A layer whose activations cannot all be quantized (a graph output, no range) is not fused
        # into an integer kernel; its weight takes the form folded to float at load instead of a
        # DequantizeLinear that would run on every inference.
        placement = plan(graph, [node for node in layers if node.name not in settings.float_compute])
        ranged = placement.ranged(ranges)
        fused = [
            node for node in layers
            if id(node) in placement.groups and all(id(tensor) in ranged for tensor in placement.groups[id(node)])
        ]
        fused_ids = {id(node) for node in fused}
        weights = _quantize_weights(graph, fused, per_channel, "dequantize", names, settings.weight_limit, compact, cache,
                                    means, corrected)
        weights += _quantize_weights(graph, [node for node in layers if id(node) not in fused_ids], True, "cast-mul", names,
                                     WEIGHT_LIMIT, compact, cache, means, corrected)
        activations, unranged = _quantize_activations(graph, placement, ranges, settings.activation_type,
                                                      settings.symmetric_activations, names)
    else:
        weights = _quantize_weights(graph, layers, per_channel, weight_form, names, settings.weight_limit, compact, cache,
                                    means, corrected)
    if compact:
        _compact_biases(graph, layers, names)
    if not settings.include:
        weights += _quantize_tables(graph, names, settings.exclude, compact, cache)
    return PassResult(
        changed=bool(weights or activations),
        weights=weights,
        activations=activations,
        unranged=unranged,
        corrected_biases=corrected[0],
    )


def name_set(text: str) -> frozenset[str]:
    """The names in a comma-separated list (a pipeline text's form of a list)."""
    return frozenset(item.strip() for item in text.split(",") if item.strip())


def _name_collection(names: Collection[str]) -> Collection[str]:
    if isinstance(names, str):  # "fc" would be the names "f" and "c"
        raise TypeError("layer names go as a collection, not as text (name_set reads a comma-separated list)")
    return names


def quantizable_layers(graph: gs.Graph, exclude: Collection[str] = frozenset(),
                       include: Collection[str] = frozenset()) -> list[gs.Node]:
    """The main graph's standard Conv/ConvTranspose/Gemm/MatMul nodes, less those `exclude` names
    (node names or op types); when `include` is given, only the nodes it names."""
    excluded, included = _name_collection(exclude), _name_collection(include)
    return [
        node
        for node in graph.nodes
        if node.op in LAYER_OPS
        and is_standard(node)
        and node.name not in excluded
        and node.op not in excluded
        and (not included or node.name in included)
    ]


# ----------------------------------------------------------------------------- weights


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


def _quantize_weights(
    graph: gs.Graph,
    layers: list[gs.Node],
    per_channel: bool,
    form: str,
    names,
    limit: int,
    compact: bool,
    cache: dict | None,
    means: dict,
    corrected: list[int],
) -> int:
    """Replace each layer's constant weight by its int8 form; returns how many weights. A layer
    with an input mean in `means` has its bias corrected (counted in corrected[0])."""
    replaced: dict[tuple[int, int | None], gs.Variable] = {}  # (weight tensor id, axis) -> float weight
    rounded: dict[tuple[int, int | None], tuple[np.ndarray, np.ndarray]] = {}
    layer_ids = {id(node) for node in layers}
    for node in layers:
        value = float_weight(node)
        if value is None:
            continue
        weight = node.inputs[1]
        axis = weight_axis(node, value.ndim) if per_channel else None
        key = (id(weight), axis)
        if key not in replaced:
            quantized, scale = weight_int8(cache, weight.name, value, axis, limit, compact)
            index = len(replaced)
            values = _int8_values(weight, quantized, all(id(reader) in layer_ids for reader in weight.outputs), names)
            new_nodes: list[gs.Node] = []
            if form == "dequantize":
                # Compact: a float16 scale behind a Cast (onnxruntime folds it before fusing QDQ
                # groups) and, for a Conv, no zero point (it defaults to 0; QGemm wants one).
                factor = _stored_scale(new_nodes, scale, f"s{index}", names)
                omit_zero_point = compact and node.op == "Conv"
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
                output = _cast_times_scale(new_nodes, values, along(scale, axis, value.ndim), (f"c{index}", f"s{index}", f"w{index}"), names)
            graph.nodes[0:0] = new_nodes  # constant expressions: first, so order stays topological
            replaced[key] = output
            rounded[key] = (quantized, scale)
        set_input(node, 1, replaced[key])
        if node.name in means and _correct_bias(node, value, *rounded[key], axis, means[node.name], names):
            corrected[0] += 1
    return len(replaced)


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


def _quantize_tables(graph: gs.Graph, names, excluded: set[str], compact: bool, cache: dict | None) -> int:
    """Lookup tables (Gather from a large float32 constant, e.g. token embeddings) become int8 rows
    with one scale per row, always in the Cast * scale form: a table is not part of any integer
    kernel, and onnxruntime folds the expression back to float at load."""
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
            quantized, scale = weight_int8(cache, table.name, value, 0, WEIGHT_LIMIT, compact)
            values = _int8_values(table, quantized, all(reader.op == "Gather" for reader in table.outputs), names)
            new_nodes: list[gs.Node] = []
            output = _cast_times_scale(new_nodes, values, along(scale, 0, value.ndim), (f"tc{index}", f"ts{index}", f"t{index}"), names)
            graph.nodes[0:0] = new_nodes
            replaced[id(table)] = output
        set_input(node, 0, replaced[id(table)])
    return len(replaced)


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


def _compact_biases(graph: gs.Graph, layers: list[gs.Node], names) -> int:
    """Store the float32 biases of the quantized layers as float16 (see half_fits): a Conv's or
    Gemm's bias input, and the constant of an Add that alone reads a MatMul's output (a
    Linear layer's bias, 26 KB of float32 in PP-OCRv4 rec's head)."""
    new_nodes: list[gs.Node] = []
    compacted: dict[int, gs.Variable] = {}
    for node, slot in _bias_slots(layers):
        tensor = node.inputs[slot]
        bias = constant_value(tensor)
        if bias is None or bias.dtype != np.float32 or not half_fits(bias):
            continue
        if id(tensor) not in compacted:
            compacted[id(tensor)] = _half_constant(new_nodes, bias, f"b{len(compacted)}", names)
        set_input(node, slot, compacted[id(tensor)])
    graph.nodes[0:0] = new_nodes
    return len(compacted)


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


# ----------------------------------------------------------------------------- activations


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
        found = {id(tensor) for tensor in self.calibrated if _usable(ranges.get(tensor.name))}
        for key, source in self.shared.items():  # graph order: a chain's source comes first
            if id(source) in found:
                found.add(key)
        return found


def plan(graph: gs.Graph, layers: list[gs.Node]) -> Placement:
    """The activation tensors to quantize so that onnxruntime's QDQ fusions fire (module docstring).

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


def activation_tensors(graph: gs.Graph, exclude: Collection[str] = frozenset(),
                       include: Collection[str] = frozenset()) -> list[str]:
    """Names of the tensors quantize-int8 (full mode) wants a calibrated range for, in graph order."""
    return plan(graph, quantizable_layers(graph, exclude, include)).tensor_names()


def _quantize_activations(
    graph: gs.Graph, placement: Placement, ranges: dict, activation_type: str, symmetric: bool, names
) -> tuple[int, int]:
    """A QuantizeLinear -> DequantizeLinear pair after each placed tensor's producer, read by all its
    readers; returns (tensors quantized, tensors left float for want of a range)."""
    parameters: dict[int, tuple[gs.Constant, gs.Constant]] = {}
    unranged = 0
    for index, tensor in enumerate(placement.calibrated):
        limits = ranges.get(tensor.name)
        if not _usable(limits):
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


def _usable(limits) -> bool:
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
