"""A tiny builder over onnx.helper for the small models the pass tests build, and the checks they share.

    b = ModelBuilder(opset=17)
    x = b.input("x", [1, 3, 8, 8])
    w = b.initializer("w", np.ones([4, 3, 3, 3], np.float32))
    y = b.node("Conv", [x, w], pads=[1, 1, 1, 1])
    b.output(y)
    model = b.build()

Tensor names are plain strings; `node` returns its output name (a list when `outputs` > 1).
Outputs given without dtype and shape are typed by onnx shape inference at build().
If branches are built with `b.branch()` and may read any tensor of the enclosing builder by name.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import onnx
import onnx.helper as helper
import onnx.numpy_helper

import onnxslim
from onnxslim.graph import op_histogram
from onnxslim.model import to_graph, to_model
from onnxslim.verify import Verifier

DEFAULT_OPSET = 17


def _elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class GraphBuilder:
    """Nodes, initializers and outputs of one graph (a model's main graph or an If branch)."""

    def __init__(self, name: str, counter: itertools.count):
        self.name = name
        self._counter = counter
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []

    def fresh(self, base: str) -> str:
        return f"{base}_{next(self._counter)}"

    def initializer(self, name: str, array) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def constant(self, array, name: str | None = None) -> str:
        """A Constant node holding `array`; returns its output name."""
        output = name or self.fresh("const")
        tensor = onnx.numpy_helper.from_array(np.asarray(array), f"{output}_value")
        self.nodes.append(helper.make_node("Constant", [], [output], name=f"{output}_node", value=tensor))
        return output

    def node(
        self,
        op_type: str,
        inputs: list[str],
        outputs: int | list[str] = 1,
        *,
        domain: str = "",
        name: str | None = None,
        **attrs,
    ) -> str | list[str]:
        """Add a node; returns its output name, or the list of names if it has several outputs."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=name or self.fresh(f"{op_type}_node"), domain=domain, **attrs)
        )
        return names[0] if len(names) == 1 else names

    def if_node(self, condition: str, then_branch: "GraphBuilder", else_branch: "GraphBuilder", outputs: int = 1):
        """An If node whose branches are graphs made with `branch()`."""
        return self.node("If", [condition], outputs, then_branch=then_branch.graph(), else_branch=else_branch.graph())

    def branch(self, name: str | None = None) -> "GraphBuilder":
        """A body graph (If branch, Loop body) sharing this builder's name counter, so names never collide."""
        return GraphBuilder(name or self.fresh("branch"), self._counter)

    def output(self, name: str, dtype=None, shape: list | None = None) -> str:
        """Mark `name` as a graph output; an untyped output gets its type from shape inference at build()."""
        if dtype is None or shape is None:
            self.outputs.append(onnx.ValueInfoProto(name=name))
        else:
            self.outputs.append(helper.make_tensor_value_info(name, _elem_type(dtype), shape))
        return name

    def annotate(self, name: str, dtype=np.float32, shape: list | None = None) -> str:
        """Record the type of an intermediate tensor (value_info), as exporters often do."""
        self.value_info.append(helper.make_tensor_value_info(name, _elem_type(dtype), shape))
        return name

    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers, value_info=self.value_info
        )


class ModelBuilder(GraphBuilder):
    """A model: a main graph plus the opset and IR version it declares."""

    def __init__(self, opset: int = DEFAULT_OPSET, ir_version: int | None = None, name: str = "test"):
        super().__init__(name, itertools.count())
        self.opset = opset
        self.ir_version = ir_version
        self.domains: dict[str, int] = {}

    def input(self, name: str, shape: list | None, dtype=np.float32) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _elem_type(dtype), shape))
        return name

    def use_domain(self, domain: str, version: int = 1) -> None:
        self.domains[domain] = version

    def build(self, check: bool = True) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(self.graph(), opset_imports=opsets, producer_name="onnxslim-tests")
        # make_model picks the newest IR version; onnxruntime may not read it yet.
        model.ir_version = 8
        _type_outputs(model)
        if self.ir_version is not None:
            model.ir_version = self.ir_version
        if self.ir_version is not None and self.ir_version < 4:
            listed = {value.name for value in model.graph.input}
            for tensor in model.graph.initializer:
                if tensor.name not in listed:
                    model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
        if check:
            onnx.checker.check_model(model)
        return model


def _type_outputs(model: onnx.ModelProto) -> None:
    """Fill in untyped outputs (main graph and bodies) from onnx shape inference."""
    if all(_typed(value) for graph in _graphs(model.graph) for value in graph.output):
        return
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    for graph, graph_inferred in zip(_graphs(model.graph), _graphs(inferred.graph)):
        for value, value_inferred in zip(graph.output, graph_inferred.output):
            if not _typed(value):
                if not _typed(value_inferred):
                    raise ValueError(f"shape inference cannot type output '{value.name}': give its dtype and shape")
                value.CopyFrom(value_inferred)


def _typed(value: onnx.ValueInfoProto) -> bool:
    if value.type.WhichOneof("value") not in (None, "tensor_type"):
        return True  # a sequence, map or optional type given by the test itself
    return value.type.tensor_type.elem_type != 0 and value.type.tensor_type.HasField("shape")


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)


# ----------------------------------------------------------------------------- running and checking


def run_pass(
    model: onnx.ModelProto, name: str, *, first: tuple[str, ...] = (), **options
) -> tuple[onnx.ModelProto, onnxslim.PassResult]:
    """Run the registered pass `name` once on `model`; returns the exported model (checked) and the result.

    `first` names passes run before it on the same graph (e.g. infer-shapes, whose annotations
    live on the graph and are not exported).
    """
    graph = to_graph(model)
    for earlier in first:
        onnxslim.get_pass(earlier)(graph, onnxslim.PassContext())
    result = onnxslim.get_pass(name)(graph, onnxslim.PassContext(), **options)
    optimized = to_model(graph, model)
    onnx.checker.check_model(optimized)
    return optimized, result


def run_passes(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    for name in names:
        model, _ = run_pass(model, name)
    return model


def assert_equivalent(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]] | dict[str, np.ndarray] | None = None,
) -> None:
    """Both models give the same outputs in onnxruntime (graph optimizations off); feeds default to seeded random."""
    if isinstance(feeds, dict):
        feeds = [feeds]
    report = Verifier(original, inputs=feeds).check(optimized)
    assert report.passed, report.message


def ops(model: onnx.ModelProto) -> Counter:
    """Op histogram of the model, If/Loop bodies included."""
    return op_histogram(model)


def top_ops(graph: onnx.GraphProto) -> list[str]:
    """Op types of one graph's own nodes, in order (bodies not included)."""
    return [node.op_type for node in graph.node]


def branches(model: onnx.ModelProto, index: int = 0) -> tuple[onnx.GraphProto, onnx.GraphProto]:
    """(then, else) bodies of the `index`-th If node of the main graph."""
    node = [node for node in model.graph.node if node.op_type == "If"][index]
    bodies = {attribute.name: attribute.g for attribute in node.attribute}
    return bodies["then_branch"], bodies["else_branch"]


def initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {tensor.name for tensor in graph.initializer}


def output_names(model: onnx.ModelProto) -> list[str]:
    return [value.name for value in model.graph.output]


def random(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def feeds_at_two_sizes(model: onnx.ModelProto, sizes: tuple[int, int] = (2, 5), seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded feeds for every graph input, one with each dynamic dim at sizes[0] and one at sizes[1]
    (dims that carry one name get one size), for assert_equivalent on models with dynamic dims."""
    rng = np.random.default_rng(seed)
    feeds = []
    for size in sizes:
        feed = {}
        for value in model.graph.input:
            tensor_type = value.type.tensor_type
            shape = [dim.dim_value if dim.HasField("dim_value") else size for dim in tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            if dtype == np.bool_:
                feed[value.name] = rng.integers(0, 2, shape).astype(bool)
            elif np.issubdtype(dtype, np.integer):
                feed[value.name] = rng.integers(-5, 6, shape).astype(dtype)
            else:
                feed[value.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def dead_node_model() -> onnx.ModelProto:
    """x -> Identity -> Add(bias) -> Relu -> y, with a dead Exp and the bias a Constant node."""
    b = ModelBuilder()
    x = b.input("x", [2, 3])
    b.node("Exp", [x])
    total = b.node("Add", [b.node("Identity", [x]), b.constant(random([3], seed=1))])
    b.output(b.node("Relu", [total], ["y"]))
    return b.build()
