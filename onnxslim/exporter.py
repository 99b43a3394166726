"""onnx-graphsurgeon graph back to ONNX protobuf (to_model): the model's metadata, doc strings,
declared types and old-IR input listings from the template, what the importer set aside put back.
"""

from __future__ import annotations


import numpy as np
import onnx
import onnx.defs
import onnx.parser
import onnx.external_data_helper
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx, update_import_domains
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .graph import inferred_symbol, proto_bodies, proto_graphs, tensor_map
from .importer import DECLARED_TYPES, INPUT_DEFAULTS, EmptyList, copied_type, exportable_constants


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` as a ModelProto that keeps everything of `template` the graph does not hold."""
    known_value_info = _value_info_names(template.graph)
    exportable_constants(graph)
    model = _export(graph, known_value_info)
    bodies = proto_bodies(model.graph)
    for body in bodies:
        drop_disconnected_nodes(body)
        _keep_known_value_info(body, known_value_info)
    forget_inferred_symbols(model.graph)
    _restore_declared_types(model.graph, graph.__dict__.get(DECLARED_TYPES, {}))
    _restore_denotations(model.graph, template.graph)
    defaults = graph.__dict__.get(INPUT_DEFAULTS, {})
    if defaults:
        inputs = {value.name for value in model.graph.input}
        model.graph.initializer.extend(tensor for name, tensor in defaults.items() if name in inputs)
    if bodies:  # one graph has nothing to share
        _share_outer_initializers(model.graph)
    # Only the fields the template sets: an empty string written out still costs bytes.
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if template.HasField(name):
            setattr(model, name, getattr(template, name))
        else:
            model.ClearField(name)
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    if template.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    return model


def _export(graph: gs.Graph, known_value_info: set[str]) -> onnx.ModelProto:
    """onnx-graphsurgeon's export_onnx, writing the graph straight into the ModelProto (see
    ProtoWriter.graph), with value_info only for the names in `known_value_info` (see
    _keep_known_value_info).

    export_onnx builds a GraphProto and make_model copies it: two copies of every weight.
    """
    model = onnx.ModelProto()
    ProtoWriter(graph.__dict__.get(DECLARED_TYPES), known_value_info).graph(model.graph, graph)
    model.functions.extend(OnnxExporter.export_function(function) for function in graph.functions)
    model.opset_import.extend(update_import_domains(graph))
    return model


_LIST_ATTRIBUTES = {int: ("INTS", "ints"), float: ("FLOATS", "floats")}
_ONNX_TYPES: dict = {}


class ProtoWriter:
    """Writes nodes and value infos into empty protos as onnx-graphsurgeon's exporter would
    (export_node; export_value_info_proto without its type check), in place: a graph's
    node.add() is not copied again.

    The common attributes (int, float, string, non-empty lists of one of them, tensors) and
    tensor types are written directly: onnx.helper.make_attribute's checks were a large share of a
    small model's optimize time. Anything else goes through onnx-graphsurgeon. One writer serves one
    export: a tensor type it wrote before is copied from its bytes (a network's tensors share a
    few dozen shapes), faster than writing it field by field.
    """

    def __init__(self, declared: dict[str, onnx.TypeProto] | None = None, known_value_info: set[str] | None = None):
        self._types: dict[tuple, bytes] = {}
        self._declared = declared or {}  # a graph's DECLARED_TYPES: non-tensor types are written as declared
        self._known = known_value_info  # the tensors that get a value_info (None: every typed one)

    def graph(self, target: onnx.GraphProto, graph: gs.Graph) -> onnx.GraphProto:
        """Write `graph` (the main graph or a body) into the empty `target` as onnx-graphsurgeon's
        export_graph would, without the nodes passes disconnected (see drop_disconnected_nodes).
        Bodies are written by this writer too, so what it writes that onnx-graphsurgeon cannot
        (empty list attributes, constants it cannot hold) may sit at any depth."""
        target.name = graph.name or "graph"
        if graph.doc_string:
            target.doc_string = graph.doc_string
        for node in graph.nodes:
            if any(tensor.name for tensor in node.outputs):
                self.node(target.node.add(), node)
        for tensor in graph.inputs:
            self.value_info(target.input.add(), tensor)
        for tensor in graph.outputs:
            self.value_info(target.output.add(), tensor)
        tensors = tensor_map(graph)
        constants = [tensor for tensor in tensors.values() if isinstance(tensor, gs.Constant)]
        target.initializer.extend(_tensor_proto(tensor) for tensor in constants if not isinstance(tensor._values, SparseValues))
        target.sparse_initializer.extend(
            OnnxExporter.export_sparse_tensor_proto(tensor) for tensor in constants if isinstance(tensor._values, SparseValues)
        )
        interface = {tensor.name for tensor in [*graph.inputs, *graph.outputs]}
        # A body's value_info holds only what its own nodes compute: an entry for an outer-scope
        # value read there would stand for it in the body, and onnx's inference of the body then
        # fails (nothing in the body gets a shape) or uses an older, less precise type.
        produced = {tensor.name for node in graph.nodes for tensor in node.outputs}
        for name, tensor in tensors.items():
            if (
                (self._known is None or name in self._known)
                and name not in interface
                and name in produced
                and isinstance(tensor, gs.Variable)
                and (tensor.dtype is not None or tensor.shape is not None)
            ):
                self.value_info(target.value_info.add(), tensor)
        return target

    def node(self, proto: onnx.NodeProto, node: gs.Node) -> onnx.NodeProto:
        proto.op_type = node.op
        if node.name:
            proto.name = node.name
        if node.domain is not None:
            proto.domain = node.domain
        proto.input.extend([tensor.name for tensor in node.inputs])
        proto.output.extend([tensor.name for tensor in node.outputs])
        for key, value in node.attrs.items():
            if isinstance(value, gs.Graph):
                self.graph(proto.attribute.add(name=key, type=onnx.AttributeProto.GRAPH).g, value)
            elif isinstance(value, list) and value and all(isinstance(item, gs.Graph) for item in value):
                attribute = proto.attribute.add(name=key, type=onnx.AttributeProto.GRAPHS)
                for body in value:
                    self.graph(attribute.graphs.add(), body)
            elif not _add_plain_attribute(proto, key, value):
                proto.attribute.extend(OnnxExporter.export_attributes({key: value}))
        return proto

    def value_info(self, proto: onnx.ValueInfoProto, tensor: gs.Tensor) -> onnx.ValueInfoProto:
        declared = self._declared.get(tensor.name) if isinstance(tensor, gs.Variable) and tensor.type != "tensor_type" else None
        if declared is not None and declared.WhichOneof("value") not in (None, "tensor_type"):
            proto.name = tensor.name
            proto.type.CopyFrom(declared)
            return proto
        if tensor.dtype is not None and not (isinstance(tensor, gs.Constant) or tensor.type == "tensor_type"):
            proto.CopyFrom(OnnxExporter.export_value_info_proto(tensor, False))  # sequences, sparse tensors
            return proto
        proto.name = tensor.name
        if tensor.dtype is None:
            return proto
        dtype = tensor.dtype
        elem_type = _ONNX_TYPES.get(dtype)
        if elem_type is None:
            elem_type = _ONNX_TYPES[dtype] = dtype_to_onnx(dtype)
        shape = tensor.shape
        # The dims' types belong in the key: 1 == 1.0 == True, but only an int is written as a dim.
        key = (elem_type,) if shape is None else (elem_type, tuple(shape), tuple(map(type, shape)))
        written = self._types.get(key)
        if written is not None:
            proto.type.MergeFromString(written)
            return proto
        tensor_type = proto.type.tensor_type
        tensor_type.elem_type = elem_type
        if shape is not None:
            dims = tensor_type.shape
            dims.SetInParent()  # a scalar's shape has no dims but is present
            for size in shape:
                dim = dims.dim.add()
                if isinstance(size, (int, np.integer)):
                    dim.dim_value = int(size)
                elif isinstance(size, str):
                    dim.dim_param = size
        self._types[key] = proto.type.SerializeToString()
        return proto


def _add_plain_attribute(proto: onnx.NodeProto, key: str, value) -> bool:
    kind = type(value)
    if kind is int:
        attribute = proto.attribute.add(name=key, type=onnx.AttributeProto.INT)
        attribute.i = value
    elif kind is float:
        attribute = proto.attribute.add(name=key, type=onnx.AttributeProto.FLOAT)
        attribute.f = value
    elif kind is str:
        proto.attribute.add(name=key, type=onnx.AttributeProto.STRING, s=value.encode())
    elif kind in (list, tuple) and value and type(value[0]) in _LIST_ATTRIBUTES:
        item = type(value[0])
        if any(type(element) is not item for element in value):
            return False
        type_name, field = _LIST_ATTRIBUTES[item]
        attribute = proto.attribute.add(name=key, type=getattr(onnx.AttributeProto, type_name))
        getattr(attribute, field).extend(value)
    elif kind is gs.Constant:  # a Constant's or ConstantOfShape's value
        attribute = proto.attribute.add(name=key, type=onnx.AttributeProto.TENSOR)
        attribute.t.CopyFrom(_tensor_proto(value))
    elif kind is EmptyList:
        proto.attribute.add(name=key, type=value.attr_type)
    else:
        return False
    return True


def _tensor_proto(tensor: gs.Constant) -> onnx.TensorProto:
    """The initializer for `tensor`. onnx-graphsurgeon exports a weight still held by the source
    model by writing the tensor's name into the source's TensorProto; a renamed one is
    exported as a renamed copy, so the source model is left as it was."""
    if isinstance(tensor._values, LazyValues) and tensor._values.tensor.name != tensor.name:
        renamed = onnx.TensorProto()
        renamed.CopyFrom(tensor._values.tensor)
        renamed.name = tensor.name
        return renamed
    return OnnxExporter.export_tensor_proto(tensor)


def drop_disconnected_nodes(graph: onnx.GraphProto) -> None:
    """Nodes a pass disconnected (no outputs) wait in the graph for dead-node elimination;
    every ONNX op has an output, so in a file they would be invalid."""
    kept = [node for node in graph.node if any(node.output)]
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    for body in proto_bodies(graph):
        drop_disconnected_nodes(body)


def _share_outer_initializers(graph: onnx.GraphProto) -> None:
    """Keep one copy of each initializer, in the innermost graph enclosing every graph that holds it.

    onnx-graphsurgeon writes a constant into every graph whose nodes read it, so a weight that
    If/Loop bodies read from the outer scope comes out once per body. Only equal copies are
    merged: sibling bodies may each hold a different tensor under the same name.
    """
    graphs, parents = [graph], [None]
    for index, current in enumerate(graphs):  # grows while it is walked: breadth first
        for body in proto_bodies(current):
            graphs.append(body)
            parents.append(index)
    holders: dict[str, list[int]] = {}
    for index, current in enumerate(graphs):
        for tensor in current.initializer:
            holders.setdefault(tensor.name, []).append(index)
    for name, indices in holders.items():
        if len(indices) < 2:
            continue
        copies = [next(tensor for tensor in graphs[index].initializer if tensor.name == name) for index in indices]
        if any(duplicate.SerializeToString() != copies[0].SerializeToString() for duplicate in copies[1:]):
            continue
        target = _enclosing(indices, parents)
        kept = onnx.TensorProto()
        kept.CopyFrom(copies[0])
        for index, duplicate in zip(indices, copies):
            if index != target:
                graphs[index].initializer.remove(duplicate)
        if target not in indices:
            graphs[target].initializer.append(kept)


def _enclosing(indices: list[int], parents: list[int | None]) -> int:
    """The innermost graph that is, or encloses, every graph in `indices`."""

    def chain(index: int | None) -> list[int]:
        path = []
        while index is not None:
            path.append(index)
            index = parents[index]
        return path

    common = set(chain(indices[0]))
    for index in indices[1:]:
        common &= set(chain(index))
    return next(index for index in chain(indices[0]) if index in common)


def _restore_declared_types(graph: onnx.GraphProto, declared: dict[str, onnx.TypeProto]) -> None:
    """Write back what onnx-graphsurgeon cannot hold (see DECLARED_TYPES): non-tensor types as
    they were declared, and the main graph's outputs as declared (the model's interface), with
    a dynamic dim that inference found static filled in, as the graph has it."""
    for output in graph.output:
        kind = declared.get(output.name)
        if kind is not None:
            output.type.CopyFrom(_refined(kind, output.type))
    for body in proto_graphs(graph):
        for value in (*body.input, *body.output, *body.value_info):
            kind = declared.get(value.name)
            if kind is not None and kind.WhichOneof("value") not in (None, "tensor_type"):
                value.type.CopyFrom(kind)


def _restore_denotations(graph: onnx.GraphProto, template: onnx.GraphProto) -> None:
    """Write back the denotations of the main graph's tensor inputs (a type's and its dims'),
    which onnx-graphsurgeon does not hold: they are part of the model's interface."""
    declared = {value.name: value.type for value in template.input}
    for value in graph.input:
        kind = declared.get(value.name)
        if kind is None or kind.WhichOneof("value") != "tensor_type" or value.type.WhichOneof("value") != "tensor_type":
            continue
        if kind.denotation:
            value.type.denotation = kind.denotation
        dims, written = kind.tensor_type.shape.dim, value.type.tensor_type.shape.dim
        if len(dims) == len(written):
            for dim, written_dim in zip(dims, written):
                if dim.denotation:
                    written_dim.denotation = dim.denotation


def _refined(declared: onnx.TypeProto, computed: onnx.TypeProto) -> onnx.TypeProto:
    if declared.WhichOneof("value") != "tensor_type" or computed.WhichOneof("value") != "tensor_type":
        return declared
    refined = copied_type(declared)
    if not computed.tensor_type.HasField("shape"):
        return refined
    if not refined.tensor_type.HasField("shape"):
        refined.tensor_type.shape.CopyFrom(computed.tensor_type.shape)
        return refined
    dims, known = refined.tensor_type.shape.dim, computed.tensor_type.shape.dim
    if len(dims) == len(known):
        for dim, found in zip(dims, known):
            if not dim.HasField("dim_value") and found.HasField("dim_value") and found.dim_value > 0:
                dim.dim_value = found.dim_value
    return refined


def _value_info_names(graph: onnx.GraphProto) -> set[str]:
    return {value.name for body in proto_graphs(graph) for value in body.value_info}


def _keep_known_value_info(graph: onnx.GraphProto, known: set[str]) -> None:
    """Drop value_info the input model did not have: annotations from shape inference are
    optional, and writing them for every tensor would make the output larger than the input."""
    kept = [value for value in graph.value_info if value.name in known]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for body in proto_bodies(graph):
        _keep_known_value_info(body, known)


def forget_inferred_symbols(graph: onnx.GraphProto, outputs: bool = False) -> None:
    """Write the dims onnx's shape inference named itself (`unk__7`) as unnamed: in value_info,
    in bodies' outputs, and in the graph's own outputs if `outputs`. Inputs keep theirs (declared).

    Such a name holds only within the inference that gave it (see onnxslim.graph.inferred_symbol).
    A model written with them would not be a fixed point: a shape is refined over the passes,
    so its names come from several inferences, and a second run, which infers them from the
    final graph, names them otherwise. Handed back to inference, they would stand in for what
    it could now find (onnx keeps a named dim it is given over the one it computes).
    """
    values = [*graph.value_info, *graph.output] if outputs else [*graph.value_info]
    for value in values:
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param and inferred_symbol(dim.dim_param):
                    dim.ClearField("dim_param")
    for body in proto_bodies(graph):
        forget_inferred_symbols(body, outputs=True)


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR version 3 requires every initializer to be listed as a graph input too."""
    listed = {value.name for value in graph.input}
    for tensor in graph.initializer:
        if tensor.name not in listed:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
