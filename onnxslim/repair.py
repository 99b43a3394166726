"""Repairs at load: what onnx.checker refuses in a model onnxruntime runs, where the fix cannot
change what the model computes.

onnx.checker is stricter than onnxruntime: it wants nodes in topological order, a named graph,
one copy of each initializer, one value per metadata key, an opset import for every domain a
node uses, and a shape on every input and output of the main graph. onnxruntime sorts, names,
dedupes and assumes on its own. A model that runs there is the user's model: refusing it
helps nobody, and writing it back with the same defect would give an invalid result. So the
defects with one meaning are repaired on load, each with a note; the ambiguous ones (two
different values under one name, an input of unknown rank) are refused in one line that says
how to fix the model. The input file is never touched: repairs work on the loaded proto.
"""

from __future__ import annotations

import copy
import functools
import heapq
import math
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference

from .errors import ModelLoadError
from .graph import BODY_OPS, ONNX_DOMAINS, proto_graphs, proto_node_bodies

GRAPH_NAME = "graph"  # what the exporter names a graph without a name, too


def structure_repaired(model: onnx.ModelProto, *, own: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with its repairable defects fixed, and one note per repair. `own`: the proto may be
    repaired in place (it was read from a file); otherwise a model that needs a repair is copied
    first, and the caller's proto is left as it was.

    Raises ModelLoadError with one line for a defect that has no single repair.
    """
    return _applied(model, _structure_fixes(model), own)


def interface_repaired(model: onnx.ModelProto, ranks: dict[str, int], *,
                       own: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with every main-graph input and output given the shape onnx.checker requires of a
    model it is to write: an input's rank comes from `ranks` (input name -> the rank of the dims
    the user gave), an output's type from shape inference. Reading or checking a model needs no
    such shapes; writing one does. `own` as for structure_repaired.

    Raises ModelLoadError with one line for an input or output whose shape is not ours to guess.
    """
    return _applied(model, _interface_fixes(model, ranks), own)


def _applied(model: onnx.ModelProto, fixes: list, own: bool) -> tuple[onnx.ModelProto, list[str]]:
    notes: list[str] = []
    if not fixes:
        return model, notes
    if not own:
        model = copy.deepcopy(model)
    for fix in fixes:
        fix(model, notes)
    return model, notes


def _structure_fixes(model: onnx.ModelProto) -> list:
    """The repairs `model` needs, as functions (model, notes) -> None; each finding is cheap and
    reads no weight bytes, so a valid model costs one walk over its nodes and tensor headers."""
    fixes = []
    graph = model.graph
    if not graph.name:
        fixes.append(_name_graph)
    if _unsorted(graph):
        order = _topological_order(graph)  # raises for a cycle or an undefined name
        fixes.append(lambda model, notes: _sort(model, order, notes))
    if _missing_domains(model):
        fixes.append(_import_missing_domains)
    names = [tensor.name for tensor in graph.initializer]
    if len(set(names)) != len(names) or "" in names:
        _check_duplicate_initializers(graph)
        fixes.append(_dedupe_initializers)
    if _twice_held(model):
        fixes.append(_drop_typed_copies)
    keys = [entry.key for entry in model.metadata_props]
    if len(set(keys)) != len(keys):
        fixes.append(_dedupe_metadata)
    return fixes


def _invalid(message: str) -> ModelLoadError:
    return ModelLoadError(f"invalid ONNX model: {message}")


def _name_graph(model: onnx.ModelProto, notes: list[str]) -> None:
    model.graph.name = GRAPH_NAME
    notes.append(f"the model's graph had no name (onnx.checker requires one): named '{GRAPH_NAME}'")


def _unsorted(graph: onnx.GraphProto) -> bool:
    """Whether a node of the main graph reads a name (its bodies included) not defined before it."""
    known = _defined(graph)
    for node in graph.node:
        for name in node.input:
            if name not in known:
                return True
        # Only these hold bodies; asking every node for its attributes costs more than the rest.
        if (node.op_type in BODY_OPS or node.domain not in ONNX_DOMAINS) and not _reads(node) <= known:
            return True
        known.update(node.output)
    return False


def _defined(graph: onnx.GraphProto) -> set[str]:
    known = {""}  # an omitted optional input
    known.update(value.name for value in graph.input)
    known.update(tensor.name for tensor in graph.initializer)
    known.update(sparse.values.name for sparse in graph.sparse_initializer)
    return known


def _reads(node: onnx.NodeProto) -> set[str]:
    """The names a node reads: its inputs and the outer-scope names its bodies read."""
    names = set(node.input)
    for body in proto_node_bodies(node):
        names |= _free_names(body)
    return names


def _free_names(body: onnx.GraphProto) -> set[str]:
    """The names a body reads from its enclosing scopes."""
    defined = _defined(body)
    free = set()
    for node in body.node:
        free |= _reads(node) - defined
        defined.update(node.output)
    return free


def _topological_order(graph: onnx.GraphProto) -> list[int]:
    """The nodes' indices in an order where every node comes after what it reads, as close to
    the file's order as that allows (a ready node with the lowest index goes first)."""
    known = _defined(graph)
    producers: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producers.setdefault(name, index)
    waiting = [0] * len(graph.node)
    readers: list[list[int]] = [[] for _ in graph.node]
    for index, node in enumerate(graph.node):
        for name in sorted(_reads(node)):
            if name in known:
                continue
            if name not in producers:
                raise _invalid(f"node {_node_text(node)} reads '{name}', which no node, graph input or "
                                     "initializer defines")
            readers[producers[name]].append(index)
            waiting[index] += 1
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers[index]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(graph.node):
        stuck = [_node_text(graph.node[index]) for index, count in enumerate(waiting) if count][:3]
        raise _invalid(f"the graph has a cycle: nodes {', '.join(stuck)} wait on each other's outputs")
    return order


def _node_text(node: onnx.NodeProto) -> str:
    return f"'{node.name}' ({node.op_type})" if node.name else f"{node.op_type} -> '{node.output[0] if node.output else ''}'"


def _sort(model: onnx.ModelProto, order: list[int], notes: list[str]) -> None:
    nodes = model.graph.node
    moved = sum(1 for position, index in enumerate(order) if position != index)
    sorted_nodes = [onnx.NodeProto() for _ in order]
    for node, index in zip(sorted_nodes, order):
        node.CopyFrom(nodes[index])
    del nodes[:]
    nodes.extend(sorted_nodes)
    notes.append(f"the model's nodes were not in topological order (onnx.checker requires it): "
                 f"sorted, {moved} of {len(nodes)} nodes moved")


def _used_domains(model: onnx.ModelProto) -> list[str]:
    found: dict[str, None] = {}
    for body in proto_graphs(model.graph):
        for node in body.node:
            found.setdefault(node.domain, None)
    return list(found)


def _missing_domains(model: onnx.ModelProto) -> list[str]:
    imported = {entry.domain for entry in model.opset_import}
    if imported & set(ONNX_DOMAINS):
        imported |= set(ONNX_DOMAINS)
    local = {function.domain for function in model.functions}
    return [domain for domain in _used_domains(model) if domain not in imported and domain not in local]


def _import_missing_domains(model: onnx.ModelProto, notes: list[str]) -> None:
    """onnxruntime imports a domain a node uses but the model does not, at the latest version it
    registers; the same import makes the model say what onnxruntime runs."""
    for domain in _missing_domains(model):
        version = _runtime_versions().get(domain)
        shown = domain or "ai.onnx"
        if domain in ONNX_DOMAINS or version is None:
            # onnxruntime refuses these too: which ONNX opset a model means is not ours to guess.
            raise _invalid(f"nodes of domain '{shown}' are used, but the model imports no opset of it: "
                                 "add the opset the model was written for to its opset_import")
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
        notes.append(f"the model uses domain '{domain}' without importing it (onnx.checker requires an import): "
                     f"imported at version {version}, the one onnxruntime assumes")


@functools.cache
def _runtime_versions() -> dict[str, int]:
    """The newest opset onnxruntime registers an op at, per domain."""
    from onnxruntime.capi import _pybind_state  # onnxruntime's schema list has no public name

    versions: dict[str, int] = {}
    for schema in _pybind_state.get_all_operator_schema():
        versions[schema.domain] = max(versions.get(schema.domain, 0), schema.since_version)
    return versions


def _check_duplicate_initializers(graph: onnx.GraphProto) -> None:
    """Copies under one name must be equal: onnxruntime takes the last, other tools the first."""
    seen: dict[str, onnx.TensorProto] = {}
    for tensor in graph.initializer:
        first = seen.setdefault(tensor.name, tensor)
        if first is not tensor and tensor.name and first.SerializeToString() != tensor.SerializeToString():
            raise _invalid(f"initializer '{tensor.name}' is defined more than once with different values "
                                 "(onnxruntime takes the last copy, other tools the first): keep the right one")


def _dedupe_initializers(model: onnx.ModelProto, notes: list[str]) -> None:
    initializers = model.graph.initializer
    dropped, seen, copies, unnamed = [], set(), 0, 0
    for index, tensor in enumerate(initializers):
        if not tensor.name:
            unnamed += 1  # no node can read a tensor without a name
        elif tensor.name in seen:
            copies += 1
        else:
            seen.add(tensor.name)
            continue
        dropped.append(index)
    for index in reversed(dropped):  # deleting in place copies no weight
        del initializers[index]
    if copies:
        notes.append(f"{copies} initializer(s) were identical copies of another under the same name "
                     "(onnx.checker requires unique names): dropped")
    if unnamed:
        notes.append(f"{unnamed} initializer(s) had no name, so no node could read them "
                     "(onnx.checker requires a name): dropped")


# A tensor's typed value fields, by the element types that use them (onnx.checker allows one value field).
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers and tensor attributes, bodies and functions included."""
    yield from model.graph.initializer
    nodes = [node for body in proto_graphs(model.graph) for node in body.node]
    nodes += [node for function in model.functions for node in function.node]
    for node in nodes:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.TENSORS:
                yield from attribute.tensors
    for body in proto_graphs(model.graph):
        if body is not model.graph:
            yield from body.initializer


def _twice_held(model: onnx.ModelProto) -> bool:
    return any(tensor.HasField("raw_data") and any(len(getattr(tensor, field)) for field in _TYPED_FIELDS)
               for tensor in _all_tensors(model))


def _drop_typed_copies(model: onnx.ModelProto, notes: list[str]) -> None:
    """A tensor holding its values in raw_data and a typed field: onnxruntime reads raw_data.
    Where both hold the same values the typed copy goes; where they differ it is not ours to pick."""
    names = []
    for tensor in _all_tensors(model):
        fields = [field for field in _TYPED_FIELDS if len(getattr(tensor, field))]
        if not tensor.HasField("raw_data") or not fields:
            continue
        typed = onnx.TensorProto()
        typed.CopyFrom(tensor)
        typed.ClearField("raw_data")
        raw = onnx.TensorProto()
        raw.CopyFrom(tensor)
        for field in fields:
            raw.ClearField(field)
        try:
            same = np.array_equal(onnx.numpy_helper.to_array(raw), onnx.numpy_helper.to_array(typed), equal_nan=True)
        except (ValueError, TypeError):  # a count that does not match the dims
            same = False
        if not same:
            raise _invalid(f"tensor '{tensor.name}' holds its values twice, in raw_data and in {fields[0]}, "
                                 "and they differ (onnxruntime reads raw_data): keep one of them")
        for field in fields:
            tensor.ClearField(field)
        names.append(tensor.name)
    notes.append(f"tensor(s) {_listed(names)} held their values twice, in raw_data and a typed field "
                 "(onnx.checker allows one): the typed copy, equal to raw_data, dropped")


def _dedupe_metadata(model: onnx.ModelProto, notes: list[str]) -> None:
    """One value per metadata key: the last, which is the one onnxruntime reports. Metadata does
    not take part in what the model computes."""
    values: dict[str, str] = {}
    differing = set()
    for entry in model.metadata_props:
        if entry.key in values and values[entry.key] != entry.value:
            differing.add(entry.key)
        values[entry.key] = entry.value
    del model.metadata_props[:]
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)
    text = f"the model's metadata repeated key(s) {_listed(sorted(values))} (onnx.checker requires unique keys): " \
           "one entry kept per key"
    if differing:
        text += f", the last value (the one onnxruntime reports) where they differed ({_listed(sorted(differing))})"
    notes.append(text)


def _listed(names, shown: int = 3) -> str:
    names = [f"'{name}'" for name in names]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


# ---------------------------------------------------------------------- the main graph's inputs and outputs


def _shapeless(value: onnx.ValueInfoProto) -> bool:
    """A tensor input or output onnx.checker refuses: no type at all, or a tensor type without a shape."""
    kind = value.type.WhichOneof("value")
    return kind is None or (kind == "tensor_type" and not value.type.tensor_type.HasField("shape"))


def _interface_fixes(model: onnx.ModelProto, ranks: dict[str, int]) -> list:
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    fixes = []
    inputs = [value for value in graph.input if value.name not in initializers and _shapeless(value)]
    for value in inputs:
        if value.name not in ranks:
            raise ModelLoadError(
                f"input '{value.name}' declares no shape, and onnx.checker requires one of a model input (onnxruntime "
                f"takes any rank): give its dims with --verify-shape {value.name}:DIMS (the result declares that rank, "
                f"its dims unknown) or --input-shape {value.name}:DIMS"
            )
    if inputs:
        fixes.append(lambda model, notes: _shape_inputs(model, ranks, notes))
    if any(_shapeless(value) for value in graph.output):
        fixes.append(_type_outputs)
    return fixes


def _shape_inputs(model: onnx.ModelProto, ranks: dict[str, int], notes: list[str]) -> None:
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers or not _shapeless(value):
            continue
        shape = value.type.tensor_type.shape
        shape.SetInParent()
        for _ in range(ranks[value.name]):
            shape.dim.add()  # a dim with neither a size nor a name: unknown
        notes.append(f"input '{value.name}' declared no shape (onnx.checker requires one): written with rank "
                     f"{ranks[value.name]}, the rank it was given, its dims unknown")


def _inferred_outputs(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The type onnx's shape inference finds for each main-graph output, its declared shape set
    aside (inference would keep a declared shape over the one it computes)."""
    from .model import weightless_copy  # model imports this module

    skeleton = weightless_copy(model, lambda tensor: math.prod(tensor.dims) > 1024)
    for value in skeleton.graph.output:
        if value.type.WhichOneof("value") == "tensor_type":
            value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        inferred = skeleton
    return {value.name: value.type for value in [*inferred.graph.output, *inferred.graph.value_info]}


def recompute_contradicted_outputs(model: onnx.ModelProto, original: onnx.ModelProto) -> dict[str, str]:
    """Write, in place, the shape inference computes for each of `model`'s outputs whose shape
    `original` declares against what its graph computes (a static dim of another size, or another
    rank): onnxruntime warns and returns the computed shape, onnx.checker's full check refuses
    the contradiction. Returns a note for each output written so, by name; `original` is not changed."""
    computed = _inferred_outputs(original)
    notes = {}
    for value in model.graph.output:
        declared = next((old for old in original.graph.output if old.name == value.name), None)
        found = computed.get(value.name)
        if declared is None or found is None or not _contradicts(declared.type, found):
            continue
        value.type.tensor_type.shape.CopyFrom(found.tensor_type.shape)
        notes[value.name] = (f"output '{value.name}' is declared {_dims(declared.type)}, but the graph computes "
                     f"{_dims(found)} (onnxruntime returns that; onnx.checker's full check refuses the contradiction): "
                     "written as computed")
    return notes


def _contradicts(declared: onnx.TypeProto, computed: onnx.TypeProto) -> bool:
    if declared.WhichOneof("value") != "tensor_type" or computed.WhichOneof("value") != "tensor_type":
        return False
    if not declared.tensor_type.HasField("shape") or not computed.tensor_type.HasField("shape"):
        return False
    old, new = declared.tensor_type.shape.dim, computed.tensor_type.shape.dim
    return len(old) != len(new) or any(
        a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value != b.dim_value for a, b in zip(old, new)
    )


def _dims(kind: onnx.TypeProto) -> str:
    return "[" + ",".join(str(dim.dim_value) if dim.HasField("dim_value") else (dim.dim_param or "?")
                          for dim in kind.tensor_type.shape.dim) + "]"


def _type_outputs(model: onnx.ModelProto, notes: list[str]) -> None:
    """Give each output without a type or shape what onnx's shape inference finds; where it finds
    no shape (a custom op's output), there is nothing to write that the checker would take."""
    found = _inferred_outputs(model)
    for value in model.graph.output:
        if not _shapeless(value):
            continue
        kind = found.get(value.name)
        has_type = value.type.WhichOneof("value") is not None
        if kind is None or kind.WhichOneof("value") != "tensor_type" or not kind.tensor_type.HasField("shape"):
            producer = next((node for node in model.graph.node if value.name in node.output), None)
            source = f" (it comes from {producer.domain + '::' if producer.domain else ''}{producer.op_type})" if producer else ""
            raise ModelLoadError(
                f"output '{value.name}' declares no {'shape' if has_type else 'type'} and onnx's shape inference finds "
                f"none{source}; onnx.checker requires one of a model output: declare it in the model"
            )
        declared = value.type.tensor_type.elem_type if has_type else 0
        value.type.tensor_type.shape.CopyFrom(kind.tensor_type.shape)
        value.type.tensor_type.elem_type = declared or kind.tensor_type.elem_type
        written = onnx.helper.printable_type(value.type)
        notes.append(f"output '{value.name}' declared no {'shape' if has_type else 'type'} (onnx.checker requires one): "
                     f"written with the one shape inference finds, {written}")


def placeholder_interface(model: onnx.ModelProto) -> None:
    """Give the main graph's shapeless inputs and outputs a placeholder shape, in place, so the
    checker looks at everything else. For checking a copy only: a model is read and checked
    as declared, and interface_repaired decides what a written model declares."""
    for value in (*model.graph.input, *model.graph.output):
        if _shapeless(value):
            if value.type.WhichOneof("value") is None:
                value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            value.type.tensor_type.shape.SetInParent()
