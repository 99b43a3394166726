"""A model's inputs as callers feed them: what they are, the shapes to run them at, feeds checked
against them, seeded random feeds, and the second sizes of dynamic dims.

Verification, calibration and benchmarking all resolve input shapes and check feeds; they do it
here. Two resolvers keep their own wording: `input_shapes` for verification (--verify-shape,
a shapeless input is a scalar) and `random_shapes` for random calibration and benchmark data
(the caller names its option; a shapeless input must be given).
"""

from __future__ import annotations

import math
import stat
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import InputSpecError
from .graph import trusted_symbol
from .runtime import physical_memory
from .text import first_line, human_bytes

DEFAULT_SAMPLES = 2
DEFAULT_SEED = 0
# One sample's synthesized inputs may take at most this much memory (the model's own tensors
# come on top): a dim of 2**62 or a mistyped --verify-shape is refused before it is allocated.
MAX_INPUT_BYTES = 4 << 30
# What a sample costs besides its arrays' bytes: the arrays, the feed and the outputs kept for it as
# Python objects (an empty input's samples take memory too).
SAMPLE_OVERHEAD = 1 << 10


# ----------------------------------------------------------------------------- the model's inputs


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (old-IR models also list their initializers as inputs)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def overridable_inputs(model: onnx.ModelProto) -> set[str]:
    """Inputs with a default (an initializer of the same name, IR >= 4): a feed may give them or not."""
    if model.ir_version < 4:
        return set()
    listed = {value.name for value in model.graph.input}
    return {tensor.name for tensor in model.graph.initializer if tensor.name in listed}


@dataclass(frozen=True)
class InputSpec:
    """One input a caller feeds: its dtype and dims (an int when static, a name or '?' when
    dynamic); `dims` is None when the model does not state the rank."""

    name: str
    dtype: np.dtype
    dims: tuple | None

    def shape_text(self) -> str:
        return "?" if self.dims is None else "[" + ", ".join(str(dim) for dim in self.dims) + "]"

    def problems(self, shape: Sequence[int], dtype: np.dtype) -> list[str]:
        """What is wrong with an array of this shape and dtype for this input (nothing: [])."""
        problems = []
        if np.dtype(dtype) != self.dtype:
            hint = f" (save it with .astype(np.{self.dtype.name}))" if self.dtype.kind in "fiub" else ""
            problems.append(f"'{self.name}' is {np.dtype(dtype).name}, the model's input is {self.dtype.name}{hint}")
        if self.dims is None:
            return problems
        if len(shape) != len(self.dims):
            problems.append(
                f"'{self.name}' has shape {list(shape)} (rank {len(shape)}), "
                f"the model's input has rank {len(self.dims)}: {self.shape_text()}"
            )
            return problems
        wrong = [
            axis
            for axis, (given, wanted) in enumerate(zip(shape, self.dims))
            if isinstance(wanted, int) and given != wanted
        ]
        if wrong:
            axes = ", ".join(f"dim {axis} must be {self.dims[axis]}" for axis in wrong)
            problems.append(f"'{self.name}' has shape {list(shape)}, the model's input is {self.shape_text()} ({axes})")
        return problems


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds, in the model's order."""
    specs = []
    for value in model_inputs(model):
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or tensor_type.elem_type in (0, onnx.TensorProto.STRING):
            raise InputSpecError(f"input '{value.name}' is not a numeric tensor; calibration cannot feed it")
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else (dim.dim_param or "?")
                for dim in tensor_type.shape.dim
            )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


# ----------------------------------------------------------------------------- shapes


def parse_shape_specs(specs) -> dict[str, list[int]]:
    """Parse `name:1,3,224,224` strings (several may be given) into {name: [dims]}."""
    shapes: dict[str, list[int]] = {}
    given: dict[str, str] = {}
    for spec in specs or ():
        name, separator, dims = spec.rpartition(":")
        if not separator or not name:
            raise InputSpecError(f"shape '{spec}' should look like NAME:1,3,224,224")
        if name in given:  # the last one would win silently
            raise InputSpecError(f"the shape of '{name}' is given twice ({given[name]} and {spec})")
        given[name] = spec
        parts = dims.replace("x", ",").split(",") if dims.strip() else []  # NAME: is a scalar's shape
        try:
            shapes[name] = [int(dim) for dim in parts]
        except ValueError:
            raise InputSpecError(f"shape '{spec}': dims must be integers, like NAME:1,3,224,224") from None
        if any(dim < 0 for dim in shapes[name]):
            raise InputSpecError(f"shape '{spec}': dims must not be negative")
    return shapes


def input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> tuple[dict, list[str]]:
    """Concrete shapes for every input: given shapes, static dims, batch (axis 0) = 1; else an error.

    Returns the shapes and notes saying which defaults were taken.
    """
    shapes = dict(shapes or {})
    known = {value.name for value in model_inputs(model)}
    unknown = set(shapes) - known
    if unknown:
        raise InputSpecError(
            f"--verify-shape names {', '.join(sorted(unknown))}, but the model's inputs are {', '.join(sorted(known))}"
        )
    resolved, notes = {}, []
    for value in model_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if value.name in shapes:
            given = shapes[value.name]
            if value.type.tensor_type.HasField("shape") and len(given) != len(dims):
                raise InputSpecError(f"input '{value.name}' has rank {len(dims)}, but the given shape has {len(given)} dims")
            for axis, (dim, size) in enumerate(zip(dims, given)):
                if dim.HasField("dim_value") and dim.dim_value >= 0 and dim.dim_value != size:  # onnxruntime would refuse the feed
                    raise InputSpecError(f"input '{value.name}' dim {axis} is fixed at {dim.dim_value}, "
                                         f"the given shape says {size}")
            resolved[value.name] = given
            continue
        concrete = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value >= 0:  # a declared 0 is an empty tensor's dim
                concrete.append(dim.dim_value)
            elif axis == 0:
                concrete.append(1)
                notes.append(f"input '{value.name}': dynamic batch dim '{dim.dim_param or '?'}' set to 1")
            else:
                example = ",".join(
                    str(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else ("1" if index == 0 else "?")
                    for index, d in enumerate(dims)
                )
                raise InputSpecError(
                    f"input '{value.name}' has a dynamic dim {axis} ('{dim.dim_param or '?'}'): "
                    f"give its size with --verify-shape {value.name}:{example}"
                )
        resolved[value.name] = concrete
    return resolved, notes


def random_shapes(
    specs: list[InputSpec], given: dict[str, Sequence[int]], option: str = "shapes"
) -> tuple[dict[str, list[int]], list[str]]:
    """(dims of every input, notes) for random inputs: `given` dims (checked against the model),
    static dims, a dynamic batch (axis 0) set to 1 (noted); any other dynamic dim is an error that
    says how to give it with `option` (the caller's name for `given`, e.g. --input-shape)."""
    unknown = set(given) - {spec.name for spec in specs}
    if unknown:
        raise InputSpecError(
            f"{option} names {', '.join(sorted(unknown))}, but the model's inputs are "
            f"{', '.join(spec.name for spec in specs)}"
        )
    resolved, notes = {}, []
    for spec in specs:
        if spec.name in given:
            dims = [int(dim) for dim in given[spec.name]]
            problems = spec.problems(tuple(dims), spec.dtype)
            if problems:
                raise InputSpecError(f"{option} {spec.name}: {'; '.join(problems)}")
            resolved[spec.name] = dims
            continue
        if spec.dims is None:
            raise InputSpecError(f"input '{spec.name}' has no stated shape: give it with {option} {spec.name}:DIMS")
        dims = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(1)
                notes.append(f"input '{spec.name}': dynamic batch dim '{dim}' set to 1")
            else:
                example = ",".join(str(d) if isinstance(d, int) else ("1" if i == 0 else "N") for i, d in enumerate(spec.dims))
                raise InputSpecError(
                    f"input '{spec.name}' {spec.shape_text()} has a dynamic dim {axis} ('{dim}'): "
                    f"give its size with {option} {spec.name}:{example}"
                )
        resolved[spec.name] = dims
    return resolved, notes


# ----------------------------------------------------------------------------- feeds


def check_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    expected = {value.name for value in model_inputs(model)}
    missing, extra = expected - set(feed), set(feed) - expected - overridable_inputs(model)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(sorted(missing))}")
        if extra:
            parts.append(f"not inputs of the model: {', '.join(sorted(extra))}")
        raise InputSpecError("the given inputs do not match the model: " + "; ".join(parts))


def check_arrays(label: str, arrays: dict[str, tuple[tuple, np.dtype]], specs: list[InputSpec]) -> None:
    """One InputSpecError naming the sample and every problem in it; `arrays` maps name -> (shape, dtype)."""
    by_name = {spec.name: spec for spec in specs}
    known = ", ".join(by_name)
    problems = [f"no array for input '{name}' (the model's inputs: {known})" for name in by_name if name not in arrays]
    problems += [
        f"array '{name}' is not an input of the model (its inputs: {known})" for name in arrays if name not in by_name
    ]
    for name, (shape, dtype) in arrays.items():
        if name in by_name:
            problems += by_name[name].problems(shape, dtype)
    if problems:
        raise InputSpecError(f"{label}: " + "; ".join(problems))


def load_inputs(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Inputs from an .npz file (one array per input name; a leading 'sample' axis is not implied)."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise InputSpecError(f"inputs file not found: {path}") from None
    except OSError as error:
        raise InputSpecError(f"cannot read the inputs file {path}: {error.strerror or error}") from error
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block, /dev/zero never ends
        kind = "a directory" if stat.S_ISDIR(status.st_mode) else "not a regular file"
        raise InputSpecError(f"the inputs file {path} is {kind}; give an .npz file")
    # A truncated or corrupt archive raises from zipfile and zlib; pickled objects are refused.
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputSpecError(f"{path} holds one array (an .npy file): give an .npz file with one array "
                                 "per input name")
        with loaded as archive:
            return [{name: archive[name] for name in archive.files}]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise InputSpecError(f"{path} is not a readable .npz file: {first_line(error)}") from error


def synthesize_inputs(
    model: onnx.ModelProto, shapes: dict[str, list[int]], samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED
) -> list[dict[str, np.ndarray]]:
    """Seeded random inputs of each input's dtype: normal floats, small non-negative integers.

    Every value is an array, a 0-d one for a scalar input (onnxruntime takes no numpy scalar).
    Raises InputSpecError for an input that cannot be synthesized (strings, sequences) and, before
    allocating anything, for shapes whose arrays would need more than MAX_INPUT_BYTES.
    """
    values = model_inputs(model)
    types = {}
    for value in values:
        element_type = value.type.tensor_type.elem_type
        if not value.type.HasField("tensor_type") or element_type == onnx.TensorProto.STRING:
            raise InputSpecError(f"input '{value.name}' is not a numeric tensor; give real inputs with --inputs")
        try:
            types[value.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(element_type))
        except (KeyError, TypeError, ValueError):
            name = onnx.TensorProto.DataType.Name(element_type) if element_type in onnx.TensorProto.DataType.values() else element_type
            raise InputSpecError(f"input '{value.name}' has element type {name}, which cannot be synthesized; "
                                 "give real inputs with --inputs") from None
    check_input_bytes(shapes, types, samples)
    generator = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        feed = {}
        for value in values:
            dtype, shape = types[value.name], tuple(shapes[value.name])
            if dtype == np.bool_:
                feed[value.name] = np.asarray(generator.random(shape) < 0.5)
            elif np.issubdtype(dtype, np.integer):
                # 0 and 1 only: integer inputs are often indices into tiny tables (BERT's
                # token types have 2 rows) or masks; any larger value may be out of range.
                feed[value.name] = np.asarray(generator.integers(0, 2, size=shape)).astype(dtype)
            else:
                feed[value.name] = np.asarray(generator.standard_normal(shape)).astype(dtype)
        feeds.append(feed)
    return feeds


def check_input_bytes(shapes: dict[str, list[int]], types: dict[str, np.dtype], samples: int = 1) -> None:
    """Raise InputSpecError, saying how many bytes they would need, when `samples` samples of inputs
    of the given shapes would not fit in MAX_INPUT_BYTES (or in half of this machine's memory, if
    that is less): every sample is held until the comparison."""
    needed = {name: math.prod(int(dim) for dim in shapes[name]) * types[name].itemsize for name in types}
    total = sum(needed.values())
    limit = min(MAX_INPUT_BYTES, physical_memory() // 2 or MAX_INPUT_BYTES)
    if total > limit:
        name = max(needed, key=needed.get)
        raise InputSpecError(
            f"input '{name}' of shape {list(shapes[name])} would need {needed[name]:,} bytes "
            f"({human_bytes(needed[name])}{'' if len(needed) == 1 else f'; {human_bytes(total)} for all inputs'}), "
            f"more than the {human_bytes(limit)} verification allows; give smaller dims with --verify-shape"
        )
    each = total + SAMPLE_OVERHEAD
    if each * samples > limit:  # a huge --samples of a small input fills memory before anything runs
        raise InputSpecError(
            f"{samples:,} samples of inputs would need {each * samples:,} bytes ({human_bytes(each * samples)}, "
            f"{human_bytes(each)} each), more than the {human_bytes(limit)} verification allows; give fewer --samples"
        )


# ----------------------------------------------------------------------------- dynamic dims at two sizes


@dataclass
class DynamicDim:
    """A dynamic input dim, or all the dims that carry one symbolic name (one size, as ONNX reads them)."""

    label: str
    members: list[tuple[str, int]]  # (input name, axis)


def dynamic_dims(model: onnx.ModelProto, shapes: dict[str, list[int]], static: frozenset[str] = frozenset()) -> list[DynamicDim]:
    """The inputs' dims not fixed by the model, grouped by symbol; inputs named in `static` are left out
    (--input-shape made them static in the optimized model)."""
    groups: dict[str, DynamicDim] = {}
    for value in model_inputs(model):
        if value.name in static or value.name not in shapes:
            continue
        declared = value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else None
        for axis in range(len(shapes[value.name])):
            dim = declared[axis] if declared is not None and axis < len(declared) else None
            if dim is not None and dim.HasField("dim_value") and dim.dim_value >= 0:
                continue
            symbol = trusted_symbol(dim.dim_param) if dim is not None else None
            label = f"'{symbol}'" if symbol else f"{value.name} dim {axis}"
            groups.setdefault(label, DynamicDim(label, [])).members.append((value.name, axis))
    return list(groups.values())


def other_size(size: int) -> int:
    """A second size for a dynamic dim that keeps its power-of-two factor (a detector that needs
    sizes divisible by 32 runs at both), smaller where that is possible: 640 -> 512, 224 -> 192,
    48 -> 32, 3 -> 2; a power of two grows by half (1 -> 2, 2 -> 3, 256 -> 384); 0 -> 1."""
    size = int(size)
    if size <= 0:
        return 1
    low = size & -size
    if low != size:
        return size - low
    return 2 if size == 1 else size + size // 2


def fallback_size(size: int) -> int | None:
    """Where the original does not run at other_size: a size on the other side of `size` that
    keeps the same power-of-two factor (a model that needs at least 3 rows runs at 4, one that
    needs an even size at 2 more): 3 -> 4, 640 -> 768, 256 -> 128, 2 -> 1, 1 -> 3; None for 0."""
    size = int(size)
    if size <= 0:
        return None
    low = size & -size
    if low != size:
        return size + low
    return 3 if size == 1 else size // 2


def with_other_sizes(shapes: dict[str, list[int]], dims: list[DynamicDim], fallback: frozenset[str] = frozenset()) -> dict[str, list[int]]:
    """`shapes` with each of `dims` at its other_size, or at its fallback_size where `fallback` names its label."""
    changed = {name: list(shape) for name, shape in shapes.items()}
    for dim in dims:
        for name, axis in dim.members:
            size = shapes[name][axis]
            changed[name][axis] = (fallback_size(size) if dim.label in fallback else None) or other_size(size)
    return changed


def describe_sizes(shapes: dict[str, list[int]], dims: list[DynamicDim]) -> str:
    return ", ".join(f"{dim.label} {shapes[dim.members[0][0]][dim.members[0][1]]}" for dim in dims)
