"""ONNX protobuf to onnx-graphsurgeon graph (to_graph), keeping on the graph what it does not
model (input defaults, declared non-tensor types, attributes it would drop) for the way back
(onnxslim.exporter).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.defs
import onnx.parser
import onnx.external_data_helper
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter, get_numpy_type
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.logger import G_LOGGER
from onnx_graphsurgeon.util.misc import SynchronizedList

from .graph import ONNX_DOMAINS, proto_graphs, tensor_map, walk


# What the graph does not model, kept on the gs.Graph for export (see to_graph and to_model).
# Initializers that are also graph inputs (IR >= 4): defaults the caller may override, so the
# graph holds them as inputs (variables no pass can fold) and export writes the default back.
INPUT_DEFAULTS = "_onnxslim_input_defaults"
# The main graph's declared output types, and every non-tensor type (sequence, map, optional,
# sparse tensor) of any graph: onnx-graphsurgeon models tensor types only.
DECLARED_TYPES = "_onnxslim_declared_types"


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import `model` as an onnx-graphsurgeon graph (subgraphs included).

    onnx-graphsurgeon silently drops `sparse_value` attributes, which would leave Constant nodes
    without a value; such nodes are imported with their dense value instead (same result).

    Only the graph inputs keep their declared shapes: every other tensor's shape is left for
    shape inference to compute from the graph. A value_info or an output declaration is a claim
    the runtime does not enforce (onnxruntime warns and goes on), and a pass that folded a wrong
    one (an `[N,4]` tensor declared `[1,4]`) would bake it into the model. Declared element types
    stay: onnxruntime refuses a model whose declared and computed types differ.
    """
    defaults = overridable_defaults(model)
    binary = _binary_strings(model)
    if any(_sparse_constants(model.graph)) or (defaults and model.functions) or binary:
        model = copy.deepcopy(model)
        if binary:
            _encode_binary_strings(model)
        for node in _sparse_constants(model.graph):
            attribute = next(attribute for attribute in node.attribute if attribute.name == "sparse_value")
            dense = onnx.numpy_helper.from_array(_dense(attribute.sparse_tensor), node.output[0])
            node.attribute.remove(attribute)
            node.attribute.append(onnx.helper.make_attribute("value", dense))
        if model.functions:
            kept = [tensor for tensor in model.graph.initializer if tensor.name not in defaults]
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept)
    severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR  # its warnings about skipped attributes
    try:
        graph = gs.import_onnx(model) if model.functions else _import(model, set(defaults))
    finally:
        G_LOGGER.severity = severity
    _restore_skipped_attributes(graph, model, binary)  # which this restores
    _settle_constants(graph)
    graph.__dict__[INPUT_DEFAULTS] = defaults
    graph.__dict__[DECLARED_TYPES] = _declared_types(model.graph)
    _keep_input_shapes_only(graph, model.graph)
    return graph


def overridable_defaults(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The initializers that are also graph inputs, by name, where the input may be fed (IR >= 4;
    IR 3 lists every initializer as an input, and they are constants)."""
    if model.ir_version < 4 or not model.graph.input:
        return {}
    listed = {value.name for value in model.graph.input}
    return {tensor.name: tensor for tensor in model.graph.initializer if tensor.name in listed}


def _declared_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    declared = {value.name: value.type for value in graph.output}
    for body in proto_graphs(graph):
        for value in (*body.input, *body.output, *body.value_info):
            if value.type.WhichOneof("value") not in (None, "tensor_type"):
                declared[value.name] = value.type
    return {name: copied_type(kind) for name, kind in declared.items()}


def copied_type(kind: onnx.TypeProto) -> onnx.TypeProto:
    held = onnx.TypeProto()
    held.CopyFrom(kind)
    return held


def _keep_input_shapes_only(graph: gs.Graph, source: onnx.GraphProto) -> None:
    """Forget every declared shape but the graph inputs' (see to_graph); a body's inputs keep
    theirs too (Loop and Scan bodies declare what they are given)."""
    declared = {value.name: value for value in source.input}
    kept: set[int] = set()
    for tensor in graph.inputs:
        kept.add(id(tensor))
        value = declared.get(tensor.name)
        if isinstance(tensor, gs.Variable) and value is not None and value.type.HasField("tensor_type"):
            # A value_info of the same name must not stand in for the input's own declaration.
            read = _read_tensor_type(value.type.tensor_type)
            if read is not None:
                tensor.shape = None if read[1] is None else list(read[1])
    for body in walk(graph):
        if body is not graph:
            kept.update(id(tensor) for tensor in body.inputs)
    for body in walk(graph):
        for tensor in tensor_map(body).values():
            if isinstance(tensor, gs.Variable) and id(tensor) not in kept:
                tensor.shape = None


def _import(model: onnx.ModelProto, overridable: set[str] = frozenset()) -> gs.Graph:
    """gs.import_onnx for a model without functions: the same Graph, with the common cases (tensors,
    nodes, tensor value infos, plain and tensor attributes) built directly. onnx-graphsurgeon's
    importer logs and converts through generic helpers for every tensor and node, a large share of
    a small model's optimize time. Bodies and unusual attributes go through onnx-graphsurgeon's own code."""
    source = model.graph
    opset = OnnxImporter.get_opset(model)
    tensors: dict[str, gs.Tensor] = {}
    types: dict[bytes, tuple | None] = {}  # see _import_value
    for initializer in source.initializer:
        if initializer.name not in tensors and initializer.name not in overridable:
            tensors[initializer.name] = _import_constant(initializer)
    for sparse in source.sparse_initializer:
        if sparse.values.name not in tensors:
            tensors[sparse.values.name] = OnnxImporter.import_tensor(sparse)
    for value in source.value_info:
        known = tensors.get(value.name)
        if known is None:
            tensors[value.name] = _import_value(value, types)
        elif isinstance(known, gs.Variable):  # as onnx-graphsurgeon: fill in what is missing
            imported = _import_value(value, types)
            known.dtype = known.dtype or imported.dtype
            known.shape = known.shape or imported.shape
    initializer_names = {tensor.name for tensor in source.initializer if tensor.name not in overridable} | {
        tensor.values.name for tensor in source.sparse_initializer
    }

    def interface(value: onnx.ValueInfoProto) -> gs.Tensor:
        if value.name not in tensors:
            tensors[value.name] = _import_value(value, types)
        return tensors[value.name]

    inputs = [interface(value) for value in source.input if value.name not in initializer_names]
    outputs = [interface(value) for value in source.output]

    def tensor(name: str) -> gs.Tensor:
        found = tensors.get(name)
        if found is None:
            if not name:
                return _new_variable("")  # an omitted optional tensor: a new one at each use
            found = tensors[name] = _new_variable(name)
        return found

    nodes = []
    owns_body = False
    for proto in source.node:
        attrs = {}
        for attribute in proto.attribute:
            value = _plain_attribute(attribute)
            if value is _NOT_PLAIN:
                value = OnnxImporter.import_attributes([attribute], {}, tensors, opset, model.opset_import)
                if attribute.name not in value:
                    continue  # onnx-graphsurgeon skips (and warns about) attribute types it does not know
                value = value[attribute.name]
                owns_body |= isinstance(value, gs.Graph)
            attrs[attribute.name] = value
        nodes.append(_new_node(
            proto.op_type,
            proto.name,
            attrs,
            [tensor(name) for name in proto.input],
            [tensor(name) for name in proto.output],
            proto.domain if proto.HasField("domain") else None,
        ))
    # gs.Graph() walks every node for bodies, to merge their function lists into its own; with no
    # functions and no bodies there is nothing to merge, so the nodes are given afterwards.
    graph = gs.Graph(
        nodes=nodes if owns_body else [], inputs=inputs, outputs=outputs, name=source.name,
        doc_string=source.doc_string, producer_name=model.producer_name, producer_version=model.producer_version,
        opset=opset, import_domains=model.opset_import, functions=[], ir_version=model.ir_version,
    )
    graph.nodes = nodes
    return graph


_NOT_PLAIN = object()
# Attribute types onnx-graphsurgeon's importer skips with a warning (Optional's `type`, and
# whatever a custom op carries): the node would lose them silently. They are held as the protos
# they are, which onnx.helper.make_attribute writes back as they were.
_SKIPPED_ATTRIBUTES = {
    onnx.AttributeProto.TYPE_PROTO: lambda attribute: copied_type(attribute.tp),
    onnx.AttributeProto.TYPE_PROTOS: lambda attribute: [copied_type(kind) for kind in attribute.type_protos],
    onnx.AttributeProto.SPARSE_TENSOR: lambda attribute: copy.deepcopy(attribute.sparse_tensor),
    onnx.AttributeProto.SPARSE_TENSORS: lambda attribute: [copy.deepcopy(item) for item in attribute.sparse_tensors],
    onnx.AttributeProto.TENSORS: lambda attribute: [copy.deepcopy(item) for item in attribute.tensors],
    onnx.AttributeProto.GRAPHS: lambda attribute: [copy.deepcopy(item) for item in attribute.graphs],
}


def _text(value: bytes) -> str | bytes:
    """A string attribute as onnx-graphsurgeon reads it; bytes that are not UTF-8 (a custom op's
    binary blob) stay bytes, which are written back as they were."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


_PLAIN_ATTRIBUTES = {
    onnx.AttributeProto.INT: lambda attribute: attribute.i,
    onnx.AttributeProto.FLOAT: lambda attribute: attribute.f,
    onnx.AttributeProto.STRING: lambda attribute: _text(attribute.s),
    onnx.AttributeProto.INTS: lambda attribute: list(attribute.ints) or EmptyList(attribute.type),
    onnx.AttributeProto.FLOATS: lambda attribute: list(attribute.floats) or EmptyList(attribute.type),
    onnx.AttributeProto.STRINGS: lambda attribute: [_text(item) for item in attribute.strings] or EmptyList(attribute.type),
    onnx.AttributeProto.TENSOR: lambda attribute: _import_constant(attribute.t),
    **{kind: lambda attribute, read=read: read(attribute) for kind, read in _SKIPPED_ATTRIBUTES.items() if kind != onnx.AttributeProto.GRAPHS},
}


def _plain_attribute(attribute: onnx.AttributeProto):
    """The value onnx-graphsurgeon would import for a plain attribute, else _NOT_PLAIN."""
    read = _PLAIN_ATTRIBUTES.get(attribute.type)
    if read is None or attribute.ref_attr_name:
        return _NOT_PLAIN
    return read(attribute)


_NUMPY_TYPES: dict[int, object] = {}


def _numpy_type(elem_type: int):
    """get_numpy_type(elem_type), remembered: None for a type numpy lacks."""
    dtype = _NUMPY_TYPES.get(elem_type)
    if dtype is None:
        dtype = get_numpy_type(elem_type)
        if dtype is not None:
            _NUMPY_TYPES[elem_type] = dtype
    return dtype


def _import_value(value: onnx.ValueInfoProto, types: dict[bytes, tuple | None]) -> gs.Variable:
    """OnnxImporter.import_tensor for a ValueInfoProto, tensor types read directly. `types` holds
    the types read so far by their bytes: a network's tensors share a few dozen."""
    if value.type.WhichOneof("value") != "tensor_type":
        return OnnxImporter.import_tensor(value)
    key = value.type.SerializeToString()
    if key not in types:
        types[key] = _read_tensor_type(value.type.tensor_type)
    if types[key] is None:  # a type numpy lacks: onnx-graphsurgeon's way (it keeps the ONNX enum)
        return OnnxImporter.import_tensor(value)
    dtype, shape = types[key]
    return _new_variable(value.name, dtype, None if shape is None else list(shape))


def _read_tensor_type(tensor_type: onnx.TypeProto.Tensor) -> tuple | None:
    """(numpy dtype, dims or None) as onnx-graphsurgeon reads them; None for a type neither numpy
    nor ml_dtypes has. bfloat16 and float8 tensors are typed with ml_dtypes' types, which passes
    can ask numpy about (onnx-graphsurgeon would keep the ONNX enum, which numpy cannot read)."""
    dtype = _numpy_type(tensor_type.elem_type)
    if dtype is None:
        dtype = _extended_type(tensor_type.elem_type)
    if dtype is None:
        return None
    if not tensor_type.HasField("shape"):
        return dtype, None
    shape = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        elif dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            shape.append(None)
    return dtype, tuple(shape)


@functools.cache
def _extended_type(elem_type: int) -> np.dtype | None:
    if elem_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def _import_constant(proto: onnx.TensorProto) -> gs.Constant:
    """OnnxImporter.import_tensor for a TensorProto, for element types numpy or ml_dtypes has
    (bfloat16, float8, int4...: onnx-graphsurgeon would keep the ONNX enum as the dtype, which
    no pass can hand to numpy)."""
    dtype = _numpy_type(proto.data_type) or _extended_type(proto.data_type)
    if dtype is None:
        return OnnxImporter.import_tensor(proto)
    values = object.__new__(LazyValues)
    values.__dict__.update(tensor=proto, shape=proto.dims, dtype=dtype, nbytes=math.prod(proto.dims) * dtype.itemsize)
    tensor = object.__new__(gs.Constant)
    tensor.__dict__.update(
        name=proto.name,
        inputs=_synchronized(tensor, "outputs"),
        outputs=_synchronized(tensor, "inputs"),
        _values=values,
        data_location=int(proto.data_location) if proto.HasField("data_location") else None,
        _export_dtype=None,
    )
    return tensor


# onnx-graphsurgeon's constructors set every field through __setattr__ overrides and fill the
# edge lists through SynchronizedList's Python methods; import builds thousands of objects, and
# that was most of its time. These fill in the same fields, in the same order, directly.


def _synchronized(owner, field_name: str) -> SynchronizedList:
    """SynchronizedList(owner, field_name, initial=[])."""
    items = SynchronizedList.__new__(SynchronizedList)
    items.parent_obj = owner
    items.field_name = field_name
    return items


def _new_variable(name: str, dtype=None, shape=None) -> gs.Variable:
    """gs.Variable(name, dtype, shape)."""
    tensor = object.__new__(gs.Variable)
    tensor.__dict__.update(
        name=name,
        inputs=_synchronized(tensor, "outputs"),
        outputs=_synchronized(tensor, "inputs"),
        dtype=dtype,
        shape=shape,
        type="tensor_type",
    )
    return tensor


def _new_node(op: str, name: str, attrs: dict, inputs: list, outputs: list, domain: str | None) -> gs.Node:
    """gs.Node(op, name, attrs, inputs, outputs, domain): each tensor lists the node as a reader or writer."""
    node = object.__new__(gs.Node)
    reads, writes = _synchronized(node, "outputs"), _synchronized(node, "inputs")
    list.extend(reads, inputs)
    list.extend(writes, outputs)
    node.__dict__.update(op=op, name=name, attrs=attrs, inputs=reads, outputs=writes, domain=domain)
    for tensor in inputs:
        list.append(tensor.outputs, node)
    for tensor in outputs:
        list.append(tensor.inputs, node)
    return node


def _restore_skipped_attributes(graph: gs.Graph, model: onnx.ModelProto, binary: bool = False) -> None:
    """Give back the attributes onnx-graphsurgeon skipped (see _SKIPPED_ATTRIBUTES), and with
    `binary` the bytes of strings that are not UTF-8 (see _encode_binary_strings), in the main
    graph, its bodies and the model's functions: import makes one node per NodeProto, in order."""
    pairs = [(graph.nodes, model.graph.node)]
    pairs += [(function.nodes, proto.node) for function, proto in zip(graph.functions, model.functions)]
    while pairs:
        nodes, protos = pairs.pop()
        if len(nodes) != len(protos):
            continue
        for node, proto in zip(nodes, protos):
            for attribute in proto.attribute:
                held = node.attrs.get(attribute.name)
                if binary and isinstance(held, (str, list)):
                    node.attrs[attribute.name] = _decoded(held)
                if attribute.type == onnx.AttributeProto.GRAPH and isinstance(held, gs.Graph):
                    pairs.append((held.nodes, attribute.g.node))
                elif attribute.ref_attr_name:
                    continue
                elif attribute.type in _SKIPPED_ATTRIBUTES and held is None:
                    node.attrs[attribute.name] = _SKIPPED_ATTRIBUTES[attribute.type](attribute)
                elif type(held) is list and not held:
                    node.attrs[attribute.name] = EmptyList(attribute.type)


def _model_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for body in proto_graphs(model.graph):
        yield from body.node
    for function in model.functions:
        yield from function.node


def _binary_strings(model: onnx.ModelProto) -> bool:
    """Whether a string attribute somewhere is not UTF-8 (onnx-graphsurgeon's importer would raise)."""
    for node in _model_nodes(model):
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.STRING and isinstance(_text(attribute.s), bytes):
                return True
            if attribute.type == onnx.AttributeProto.STRINGS and any(isinstance(_text(item), bytes) for item in attribute.strings):
                return True
    return False


# onnx-graphsurgeon decodes every string attribute as UTF-8: one that is not (a custom op's
# binary blob) is given to it as this prefix and its bytes in hex, and read back as the bytes.
_BINARY = "\x00onnxslim-binary:"


def _encode_binary_strings(model: onnx.ModelProto) -> None:
    """Write the string attributes that are not UTF-8 as _BINARY text, in place."""
    def encoded(item: bytes) -> bytes:
        return item if isinstance(_text(item), str) else (_BINARY + item.hex()).encode()

    for node in _model_nodes(model):
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.STRING:
                attribute.s = encoded(attribute.s)
            elif attribute.type == onnx.AttributeProto.STRINGS:
                items = [encoded(item) for item in attribute.strings]
                del attribute.strings[:]
                attribute.strings.extend(items)


def _decoded(value):
    """An attribute value as it was before _encode_binary_strings."""
    if isinstance(value, str) and value.startswith(_BINARY):
        return bytes.fromhex(value[len(_BINARY):])
    if isinstance(value, list) and any(isinstance(item, str) and item.startswith(_BINARY) for item in value):
        return [_decoded(item) for item in value]
    return value


class _SparseValues(SparseValues):
    """A sparse initializer's values. onnx-graphsurgeon's reader ignores raw_data and makes every
    value float64, so a pass folding a sparse weight folded zeros of the wrong type."""

    def load(self):
        return _dense(self.tensor)


def _every_constant(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every constant of the graph and its bodies: initializers and node attribute values."""
    for body in walk(graph):
        for tensor in tensor_map(body).values():
            if isinstance(tensor, gs.Constant):
                yield tensor
        for node in body.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Constant):
                    yield value


def _settle_constants(graph: gs.Graph) -> None:
    """Constants and tensors onnx-graphsurgeon's own importer made (bodies, functions, sparse
    initializers) made like _import's: a sparse initializer reads its values right, and a type
    numpy lacks but ml_dtypes has (bfloat16, float8, int4) is that type, not the ONNX enum."""
    for constant in _every_constant(graph):
        values = constant._values
        if type(values) is SparseValues:
            settled = object.__new__(_SparseValues)
            settled.__dict__.update(values.__dict__)
            constant._values = values = settled
        if isinstance(values, LazyValues) and isinstance(values.dtype, (int, np.integer)):
            values.dtype = _extended_type(int(values.dtype)) or values.dtype
    for body in walk(graph):
        for tensor in tensor_map(body).values():
            if isinstance(tensor, gs.Variable) and tensor.type == "tensor_type" and isinstance(tensor.dtype, (int, np.integer)):
                tensor.dtype = _extended_type(int(tensor.dtype)) or tensor.dtype


def exportable_constants(graph: gs.Graph) -> None:
    """Hold every constant onnx-graphsurgeon cannot write from a numpy array as a TensorProto,
    in place: strings (it writes raw data, which a string tensor cannot have) and ml_dtypes'
    types (int4, float4 and int2 pack several values per byte). A pass may fold such a value."""
    for constant in _every_constant(graph):
        values = constant._values
        if isinstance(values, np.ndarray) and (values.dtype.kind in "OUS" or _is_extended(values.dtype)):
            proto = onnx.numpy_helper.from_array(values.astype(object) if values.dtype.kind in "US" else values, constant.name)
            held = LazyValues(proto)
            held.dtype = values.dtype if values.dtype.kind not in "US" else np.dtype(object)
            constant._values = held


def _is_extended(dtype: np.dtype) -> bool:
    return type(dtype.type).__module__.startswith("ml_dtypes") or dtype.type.__module__.startswith("ml_dtypes")


def _sparse_constants(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    found = []
    for body in proto_graphs(graph):
        for node in body.node:
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
                found += [node for attribute in node.attribute if attribute.name == "sparse_value"]
    return found


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a sparse tensor: indices are [NNZ] linear or [NNZ, rank] coordinates."""
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


class EmptyList(list):
    """An empty list attribute, which remembers its type (INTS, FLOATS, STRINGS...): onnx cannot
    write an empty list without being told, and a node of a custom domain may carry one."""

    def __init__(self, attr_type: int):
        super().__init__()
        self.attr_type = attr_type
