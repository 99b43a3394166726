"""The Python API: `optimize` a model and `verify` one model against another."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference

from . import runtime
from .calibration import CalibrationData, Preprocess, fidelity_split
from .errors import InputSpecError, ModelLoadError, RuntimeFailure, UsageError, VerificationError, VerificationUnavailable
from .instruments import DumpEach, VerifyEach
from .manager import PassContext, PassManager, Pipeline, get_pass, logger as default_logger, preset_names
from .model import check_output_path, check_structure, files_read, load, same_file, save, to_graph, to_model
from .prune import PruneOptions, prune as prune_channels
from .quantize import QuantizeOptions, evaluation_samples, quantize_model
from .repair import interface_repaired, recompute_contradicted_outputs, structure_repaired
from .report import OptimizeReport, summarize
from .shapes import set_input_shapes
from .verify import FidelityBudget, Runner, VerificationReport, Verifier, _first_line, input_shapes, synthesize_inputs

# What onnx.checker and its full check (strict shape inference) raise on an invalid model
INVALID_MODEL = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError)

DEFAULT_PIPELINE = "default"
VERIFY_EACH_FOLDER = "onnxslim-verify-each"
# The names DumpEach and VerifyEach give their files: NNN-<pass>.onnx, NNN-<pass>-before/after.onnx
# and the external data files beside them.
DUMP_NAME = re.compile(r"\d{3,}-.+\.onnx(\.data)?")
# The lossy check of a quantized model when no threshold is given: catches a broken model.
DEFAULT_MIN_COSINE = 0.95


def resolve_pipeline(
    pipeline: str | Pipeline | None = None, passes: str | None = None, skip: Sequence[str] = ()
) -> Pipeline:
    """The pipeline to run: a preset name or pipeline text, replaced by `passes` if given, minus `skip`."""
    if passes is not None and pipeline is not None:
        raise UsageError("give either a pipeline or a list of passes, not both")
    if passes is not None:  # '' too: an empty list is an error, not the default pipeline
        chosen = Pipeline.parse(passes)
    elif isinstance(pipeline, Pipeline):
        chosen = pipeline
    elif pipeline is None or pipeline in preset_names():
        chosen = Pipeline.preset(pipeline or DEFAULT_PIPELINE)
    else:
        chosen = Pipeline.parse(pipeline)
    if skip:
        chosen = chosen.without(list(skip))
    chosen.validate()
    return chosen


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    pipeline: str | Pipeline | None = None,
    passes: str | None = None,
    skip: Sequence[str] = (),
    verify: bool = True,
    inputs: str | os.PathLike | list[dict[str, np.ndarray]] | None = None,
    verify_shapes: dict[str, list[int]] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    samples: int = 2,
    seed: int = 0,
    tolerance: float | None = None,
    budget: FidelityBudget | None = None,
    verify_each: bool = False,
    dump_dir: str | os.PathLike | None = None,
    pass_limit: int | None = None,
    force: bool = False,
    options: dict | None = None,
    logger: logging.Logger | None = None,
    return_report: bool = False,
    quantize: str | None = None,
    calibration: str | os.PathLike | CalibrationData | None = None,
    preprocess: str | Preprocess | None = None,
    calibration_limit: int | None = None,
    quantize_options: QuantizeOptions | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    prune: float | None = None,
    prune_options: PruneOptions | None = None,
):
    """Optimize `model` (a path or a ModelProto) and return the optimized ModelProto.

    The pipeline is the `default` preset unless `pipeline` (a preset name or a pipeline text) or
    `passes` says otherwise. The result is checked with onnx.checker and, unless verify=False,
    against the original with onnxruntime; a result that fails raises VerificationError (with the
    report attached) unless force=True. With return_report=True returns (model, OptimizeReport).
    The input is never modified.

    quantize="int8" then quantizes the simplified model (onnxslim.quantize): `calibration` is a
    folder or file of samples (.npz, .npy, images with `preprocess`), a CalibrationData, or
    "random" (smoke tests only); `quantize_options` says how. The simplified model is verified
    losslessly first, then the quantized one in lossy mode on the evaluation samples, against
    `budget` (default: cosine >= 0.95 on every output, which catches a broken model) and the
    fidelity target. `progress(stage, done, total)` follows calibration and sensitivity runs.

    prune=RATIO (or prune_options=PruneOptions(...)) removes that share of each prunable channel
    group from the simplified model (onnxslim.prune), refits the layers that lost input channels
    on `calibration` when given, and reruns the pipeline; quantization, if asked, comes after.
    """
    started = time.perf_counter()
    runtime.start()  # its onnxruntime import overlaps loading the model and the passes
    if quantize is not None and quantize != "int8":
        raise UsageError(f"quantize='{quantize}': only int8 is supported")
    check_verification_options(samples=samples, seed=seed, tolerance=tolerance)
    if not isinstance(model, onnx.ModelProto):
        _check_dump_folders(model, dump_dir, VERIFY_EACH_FOLDER if verify_each and dump_dir is None else None)
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    # A ModelProto from the caller is checked only if the result fails the checker (see
    # _check_valid): the check costs as much as a small model's whole optimization.
    repairs: list[str] = []
    original = load(model, check=not isinstance(model, onnx.ModelProto), notes=repairs)
    # Repaired before any pass, so the written model can pass onnx.checker (see onnxslim.repair);
    # a ModelProto given is copied first.
    if isinstance(model, onnx.ModelProto):
        original, repairs = structure_repaired(original)
    original, found = interface_repaired(original, _given_ranks(verify_shapes, input_shapes),
                                         own=original is not model)
    chosen = resolve_pipeline(pipeline, passes, skip)
    report = OptimizeReport(source=source, pipeline=str(chosen), before=summarize(original))
    report.notes.extend(repairs + found)
    loaded = time.perf_counter()

    graph = to_graph(original)
    if input_shapes:
        set_input_shapes(graph, input_shapes)
        report.notes.append("inputs made static: " + ", ".join(f"{name}:{dims}" for name, dims in input_shapes.items()))
    if input_shapes:
        verify_shapes = {**(verify_shapes or {}), **input_shapes}
    if prune is not None or prune_options is not None:
        prune_options = replace(prune_options or PruneOptions(), **({"ratio": prune} if prune is not None else {}))
    data = None
    if quantize is not None or prune_options is not None:
        data = _calibration_data(original, calibration, preprocess, verify_shapes, calibration_limit)
        if inputs is None and data is not None and not data.synthetic:
            # Real samples check the simplification too, and a dynamic model needs no --verify-shape.
            inputs = list(evaluation_samples(data, (quantize_options or QuantizeOptions()).held_out).limit(samples))
    verifier = None
    if verify or verify_each:
        with _no_verify_hint():
            verifier = Verifier(
                original, inputs=inputs, shapes=verify_shapes, samples=samples, seed=seed, tolerance=tolerance,
                budget=budget, static_inputs=list(input_shapes or ()),
            )
    instruments = []
    if verify_each:
        instruments.append(VerifyEach(verifier, original, Path(dump_dir or VERIFY_EACH_FOLDER)))
    if dump_dir is not None:
        instruments.append(DumpEach(original, dump_dir))

    reference_ready = time.perf_counter()
    context = PassContext(options=dict(options or {}), logger=logger or default_logger)
    simplifying = chosen
    if prune_options is not None:
        # Pruning plans on the layers as exported; passes that join layers run in the rerun after it.
        simplifying = chosen.without([name for name in chosen.pass_names() if get_pass(name).joins_layers])
    manager = PassManager(simplifying, context=context, instruments=instruments, pass_limit=pass_limit)
    report.run = manager.run(graph)
    optimized = to_model(graph, original)
    optimized_at = time.perf_counter()
    report.after = summarize(optimized)
    if report.run.stopped_at_limit:
        report.notes.append(f"stopped after {pass_limit} pass executions (--pass-limit)")

    recomputed = _check_valid(optimized, original, report.notes)
    _check_interface(optimized, original, input_shapes or {}, recomputed)
    if verify:
        with _no_verify_hint():
            report.verification = verifier.check(optimized)
    else:
        report.verification_skipped = "verification turned off"
    reference = original
    if prune_options is not None and (report.verification is None or report.verification.passed):
        optimized = _prune(optimized, original, report, prune_options, data, progress, chosen,
                           verify=verify, budget=budget, verify_shapes=verify_shapes, samples=samples, seed=seed)
        reference = optimized  # quantization's own budget is measured against the model it was given
    if quantize is not None and (report.verification is None or report.verification.passed):
        optimized = _quantize(optimized, reference, report, quantize, data, quantize_options, progress,
                              verify=verify, budget=budget, verify_shapes=verify_shapes, samples=samples, seed=seed)
    report.seconds = {
        "load": loaded - started,
        "reference": reference_ready - loaded,
        "passes": report.run.seconds,
        "export": optimized_at - reference_ready - report.run.seconds,
        "verify": time.perf_counter() - optimized_at,
        "total": time.perf_counter() - started,
    }
    if report.quantization is not None:  # quantizing ran between export and the final check
        report.seconds["quantize"] = report.quantization.seconds.get("total", 0.0)
        report.seconds["verify"] -= report.seconds["quantize"]
    if report.verification is not None and not report.verification.passed:
        if not force:
            raise VerificationError(report.verification.message, report)
        report.notes.append("verification failed; result kept because force was set")
    return (optimized, report) if return_report else optimized


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


def check_verification_options(*, samples: int = 2, seed: int = 0, tolerance: float | None = None) -> None:
    """Raise UsageError for options verification cannot use: a NaN tolerance would pass anything."""
    if tolerance is not None and not (isinstance(tolerance, numbers.Real) and math.isfinite(tolerance)
                                      and tolerance >= 0):
        raise UsageError(f"the tolerance must be a finite number >= 0, not {tolerance}")
    if not isinstance(samples, numbers.Integral) or samples < 1:
        raise UsageError(f"samples must be a positive number, not {samples}")
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise UsageError(f"the seed must be a non-negative integer, not {seed}")


def _calibration_data(model, calibration, preprocess, shapes, limit) -> CalibrationData | None:
    if calibration is None:
        return None
    if isinstance(calibration, CalibrationData):
        return calibration.limit(limit) if limit else calibration
    if str(calibration) == "random":
        return CalibrationData.random(model, shapes, **({"count": limit} if limit else {}))
    return CalibrationData.from_path(model, calibration, preprocess=preprocess, limit=limit)


def _prune(simplified, original, report, options, data, progress, pipeline, *, verify, budget,
           verify_shapes, samples, seed) -> onnx.ModelProto:
    """Prune the verified simplified model, rerun the pipeline on it, and verify it in lossy mode
    when a budget is given (pruning's cost is the user's to bound; the surgery check is exact)."""
    report.lossless_verification = report.verification
    pruned, report.pruning = prune_channels(simplified, data, options, progress=progress, shapes=verify_shapes,
                                            original=original)
    if report.pruning.surgery_exact is False:
        raise VerificationError(f"pruning surgery check failed: {report.pruning.surgery_check}", report)
    graph = to_graph(pruned)
    PassManager(pipeline, context=PassContext(logger=default_logger)).run(graph)
    pruned = to_model(graph, pruned)
    _check_pruned_structure(pruned, simplified, original, report.pruning.notes)
    _check_runs(pruned, original, data, verify_shapes, report.pruning.notes)
    report.after = summarize(pruned)
    report.notes.append(report.pruning.summary())
    if not verify or budget is None or not budget.is_set():
        report.verification = None
        report.verification_skipped = "pruning is lossy and no budget was set (--min-cosine, --min-sqnr, --min-top1)"
        return pruned
    feeds = list(fidelity_split(data, options.held_out)[1]) if data is not None and not data.synthetic else None
    lossy = Verifier(original, inputs=feeds, shapes=verify_shapes, samples=samples, seed=seed, budget=budget,
                     static_inputs=_made_static(simplified, original))
    report.verification = lossy.check(pruned, label="pruned model")
    return pruned


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
        shape = actual[name].shape if name in actual else None
        fixed = [axis for axis, dim in enumerate(declared[name].dim) if dim.HasField("dim_value")] \
            if name in declared else []
        if shape is None or len(shape) != value.ndim or any(shape[axis] != value.shape[axis] for axis in fixed):
            raise VerificationError(f"pruning broke the model: output '{name}' has shape "
                                    f"{list(shape) if shape is not None else 'none'}, the original's {list(value.shape)}")


def _quantize(simplified, original, report, kind, data, options, progress, *, verify, budget,
              verify_shapes, samples, seed) -> onnx.ModelProto:
    """Quantize the verified simplified model; verify the result in lossy mode on the evaluation samples."""
    options = options or QuantizeOptions()
    report.lossless_verification = report.verification
    quantized, report.quantization = quantize_model(simplified, data, options, progress=progress)
    _check_valid(quantized, original, report.notes)
    report.after = summarize(quantized)
    report.notes.append(report.quantization.summary())
    if not verify:
        return quantized
    budget = budget if budget is not None and budget.is_set() else FidelityBudget(min_cosine=DEFAULT_MIN_COSINE)
    target = options.fidelity_target
    if target is not None:
        field = "min_sqnr_db" if target.metric == "sqnr_db" else "min_cosine"
        budget = replace(budget, **{field: max(getattr(budget, field) or -math.inf, target.value)})
    feeds = list(evaluation_samples(data, options.held_out)) if data is not None else None
    lossy = Verifier(original, inputs=feeds, shapes=verify_shapes, samples=samples, seed=seed, budget=budget,
                     static_inputs=_made_static(simplified, original))
    report.verification = lossy.check(quantized, label="quantized model")
    return quantized


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
    check_verification_options(samples=samples, seed=seed, tolerance=tolerance)
    runtime.start()
    reference, candidate = _load_named(reference, "reference"), _load_named(candidate, "candidate")
    verifier = Verifier(
        reference, inputs=inputs, shapes=verify_shapes, samples=samples, seed=seed, tolerance=tolerance, budget=budget
    )
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
