"""Measuring models side by side: size, parameters, MACs, CPU latency, peak memory, energy, fidelity.

    report = benchmark(["model.onnx", "model.int8.onnx"], BenchOptions(runs=50, warmup=5))
    print(report.to_markdown())

The first model is the reference: ratios and fidelity are against it. Everything here measures
and serializes; the terminal table is drawn by cli.py from `BenchmarkReport.table()`, the same
cells the markdown holds.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

from .benchmark_report import (  # noqa: F401 (SQNR_CAP_DB: callers import it from here)
    MAC_OPS,
    SQNR_CAP_DB,
    BenchmarkReport,
    Latency,
    MacCount,
    Machine,
    ModelBenchmark,
    OutputFidelity,
    Progress,
)
from .calibration import CalibrationData
from .cpu import cpu_int8_support
from .errors import InputSpecError, RuntimeFailure, UsageError, VerificationUnavailable
from .graph import proto_graphs
from .inputs import input_specs, model_inputs, random_shapes, synthesize_inputs
from .layers import attributes, count_parameters, multiply_adds, weight_input
from .model import external_data_files, load, weightless_copy
from .runtime import peak_memory
from .sessions import Runner
from .text import first_line
from .verify import FidelityPool

DEFAULT_RUNS = 50
DEFAULT_WARMUP = 5
DEFAULT_SAMPLES = 8
DEFAULT_SEED = 0


# Initializers above this many elements reach shape inference as typed inputs: only their dims
# matter, and data propagation reads only small (shape-like) tensors.
INFERENCE_TENSOR_ELEMENTS = 1024

# Runs of the session in the child process that measures memory: the first run allocates
# onnxruntime's arena, later ones reuse it.
MEMORY_RUNS = 3

POWERCAP = Path("/sys/class/powercap")
HWMON = Path("/sys/class/hwmon")



# ----------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class BenchOptions:
    """How `benchmark` measures. `runs` timed runs follow `warmup` untimed ones, per model and
    thread count. The inputs are up to `samples` samples from `data` (a folder or file of .npz,
    .npy or images read with `preprocess`, as for calibration), else `samples` random ones seeded
    by `seed`, of the static shapes or of `input_shapes` ({name: dims}) for dynamic dims.
    `measure_memory`: measure each model's peak memory (in a child process)."""

    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    data: str | os.PathLike | None = None
    preprocess: str | None = None
    samples: int = DEFAULT_SAMPLES
    input_shapes: Mapping[str, list[int]] | None = None
    seed: int = DEFAULT_SEED
    measure_memory: bool = True

    def __post_init__(self):
        if self.runs < 1 or self.warmup < 0 or self.samples < 1:
            raise UsageError("runs and samples must be at least 1, warm-up runs at least 0")


def benchmark(
    paths: Sequence[str | os.PathLike], options: BenchOptions = BenchOptions(), *, progress: Progress | None = None
) -> BenchmarkReport:
    """Measure the models at `paths` (the first is the reference) on the same inputs, as `options`
    say. The model files are only read.
    """
    if not paths:
        raise UsageError("give at least one model to benchmark")
    progress = progress or (lambda stage, done, total: None)
    paths = [Path(path) for path in paths]
    models = [load(path) for path in paths]
    _check_same_inputs(paths, models)
    feeds, source, notes = _feeds(models[0], options)
    for path, model in zip(paths[1:], models[1:]):
        problems = [
            problem
            for spec in input_specs(model)
            for problem in spec.problems(feeds[0][spec.name].shape, feeds[0][spec.name].dtype)
        ]
        if problems:
            raise InputSpecError(f"the inputs do not fit {path}: {'; '.join(problems)}")
    shapes = {name: list(array.shape) for name, array in feeds[0].items()}
    results = [
        ModelBenchmark(str(path), file_bytes(path), count_parameters(model), count_macs(model, shapes))
        for path, model in zip(paths, models)
    ]
    if options.measure_memory:
        progress("peak memory", 0, len(paths))
        for result, (peak, problem) in zip(results, measure_peak_memory(paths, feeds[0])):
            result.peak_memory_bytes, result.peak_memory_problem = peak, problem
        progress("peak memory", len(paths), len(paths))
    else:
        for result in results:
            result.peak_memory_problem = "not measured"
    _measure_fidelity(paths, models, feeds, results, progress)
    meter, energy_problem = find_energy_meter()
    all_threads = os.cpu_count() or 1
    try:
        one_thread, energy = _interleaved_latency(paths, models, feeds[0], options.runs, options.warmup, meter, progress)
    finally:
        if meter is not None:
            meter.close()
    for result, latency, joules in zip(results, one_thread, energy):
        result.latency_one_thread, result.energy_joules_per_run = latency, joules
    for index, (path, model, result) in enumerate(zip(paths, models, results)):
        progress(f"latency ({all_threads} threads)", index, len(paths))
        result.latency_all_threads = _latency(path, model, feeds[0], options.runs, options.warmup, all_threads)
    progress(f"latency ({all_threads} threads)", len(paths), len(paths))
    return BenchmarkReport(
        models=results,
        machine=machine(),
        input_shapes=shapes,
        input_source=source,
        random_inputs=options.data is None,
        samples=len(feeds),
        runs=options.runs,
        warmup=options.warmup,
        all_threads=all_threads,
        energy_problem=energy_problem,
        notes=notes,
    )


def _check_same_inputs(paths: list[Path], models: list[onnx.ModelProto]) -> None:
    names = [sorted(value.name for value in model_inputs(model)) for model in models]
    for path, model_names in zip(paths[1:], names[1:]):
        if model_names != names[0]:
            raise InputSpecError(
                f"the models take different inputs: {paths[0]} takes {', '.join(names[0]) or 'none'}, "
                f"{path} takes {', '.join(model_names) or 'none'}; they must have the same input names"
            )


def _feeds(model, options: BenchOptions) -> tuple[list[dict], str, list[str]]:
    """(feeds, where they come from, notes): samples from `options.data`, else seeded random inputs."""
    samples, seed = options.samples, options.seed
    if options.data is not None:
        if options.input_shapes:
            raise UsageError("--input-shape applies to random inputs; with --inputs the shapes come from the data")
        loaded = CalibrationData.from_path(model, options.data, preprocess=options.preprocess, limit=samples)
        return list(loaded), loaded.source, []
    if options.preprocess:
        raise UsageError("--preprocess applies to images given with --inputs")
    resolved, notes = random_shapes(input_specs(model), dict(options.input_shapes or {}), option="--input-shape")
    return synthesize_inputs(model, resolved, samples, seed), f"RANDOM data (seed {seed}), not real inputs", notes


# ----------------------------------------------------------------------------- size and compute


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the model file and the external data files it reads."""
    path = Path(path)
    data_files = {file.resolve() for file in external_data_files(path)}
    return path.stat().st_size + sum(file.stat().st_size for file in data_files if file.is_file())


def count_macs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> MacCount:
    """Multiply-accumulates of the MAC_OPS layers (bodies included) with the inputs at `shapes`,
    from onnx shape inference; a layer with a shape inference cannot tell counts as unknown."""
    known = _inferred_shapes(model, shapes)
    count = MacCount()
    for graph in proto_graphs(model.graph):
        for node in graph.node:
            if node.op_type not in MAC_OPS or node.domain not in ("", "ai.onnx"):
                continue
            count.layers += 1
            macs = _layer_macs(node, known)
            if macs is None:
                count.unknown_layers += 1
            else:
                count.macs += macs
    return count


def _layer_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    inputs = [shapes.get(name) for name in node.input]
    weight = inputs[weight_input(node.op_type)] if weight_input(node.op_type) < len(inputs) else None
    return multiply_adds(node.op_type, attributes(node), inputs[0] if inputs else None, weight, shapes.get(node.output[0]))


def _inferred_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor onnx shape inference (with data propagation) can tell,
    on a copy whose inputs are fixed at `shapes` and whose large weights are typed inputs."""
    inputs = [onnx.helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, shapes.get(value.name))
              for value in model_inputs(model)]
    skeleton = weightless_copy(model, lambda tensor: math.prod(tensor.dims) > INFERENCE_TENSOR_ELEMENTS, inputs)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        inferred = skeleton  # best effort: layers without shapes count as unknown
    known: dict[str, tuple[int, ...]] = {}
    for body in proto_graphs(inferred.graph):
        for tensor in body.initializer:
            known[tensor.name] = tuple(tensor.dims)
        for value in [*body.input, *body.output, *body.value_info]:
            dims = _static_dims(value)
            if dims is not None:
                known[value.name] = dims
    return known


def _static_dims(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    if not all(dim.HasField("dim_value") for dim in dims):
        return None
    return tuple(dim.dim_value for dim in dims)


# ----------------------------------------------------------------------------- fidelity


def _measure_fidelity(paths, models, feeds, results, progress) -> None:
    """Each model's outputs against the first model's, pooled over the samples, with the kernels
    onnxruntime really runs (optimizations on, as deployed)."""
    if len(models) < 2:
        return
    stage = "fidelity"
    progress(stage, 0, len(models) * len(feeds))
    reference_runner = _runner(paths[0], models[0])
    reference = [reference_runner.run(feed) for feed in feeds]
    names = reference_runner.output_names
    del reference_runner
    for index, (path, model, result) in enumerate(zip(paths[1:], models[1:], results[1:]), start=1):
        runner = _runner(path, model)
        pools = {name: FidelityPool() for name in names}
        problems: dict[str, str] = {}
        for sample, (feed, expected) in enumerate(zip(feeds, reference)):
            outputs = runner.run(feed)
            for name in names:
                if name not in problems:
                    problem = _comparable(expected[name], outputs.get(name))
                    if problem:
                        problems[name] = problem
                    else:
                        pools[name].add(expected[name], outputs[name])
            progress(stage, index * len(feeds) + sample + 1, len(models) * len(feeds))
        del runner
        result.fidelity = [
            OutputFidelity(name, problem=problems[name]) if name in problems else _figures(name, pools[name], reference[0][name])
            for name in names
        ]


def _comparable(reference: np.ndarray, candidate: np.ndarray | None) -> str:
    """Why the two outputs cannot be compared ('' when they can)."""
    if candidate is None:
        return "output missing"
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.dtype.kind not in "fiub" or candidate.dtype.kind not in "fiub":
        return "not numeric"
    if reference.shape != candidate.shape:
        return f"shape {list(candidate.shape)} != {list(reference.shape)}"
    if not (np.isfinite(reference).all() and np.isfinite(candidate).all()):
        return "NaN or infinity in the outputs"
    return ""


def _figures(name: str, pool: FidelityPool, example: np.ndarray) -> OutputFidelity:
    sqnr = min(max(pool.sqnr_db(), -SQNR_CAP_DB), SQNR_CAP_DB)
    top1 = pool.top1() if looks_like_class_scores(example) else None
    return OutputFidelity(name, cosine=pool.cosine(), sqnr_db=sqnr, top1=top1)


def looks_like_class_scores(output: np.ndarray) -> bool:
    """Float scores over at least 2 classes on the last axis, every axis between batch and classes
    of size 1 ([classes], [batch, classes], [batch, 1, classes]). Feature maps and detector
    outputs, whose last axis is space or anchors, are not."""
    shape = np.shape(output)
    return (
        np.asarray(output).dtype.kind == "f"
        and len(shape) >= 1
        and shape[-1] >= 2
        and all(size == 1 for size in shape[1:-1])
    )


def _runner(path: Path, model: onnx.ModelProto, threads: int = 0) -> Runner:
    try:
        return Runner(model, label=f"model {path}", threads=threads, optimized=True)
    except RuntimeFailure:
        raise  # a crash, a time-out or an allocation failure says so itself
    except VerificationUnavailable as error:
        cause = error.__cause__ or error
        raise VerificationUnavailable(f"onnxruntime cannot load {path}: {first_line(cause)}") from error


# ----------------------------------------------------------------------------- latency and energy


def _interleaved_latency(paths, models, feed, runs, warmup, meter, progress) -> tuple[list[Latency], list[float | None]]:
    """1-thread latency (and energy per run) of every model, all sessions open, one run of each
    in turn per round, the order rotated each round: load from elsewhere on the machine, and the
    CPU's clock, then hit every model alike."""
    runners = [_runner(path, model, threads=1) for path, model in zip(paths, models)]
    for _ in range(warmup):
        for runner in runners:
            runner.seconds(feed)
    seconds = [[] for _ in runners]
    joules = [0.0 for _ in runners]
    stage = "latency (1 thread)"
    for round_index in range(runs):
        start = round_index % len(runners)
        for index in [*range(start, len(runners)), *range(start)]:
            before = meter.read() if meter else None
            # Timed in the worker, where onnxruntime runs: the transfer of inputs and outputs
            # is not the model's latency (it is in the energy, a few microseconds per run).
            seconds[index].extend(runners[index].seconds(feed))
            if meter:
                # RAPL counters tick about every millisecond; over many short runs, read at random
                # phases of the tick, the sum of the deltas is still the energy of the runs.
                joules[index] += meter.joules(before, meter.read())
        progress(stage, round_index + 1, runs)
    latencies = [_latency_of(times, threads=1) for times in seconds]
    return latencies, [total / runs if meter else None for total in joules]


def _latency(path, model, feed, runs, warmup, threads) -> Latency:
    """Latency of one model alone: a session with many threads spins its workers between runs,
    which would slow another session timed at the same time."""
    runner = _runner(path, model, threads=threads)
    if warmup:
        runner.seconds(feed, warmup)
    return _latency_of(runner.seconds(feed, runs), threads)


def _latency_of(seconds: list[float], threads: int) -> Latency:
    milliseconds = np.asarray(seconds) * 1e3
    return Latency(threads, float(np.median(milliseconds)), float(np.percentile(milliseconds, 90)), len(seconds))


class EnergyMeter:
    """Package energy from RAPL counters, in microjoules: Linux powercap zones (intel-rapl, also
    AMD since Linux 5.8) or the amd_energy hwmon driver's socket counters.

    The files stay open and are re-read at offset 0, which sysfs answers with a fresh value.
    """

    def __init__(self, counters: list[tuple[Path, int]]):
        self.paths = [path for path, _ in counters]
        self._wraps = [wrap for _, wrap in counters]
        self._files = [os.open(path, os.O_RDONLY) for path in self.paths]

    def read(self) -> list[int]:
        return [int(os.pread(descriptor, 32, 0)) for descriptor in self._files]

    def joules(self, before: list[int], after: list[int]) -> float:
        total = 0
        for start, end, wrap in zip(before, after, self._wraps):
            total += end - start if end >= start or not wrap else end + wrap - start  # the counter wrapped
        return total / 1e6

    def close(self) -> None:
        for descriptor in self._files:
            os.close(descriptor)
        self._files = []


def find_energy_meter(powercap: Path = POWERCAP, hwmon: Path = HWMON) -> tuple[EnergyMeter | None, str]:
    """(a meter over the readable package counters, '') or (None, why there is none)."""
    candidates: list[tuple[Path, int]] = []
    # Top-level package zones only: sub-zones (core, dram) are parts of a package, psys and
    # the mmio mirror of the package zone cover it again; adding them would count energy twice.
    for zone in sorted(powercap.glob("*:*")) if powercap.is_dir() else []:
        if not re.fullmatch(r"[a-z-]+:\d+", zone.name) or "mmio" in zone.name:
            continue
        if _read_text(zone / "name").startswith("package") and (zone / "energy_uj").exists():
            wrap = _read_text(zone / "max_energy_range_uj")
            candidates.append((zone / "energy_uj", int(wrap) + 1 if wrap.isdigit() else 0))
    if not candidates:
        for monitor in sorted(hwmon.glob("hwmon*")) if hwmon.is_dir() else []:
            if _read_text(monitor / "name") != "amd_energy":
                continue
            for label in sorted(monitor.glob("energy*_label")):
                if _read_text(label).startswith("Esocket"):
                    candidates.append((label.with_name(label.name.replace("_label", "_input")), 0))
    if not candidates:
        return None, "no readable RAPL counter"
    try:
        meter = EnergyMeter(candidates)
        meter.read()
    except PermissionError:
        return None, f"no readable RAPL counter ({candidates[0][0]} is readable by root only)"
    except (OSError, ValueError) as error:
        return None, f"no readable RAPL counter ({candidates[0][0]}: {first_line(error)})"
    return meter, ""


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# ----------------------------------------------------------------------------- memory


def measure_peak_memory(paths: Sequence[Path], feed: dict[str, np.ndarray]) -> list[tuple[int | None, str]]:
    """For each model, (bytes, '') or (None, why not): the peak RSS of a fresh worker process
    while it creates a 1-thread session from the file and runs it, minus its RSS just before.

    One process per model, so no model inherits another's heap.
    """
    results = []
    for path in paths:
        try:
            results.append((peak_memory(path, feed, MEMORY_RUNS, label=f"model {path}"), ""))
        except VerificationUnavailable as error:
            results.append((None, first_line(error.__cause__ or error)))
    return results


def machine() -> Machine:
    return Machine(cpu=cpu_int8_support().model, cores=os.cpu_count() or 1, onnxruntime=version("onnxruntime"))
