"""BatchNormalization in inference mode folded into the Conv, ConvTranspose, Gemm or MatMul before it."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph import bypass, find, interface_tensors, single_reader, unique_names, walk
from onnxslim.manager import PassContext, PassResult, register_pass

from ._linear import batch_norm_affine, batch_norm_parameters, changes_shared, layer_producing, output_affine, set_weights


@register_pass("fuse-conv-bn")
def fuse_conv_bn(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Fold an inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""
    interface = interface_tensors(graph)
    names = unique_names(graph)
    fused = 0
    for subgraph in walk(graph):
        for bn in find(subgraph, "BatchNormalization"):
            if not bn.outputs or len(bn.inputs) != 5:
                continue
            layer = layer_producing(bn.inputs[0], interface)
            # BN normalizes axis 1: a layer's channel axis only when it is the output's axis 1.
            if layer is None or layer.output_rank is None or layer.output_rank - 1 - layer.output_channel_axis != 1:
                continue
            if single_reader(layer.output, interface) is not bn:
                continue
            parameters = batch_norm_parameters(bn, graph.opset, interface)
            if parameters is None or parameters[0].shape != (layer.out_channels,):
                continue
            new = output_affine(layer, *batch_norm_affine(parameters, bn.attrs.get("epsilon", 1e-5)))
            if new is None or changes_shared(layer, *new) or not bypass(bn, interface, subgraph):
                continue
            set_weights(layer, *new, names)
            fused += 1
    return PassResult(fused=fused)
