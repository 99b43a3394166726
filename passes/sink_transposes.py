"""Transposes moved down through elementwise ops, to where they cancel."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph import (
    constant_value,
    disconnect,
    find,
    interface_tensors,
    is_empty,
    is_standard,
    known_rank,
    merge_tensors,
    node_subgraphs,
    producer,
    set_input,
    set_output,
    unique_names,
    walk,
)
from onnxslim.manager import PassContext, PassResult, register_pass

from ._linear import layer_producing, output_vector

# Ops computing each output element from the input elements at the same position, which commute
# with any permutation of the axes: op(transpose(a, p), transpose(b, p)) = transpose(op(a, b), p)
# as long as a and b have the full rank (a broadcast dim of 1 moves with its axis). The value is
# the inputs that carry data; the others are read for their type (CastLike) or are scalars (Clip).
UNARY = (
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "Ceil", "Celu", "Cos",
    "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
    "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid",
    "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
)
BROADCASTING = (
    "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu",
    "Sub", "Sum", "Where", "Xor",
)
DATA_INPUTS: dict[str, tuple[int, ...] | None] = {
    **{op: (0,) for op in UNARY},
    **{op: None for op in BROADCASTING},  # None: every input
    "Clip": (0,),  # min and max are scalars (opset >= 11) or attributes
    "CastLike": (0,),
}
# Constant arithmetic fuse-conv-affine folds into the linear layer before it: op -> the inputs
# that may be the layer's output (the other one being the constant).
AFFINE = {"Mul": (0, 1), "Add": (0, 1), "Div": (0,), "Sub": (0,)}
# Numpy-style broadcasting for every op above (Max/Min/Sum/Mean last, at opset 8); before, binary
# ops broadcast by an `axis` attribute that does not commute with a permutation.
BROADCAST_OPSET = 8
# Nodes one region may hold (a region grows through a residual stream; it is never whole networks).
REGION_LIMIT = 64


@register_pass("sink-transposes")
def sink_transposes(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Move a Transpose past the elementwise ops it feeds where fewer Transposes remain, or a layer absorbs a constant.

    transpose(x, p) ⊙ transpose(z, p) ⊙ c computes transpose(x ⊙ z ⊙ c', p) with c' the constant
    permuted back. A region of connected elementwise ops whose other inputs are constants, scalars
    or Transposes with the same permutation runs on the untransposed values; the Transposes that
    fed only the region go, one Transpose is added after each region result read elsewhere, and a
    reader that is the inverse Transpose cancels with it. A region is taken when it leaves fewer
    Transposes, or as many while a constant Mul/Add of it comes to read a linear layer's output
    directly, which fuse-conv-affine then folds into the layer. Each region taken leaves fewer
    such Transposes behind, so the pass ends and a second run finds nothing.
    """
    if graph.opset < BROADCAST_OPSET:
        return PassResult(sunk=0)
    interface = interface_tensors(graph)
    names = unique_names(graph)
    sunk = removed = folds = 0
    for subgraph in list(walk(graph)):
        for _ in range(len(subgraph.nodes) + 1):  # each region removes a Transpose: this bound is never reached
            members = {id(node): position for position, node in enumerate(subgraph.nodes)}
            region = next(filter(None, (_plan(node, members, interface) for node in find(subgraph, "Transpose"))), None)
            if region is None:
                break
            removed -= region.cost
            folds += region.folds
            _apply(region, subgraph, members, interface, names)
            sunk += 1
    return PassResult(sunk=sunk, transposes_removed=removed, to_fold=folds)


class _Region:
    """Elementwise nodes to run on untransposed values, with what that costs in Transposes."""

    def __init__(self, perm: list[int], nodes: list[gs.Node], interface: set[int], members: dict[int, int]):
        self.perm = perm
        self.nodes = nodes
        self.ids = {id(node) for node in nodes}
        self.cost = self._cost(interface, members)
        self.folds = self._folds(interface, members)

    def rank(self) -> tuple[bool, int, int]:
        """Smaller is better: no added Transposes first, then the nodes saved, then fewer nodes moved."""
        return (self.cost > 0, self.cost - self.folds, len(self.nodes))

    def pays(self) -> bool:
        return self.cost <= 0 and self.cost - self.folds < 0

    def produced_inside(self, tensor: gs.Tensor) -> bool:
        node = producer(tensor)
        return node is not None and id(node) in self.ids

    def _cost(self, interface: set[int], members: dict[int, int]) -> int:
        """Transposes added minus Transposes removed."""
        cost = 0
        fed: dict[int, gs.Node] = {}
        for node in self.nodes:
            for _, operand in _data_operands(node):
                if not self.produced_inside(operand) and _transposed_by(operand, self.perm, members):
                    fed[id(producer(operand))] = producer(operand)
        for transpose in fed.values():
            output = transpose.outputs[0]
            if id(output) not in interface and all(id(reader) in self.ids for reader in output.outputs):
                cost -= 1
        for node in self.nodes:
            output = node.outputs[0]
            outside = [reader for reader in output.outputs if id(reader) not in self.ids]
            kinds = [_composed(reader, output, self.perm, members) for reader in outside]
            cost -= len(_cancelling(outside, kinds, interface))
            if id(output) in interface or None in kinds:
                cost += 1
        return cost

    def _folds(self, interface: set[int], members: dict[int, int]) -> int:
        """Nodes that will scale or shift a linear layer's output by a constant per channel once
        they read it directly, which fuse-conv-affine folds into the layer (ConvNeXt's layer scale
        after its second Linear, behind the Transpose back to NCHW): each is a node fewer."""
        folds = 0
        for node in self.nodes:
            if node.op not in AFFINE or len(node.inputs) != 2:
                continue
            for index in AFFINE[node.op]:
                operand, other = node.inputs[index], node.inputs[1 - index]
                if self.produced_inside(operand) or not _transposed_by(operand, self.perm, members):
                    continue
                source = producer(operand).inputs[0]
                value = constant_value(other)
                if value is None or len(operand.outputs) != 1 or len(source.outputs) != 1 or id(source) in interface:
                    continue
                layer = layer_producing(source, interface)
                shared = any(reader is not layer.node for reader in layer.node.inputs[1].outputs) if layer else True
                if layer is None or (node.op in ("Mul", "Div") and shared):
                    continue  # a new weight for one reader of a shared one would grow the model
                if output_vector(layer, _untransposed_value(value, _inverse(self.perm))) is not None:
                    folds += 1
        return folds


def _plan(seed: gs.Node, members: dict[int, int], interface: set[int]) -> _Region | None:
    """The region of elementwise ops the seed Transpose's result may sink through, if it pays."""
    if len(seed.inputs) != 1 or len(seed.outputs) != 1 or not seed.outputs[0].outputs:
        return None  # disconnected by an earlier rewrite, or unread
    perm = _perm(seed)
    if perm is None or perm == list(range(len(perm))):
        return None
    nodes = _grow(seed.outputs[0], perm, members)
    if not nodes:
        return None
    best = _Region(perm, nodes, interface, members)
    improved = True
    while improved:  # drop nodes whose results would need a Transpose of their own, while that pays
        improved = False
        for node in reversed(best.nodes):
            kept = _without(best.nodes, node, perm, members)
            if not kept:
                continue
            candidate = _Region(perm, kept, interface, members)
            if candidate.rank() < best.rank():
                best, improved = candidate, True
                break
    return best if best.pays() else None


def _grow(start: gs.Tensor, perm: list[int], members: dict[int, int]) -> list[gs.Node]:
    """The elementwise nodes reachable from `start` (down, and up to their other inputs) that can
    run on untransposed values: every input they read from outside is a constant, a scalar, or the
    result of a Transpose with `perm`. Ordered as in the graph."""
    included: dict[int, gs.Node] = {}
    transposed = [start]
    grown = True
    while grown and len(included) < REGION_LIMIT:
        grown = False
        for tensor in list(transposed):
            for reader in list(tensor.outputs):
                if id(reader) in included:
                    continue
                added = _closure(reader, included, perm, members)
                if added is None:
                    continue
                grown = True
                for node in added:
                    included[id(node)] = node
                    transposed.append(node.outputs[0])
                    transposed.extend(
                        operand for _, operand in _data_operands(node) if _transposed_by(operand, perm, members)
                    )
    return sorted(included.values(), key=lambda node: members[id(node)])


def _closure(node: gs.Node, included: dict[int, gs.Node], perm: list[int], members: dict[int, int]) -> list[gs.Node] | None:
    """`node` and the elementwise producers of its inputs it needs inside the region, or None."""
    added: dict[int, gs.Node] = {}
    pending = [node]
    while pending:
        current = pending.pop()
        if id(current) in included or id(current) in added:
            continue
        if not _sinkable(current, members) or len(included) + len(added) >= REGION_LIMIT:
            return None
        added[id(current)] = current
        full_rank = False  # an input of the full rank makes the output's rank the permutation's
        for index, operand in enumerate(current.inputs):
            data = _is_data_input(current, index)
            upstream = producer(operand)
            inside = upstream is not None and (id(upstream) in included or id(upstream) in added)
            if not data:
                # Read for its type or as a scalar: it must not be a value whose layout changes.
                if inside or _transposed_by(operand, perm, members):
                    return None
                continue
            if inside or _transposed_by(operand, perm, members):
                full_rank = True
            elif _layout_free(operand, len(perm)) or _permutable_constant(operand, len(perm)):
                continue
            elif upstream is not None and _sinkable(upstream, members):
                pending.append(upstream)
                full_rank = True
            else:
                return None
        if not full_rank:
            return None
    return list(added.values())


def _without(nodes: list[gs.Node], dropped: gs.Node, perm: list[int], members: dict[int, int]) -> list[gs.Node]:
    """`nodes` without `dropped` and without the nodes that read its result (directly or not)."""
    removed = {id(dropped)}
    kept = []
    for node in nodes:  # in graph order: a node comes after the nodes it reads
        if any(id(producer(operand)) in removed for _, operand in _data_operands(node) if producer(operand) is not None):
            removed.add(id(node))
        elif id(node) not in removed:
            kept.append(node)
    return kept


def _sinkable(node: gs.Node, members: dict[int, int]) -> bool:
    return (
        id(node) in members
        and is_standard(node)
        and node.op in DATA_INPUTS
        and len(node.outputs) == 1
        and not is_empty(node.outputs[0])
        and "broadcast" not in node.attrs  # legacy broadcasting (opset < 7)
        and not node_subgraphs(node)
    )


def _is_data_input(node: gs.Node, index: int) -> bool:
    data = DATA_INPUTS[node.op]
    return data is None or index in data


def _data_operands(node: gs.Node):
    for index, operand in enumerate(node.inputs):
        if _is_data_input(node, index) and not is_empty(operand):
            yield index, operand


def _transposed_by(tensor: gs.Tensor, perm: list[int], members: dict[int, int]) -> bool:
    """Whether `tensor` is the result of a Transpose with `perm` in the same graph."""
    node = producer(tensor)
    return (
        node is not None
        and node.op == "Transpose"
        and id(node) in members
        and is_standard(node)
        and len(node.inputs) == 1
        and len(node.outputs) == 1
        and _perm(node) == perm
    )


def _layout_free(tensor: gs.Tensor, rank: int) -> bool:
    """One value for every element, so it broadcasts the same way in any layout: a constant whose
    dims are all 1 (no more than the permutation's), or a scalar. Other values are not taken on
    their declared 1s: an intermediate's declared shape may be wrong, and a wrong 1 would be
    trusted with a layout."""
    value = constant_value(tensor)
    if value is not None:
        return value.ndim <= rank and value.size == 1
    return tensor.shape is not None and len(tensor.shape) == 0


def _permutable_constant(tensor: gs.Tensor, rank: int) -> bool:
    value = constant_value(tensor)
    return value is not None and value.ndim <= rank and value.dtype != object and _onnx_type(value.dtype)


def _onnx_type(dtype: np.dtype) -> bool:
    try:
        onnx.helper.np_dtype_to_tensor_dtype(dtype)
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _composed(reader: gs.Node, tensor: gs.Tensor, perm: list[int], members: dict[int, int]) -> str | None:
    """How a reader of a region result would read the untransposed result instead: "identity" for
    a Transpose that undoes `perm` (both go), "composed" for another Transpose (it takes the
    composition), None for a node that needs the transposed value."""
    if not (
        id(reader) in members
        and reader.op == "Transpose"
        and is_standard(reader)
        and len(reader.inputs) == 1
        and len(reader.outputs) == 1
        and reader.inputs[0] is tensor
    ):
        return None
    second = _perm(reader)
    if second is None or len(second) != len(perm):
        return None
    return "identity" if _compose(perm, second) == list(range(len(perm))) else "composed"


def _cancelling(readers: list[gs.Node], kinds: list[str | None], interface: set[int]) -> list[gs.Node]:
    """The readers that undo the permutation and go: all of them whose result is not part of the
    interface, and one whose result is (the region's node then writes that result itself)."""
    undoing = [reader for reader, kind in zip(readers, kinds) if kind == "identity"]
    kept_name = [reader for reader in undoing if id(reader.outputs[0]) in interface][:1]
    return [reader for reader in undoing if id(reader.outputs[0]) not in interface] + kept_name


def _compose(first: list[int], second: list[int]) -> list[int]:
    # y = transpose(x, p) has y.shape[j] = x.shape[p[j]], so the composition reads x at p1[p2[i]].
    return [first[axis] for axis in second]


def _perm(node: gs.Node) -> list[int] | None:
    """The node's permutation; without the attribute it reverses the axes, which needs the rank."""
    perm = node.attrs.get("perm")
    if perm is not None:
        perm = [int(axis) for axis in perm]
        return perm if sorted(perm) == list(range(len(perm))) else None
    rank = known_rank(node.inputs[0]) if node.inputs else None
    return None if rank is None else list(reversed(range(rank)))


def _inverse(perm: list[int]) -> list[int]:
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return inverse


def _apply(region: _Region, graph: gs.Graph, members: dict[int, int], interface: set[int], names) -> None:
    perm, inverse = region.perm, _inverse(region.perm)
    permuted: dict[int, gs.Tensor] = {}
    fed: dict[int, gs.Node] = {}
    for node in region.nodes:
        for index, operand in list(_data_operands(node)):
            if region.produced_inside(operand):
                continue
            if _transposed_by(operand, perm, members):
                fed[id(producer(operand))] = producer(operand)
                set_input(node, index, producer(operand).inputs[0])
            elif not _layout_free(operand, len(perm)):
                if id(operand) not in permuted:
                    permuted[id(operand)] = _untransposed_constant(operand, inverse, names)
                set_input(node, index, permuted[id(operand)])
    for node in region.nodes:
        _reroute_result(node, region, graph, members, interface, names)
    for transpose in fed.values():
        output = transpose.outputs[0]
        if not output.outputs and id(output) not in interface:
            disconnect(transpose)


def _untransposed_constant(tensor: gs.Tensor, inverse: list[int], names) -> gs.Constant:
    """The constant c' with transpose(c', perm) = c, c first given the full rank (as broadcasting
    would), then without its leading 1s (the region's other input has the full rank)."""
    return gs.Constant(names(f"{tensor.name}_untransposed"), _untransposed_value(constant_value(tensor), inverse))


def _untransposed_value(value: np.ndarray, inverse: list[int]) -> np.ndarray:
    value = np.asarray(value)
    value = value.reshape((1,) * (len(inverse) - value.ndim) + value.shape).transpose(inverse)
    leading = next((axis for axis, dim in enumerate(value.shape) if dim != 1), value.ndim)
    return np.ascontiguousarray(value.reshape(value.shape[leading:]))


def _reroute_result(node: gs.Node, region: _Region, graph: gs.Graph, members: dict[int, int], interface: set[int], names) -> None:
    """`node` writes the untransposed result; readers outside the region get it transposed back."""
    perm = region.perm
    output = node.outputs[0]
    shape = None if output.shape is None else [output.shape[axis] for axis in _inverse(perm)]
    outside = [reader for reader in output.outputs if id(reader) not in region.ids]
    if not outside and id(output) not in interface:
        output.shape = shape  # read only inside the region: the same tensor, in the other layout
        return
    inner = gs.Variable(names(f"{output.name}_untransposed"), dtype=output.dtype, shape=shape)
    set_output(node, 0, inner)
    for reader in list(output.outputs):
        if id(reader) in region.ids:
            for index, operand in enumerate(reader.inputs):
                if operand is output:
                    set_input(reader, index, inner)
    outside = list(output.outputs)
    kinds = [_composed(reader, output, perm, members) for reader in outside]
    cancelling = {id(reader) for reader in _cancelling(outside, kinds, interface)}
    for reader, kind in zip(outside, kinds):
        if kind is not None:
            set_input(reader, 0, inner)
            reader.attrs["perm"] = _compose(perm, _perm_of(reader, len(perm)))
    for reader in outside:
        if id(reader) in cancelling:
            result, written = reader.outputs[0], node.outputs[0]  # an interface result renames what the node writes
            disconnect(reader)
            merge_tensors(written, result, interface, graph)
    if output.outputs or id(output) in interface:
        transpose = gs.Node("Transpose", name=names(f"{output.name}_transpose"), attrs={"perm": list(perm)},
                            inputs=[node.outputs[0]], outputs=[output])
        position = next(index for index, candidate in enumerate(graph.nodes) if candidate is node)
        graph.nodes.insert(position + 1, transpose)


def _perm_of(node: gs.Node, rank: int) -> list[int]:
    perm = node.attrs.get("perm")
    return [int(axis) for axis in perm] if perm is not None else list(reversed(range(rank)))
