"""What `optimize` is asked to do, as objects: one per stage, each checked where it is made.

    onnxslim.optimize("model.onnx",
                      simplify=SimplifyOptions(skip=("sink-transposes",)),
                      verify=VerifyOptions(verify_shapes={"x": [1, 3, 224, 224]}),
                      quantize=QuantizeOptions(mode="weights"),
                      calibration=CalibrationOptions("samples/"))

The API, the command line (whose option groups build these) and the report share them.
PruneOptions lives with pruning (onnxslim.prune); quantization re-exports the two objects it takes.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputSpecError, UsageError
from .manager import Pipeline, preset_names
from .verify import FidelityBudget

if TYPE_CHECKING:  # for the annotations only: calibration data is read by the API
    import numpy as np

    from .calibration import CalibrationData, Preprocess

__all__ = [
    "CalibrationOptions",
    "FidelityTarget",
    "QuantizeOptions",
    "SimplifyOptions",
    "VerifyOptions",
    "resolve_pipeline",
]

DEFAULT_PIPELINE = "default"
QUANTIZE_MODES = ("auto", "full", "weights")
CALIBRATION_METHODS = ("auto", "minmax", "percentile", "entropy", "mse")


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


@dataclass(frozen=True)
class SimplifyOptions:
    """Which passes run, and the instruments around them.

    The pipeline is the `default` preset unless `pipeline` (a preset name, a pipeline text or a
    Pipeline) or `passes` (exactly these) says otherwise, minus `skip`. `fold_size_cap` lets
    constant folding store results up to that many bytes (-1: no cap). `input_shapes` makes
    inputs static (it changes the model's interface; verification runs them at those dims).
    `verify_each` checks after every pass that changed something (the verification options say
    how), `dump_dir` saves the model after each, `pass_limit` stops after N pass executions.
    `context` is what every pass finds in PassContext.options; passes log to `logger`.
    """

    pipeline: str | Pipeline | None = None
    passes: str | None = None
    skip: tuple[str, ...] = ()
    fold_size_cap: int | None = None
    input_shapes: Mapping[str, list[int]] | None = None
    verify_each: bool = False
    dump_dir: str | os.PathLike | None = None
    pass_limit: int | None = None
    context: Mapping[str, object] | None = None
    logger: logging.Logger | None = None

    def __post_init__(self):
        # One name is one pass, not its letters.
        object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))
        if self.passes is not None and self.pipeline is not None:
            raise UsageError("give either a pipeline or a list of passes, not both")
        if self.fold_size_cap is not None and not (_is_integer(self.fold_size_cap) and self.fold_size_cap >= -1):
            raise UsageError(f"the fold size cap must be a number of bytes (-1: no cap), not {self.fold_size_cap}")
        if self.pass_limit is not None and not (_is_integer(self.pass_limit) and self.pass_limit >= 0):
            raise UsageError(f"the pass limit must be a non-negative integer, not {self.pass_limit}")

    def pipeline_to_run(self) -> Pipeline:
        """The pipeline these options name, checked (PipelineError or UsageError if it is not valid)."""
        chosen = resolve_pipeline(self.pipeline, self.passes, self.skip)
        if self.fold_size_cap is not None:
            chosen = chosen.with_options("fold-constants", size_cap=self.fold_size_cap)
        return chosen


@dataclass(frozen=True)
class VerifyOptions:
    """How the result is checked against the original in onnxruntime.

    `enabled=False` skips the check (the result still gets onnx.checker's). Inputs come from
    `inputs` (an .npz path or a list of feeds), else `samples` random ones seeded by `seed`, with
    dynamic dims from `verify_shapes` (the model stays dynamic). `tolerance` overrides the
    per-dtype one of lossless checks; `budget` bounds what lossy steps may cost. With `force` a
    result that fails is returned anyway (the report says so).
    """

    enabled: bool = True
    inputs: str | os.PathLike | Sequence[dict[str, np.ndarray]] | None = None
    verify_shapes: Mapping[str, list[int]] | None = None
    samples: int = 2
    seed: int = 0
    tolerance: float | None = None
    budget: FidelityBudget | None = None
    force: bool = False

    def __post_init__(self):
        # A NaN tolerance would pass anything.
        if self.tolerance is not None and not (isinstance(self.tolerance, numbers.Real)
                                               and math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise UsageError(f"the tolerance must be a finite number >= 0, not {self.tolerance}")
        if not isinstance(self.samples, numbers.Integral) or self.samples < 1:
            raise UsageError(f"samples must be a positive number, not {self.samples}")
        if not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise UsageError(f"the seed must be a non-negative integer, not {self.seed}")


@dataclass(frozen=True)
class CalibrationOptions:
    """Samples for quantization and pruning: `source` is a folder or file of .npz (one array per
    input name), .npy or images (made inputs by `preprocess`), a CalibrationData, or "random"
    (smoke tests only); at most `limit` of them are used."""

    source: str | os.PathLike | CalibrationData | None = None
    preprocess: str | Preprocess | None = None
    limit: int | None = None

    def __post_init__(self):
        if self.limit is not None and not (_is_integer(self.limit) and self.limit >= 1):
            raise UsageError(f"the calibration limit must be a positive number of samples, not {self.limit}")


@dataclass(frozen=True)
class FidelityTarget:
    """The fidelity the quantized model must keep on every output: SQNR in dB or cosine."""

    metric: str  # "sqnr_db" or "cosine"
    value: float

    def __post_init__(self):
        # A NaN target is met by nothing and fails no comparison: refused like an unknown metric.
        if self.metric not in ("sqnr_db", "cosine"):
            raise InputSpecError(f"a fidelity target's metric is sqnr_db or cosine, not '{self.metric}'")
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real) or not math.isfinite(self.value):
            raise InputSpecError(f"a fidelity target is a finite number, not {self.value}")
        if self.metric == "cosine" and not -1 <= self.value <= 1:
            raise InputSpecError(f"a cosine target lies in [-1, 1], not {self.value}")

    @classmethod
    def parse(cls, text: str) -> FidelityTarget:
        """'30dB', 'sqnr=30', 'cosine=0.999' (or a bare number: below 1 a cosine, else dB)."""
        cleaned = text.strip().lower().replace(" ", "")
        metric, _, number = cleaned.rpartition("=")
        if not metric and cleaned.endswith("db"):
            metric, number = "sqnr", cleaned[:-2]
        try:
            value = float(number)
        except ValueError:
            raise InputSpecError(f"--fidelity-target '{text}': expected e.g. 30dB, sqnr=30 or cosine=0.999") from None
        if not math.isfinite(value):
            raise InputSpecError(f"--fidelity-target '{text}': the target must be a finite number")
        if not metric:
            metric = "cosine" if value < 1 else "sqnr"
        if metric not in ("sqnr", "cosine"):
            raise InputSpecError(f"--fidelity-target '{text}': the metric is sqnr or cosine, not '{metric}'")
        if metric == "cosine" and not -1 <= value <= 1:
            raise InputSpecError(f"--fidelity-target '{text}': a cosine lies in [-1, 1]")
        return cls("sqnr_db" if metric == "sqnr" else "cosine", value)

    def met(self, fidelity: dict) -> bool:
        return fidelity[self.metric] >= self.value  # False for NaN

    def __str__(self) -> str:
        return f"SQNR >= {self.value:g} dB" if self.metric == "sqnr_db" else f"cosine >= {self.value:g}"


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize; `mode=auto` picks full or weights from the CPU (see cpu_int8_support)."""

    mode: str = "auto"
    method: str = "auto"
    per_channel: bool = True
    activation_type: str = "uint8"
    symmetric_activations: bool = False
    weight_form: str = ""
    exclude: tuple[str, ...] = ()
    fidelity_target: FidelityTarget | None = None
    bias_correction: bool = True
    reduce_range: bool | None = None  # 7-bit weights in full mode; None: when the CPU is x86 without VNNI
    # Samples kept apart to measure fidelity on. Default 0: every sample calibrates (a sample left
    # out is a range left unseen), and fidelity is measured on the last
    # calibration.EVALUATION_SAMPLES of them, which the report says.
    held_out: int = 0
    keep_names: bool = False  # else internal tensors get short names (see the shorten-names pass)

    def __post_init__(self):
        if self.mode not in QUANTIZE_MODES:
            raise UsageError(f"quantization mode must be one of {', '.join(QUANTIZE_MODES)}, not '{self.mode}'")
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, not '{self.method}'")


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
