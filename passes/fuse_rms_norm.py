"""RMS normalization written out in arithmetic, replaced by RMSNormalization (opset 23+).

    y = x / Sqrt(ReduceMean(x²) + ε) · γ   over the last k axes   = RMSNormalization(x, γ; axis = −k, epsilon = ε)

transformers' T5LayerNorm and LlamaRMSNorm: x² as Pow(x, 2) or x·x, the division as
x·Reciprocal(√·) (torch.rsqrt), x·(1/√·) or x/√·; γ an optional constant that varies along the
normalized axes only (without it the fused node gets ones). float32 and float16 only (see
_normalization.py). Runs after fuse-layer-norm, which takes x − mean first: the chain from its
square on is this same pattern.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph import find, interface_tensors, unique_names, walk
from onnxslim.manager import PassContext, PassResult, register_pass

from ._normalization import replace_with, root_mean_square

RMS_NORMALIZATION_OPSET = 23


@register_pass("fuse-rms-norm")
def fuse_rms_norm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace x / √(mean(x²) + ε) · γ over the last axes by RMSNormalization (opset 23+)."""
    if (graph.opset or 0) < RMS_NORMALIZATION_OPSET:
        return PassResult(fused=0)
    interface = interface_tensors(graph)
    names = unique_names(graph)
    fused = 0
    for subgraph in walk(graph):
        for square in find(subgraph, "Pow", "Mul"):
            if len(square.outputs) != 1 or not square.inputs:
                continue
            match = root_mean_square(square, square.inputs[0], interface, with_bias=False)
            if match is None:
                continue
            replace_with(subgraph, match, "RMSNormalization", match.data, names)
            fused += 1
    return PassResult(fused=fused)
