"""INT8 post-training quantization of a simplified model, end to end.

    quantized, report = quantize_model(model, CalibrationData.from_path(model, "calib/"), QuantizeOptions())

1. Choose the form for the CPU (`mode=auto`): build the full int8 model (QDQ placed so that
   onnxruntime fuses it into QLinearConv and friends) and time it against the float model on
   this machine. If it is clearly faster and keeps the fidelity floor, keep it; otherwise only
   the weights become int8 (`weights`), in a form onnxruntime turns back into float32 at load:
   the file is still 4x smaller and inference exactly as fast as float. The report gives the
   measured latencies and the CPU's 8-bit instructions. On x86 without VNNI the u8 x s8 kernels
   add pairs of products in 16 bits, so full mode uses 7-bit weights there (no saturation).
2. Calibrate (full mode): the activation ranges the placement needs, by minmax, percentile,
   entropy (KL) or MSE, one sample at a time (onnxslim.calibration).
3. Quantize with the `quantize-int8` pass; optional bias correction (the mean shift the weight
   rounding causes, removed through the layer's bias).
4. Measure fidelity on evaluation samples with the kernels onnxruntime really runs (optimizations
   on): SQNR and cosine of every output. With a fidelity target that is missed, measure each
   layer's sensitivity (output SQNR with only that layer quantized) and keep the most sensitive
   layers in float until the target is met.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from .calibration import CalibrationData, calibrate_range_sets, capture_activations, check_finite_outputs, fidelity_split
from .cpu import CpuInt8Support, cpu_int8_support  # noqa: F401 (cpu_int8_support: callers import it from here)
from .errors import UsageError, VerificationError, VerificationUnavailable
from .graph import constant_value, is_empty
from .manager import PassContext, get_pass
from .model import to_graph, to_model
from .options import FidelityTarget, QuantizeOptions
from .passes.quantize_qdq import (
    Int8Settings,
    activation_tensors,
    along,
    float_weight,
    quantizable_layers,
    quantize_graph,
    weight_axis,
    weight_int8,
)
from .text import json_safe
from .verify import FidelityPool, Runner, sqnr_db

logger = logging.getLogger("onnxslim")

# method=auto tries these and keeps the one whose model is most faithful on calibration samples.
AUTO_METHODS = ("minmax", "percentile", "mse")
SELECTION_SAMPLES = 8
# A clipping method must beat minmax by this much on the selection samples to be chosen: minmax
# clips nothing it saw, while the others' gains on typical samples can turn into clipping on
# unusual ones.
CLIPPING_MARGIN_DB = 2.0
PER_CHANNEL_OPSET = 13
# auto mode: the fidelity full int8 must keep (unless --fidelity-target says otherwise), and how
# much faster than float its measured latency must be to be chosen.
DEFAULT_AUTO_TARGET_TEXT = "cosine=0.97"
FASTER_ENOUGH = 0.85
# auto mode does not search layer by layer to rescue a full int8 model this far from the floor
# (a model broken by int8 activations); it goes to weights only. --quantize-mode full still searches.
HOPELESS_COSINE = 0.5
LATENCY_RUNS = 7
# Samples evaluated per candidate while ranking layer sensitivity (it runs once per layer).
SENSITIVITY_SAMPLES = 4


# ----------------------------------------------------------------------------- report


DEFAULT_AUTO_TARGET = FidelityTarget.parse(DEFAULT_AUTO_TARGET_TEXT)


@dataclass
class LayerRecord:
    """One quantizable layer: int8 or float, why, and its error."""

    name: str
    op: str
    status: str  # "int8" or "float"
    reason: str = ""
    weight_sqnr_db: float | None = None  # the weight's own rounding error
    sensitivity_sqnr_db: float | None = None  # model output SQNR with only this layer quantized


@dataclass
class QuantizationReport:
    mode: str
    reason: str
    cpu: str
    cpu_flags: list
    method: str | None
    calibration: str
    calibration_samples: int
    evaluation: str
    evaluation_samples: int
    layers: list[LayerRecord] = field(default_factory=list)
    activations: int = 0
    unranged: int = 0
    fidelity: dict = field(default_factory=dict)  # worst output: sqnr_db, cosine (pooled over samples)
    per_output: dict = field(default_factory=dict)
    target: str | None = None
    target_met: bool | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        return json_safe(data)

    def summary(self) -> str:
        quantized = sum(layer.status == "int8" for layer in self.layers)
        text = f"int8 ({self.mode}): {quantized}/{len(self.layers)} layers"
        if self.mode == "full":
            text += f", {self.activations} activations"
        if self.fidelity:
            text += "; " + self.summary_of(self.fidelity)
        return text

    @staticmethod
    def summary_of(fidelity: dict) -> str:
        return f"SQNR {fidelity['sqnr_db']:.1f} dB, cosine {fidelity['cosine']:.5f}" if fidelity else "fidelity not measured"


def _rank(value: float) -> float:
    """A figure as a sort key: NaN ranks below everything (the least faithful)."""
    return -math.inf if math.isnan(value) else value


# ----------------------------------------------------------------------------- quantizing


def quantize_model(
    model: onnx.ModelProto,
    data: CalibrationData | None,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    progress: Callable[[str, int, int | None], None] | None = None,
    cpu: CpuInt8Support | None = None,
) -> tuple[onnx.ModelProto, QuantizationReport]:
    """Quantize a (simplified) model to int8; see the module docstring for the steps."""
    return _Quantization(model, data, options, progress, cpu or cpu_int8_support()).run()


class _Quantization:
    """One quantize_model call: the form it chooses, the layers it keeps in float and why, and
    the report it fills on the way."""

    def __init__(self, model: onnx.ModelProto, data: CalibrationData | None, options: QuantizeOptions, progress,
                 cpu: CpuInt8Support):
        self.started = time.perf_counter()
        if options.reduce_range is None:
            options = replace(options, reduce_range=cpu.saturates)
        if options.mode == "full" and data is None:
            raise UsageError("full int8 quantization needs calibration data (--calibration DIR)")
        if options.held_out and data is None:
            raise UsageError("--held-out needs calibration data (--calibration DIR)")
        self.model, self.data, self.options, self.progress, self.cpu = model, data, options, progress, cpu
        self.calibration, self.evaluation = fidelity_split(data, options.held_out)
        self.report = self._new_report()
        self.input_means = None
        if options.bias_correction and self.calibration is not None:
            self.input_means = _layer_input_means(model, self.calibration, options.exclude, progress)
        self.reference = _Outputs(model, self.evaluation) if self.evaluation is not None else None
        self.target = options.fidelity_target
        self.excluded: dict[str, str] = {}  # layer name -> why it stays float
        self.kept_float_names: set[str] = set()  # layers computing in float from int8-stored weights
        self.sensitivity: dict[str, dict] = {}

    def _new_report(self) -> QuantizationReport:
        options, calibration, evaluation = self.options, self.calibration, self.evaluation
        report = QuantizationReport(
            mode=options.mode,
            reason="",
            cpu=self.cpu.reason,
            cpu_flags=list(self.cpu.flags),
            method=None,
            calibration=calibration.description if calibration is not None else "none",
            calibration_samples=len(calibration) if calibration is not None else 0,
            evaluation=evaluation.description if evaluation is not None else "none",
            evaluation_samples=len(evaluation) if evaluation is not None else 0,
            target=str(options.fidelity_target) if options.fidelity_target else None,
        )
        if calibration is not None and calibration.synthetic:
            report.notes.append("calibrated on random data: the ranges say nothing about real inputs")
        if evaluation is not None and not options.held_out:
            report.notes.append(
                f"fidelity measured on {len(evaluation)} of the calibration samples, which calibration used too "
                "(held_out=N keeps samples apart)"
            )
        if options.reduce_range and options.mode != "weights":
            report.notes.append("7-bit weights in full mode: this x86 CPU has no VNNI, and its u8 x s8 kernel would saturate 8-bit ones")
        return report

    def run(self) -> tuple[onnx.ModelProto, QuantizationReport]:
        report = self.report
        quantized, build = self._quantize_in_chosen_form()
        if any(math.isnan(value) for value in report.fidelity.values()):
            problems = "; ".join(
                f"{name}: {', '.join(f'{key} {value}' for key, value in figures.items())}" for name, figures in report.per_output.items()
            )
            raise VerificationError(
                f"the int8 model gives NaN or infinity where the float model does not, on the evaluation samples ({problems})"
            )
        if self.target is not None and report.fidelity:
            report.target_met = self.target.met(report.fidelity)
        elif self.target is not None:
            report.notes.append("no calibration data to measure fidelity with: the target was not checked")
        self._record_layers(build)
        report.seconds["total"] = time.perf_counter() - self.started
        return quantized, report

    def _quantize_in_chosen_form(self) -> tuple[onnx.ModelProto, _Builder]:
        report = self.report
        if self.options.mode == "weights":
            report.mode, report.reason = "weights", "asked for (--quantize-mode weights)"
            return self._quantize_weights()
        if self.options.mode == "full":
            report.mode, report.reason = "full", "asked for (--quantize-mode full)"
            return self._quantize_fully()
        if self.data is None:
            report.mode, report.reason = "weights", "no calibration data: only the weights are int8 (activations need calibrating)"
            return self._quantize_weights()
        return self._quantize_automatically()

    def _quantize_automatically(self) -> tuple[onnx.ModelProto, _Builder]:
        """Full int8 when it is faster here and keeps the fidelity floor, else weights only."""
        report = self.report
        self.target = self.target or DEFAULT_AUTO_TARGET
        report.target = str(self.target)
        quantized, build = self._quantize_fully()
        feed = next(iter(self.evaluation))
        report.latency_ms = _latencies_ms({"float": self.model, "full int8": quantized}, feed)
        float_ms, int8_ms = report.latency_ms["float"], report.latency_ms["full int8"]
        speed = f"{int8_ms:.1f} ms vs {float_ms:.1f} ms float (1 thread, measured on {self.cpu.model})"
        faster = int8_ms < FASTER_ENOUGH * float_ms
        if faster and (self.reference is None or self.target.met(report.fidelity)):
            report.mode = "full"
            report.reason = f"int8 kernels are faster on this CPU: {speed}"
            return quantized, build
        why = f"int8 kernels are not faster on this CPU ({speed})" if not faster else (
            f"full int8 misses {self.target} even with sensitive layers in float"
        )
        report.mode, report.method = "weights", None
        report.reason = f"{why}: only the weights are int8, turned back into float when onnxruntime loads the model"
        report.notes.append(f"full int8 was tried: {report.summary_of(report.fidelity)}")
        self.sensitivity = {}
        quantized, build = self._quantize_weights()
        report.latency_ms["weights int8"] = _latencies_ms({"weights int8": quantized}, feed)["weights int8"]
        return quantized, build

    def _quantize_fully(self) -> tuple[onnx.ModelProto, _Builder]:
        """Full int8 (calibrated activations), with the most sensitive layers kept in float
        when a fidelity target asks for it."""
        model, options, report = self.model, self.options, self.report
        full_model, per_channel = model, options.per_channel
        if per_channel and _opset(model) < PER_CHANNEL_OPSET:
            full_model, per_channel = _upgrade_for_per_channel(model, self.calibration, report)
        tensors = _activation_tensors(full_model, options.exclude)
        progress = self.progress
        calibrating = (lambda done, total: progress("calibrating", done, total)) if progress else None
        methods = AUTO_METHODS if options.method == "auto" else (options.method,)
        range_sets = calibrate_range_sets(
            full_model, self.calibration, tensors, methods, symmetric=options.symmetric_activations, progress=calibrating
        )
        ranges, report.method = _best_ranges(full_model, options, per_channel, range_sets, self.calibration,
                                             self.input_means, report)
        report.seconds["calibrate"] = time.perf_counter() - self.started
        build = _Builder(full_model, "full", options, per_channel, ranges, self.input_means)
        self.excluded.update(_user_excluded(build, options))
        candidate, counters = build(set(self.excluded))
        report.activations, report.unranged = counters.get("activations", 0), counters.get("unranged", 0)
        if self.reference is not None:
            report.fidelity, report.per_output = self.reference.fidelity(candidate)
            hopeless = options.mode == "auto" and not report.fidelity["cosine"] >= HOPELESS_COSINE
            if hopeless:
                report.notes.append(
                    f"full int8 is far from the floor (cosine {report.fidelity['cosine']:.3f}): "
                    "no layer-by-layer search, weights only instead"
                )
            if self.target is not None and not self.target.met(report.fidelity) and not hopeless:
                candidate = self._keep_sensitive_layers_float(build)
        return candidate, build

    def _keep_sensitive_layers_float(self, build: _Builder) -> onnx.ModelProto:
        """Rank the layers by their sensitivity and keep the worst in float until the target is met."""
        report, target = self.report, self.target
        self.sensitivity = _sensitivity(build, self.reference, set(self.excluded), self.progress)
        ranked = sorted(self.sensitivity, key=lambda name: _rank(self.sensitivity[name][target.metric]))
        candidate, kept_float, report.fidelity, report.per_output, int8_storage = _keep_float_until_met(
            build, self.reference, self.excluded, ranked, target
        )
        for name in kept_float:
            self.excluded[name] = (
                "kept in float compute (int8-stored weights) for the fidelity target"
                if int8_storage
                else "kept in float (weights too) for the fidelity target"
            )
        if int8_storage:
            self.kept_float_names.update(kept_float)
        return candidate

    def _quantize_weights(self) -> tuple[onnx.ModelProto, _Builder]:
        build = _Builder(self.model, "weights", self.options, self.options.per_channel, None, self.input_means)
        self.excluded.clear()
        self.excluded.update(_user_excluded(build, self.options))
        candidate, _ = build(set(self.excluded))
        self.report.activations = self.report.unranged = 0
        if self.reference is not None:
            self.report.fidelity, self.report.per_output = self.reference.fidelity(candidate)
        return candidate, build

    def _record_layers(self, build: _Builder) -> None:
        weight_errors = build.weight_errors()
        for name in build.layer_names:
            status = "int8"
            if name in self.excluded:
                status = "float compute" if name in self.kept_float_names else "float"
            self.report.layers.append(
                LayerRecord(
                    name=name,
                    op=build.layer_ops[name],
                    status=status,
                    reason=self.excluded.get(name, ""),
                    weight_sqnr_db=weight_errors.get(name),
                    sensitivity_sqnr_db=self.sensitivity.get(name, {}).get("sqnr_db"),
                )
            )
        if build.corrected:
            self.report.notes.append(f"bias correction on {build.corrected} layers")


def _best_ranges(model, options, per_channel, range_sets: dict, calibration, input_means, report) -> tuple[dict, str]:
    """The range set whose fully quantized model is most faithful (worst output's SQNR) on a few
    calibration samples (the first few, while fidelity is reported on the last ones)."""
    if len(range_sets) == 1:
        (method, ranges), = range_sets.items()
        return ranges, method
    judge = _Outputs(model, calibration.limit(SELECTION_SAMPLES))
    scores = {}
    for method, ranges in range_sets.items():
        build = _Builder(model, "full", options, per_channel, ranges, input_means)
        candidate, _ = build(set(_user_excluded(build, options)))
        scores[method] = judge.fidelity(candidate)[0]["sqnr_db"]
    best = max(scores, key=lambda method: _rank(scores[method]) - (0.0 if method == "minmax" else CLIPPING_MARGIN_DB))
    report.notes.append(
        "calibration method chosen on calibration samples: "
        + ", ".join(f"{method} {score:.1f} dB" for method, score in scores.items())
        + f" -> {best} (another method must beat minmax by {CLIPPING_MARGIN_DB:g} dB)"
    )
    return range_sets[best], best


def _user_excluded(build: _Builder, options: QuantizeOptions) -> dict[str, str]:
    return {name: "excluded (--exclude)" for name in build.layer_names if _matches(name, build.layer_ops[name], options.exclude)}


def _latencies_ms(models: dict[str, onnx.ModelProto], feed: dict, runs: int = LATENCY_RUNS) -> dict[str, float]:
    """Each model's onnxruntime latency on one thread with optimizations on: the fastest of
    `runs` runs after a warm-up, the models taking turns so that load from elsewhere on the
    machine hits them alike."""
    runners = {name: Runner(model, label=name, threads=1, optimized=True) for name, model in models.items()}
    best = {name: math.inf for name in runners}
    for runner in runners.values():
        runner.seconds(feed)
    for _ in range(runs):
        for name, runner in runners.items():
            # Timed where onnxruntime runs: moving inputs and outputs is not the model's latency.
            best[name] = min(best[name], runner.seconds(feed)[0] * 1000)
    return best


def evaluation_samples(data: CalibrationData, held_out: int = 0) -> CalibrationData:
    """The samples fidelity is measured on (see calibration.fidelity_split)."""
    return fidelity_split(data, held_out)[1]


def _opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def _upgrade_for_per_channel(model, calibration, report) -> tuple[onnx.ModelProto, bool]:
    """Per-channel weights need opset 13: convert the model if onnx can and it still computes
    the same; otherwise fall back to one scale per tensor."""
    opset = _opset(model)
    try:
        upgraded = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(upgraded)
        feed = next(iter(calibration))
        before = Runner(model, label="model").run(feed)
        after = Runner(upgraded, label="converted model").run(feed)
        if all(np.allclose(before[name], after[name], rtol=1e-4, atol=1e-5) for name in before):
            report.notes.append(f"opset {opset} converted to {PER_CHANNEL_OPSET} for per-channel weights (outputs unchanged)")
            return upgraded, True
        problem = "the converted model computes something else"
    except Exception as error:  # the converter raises many kinds of errors
        problem = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    report.notes.append(f"opset {opset} < {PER_CHANNEL_OPSET} and conversion failed ({problem}): one weight scale per tensor")
    return model, False


def _matches(name: str, op: str, patterns: Sequence[str]) -> bool:
    return any(pattern == name or pattern == op for pattern in patterns)


def _activation_tensors(model: onnx.ModelProto, exclude: Sequence[str]) -> list[str]:
    return activation_tensors(_annotated_graph(model), frozenset(exclude))


def _annotated_graph(model: onnx.ModelProto):
    """The model as a graph with every tensor's dtype and shape inferred (placement reads dtypes)."""
    graph = to_graph(model)
    get_pass("infer-shapes")(graph, PassContext(logger=logger))
    return graph


class _Builder:
    """Builds the quantized model for a set of layers kept in float (or only one layer quantized)."""

    def __init__(self, model, mode, options: QuantizeOptions, per_channel, ranges, input_means):
        self.model, self.options = model, options
        form = options.weight_form or ("cast-mul" if mode == "weights" else "dequantize")
        # The pass falls back to one scale per tensor for DequantizeLinear before opset 13.
        self.scales_per_channel = per_channel and (form == "cast-mul" or _opset(model) >= PER_CHANNEL_OPSET)
        self.weights: dict = {}  # quantized weights, shared by every build (see weight_int8)
        self.settings = Int8Settings(
            mode=mode,
            per_channel=per_channel,
            activation_type=options.activation_type,
            symmetric_activations=options.symmetric_activations,
            weight_form=options.weight_form,
            reduce_range=mode == "full" and bool(options.reduce_range),
            ranges=ranges,
            weight_cache=self.weights,
            input_means=input_means or {},
        )
        layers = quantizable_layers(to_graph(model))
        self.layer_names = [node.name for node in layers if node.name]
        self.layer_ops = {node.name: node.op for node in layers if node.name}
        self.corrected = 0

    def __call__(self, float_layers: set[str], only: str = "", float_compute: set[str] = frozenset()) -> tuple[onnx.ModelProto, dict]:
        """The model with `float_layers` left float, `float_compute` layers computing in float
        from int8-stored weights (full mode), or with only the layer `only` quantized."""
        graph = _annotated_graph(self.model)
        settings = replace(self.settings, exclude=frozenset(float_layers), include=frozenset([only] if only else []),
                           float_compute=frozenset(float_compute))
        result = quantize_graph(graph, settings, logger)
        context = PassContext(logger=logger)
        self.corrected = result.counters.get("corrected_biases", 0)
        # A quarter of the weight bytes makes the rest of the file count: defaults and long names go.
        for name in ("eliminate-dead-nodes", "drop-default-attributes") + (() if self.options.keep_names else ("shorten-names",)):
            get_pass(name)(graph, context)
        quantized = to_model(graph, self.model)
        # Intermediate shapes are optional and every runtime infers them; with a Q/DQ pair per
        # activation they would weigh more than a small model's biases and scales.
        del quantized.graph.value_info[:]
        return quantized, result.counters

    def weight_errors(self) -> dict[str, float]:
        """Each layer's weight SQNR (dB) after int8 rounding."""
        errors = {}
        for node in quantizable_layers(to_graph(self.model)):
            value = float_weight(node)
            if value is None or not node.name:
                continue
            axis = weight_axis(node, value.ndim) if self.scales_per_channel else None
            quantized, scale = weight_int8(self.weights, node.inputs[1].name, value, axis, self.settings.weight_limit, True)
            restored = quantized * along(scale.astype(np.float64), axis, value.ndim)
            errors[node.name] = sqnr_db(value.astype(np.float64), restored.astype(np.float64))
        return errors


class _Outputs:
    """The float model's outputs on the evaluation samples, to measure candidates against."""

    def __init__(self, model: onnx.ModelProto, evaluation: CalibrationData):
        self.feeds = list(evaluation)
        runner = Runner(model, label="float model", optimized=True)
        self.names = runner.output_names
        self.reference = [runner.run(feed) for feed in self.feeds]
        check_finite_outputs(self.reference, evaluation.labels)

    def fidelity(self, candidate: onnx.ModelProto, samples: int | None = None) -> tuple[dict, dict]:
        """(the worst output's SQNR and cosine, per-output figures), pooled over the samples
        (onnxslim.verify.FidelityPool), with the kernels onnxruntime really runs."""
        runner = Runner(candidate, label="quantized model", optimized=True)
        pools = {name: FidelityPool() for name in self.names}
        for feed, reference in list(zip(self.feeds, self.reference))[:samples]:
            outputs = runner.run(feed)
            for name in self.names:
                pools[name].add(reference[name], outputs[name])
        per_output = {name: {"sqnr_db": pool.sqnr_db(), "cosine": pool.cosine(), "top1": pool.top1()} for name, pool in pools.items()}
        figures = {
            "sqnr_db": FidelityPool.worst(figures["sqnr_db"] for figures in per_output.values()),
            "cosine": FidelityPool.worst(figures["cosine"] for figures in per_output.values()),
        }
        return figures, per_output


def _sensitivity(build: _Builder, reference: _Outputs, excluded: set[str], progress) -> dict[str, dict]:
    """Each quantizable layer's output fidelity when it alone is quantized."""
    names = [name for name in build.layer_names if name not in excluded]
    result = {}
    for index, name in enumerate(names):
        if progress:
            progress("sensitivity", index, len(names))
        candidate, counters = build(excluded, only=name)
        if not counters.get("weights") and not counters.get("activations"):
            continue
        result[name], _ = reference.fidelity(candidate, samples=SENSITIVITY_SAMPLES)
    if progress:
        progress("sensitivity", len(names), len(names))
    return result


def _keep_float_until_met(build: _Builder, reference: _Outputs, excluded: dict, ranked: list[str], target):
    """Keep the k most sensitive layers in float for the smallest k that meets the target:
    k doubles until it does, then a bisection finds the smallest such k. Kept layers first
    compute in float from their int8-stored weights (the file stays small); when even that
    cannot meet the target, they keep their float weights too. Returns (model, kept layers,
    fidelity, per-output fidelity, whether the kept layers' weights stay int8)."""
    for int8_storage in (True, False):
        cache: dict[int, tuple] = {}

        def attempt(count: int):
            if count not in cache:
                kept = set(ranked[:count])
                if int8_storage:
                    model, _ = build(set(excluded), float_compute=kept)
                else:
                    model, _ = build(set(excluded) | kept)
                cache[count] = (model, *reference.fidelity(model))
            return cache[count]

        low, high = 0, 1
        while high < len(ranked) and not target.met(attempt(high)[1]):
            low, high = high, min(len(ranked), high * 2)
        if target.met(attempt(high)[1]):
            break
    if target.met(attempt(high)[1]):
        while high - low > 1:
            middle = (low + high) // 2
            if target.met(attempt(middle)[1]):
                high = middle
            else:
                low = middle
    model, fidelity, per_output = attempt(high)
    return model, ranked[:high], fidelity, per_output, int8_storage


# ----------------------------------------------------------------------------- bias correction


def _layer_input_means(model, calibration, exclude, progress) -> dict[str, np.ndarray]:
    """Per-channel mean of each Conv/Gemm layer's input over the calibration samples (axis 1 for
    Conv, the last axis for Gemm), keyed by layer name."""
    graph = to_graph(model)
    wanted: dict[str, str] = {}
    for node in quantizable_layers(graph, frozenset(exclude)):
        if node.op in ("Conv", "Gemm") and node.name and not is_empty(node.inputs[0]) and constant_value(node.inputs[0]) is None:
            if node.op == "Gemm" and node.attrs.get("transA", 0):
                continue
            wanted[node.name] = node.inputs[0].name
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}

    def reduce(name: str, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float64)
        if value.ndim < 2:
            return
        # [channels, values]: axis 1 for Conv, the last axis for Gemm
        rows = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1) if value.ndim > 2 else value.T
        finite = np.isfinite(rows)  # an activation the model overflowed to infinity says nothing of the mean
        sums[name] = sums.get(name, 0) + np.where(finite, rows, 0.0).sum(axis=1)
        counts[name] = counts.get(name, 0) + finite.sum(axis=1)

    try:
        capture_activations(
            model,
            calibration,
            sorted(set(wanted.values())),
            reduce=reduce,
            progress=(lambda done, total: progress("bias statistics", done, total)) if progress else None,
        )
    except VerificationUnavailable as error:
        logger.warning("bias correction skipped: %s", error)
        return {}
    # A layer with a channel that never held a finite value gets no correction.
    return {
        layer: sums[tensor] / counts[tensor]
        for layer, tensor in wanted.items()
        if tensor in sums and counts[tensor].all() and np.isfinite(sums[tensor]).all()
    }
