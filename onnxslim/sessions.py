"""onnxruntime sessions as the algorithms use them: a runner, the models they run (with inner
tensors exposed as outputs, with weights turned into inputs), and activation capture.

Every session lives in the worker process (onnxslim.runtime). Verification, calibration,
reconstruction and benchmarking build their sessions here, so a model that onnxruntime cannot
load is reported the same way by each of them: as the model the step was working on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx.helper

from .errors import RuntimeFailure, UsageError, VerificationUnavailable
from .inputs import check_feed, model_inputs
from .runtime import Session
from .text import first_line

Feed = dict[str, np.ndarray]
Reducer = Callable[[str, np.ndarray], None]


class Runner:
    """An onnxruntime CPU session (in the worker process, see onnxslim.runtime), with graph
    optimizations disabled unless `optimized` (then onnxruntime fuses as it would in deployment,
    e.g. QDQ groups into integer kernels)."""

    def __init__(self, model: onnx.ModelProto, *, label: str = "model", threads: int = 0, optimized: bool = False):
        self.session = Session(model, label=label, threads=threads, optimized=optimized)
        self.label = label
        self.output_names = self.session.output_names

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feed)))

    def seconds(self, feed: dict[str, np.ndarray], runs: int = 1) -> list[float]:
        """The time of each of `runs` runs, measured where onnxruntime runs (no transfer counted)."""
        return self.session.seconds(feed, runs)

    def fetch(self, names: Sequence[str], feed: Feed) -> dict[str, np.ndarray]:
        """The named tensors for one feed: those the model outputs from onnxruntime, the rest
        (graph inputs) from the feed itself."""
        outputs = [name for name in dict.fromkeys(names) if name in self.output_names]
        values = self.session.run(outputs, feed) if outputs else []  # its errors name the model
        found = dict(zip(outputs, values))
        return {name: found[name] if name in found else feed[name] for name in names}


def open_runner(model: onnx.ModelProto, label: str, purpose: str = "", **options) -> Runner:
    """A Runner over a model that one step built for itself (`label`, e.g. "model to calibrate").
    If onnxruntime cannot load it, the VerificationUnavailable names that model and the step's
    `purpose` (e.g. " for reconstruction"); a crash, a time-out or an allocation failure says so
    itself and passes unchanged."""
    try:
        return Runner(model, label=label, **options)
    except RuntimeFailure:
        raise
    except VerificationUnavailable as error:  # said of the model as this step sees it
        cause = error.__cause__ or error
        raise VerificationUnavailable(f"onnxruntime cannot load the {label}{purpose}: {first_line(cause)}") from cause


# ----------------------------------------------------------------------------- models to run


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose main graph also outputs the node outputs among `names` (graph
    inputs are not: a caller takes them from the feed), typed from value_info where known (a
    stale shape there only makes onnxruntime warn; untyped outputs it infers)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    produced = {output for node in copy.graph.node for output in node.output}
    present = {value.name for value in copy.graph.output}
    known = {value.name: value for value in copy.graph.value_info}
    for name in dict.fromkeys(names):
        if name in produced and name not in present:
            copy.graph.output.append(known[name] if name in known else onnx.ValueInfoProto(name=name))
    return copy


def with_weights_as_inputs(model: onnx.ModelProto, weights: Iterable[str], outputs: Iterable[str] = ()) -> onnx.ModelProto:
    """`with_outputs`, with the named initializers turned into graph inputs of their type and
    shape: one onnxruntime session then runs the model with any values of those weights."""
    copy = with_outputs(model, outputs)
    weights = set(weights)
    kept = [tensor for tensor in copy.graph.initializer if tensor.name not in weights]
    moved = [tensor for tensor in copy.graph.initializer if tensor.name in weights]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    listed = {value.name for value in copy.graph.input}  # IR < 4 lists initializers as inputs too
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                            for tensor in moved if tensor.name not in listed)
    return copy


# ----------------------------------------------------------------------------- activation capture


def capture(
    model: onnx.ModelProto,
    data: Iterable[Feed],
    tensors: Iterable[str],
    *,
    reduce: Reducer | Sequence[Reducer],
    progress: Callable[[int, int | None], None] | None = None,
    threads: int = 0,
    check_feeds: bool = True,
) -> int:
    """Run every sample and call `reduce(name, value)` for each requested tensor, one sample at
    a time; returns the number of samples run (see calibration.capture_activations, which
    fronts it). With `check_feeds`, each feed is checked against the model's inputs first."""
    reducers = [reduce] if callable(reduce) else list(reduce)
    names = list(dict.fromkeys(tensors))
    exposed = _exposed(model, names)
    runner = open_runner(with_outputs(model, exposed), "model to calibrate", threads=threads) if exposed else None
    total = len(data) if hasattr(data, "__len__") else None
    if progress is not None:
        progress(0, total)
    done = 0
    for feed in data:
        if check_feeds:
            check_feed(model, feed)
        values = runner.fetch(names, feed) if runner is not None else {name: feed[name] for name in names}
        for name in names:
            for reducer in reducers:
                reducer(name, values[name])
        del values  # drop this sample's activations before the next sample runs
        done += 1
        if progress is not None:
            progress(done, total)
    return done


def _exposed(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """The requested names to expose as outputs (node outputs); graph inputs come from the feed,
    anything else is a UsageError."""
    graph = model.graph
    produced = {output for node in graph.node for output in node.output if output}
    inputs = {value.name for value in model_inputs(model)}
    initializers = {tensor.name for tensor in graph.initializer}
    exposed = []
    for name in names:
        if name in produced:
            exposed.append(name)
        elif name in initializers and name not in inputs:
            raise UsageError(f"'{name}' is an initializer (a constant), not an activation: nothing to calibrate")
        elif name not in inputs:
            raise UsageError(
                f"no tensor '{name}' in the model's main graph (tensors inside If/Loop/Scan bodies cannot be captured)"
            )
    return exposed
