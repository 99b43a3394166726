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
from onnxslim.graph import is_standard, unique_names
from onnxslim.layers import LAYER_OPS
from onnxslim.layers import output_axis as weight_axis  # quantize imports it from here
from onnxslim.manager import PassContext, PassResult, register_pass

from ._qdq_placement import ACTIVATION_TYPES, activation_parameters, plan, quantize_activations  # noqa: F401 (the tests: activation_parameters)
from ._qdq_placement import usable_range as _usable  # noqa: F401 (the tests import it from here)
from ._qdq_weights import (  # noqa: F401 (along, float_weight, weight_int8: onnxslim.quantize imports them from here)
    REDUCED_WEIGHT_LIMIT,
    WEIGHT_LIMIT,
    WeightRewriter,
    along,
    float_weight,
    weight_int8,
)

QDQ_OPSET = 10  # QuantizeLinear / DequantizeLinear
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis`
MODES = ("full", "weights")
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
    # Layer name -> per-channel mean of its input over calibration data, for bias correction (see _qdq_weights).
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
    rewriter = WeightRewriter(graph, names, compact=settings.compact, cache=settings.weight_cache,
                              means=settings.input_means)
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
        weights = rewriter.quantize_layers(fused, per_channel=per_channel, form="dequantize", limit=settings.weight_limit)
        weights += rewriter.quantize_layers([node for node in layers if id(node) not in fused_ids], per_channel=True,
                                            form="cast-mul", limit=WEIGHT_LIMIT)
        activations, unranged = quantize_activations(graph, placement, ranges, settings.activation_type,
                                                     settings.symmetric_activations, names)
    else:
        weights = rewriter.quantize_layers(layers, per_channel=per_channel, form=weight_form, limit=settings.weight_limit)
    if settings.compact:
        rewriter.compact_biases(layers)
    if not settings.include:
        weights += rewriter.quantize_tables(settings.exclude)
    return PassResult(
        changed=bool(weights or activations),
        weights=weights,
        activations=activations,
        unranged=unranged,
        corrected_biases=rewriter.corrected_biases,
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


def activation_tensors(graph: gs.Graph, exclude: Collection[str] = frozenset(),
                       include: Collection[str] = frozenset()) -> list[str]:
    """Names of the tensors quantize-int8 (full mode) wants a calibrated range for, in graph order."""
    return plan(graph, quantizable_layers(graph, exclude, include)).tensor_names()
