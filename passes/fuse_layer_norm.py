"""Layer normalization written out in arithmetic, replaced by LayerNormalization (opset 17+).

    d = x − ReduceMean(x)                       over the last k axes, keepdims
    y = d / Sqrt(ReduceMean(d²) + ε) · γ + β    = LayerNormalization(x, γ, β; axis = −k, epsilon = ε)

d² may be Pow(d, 2) or d·d; the division may be d·Reciprocal(√·) or d·(1/√·); γ and β are
optional constants (without γ the fused node gets ones) that broadcast along the normalized axes
only. Axes are an attribute of ReduceMean before opset 18 and an input from 18. float32 and float16
only (see _normalization.py).

onnxruntime computes the variance in one pass, E[x²] − E[x]²: where the mean dwarfs the spread
(|mean|/std ≳ 1e3 in float32) that rounds differently from the two-pass original, as onnxruntime's
own LayerNorm fusion (ORT_ENABLE_BASIC and up) does to the same graph.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph import single_reader
from onnxslim.manager import PassContext, PassResult, register_pass

from ._normalization import Normalization, binary, fuse_all, is_square, root_mean_square, trailing_axes

LAYER_NORMALIZATION_OPSET = 17


@register_pass("fuse-layer-norm")
def fuse_layer_norm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace x − mean, / √(variance + ε), · γ + β over the last axes by LayerNormalization (opset 17+)."""
    return fuse_all(graph, opset=LAYER_NORMALIZATION_OPSET, op="LayerNormalization", starts=("ReduceMean",),
                    match=_fusable)


def _fusable(mean: gs.Node, interface: set[int]) -> tuple[Normalization, gs.Tensor] | None:
    match = _match(mean, interface) if mean.outputs else None
    return None if match is None else (match, mean.inputs[0])


def _match(mean: gs.Node, interface: set[int]) -> Normalization | None:
    """The layer normalization whose first step is `mean` = ReduceMean(x), or None."""
    x = mean.inputs[0]
    reduced = trailing_axes(mean, x)
    sub = single_reader(mean.outputs[0], interface)
    if reduced is None or not binary(sub, "Sub") or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return None
    centered = sub.outputs[0]
    if id(centered) in interface:
        return None
    square = next((reader for reader in centered.outputs if is_square(reader, centered)), None)
    match = root_mean_square(square, x, interface, with_bias=True) if square is not None else None
    if match is None or match.axes != reduced:
        return None
    # x − mean feeds the square and the division, nothing else: both go.
    reads = 2 if square.op == "Mul" else 1
    if len(centered.outputs) != reads + 1 or any(reader is not square and reader is not match.normalize for reader in centered.outputs):
        return None
    return match
