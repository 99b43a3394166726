"""Equivalence with onnxruntime: input synthesis, running both models, comparing their outputs.

Both models run on the CPU with onnxruntime's own graph optimizations disabled, so the runtime
cannot hide (or add) a rewrite. Lossless results are judged by a dtype-aware tolerance; lossy
ones (pruning, quantization) by a fidelity budget (cosine, SQNR, top-1 agreement).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from .errors import InputSpecError, UsageError, VerificationUnavailable
from .inputs import (  # noqa: F401 (model_inputs, parse_shape_specs: callers import them from here)
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DynamicDim,
    check_feed,
    describe_sizes,
    dynamic_dims,
    fallback_size,
    input_shapes,
    load_inputs,
    model_inputs,
    parse_shape_specs,
    synthesize_inputs,
    with_other_sizes,
)
from .sessions import Runner
from .text import first_line, json_safe

# api.py's name for text.first_line, until it imports that.
_first_line = first_line

# Relative tolerance per dtype; the absolute part is a tenth of it times the output's scale,
# so |candidate - reference| <= t * (0.1 * scale + |reference|), scale = max(1, max |reference|).
TOLERANCES = {
    np.dtype(np.float64): 1e-6,
    np.dtype(np.float32): 1e-3,
    np.dtype(np.float16): 1e-2,
}
BFLOAT16_TOLERANCE = 3e-2


@dataclass
class FidelityBudget:
    """Thresholds for lossy passes; every output must meet each threshold that is set."""

    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None

    def __post_init__(self):
        # A NaN threshold passes anything (every comparison with NaN is false, so nothing fails it).
        for name, flag, low, high in (("min_cosine", "--min-cosine", -1.0, 1.0),
                                      ("min_sqnr_db", "--min-sqnr", -math.inf, math.inf),
                                      ("min_top1", "--min-top1", 0.0, 1.0)):
            value = getattr(self, name)
            if value is None:
                continue
            bounds = "a finite number" if math.isinf(low) else f"a number in [{low:g}, {high:g}]"
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                    math.isfinite(value) and low <= value <= high):
                raise UsageError(f"{flag} ({name}) must be {bounds}, not {value}")

    def is_set(self) -> bool:
        return any(value is not None for value in (self.min_cosine, self.min_sqnr_db, self.min_top1))


@dataclass
class OutputComparison:
    """How one output of the candidate compares with the reference, worst case over samples."""

    name: str
    shape: list
    dtype: str
    reference_shape: list
    reference_dtype: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    top1_agreement: float | None = None
    needed_tolerance: float = 0.0
    tolerance: float = 0.0
    passed: bool = True
    problem: str = ""


@dataclass
class VerificationReport:
    """The verdict, per-output figures, and the inputs it was reached on."""

    passed: bool
    outputs: list[OutputComparison]
    samples: int
    input_shapes: dict
    input_source: str
    mode: str = "lossless"
    budget: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        if self.passed:
            return f"verified on {self.samples} sample(s): outputs match"
        failing = [output for output in self.outputs if not output.passed]
        details = "; ".join(f"{output.name}: {output.problem}" for output in failing)
        return f"verification failed on {self.samples} sample(s): {details}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["message"] = self.message
        return json_safe(data)


# ----------------------------------------------------------------------------- comparing


def tolerance_for(dtype: np.dtype) -> float | None:
    """The default relative tolerance for a float dtype; None means exact comparison."""
    dtype = np.dtype(dtype)
    if dtype in TOLERANCES:
        return TOLERANCES[dtype]
    if dtype.name == "bfloat16":
        return BFLOAT16_TOLERANCE
    return None


def compare(
    name: str, reference: np.ndarray, candidate: np.ndarray, *, tolerance: float | None = None
) -> OutputComparison:
    """Compare one output pair; `tolerance` overrides the dtype's default for floats."""
    comparison = OutputComparison(
        name=name,
        shape=list(np.shape(candidate)),
        dtype=str(np.asarray(candidate).dtype),
        reference_shape=list(np.shape(reference)),
        reference_dtype=str(np.asarray(reference).dtype),
    )
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.dtype != candidate.dtype:
        comparison.passed, comparison.problem = False, f"dtype {candidate.dtype} != {reference.dtype}"
        return comparison
    if reference.shape != candidate.shape:
        comparison.passed, comparison.problem = False, f"shape {list(candidate.shape)} != {list(reference.shape)}"
        return comparison
    default = tolerance_for(reference.dtype)
    if default is None:
        equal = np.array_equal(reference, candidate)
        if reference.dtype != object and reference.size:
            difference = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
            comparison.max_abs = float(difference.max())
        comparison.needed_tolerance = 0.0 if equal else math.inf
        comparison.passed = bool(equal)
        comparison.problem = "" if equal else "values differ (exact comparison for this dtype)"
        return comparison
    comparison.tolerance = tolerance if tolerance is not None else default
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    nan_mismatch = np.isnan(ref) != np.isnan(cand)
    both_finite = np.isfinite(ref) & np.isfinite(cand)
    inf_mismatch = ~np.isnan(ref) & ~np.isnan(cand) & ~both_finite & (ref != cand)
    if nan_mismatch.any() or inf_mismatch.any():
        comparison.passed, comparison.problem = False, "NaN or infinity where the reference has none"
        comparison.needed_tolerance = math.inf
        return comparison
    ref, cand = ref[both_finite], cand[both_finite]
    if ref.size == 0:
        return comparison
    difference = np.abs(cand - ref)
    scale = max(1.0, float(np.abs(ref).max()))
    comparison.max_abs = float(difference.max())
    comparison.max_rel = float((difference / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)).max())
    comparison.needed_tolerance = float((difference / (0.1 * scale + np.abs(ref))).max())
    comparison.cosine = cosine_similarity(ref, cand)
    comparison.sqnr_db = sqnr_db(ref, cand)
    comparison.passed = comparison.needed_tolerance <= comparison.tolerance
    if not comparison.passed:
        comparison.problem = (
            f"max abs diff {comparison.max_abs:.3g} needs tolerance {comparison.needed_tolerance:.3g} "
            f"> {comparison.tolerance:.3g}"
        )
    return comparison


def cosine_similarity(reference: np.ndarray, candidate: np.ndarray) -> float:
    norms = np.linalg.norm(reference) * np.linalg.norm(candidate)
    if norms == 0:
        return 1.0 if np.array_equal(reference, candidate) else 0.0
    return float(np.dot(reference.ravel(), candidate.ravel()) / norms)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    noise = float(np.sum((candidate - reference) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return decibels(signal, noise)


def decibels(signal: float, noise: float) -> float:
    """10·log10(signal / noise) for positive sums, as a difference of logs: the ratio of a tiny
    signal to a huge noise (a quantized output gone astray) underflows to 0, whose log10 is a
    'math domain error'."""
    return 10.0 * (math.log10(signal) - math.log10(noise))


def _top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Share of rows whose argmax over the last axis agrees (meaningful for class scores)."""
    if reference.ndim < 1 or reference.shape[-1] < 2 or not np.issubdtype(reference.dtype, np.floating):
        return None
    return float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))


def _merge(worst: OutputComparison | None, current: OutputComparison) -> OutputComparison:
    if worst is None:
        return current
    worst.max_abs = max(worst.max_abs, current.max_abs)
    worst.max_rel = max(worst.max_rel, current.max_rel)
    worst.cosine = min(worst.cosine, current.cosine)
    worst.sqnr_db = min(worst.sqnr_db, current.sqnr_db)
    worst.needed_tolerance = max(worst.needed_tolerance, current.needed_tolerance)
    if current.top1_agreement is not None:
        previous = worst.top1_agreement if worst.top1_agreement is not None else 1.0
        worst.top1_agreement = min(previous, current.top1_agreement)
    if not current.passed and worst.passed:
        worst.passed, worst.problem = False, current.problem
    return worst


# ----------------------------------------------------------------------------- the verifier


class Verifier:
    """Reference outputs of one model, captured once, to check any number of candidates against.

    `--verify-each` uses one Verifier for every pass; `verify()` uses one for a single check.
    """

    def __init__(
        self,
        reference: onnx.ModelProto,
        *,
        inputs: str | os.PathLike | list[dict[str, np.ndarray]] | None = None,
        shapes: dict[str, list[int]] | None = None,
        samples: int = DEFAULT_SAMPLES,
        seed: int = DEFAULT_SEED,
        tolerance: float | None = None,
        budget: FidelityBudget | None = None,
        static_inputs: Iterable[str] = (),
    ):
        """`static_inputs`: inputs whose dims the candidate fixes (--input-shape); their dims are
        not run at a second size."""
        self.notes: list[str] = []
        self.reference = reference
        if isinstance(inputs, (str, os.PathLike)):
            inputs = load_inputs(inputs)
        runner = Runner(reference, label="original model")
        self.output_names = runner.output_names
        if inputs:
            for feed in inputs:
                check_feed(reference, feed)
            self.feeds = inputs
            self.input_source = "given"
            self.reference_outputs = [runner.run(feed) for feed in self.feeds]
            given = {name: list(np.shape(array)) for name, array in inputs[0].items()}
            dims = dynamic_dims(reference, given, frozenset(static_inputs))
            if dims and len({tuple(map(tuple, (np.shape(array) for array in feed.values()))) for feed in inputs}) == 1:
                self.notes.append(f"dynamic dims ({', '.join(dim.label for dim in dims)}) were checked at one size only, "
                                  "that of the given inputs")
        else:
            resolved, self.notes = input_shapes(reference, shapes)
            dims = dynamic_dims(reference, resolved, frozenset(static_inputs))
            firsts = synthesize_inputs(reference, resolved, (samples + 1) // 2 if dims else samples, seed)
            try:
                first_outputs = [runner.run(feed) for feed in firsts]
            except VerificationUnavailable as error:
                defaulted = [name for name in resolved if name not in (shapes or {})
                             and any(dim.members[0][0] == name for dim in dims)]
                if not defaulted:
                    raise
                # The sizes were our guess, not the model's fault: say which, and how to give others.
                raise VerificationUnavailable(
                    f"{error} (its dynamic dims ran at default sizes ({describe_sizes(resolved, dims)}); if it needs "
                    f"others, give them with --verify-shape, e.g. --verify-shape {defaulted[0]}:"
                    f"{','.join(map(str, resolved[defaulted[0]]))})"
                ) from error
            seconds, second_outputs = self._other_sizes(runner, resolved, dims, max(samples // 2, 1), seed) if dims else ([], [])
            self.feeds, self.reference_outputs = _interleave(firsts, seconds), _interleave(first_outputs, second_outputs)
            self.input_source = f"random (seed {seed})"
        self.input_shapes = {name: list(np.shape(array)) for name, array in self.feeds[0].items()}
        self.tolerance = tolerance
        self.budget = budget if budget is not None and budget.is_set() else None
        self._floors: dict[str, int] | None = None

    def _other_sizes(self, runner: Runner, shapes: dict[str, list[int]], dims: list[DynamicDim], count: int, seed: int):
        """Samples with the dynamic dims at a second size (so a rewrite that baked one in is
        caught), and the original's outputs on them. Every dim is changed at once, to its
        other_size, then to its fallback_size (a model that needs at least so many rows, or an
        even count); where the original runs neither way, each dim is tried alone, both ways, and
        kept if the original runs with it and those kept before. A dim left at one size is named
        in the notes, never skipped silently."""
        everything = frozenset(dim.label for dim in dims)
        attempts = [(dims, frozenset()), (dims, everything)]
        if len(dims) > 1:
            attempts += [([dim], fallback) for dim in dims for fallback in (frozenset(), frozenset([dim.label]))]
        varied: list[DynamicDim] = []
        fallbacks: frozenset[str] = frozenset()
        found, problem = None, ""
        for attempt, fallback in attempts:
            alone = attempt is not dims
            if alone and any(dim is attempt[0] for dim in varied):
                continue  # this dim already runs at its other size
            if fallback and not any(fallback_size(shapes[name][axis]) for dim in attempt for name, axis in dim.members):
                continue
            trial, trial_fallbacks = (varied + attempt, fallbacks | fallback) if alone else (attempt, fallback)
            try:
                feeds = synthesize_inputs(self.reference, with_other_sizes(shapes, trial, trial_fallbacks), count, seed + 1)
                outputs = [runner.run(feed) for feed in feeds]
            except (VerificationUnavailable, InputSpecError) as error:
                problem = problem or first_line(error)
                continue
            varied, fallbacks, found = trial, trial_fallbacks, (feeds, outputs)
            if not alone:
                break
        unchecked = [dim for dim in dims if all(dim is not kept for kept in varied)]
        if unchecked:
            tried = describe_sizes(with_other_sizes(shapes, unchecked), unchecked)
            if any(fallback_size(shapes[name][axis]) for dim in unchecked for name, axis in dim.members):
                tried += " or " + describe_sizes(with_other_sizes(shapes, unchecked, everything), unchecked)
            self.notes.append(
                f"dynamic dims checked at one size only: {describe_sizes(shapes, unchecked)} (the original model "
                f"does not run at {tried}: {problem})"
            )
        if found is None:
            return [], []
        self.notes.append("dynamic dims also checked at a second size: "
                          f"{describe_sizes(with_other_sizes(shapes, varied, fallbacks), varied)}")
        return found

    def check(self, candidate: onnx.ModelProto, *, label: str = "optimized model") -> VerificationReport:
        try:
            runner = Runner(candidate, label=label)
            candidate_outputs = [runner.run(feed) for feed in self.feeds]
        except VerificationUnavailable as error:
            # The reference runs, so a candidate that does not is a failure, not a missing check.
            failure = OutputComparison("(model)", [], "", [], "", passed=False, problem=str(error))
            return self._report([failure], passed=False)
        comparisons: dict[str, OutputComparison] = {}
        pools: dict[str, FidelityPool] = {}
        missing = [name for name in self.output_names if name not in runner.output_names]
        notes: list[str] = []
        evaluators: dict[str, object] = {}
        for index, (outputs, reference) in enumerate(zip(candidate_outputs, self.reference_outputs)):
            for name in self.output_names:
                if name not in outputs:
                    continue
                current = compare(name, reference[name], outputs[name], tolerance=self.tolerance)
                if not current.passed and self.budget is None and _same_shape(reference[name], outputs[name]):
                    floor = self._precision_floor(name)
                    if floor is not None and self.tolerance is None and tolerance_for(reference[name].dtype) is not None:
                        current = compare(name, reference[name], outputs[name], tolerance=_FLOOR_TOLERANCE[floor])
                        note = (f"output '{name}' is computed through {_FLOAT_NAMES[floor]}: judged by "
                                f"{_FLOAT_NAMES[floor]}'s tolerance")
                        if note not in notes:
                            notes.append(note)
                    if not current.passed and (floor is not None or _low_precision(reference[name])):
                        current = self._reference_decides(candidate, index, current, evaluators, notes)
                if self.budget is not None:  # the pool leaves out what it cannot measure (shapes that differ)
                    pools.setdefault(name, FidelityPool()).add(reference[name], outputs[name])
                comparisons[name] = _merge(comparisons.get(name), current)
        if self.budget is not None:
            for name, comparison in comparisons.items():
                self._apply_budget(comparison, pools.get(name))
        results = [comparisons[name] for name in self.output_names if name in comparisons]
        for name in missing:
            results.append(
                OutputComparison(name, [], "", [], "", passed=False, problem="output missing from the optimized model")
            )
        if not missing and runner.output_names != self.output_names:
            notes.append(f"the optimized model lists its outputs in another order: {runner.output_names}")
        passed = all(result.passed for result in results) and runner.output_names == self.output_names
        return self._report(results, passed, notes)

    def _precision_floor(self, name: str) -> int | None:
        """The least precise float type output `name` is computed through, when coarser than its
        own (see precision_floors); worked out once, on the first failure that needs it."""
        if self._floors is None:
            self._floors = precision_floors(self.reference)
        return self._floors.get(name)

    def _reference_decides(self, candidate: onnx.ModelProto, index: int, failed: OutputComparison,
                           evaluators: dict, notes: list[str]) -> OutputComparison:
        """A float16/bfloat16 output, or one computed through a coarser type than its own (a Cast
        to float16 and back, a float cast to an integer), that fails the tolerance, judged again
        by onnx's reference evaluator on this sample: onnxruntime's fp16 kernels can land a
        rounding step apart in different contexts (a Round, a Floor or a Cast to an integer then
        makes that a whole unit), so its two runs do not decide alone. Where the evaluator computes the same for both models, the rewrite is right
        and the note says so; where it cannot run a model, the failure stands, with a note."""
        name, feed = failed.name, self.feeds[index]
        try:
            for key, model in (("original", self.reference), ("candidate", candidate)):
                if key not in evaluators:
                    evaluators[key] = ReferenceEvaluator(model)
            values = {key: dict(zip(evaluator.output_names, evaluator.run(None, feed))) for key, evaluator in evaluators.items()}
        except Exception as error:  # the reference evaluator raises whatever its numpy kernels raise
            notes.append(f"output '{name}': onnx's reference evaluator could not run the models ({first_line(error)}); "
                         "onnxruntime's figures stand")
            return failed
        if name not in values["original"] or name not in values["candidate"]:
            return failed
        decided = compare(name, values["original"][name], values["candidate"][name], tolerance=self.tolerance)
        if not decided.passed:
            notes.append(f"output '{name}': onnx's reference evaluator also finds the models differ on sample {index + 1}")
            return failed
        notes.append(
            f"output '{name}': onnxruntime's {failed.dtype} kernels differ on sample {index + 1} ({failed.problem}); "
            "onnx's reference evaluator computes the same for both models, and decides"
        )
        failed.passed, failed.problem = True, ""
        failed.needed_tolerance = decided.needed_tolerance
        return failed

    def _report(self, results: list[OutputComparison], passed: bool, notes: list[str] = ()) -> VerificationReport:
        return VerificationReport(
            passed=passed,
            outputs=results,
            samples=len(self.feeds),
            input_shapes=self.input_shapes,
            input_source=self.input_source,
            mode="lossy" if self.budget else "lossless",
            budget=asdict(self.budget) if self.budget else None,
            notes=list(self.notes) + list(notes),
        )

    def _apply_budget(self, comparison: OutputComparison, pool: FidelityPool | None) -> None:
        """In lossy mode the budget, not the tolerance, decides (shape and dtype must still match),
        on figures pooled over the samples (see FidelityPool). A figure that is not a number
        (NaN) meets no threshold: every test is written so that NaN fails it."""
        if comparison.problem.startswith(("shape", "dtype", "NaN")) or pool is None:
            return
        comparison.cosine, comparison.sqnr_db, comparison.top1_agreement = pool.cosine(), pool.sqnr_db(), pool.top1()
        budget, problems = self.budget, []
        if pool.problem():
            problems.append(pool.problem())
        if budget.min_cosine is not None and not comparison.cosine >= budget.min_cosine:
            problems.append(f"cosine {comparison.cosine:.4f} < {budget.min_cosine}")
        if budget.min_sqnr_db is not None and not comparison.sqnr_db >= budget.min_sqnr_db:
            problems.append(f"SQNR {comparison.sqnr_db:.1f} dB < {budget.min_sqnr_db} dB")
        if (
            budget.min_top1 is not None
            and comparison.top1_agreement is not None
            and not comparison.top1_agreement >= budget.min_top1
        ):
            problems.append(f"top-1 agreement {comparison.top1_agreement:.3f} < {budget.min_top1}")
        comparison.passed = not problems
        comparison.problem = "; ".join(problems)


def _low_precision(array: np.ndarray) -> bool:
    return array.dtype == np.float16 or array.dtype.name == "bfloat16"


# Float element types from the most precise to the least (significand bits 52, 23, 10, 7): a value
# rounded to one of them carries that type's error into everything computed from it.
_FLOAT_PRECISION = (onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def precision_floors(model: onnx.ModelProto) -> dict[str, int]:
    """Per graph output, the least precise float element type (an onnx.TensorProto type) its
    computation rounds to, when that is coarser than the output's own type (or the output is not
    a float at all). A float64 output computed through a float16 Cast carries float16's rounding:
    a rewrite that moves a last float32 bit upstream can move it one float16 step, and float64's
    tolerance would call that wrong. Only computed values count (inputs and constants are data,
    no rewrite rounds them); their types come from onnx's shape inference over the original
    model (a rewrite cannot loosen its own tolerance), with Cast targets where inference gives
    none; a subgraph counts whole."""
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
        typed = model  # the declared types and the Cast targets below still say most
    graph = typed.graph
    types: dict[str, int] = {}
    for info in [*graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    producers = {name: node for node in graph.node for name in node.output}
    floors = {}
    for output in graph.output:
        found: set[int] = set()
        seen: set[str] = set()
        pending = [output.name]
        while pending:
            name = pending.pop()
            node = producers.get(name)
            if name in seen or node is None:
                continue
            seen.add(name)
            if name in types:
                found.add(types[name])
            pending += [name for name in node.input if name]
            found |= _computed_types(node, pending)
        own = output.type.tensor_type.elem_type
        coarser = [elem for elem in _FLOAT_PRECISION if elem in found]
        if coarser and (own not in _FLOAT_PRECISION or _FLOAT_PRECISION.index(coarser[-1]) > _FLOAT_PRECISION.index(own)):
            floors[output.name] = coarser[-1]
    return floors


def _computed_types(node: onnx.NodeProto, pending: list[str]) -> set[int]:
    """Element types a node computes that inference may not show: a Cast's target, and the values
    its subgraphs compute (their reads of outer values join `pending`)."""
    found = set()
    for attribute in node.attribute:
        if attribute.name == "to" and attribute.type == onnx.AttributeProto.INT:
            found.add(attribute.i)
        for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            for info in [*body.value_info, *body.output]:
                if info.type.HasField("tensor_type"):
                    found.add(info.type.tensor_type.elem_type)
            for inner in body.node:
                pending += [name for name in inner.input if name]
                found |= _computed_types(inner, pending)
    return found


_FLOAT_NAMES = dict(zip(_FLOAT_PRECISION, ("float64", "float32", "float16", "bfloat16")))
_FLOOR_TOLERANCE = {onnx.TensorProto.DOUBLE: TOLERANCES[np.dtype(np.float64)], onnx.TensorProto.FLOAT: TOLERANCES[
    np.dtype(np.float32)], onnx.TensorProto.FLOAT16: TOLERANCES[np.dtype(np.float16)],
    onnx.TensorProto.BFLOAT16: BFLOAT16_TOLERANCE}


def _interleave(firsts: list, seconds: list) -> list:
    """first, second, first, second...: with two samples, one at each size."""
    merged = []
    for index in range(max(len(firsts), len(seconds))):
        merged += firsts[index : index + 1] + seconds[index : index + 1]
    return merged


def _same_shape(reference, candidate) -> bool:
    """Two tensors of one shape (a sequence or a map output is not a tensor: False)."""
    return isinstance(reference, np.ndarray) and isinstance(candidate, np.ndarray) and reference.shape == candidate.shape


def numeric_view(value) -> np.ndarray | None:
    """An output as one numeric array, for fidelity figures: a tensor as it is; a sequence of
    maps (a classifier's ZipMap: one {label: probability} per sample) as rows of its values in key
    order; a map as its values in key order; a sequence of equal-shaped tensors stacked. None for
    what holds no numbers to compare (strings, ragged sequences)."""
    if isinstance(value, np.ndarray):
        return value if value.dtype.kind in "fiub" else None
    if isinstance(value, dict):
        keys = sorted(value)
        return numeric_view(np.asarray([value[key] for key in keys])) if keys else None
    if isinstance(value, (list, tuple)) and value:
        rows = [numeric_view(item) for item in value]
        if any(row is None for row in rows) or len({row.shape for row in rows}) != 1:
            return None
        return np.stack(rows)
    return None


class FidelityPool:
    """Cosine, SQNR and top-1 agreement of one output over all samples taken together.

    Pooling weighs each sample by its signal: a sample whose output is all but zero (a text
    detector on a photo without text) has an SQNR of pure noise, which a per-sample worst case
    or median would report as the model's fidelity. A sample whose two outputs differ in shape (a
    count that follows the data, as NonZero's or NonMaxSuppression's) is left out (`skipped`).

    Non-finite values: where both outputs hold the same NaN or infinity they agree and are left
    out of the sums (as the lossless comparison treats them); anywhere else a NaN or an infinity
    on either side is a disagreement no figure can measure (`mismatched`): the figures are then
    NaN, which fails every threshold, and `problem()` says why. Sums too large for float64 are
    NaN as well, never a pass.
    """

    def __init__(self):
        self.signal = self.noise = self.cross = self.candidate_energy = 0.0
        self.agreeing = self.rows = self.skipped = self.mismatched = 0
        self.top1_meaningful = True

    def add(self, reference, candidate) -> None:
        reference, candidate = numeric_view(reference), numeric_view(candidate)
        if reference is None or candidate is None or reference.shape != candidate.shape:
            self.skipped += 1
            return
        ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
        finite = np.isfinite(ref) & np.isfinite(cand)
        if not finite.all():
            same = (ref == cand) | (np.isnan(ref) & np.isnan(cand))
            self.mismatched += int(np.count_nonzero(~finite & ~same))
            ref, cand = ref[finite], cand[finite]
        with np.errstate(over="ignore", invalid="ignore"):
            self.signal += float(ref @ ref)
            self.candidate_energy += float(cand @ cand)
            self.cross += float(ref @ cand)
            self.noise += float((cand - ref) @ (cand - ref))
        agreement = _top1_agreement(reference, candidate)
        if agreement is None:
            self.top1_meaningful = False
        else:
            rows = int(np.prod(reference.shape[:-1], dtype=np.int64))
            self.agreeing += round(agreement * rows)
            self.rows += rows

    def _measurable(self) -> bool:
        sums = (self.signal, self.noise, self.cross, self.candidate_energy)
        return not self.mismatched and all(math.isfinite(value) for value in sums)

    def problem(self) -> str | None:
        """Why the figures are NaN, or None when they are numbers."""
        if self.mismatched:
            return f"{self.mismatched} value(s) NaN or infinite where the other model's are not"
        if not self._measurable():
            return "outputs too large to measure in float64"
        return None

    def cosine(self) -> float:
        if not self._measurable():
            return math.nan
        norms = math.sqrt(self.signal * self.candidate_energy)
        if norms == 0:
            return 1.0 if self.noise == 0 else 0.0
        return self.cross / norms

    def sqnr_db(self) -> float:
        if not self._measurable():
            return math.nan
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return decibels(self.signal, self.noise)

    def top1(self) -> float | None:
        if not (self.top1_meaningful and self.rows):
            return None
        return self.agreeing / self.rows if self._measurable() else math.nan

    @staticmethod
    def worst(figures) -> float:
        """The smallest of several outputs' figures, NaN if any is NaN (Python's min keeps a NaN
        only when it comes first, and a NaN figure must never read as a pass)."""
        figures = list(figures)
        return math.nan if any(math.isnan(figure) for figure in figures) else min(figures)


def verify(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    **options,
) -> VerificationReport:
    """Check that `candidate` computes what `reference` computes; see Verifier for the options."""
    return Verifier(reference, **options).check(candidate)
