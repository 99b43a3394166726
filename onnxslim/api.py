"""The Python API: `optimize` a model and `verify` one model against another."""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference

from . import runtime
from .calibration import CalibrationData, fidelity_split
from .errors import InputSpecError, ModelLoadError, RuntimeFailure, UsageError, VerificationError, VerificationUnavailable
from .instruments import DumpEach, VerifyEach
from .manager import PassContext, PassManager, Pipeline, get_pass, logger as default_logger
from .model import check_output_path, check_structure, files_read, load, same_file, save, to_graph, to_model
from .options import CalibrationOptions, QuantizeOptions, SimplifyOptions, VerifyOptions
from .prune import PruneOptions, prune as prune_channels
from .quantize import evaluation_samples, quantize_model
from .repair import interface_repaired, recompute_contradicted_outputs, structure_repaired
from .report import OptimizeReport, summarize
from .shapes import set_input_shapes
from .verify import FidelityBudget, Runner, VerificationReport, Verifier, _first_line, input_shapes, synthesize_inputs

# What onnx.checker and its full check (strict shape inference) raise on an invalid model
INVALID_MODEL = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError)

VERIFY_EACH_FOLDER = "onnxslim-verify-each"
# The names DumpEach and VerifyEach give their files: NNN-<pass>.onnx, NNN-<pass>-before/after.onnx
# and the external data files beside them.
DUMP_NAME = re.compile(r"\d{3,}-.+\.onnx(\.data)?")
# The lossy check of a quantized model when no threshold is given: catches a broken model.
DEFAULT_MIN_COSINE = 0.95


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    simplify: SimplifyOptions | str | Pipeline | None = None,
    verify: VerifyOptions | bool | None = None,
    quantize: QuantizeOptions | str | None = None,
    prune: PruneOptions | float | None = None,
    calibration: CalibrationOptions | str | os.PathLike | CalibrationData | None = None,
    return_report: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
):
    """Optimize `model` (a path or a ModelProto) and return the optimized ModelProto.

    `simplify` says which passes run (SimplifyOptions, or a preset name or pipeline text; default:
    the `default` preset). The result is checked with onnx.checker and, unless verify=False,
    against the original with onnxruntime (VerifyOptions say how); a result that fails raises
    VerificationError (with the report attached) unless VerifyOptions(force=True). With
    return_report=True returns (model, OptimizeReport). The input is never modified.

    quantize="int8" (or QuantizeOptions(...)) then quantizes the simplified model
    (onnxslim.quantize) on `calibration`: a folder or file of samples (.npz, .npy, images with a
    preprocess spec), a CalibrationData, "random" (smoke tests only), or CalibrationOptions. The
    simplified model is verified losslessly first, then the quantized one in lossy mode on the
    evaluation samples, against the budget (default: cosine >= 0.95 on every output, which
    catches a broken model) and the fidelity target. `progress(stage, done, total)` follows
    calibration and sensitivity runs.

    prune=RATIO (or PruneOptions(...)) removes that share of each prunable channel group from
    the simplified model (onnxslim.prune), refits the layers that lost input channels on
    `calibration` when given, and reruns the pipeline; quantization, if asked, comes after.
    """
    run = _Optimization(_simplify_options(simplify), _verify_options(verify), _quantize_options(quantize),
                        _prune_options(prune), _calibration_options(calibration), progress)
    run.load(model)
    run.prepare_reference()
    run.simplify()
    run.check_simplified()
    if run.prune is not None and run.verified_so_far():
        run.prune_channels()
    if run.quantize is not None and run.verified_so_far():
        run.quantize_weights()
    report = run.finish()
    return (run.optimized, report) if return_report else run.optimized


def _simplify_options(given) -> SimplifyOptions:
    return given if isinstance(given, SimplifyOptions) else SimplifyOptions(pipeline=given)


def _verify_options(given) -> VerifyOptions:
    if isinstance(given, VerifyOptions):
        return given
    return VerifyOptions(enabled=given is None or bool(given))


def _quantize_options(given) -> QuantizeOptions | None:
    if given is None or isinstance(given, QuantizeOptions):
        return given
    if given != "int8":
        raise UsageError(f"quantize='{given}': only int8 is supported")
    return QuantizeOptions()


def _prune_options(given) -> PruneOptions | None:
    if given is None or isinstance(given, PruneOptions):
        return given
    return PruneOptions(ratio=given)


def _calibration_options(given) -> CalibrationOptions:
    return given if isinstance(given, CalibrationOptions) else CalibrationOptions(source=given)


class _Optimization:
    """One run of optimize(): its stages share the options, the models and the report."""

    def __init__(self, simplify: SimplifyOptions, verify: VerifyOptions, quantize: QuantizeOptions | None,
                 prune: PruneOptions | None, calibration: CalibrationOptions, progress):
        self.started = time.perf_counter()
        runtime.start()  # its onnxruntime import overlaps loading the model and the passes
        self.options, self.verify, self.quantize, self.prune = simplify, verify, quantize, prune
        self.calibration, self.progress = calibration, progress
        self.marks: dict[str, float] = {}

    def load(self, model) -> None:
        """Load and repair the model, resolve the pipeline, start the report."""
        options = self.options
        if not isinstance(model, onnx.ModelProto):
            _check_dump_folders(model, options.dump_dir,
                                VERIFY_EACH_FOLDER if options.verify_each and options.dump_dir is None else None)
        source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
        # A ModelProto from the caller is checked only if the result fails the checker (see
        # _check_valid): the check costs as much as a small model's whole optimization.
        repairs: list[str] = []
        original = load(model, check=not isinstance(model, onnx.ModelProto), notes=repairs)
        # Repaired before any pass, so the written model can pass onnx.checker (see onnxslim.repair);
        # a ModelProto given is copied first.
        if isinstance(model, onnx.ModelProto):
            original, repairs = structure_repaired(original)
        self.original, found = interface_repaired(original, _given_ranks(self.verify.verify_shapes, options.input_shapes),
                                                  own=original is not model)
        self.pipeline = options.pipeline_to_run()
        self.report = OptimizeReport(source=source, pipeline=str(self.pipeline), before=summarize(self.original))
        self.report.notes.extend(repairs + found)
        self.marks["loaded"] = time.perf_counter()

    def prepare_reference(self) -> None:
        """The graph to rewrite, the calibration data, and the original's outputs to compare with."""
        input_shapes, verify = self.options.input_shapes, self.verify
        self.graph = to_graph(self.original)
        if input_shapes:
            set_input_shapes(self.graph, input_shapes)
            self.report.notes.append("inputs made static: " + ", ".join(f"{name}:{dims}" for name, dims in input_shapes.items()))
        self.verify_shapes = {**(verify.verify_shapes or {}), **input_shapes} if input_shapes else verify.verify_shapes
        self.data, inputs = None, verify.inputs
        if self.quantize is not None or self.prune is not None:
            self.data = _calibration_data(self.original, self.calibration, self.verify_shapes)
            if inputs is None and self.data is not None and not self.data.synthetic:
                # Real samples check the simplification too, and a dynamic model needs no --verify-shape.
                held_out = self.quantize.held_out if self.quantize is not None else 0
                inputs = list(evaluation_samples(self.data, held_out).limit(verify.samples))
        self.verifier = None
        if verify.enabled or self.options.verify_each:
            with _no_verify_hint():
                self.verifier = Verifier(
                    self.original, inputs=inputs, shapes=self.verify_shapes, samples=verify.samples, seed=verify.seed,
                    tolerance=verify.tolerance, budget=verify.budget, static_inputs=list(input_shapes or ()),
                )
        self.marks["reference"] = time.perf_counter()

    def simplify(self) -> None:
        """Run the pipeline (without the passes that join layers when pruning comes next)."""
        options = self.options
        instruments = []
        if options.verify_each:
            instruments.append(VerifyEach(self.verifier, self.original, Path(options.dump_dir or VERIFY_EACH_FOLDER)))
        if options.dump_dir is not None:
            instruments.append(DumpEach(self.original, options.dump_dir))
        context = PassContext(options=dict(options.context or {}), logger=options.logger or default_logger)
        simplifying = self.pipeline
        if self.prune is not None:
            # Pruning plans on the layers as exported; passes that join layers run in the rerun after it.
            simplifying = self.pipeline.without([name for name in self.pipeline.pass_names()
                                                 if get_pass(name).joins_layers])
        manager = PassManager(simplifying, context=context, instruments=instruments, pass_limit=options.pass_limit)
        self.report.run = manager.run(self.graph)
        self.optimized = to_model(self.graph, self.original)
        self.marks["optimized"] = time.perf_counter()
        self.report.after = summarize(self.optimized)
        if self.report.run.stopped_at_limit:
            self.report.notes.append(f"stopped after {options.pass_limit} pass executions (--pass-limit)")

    def check_simplified(self) -> None:
        """onnx.checker, the interface, and (unless turned off) onnxruntime against the original."""
        recomputed = _check_valid(self.optimized, self.original, self.report.notes)
        _check_interface(self.optimized, self.original, self.options.input_shapes or {}, recomputed)
        if self.verify.enabled:
            with _no_verify_hint():
                self.report.verification = self.verifier.check(self.optimized)
        else:
            self.report.verification_skipped = "verification turned off"
        self.reference = self.original

    def verified_so_far(self) -> bool:
        return self.report.verification is None or self.report.verification.passed

    def prune_channels(self) -> None:
        """Prune the verified simplified model, rerun the pipeline on it, and verify it in lossy mode
        when a budget is given (pruning's cost is the user's to bound; the surgery check is exact)."""
        simplified, original, report, verify = self.optimized, self.original, self.report, self.verify
        report.lossless_verification = report.verification
        pruned, report.pruning = prune_channels(simplified, self.data, self.prune, progress=self.progress,
                                                shapes=self.verify_shapes, original=original)
        if report.pruning.surgery_exact is False:
            raise VerificationError(f"pruning surgery check failed: {report.pruning.surgery_check}", report)
        graph = to_graph(pruned)
        PassManager(self.pipeline, context=PassContext(logger=default_logger)).run(graph)
        pruned = to_model(graph, pruned)
        _check_pruned_structure(pruned, simplified, original, report.pruning.notes)
        _check_runs(pruned, original, self.data, self.verify_shapes, report.pruning.notes)
        report.after = summarize(pruned)
        report.notes.append(report.pruning.summary())
        # quantization's own budget is measured against the model it was given
        self.optimized = self.reference = pruned
        if not verify.enabled or verify.budget is None or not verify.budget.is_set():
            report.verification = None
            report.verification_skipped = "pruning is lossy and no budget was set (--min-cosine, --min-sqnr, --min-top1)"
            return
        data = self.data
        feeds = list(fidelity_split(data, self.prune.held_out)[1]) if data is not None and not data.synthetic else None
        lossy = Verifier(original, inputs=feeds, shapes=self.verify_shapes, samples=verify.samples, seed=verify.seed,
                         budget=verify.budget, static_inputs=_made_static(simplified, original))
        report.verification = lossy.check(pruned, label="pruned model")

    def quantize_weights(self) -> None:
        """Quantize the verified simplified (or pruned) model; verify the result in lossy mode on
        the evaluation samples."""
        simplified, original, report, options = self.optimized, self.reference, self.report, self.quantize
        report.lossless_verification = report.verification
        quantized, report.quantization = quantize_model(simplified, self.data, options, progress=self.progress)
        _check_valid(quantized, original, report.notes)
        report.after = summarize(quantized)
        report.notes.append(report.quantization.summary())
        self.optimized = quantized
        if not self.verify.enabled:
            return
        budget = self.verify.budget
        budget = budget if budget is not None and budget.is_set() else FidelityBudget(min_cosine=DEFAULT_MIN_COSINE)
        target = options.fidelity_target
        if target is not None:
            field = "min_sqnr_db" if target.metric == "sqnr_db" else "min_cosine"
            budget = replace(budget, **{field: max(getattr(budget, field) or -math.inf, target.value)})
        feeds = list(evaluation_samples(self.data, options.held_out)) if self.data is not None else None
        lossy = Verifier(original, inputs=feeds, shapes=self.verify_shapes, samples=self.verify.samples,
                         seed=self.verify.seed, budget=budget, static_inputs=_made_static(simplified, original))
        report.verification = lossy.check(quantized, label="quantized model")

    def finish(self) -> OptimizeReport:
        """The time each stage took; a failed verification raises unless forced."""
        report, marks = self.report, self.marks
        report.seconds = {
            "load": marks["loaded"] - self.started,
            "reference": marks["reference"] - marks["loaded"],
            "passes": report.run.seconds,
            "export": marks["optimized"] - marks["reference"] - report.run.seconds,
            "verify": time.perf_counter() - marks["optimized"],
            "total": time.perf_counter() - self.started,
        }
        if report.quantization is not None:  # quantizing ran between export and the final check
            report.seconds["quantize"] = report.quantization.seconds.get("total", 0.0)
            report.seconds["verify"] -= report.seconds["quantize"]
        if report.verification is not None and not report.verification.passed:
            if not self.verify.force:
                raise VerificationError(report.verification.message, report)
            report.notes.append("verification failed; result kept because force was set")
        return report


def _given_ranks(*shapes: dict[str, list[int]] | None) -> dict[str, int]:
    """The rank of each input the caller gave dims for (--verify-shape, --input-shape)."""
    return {name: len(dims) for given in shapes if given for name, dims in given.items()}


def _check_dump_folders(source, *folders) -> None:
    """A dump folder must be a folder, and no dump may land on a file the input reads (the input
    may itself be a dump of an earlier run, in the folder this run dumps into)."""
    folders = [folder for folder in folders if folder is not None]
    reads = files_read(source) if folders else []
    for folder in folders:
        folder = Path(folder)
        try:
            if folder.exists() and not folder.is_dir():
                raise UsageError(f"the dump folder {folder} is a file, not a folder")
        except OSError as error:
            raise UsageError(f"cannot use the dump folder {folder}: {error.strerror or error}") from error
        # A link to a dump is the dump: its target is what the dumps of this run would replace.
        for file, description in [(Path(os.path.realpath(file)), description) for file, description in reads] + reads:
            if DUMP_NAME.fullmatch(file.name) and same_file(file.parent, folder):
                raise UsageError(f"the dump folder {folder} holds {description} ({file.name}), which a dump "
                                 "of this run could overwrite; choose another folder")


def _calibration_data(model, options: CalibrationOptions, shapes) -> CalibrationData | None:
    source, limit = options.source, options.limit
    if source is None:
        return None
    if isinstance(source, CalibrationData):
        return source.limit(limit) if limit else source
    if str(source) == "random":
        return CalibrationData.random(model, shapes, **({"count": limit} if limit else {}))
    return CalibrationData.from_path(model, source, preprocess=options.preprocess, limit=limit)


def _check_pruned_structure(pruned: onnx.ModelProto, simplified: onnx.ModelProto, original: onnx.ModelProto,
                            notes: list[str]) -> None:
    """onnx.checker's full check (strict shape inference: the new weight shapes must fit) on the
    pruned model; where the model fails it before pruning too, the ordinary check, and a note."""
    try:
        check_structure(pruned, full=True)
        return
    except INVALID_MODEL as error:
        failure = error
    try:
        check_structure(simplified, full=True)
    except INVALID_MODEL as error:
        notes.append("the model fails onnx.checker's full check before pruning too "
                     f"({_first_line(error)}): the pruned model got the ordinary check")
        try:
            check_structure(pruned)
            return
        except INVALID_MODEL as ordinary:
            failure = ordinary
    raise VerificationError(f"pruning made the model invalid ONNX: {_first_line(failure)}") from failure


@contextlib.contextmanager
def _no_verify_hint():
    """onnxruntime cannot load or run a model optimize() verifies with: verification can be turned
    off, so say how. Only here: `onnxslim verify`, calibration and reconstruction have no such
    remedy. A crash, a time-out or an out-of-memory (RuntimeFailure) says what happened itself."""
    try:
        yield
    except RuntimeFailure:
        raise
    except VerificationUnavailable as error:
        raise VerificationUnavailable(f"{error} (use --no-verify to skip verification)") from error.__cause__


def _check_runs(pruned: onnx.ModelProto, original: onnx.ModelProto, data, shapes, notes: list[str]) -> None:
    """A pruned model must load and run in onnxruntime (a calibration sample, else a random input)
    and give outputs of the original's rank and of its shape on every dim the original's graph
    declares fixed (a count that follows the data, as NonZero's or NonMaxSuppression's, may
    change with the values); where the original itself cannot run, a note."""
    try:
        feed = next(iter(data)) if data is not None else synthesize_inputs(original, input_shapes(original, shapes)[0], 1)[0]
        expected = Runner(original, label="original model").run(feed)
    except (VerificationUnavailable, InputSpecError) as error:
        notes.append(f"the pruned model was not run in onnxruntime: {_first_line(error.__cause__ or error)}")
        return
    try:
        actual = Runner(pruned, label="pruned model").run(feed)
    except VerificationUnavailable as error:
        raise VerificationError(f"pruning broke the model: onnxruntime cannot load or run it: "
                                f"{_first_line(error.__cause__ or error)}") from error
    declared = {output.name: output.type.tensor_type.shape for output in original.graph.output}
    for name, value in expected.items():
        if not isinstance(value, np.ndarray):  # a sequence or a map (a ZipMap): its kind must stay
            if type(actual.get(name)) is not type(value):
                raise VerificationError(f"pruning broke the model: output '{name}' is no longer a {type(value).__name__}")
            continue
        shape = actual[name].shape if name in actual else None
        fixed = [axis for axis, dim in enumerate(declared[name].dim) if dim.HasField("dim_value")] \
            if name in declared else []
        if shape is None or len(shape) != value.ndim or any(shape[axis] != value.shape[axis] for axis in fixed):
            raise VerificationError(f"pruning broke the model: output '{name}' has shape "
                                    f"{list(shape) if shape is not None else 'none'}, the original's {list(value.shape)}")


def _check_interface(model: onnx.ModelProto, original: onnx.ModelProto, made_static: dict,
                     recomputed: frozenset[str] = frozenset()) -> None:
    """The model's inputs (overridable ones included) and outputs keep their names, order and
    types; an input's dims change only where --input-shape set them, an output's dims only where
    the original declares what its graph does not compute (`recomputed`, see _check_valid).
    Checked with or without verification: a caller feeding the optimized model as it fed the
    original must not break."""
    def interface(values, initializers):
        return [value for value in values if value.name not in initializers]

    old_ir3 = {tensor.name for tensor in original.graph.initializer} if original.ir_version < 4 else set()
    new_ir3 = {tensor.name for tensor in model.graph.initializer} if model.ir_version < 4 else set()
    for kind, before, after in (
        ("inputs", interface(original.graph.input, old_ir3), interface(model.graph.input, new_ir3)),
        ("outputs", list(original.graph.output), list(model.graph.output)),
    ):
        if [value.name for value in before] != [value.name for value in after]:
            raise VerificationError(f"the optimized model's {kind} are {[value.name for value in after]}, "
                                    f"the original's {[value.name for value in before]}")
        for old, new in zip(before, after):
            static = made_static.get(old.name) if kind == "inputs" else None
            if kind == "outputs" and old.name in recomputed and \
                    old.type.tensor_type.elem_type == new.type.tensor_type.elem_type:
                continue
            if old.type == new.type or ((kind == "outputs" or static is not None) and _same_but_dims(old, new, static)):
                continue
            raise VerificationError(f"the optimized model changed the type of {kind[:-1]} '{old.name}': "
                                    f"{_type_text(new.type)}, the original's {_type_text(old.type)}")


def _same_but_dims(old: onnx.ValueInfoProto, new: onnx.ValueInfoProto, static: list[int] | None) -> bool:
    """Same element type and rank, and only dims the original leaves dynamic changed: to the
    --input-shape dims for an input, to a static size inference proved for an output."""
    old_type, new_type = old.type.tensor_type, new.type.tensor_type
    if old.type.WhichOneof("value") != "tensor_type" or new.type.WhichOneof("value") != "tensor_type":
        return False
    if old_type.elem_type != new_type.elem_type:
        return False
    if not old_type.HasField("shape"):
        return True
    if not new_type.HasField("shape") or len(old_type.shape.dim) != len(new_type.shape.dim):
        return False
    for axis, (before, after) in enumerate(zip(old_type.shape.dim, new_type.shape.dim)):
        if before == after or not before.HasField("dim_value"):
            if static is not None and after.dim_value != static[axis] and before != after:
                return False
            continue
        return False
    return True


def _type_text(kind: onnx.TypeProto) -> str:
    text = onnx.helper.printable_type(kind)
    return text if len(text) < 120 else text[:117] + "..."


def _made_static(simplified: onnx.ModelProto, original: onnx.ModelProto) -> list[str]:
    """The inputs --input-shape made static: their dims are not run at a second size."""
    def dynamic(value: onnx.ValueInfoProto) -> bool:
        shape = value.type.tensor_type.shape
        return not value.type.tensor_type.HasField("shape") or any(not dim.HasField("dim_value") for dim in shape.dim)

    before = {value.name: dynamic(value) for value in original.graph.input}
    return [value.name for value in simplified.graph.input if before.get(value.name) and not dynamic(value)]


def _check_valid(model: onnx.ModelProto, original: onnx.ModelProto, notes: list[str]) -> frozenset[str]:
    """A rewrite that produced invalid ONNX is a verification failure, whatever onnxruntime says
    (and with or without verification), unless the input was invalid to begin with (then that is
    the error). The check is onnx.checker's full one (strict shape inference). Where the input
    fails it too because an output declares a shape its graph does not compute, the result's
    output is written as computed, with a note (returns those outputs' names); where the input
    fails it otherwise, the ordinary check, and a note."""
    try:
        check_structure(model, full=True)
        return frozenset()
    except INVALID_MODEL as error:
        failure = error
    load(original, check=True)  # raises ModelLoadError if the input itself is invalid
    try:
        check_structure(original, full=True)
    except INVALID_MODEL as error:
        # Only on this path, where it is needed: recomputing costs a shape inference.
        declared = [_copied_value(value) for value in model.graph.output]
        recomputed = recompute_contradicted_outputs(model, original)
        if recomputed:
            try:
                check_structure(model, full=True)
                notes.extend(recomputed.values())
                return frozenset(recomputed)
            except INVALID_MODEL:  # something else fails the check too: the outputs as they were
                del model.graph.output[:]
                model.graph.output.extend(declared)
        notes.append(f"the model fails onnx.checker's full check before optimization too ({_first_line(error)}): "
                     "the result got the ordinary check")
        try:
            check_structure(model)
            return frozenset()
        except INVALID_MODEL as ordinary:
            failure = ordinary
    raise VerificationError(f"the optimized model is not valid ONNX: {_first_line(failure)}") from failure


def _copied_value(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copied = onnx.ValueInfoProto()
    copied.CopyFrom(value)
    return copied


def verify(
    reference: str | os.PathLike | onnx.ModelProto,
    candidate: str | os.PathLike | onnx.ModelProto,
    *,
    inputs: str | os.PathLike | list[dict[str, np.ndarray]] | None = None,
    verify_shapes: dict[str, list[int]] | None = None,
    samples: int = 2,
    seed: int = 0,
    tolerance: float | None = None,
    budget: FidelityBudget | None = None,
) -> VerificationReport:
    """Compare `candidate` with `reference` in onnxruntime; returns the report (it does not raise on failure).

    Both models get the same load-time checks (ModelLoadError names the one that fails them): a
    candidate that is not valid ONNX is bad input, not a model that computes something else.
    """
    return compare(reference, candidate, VerifyOptions(inputs=inputs, verify_shapes=verify_shapes, samples=samples,
                                                       seed=seed, tolerance=tolerance, budget=budget))


def compare(reference: str | os.PathLike | onnx.ModelProto, candidate: str | os.PathLike | onnx.ModelProto,
            options: VerifyOptions) -> VerificationReport:
    """verify(), with the options as one object (the command line's)."""
    runtime.start()
    reference, candidate = _load_named(reference, "reference"), _load_named(candidate, "candidate")
    verifier = Verifier(reference, inputs=options.inputs, shapes=options.verify_shapes, samples=options.samples,
                        seed=options.seed, tolerance=options.tolerance, budget=options.budget)
    return verifier.check(candidate, label="candidate model")


def _load_named(model: str | os.PathLike | onnx.ModelProto, role: str) -> onnx.ModelProto:
    """load(model), with a ModelProto that fails the checks named by its role (a file is named by its path)."""
    if not isinstance(model, onnx.ModelProto):
        return load(model)
    try:
        return load(model)
    except ModelLoadError as error:
        raise ModelLoadError(f"the {role} model: {error}") from error


def optimize_file(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    overwrite_input: bool = False,
    external_data: bool | None = None,
    **options,
) -> OptimizeReport:
    """Optimize the model file `source` into `destination`; returns the report.

    Nothing is written when the result fails verification (unless force=True, and then the
    report says so). Writing over the input is refused unless overwrite_input is set.
    """
    if not overwrite_input and same_file(source, destination):
        raise UsageError(f"the output path is the input model ({destination}); choose another path (or allow it "
                         "with --overwrite)")
    # Found now, not after a long run: a path that cannot be written or is a file the input reads.
    reads = files_read(source)
    protected = [] if overwrite_input and same_file(source, destination) else reads
    check_output_path(destination, "output model", protected)
    if external_data:
        check_output_path(Path(f"{destination}.data"), "output model's external data", protected)
    optimized, report = optimize(source, return_report=True, **options)
    save(optimized, destination, external_data=external_data, protect=source, overwrite_input=overwrite_input)
    report.output = str(destination)
    return report
