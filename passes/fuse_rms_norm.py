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

from onnxslim.manager import PassContext, PassResult, register_pass

from ._normalization import Normalization, fuse_all, root_mean_square

RMS_NORMALIZATION_OPSET = 23


@register_pass("fuse-rms-norm")
def fuse_rms_norm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace x / √(mean(x²) + ε) · γ over the last axes by RMSNormalization (opset 23+)."""
    return fuse_all(graph, opset=RMS_NORMALIZATION_OPSET, op="RMSNormalization", starts=("Pow", "Mul"),
                    match=_fusable)


def _fusable(square: gs.Node, interface: set[int]) -> tuple[Normalization, gs.Tensor] | None:
    if len(square.outputs) != 1 or not square.inputs:
        return None
    match = root_mean_square(square, square.inputs[0], interface, with_bias=False)
    return None if match is None else (match, match.data)
