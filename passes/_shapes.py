"""What the graph computes about shapes: partial values of small integer tensors, and sizes of dims.

Shared by fold-shapes and the rewrites that must prove a run-time Reshape target equals some
tensor's dims (exporters compute targets from Shape/Slice/Gather/Concat of other tensors).

A partial value is a 0-D or 1-D integer (or boolean) tensor whose elements are each a known int
(bool), a symbol for a size decided at run time, or None (unknown). A symbol is the trusted name of a symbolic dim
(`trusted_symbol`: shape inference puts one name on dims it proved equal) or, for a dim without
one, `DimOf(tensor, axis)`: that tensor's own dim, equal only to itself.

`Size` and `reshaped` replay Reshape's rules on such symbols, including what a run-time 0 does
(with allowzero=0 it copies the input's dim), so a rewrite can check every case where a symbolic
dim is 0, not only the case where all are positive.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import axes_of, constant_value, is_empty, is_standard, trusted_symbol
from onnxslim.rules import RuleTable


@dataclass(frozen=True)
class DimOf:
    """Dim `axis` of the tensor named `tensor`, a size known only at run time and without a symbol."""

    tensor: str
    axis: int


Symbol = str | DimOf
Element = int | Symbol | None
Partial = tuple[tuple[Element, ...], bool]  # (elements, is_scalar)
RULES = RuleTable()
INT64_MAX = 2**63 - 1
# Producers followed from one tensor before its value counts as unknown (exporters' shape
# chains are a few nodes long; this bounds the recursion on pathological graphs).
MAX_DEPTH = 64
# Longer constants are data, not shapes.
MAX_ELEMENTS = 64
rule = RULES.rule


def is_symbol(element: Element) -> bool:
    return isinstance(element, (str, DimOf))


def known(element: Element) -> bool:
    return isinstance(element, int)


def dim_elements(tensor: gs.Tensor) -> list[Element] | None:
    """The tensor's dims as elements: ints where static, else its trusted symbol, else DimOf.

    None when the rank is unknown.
    """
    if tensor.shape is None:
        return None
    return [
        int(dim) if isinstance(dim, (int, np.integer)) and dim >= 0 else (trusted_symbol(dim) or DimOf(tensor.name, axis))
        for axis, dim in enumerate(tensor.shape)
    ]


class PartialValues:
    """Partial values of a body's small integer tensors, computed on demand and remembered.

    Call it on a tensor: a constant is known, a tensor computed by an op with a rule is what the
    rule makes of its inputs, any other integer scalar or short vector has unknown elements.
    """

    def __init__(self) -> None:
        self._values: dict[int, Partial | None] = {}
        self._depth = 0

    def __call__(self, tensor: gs.Tensor) -> Partial | None:
        key = id(tensor)
        if key in self._values:
            return self._values[key]
        if isinstance(tensor, gs.Constant) and not _small_integers(tensor):
            return None  # without loading a weight's values
        value = constant_value(tensor)
        if value is not None:
            if value.dtype.kind not in "iub" or value.ndim > 1 or value.size > MAX_ELEMENTS:
                return None
            convert = bool if value.dtype.kind == "b" else int
            return tuple(convert(element) for element in value.reshape(-1)), value.ndim == 0
        partial = None
        node = tensor.inputs[0] if tensor.inputs else None
        compute = RULES.get(node.op) if node is not None and is_standard(node) else None
        if compute is not None and node.outputs and node.outputs[0] is tensor and self._depth < MAX_DEPTH:
            self._depth += 1
            try:
                partial = compute(node, self)
            finally:
                self._depth -= 1
        if partial is None:
            partial = _unknown_elements(tensor)
        self._values[key] = partial
        return partial


def _small_integers(tensor: gs.Constant) -> bool:
    shape = tuple(tensor.shape)
    return np.dtype(tensor.dtype).kind in "iub" and len(shape) <= 1 and math.prod(shape) <= MAX_ELEMENTS


def _unknown_elements(tensor: gs.Tensor) -> Partial | None:
    """An integer scalar or short vector computed at run time: its length is known, its elements not."""
    if tensor.dtype is None or np.dtype(tensor.dtype).kind not in "iu" or tensor.shape is None:
        return None
    if len(tensor.shape) == 0:
        return (None,), True
    if len(tensor.shape) == 1 and isinstance(tensor.shape[0], (int, np.integer)) and 0 <= tensor.shape[0] <= 8:
        return (None,) * int(tensor.shape[0]), False
    return None


# ----------------------------------------------------------------------------- rules, one per op


@rule("Shape")
def shape(node: gs.Node, partial_of) -> Partial | None:
    dims = dim_elements(node.inputs[0])
    if dims is None:
        return None
    rank = len(dims)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start, end = _clamp(start, rank), _clamp(end, rank)
    return tuple(dims[start:end]), False


@rule("Size")
def size(node: gs.Node, partial_of) -> Partial | None:
    dims = dim_elements(node.inputs[0])
    if dims is None or not all(known(dim) for dim in dims):
        return None
    count = math.prod(dims)  # Python ints: numpy's int64 product wraps around silently
    return ((count,), True) if count <= INT64_MAX else None


@rule("Gather")
def gather(node: gs.Node, partial_of) -> Partial | None:
    data = partial_of(node.inputs[0])
    indices = constant_value(node.inputs[1])
    if data is None or data[1] or indices is None or node.attrs.get("axis", 0) != 0 or indices.ndim > 1:
        return None
    elements = data[0]
    picked = []
    for index in np.asarray(indices).reshape(-1):
        index = int(index)
        if not -len(elements) <= index < len(elements):
            return None
        picked.append(elements[index])
    return tuple(picked), indices.ndim == 0


@rule("Slice")
def slice_(node: gs.Node, partial_of) -> Partial | None:
    data = partial_of(node.inputs[0])
    if data is None or data[1] or "starts" in node.attrs:
        return None
    bounds = [constant_value(tensor) if not is_empty(tensor) else None for tensor in node.inputs[1:5]]
    bounds += [None] * (4 - len(bounds))
    starts, ends, axes, steps = bounds
    for tensor, value in zip(node.inputs[3:5], (axes, steps)):
        if not is_empty(tensor) and value is None:
            return None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and int(np.asarray(axes).reshape(-1)[0]) not in (0, -1):
        return None
    step = int(np.asarray(steps).reshape(-1)[0]) if steps is not None else 1
    if step == 0:
        return None
    start = int(np.asarray(starts).reshape(-1)[0])
    end = int(np.asarray(ends).reshape(-1)[0])
    elements = data[0]
    # Python slicing clamps exactly as ONNX Slice does, including huge INT64 ends.
    end = max(min(end, 2**62), -(2**62))
    return tuple(elements[slice(start, end, step)]), False


@rule("Concat")
def concat(node: gs.Node, partial_of) -> Partial | None:
    if node.attrs.get("axis", 0) not in (0, -1):
        return None
    parts = [partial_of(tensor) for tensor in node.inputs]
    if any(part is None or part[1] for part in parts):
        return None
    return tuple(element for part in parts for element in part[0]), False


@rule("Unsqueeze")
def unsqueeze(node: gs.Node, partial_of) -> Partial | None:
    data = partial_of(node.inputs[0])
    if data is None or not data[1] or axes_of(node) not in ([0], [-1]):
        return None
    return data[0], False


@rule("Squeeze")
def squeeze(node: gs.Node, partial_of) -> Partial | None:
    data = partial_of(node.inputs[0])
    if data is None or data[1] or len(data[0]) != 1:
        return None
    return data[0], True


@rule("Cast")
def cast(node: gs.Node, partial_of) -> Partial | None:
    """Integer to integer: known elements wrap as onnxruntime's casts do (two's complement, the
    target's width); a symbolic dim survives only a target that holds any size a dim can have
    in practice (32 bits or more)."""
    data = partial_of(node.inputs[0])
    target = node.outputs[0].dtype
    if data is None or target is None or np.dtype(target).kind not in "iu":
        return None
    target = np.dtype(target)
    bits, signed = 8 * target.itemsize, target.kind == "i"

    def converted(element: Element) -> Element:
        if is_symbol(element):
            return element if bits >= 32 else None
        if element is None:
            return None
        wrapped = element % (1 << bits)
        return wrapped - (1 << bits) if signed and wrapped >= 1 << (bits - 1) else wrapped

    return tuple(converted(element) for element in data[0]), data[1]


@rule("Identity")
def identity(node: gs.Node, partial_of) -> Partial | None:
    return partial_of(node.inputs[0])


@rule("ConstantOfShape")
def constant_of_shape(node: gs.Node, partial_of) -> Partial | None:
    """A short integer vector filled with the `value` attribute (torch's expand builds its -1 mask so)."""
    length = constant_value(node.inputs[0])
    if length is None or length.shape != (1,) or not 0 <= int(length[0]) <= 8:
        return None
    fill = node.attrs.get("value")
    fill = np.asarray(fill.values if isinstance(fill, gs.Constant) else fill) if fill is not None else None
    if fill is None or fill.dtype.kind not in "iu" or fill.size != 1:
        return None  # the default fill is a float 0.0
    return (int(fill.reshape(-1)[0]),) * int(length[0]), False


@rule("Add", "Sub", "Mul")
def arithmetic(node: gs.Node, partial_of) -> Partial | None:
    """Elementwise on known ints (None where the result leaves the output type: onnxruntime wraps);
    a symbol survives + 0, - 0 and * 1."""
    pair = _broadcast(partial_of(node.inputs[0]), partial_of(node.inputs[1]))
    target = node.outputs[0].dtype
    if pair is None or target is None or np.dtype(target).kind not in "iu":
        return None
    limits = np.iinfo(np.dtype(target))
    neutral = 1 if node.op == "Mul" else 0

    def combined(first: Element, second: Element) -> Element:
        if known(first) and known(second):
            value = first + second if node.op == "Add" else first - second if node.op == "Sub" else first * second
            return value if limits.min <= value <= limits.max else None
        if is_symbol(first) and second == neutral:
            return first
        if is_symbol(second) and first == neutral and node.op != "Sub":
            return second
        return None

    (first, second), scalar = pair
    return tuple(combined(a, b) for a, b in zip(first, second)), scalar


@rule("Equal")
def equal(node: gs.Node, partial_of) -> Partial | None:
    """Decided where both are known, the same symbol, or a size against a negative int (dims are >= 0)."""
    pair = _broadcast(partial_of(node.inputs[0]), partial_of(node.inputs[1]))
    if pair is None:
        return None

    def decided(first: Element, second: Element) -> bool | None:
        if known(first) and known(second):
            return first == second
        if is_symbol(first) and first == second:
            return True
        if (is_symbol(first) and known(second) and second < 0) or (is_symbol(second) and known(first) and first < 0):
            return False
        return None

    (first, second), scalar = pair
    return tuple(decided(a, b) for a, b in zip(first, second)), scalar


@rule("Where")
def where(node: gs.Node, partial_of) -> Partial | None:
    parts = [partial_of(tensor) for tensor in node.inputs]
    if any(part is None for part in parts) or not all(isinstance(flag, bool) or flag is None for flag in parts[0][0]):
        return None
    length = max(len(part[0]) for part in parts)
    if any(len(part[0]) not in (1, length) for part in parts) or not all(part[0] for part in parts):
        return None  # an empty operand broadcasts to empty; nothing to decide
    condition, chosen, other = (part[0] * (length // len(part[0])) for part in parts)
    elements = tuple(
        a if flag is True or a == b and a is not None else b if flag is False else None
        for flag, a, b in zip(condition, chosen, other)
    )
    return elements, all(part[1] for part in parts)


def _broadcast(first: Partial | None, second: Partial | None):
    """Both element lists at one length (a single element repeats), and whether the result is 0-D."""
    if first is None or second is None or not first[0] or not second[0]:
        return None
    length = max(len(first[0]), len(second[0]))
    if any(len(part[0]) not in (1, length) for part in (first, second)):
        return None
    return (first[0] * (length // len(first[0])), second[0] * (length // len(second[0]))), first[1] and second[1]


def _clamp(index: int, rank: int) -> int:
    if index < 0:
        index += rank
    return min(max(index, 0), rank)


# ----------------------------------------------------------------------------- sizes and Reshape


@dataclass(frozen=True)
class Size:
    """A size as a product: `factor` times the symbols (each a positive size); zero is Size(0)."""

    factor: int
    symbols: tuple = ()

    def __mul__(self, other: Size) -> Size:
        factor = self.factor * other.factor
        if factor == 0:
            return ZERO
        return Size(factor, tuple(sorted(self.symbols + other.symbols, key=_symbol_order)))

    def divided_by(self, other: Size) -> Size | None:
        """self / other when it is a product of the same kind for every value of the symbols."""
        if other.factor == 0 or self.factor % other.factor:
            return None
        remaining = list(self.symbols)
        for symbol in other.symbols:
            if symbol not in remaining:
                return None
            remaining.remove(symbol)
        return Size(self.factor // other.factor, tuple(remaining))

    @property
    def zero(self) -> bool:
        return self.factor == 0


ZERO = Size(0)
ONE = Size(1)


def _symbol_order(symbol: Symbol) -> tuple:
    return (0, symbol, 0) if isinstance(symbol, str) else (1, symbol.tensor, symbol.axis)


def product(sizes) -> Size:
    result = ONE
    for item in sizes:
        result = result * item
    return result


def size_of(element: int | Symbol, zeros: frozenset) -> Size:
    """The element's size in the case where exactly the symbols in `zeros` are 0."""
    if isinstance(element, int):
        return Size(element) if element != 0 else ZERO
    return ZERO if element in zeros else Size(1, (element,))


def same_size(first: Size, second: Size) -> bool | None:
    """True when equal for every value of the symbols, False when never equal, None when it depends."""
    if first == second:
        return True
    if first.zero != second.zero or (not first.symbols and not second.symbols):
        return False
    return None


class Fails:
    """Reshape fails at run time in this case (so a rewrite may do anything there)."""


FAILS = Fails()


def reshaped(dims: list[Size], target: tuple[Element, ...], allowzero: bool, zeros: frozenset) -> list[Size] | Fails | None:
    """The dims Reshape gives `dims` with `target`, in the case where the symbols in `zeros` are 0.

    FAILS when onnxruntime rejects it; None when the outcome depends on the symbols' values
    (or on an unknown element), which a caller must treat as "cannot tell".
    """
    count = product(dims)
    result: list[Size | None] = []
    inferred = None
    for axis, element in enumerate(target):
        if element is None:
            return None
        if element == -1:
            if inferred is not None:
                return FAILS
            inferred = axis
            result.append(None)
            continue
        if known(element) and element < -1:
            return FAILS
        entry = size_of(element, zeros)
        if entry.zero and not allowzero:
            if axis >= len(dims):
                return FAILS
            entry = dims[axis]  # a 0 copies the input's dim, whether written or computed
        result.append(entry)
    fixed = product(entry for entry in result if entry is not None)
    if inferred is not None and fixed.zero and allowzero:
        # ONNX calls -1 beside an explicit 0 invalid; onnxruntime runs it, sizing the -1 from the
        # non-zero dims on both sides (x[3, 0, 2] with [-1, 0] gives [6, 0]).
        quotient = product(dim for dim in dims if not dim.zero).divided_by(
            product(entry for entry in result if entry is not None and not entry.zero)
        )
        if quotient is None:
            return None
        result[inferred] = quotient
        return result if count.zero else FAILS
    if inferred is not None:
        if fixed.zero:
            return FAILS  # onnxruntime rejects a -1 beside a copied 0: it is undetermined
        quotient = ZERO if count.zero else count.divided_by(fixed)
        if quotient is None:
            return None
        result[inferred] = quotient
        return result
    equal = same_size(fixed, count)
    if equal is None:
        return None
    return result if equal else FAILS


def zero_cases(symbols) -> Iterator[frozenset]:
    """Every set of the symbols that may be 0 at run time together, the empty set first."""
    ordered = sorted(set(symbols), key=_symbol_order)
    for count in range(len(ordered) + 1):
        for chosen in itertools.combinations(ordered, count):
            yield frozenset(chosen)


# Beyond this many symbols in one pattern, checking every zero case costs more than it is worth.
MAX_SYMBOLS = 8


def symbols_in(*groups) -> set:
    return {element for group in groups for element in group if is_symbol(element)}

