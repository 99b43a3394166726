"""What a run did, as data: model summaries, per-pass statistics, the verdict, and the JSON form.

Rendering for the terminal lives in cli.py; this module only computes and serializes.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from dataclasses import dataclass, field

import onnx

from .graph import op_histogram
from .manager import PassExecution, RunRecord
from .model import model_bytes, tensor_bytes
from .verify import VerificationReport

REPORT_VERSION = 1


class ModelSummary:
    """Size and shape of a model: what the before/after table compares.

    Figures are computed when first read: an API caller that never looks at the report
    does not pay for serializing the model to learn its file size.
    """

    FIELDS = ("nodes", "ops", "parameters", "tensor_bytes", "file_bytes", "opsets", "ir_version", "inputs", "outputs")

    def __init__(self, model: onnx.ModelProto):
        self._model = model

    @functools.cached_property
    def ops(self) -> dict:
        return dict(sorted(op_histogram(self._model).items()))

    @functools.cached_property
    def nodes(self) -> int:
        return sum(self.ops.values())

    @functools.cached_property
    def parameters(self) -> int:
        return sum(
            math.prod(tensor.dims) for tensor in _all_tensors(self._model.graph) if tensor.data_type in FLOAT_TYPES
        )

    @functools.cached_property
    def tensor_bytes(self) -> int:
        return tensor_bytes(self._model)

    @functools.cached_property
    def file_bytes(self) -> int:
        return model_bytes(self._model)

    @functools.cached_property
    def opsets(self) -> dict:
        return {opset.domain or "ai.onnx": opset.version for opset in self._model.opset_import}

    @property
    def ir_version(self) -> int:
        return self._model.ir_version

    @functools.cached_property
    def inputs(self) -> list:
        return [_describe(value) for value in _real_inputs(self._model)]

    @functools.cached_property
    def outputs(self) -> list:
        return [_describe(value) for value in self._model.graph.output]

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}


def summarize(model: onnx.ModelProto) -> ModelSummary:
    """Nodes (subgraphs included), op types, parameters and bytes of a ModelProto, computed on demand."""
    return ModelSummary(model)


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _describe(value: onnx.ValueInfoProto) -> dict:
    tensor_type = value.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "?"
    shape = None
    if tensor_type.HasField("shape"):
        shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?") for dim in tensor_type.shape.dim]
    return {"name": value.name, "dtype": dtype, "shape": shape}


FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for body in attribute.graphs:
                    yield from _all_tensors(body)


@dataclass
class PassSummary:
    """One pass's executions added up (a pass in a fixed-point group may run several times)."""

    name: str
    runs: int = 0
    changed: int = 0
    nodes_removed: int = 0
    bytes_removed: int = 0
    seconds: float = 0.0
    counters: dict = field(default_factory=dict)


def summarize_passes(executions: list[PassExecution]) -> list[PassSummary]:
    summaries: dict[str, PassSummary] = {}
    for execution in executions:
        summary = summaries.setdefault(execution.name, PassSummary(execution.name))
        summary.runs += 1
        summary.changed += int(execution.changed)
        summary.nodes_removed += execution.nodes_before - execution.nodes_after
        summary.bytes_removed += execution.bytes_before - execution.bytes_after
        summary.seconds += execution.seconds
        counters = Counter(summary.counters)
        counters.update(execution.counters)
        summary.counters = dict(counters)
    return list(summaries.values())


@dataclass
class OptimizeReport:
    """Everything `optimize` did: the pipeline that ran, per-pass statistics, before/after, verdict."""

    source: str
    pipeline: str
    before: ModelSummary
    after: ModelSummary | None = None
    run: RunRecord | None = None
    verification: VerificationReport | None = None
    verification_skipped: str = ""
    output: str | None = None
    seconds: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quantization: object | None = None  # onnxslim.quantize.QuantizationReport
    pruning: object | None = None  # onnxslim.prune.PruneReport
    lossless_verification: VerificationReport | None = None  # of the simplified model, before quantizing

    @property
    def passes(self) -> list[PassSummary]:
        return summarize_passes(self.run.executions) if self.run else []

    @property
    def verdict(self) -> str:
        if self.verification is None:
            return f"not verified ({self.verification_skipped})" if self.verification_skipped else "not verified"
        return "verified" if self.verification.passed else "FAILED"

    def to_dict(self) -> dict:
        return {
            "report_version": REPORT_VERSION,
            "source": self.source,
            "output": self.output,
            "pipeline": self.pipeline,
            "verdict": self.verdict,
            "before": self.before.to_dict(),
            "after": self.after.to_dict() if self.after else None,
            "passes": [summary.__dict__ for summary in self.passes],
            "executions": [execution.to_dict() for execution in self.run.executions] if self.run else [],
            "stopped_at_pass_limit": bool(self.run and self.run.stopped_at_limit),
            "unconverged": list(self.run.unconverged) if self.run else [],
            "verification": self.verification.to_dict() if self.verification else None,
            "verification_skipped": self.verification_skipped or None,
            "lossless_verification": self.lossless_verification.to_dict() if self.lossless_verification else None,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "pruning": self.pruning.to_dict() if self.pruning else None,
            "seconds": self.seconds,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str)
