"""What a run did, as data: model summaries, per-pass statistics, the verdict, and the JSON form.

Rendering for the terminal lives in cli.py; this module only computes and serializes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import op_histogram
from .manager import PassExecution, RunRecord
from .model import model_bytes
from .verify import VerificationReport

REPORT_VERSION = 1


@dataclass
class ModelSummary:
    """Size and shape of a model: what the before/after table compares."""

    nodes: int
    ops: dict
    parameters: int
    tensor_bytes: int
    file_bytes: int
    opsets: dict
    ir_version: int
    inputs: list
    outputs: list

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(model: onnx.ModelProto) -> ModelSummary:
    """Count nodes (subgraphs included), op types, parameters and bytes of a ModelProto."""
    ops = op_histogram(model)
    parameters, tensor_bytes = _weights(model)
    return ModelSummary(
        nodes=sum(ops.values()),
        ops=dict(sorted(ops.items())),
        parameters=parameters,
        tensor_bytes=tensor_bytes,
        file_bytes=model_bytes(model),
        opsets={opset.domain or "ai.onnx": opset.version for opset in model.opset_import},
        ir_version=model.ir_version,
        inputs=[_describe(value) for value in _real_inputs(model)],
        outputs=[_describe(value) for value in model.graph.output],
    )


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


def _weights(model: onnx.ModelProto) -> tuple[int, int]:
    """Elements of floating-point tensors (the parameters) and bytes of all tensors, bodies included."""
    parameters = total_bytes = 0
    for tensor in _all_tensors(model.graph):
        elements = int(np.prod(tensor.dims, dtype=np.int64))
        if tensor.data_type in FLOAT_TYPES:
            parameters += elements
        itemsize = _itemsize(tensor.data_type)
        total_bytes += elements * itemsize if itemsize else tensor.ByteSize()
    return parameters, total_bytes


FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


def _itemsize(data_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize if data_type != onnx.TensorProto.STRING else 0
    except (KeyError, TypeError, ValueError):
        return 0


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
            "seconds": self.seconds,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str)
