"""Hypothesis strategies that build random valid ONNX models for the differential fuzzer.

    from hypothesis import given
    @given(fuzz_graphs.models())
    def test(case): ...            # case.model is an onnx.ModelProto, case.feeds() its inputs

A model is grown block by block from the values built so far. A block is a small pattern one of
onnxslim's passes rewrites (a Conv followed by BatchNormalization, a Transpose pair, a Cast chain,
Shape arithmetic feeding a Reshape, a repeated node, a constant subgraph, an If on a constant ...)
or a plain op from the onnx.defs schemas, typed by the schema's type constraints and by the
kernels onnxruntime's CPU provider registers. The generator tracks every value's dtype and shape
itself, with one symbolic dim N (the batch) that the oracle runs at two sizes, so every model it
returns runs in onnxruntime at both sizes; onnx.checker's full check then holds it to onnx's own
shape inference.

Float values carry two facts that keep the oracle honest (no false "wrong"):
- `exact`: computed without rounding a rewrite could change (inputs, constants, Relu, Neg,
  structural ops ...). Only exact values feed ops that turn a last-bit difference into a
  different answer: Floor/Round/Sign, comparisons, Cast to an integer, Reciprocal/Log/Sqrt
  and a division by a variable. A fused Conv+BatchNormalization rounds differently, and
  Floor of it may then differ by one: that is no bug.
- `bound`: a bound on |value| (inf when it may be non-finite), so a Cast to an integer never
  meets a value out of range (undefined in C++, so onnxruntime and numpy may both be right).

Loaded by path (tools/ is not installed): tools/fuzz.py loads it beside itself and the tests load
it as tests/test_tools.py loads tools. It needs hypothesis (the `test` and `fuzz` extras).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.defs
import onnx.helper as helper
import onnx.numpy_helper
from hypothesis import strategies as st

# The symbolic dim and the two sizes the oracle gives it: a dim a rewrite baked in fails the second.
DIM = "N"
SIZES = (3, 1)
OPSETS = (13, 17, 18, 21)
IR_VERSIONS = {13: 7, 17: 8, 18: 8, 21: 10}

FLOATS = ("float32", "float16", "float64")
INTS = ("int32", "int64")
DTYPES = FLOATS + INTS + ("bool",)
# Narrow integers: Cast targets (shape arithmetic cast to uint8 wraps -1 to 255) and a few inputs,
# read only by ops whose kernels onnxruntime has for every type (Reshape, Transpose, Concat ...).
SMALL_INTS = ("uint8", "int8", "uint16", "int16", "uint32", "uint64")
INPUT_BOUND = {"float32": 3.0, "float16": 3.0, "float64": 3.0, "int32": 5.0, "int64": 5.0, "bool": 1.0,
               **{dtype: 5.0 for dtype in SMALL_INTS}}

# Features the generator can leave out. Those in KNOWN_OPEN make onnxslim fail today (each entry
# says how); the CI profile leaves them out until their fix lands, tools/fuzz.py keeps them.
FEATURES = (
    "special-constants",  # NaN, +-Inf and -0.0 in constants
    "scalar-bool-input",  # a 0-d bool graph input
    "overridable-input",  # an input that also has an initializer (a default the caller may override)
    "lying-value-info",  # a value_info that bakes in the symbolic dim as 1
    "control-flow",  # If and Loop bodies
    "hostile-integers",  # INT64_MIN / -1 and friends in folded integer arithmetic of untaken branches
    "float16-rounding",  # Floor/Ceil/Round on float16
    "nonfinite-calibration",  # lossy modes: NaN/Inf in some or all calibration samples (refused or skipped, never a NaN model)
    "small-ints",  # uint8/int8/uint16/int16/uint32/uint64 inputs and Cast targets, in shape arithmetic too
    "zero-size",  # a static dim of 0 in inputs (and so in constants that broadcast with them)
    "sequences",  # SequenceConstruct -> SequenceAt / ConcatFromSequence / SequenceLength; Optional (opset >= 18)
    "endless-loop",  # a Loop with neither trip count nor a condition that ever turns false: onnxslim must refuse, not hang
    "decomposed-layers",  # layer and RMS normalization and GELU written out in arithmetic, in the exporters' variants
)
KNOWN_OPEN = {
    # onnxslim refuses these with exit 2 now (the worker's time limit), but each case spends a few
    # of those limits, seconds each: left out of the CI profile for its time, not for a failure.
    "endless-loop": "each case waits out the worker's time limit a few times",
}


@dataclass
class Value:
    """A tensor of the graph being built, with what the generator knows about it."""

    name: str
    dtype: str
    shape: tuple  # ints and DIM
    exact: bool = True
    bound: float = 1.0
    constant: np.ndarray | None = None  # its value, when it is an initializer or a Constant's output

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS

    @property
    def static(self) -> bool:
        return DIM not in self.shape


@dataclass
class Case:
    """A generated model and how to feed it. `features` names the features it uses."""

    model: onnx.ModelProto
    features: frozenset = field(default_factory=frozenset)
    input_seed: int = 0
    # The lossy modes' options: "calibration" (which samples hold NaN/Inf, see calibration_feeds),
    # "quantize_mode", "method", "criterion", "allocation" (onnxslim's QuantizeOptions / PruneOptions)
    lossy: dict = field(default_factory=dict)

    def feeds(self, size: int) -> dict[str, np.ndarray]:
        return make_feeds(self.model, size, self.input_seed)

    def __repr__(self) -> str:  # hypothesis prints the falsifying example: keep it one line
        ops = [node.op_type for node in self.model.graph.node]
        return f"Case(opset={self.model.opset_import[0].version}, nodes={len(ops)}, ops={ops}, features={sorted(self.features)})"


# -- feeding a model ---------------------------------------------------------------------------


def make_feeds(model: onnx.ModelProto, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded values for every graph input, with N set to `size`. An input that also has an
    initializer is fed too: the caller may override its default, so the optimized model must keep it."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value_info in model.graph.input:
        tensor_type = value_info.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [dim.dim_value if dim.HasField("dim_value") else size for dim in tensor_type.shape.dim]
        feeds[value_info.name] = random_array(rng, np.dtype(dtype).name, shape)
    return feeds


CALIBRATION_SAMPLES = 4
CALIBRATION_KINDS = ("finite", "some-nonfinite", "all-nonfinite")


def calibration_feeds(model: onnx.ModelProto, kind: str = "finite", seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Calibration samples for the lossy modes, N at its first size: all finite, or with NaN/Inf
    in the float inputs of the first sample ("some-nonfinite": it is skipped with a warning) or of
    every sample ("all-nonfinite": refused, exit 2)."""
    samples = [make_feeds(model, SIZES[0], seed + 100 + index) for index in range(CALIBRATION_SAMPLES)]
    spoiled = {"finite": 0, "some-nonfinite": 1, "all-nonfinite": len(samples)}[kind]
    rng = np.random.default_rng(seed)
    for sample in samples[:spoiled]:
        for name, array in sample.items():
            if array.dtype.kind == "f" and array.size:
                array.reshape(-1)[rng.integers(0, array.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return samples


def random_array(rng: np.random.Generator, dtype: str, shape, special: bool = False) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == "bool":
        data = rng.random(count) < 0.5
    elif np.dtype(dtype).kind == "u":
        data = rng.integers(0, 6, count)
    elif np.dtype(dtype).kind == "i":
        data = rng.integers(-5, 6, count)
    else:
        # Quarter steps: many values are exact in float16, and x.5 exercises Round's ties.
        data = rng.integers(-12, 13, count) / 4.0
        data[rng.random(count) < 0.1] = -0.0
        if special and count:
            picks = rng.integers(0, count, max(1, count // 4))
            data[picks] = rng.choice([np.nan, np.inf, -np.inf, -0.0], len(picks))
    return np.asarray(data).astype(dtype).reshape(shape)


def never_ends(model: onnx.ModelProto) -> bool:
    """Whether the model holds a Loop (feature endless-loop) with no trip count whose condition
    only passes its input on: run, it never returns."""
    for node in model.graph.node:
        if node.op_type != "Loop" or (node.input and node.input[0]):
            continue
        body = next(attribute.g for attribute in node.attribute if attribute.name == "body")
        condition_in, condition_out = body.input[1].name, body.output[0].name
        if any(inner.op_type == "Identity" and list(inner.input) == [condition_in] and list(inner.output) == [condition_out]
               for inner in body.node):
            return True
    return False


# -- kernels onnxruntime's CPU provider has ----------------------------------------------------

# Per op: how its inputs are typed from the schema's first type constraint; "bool"-only ops and
# ops whose output is bool are typed by the schema too. What the CPU provider actually registers
# is narrower than the schemas: tools/fuzz.py probes it once per opset (`supported_kernels`) and
# passes the result to `models(kernels={opset: {op: dtypes}})`; without it the schema's types are used.
UNARY = ("Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Floor", "Ceil", "Round", "Sign", "Reciprocal", "Sqrt",
         "Exp", "Log", "Erf", "Softplus", "Identity", "LeakyRelu", "Elu", "HardSigmoid", "IsNaN", "IsInf",
         "Softsign", "Sin", "Cos", "Not", "HardSwish")
BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Equal", "Less", "Greater", "LessOrEqual",
          "GreaterOrEqual", "And", "Or", "Xor", "Mod")
# Exact on exact inputs whatever the evaluation order (no rounding at all, or a sign/compare).
EXACT_UNARY = {"Relu", "Neg", "Abs", "Floor", "Ceil", "Round", "Sign", "Identity", "IsNaN", "IsInf", "Not"}
# Turn a last-bit difference into a different answer: only on exact inputs.
DISCONTINUOUS = {"Floor", "Ceil", "Round", "Sign", "Reciprocal", "Sqrt", "Log", "IsNaN", "IsInf"}
COMPARISONS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}
LOGICAL = {"And", "Or", "Xor", "Not"}


@functools.lru_cache(maxsize=None)
def schema_types(op: str, opset: int) -> frozenset[str]:
    """The dtypes (of ours) the schema's first type constraint allows for the op's first input."""
    schema = onnx.defs.get_schema(op, opset)
    constraint = next(c for c in schema.type_constraints if c.type_param_str == schema.inputs[0].type_str)
    allowed = {text[len("tensor("):-1] for text in constraint.allowed_type_strs}
    renamed = {"float": "float32", "double": "float64"}
    return frozenset({renamed.get(name, name) for name in allowed} & set(DTYPES))


PROBED = UNARY + BINARY + ("Conv", "MatMul", "Gemm", "BatchNormalization", "ReduceSum", "ReduceMean", "ReduceMax",
                           "Where", "Clip")


def kernel_probe_models(opset: int):
    """(op, dtype, model) for every op and schema dtype: onnxruntime loads the model iff it has the kernel."""
    for op in PROBED:
        try:
            dtypes = set(DTYPES) - {"bool"} if op == "Where" else schema_types(op, opset)
        except onnx.defs.SchemaError:  # the op is newer than this opset
            continue
        for dtype in sorted(dtypes):
            yield op, dtype, _probe_model(op, dtype, opset)


def _probe_model(op: str, dtype: str, opset: int) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    arity = {"Conv": 2, "MatMul": 2, "Gemm": 2, "BatchNormalization": 5, "Where": 3, "Clip": 1}.get(
        op, 2 if op in BINARY else 1)
    shape = [1, 1, 2, 2] if op in ("Conv", "BatchNormalization") else [2, 2]
    inputs = []
    for index in range(arity):
        input_elem = helper.TensorProto.BOOL if op == "Where" and index == 0 else elem
        input_shape = [1] if op == "BatchNormalization" and index else ([1, 1, 1, 1] if op == "Conv" and index else shape)
        inputs.append(helper.make_tensor_value_info(f"i{index}", input_elem, input_shape))
    node = helper.make_node(op, [i.name for i in inputs], ["y"])
    output = helper.make_value_info("y", onnx.TypeProto())
    graph = helper.make_graph([node], "probe", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSIONS.get(opset, 8))


# -- building a graph --------------------------------------------------------------------------


class Builder:
    """The graph being drawn: nodes, initializers and the values a block may read."""

    def __init__(self, draw, opset: int, features: frozenset, kernels: dict | None, seed: int):
        self.draw = draw
        self.opset = opset
        self.features = features
        self.used: set[str] = set()
        self.kernels = kernels.get(str(opset), {}) if kernels is not None else None
        self.rng = np.random.default_rng(seed)
        self.counter = itertools.count()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.values: list[Value] = []  # what blocks may read (graph inputs and node outputs)
        self.endless = False  # a Loop that never ends (feature endless-loop): the original cannot be run

    # names and choices

    def fresh(self, base: str) -> str:
        return f"{base}{next(self.counter)}"

    def choice(self, options):
        options = list(options)
        return options[self.draw(st.integers(0, len(options) - 1))] if len(options) > 1 else options[0]

    def flip(self, probability_hint: int = 2) -> bool:
        """True one time in `probability_hint` (when drawn at random; shrinks to False)."""
        return self.draw(st.integers(0, probability_hint - 1)) == probability_hint - 1

    def pick(self, predicate=lambda value: True, *, empty_ok: bool = False) -> Value | None:
        """A value the predicate accepts; one with a dim of 0 only where the block copes (`empty_ok`)."""
        candidates = [value for value in self.values if predicate(value) and (empty_ok or 0 not in value.shape)]
        if not candidates:
            return None
        # Recent values first: long chains reach the passes' patterns more often than wide graphs.
        return candidates[-1 - self.draw(st.integers(0, len(candidates) - 1))]

    def allowed(self, op: str, dtype: str) -> bool:
        """The schema at this opset allows the dtype, and onnxruntime has the kernel (when probed)."""
        if self.kernels is not None and op in self.kernels and dtype not in self.kernels[op]:
            return False
        try:
            return dtype in schema_types(op, self.opset)
        except onnx.defs.SchemaError:
            return False

    def uses(self, feature: str) -> bool:
        """Whether a feature may be used; records it when it is."""
        if feature not in self.features:
            return False
        self.used.add(feature)
        return True

    # graph elements

    def input(self, dtype: str, shape: tuple) -> Value:
        name = self.fresh("in")
        self.inputs.append(_value_info(name, dtype, shape))
        value = Value(name, dtype, shape, bound=INPUT_BOUND[dtype])
        self.values.append(value)
        return value

    def constant(self, array: np.ndarray, *, as_node: bool = False, keep: bool = False) -> Value:
        """An initializer, or a Constant node (lift-constants turns those into initializers)."""
        array = np.asarray(array)
        name = self.fresh("c")
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array, name)))
        else:
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
        finite = array.dtype.kind != "f" or bool(np.isfinite(array).all())
        bound = float(np.abs(array.astype(np.float64)).max()) if array.size and finite else (0.0 if finite else math.inf)
        value = Value(name, array.dtype.name, tuple(array.shape), exact=True, bound=bound, constant=array)
        if keep:
            self.values.append(value)
        return value

    def random_constant(self, dtype: str, shape, *, positive: bool = False) -> Value:
        special = dtype in FLOATS and not positive and self.flip(6) and self.uses("special-constants")
        array = random_array(self.rng, dtype, list(shape), special=special)
        if positive:
            array = (np.abs(array.astype(np.float64)) + 1).astype(dtype)
        return self.constant(array, as_node=self.flip(3))

    def node(self, op: str, inputs: list, attrs: dict | None = None, *, dtype: str, shape: tuple,
             exact: bool = True, bound: float = 1.0, keep: bool = True, outputs: int = 1) -> Value:
        names = [self.fresh("t") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, [value.name if value is not None else "" for value in inputs],
                                           names, **(attrs or {})))
        value = Value(names[0], dtype, tuple(shape), exact=exact, bound=bound)
        if keep:
            self.values.append(value)
        return value

    def opset_axes(self, op: str, axes: list[int], inputs: list, attrs: dict) -> None:
        """Squeeze/Unsqueeze take axes as an input from opset 13, Reduce* (but ReduceSum) from 18."""
        as_input = op in ("Squeeze", "Unsqueeze", "ReduceSum") or (op.startswith("Reduce") and self.opset >= 18)
        if as_input:
            inputs.append(self.constant(np.array(axes, np.int64)))
        else:
            attrs["axes"] = axes


def _value_info(name: str, dtype: str, shape: tuple | None) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    dims = None if shape is None else [dim if dim != DIM else DIM for dim in shape]
    return helper.make_tensor_value_info(name, elem, dims)


def broadcast(a: tuple, b: tuple) -> tuple | None:
    """numpy broadcasting where N only meets N or 1 (N is 1 at one of its sizes, 3 at the other)."""
    result = []
    for x, y in itertools.zip_longest(reversed(a), reversed(b), fillvalue=1):
        if x == y or y == 1:
            result.append(x)
        elif x == 1:
            result.append(y)
        else:
            return None
    return tuple(reversed(result))


def static_size(shape: tuple) -> int:
    return int(np.prod([dim for dim in shape if dim != DIM], dtype=np.int64))


# -- blocks ------------------------------------------------------------------------------------


def _broadcast_partner_shape(b: Builder, shape: tuple) -> tuple:
    """A shape that broadcasts with `shape`: a suffix of it, some dims replaced by 1."""
    keep = b.draw(st.integers(0, len(shape)))
    suffix = shape[len(shape) - keep:]
    return tuple(1 if dim == DIM or b.flip(3) else dim for dim in suffix)


def block_unary(b: Builder) -> None:
    ops = [op for op in UNARY if op not in ("Not", "HardSwish") or b.opset >= 14]
    op = b.choice(ops)
    source = b.pick(lambda v: b.allowed(op, v.dtype) and (op not in DISCONTINUOUS or v.exact)
                    and (op not in ("Floor", "Ceil", "Round") or v.dtype != "float16" or b.uses("float16-rounding")), empty_ok=True)
    if source is None:
        return
    dtype = "bool" if op in ("IsNaN", "IsInf") else source.dtype
    exact = source.exact and op in EXACT_UNARY
    bound = {"Exp": math.exp(min(source.bound, 700.0)), "Reciprocal": math.inf, "Log": math.inf, "Sqrt": math.inf,
             "Softplus": source.bound + 1, "Elu": source.bound + 1, "HardSwish": source.bound}.get(op)
    if bound is None:
        bound = 1.0 if op in ("Sigmoid", "Tanh", "Erf", "HardSigmoid", "Softsign", "Sin", "Cos", "Sign") else source.bound
    if not math.isfinite(source.bound):
        bound = math.inf
    attrs = {"alpha": 0.25} if op in ("LeakyRelu", "HardSigmoid") else {}
    b.node(op, [source], attrs, dtype=dtype, shape=source.shape, exact=exact, bound=bound)


def block_binary(b: Builder) -> None:
    op = b.choice(BINARY)
    a = b.pick(lambda v: b.allowed(op, v.dtype) and (op not in COMPARISONS or v.exact), empty_ok=True)
    if a is None:
        return
    int_division = op in ("Div", "Mod") and a.dtype in INTS
    partners = [v for v in b.values if v.dtype == a.dtype and broadcast(a.shape, v.shape) is not None
                and (op not in COMPARISONS or v.exact)]
    if partners and not int_division and op not in ("Pow",) and b.flip(2):
        other = partners[-1 - b.draw(st.integers(0, len(partners) - 1))]
        if op in ("Div", "Mod") and not (other.exact and a.exact):
            return
    else:
        shape = _broadcast_partner_shape(b, a.shape)
        if op == "Pow":
            other = b.constant(np.array(b.choice([2.0, 3.0, 0.5, 1.0]), a.dtype))
        elif int_division:
            # Integer division by zero is SIGFPE in onnxruntime: the divisor is a constant with no zero.
            other = b.random_constant(a.dtype, shape, positive=True)
        elif a.dtype in FLOATS and b.flip(4):
            neutral = 0.0 if op in ("Add", "Sub") else 1.0  # x+0, x*1, x/1: eliminate-noops
            other = b.constant(np.full(shape, neutral, a.dtype), as_node=b.flip(2))
        else:
            other = b.random_constant(a.dtype, shape)
    if b.flip(2) and op in ("Add", "Mul", "Max", "Min", "Equal", "And", "Or", "Xor"):
        a, other = other, a
    shape = broadcast(a.shape, other.shape)
    dtype = "bool" if op in COMPARISONS else a.dtype
    exact = a.exact and other.exact and op in {"Max", "Min"} | COMPARISONS | LOGICAL
    bounds = (a.bound, other.bound)
    bound = {"Add": sum(bounds), "Sub": sum(bounds), "Mul": bounds[0] * bounds[1], "Max": max(bounds),
             "Min": max(bounds), "Mod": bounds[1]}.get(op, math.inf if dtype in FLOATS else 1.0)
    if op == "Div" and other.constant is not None and a.dtype in INTS:
        bound = bounds[0]
    elif op == "Div" and other.constant is not None and np.all(np.abs(other.constant.astype(np.float64)) >= 1):
        bound = bounds[0]
    attrs = {"fmod": 1} if op == "Mod" and a.dtype in FLOATS else {}
    if op == "Mod" and a.dtype in FLOATS and not (a.exact and other.exact):
        return
    b.node(op, [a, other], attrs, dtype=dtype, shape=shape, exact=exact, bound=bound)


def block_where(b: Builder) -> None:
    condition = b.pick(lambda v: v.dtype == "bool", empty_ok=True)
    if condition is None:
        return
    x = b.pick(lambda v: v.dtype in FLOATS + INTS and broadcast(condition.shape, v.shape) is not None, empty_ok=True)
    if x is None:
        return
    y = b.random_constant(x.dtype, _broadcast_partner_shape(b, x.shape))
    shape = broadcast(broadcast(condition.shape, x.shape), y.shape)
    b.node("Where", [condition, x, y], dtype=x.dtype, shape=shape, exact=x.exact, bound=max(x.bound, y.bound))


def block_cast_chain(b: Builder) -> None:
    """Casts in a row (fuse-casts): widening round trips, and narrowing ones it must keep."""
    source = b.pick(empty_ok=True)
    if source is None:
        return
    value = source
    smalls = SMALL_INTS if "small-ints" in b.features else ()
    for _ in range(b.draw(st.integers(1, 3))):
        targets = [dtype for dtype in DTYPES + smalls if _cast_ok(value, dtype)]
        target = b.choice(targets + [source.dtype] * (source.dtype in targets))
        if target in SMALL_INTS:
            b.uses("small-ints")
        exact = value.exact and (target not in FLOATS or value.dtype not in FLOATS or
                                 np.dtype(target).itemsize >= np.dtype(value.dtype).itemsize)
        bound = 1.0 if target == "bool" else (min(value.bound, 65504.0) if target == "float16" else value.bound)
        if target in SMALL_INTS:
            bound = _wrapped_bound(value, target)
        value = b.node("Cast", [value], {"to": helper.np_dtype_to_tensor_dtype(np.dtype(target))},
                       dtype=target, shape=value.shape, exact=exact, bound=bound)


def _wrapped_bound(value: Value, target: str) -> float:
    """|x| after a Cast to a narrow integer: as before where it fits, else the type's widest (it wraps)."""
    info = np.iinfo(target)
    fits = value.bound <= info.max and (info.min < 0 or value.dtype in ("bool",) or np.dtype(value.dtype).kind == "u")
    return value.bound if fits else float(max(-int(info.min), int(info.max)))


def _cast_ok(value: Value, target: str) -> bool:
    if value.dtype in FLOATS and target in SMALL_INTS:
        # Float -> narrow int is defined only in range (and an unsigned one never takes a negative).
        return value.exact and np.iinfo(target).min < 0 and value.bound < np.iinfo(target).max
    if value.dtype in FLOATS and target in INTS:
        # Out-of-range or non-finite float -> int is undefined behaviour; inexact values round either way.
        return value.exact and value.bound < 2**31
    if value.dtype in FLOATS and target == "bool":
        return value.exact
    if value.dtype in INTS + SMALL_INTS and target == "float16":
        return value.bound < 2048  # exactly representable
    return True


def _permutation(b: Builder, rank: int) -> list[int]:
    return b.draw(st.permutations(list(range(rank))))


def block_transpose_chain(b: Builder) -> None:
    """Transposes in a row (fuse-transposes); sometimes the second undoes the first."""
    source = b.pick(lambda v: v.rank >= 2, empty_ok=True)
    if source is None:
        return
    value = source
    for step in range(b.draw(st.integers(1, 3))):
        perm = _permutation(b, value.rank)
        if step and b.flip(2):
            perm = list(np.argsort(previous))  # the inverse: the pair cancels
        value = b.node("Transpose", [value], {"perm": [int(axis) for axis in perm]}, dtype=value.dtype,
                       shape=tuple(value.shape[axis] for axis in perm), exact=value.exact, bound=value.bound)
        previous = perm


def _factorizations(size: int) -> list[list[int]]:
    shapes = [[size], [size, 1], [1, size]]
    for first in range(2, size):
        if size % first == 0:
            shapes.append([first, size // first])
    return shapes


def block_reshape_chain(b: Builder) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze in a row (fuse-reshapes, eliminate-noops)."""
    value = b.pick(lambda v: v.rank >= 1)
    if value is None:
        return
    for _ in range(b.draw(st.integers(1, 3))):
        kind = b.choice(["Reshape", "Unsqueeze", "Squeeze", "Flatten"])
        if kind == "Unsqueeze" and value.rank < 5:
            axis = b.draw(st.integers(-value.rank - 1, value.rank))
            inputs, attrs = [value], {}
            b.opset_axes("Unsqueeze", [axis], inputs, attrs)
            shape = list(value.shape)
            shape.insert(axis if axis >= 0 else value.rank + 1 + axis, 1)
            value = b.node("Unsqueeze", inputs, attrs, dtype=value.dtype, shape=tuple(shape), exact=value.exact,
                           bound=value.bound)
        elif kind == "Squeeze" and 1 in value.shape:
            axes = [axis for axis, dim in enumerate(value.shape) if dim == 1]
            chosen = sorted(set(b.draw(st.lists(st.sampled_from(axes), min_size=1, max_size=len(axes)))))
            inputs, attrs = [value], {}
            if b.flip(4) and value.static:
                chosen = axes  # no axes: every 1-dim (never with N, which is 1 at one size)
            else:
                b.opset_axes("Squeeze", chosen, inputs, attrs)
            shape = tuple(dim for axis, dim in enumerate(value.shape) if axis not in chosen)
            value = b.node("Squeeze", inputs, attrs, dtype=value.dtype, shape=shape, exact=value.exact, bound=value.bound)
        elif kind == "Flatten":
            axis = b.draw(st.integers(0, value.rank))
            head, tail = value.shape[:axis], value.shape[axis:]
            if (DIM in head and len(head) > 1) or DIM in tail and (len(tail) > 1 or head):
                continue
            shape = (head[0] if head == (DIM,) else static_size(head), tail[0] if tail == (DIM,) else static_size(tail))
            value = b.node("Flatten", [value], {"axis": axis}, dtype=value.dtype, shape=shape, exact=value.exact,
                           bound=value.bound)
        else:
            value = _reshape(b, value)


def _reshape(b: Builder, value: Value) -> Value:
    """Reshape to a random shape of the same size; with N, the dims up to N are copied (0) or N is -1."""
    if value.static:
        dims = b.choice(_factorizations(static_size(value.shape)))
        target = list(dims)
        if b.flip(3):
            target[b.draw(st.integers(0, len(target) - 1))] = -1
        shape = tuple(dims)
    else:
        at = value.shape.index(DIM)
        rest = b.choice(_factorizations(static_size(value.shape[at + 1:])))
        prefix = value.shape[:at]
        if b.flip(2) and not prefix:
            target, shape = [-1] + rest, (DIM, *rest)
        else:
            target, shape = [0] * (at + 1) + rest, (*prefix, DIM, *rest)
    return b.node("Reshape", [value, b.constant(np.array(target, np.int64), as_node=b.flip(3))],
                  dtype=value.dtype, shape=shape, exact=value.exact, bound=value.bound)


def block_shape_arithmetic(b: Builder) -> None:
    """Shape -> Gather/Slice -> Concat -> Reshape, Size, ConstantOfShape (fold-shapes)."""
    value = b.pick(lambda v: v.rank >= 1)
    if value is None:
        return
    shape_of = b.node("Shape", [value], dtype="int64", shape=(value.rank,), keep=False)
    kinds = ["reshape", "gather", "constant-of-shape", "size", "expand"] + ["small-int"] * ("small-ints" in b.features)
    kind = b.choice(kinds)
    if kind == "reshape":
        # Reshape(x, Concat(Shape(x)[:k], [static rest])): the classic exported flatten.
        k = b.draw(st.integers(1, value.rank))
        if DIM in value.shape[k:]:
            k = value.shape.index(DIM) + 1
        head = b.node("Slice", [shape_of, b.constant(np.array([0], np.int64)), b.constant(np.array([k], np.int64))],
                      dtype="int64", shape=(k,), keep=False)
        rest = static_size(value.shape[k:])
        target = b.node("Concat", [head, b.constant(np.array([rest], np.int64))], {"axis": 0}, dtype="int64",
                        shape=(k + 1,), keep=False)
        b.node("Reshape", [value, target], dtype=value.dtype, shape=(*value.shape[:k], rest), exact=value.exact,
               bound=value.bound)
    elif kind == "gather":
        axis = b.draw(st.integers(0, value.rank - 1))
        dim = b.node("Gather", [shape_of, b.constant(np.array(axis, np.int64))], {"axis": 0}, dtype="int64",
                     shape=(), keep=False)
        scaled = b.node(b.choice(["Mul", "Add", "Sub"]), [dim, b.constant(np.array(2, np.int64))], dtype="int64",
                        shape=(), bound=2 * 5 + 2, keep=False)
        b.node("Cast", [scaled], {"to": helper.TensorProto.FLOAT}, dtype="float32", shape=(), bound=12.0)
    elif kind == "small-int":
        # A dim minus a constant (negative at N=1) cast to a narrow integer wraps: fold-shapes must wrap alike.
        b.uses("small-ints")
        axis = b.draw(st.integers(0, value.rank - 1))
        dim = b.node("Gather", [shape_of, b.constant(np.array([axis], np.int64))], {"axis": 0}, dtype="int64",
                     shape=(1,), keep=False)
        shifted = b.node("Sub", [dim, b.constant(np.array([b.draw(st.integers(0, 6))], np.int64))], dtype="int64",
                         shape=(1,), keep=False)
        target = b.choice(SMALL_INTS)
        narrow = b.node("Cast", [shifted], {"to": helper.np_dtype_to_tensor_dtype(np.dtype(target))}, dtype=target,
                        shape=(1,), keep=False)
        b.node("Cast", [narrow], {"to": helper.TensorProto.FLOAT}, dtype="float32", shape=(1,),
               bound=float(np.iinfo(target).max))
    elif kind == "constant-of-shape":
        fill = onnx.numpy_helper.from_array(np.array([1.5], np.float32))
        b.node("ConstantOfShape", [shape_of], {"value": fill}, dtype="float32", shape=value.shape, bound=1.5)
    elif kind == "size":
        size = b.node("Size", [value], dtype="int64", shape=(), keep=False)
        b.node("Cast", [size], {"to": helper.TensorProto.FLOAT}, dtype="float32", shape=(), bound=1e4)
    else:
        # Expand a broadcastable partner to x's shape, by a shape computed from x.
        small = b.random_constant(value.dtype, _broadcast_partner_shape(b, value.shape))
        b.node("Expand", [small, shape_of], dtype=value.dtype, shape=value.shape, exact=small.exact, bound=small.bound)


def block_slice_gather_concat(b: Builder) -> None:
    """Slice, Squeeze(Slice(i, i+1)) (fuse-slice-squeeze), Gather with constant indices, Concat, Pad."""
    value = b.pick(lambda v: v.rank >= 1 and any(dim != DIM for dim in v.shape))
    if value is None:
        return
    axes = [axis for axis, dim in enumerate(value.shape) if dim != DIM]
    axis = b.choice(axes)
    size = value.shape[axis]
    kind = b.choice(["slice", "slice-squeeze", "gather", "concat"] + ["pad"] * (value.dtype not in ("uint16", "int16")))
    keep = dict(dtype=value.dtype, exact=value.exact, bound=value.bound)
    if kind == "slice":
        start = b.draw(st.integers(0, size - 1))
        end = b.choice([size, start + 1, 2**63 - 1, -1 if size - 1 > start else size])
        step = b.choice([1, 1, 2])
        length = len(range(*slice(start, end, step).indices(size)))
        inputs = [value] + [b.constant(np.array([x], np.int64)) for x in (start, end, axis, step)]
        b.node("Slice", inputs, shape=value.shape[:axis] + (length,) + value.shape[axis + 1:], **keep)
    elif kind == "slice-squeeze":
        index = b.draw(st.integers(0, size - 1))
        inputs = [value] + [b.constant(np.array([x], np.int64)) for x in (index, index + 1, axis)]
        sliced = b.node("Slice", inputs, shape=value.shape[:axis] + (1,) + value.shape[axis + 1:], keep=False, **keep)
        squeeze_inputs, attrs = [sliced], {}
        b.opset_axes("Squeeze", [axis], squeeze_inputs, attrs)
        b.node("Squeeze", squeeze_inputs, attrs, shape=value.shape[:axis] + value.shape[axis + 1:], **keep)
    elif kind == "gather":
        count = b.draw(st.integers(0, 2))
        indices = np.array(b.draw(st.lists(st.integers(-size, size - 1), min_size=max(count, 1), max_size=max(count, 1))),
                           np.int64)
        indices = indices.reshape(()) if count == 0 else indices
        b.node("Gather", [value, b.constant(indices)], {"axis": axis},
               shape=value.shape[:axis] + indices.shape + value.shape[axis + 1:], **keep)
    elif kind == "concat":
        parts = [value] + [v for v in b.values if v is not value and v.dtype == value.dtype and v.rank == value.rank
                           and all(d == e for i, (d, e) in enumerate(zip(v.shape, value.shape)) if i != axis)
                           and v.shape[axis] != DIM][:2]
        if len(parts) == 1 or b.flip(2):
            parts.append(value)  # x twice: Concat of a tensor with itself
        total = sum(part.shape[axis] for part in parts)
        b.node("Concat", parts, {"axis": axis}, dtype=value.dtype, shape=value.shape[:axis] + (total,) + value.shape[axis + 1:],
               exact=all(part.exact for part in parts), bound=max(part.bound for part in parts))
    else:
        pads = [0] * (2 * value.rank)
        if b.flip(2):
            pads[axis] = b.draw(st.integers(0, 2))
            pads[value.rank + axis] = b.draw(st.integers(0, 2))
        shape = tuple(dim + pads[i] + pads[value.rank + i] if dim != DIM else dim for i, dim in enumerate(value.shape))
        b.node("Pad", [value, b.constant(np.array(pads, np.int64))], shape=shape, **keep)


def block_reduce(b: Builder) -> None:
    op = b.choice(["ReduceSum", "ReduceMean", "ReduceMax"])
    value = b.pick(lambda v: v.rank >= 1 and b.allowed(op, v.dtype))
    if value is None:
        return
    axes = sorted(set(b.draw(st.lists(st.integers(0, value.rank - 1), min_size=1, max_size=value.rank))))
    keepdims = b.choice([0, 1])
    inputs, attrs = [value], {"keepdims": keepdims}
    b.opset_axes(op, axes, inputs, attrs)
    shape = tuple(1 if axis in axes else dim for axis, dim in enumerate(value.shape) if keepdims or axis not in axes)
    exact = value.exact and op == "ReduceMax"
    bound = value.bound * (1 if op != "ReduceSum" else 3 ** len(axes) * max(static_size(value.shape), 1))
    b.node(op, inputs, attrs, dtype=value.dtype, shape=shape, exact=exact, bound=bound)


def block_repeat(b: Builder) -> None:
    """A node again with the same inputs and attributes, both results used (CSE)."""
    candidates = [node for node in b.nodes if node.op_type not in ("Constant",) and len(node.output) == 1]
    by_name = {value.name: value for value in b.values}
    candidates = [node for node in candidates if node.output[0] in by_name]
    if not candidates:
        return
    node = candidates[-1 - b.draw(st.integers(0, len(candidates) - 1))]
    original = by_name[node.output[0]]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.output[0] = b.fresh("t")
    copy.name = ""
    b.nodes.append(copy)
    twin = Value(copy.output[0], original.dtype, original.shape, original.exact, original.bound)
    if original.dtype in FLOATS + INTS and b.allowed("Add", original.dtype):
        b.node("Add", [original, twin], dtype=original.dtype, shape=original.shape, exact=False,
               bound=2 * original.bound)
    else:
        b.values.append(twin)


def block_constant_subgraph(b: Builder) -> None:
    """Arithmetic over constants only (fold-constants), then combined with a variable."""
    value = b.pick(lambda v: v.dtype in ("float32", "float64", "int64", "int32") and b.allowed("Add", v.dtype), empty_ok=True)
    if value is None:
        return
    shape = _broadcast_partner_shape(b, value.shape)
    left, right = b.random_constant(value.dtype, shape), b.random_constant(value.dtype, shape)
    op = b.choice(["Add", "Mul", "Sub", "Max"])
    folded = b.node(op, [left, right], dtype=value.dtype, shape=shape, exact=False, keep=False,
                    bound=left.bound * right.bound + left.bound + right.bound)
    if b.flip(2):
        folded = b.node("Neg", [folded], dtype=value.dtype, shape=shape, exact=False, keep=False, bound=folded.bound)
    b.node("Add", [value, folded], dtype=value.dtype, shape=broadcast(value.shape, shape), exact=False,
           bound=value.bound + folded.bound)


def block_noop(b: Builder) -> None:
    """Nodes that change nothing: Identity, Dropout, Expand/Reshape to the same shape, identity Transpose."""
    value = b.pick(empty_ok=True)
    if value is None:
        return
    kind = b.choice(["Identity", "Dropout", "Transpose", "Expand", "Reshape"])
    keep = dict(dtype=value.dtype, shape=value.shape, exact=value.exact, bound=value.bound)
    if kind == "Dropout" and value.is_float:
        b.node("Dropout", [value], **keep)
    elif kind == "Transpose" and value.rank:
        b.node("Transpose", [value], {"perm": list(range(value.rank))}, **keep)
    elif kind == "Expand" and value.static:
        b.node("Expand", [value, b.constant(np.array(value.shape, np.int64))], **keep)
    elif kind == "Reshape" and value.static:
        b.node("Reshape", [value, b.constant(np.array(value.shape, np.int64))], **keep)
    else:
        b.node("Identity", [value], **keep)


def _nchw(b: Builder) -> Value:
    """A float rank-4 value with static channels, or a new input [N, C, H, W]."""
    existing = b.pick(lambda v: v.rank == 4 and v.dtype in ("float32", "float64") and v.shape[1] != DIM
                      and all(dim != DIM for dim in v.shape[2:]) and b.allowed("Conv", v.dtype))
    if existing is not None and b.flip(2):
        return existing
    dtype = b.choice(["float32", "float32", "float64"]) if b.allowed("Conv", "float64") else "float32"
    return b.input(dtype, (b.choice([DIM, 1, 2]), b.draw(st.integers(1, 4)), b.draw(st.integers(3, 6)),
                           b.draw(st.integers(3, 6))))


def block_conv(b: Builder) -> None:
    """Pad -> Conv -> BatchNormalization / per-channel Add, Mul -> Relu or HardSwish (the fusions)."""
    x = _nchw(b)
    channels = x.shape[1]
    if b.flip(3):  # a per-input-channel scale: fold-scale-into-weights
        x = b.node("Mul", [x, b.random_constant(x.dtype, (channels, 1, 1), positive=True)], dtype=x.dtype,
                   shape=x.shape, exact=False, bound=x.bound * 4, keep=False)
    pads = [0, 0, 0, 0]
    if b.flip(3):
        pad_values = [0, 0, 1, 1, 0, 0, 1, 1]
        x = b.node("Pad", [x, b.constant(np.array(pad_values, np.int64))], dtype=x.dtype,
                   shape=(x.shape[0], channels, x.shape[2] + 2, x.shape[3] + 2), exact=x.exact, bound=x.bound, keep=False)
    else:
        pads = b.choice([[0, 0, 0, 0], [1, 1, 1, 1]])
    group = channels if channels > 1 and b.flip(4) else 1
    out_channels = channels if group > 1 else b.draw(st.integers(1, 4))
    kernel = b.choice([1, 3])
    stride = b.choice([1, 1, 2])
    weight = b.constant((b.rng.standard_normal((out_channels, channels // group, kernel, kernel)) * 0.5).astype(x.dtype))
    inputs = [x, weight]
    if b.flip(2):
        inputs.append(b.constant(b.rng.standard_normal(out_channels).astype(x.dtype)))
    spatial = [(dim + pads[i] + pads[i + 2] - kernel) // stride + 1 for i, dim in enumerate(x.shape[2:])]
    if min(spatial) < 1:
        return
    shape = (x.shape[0], out_channels, *spatial)
    bound = x.bound * (kernel * kernel * channels) * 2 + 3
    y = b.node("Conv", inputs, {"kernel_shape": [kernel, kernel], "pads": pads, "strides": [stride, stride], "group": group},
               dtype=x.dtype, shape=shape, exact=False, bound=bound)
    y = _affine_tail(b, y, out_channels, (out_channels, 1, 1))
    tail = b.choice(["none", "Relu", "HardSwish", "hard-swish-pattern"])
    if tail == "Relu":
        b.node("Relu", [y], dtype=y.dtype, shape=y.shape, exact=False, bound=y.bound)
    elif tail == "hard-swish-pattern":
        _hard_swish_pattern(b, y)


def _affine_tail(b: Builder, y: Value, channels: int, channel_shape: tuple) -> Value:
    """BatchNormalization or per-channel Mul/Add/Sub/Div constants after a linear op."""
    for _ in range(b.draw(st.integers(0, 2))):
        kind = b.choice(["bn", "Add", "Mul", "Sub", "Div"])
        if kind == "bn" and y.rank >= 2 and y.shape[1] == channels:
            stats = [b.rng.uniform(0.5, 1.5, channels), b.rng.standard_normal(channels), b.rng.standard_normal(channels),
                     b.rng.uniform(0.5, 2.0, channels)]
            y = b.node("BatchNormalization", [y] + [b.constant(s.astype(y.dtype)) for s in stats], {"epsilon": 1e-5},
                       dtype=y.dtype, shape=y.shape, exact=False, bound=y.bound * 3 + 3)
        elif kind != "bn":
            shape = channel_shape if b.flip(3) or kind == "Div" else b.choice([channel_shape, (1,), ()])
            constant = b.random_constant(y.dtype, shape, positive=kind in ("Div", "Mul"))
            y = b.node(kind, [y, constant], dtype=y.dtype, shape=broadcast(y.shape, constant.shape), exact=False,
                       bound=y.bound * (constant.bound + 1) + constant.bound)
    return y


def _hard_swish_pattern(b: Builder, x: Value) -> None:
    """x * clip(x + 3, 0, 6) / 6: fuse-hard-sigmoid makes it HardSwish."""
    def scalar(number):
        return b.constant(np.array(number, x.dtype))
    shifted = b.node("Add", [x, scalar(3.0)], dtype=x.dtype, shape=x.shape, exact=False, keep=False)
    clipped = b.node("Clip", [shifted, scalar(0.0), scalar(6.0)], dtype=x.dtype, shape=x.shape, exact=False, keep=False)
    gate = b.node("Div", [clipped, scalar(6.0)], dtype=x.dtype, shape=x.shape, exact=False, keep=False)
    b.node("Mul", [x, gate], dtype=x.dtype, shape=x.shape, exact=False, bound=x.bound)


def block_matmul(b: Builder) -> None:
    """MatMul by a constant weight (+ bias), or Gemm (+ BatchNormalization, per-channel Mul)."""
    x = b.pick(lambda v: v.rank >= 1 and v.shape[-1] != DIM and v.dtype in ("float32", "float64")
               and b.allowed("MatMul", v.dtype))
    if x is None or b.flip(3):
        x = b.input("float32", (DIM, b.draw(st.integers(1, 6))))
    k = x.shape[-1]
    n = b.draw(st.integers(1, 5))
    weight = b.constant((b.rng.standard_normal((k, n)) * 0.5).astype(x.dtype))
    bound = x.bound * k + 3
    if x.rank == 2 and b.allowed("Gemm", x.dtype) and b.flip(2):
        trans_b = b.choice([0, 1])
        if trans_b:
            weight = b.constant(np.ascontiguousarray(weight.constant.T))
        inputs = [x, weight] + ([b.constant(b.rng.standard_normal(n).astype(x.dtype))] if b.flip(2) else [])
        y = b.node("Gemm", inputs, {"transB": trans_b, "alpha": b.choice([1.0, 0.5])}, dtype=x.dtype, shape=(x.shape[0], n),
                   exact=False, bound=bound)
        _affine_tail(b, y, n, (n,))
        return
    shape = x.shape[:-1] + (n,) if x.rank >= 2 else (n,)
    y = b.node("MatMul", [x, weight], dtype=x.dtype, shape=shape, exact=False, bound=bound)
    _affine_tail(b, y, n, (n,))


def block_layer_chain(b: Builder) -> None:
    """Two layers in a row, the second reading the first's channels through per-channel ops (a
    channel group pruning can cut): Conv -> [affine] -> activation [-> pool] -> Conv, or
    MatMul/Gemm -> [affine] -> activation -> MatMul."""
    activation = b.choice(["Relu", "Relu", "Sigmoid", "LeakyRelu", "HardSwish" if b.opset >= 14 else "Relu", "Identity"])
    attrs = {"alpha": 0.25} if activation == "LeakyRelu" else {}
    width = b.draw(st.integers(2, 8))
    if b.flip(2):
        x = _nchw(b)
        kernel = b.choice([1, 3])
        pads = [kernel // 2] * 4
        first = b.node("Conv", [x, b.constant((b.rng.standard_normal((width, x.shape[1], kernel, kernel)) * 0.5).astype(x.dtype)),
                                b.constant(b.rng.standard_normal(width).astype(x.dtype))],
                       {"kernel_shape": [kernel, kernel], "pads": pads}, dtype=x.dtype, shape=(x.shape[0], width, *x.shape[2:]),
                       exact=False, bound=x.bound * kernel * kernel * x.shape[1] * 2 + 3, keep=False)
        first = _affine_tail(b, first, width, (width, 1, 1))
        hidden = b.node(activation, [first], attrs, dtype=x.dtype, shape=first.shape, exact=False, bound=first.bound, keep=False)
        if b.flip(3) and min(hidden.shape[2:]) >= 2:
            hidden = b.node("MaxPool", [hidden], {"kernel_shape": [2, 2]}, dtype=x.dtype,
                            shape=(*hidden.shape[:2], hidden.shape[2] - 1, hidden.shape[3] - 1), exact=False, bound=hidden.bound,
                            keep=False)
        out = b.draw(st.integers(1, 4))
        b.node("Conv", [hidden, b.constant((b.rng.standard_normal((out, width, 1, 1)) * 0.5).astype(x.dtype))],
               {"kernel_shape": [1, 1]}, dtype=x.dtype, shape=(hidden.shape[0], out, *hidden.shape[2:]), exact=False,
               bound=hidden.bound * width * 2 + 3)
        return
    x = b.pick(lambda v: v.rank in (2, 3) and v.shape[-1] != DIM and v.dtype == "float32")
    if x is None or b.flip(3):
        x = b.input("float32", (DIM, b.draw(st.integers(1, 6))))
    k = x.shape[-1]
    weight = b.constant((b.rng.standard_normal((k, width)) * 0.5).astype(x.dtype))
    if x.rank == 2 and b.flip(2):
        first = b.node("Gemm", [x, weight, b.constant(b.rng.standard_normal(width).astype(x.dtype))], dtype=x.dtype,
                       shape=(x.shape[0], width), exact=False, bound=x.bound * k + 3, keep=False)
    else:
        first = b.node("MatMul", [x, weight], dtype=x.dtype, shape=(*x.shape[:-1], width), exact=False,
                       bound=x.bound * k + 3, keep=False)
    first = _affine_tail(b, first, width, (width,))
    hidden = b.node(activation, [first], attrs, dtype=x.dtype, shape=first.shape, exact=False, bound=first.bound, keep=False)
    out = b.draw(st.integers(1, 4))
    b.node("MatMul", [hidden, b.constant((b.rng.standard_normal((width, out)) * 0.5).astype(x.dtype))], dtype=x.dtype,
           shape=(*hidden.shape[:-1], out), exact=False, bound=hidden.bound * width + 3)


def block_parallel_matmuls(b: Builder) -> None:
    """Several MatMuls (with or without bias Adds) or Gemms reading one value (merge-parallel-matmuls),
    or a MatMul of two matrices and an Add that Gemm's C can hold (fuse-matmul-add)."""
    x = b.pick(lambda v: v.rank >= 1 and v.shape[-1] != DIM and v.dtype in ("float32", "float64")
               and b.allowed("MatMul", v.dtype))
    if x is None or b.flip(3):
        x = b.input(b.choice(["float32", "float32", "float64"]), (DIM, b.draw(st.integers(1, 6))))
    k = x.shape[-1]
    if x.rank == 2 and b.flip(4) and b.allowed("Gemm", x.dtype):  # MatMul + Add with a variable B and C
        n = b.draw(st.integers(1, 4))
        weight = b.input(x.dtype, (k, n))
        product = b.node("MatMul", [x, weight], dtype=x.dtype, shape=(x.shape[0], n), exact=False,
                         bound=x.bound * weight.bound * k, keep=False)
        c_shape = b.choice([(n,), (1, n), (x.shape[0], 1), (x.shape[0], n), (), (1,)])
        if b.flip(2):
            c = b.input(x.dtype, c_shape)
        else:  # a constant has no N: 1 broadcasts in its place
            c = b.random_constant(x.dtype, tuple(1 if dim == DIM else dim for dim in c_shape))
        b.node("Add", [product, c] if b.flip(2) else [c, product], dtype=x.dtype, shape=product.shape, exact=False,
               bound=product.bound + c.bound)
        return
    gemm = x.rank == 2 and b.allowed("Gemm", x.dtype) and b.flip(3)
    alpha = b.choice([1.0, 0.5])
    for _ in range(b.draw(st.integers(2, 4))):
        n = b.draw(st.integers(1, 5))
        weight = (b.rng.standard_normal((k, n)) * 0.5).astype(x.dtype)
        bias = b.rng.standard_normal(b.choice([(n,), (1, n), ()] if x.rank >= 2 else [(n,), ()])).astype(x.dtype)
        bias = np.asarray(bias)
        bound = x.bound * k + 3
        shape = x.shape[:-1] + (n,)
        if gemm:
            trans_b = b.choice([0, 1])
            inputs = [x, b.constant(np.ascontiguousarray(weight.T) if trans_b else weight)]
            if b.flip(3):
                inputs.append(b.constant(np.broadcast_to(bias.reshape(-1)[:n], (n,)).copy()))
            b.node("Gemm", inputs, {"transB": trans_b, "alpha": alpha if b.flip(4) else 1.0}, dtype=x.dtype, shape=shape,
                   exact=False, bound=bound)
            continue
        y = b.node("MatMul", [x, b.constant(weight)], dtype=x.dtype, shape=shape, exact=False, bound=bound, keep=False)
        if b.flip(4):
            b.values.append(y)
        elif bias.ndim <= y.rank:
            constant = b.constant(bias)
            b.node("Add", [y, constant] if b.flip(2) else [constant, y], dtype=x.dtype, shape=shape, exact=False,
                   bound=bound + float(np.abs(bias).max()))


def block_view_elementwise(b: Builder) -> None:
    """Reshape to another view, elementwise ops with scalar or last-axis constants, and a Reshape back
    (sink-reshapes): rows [N·a, c] viewed as [N, a, c], or the other way round."""
    x = b.pick(lambda v: v.rank in (2, 3) and v.is_float and v.shape[-1] != DIM and v.shape.count(DIM) <= 1
               and all(dim == DIM or dim > 0 for dim in v.shape))
    if x is None:
        return
    columns = x.shape[-1]
    view = (-1, columns) if x.rank == 3 else (-1, 1, columns)
    view_shape = (DIM if DIM in x.shape else static_size(x.shape[:-1]), columns) if x.rank == 3 else (x.shape[0], 1, columns)
    viewed = b.node("Reshape", [x, b.constant(np.array(view, np.int64))], dtype=x.dtype, shape=view_shape,
                    exact=x.exact, bound=x.bound, keep=False)
    value = viewed
    for _ in range(b.draw(st.integers(1, 3))):
        op = b.choice([op for op in ("Tanh", "Relu", "Mul", "Add", "Sigmoid") if b.allowed(op, x.dtype)] or ["Identity"])
        if op in ("Mul", "Add"):
            shape = b.choice([(), (1,), (columns,)])
            constant = b.random_constant(x.dtype, shape)
            value = b.node(op, [value, constant], dtype=x.dtype, shape=value.shape, exact=False,
                           bound=value.bound * (constant.bound + 1) + constant.bound, keep=False)
        else:
            value = b.node(op, [value], dtype=x.dtype, shape=value.shape, exact=False,
                           bound=1.0 if op in ("Tanh", "Sigmoid") else value.bound, keep=False)
    back = tuple(-1 if dim == DIM else dim for dim in x.shape)
    if DIM not in x.shape:
        back = (-1,) + back[1:]
    b.node("Reshape", [value, b.constant(np.array(back, np.int64))], dtype=x.dtype, shape=x.shape, exact=False,
           bound=value.bound)


def block_transposed_elementwise(b: Builder) -> None:
    """A Transpose, elementwise ops on its result with constants (permuted shapes, scalars) or other
    values transposed alike, then often the inverse Transpose (sink-transposes): ConvNeXt's NHWC
    Linear, layer scale and residual Add; sometimes after a MatMul + bias whose layer scale folds."""
    x = b.pick(lambda v: 2 <= v.rank <= 4 and v.dtype in ("float32", "float64") and b.allowed("Add", v.dtype))
    if x is None:
        return
    if x.shape[-1] != DIM and x.dtype == "float32" and b.flip(3):
        k = x.shape[-1]
        weight = b.constant((b.rng.standard_normal((k, k)) * 0.5).astype(x.dtype))
        product = b.node("MatMul", [x, weight], dtype=x.dtype, shape=x.shape, exact=False, bound=x.bound * k, keep=False)
        x = b.node("Add", [product, b.constant(b.rng.standard_normal(k).astype(x.dtype))], dtype=x.dtype, shape=x.shape,
                   exact=False, bound=x.bound * k + 3, keep=b.flip(4))
    perm = [int(axis) for axis in _permutation(b, x.rank)]
    shape = tuple(x.shape[axis] for axis in perm)

    def transposed(value: Value, order: list[int]) -> Value:
        return b.node("Transpose", [value], {"perm": order}, dtype=value.dtype, shape=tuple(value.shape[axis] for axis in order),
                      exact=value.exact, bound=value.bound, keep=b.flip(4))

    value = transposed(x, perm)
    for _ in range(b.draw(st.integers(1, 3))):
        op = b.choice(["Relu", "Tanh", "Neg", "Mul", "Add", "Sub", "Max"])
        if op in ("Relu", "Tanh", "Neg"):
            value = b.node(op, [value], dtype=x.dtype, shape=shape, exact=False, bound=1.0 if op == "Tanh" else value.bound,
                           keep=b.flip(4))
            continue
        kind = b.choice(["constant", "constant", "transposed", "other-perm"])
        if kind == "constant":
            other = b.random_constant(x.dtype, _broadcast_partner_shape(b, shape))
        else:
            order = perm if kind == "transposed" else [int(axis) for axis in _permutation(b, x.rank)]
            partner = b.node("Sigmoid", [x], dtype=x.dtype, shape=x.shape, exact=False, bound=1.0, keep=False)
            other = transposed(partner, order)
            if other.shape != shape:
                return
        bound = value.bound * (other.bound + 1) if op == "Mul" else value.bound + other.bound
        operands = [value, other] if b.flip(2) else [other, value]
        value = b.node(op, operands, dtype=x.dtype, shape=shape, exact=False, bound=bound, keep=b.flip(4))
    if b.flip(3):
        b.values.append(value)
    else:
        inverse = [int(axis) for axis in np.argsort(perm)]
        b.node("Transpose", [value], {"perm": inverse}, dtype=value.dtype, shape=x.shape, exact=value.exact, bound=value.bound)


def block_recurrent(b: Builder) -> None:
    """An LSTM/GRU/RNN whose initial states are zeros made from the batch dim (eliminate-zero-rnn-states)."""
    op = b.choice(["LSTM", "GRU", "RNN"])
    steps, features, hidden = b.draw(st.integers(1, 3)), b.draw(st.integers(1, 4)), b.draw(st.integers(1, 4))
    x = b.input("float32", (steps, DIM, features))
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op] * hidden
    weights = [b.constant((b.rng.standard_normal(shape) * 0.5).astype(np.float32))
               for shape in ((1, gates, features), (1, gates, hidden), (1, 2 * gates))]
    batch = b.node("Gather", [b.node("Shape", [x], dtype="int64", shape=(3,), keep=False), b.constant(np.array([1], np.int64))],
                   dtype="int64", shape=(1,), keep=False)
    shape = b.node("Concat", [b.constant(np.array([2], np.int64)), batch, b.constant(np.array([hidden], np.int64))],
                   {"axis": 0}, dtype="int64", shape=(3,), keep=False)
    zeros = b.node("ConstantOfShape", [shape], {"value": onnx.numpy_helper.from_array(np.zeros(1, np.float32))},
                   dtype="float32", shape=(2, DIM, hidden), keep=False)
    state = b.node("Slice", [zeros, *(b.constant(np.array([value], np.int64)) for value in (1, 2, 0))], dtype="float32",
                   shape=(1, DIM, hidden), keep=False)
    inputs = [x, *weights, None, state] + ([state] if op == "LSTM" else [])  # no sequence_lens
    b.node(op, inputs, {"hidden_size": hidden}, dtype="float32", shape=(steps, 1, DIM, hidden), exact=False, bound=1.0, outputs=2)


def block_focus(b: Builder) -> None:
    """Four strided Slices of an image and their Concat on channels, sometimes into a Conv (fuse-space-to-depth)."""
    dtype = b.choice(["float32", "float32", "float64"])
    x = b.input(dtype, (b.choice([DIM, 1]), b.draw(st.integers(1, 3)), 2 * b.draw(st.integers(1, 3)), 2 * b.draw(st.integers(1, 3))))
    offsets = [(0, 0), (1, 0), (0, 1), (1, 1)]
    order = [offsets[index] for index in b.rng.permutation(4)]
    end = np.iinfo(np.int64).max
    pieces = []
    for row, column in order:
        bounds = [np.array(values, np.int64) for values in ([row, column], [end, end], [2, 3], [2, 2])]
        pieces.append(b.node("Slice", [x, *(b.constant(bound) for bound in bounds)], dtype=dtype,
                             shape=(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2), bound=x.bound, keep=False))
    joined = b.node("Concat", pieces, {"axis": 1}, dtype=dtype, shape=(x.shape[0], 4 * x.shape[1], x.shape[2] // 2, x.shape[3] // 2),
                    bound=x.bound, keep=dtype != "float32")
    if dtype == "float32":
        out = b.draw(st.integers(1, 3))
        weight = b.constant((b.rng.standard_normal((out, 4 * x.shape[1], 1, 1)) * 0.5).astype(dtype))
        b.node("Conv", [joined, weight], {"kernel_shape": [1, 1]}, dtype=dtype, shape=(x.shape[0], out, *joined.shape[2:]),
               exact=False, bound=x.bound * 4 * x.shape[1] + 3)


def block_if(b: Builder) -> None:
    """If on a constant condition (inline-constant-if) or on a computed one; branches read outer values."""
    value = b.pick(lambda v: v.dtype in FLOATS + INTS and b.allowed("Neg", v.dtype) and b.allowed("Add", v.dtype))
    if value is None or not b.uses("control-flow"):
        return
    constant_condition = b.flip(2)
    if constant_condition:
        condition = b.constant(np.array(b.choice([True, False])), as_node=b.flip(2))
    else:
        # A scalar bool computed at run time: the sign of the first element.
        flat = b.node("Reshape", [value, b.constant(np.array([-1], np.int64))], dtype=value.dtype,
                      shape=(DIM,) if not value.static else (static_size(value.shape),), keep=False)
        first = b.node("Gather", [flat, b.constant(np.array(0, np.int64))], {"axis": 0}, dtype=value.dtype, shape=(),
                       keep=False)
        zero = b.constant(np.array(0, value.dtype))
        condition = b.node("Less", [first, zero], dtype="bool", shape=(), keep=False)
    branches = []
    for branch_name, op in (("then", b.choice(["Neg", "Abs", "Identity"])), ("else", b.choice(["Add", "Relu", "Mul"]))):
        output = b.fresh(f"{branch_name}_out")
        nodes = []
        if op == "Add" or op == "Mul":
            constant = random_array(b.rng, value.dtype, [])
            nodes.append(helper.make_node("Constant", [], [output + "_c"], value=onnx.numpy_helper.from_array(constant)))
            nodes.append(helper.make_node(op, [value.name, output + "_c"], [output]))
        elif op == "Relu" and not b.allowed("Relu", value.dtype):
            nodes.append(helper.make_node("Identity", [value.name], [output]))
        else:
            nodes.append(helper.make_node(op, [value.name], [output]))
        if branch_name == "else" and not constant_condition and b.uses("hostile-integers"):
            # Folded inside a branch onnxruntime may never take: INT64_MIN / -1 traps in C++.
            nodes.append(helper.make_node("Div", [output + "_min", output + "_m1"], [output + "_trap"]))
            nodes.insert(0, helper.make_node("Constant", [], [output + "_min"], value=onnx.numpy_helper.from_array(
                np.array(np.iinfo(np.int64).min, np.int64))))
            nodes.insert(0, helper.make_node("Constant", [], [output + "_m1"], value=onnx.numpy_helper.from_array(
                np.array(-1, np.int64))))
        branches.append(helper.make_graph(nodes, b.fresh(branch_name), [], [_value_info(output, value.dtype, value.shape)]))
    b.node("If", [condition], {"then_branch": branches[0], "else_branch": branches[1]}, dtype=value.dtype,
           shape=value.shape, exact=False, bound=value.bound * 6 + 6)


def block_loop(b: Builder) -> None:
    """Loop with a constant trip count, or with none and a condition that turns false after as many
    iterations (or, feature endless-loop, never does): a carried value updated by a constant, plus a
    scan output."""
    value = b.pick(lambda v: v.dtype in ("float32", "int64", "int32") and v.rank <= 3)
    if value is None or not b.uses("control-flow"):
        return
    trips = b.draw(st.integers(1, 3))
    counted = not b.flip(3)
    endless = not counted and b.flip(4) and b.uses("endless-loop")
    body_in, body_out = b.fresh("carried_in"), b.fresh("carried_out")
    condition_in, condition_out = b.fresh("cond_in"), b.fresh("cond_out")
    iteration = b.fresh("iter")
    op = b.choice(["Add", "Mul", "Sub"])
    constant = np.array(b.choice([1, 2]), value.dtype)
    if counted or endless:
        keep_going = [helper.make_node("Identity", [condition_in], [condition_out])]
    else:  # iteration i runs and asks for another while i < trips - 1: `trips` iterations in all
        keep_going = [helper.make_node("Constant", [], [condition_out + "_last"],
                                       value=onnx.numpy_helper.from_array(np.array(trips - 1, np.int64))),
                      helper.make_node("Less", [iteration, condition_out + "_last"], [condition_out])]
    nodes = [
        helper.make_node("Constant", [], [body_out + "_c"], value=onnx.numpy_helper.from_array(constant)),
        helper.make_node(op, [body_in, body_out + "_c"], [body_out]),
        *keep_going,
        helper.make_node("Identity", [body_out], [body_out + "_scan"]),
    ]
    body = helper.make_graph(
        nodes, b.fresh("body"),
        [helper.make_tensor_value_info(iteration, helper.TensorProto.INT64, []),
         helper.make_tensor_value_info(condition_in, helper.TensorProto.BOOL, []),
         _value_info(body_in, value.dtype, value.shape)],
        [helper.make_tensor_value_info(condition_out, helper.TensorProto.BOOL, []),
         _value_info(body_out, value.dtype, value.shape), _value_info(body_out + "_scan", value.dtype, value.shape)],
    )
    trip_count = b.constant(np.array(trips, np.int64)) if counted else None
    start = b.constant(np.array(True))
    carried = b.node("Loop", [trip_count, start, value], {"body": body}, dtype=value.dtype, shape=value.shape,
                     exact=False, bound=value.bound * 2 ** trips + 6, outputs=2)
    scan_name = b.nodes[-1].output[1]
    b.values.append(Value(scan_name, value.dtype, (trips, *value.shape), exact=False, bound=carried.bound))
    if endless:
        b.endless = True


def block_sequence(b: Builder) -> None:
    """A sequence built and taken apart (SequenceAt, ConcatFromSequence, SequenceLength), or an
    Optional wrapped and unwrapped (opset >= 18): non-tensor types inside the graph."""
    value = b.pick(lambda v: v.dtype in FLOATS + INTS and v.rank >= 1)
    if value is None or not b.uses("sequences"):
        return
    kind = b.choice(["at", "concat", "length"] + ["optional"] * (b.opset >= 18))
    keep = dict(dtype=value.dtype, exact=value.exact, bound=value.bound)
    if kind == "optional":
        wrapped = b.fresh("optional")
        b.nodes.append(helper.make_node("Optional", [value.name], [wrapped]))
        b.node("OptionalGetElement", [Value(wrapped, value.dtype, value.shape)], shape=value.shape, **keep)
        return
    others = [v for v in b.values if v is not value and v.dtype == value.dtype and v.shape == value.shape]
    items = [value] + others[:1] + ([value] if b.flip(2) else [])
    sequence = b.fresh("seq")
    b.nodes.append(helper.make_node("SequenceConstruct", [item.name for item in items], [sequence]))
    as_value = Value(sequence, value.dtype, value.shape)
    if kind == "at":
        index = b.draw(st.integers(-len(items), len(items) - 1))
        b.node("SequenceAt", [as_value, b.constant(np.array(index, np.int64))], shape=value.shape,
               exact=items[index].exact, dtype=value.dtype, bound=max(item.bound for item in items))
    elif kind == "concat":
        new_axis = b.choice([0, 1])
        axis = b.draw(st.integers(0, value.rank - 1 + new_axis))
        if new_axis:
            shape = value.shape[:axis] + (len(items),) + value.shape[axis:]
        elif value.shape[axis] == DIM:
            return
        else:
            shape = value.shape[:axis] + (value.shape[axis] * len(items),) + value.shape[axis + 1:]
        b.node("ConcatFromSequence", [as_value], {"axis": axis, "new_axis": new_axis}, dtype=value.dtype, shape=shape,
               exact=all(item.exact for item in items), bound=max(item.bound for item in items))
    else:
        length = b.node("SequenceLength", [as_value], dtype="int64", shape=(), keep=False)
        b.node("Cast", [length], {"to": helper.TensorProto.FLOAT}, dtype="float32", shape=(), bound=float(len(items)))


# -- decomposed layers (fuse-layer-norm, fuse-gelu) ---------------------------------------------


def _well_conditioned(value: Value) -> bool:
    """A float value a normalization may read: exact (a constant row is exactly constant, so x − mean
    is exactly 0 in any evaluation order) and small (its square stays finite in float16)."""
    return value.is_float and value.exact and value.bound <= 4 and value.rank >= 1


def block_layer_norm(b: Builder) -> None:
    """x − mean (or x alone: RMS normalization), squared, averaged, + ε, √, divided, · γ + β, over the
    last axes (or not: a leading axis, a γ that varies along another axis, a mean of axes the
    variance does not average)."""
    if not b.uses("decomposed-layers"):
        return
    ops = ("ReduceMean", "Sub", "Pow", "Sqrt", "Reciprocal", "Div")
    x = b.pick(lambda v: _well_conditioned(v) and all(b.allowed(op, v.dtype) for op in ops))
    if x is None or b.flip(3):
        dtype = b.choice([dtype for dtype in FLOATS if all(b.allowed(op, dtype) for op in ops)] or ["float32"])
        rank = b.draw(st.integers(1, 3))
        x = b.input(dtype, tuple([DIM][: rank - 1] + [b.draw(st.integers(1, 5)) for _ in range(rank - min(rank - 1, 1))]))
    dtype = x.dtype
    count = b.draw(st.integers(1, min(x.rank, 2)))
    axes = list(range(x.rank - count, x.rank))
    if b.flip(6):
        axes = [b.draw(st.integers(0, x.rank - 1))]  # any one axis: the last, or one LayerNormalization cannot take
    axes = [axis - x.rank if b.flip(2) else axis for axis in axes]
    reduced = tuple(1 if axis in [a % x.rank for a in axes] else dim for axis, dim in enumerate(x.shape))

    def mean(value: Value, value_axes: list[int]) -> Value:
        inputs, attrs = [value], {}
        b.opset_axes("ReduceMean", value_axes, inputs, attrs)
        return b.node("ReduceMean", inputs, attrs, dtype=dtype, shape=reduced, exact=False, keep=False)

    def scalar(number: float) -> Value:
        return b.constant(np.array(number, dtype), as_node=b.flip(4))

    # RMS normalization (T5, Llama) leaves the mean in: fuse-rms-norm's pattern, fuse-layer-norm's without its first step.
    centered = x if b.flip(4) else b.node("Sub", [x, mean(x, axes)], dtype=dtype, shape=x.shape, exact=False, keep=False)
    if b.flip(2):
        squared = b.node("Pow", [centered, scalar(2.0)], dtype=dtype, shape=x.shape, exact=False, keep=False)
    else:
        squared = b.node("Mul", [centered, centered], dtype=dtype, shape=x.shape, exact=False, keep=False)
    variance_axes = axes if not b.flip(8) else [axes[-1]]
    variance = mean(squared, variance_axes)
    epsilon = scalar(b.choice([1e-5, 1e-3, 0.25]))
    shifted = b.node("Add", [variance, epsilon] if b.flip(2) else [epsilon, variance], dtype=dtype, shape=reduced,
                     exact=False, keep=False)
    std = b.node("Sqrt", [shifted], dtype=dtype, shape=reduced, exact=False, keep=False)
    form = b.choice(["Div", "Reciprocal", "OneOver"])
    if form == "Div":
        y = b.node("Div", [centered, std], dtype=dtype, shape=x.shape, exact=False, keep=False)
    else:
        inverse = (b.node("Reciprocal", [std], dtype=dtype, shape=reduced, exact=False, keep=False) if form == "Reciprocal"
                   else b.node("Div", [scalar(1.0), std], dtype=dtype, shape=reduced, exact=False, keep=False))
        y = b.node("Mul", [centered, inverse] if b.flip(2) else [inverse, centered], dtype=dtype, shape=x.shape,
                   exact=False, keep=False)
    # |x − mean| / std <= √(elements averaged); N counts at its larger size.
    bound = math.sqrt(math.prod(max(SIZES) if dim == DIM else dim for axis, dim in enumerate(x.shape) if reduced[axis] == 1))
    for op in ("Mul", "Add"):
        if b.flip(3):
            continue
        # Per normalized element mostly; sometimes a scalar, or varying along an axis that is not normalized.
        shape = tuple(dim if reduced[axis] == 1 else 1 for axis, dim in enumerate(x.shape))[x.rank - b.draw(st.integers(0, x.rank)):]
        if b.flip(6):
            shape = _broadcast_partner_shape(b, x.shape)
        shape = tuple(1 if dim == DIM else dim for dim in shape)
        constant = b.constant((b.rng.standard_normal(shape) * 0.5 + (1.0 if op == "Mul" else 0.0)).astype(dtype),
                              as_node=b.flip(4))
        bound = bound * (constant.bound + 0.01) if op == "Mul" else bound + constant.bound
        y = b.node(op, [y, constant] if b.flip(2) else [constant, y], dtype=dtype, shape=broadcast(x.shape, shape),
                   exact=False, keep=False)
    b.values.append(Value(y.name, dtype, y.shape, exact=False, bound=bound + 1))


def block_gelu(b: Builder) -> None:
    """½·x·(1 + erf(x/√2)) or ½·x·(1 + tanh(√(2/π)(x + 0.044715x³))) in one of the exporters' groupings."""
    if not b.uses("decomposed-layers"):
        return
    function = b.choice(["Erf", "Tanh"])
    x = b.pick(lambda v: v.is_float and v.bound <= 4 and all(b.allowed(op, v.dtype) for op in (function, "Mul", "Add", "Pow")))
    if x is None:
        if not b.allowed(function, "float32"):
            return
        x = b.input("float32", (DIM, b.draw(st.integers(1, 6))))
    dtype = x.dtype

    def c(number: float) -> Value:
        return b.constant(np.array(number, dtype), as_node=b.flip(4))

    def op(op_type: str, *inputs: Value) -> Value:
        return b.node(op_type, list(inputs), dtype=dtype, shape=x.shape, exact=False, bound=math.inf, keep=False)

    if function == "Erf":
        argument = op("Div", x, c(1.4142135623730951)) if b.flip(2) else op("Mul", x, c(0.7071067811865476))
    else:
        cube = b.choice(["Pow", "MulMul", "factored"])
        if cube == "factored":  # FastGELU: x · √(2/π) · (1 + 0.044715 · x · x)
            argument = op("Mul", op("Mul", x, c(0.7978845608)), op("Add", c(1.0), op("Mul", op("Mul", c(0.044715), x), x)))
        else:
            cubed = op("Pow", x, c(3.0)) if cube == "Pow" else op("Mul", op("Mul", x, x), x)
            argument = op("Mul", c(math.sqrt(2 / math.pi)), op("Add", x, op("Mul", c(0.044715), cubed)))
    gate = op("Add", op(function, argument), c(1.0)) if b.flip(2) else op("Add", c(1.0), op(function, argument))
    grouping = b.choice(["half-last", "half-first", "halved"])
    if grouping == "half-last":
        y = op("Mul", op("Mul", x, gate), c(0.5))
    elif grouping == "half-first":
        y = op("Mul", op("Mul", c(0.5), x), gate)
    else:
        y = op("Mul", op("Div", x, c(2.0)), gate)
    b.values.append(Value(y.name, dtype, x.shape, exact=False, bound=x.bound))


BLOCKS = {
    "unary": (block_unary, 6),
    "binary": (block_binary, 6),
    "where": (block_where, 1),
    "cast-chain": (block_cast_chain, 3),
    "transpose-chain": (block_transpose_chain, 3),
    "reshape-chain": (block_reshape_chain, 3),
    "shape-arithmetic": (block_shape_arithmetic, 2),
    "slice-gather-concat": (block_slice_gather_concat, 3),
    "reduce": (block_reduce, 1),
    "repeat": (block_repeat, 2),
    "constant-subgraph": (block_constant_subgraph, 2),
    "noop": (block_noop, 2),
    "conv": (block_conv, 3),
    "matmul": (block_matmul, 3),
    "layer-chain": (block_layer_chain, 2),
    "parallel-matmuls": (block_parallel_matmuls, 2),
    "view-elementwise": (block_view_elementwise, 2),
    "transposed-elementwise": (block_transposed_elementwise, 2),
    "recurrent": (block_recurrent, 1),
    "focus": (block_focus, 1),
    "if": (block_if, 1),
    "loop": (block_loop, 1),
    "sequence": (block_sequence, 1),
    "layer-norm": (block_layer_norm, 1),
    "gelu": (block_gelu, 1),
}
# The lossy paths (quantize, prune) only touch Conv/Gemm/MatMul in float32.
LOSSY_BLOCKS = ("conv", "matmul", "layer-chain", "unary", "binary", "reshape-chain", "noop")
_WEIGHTED = [name for name, (_, weight) in BLOCKS.items() for _ in range(weight)]


def _input_shape(b: Builder) -> tuple:
    rank = b.draw(st.integers(0, 4))
    shape = [b.draw(st.integers(1, 4)) for _ in range(rank)]
    if rank and b.flip(2):
        shape[0] = DIM
    if rank and b.flip(8) and b.uses("zero-size"):
        shape[b.draw(st.integers(0, rank - 1))] = 0  # replaces N too: then the input is static
    return tuple(shape)


@st.composite
def models(draw, *, features: frozenset | set = frozenset(FEATURES), kernels: dict | None = None,
           lossy: bool = False, max_blocks: int = 14):
    """A random valid model (a Case): onnx.checker's full check passes and onnxruntime runs it at N in SIZES."""
    features = frozenset(features)
    opset = draw(st.sampled_from(OPSETS))
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, opset, features, kernels, seed)
    if lossy:
        b.input("float32", (DIM, draw(st.integers(1, 3)), draw(st.integers(3, 6)), draw(st.integers(3, 6))))
    else:
        for _ in range(draw(st.integers(1, 3))):
            dtype = draw(st.sampled_from(["float32", "float32", "float32", "float16", "float64", "int64", "int32", "bool"]))
            if b.flip(8) and b.uses("small-ints"):
                dtype = b.choice(SMALL_INTS)
            shape = _input_shape(b)
            if dtype == "bool" and not shape and not b.uses("scalar-bool-input"):
                shape = (2,)
            b.input(dtype, shape)
    overridable = None
    if not lossy and b.flip(8) and b.uses("overridable-input"):
        overridable = b.constant(random_array(b.rng, "float32", [2, 3]), keep=True)
        b.inputs.append(_value_info(overridable.name, "float32", (2, 3)))
        overridable.constant = None  # the caller may override it: not a constant to any pass
    # Lossy: layer chains are what pruning cuts and quantization has most to do with.
    names = [name for name in _WEIGHTED if not lossy or name in LOSSY_BLOCKS] + ["layer-chain"] * (4 if lossy else 0)
    for _ in range(draw(st.integers(1, max_blocks))):
        BLOCKS[draw(st.sampled_from(names))][0](b)
    produced = [value for value in b.values if any(value.name in node.output for node in b.nodes)]
    if not produced:
        block_unary(b) if b.values[0].dtype != "bool" else block_noop(b)
        produced = [value for value in b.values if any(value.name in node.output for node in b.nodes)]
        if not produced:
            block_noop(b)
            produced = [b.values[-1]]
    outputs = [produced[-1]]
    for value in produced[:-1]:
        if b.flip(4) and value not in outputs:
            outputs.append(value)
    if b.flip(5) and b.uses("lying-value-info"):
        for value in produced:
            if DIM in value.shape and value not in outputs:
                lie = tuple(1 if dim == DIM else dim for dim in value.shape)
                b.value_info.append(_value_info(value.name, value.dtype, lie))
                break
    # Declared shapes: in full, or with unknown dims (the checker wants a shape, not its dims).
    graph_outputs = [_value_info(value.name, value.dtype, value.shape if not b.flip(4) else (None,) * value.rank)
                     for value in outputs]
    graph = helper.make_graph(b.nodes, "fuzz", b.inputs, graph_outputs, initializer=b.initializers,
                              value_info=b.value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSIONS[opset],
                              producer_name="onnxslim-fuzz")
    options = {}
    if lossy:
        nonfinite = b.flip(4) and b.uses("nonfinite-calibration")
        options = {"calibration": b.choice(CALIBRATION_KINDS[1:]) if nonfinite else "finite",
                   # full QDQ first: "auto" picks weight-only int8 on a CPU where int8 kernels are not faster
                   "quantize_mode": b.choice(["full", "weights", "auto"]),
                   "method": b.choice(["minmax", "percentile", "entropy", "mse"]),
                   "criterion": b.choice(["auto", "l2", "l1", "reconstruction"]),
                   "allocation": b.choice(["sensitivity", "uniform"])}
    return Case(model=model, features=frozenset(b.used), input_seed=seed % 1000, lossy=options)
