"""Equivalence with onnxruntime: input synthesis, running both models, comparing their outputs.

Both models run on the CPU with onnxruntime's own graph optimizations disabled, so the runtime
cannot hide (or add) a rewrite. Lossless results are judged by a dtype-aware tolerance; lossy
ones (pruning, quantization) by a fidelity budget (cosine, SQNR, top-1 agreement).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import InputSpecError, RuntimeFailure, VerificationUnavailable
from .runtime import Session

# Relative tolerance per dtype; the absolute part is a tenth of it times the output's scale,
# so |candidate - reference| <= t * (0.1 * scale + |reference|), scale = max(1, max |reference|).
TOLERANCES = {
    np.dtype(np.float64): 1e-6,
    np.dtype(np.float32): 1e-3,
    np.dtype(np.float16): 1e-2,
}
BFLOAT16_TOLERANCE = 3e-2
DEFAULT_SAMPLES = 2
DEFAULT_SEED = 0


@dataclass
class FidelityBudget:
    """Thresholds for lossy passes; every output must meet each threshold that is set."""

    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None

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
        return _json_safe(data)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


# ----------------------------------------------------------------------------- inputs


def parse_shape_specs(specs) -> dict[str, list[int]]:
    """Parse `name:1,3,224,224` strings (several may be given) into {name: [dims]}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or ():
        name, separator, dims = spec.rpartition(":")
        if not separator or not name:
            raise InputSpecError(f"shape '{spec}' should look like NAME:1,3,224,224")
        try:
            shapes[name] = [int(dim) for dim in dims.replace("x", ",").split(",") if dim.strip()]
        except ValueError:
            raise InputSpecError(f"shape '{spec}': dims must be integers, like NAME:1,3,224,224") from None
        if any(dim < 0 for dim in shapes[name]):
            raise InputSpecError(f"shape '{spec}': dims must not be negative")
    return shapes


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (old-IR models also list their initializers as inputs)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


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
            resolved[value.name] = given
            continue
        concrete = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                concrete.append(dim.dim_value)
            elif axis == 0:
                concrete.append(1)
                notes.append(f"input '{value.name}': dynamic batch dim '{dim.dim_param or '?'}' set to 1")
            else:
                example = ",".join(
                    str(d.dim_value) if d.dim_value > 0 else ("1" if index == 0 else "?") for index, d in enumerate(dims)
                )
                raise InputSpecError(
                    f"input '{value.name}' has a dynamic dim {axis} ('{dim.dim_param or '?'}'): "
                    f"give its size with --verify-shape {value.name}:{example}"
                )
        resolved[value.name] = concrete
    return resolved, notes


def synthesize_inputs(
    model: onnx.ModelProto, shapes: dict[str, list[int]], samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED
) -> list[dict[str, np.ndarray]]:
    """Seeded random inputs of each input's dtype: normal floats, small non-negative integers."""
    generator = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        feed = {}
        for value in model_inputs(model):
            element_type = value.type.tensor_type.elem_type
            if not value.type.HasField("tensor_type") or element_type == onnx.TensorProto.STRING:
                raise InputSpecError(f"input '{value.name}' is not a numeric tensor; give real inputs with --inputs")
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(element_type))
            shape = shapes[value.name]
            if dtype == np.bool_:
                feed[value.name] = generator.random(shape) < 0.5
            elif np.issubdtype(dtype, np.integer):
                # 0 and 1 only: integer inputs are often indices into tiny tables (BERT's
                # token types have 2 rows) or masks; any larger value may be out of range.
                feed[value.name] = generator.integers(0, 2, size=shape).astype(dtype)
            else:
                feed[value.name] = generator.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def load_inputs(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Inputs from an .npz file (one array per input name; a leading 'sample' axis is not implied)."""
    path = Path(path)
    if not path.is_file():
        raise InputSpecError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return [{name: archive[name] for name in archive.files}]
    except (OSError, ValueError) as error:
        raise InputSpecError(f"{path} is not a readable .npz file: {error}") from error


def check_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    expected = {value.name for value in model_inputs(model)}
    missing, extra = expected - set(feed), set(feed) - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(sorted(missing))}")
        if extra:
            parts.append(f"not inputs of the model: {', '.join(sorted(extra))}")
        raise InputSpecError("the given inputs do not match the model: " + "; ".join(parts))


# ----------------------------------------------------------------------------- running


class Runner:
    """An onnxruntime CPU session (in the worker process, see onnxslim.runtime), with graph
    optimizations disabled unless `optimized` (then onnxruntime fuses as it would in deployment,
    e.g. QDQ groups into integer kernels)."""

    def __init__(self, model: onnx.ModelProto, *, label: str = "model", threads: int = 0, optimized: bool = False):
        try:
            self.session = Session(model, label=label, threads=threads, optimized=optimized)
        except RuntimeFailure:
            raise  # a crash, a time-out or an allocation failure says so itself
        except VerificationUnavailable as error:
            raise VerificationUnavailable(f"{error} (use --no-verify to skip verification)") from error.__cause__
        self.label = label
        self.output_names = self.session.output_names

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feed)))

    def seconds(self, feed: dict[str, np.ndarray], runs: int = 1) -> list[float]:
        """The time of each of `runs` runs, measured where onnxruntime runs (no transfer counted)."""
        return self.session.seconds(feed, runs)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:400]


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
    return 10.0 * math.log10(signal / noise)


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
    ):
        self.notes: list[str] = []
        if isinstance(inputs, (str, os.PathLike)):
            inputs = load_inputs(inputs)
        if inputs:
            for feed in inputs:
                check_feed(reference, feed)
            self.feeds = inputs
            self.input_source = "given"
        else:
            resolved, self.notes = input_shapes(reference, shapes)
            self.feeds = synthesize_inputs(reference, resolved, samples, seed)
            self.input_source = f"random (seed {seed})"
        self.input_shapes = {name: list(array.shape) for name, array in self.feeds[0].items()}
        self.tolerance = tolerance
        self.budget = budget if budget is not None and budget.is_set() else None
        runner = Runner(reference, label="original model")
        self.reference_outputs = [runner.run(feed) for feed in self.feeds]
        self.output_names = runner.output_names

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
        for outputs, reference in zip(candidate_outputs, self.reference_outputs):
            for name in self.output_names:
                if name not in outputs:
                    continue
                current = compare(name, reference[name], outputs[name], tolerance=self.tolerance)
                if self.budget is not None and reference[name].shape == outputs[name].shape:
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
        notes = []
        if not missing and runner.output_names != self.output_names:
            notes.append(f"the optimized model lists its outputs in another order: {runner.output_names}")
        passed = all(result.passed for result in results) and runner.output_names == self.output_names
        return self._report(results, passed, notes)

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
        on figures pooled over the samples (see FidelityPool)."""
        if comparison.problem.startswith(("shape", "dtype", "NaN")) or pool is None:
            return
        comparison.cosine, comparison.sqnr_db, comparison.top1_agreement = pool.cosine(), pool.sqnr_db(), pool.top1()
        budget, problems = self.budget, []
        if budget.min_cosine is not None and comparison.cosine < budget.min_cosine:
            problems.append(f"cosine {comparison.cosine:.4f} < {budget.min_cosine}")
        if budget.min_sqnr_db is not None and comparison.sqnr_db < budget.min_sqnr_db:
            problems.append(f"SQNR {comparison.sqnr_db:.1f} dB < {budget.min_sqnr_db} dB")
        if (
            budget.min_top1 is not None
            and comparison.top1_agreement is not None
            and comparison.top1_agreement < budget.min_top1
        ):
            problems.append(f"top-1 agreement {comparison.top1_agreement:.3f} < {budget.min_top1}")
        comparison.passed = not problems
        comparison.problem = "; ".join(problems)


class FidelityPool:
    """Cosine, SQNR and top-1 agreement of one output over all samples taken together.

    Pooling weighs each sample by its signal: a sample whose output is all but zero (a text
    detector on a photo without text) has an SQNR of pure noise, which a per-sample worst case
    or median would report as the model's fidelity. A sample whose two outputs differ in shape (a
    count that follows the data, as NonZero's or NonMaxSuppression's) is left out (`skipped`).
    """

    def __init__(self):
        self.signal = self.noise = self.cross = self.candidate_energy = 0.0
        self.agreeing = self.rows = self.skipped = 0
        self.top1_meaningful = True

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            self.skipped += 1
            return
        ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
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

    def cosine(self) -> float:
        norms = math.sqrt(self.signal * self.candidate_energy)
        if norms == 0:
            return 1.0 if self.noise == 0 else 0.0
        return self.cross / norms

    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    def top1(self) -> float | None:
        return self.agreeing / self.rows if self.top1_meaningful and self.rows else None


def verify(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    **options,
) -> VerificationReport:
    """Check that `candidate` computes what `reference` computes; see Verifier for the options."""
    return Verifier(reference, **options).check(candidate)
