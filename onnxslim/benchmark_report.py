"""What `onnxslim benchmark` reports: latency, size, compute, memory, energy and fidelity of each
model against the first, as a table, Markdown or JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Identical outputs have an infinite SQNR. float32 rounding alone (relative error uniform in
# ±2^-24) gives 10·log10(3·2^48) ≈ 149 dB: at 150 dB two outputs are the same to float precision.
SQNR_CAP_DB = 150.0

# Ops whose multiply-accumulates are counted (onnxslim.benchmark.count_macs); the report names them.
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")

Progress = Callable[[str, int, "int | None"], None]


@dataclass
class Latency:
    """onnxruntime CPU latency of one model at one intra-op thread count, in milliseconds."""

    threads: int
    median_ms: float
    p90_ms: float
    runs: int


@dataclass
class OutputFidelity:
    """One output against the reference model's, pooled over the samples (see FidelityPool).

    `top1` is None when the output does not look like class scores; every figure is None when
    the output cannot be compared, and `problem` says why.
    """

    name: str
    cosine: float | None = None
    sqnr_db: float | None = None
    top1: float | None = None
    problem: str = ""


@dataclass
class MacCount:
    """Multiply-accumulates of the MAC_OPS layers; `unknown_layers` had shapes inference could not tell."""

    macs: int = 0
    layers: int = 0
    unknown_layers: int = 0


@dataclass
class ModelBenchmark:
    """Everything measured on one model."""

    path: str
    file_bytes: int
    parameters: int
    macs: MacCount
    latency_one_thread: Latency | None = None
    latency_all_threads: Latency | None = None
    peak_memory_bytes: int | None = None
    peak_memory_problem: str = ""
    energy_joules_per_run: float | None = None
    fidelity: list[OutputFidelity] = field(default_factory=list)

    def worst_fidelity(self) -> OutputFidelity | None:
        """Each figure at its worst over the outputs (they may come from different outputs)."""
        compared = [output for output in self.fidelity if output.cosine is not None]
        if not self.fidelity:
            return None
        if len(compared) < len(self.fidelity):
            failing = next(output for output in self.fidelity if output.cosine is None)
            return OutputFidelity("(worst)", problem=f"{failing.name}: {failing.problem}")
        top1 = [output.top1 for output in compared if output.top1 is not None]
        return OutputFidelity(
            "(worst)",
            cosine=min(output.cosine for output in compared),
            sqnr_db=min(output.sqnr_db for output in compared),
            top1=min(top1) if top1 else None,
        )


@dataclass
class Machine:
    cpu: str
    cores: int
    onnxruntime: str

    def __str__(self) -> str:
        return f"{self.cpu}, {self.cores} logical cores, onnxruntime {self.onnxruntime}"


@dataclass
class BenchmarkReport:
    """The models measured (the first is the reference), the settings and the machine."""

    models: list[ModelBenchmark]
    machine: Machine
    input_shapes: dict
    input_source: str
    random_inputs: bool
    samples: int
    runs: int
    warmup: int
    all_threads: int
    energy_problem: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> ModelBenchmark:
        return self.models[0]

    def ratios(self, model: ModelBenchmark) -> dict:
        """Size and latency of `model` divided by the reference's (None where either is unknown)."""
        reference = self.reference
        return {
            "file_bytes": _ratio(model.file_bytes, reference.file_bytes),
            "latency_one_thread": _ratio(_median(model.latency_one_thread), _median(reference.latency_one_thread)),
            "latency_all_threads": _ratio(_median(model.latency_all_threads), _median(reference.latency_all_threads)),
        }

    def explanations(self) -> list[str]:
        """What the figures are, one line each, for under the table."""
        shapes = ", ".join(f"{name} {list(dims)}" for name, dims in self.input_shapes.items())
        lines = [
            f"MACs: {', '.join(MAC_OPS)} only (bias and other ops not counted), at input shapes {shapes}",
            "parameters: elements of every initializer and Constant, of any dtype (int8 weights count), bodies included",
            f"latency: onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL; median and p90 of {self.runs} runs after "
            f"{self.warmup} warm-up; 1-thread runs interleaved across models, {self.all_threads}-thread runs one model at a time",
            "peak memory: peak RSS of a fresh process while it creates and runs the session (1 thread), minus its RSS before",
            "energy: package energy (RAPL) per 1-thread run"
            + (f": n/a, {self.energy_problem}" if self.energy_problem else ", idle power of the package included"),
            f"fidelity against {self.reference.path} on {self.samples} sample(s) of {self.input_source}",
            f"machine: {self.machine}",
        ]
        unmeasured = [
            f"peak memory of {model.path}: n/a, {model.peak_memory_problem}"
            for model in self.models
            if model.peak_memory_bytes is None
        ]
        return lines + [f"note: {note}" for note in [*unmeasured, *self.notes]]

    # -- the table both the terminal and the markdown show

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of text cells: one row per figure, one column per model."""
        header = ["", *_labels([model.path for model in self.models])]
        many = f"{self.all_threads} threads"
        rows = [
            self._row("file size", lambda m: _bytes_text(m.file_bytes), ratio="file_bytes"),
            self._row("parameters", lambda m: f"{m.parameters:,}"),
            self._row("MACs", lambda m: _macs_text(m.macs)),
            self._row("latency 1 thread, median", lambda m: _ms(m.latency_one_thread, "median_ms"), ratio="latency_one_thread"),
            self._row("latency 1 thread, p90", lambda m: _ms(m.latency_one_thread, "p90_ms")),
            self._row(f"latency {many}, median", lambda m: _ms(m.latency_all_threads, "median_ms"), ratio="latency_all_threads"),
            self._row(f"latency {many}, p90", lambda m: _ms(m.latency_all_threads, "p90_ms")),
            self._row("peak memory", lambda m: "n/a" if m.peak_memory_bytes is None else _bytes_text(m.peak_memory_bytes)),
            self._row("energy / run", lambda m: _joules_text(m.energy_joules_per_run)),
        ]
        random = " (random inputs)" if self.random_inputs else ""
        rows.append(self._fidelity_row(f"cosine, worst output{random}", "cosine", None))
        rows.append(self._fidelity_row(f"SQNR dB, worst output{random}", "sqnr_db", None))
        rows.append(self._fidelity_row(f"top-1 agreement, worst output{random}", "top1", None))
        names = [output.name for output in self.models[1].fidelity] if len(self.models) > 1 else []
        if len(names) > 1:
            for name in names:
                rows.append(self._fidelity_row(f"{name}: cosine / SQNR dB / top-1", None, name))
        return header, rows

    def _row(self, label: str, cell: Callable[[ModelBenchmark], str], ratio: str | None = None) -> list[str]:
        cells = [label]
        for index, model in enumerate(self.models):
            text = cell(model)
            factor = self.ratios(model)[ratio] if ratio and index else None
            cells.append(f"{text} ({factor:.2f}×)" if factor is not None else text)
        return cells

    def _fidelity_row(self, label: str, figure: str | None, output: str | None) -> list[str]:
        cells = [label, "reference"]
        for model in self.models[1:]:
            if output is None:
                chosen = model.worst_fidelity()
            else:
                chosen = next((item for item in model.fidelity if item.name == output), None)
            if chosen is None or chosen.problem:
                cells.append(f"n/a ({chosen.problem})" if chosen else "n/a")
            elif figure is None:
                cells.append(f"{_cosine_text(chosen.cosine)} / {_sqnr_text(chosen.sqnr_db)} / {_share_text(chosen.top1)}")
            else:
                cells.append({"cosine": _cosine_text, "sqnr_db": _sqnr_text, "top1": _share_text}[figure](getattr(chosen, figure)))
        return cells

    # -- files

    def to_dict(self) -> dict:
        models = []
        for model in self.models:
            data = asdict(model)
            worst = model.worst_fidelity()
            data["worst_fidelity"] = asdict(worst) if worst else None
            data["ratios"] = self.ratios(model)
            models.append(data)
        return _finite_or_none({
            "reference": self.reference.path,
            "models": models,
            "mac_ops": list(MAC_OPS),
            "sqnr_cap_db": SQNR_CAP_DB,
            "input_shapes": self.input_shapes,
            "input_source": self.input_source,
            "random_inputs": self.random_inputs,
            "samples": self.samples,
            "runs": self.runs,
            "warmup": self.warmup,
            "all_threads": self.all_threads,
            "energy_problem": self.energy_problem or None,
            "machine": asdict(self.machine),
            "notes": self.notes,
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        """A table ready to paste, the machine facts, and what the figures are."""
        header, rows = self.table()
        lines = [
            "| " + " | ".join(_markdown_cell(cell) for cell in header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
        ]
        lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in rows]
        lines += ["", f"Machine: {self.machine}.", ""]
        lines += [f"- {line}" for line in self.explanations() if not line.startswith("machine:")]
        return "\n".join(lines)


def _median(latency: Latency | None) -> float | None:
    return latency.median_ms if latency else None


def _ratio(value, reference) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def _labels(paths: list[str]) -> list[str]:
    """File names as column headers, or the paths as given when two models share a file name."""
    names = [Path(path).name for path in paths]
    return names if len(set(names)) == len(names) else list(paths)


def _bytes_text(size: int) -> str:
    if size >= 1e9:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _macs_text(count: MacCount) -> str:
    text = _si(count.macs)
    if count.unknown_layers:
        text += f" (+{count.unknown_layers} of {count.layers} layers unknown)"
    return text


def _si(value: float) -> str:
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.2f} {suffix}"
    return f"{value:.0f}"


def _ms(latency: Latency | None, figure: str) -> str:
    if latency is None:
        return "n/a"
    value = getattr(latency, figure)
    return f"{value:.3g} ms" if value < 1000 else f"{value:.0f} ms"


def _joules_text(joules: float | None) -> str:
    if joules is None:
        return "n/a"
    return f"{joules * 1e3:.3g} mJ" if joules < 1 else f"{joules:.3g} J"


def _cosine_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def _sqnr_text(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"≥{SQNR_CAP_DB:g}" if value >= SQNR_CAP_DB else f"{value:.1f}"


def _share_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _finite_or_none(value):
    """JSON has no NaN: a figure that is not a number becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value
