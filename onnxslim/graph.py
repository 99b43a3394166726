"""Small helpers over onnx-graphsurgeon: walking subgraphs, reading constants, rewiring edges.

onnx-graphsurgeon compares tensors by name and has no `replace_all_uses_with` or `bypass`;
passes rewire edges only through the helpers here, so the rules about graph outputs
(a model's interface never changes name) live in one place.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

ONNX_DOMAINS = ("", "ai.onnx")
STANDARD_DOMAINS = frozenset({None, *ONNX_DOMAINS})


# The standard ops that own bodies; nodes of other domains are checked attribute by attribute.
BODY_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def walk(graph: gs.Graph) -> Iterator[gs.Graph]:
    """Yield `graph` and every If/Loop/Scan body inside it, outer graphs first."""
    yield graph
    for node in graph.nodes:
        # Inlined is_standard(): walk runs in every pass, over every node.
        if node.op in BODY_OPS or node.domain not in STANDARD_DOMAINS:
            for subgraph in node_subgraphs(node):
                yield from walk(subgraph)


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The bodies a node owns directly (If branches, Loop/Scan body)."""
    bodies = []
    for attribute in node.attrs.values():  # plain loops: passes ask this of every node, many times
        if isinstance(attribute, gs.Graph):
            bodies.append(attribute)
        elif isinstance(attribute, (list, tuple)):
            for item in attribute:
                if isinstance(item, gs.Graph):
                    bodies.append(item)
    return bodies


def all_nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    """Every node of `graph` and of its subgraphs."""
    for subgraph in walk(graph):
        yield from subgraph.nodes


def count_nodes(graph: gs.Graph | onnx.ModelProto | onnx.GraphProto) -> int:
    """Number of nodes, counting the nodes inside If/Loop/Scan bodies."""
    if isinstance(graph, onnx.ModelProto):
        graph = graph.graph
    if isinstance(graph, onnx.GraphProto):
        return sum(1 for _ in _proto_nodes(graph))
    return sum(len(subgraph.nodes) for subgraph in walk(graph))


def op_histogram(graph: gs.Graph | onnx.ModelProto) -> Counter:
    """How many nodes of each op type (custom domains as `domain::Op`), subgraphs included."""
    if isinstance(graph, onnx.ModelProto):
        nodes = _proto_nodes(graph.graph)
    else:
        nodes = all_nodes(graph)
    return Counter(op_name(node.op_type, node.domain) for node in nodes)


def op_name(op_type: str, domain: str | None) -> str:
    return op_type if domain in STANDARD_DOMAINS else f"{domain}::{op_type}"


def proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A GraphProto and every If/Loop/Scan body in it, at any depth (`walk` for ProtoBufs)."""
    yield graph
    for body in proto_bodies(graph):
        yield from proto_graphs(body)


def proto_bodies(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The bodies the nodes of a GraphProto hold directly, in node and attribute order."""
    return [body for node in graph.node for body in proto_node_bodies(node)]


def proto_node_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies one NodeProto holds (If, Loop, Scan), in attribute order."""
    bodies = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            bodies.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            bodies.extend(attribute.graphs)
    return bodies


def _proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for body in proto_graphs(graph):
        yield from body.node


def find(graph: gs.Graph, *op_types: str) -> list[gs.Node]:
    """Nodes of the standard ONNX domain in `graph` (not its subgraphs) with one of `op_types`.

    Returns a list, so the caller may rewire while it iterates.
    """
    return [node for node in graph.nodes if node.op in op_types and is_standard(node)]


def is_standard(node: gs.Node) -> bool:
    """Whether the node belongs to the default ONNX domain (custom domains are left alone)."""
    return node.domain in STANDARD_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def only_producer(tensor: gs.Tensor, op: str | None = None) -> gs.Node | None:
    """The node producing `tensor` if it is of type `op` and standard, else None."""
    node = producer(tensor)
    if node is None or not is_standard(node) or (op is not None and node.op != op):
        return None
    return node


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of `tensor` if it is an initializer or the output of a Constant node, else None."""
    if isinstance(tensor, gs.Constant):
        # Reading `values` replaces a constant's lazily read values with the array; a sparse
        # initializer would then be written dense, so its dense value is computed each time.
        return tensor._values.load() if isinstance(tensor._values, SparseValues) else tensor.values
    node = producer(tensor)
    if node is not None and node.op == "Constant" and is_standard(node):
        return constant_node_value(node)
    return None


def is_constant(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return True
    node = producer(tensor)
    return node is not None and node.op == "Constant" and is_standard(node) and "sparse_value" not in node.attrs


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value a Constant node holds, whichever attribute it uses (sparse values: None)."""
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return value.values if isinstance(value, gs.Constant) else np.asarray(value)
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    if "value_string" in attrs:
        return np.array(attrs["value_string"], dtype=object)
    if "value_strings" in attrs:
        return np.array(attrs["value_strings"], dtype=object)
    return None


def axes_of(node: gs.Node) -> list[int] | None:
    """The axes of Squeeze/Unsqueeze/Reduce*: an attribute in older opsets, an optional constant
    input since (opset 13 for Squeeze/Unsqueeze). None when absent or not a constant."""
    if "axes" in node.attrs:
        return [int(axis) for axis in node.attrs["axes"]]
    if len(node.inputs) > 1 and not is_empty(node.inputs[1]):
        value = constant_value(node.inputs[1])
        return None if value is None else [int(axis) for axis in np.asarray(value).reshape(-1)]
    return None


def is_empty(tensor: gs.Tensor | None) -> bool:
    """An omitted optional input or output."""
    return tensor is None or tensor.name == ""


def interface_tensors(graph: gs.Graph) -> set[int]:
    """Ids of the tensors that are outputs of `graph` or of any of its subgraphs.

    These keep their names: a model's outputs are its interface, and subgraph outputs
    are kept too because runtimes differ on bodies whose outputs are outer-scope values.
    """
    return {id(tensor) for subgraph in walk(graph) for tensor in subgraph.outputs}


def replace_all_uses(old: gs.Tensor, new: gs.Tensor) -> int:
    """Make every node that reads `old` read `new` instead (subgraph readers too). Returns the count."""
    replaced = 0
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                set_input(consumer, index, new)
                replaced += 1
    return replaced


# onnx-graphsurgeon keeps node.inputs and tensor.outputs in step through list.remove, which
# compares with Node.__eq__: a structural comparison that also formats a log line. Unlinking a
# reader of a tensor with many readers compared it against all of them, and that was a large
# share of common-subexpression elimination's time. These helpers unlink by identity.


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """`node.inputs[index] = tensor`, with the old input forgetting `node` by identity."""
    _forget(node.inputs[index].outputs, node)
    list.__setitem__(node.inputs, index, tensor)
    list.append(tensor.outputs, node)


def set_output(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """`node.outputs[index] = tensor`, with the old output forgetting `node` by identity."""
    _forget(node.outputs[index].inputs, node)
    list.__setitem__(node.outputs, index, tensor)
    list.append(tensor.inputs, node)


def set_inputs(node: gs.Node, tensors: list[gs.Tensor]) -> None:
    """Make `node` read exactly `tensors`, its old inputs forgetting it by identity."""
    for tensor in node.inputs:
        _forget(tensor.outputs, node)
    list.clear(node.inputs)
    node.inputs.extend(tensors)


def disconnect(node: gs.Node) -> None:
    """Detach `node` from every tensor it reads and writes; it waits for dead-node elimination.

    The nodes of its bodies go with it: left reading the enclosing graphs' tensors, they would
    count as readers that no longer exist, and a rewrite that needs a tensor's only reader
    (bypass keeping an output's name) would be refused in this run and taken in the next.
    """
    for body in node_subgraphs(node):
        for subgraph in walk(body):
            for inner in subgraph.nodes:
                _detach(inner)
    _detach(node)


def _detach(node: gs.Node) -> None:
    for tensor in node.inputs:
        _forget(tensor.outputs, node)
    list.clear(node.inputs)
    for tensor in node.outputs:
        _forget(tensor.inputs, node)
    list.clear(node.outputs)


def _forget(items: list, item) -> None:
    """Remove the first element of `items` that is `item` (not merely equal to it)."""
    for index, candidate in enumerate(items):
        if candidate is item:
            list.__delitem__(items, index)
            return


def bypass(node: gs.Node, interface: set[int], graph: gs.Graph, *, keep: int = 0) -> bool:
    """Remove `node` (a node of `graph`) by letting its readers read its input `keep` instead of its first output.

    When that output is part of the interface it keeps its name: the producer of the kept input
    writes it directly, if the kept input is produced by a node of the same graph, has no other
    reader and is not itself part of the interface. Returns False (and changes nothing) when
    neither way is possible. The node is disconnected and left for dead-node elimination.
    """
    source = node.inputs[keep]
    target = node.outputs[0]
    if id(target) not in interface:
        replace_all_uses(target, source)
        disconnect(node)
        return True
    upstream = producer(source)
    if (
        upstream is None
        or id(source) in interface
        or any(reader is not node for reader in source.outputs)
        or node_subgraphs(upstream)
        # A body output must be produced inside the body: an outer node cannot take its name.
        or not any(candidate is upstream for candidate in graph.nodes)
    ):
        return False
    disconnect(node)
    slot = next(index for index, tensor in enumerate(upstream.outputs) if tensor is source)
    set_output(upstream, slot, target)
    _merge_type(target, source)
    return True


def _merge_type(target: gs.Tensor, source: gs.Tensor) -> None:
    if isinstance(target, gs.Variable):
        target.dtype = target.dtype if target.dtype is not None else source.dtype
        target.shape = target.shape if target.shape is not None else source.shape


def make_constant(tensor: gs.Tensor, value: np.ndarray, interface: set[int], graph: gs.Graph) -> None:
    """Give `tensor` the fixed `value`, detached from its producer.

    An interface tensor keeps its name and becomes the output of a new Constant node in `graph`
    (a model output is never an initializer); any other tensor becomes an initializer.
    """
    computed_by = producer(tensor)
    tensor.inputs.clear()
    if computed_by is not None and not computed_by.outputs:
        # Every result of the producer is a constant now: left reading its inputs, it would be a
        # reader without outputs, which the fusions (Cast/Transpose chains) would try to rewire.
        disconnect(computed_by)
    value = np.asarray(value)
    if id(tensor) in interface:
        held = gs.Constant(f"{tensor.name}__value", value)
        # First in the graph: other nodes of the graph may read the tensor too, and nodes stay topologically sorted.
        graph.nodes.insert(0, gs.Node("Constant", name=f"{tensor.name}__constant", attrs={"value": held}, outputs=[tensor]))
    else:
        tensor.to_constant(value)


def constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every distinct constant tensor read by a node of the graph or its subgraphs."""
    seen: set[int] = set()
    for subgraph in walk(graph):
        for node in subgraph.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield tensor


def initializer_bytes(graph: gs.Graph) -> int:
    """Bytes of every constant tensor in the graph and its subgraphs (Constant node values included)."""
    total = sum(tensor_nbytes(tensor) for tensor in constants(graph))
    for node in all_nodes(graph):
        # A Constant node counts while it is connected (a lifted one waits for dead-node elimination).
        value = node.attrs.get("value") if node.op == "Constant" and node.outputs else None
        if isinstance(value, gs.Constant):
            total += tensor_nbytes(value)
    return total


def tensor_nbytes(tensor: gs.Constant) -> int:
    """Bytes of a constant without loading lazily-read values."""
    values = tensor._values
    if isinstance(values, np.ndarray):
        return values.nbytes
    try:
        itemsize = np.dtype(values.dtype).itemsize
    except TypeError:
        itemsize = 1
    return math.prod(values.shape or ()) * itemsize  # a constant's dims are ints


def can_merge(kept: gs.Tensor, duplicate: gs.Tensor, interface: set[int], graph: gs.Graph) -> bool:
    """Whether `merge_tensors(kept, duplicate, ...)` is possible (see there); changes nothing."""
    if kept is duplicate or id(duplicate) not in interface:
        return True
    upstream = producer(kept)
    return (
        upstream is not None
        and id(kept) not in interface
        and not node_subgraphs(upstream)
        and any(candidate is upstream for candidate in graph.nodes)
    )


def merge_tensors(kept: gs.Tensor, duplicate: gs.Tensor, interface: set[int], graph: gs.Graph) -> bool:
    """Two tensors hold the same value: make every reader of `duplicate` read `kept`.

    An interface tensor keeps its name, so when `duplicate` is one the roles swap: the producer
    of `kept` (a node of `graph`) writes `duplicate` instead, and the readers of `kept` read
    `duplicate`. The caller disconnects the producer of `duplicate` first (a tensor has one
    producer). Returns False (and changes nothing) when `can_merge` says no.
    """
    if kept is duplicate:
        return True
    if id(duplicate) not in interface:
        replace_all_uses(duplicate, kept)
        return True
    if not can_merge(kept, duplicate, interface, graph) or duplicate.inputs:
        return False
    upstream = producer(kept)
    slot = next(index for index, tensor in enumerate(upstream.outputs) if tensor is kept)
    set_output(upstream, slot, duplicate)
    _merge_type(duplicate, kept)
    replace_all_uses(kept, duplicate)
    return True


def single_reader(tensor: gs.Tensor, interface: set[int]) -> gs.Node | None:
    """The node reading `tensor` if exactly one node reads it, once, and it is not part of the interface.

    A fusion that removes `tensor` needs this: any other reader (or a graph output) would still want it.
    """
    if id(tensor) in interface or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def known_rank(tensor: gs.Tensor) -> int | None:
    """The rank of `tensor` if known (constants always; variables once shapes are inferred)."""
    if isinstance(tensor, gs.Constant):
        return tensor.values.ndim
    return len(tensor.shape) if tensor.shape is not None else None


def known_dim(tensor: gs.Tensor, axis: int) -> int | None:
    """The static size of `tensor` along `axis` (negative counts from the end), or None if unknown."""
    shape = tensor.shape if tensor.shape is not None else None
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    return int(dim) if isinstance(dim, (int, np.integer)) and dim >= 0 else None


def insert_before(graph: gs.Graph, anchor: gs.Node, *nodes: gs.Node) -> None:
    """Put new `nodes` into `graph` just before `anchor`, so nodes stay topologically sorted
    when the new nodes read only tensors defined before `anchor`."""
    index = next(index for index, node in enumerate(graph.nodes) if node is anchor)
    graph.nodes[index:index] = list(nodes)


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """Name -> tensor of `graph` (not its bodies), in the order of gs.Graph.tensors(): inputs,
    each node's inputs and outputs, outputs; omitted optional tensors left out. The same map as
    tensors() without its per-tensor duplicate check, which costs more than the walk."""
    found: dict[str, gs.Tensor] = {}
    for tensor in graph.inputs:
        found[tensor.name] = tensor
    for node in graph.nodes:
        for tensor in node.inputs:
            found[tensor.name] = tensor
        for tensor in node.outputs:
            found[tensor.name] = tensor
    for tensor in graph.outputs:
        found[tensor.name] = tensor
    found.pop("", None)
    return found


def unique_names(graph: gs.Graph):
    """A function `name(base)` giving tensor/node names no graph or subgraph of `graph` uses yet.

    Deterministic (base, base_1, base_2...) and unique across scopes: a body may not reuse a name
    of its enclosing graph. Names it gave out are remembered, so one instance serves a whole pass.
    """
    taken: set[str] = set()
    collected = False  # collected on the first call: most passes that make one never name anything

    def name(base: str) -> str:
        nonlocal collected
        if not collected:
            for subgraph in walk(graph):
                taken.update(tensor_map(subgraph))
                taken.update(node.name for node in subgraph.nodes if node.name)
            collected = True
        candidate, index = base, 0
        while candidate in taken:
            index += 1
            candidate = f"{base}_{index}"
        taken.add(candidate)
        return candidate

    return name


def constant_type(tensor: gs.Constant) -> tuple[int, tuple[int, ...]] | None:
    """(ONNX element type, shape) of a constant, read without loading its values; None for strings
    and for values held in another type than they are exported as."""
    values = tensor._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        proto = values.tensor
        if not isinstance(proto, onnx.TensorProto) or proto.data_type in (0, onnx.TensorProto.STRING):
            return None
        return proto.data_type, tuple(proto.dims)
    values = np.asarray(values)
    exported = getattr(tensor, "_export_dtype", None)
    if values.dtype == object or (exported is not None and np.dtype(exported) != values.dtype):
        return None
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(values.dtype)), tuple(values.shape)
    except (KeyError, TypeError, ValueError):
        return None


def constant_bytes(tensor: gs.Constant) -> bytes:
    """The little-endian bytes of a constant's values (for `constant_type`d constants), without
    loading lazily read values into the graph: onnx-graphsurgeon writes those out untouched, and
    loading a type numpy lacks would change it."""
    values = tensor._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        proto = values.tensor
        if proto.HasField("raw_data"):
            return proto.raw_data
        # to_array's own result for these types, without its generic dispatch: exporters write
        # every ConstantOfShape value and many small shapes this way, and CSE keys them all.
        field = _TYPED_FIELDS.get(proto.data_type)
        if field is not None and proto.data_location != onnx.TensorProto.EXTERNAL and not proto.HasField("segment"):
            return np.array(getattr(proto, field[0])[:], dtype=field[1]).tobytes()  # a list converts faster
        return np.ascontiguousarray(onnx.numpy_helper.to_array(proto)).tobytes()
    return np.ascontiguousarray(values).tobytes()


# Element types stored in a TensorProto field of their own numpy type: (field, dtype).
_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: ("float_data", np.float32),
    onnx.TensorProto.DOUBLE: ("double_data", np.float64),
    onnx.TensorProto.INT32: ("int32_data", np.int32),
    onnx.TensorProto.INT64: ("int64_data", np.int64),
}


def equal_constants(tensors: Iterable[gs.Constant]) -> dict[int, gs.Constant]:
    """For each constant (by id), the first of `tensors` with the same element type, shape and bytes.

    Cheap before exact: constants are grouped by type and shape (no values read), then by a few
    sampled bytes; only constants that still collide are hashed, and equal digests are confirmed
    byte for byte. Strings and constants of unknown type only equal themselves.
    """
    by_type: dict[tuple, list[gs.Constant]] = {}
    result: dict[int, gs.Constant] = {}
    for tensor in tensors:
        signature = constant_type(tensor)
        if signature is None:
            result[id(tensor)] = tensor
        else:
            by_type.setdefault(signature, []).append(tensor)
    for group in by_type.values():
        for same_sample in _split(group, _sample):
            for same_digest in _split(same_sample, lambda tensor: hashlib.sha256(constant_bytes(tensor)).digest()):
                kept: list[gs.Constant] = []
                for tensor in same_digest:
                    equal = next((other for other in kept if constant_bytes(other) == constant_bytes(tensor)), None)
                    if equal is None:
                        kept.append(tensor)
                    result[id(tensor)] = tensor if equal is None else equal
    return result


def _split(group: list, key) -> list[list]:
    """`group` split by `key` (first-seen order kept); a one-member group is not keyed at all."""
    if len(group) == 1:
        return [group]
    parts: dict = {}
    for item in group:
        parts.setdefault(key(item), []).append(item)
    return list(parts.values())


def _sample(tensor: gs.Constant) -> bytes:
    data = constant_bytes(tensor)
    middle = len(data) // 2
    return data[:16] + data[middle : middle + 16] + data[-16:]


# Names exporters write for "some unknown size": two dims carrying one are not the same size.
PLACEHOLDER_SYMBOLS = frozenset({"none", "null", "unk", "unknown", "dynamic", "dim", "n/a"})


def trusted_symbol(dim) -> str | None:
    """A dim's symbolic name if two dims that carry it are the same size.

    ONNX reads one dim_param name as one size (onnx shape inference propagates its own `unk__N`
    symbols only through ops that keep the dim); names like "?", "unk" or "-1" are placeholders.
    """
    # Names and expressions (torch writes dims like "2*height + 1") count; "?" or "-1" do not.
    if not isinstance(dim, str) or not any(map(str.isalpha, dim)):
        return None
    return None if dim.strip().lower() in PLACEHOLDER_SYMBOLS else dim


# The names onnx's shape inference makes up for a dim it cannot compute: unk__0, unk__1, ...
INFERRED_SYMBOL = re.compile(r"unk__\d+")


def inferred_symbol(dim) -> bool:
    """Whether `dim` is a name onnx's shape inference made up for a size it could not compute.

    Such a name is a fact only within one inference (two dims carrying it are the same size), is
    numbered in the order that inference met it, and a later inference may find the size static.
    """
    return isinstance(dim, str) and INFERRED_SYMBOL.fullmatch(dim) is not None
