"""Shape and type annotation with onnx's shape inference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    constant_value,
    inferred_symbol,
    is_empty,
    is_standard,
    node_subgraphs,
    proto_node_bodies,
    trusted_symbol,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass
from onnxslim.shapes import infer_model


@register_pass("infer-shapes")
def infer_shapes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Annotate tensors with the dtypes and shapes onnx's shape inference derives (changes no computation)."""
    memo = graph.__dict__.get(MEMO)
    if memo is not None and _open_questions(graph) <= memo:
        # Inference already ran on this graph and nothing it could say more about has changed
        # since: every incomplete tensor has the same producer reading the same tensors.
        return PassResult(changed=False, skipped=1)
    annotated, progressed_before = 0, False
    for _ in range(MAX_INFERENCES + _schemaless_count(graph)):
        inferred = infer_model(graph)
        gained = _annotate(graph, inferred.graph)
        # What inference cannot say itself: an op onnx has no schema for stops it (each one typed
        # here lets it go on past it, to the next one: a chain of N takes N rounds), and a Slice
        # with a computed start or end loses dims it keeps (carried over from its input).
        typed = _type_schemaless(graph)
        carried = sum(_carry_kept_dims(subgraph) for subgraph in walk(graph))
        annotated += gained + typed + carried
        # Inference reads typed and carried dims as given, so what follows them is inferred again; a
        # body sees the outer values' types as the inference before left them, one round later.
        if not typed and not carried and not (progressed_before and gained):
            break
        progressed_before = typed + carried > 0
    graph.__dict__[MEMO] = _open_questions(graph)
    # Annotation is not a rewrite: it never makes a fixed-point group go round again.
    return PassResult(changed=False, annotated=annotated)


# Inferences in one run when dims carried past Slices make later tensors inferable (one is usual).
MAX_INFERENCES = 4

# Attribute of the top-level gs.Graph holding _open_questions() as it was after the last inference.
MEMO = "_onnxslim_inference_memo"

# onnxruntime's fused ops that onnx has no schema for (written by its offline optimizer, some in the
# default domain) whose first output has the type and shape of their first input, as onnxruntime's
# own schemas for them say: normalizations and activations, a bias or skip input broadcast into it.
SAME_AS_FIRST_INPUT = frozenset({
    ("", "SimplifiedLayerNormalization"),
    ("com.microsoft", "SimplifiedLayerNormalization"),
    ("com.microsoft", "SkipLayerNormalization"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"),
    ("com.microsoft", "BiasGelu"),
    ("com.microsoft", "FastGelu"),
    ("com.microsoft", "Gelu"),
    ("com.microsoft", "QuickGelu"),
})


def _type_schemaless(graph: gs.Graph) -> int:
    """Type the first output of every SAME_AS_FIRST_INPUT op from its first input; how many changed."""
    typed = 0
    for body in walk(graph):
        for node in body.nodes:
            if (node.domain or "", node.op) not in SAME_AS_FIRST_INPUT or not node.inputs or not node.outputs:
                continue
            source, target = node.inputs[0], node.outputs[0]
            if not isinstance(target, gs.Variable) or _settled(target):
                continue
            changed = False
            if target.dtype is None and source.dtype is not None:
                target.dtype, changed = source.dtype, True
            refined = _refine(target.shape, list(source.shape) if source.shape is not None else None)
            if refined != target.shape:
                # Renamed dims (this inference's unk__ names) are written but count as nothing new.
                changed = changed or _known(refined) != _known(target.shape)
                target.shape = refined
            typed += changed
    return typed


def _schemaless_count(graph: gs.Graph) -> int:
    return sum((node.domain or "", node.op) in SAME_AS_FIRST_INPUT for body in walk(graph) for node in body.nodes)


def _open_questions(graph: gs.Graph) -> frozenset:
    """What inference could still learn: every tensor without a dtype or a complete shape, with
    the node that computes it and what that node reads (and whether each input is a constant),
    plus the graph inputs' shapes. Tensors that are complete cannot become more complete, and an
    incomplete tensor whose producer and inputs are all unchanged gets the same answer again;
    a rewrite upstream that resolves it changes its producer's inputs or their kind.

    Inference also reads values: it propagates small integer tensors (Shape, Gather, Concat...)
    into the shapes they give Reshape or Expand. Such a tensor is complete (its shape is `[2]`)
    while its value may become known (a Div by 1 removed before it, a Max folded): the nodes
    computing one are asked too, so a rewrite anywhere along such a chain is seen.
    """
    questions = {tuple((id(tensor), str(tensor.dtype), _dims(tensor.shape)) for tensor in graph.inputs)}
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            for tensor in node.outputs:
                if _complete(tensor) and not _shape_like(tensor):
                    continue
                reads = tuple((id(source), isinstance(source, gs.Constant), _producer_id(source)) for source in node.inputs)
                questions.add((id(tensor), id(node), node.op, reads))
    return frozenset(questions)


def _shape_like(tensor: gs.Tensor) -> bool:
    """An integer scalar or vector: a value onnx's data propagation may carry into a shape."""
    return (
        tensor.dtype is not None
        and np.dtype(tensor.dtype).kind in "iu"
        and tensor.shape is not None
        and len(tensor.shape) <= 1
    )


def _complete(tensor: gs.Tensor) -> bool:
    """Typed, with every dim static or named by the model. A dim onnx's inference named itself
    (`unk__7`) stands for "not known here" and is not complete: a rewrite upstream (a Reshape
    target folded to a constant) can make it static, which only a new inference finds."""
    if tensor.dtype is None or tensor.shape is None:
        return False
    return all(
        isinstance(dim, (int, np.integer)) and dim >= 0 or trusted_symbol(dim) and not inferred_symbol(dim)
        for dim in tensor.shape
    )


def _producer_id(tensor: gs.Tensor) -> int | None:
    return id(tensor.inputs[0]) if tensor.inputs else None


def _dims(shape) -> tuple | None:
    return None if shape is None else tuple(str(dim) for dim in shape)


def _annotate(graph: gs.Graph, proto: onnx.GraphProto) -> int:
    """Copy dtypes/shapes from the inferred proto onto the graph's tensors, bodies included.

    The dims onnx named itself (`unk__7`) are facts of one inference only: they come from this
    one, on every tensor a node of this graph computes, or are forgotten. A name kept from an
    earlier inference could meet the same name given to another size by this one.
    """
    inferred = {value.name: value for value in [*proto.value_info, *proto.output] if value.type.HasField("tensor_type")}
    annotated = 0
    for node in graph.nodes:
        for tensor in node.outputs:
            if not isinstance(tensor, gs.Variable) or _settled(tensor):
                continue
            value = inferred.get(tensor.name)
            tensor_type = value.type.tensor_type if value is not None else None
            if tensor.dtype is None and tensor_type is not None and tensor_type.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
                annotated += 1
            found = None
            if tensor_type is not None and tensor_type.HasField("shape"):
                found = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim]
            refined = _refine(tensor.shape, found)
            if refined != tensor.shape:
                annotated += _known(refined) != _known(tensor.shape)
                tensor.shape = refined
    # The inferred proto leaves out disconnected nodes (see onnxslim.shapes), so skip them here too.
    connected = [node for node in graph.nodes if node.outputs]
    for index, node in enumerate(connected[: len(proto.node)]):
        bodies = node_subgraphs(node)
        if not bodies:
            continue
        # proto.node is read only for owners of bodies: most nodes are not
        for body, body_proto in zip(bodies, proto_node_bodies(proto.node[index])):
            annotated += _annotate(body, body_proto)
    return annotated


def _settled(tensor: gs.Variable) -> bool:
    """Whether annotation cannot change the tensor: typed, with a list of static dims (see _refine)."""
    return (
        tensor.dtype is not None
        and type(tensor.shape) is list
        and all(isinstance(dim, (int, np.integer)) for dim in tensor.shape)
    )


def _refine(known: list | None, inferred: list | None) -> list | None:
    """`known` with each dim it does not know taken from `inferred`.

    Shapes only ever become more static: after folding, inference can resolve dims it could
    not before (a Reshape target that became a constant), but a static dim or one the model
    named stays. A dim an earlier inference named (`unk__7`) is not known: it is replaced by
    this inference's answer, or forgotten.
    """
    if known is None:
        return inferred
    if inferred is None or len(known) != len(inferred):
        return [None if inferred_symbol(dim) else dim for dim in known]
    return [_refined_dim(old, new) for old, new in zip(known, inferred)]


def _refined_dim(old, new):
    if isinstance(new, int) and new > 0 and not isinstance(old, (int, np.integer)):
        return new
    if old is None or inferred_symbol(old):
        return new
    return old


def _known(shape: list | None) -> tuple | None:
    """What a shape says beyond one inference's names: counts a renaming as no annotation."""
    return None if shape is None else tuple(None if inferred_symbol(dim) else dim for dim in shape)


def _carry_kept_dims(graph: gs.Graph) -> int:
    """Give a Slice's output the input's dims on the axes it does not slice.

    onnx's inference leaves every dim of a Slice unknown when a start or end is computed (a
    detector slicing its masks to the number of detections), though only the sliced axes can
    change; the dims lost there are lost downstream and in the bodies that read the result.
    Needs constant axes (or none: the first len(starts) axes) and the input's rank. Returns how
    many dims became known.
    """
    carried = 0
    for node in graph.nodes:
        if node.op != "Slice" or not is_standard(node) or len(node.inputs) < 3 or not node.outputs:
            continue
        data, output = node.inputs[0], node.outputs[0]
        if not isinstance(output, gs.Variable) or data.shape is None:
            continue
        rank = len(data.shape)
        if output.shape is not None and len(output.shape) != rank:
            continue
        sliced = _sliced_axes(node, rank)
        if sliced is None:
            continue
        shape = list(output.shape) if output.shape is not None else [None] * rank
        kept = [axis for axis in range(rank) if axis not in sliced and _unknown(shape[axis]) and not _unknown(data.shape[axis])]
        for axis in kept:
            shape[axis] = data.shape[axis]
        if kept:
            output.shape = shape
            carried += len(kept)
    return carried


def _sliced_axes(node: gs.Node, rank: int) -> set[int] | None:
    """The axes a Slice slices (normalized), or None if they are not known."""
    axes = node.inputs[3] if len(node.inputs) > 3 and not is_empty(node.inputs[3]) else None
    if axes is None:
        starts = node.inputs[1]
        count = len(starts.shape) == 1 and starts.shape[0] if starts.shape is not None else None
        return set(range(count)) if isinstance(count, (int, np.integer)) and 0 <= count <= rank else None
    values = constant_value(axes)
    if values is None or values.ndim != 1 or not all(-rank <= axis < rank for axis in values.tolist()):
        return None
    return {axis % rank for axis in values.tolist()}


def _unknown(dim) -> bool:
    """Not a static size nor a name the model gave (a dim inference named itself is not known)."""
    if isinstance(dim, (int, np.integer)):
        return dim < 0
    return dim is None or trusted_symbol(dim) is None or inferred_symbol(dim)
