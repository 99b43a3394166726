"""What tools/bench_peers.py measures about a model file, always in our own environment.

The same code measures the original and every tool's result, so the numbers are comparable:
node count (If/Loop/Scan bodies included), file size, onnx.checker validity, which input dims are
dynamic, equivalence with the original under onnxruntime at every verification shape, and
onnxruntime latency at the first one (steady state, the results of one model in rotating epochs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

SEED = 0
# Latency is steady-state time, a serving process's: per model a fresh session, WARMUP_RUNS, then
# a block of back-to-back runs (BLOCK_SECONDS, at least BLOCK_MIN_RUNS, at most BLOCK_MAX_RUNS),
# its median. Timing every run in turns with the other results instead leaves each run with a
# cache the previous model filled: a 5 % loss in steady state read as a 1 % gain that way. A session
# carries its own few-percent offset (where its buffers landed: a byte-copy of one file timed 0.97-
# 1.04 of it from session to session), so the results of one model are timed in EPOCHS rounds,
# each with fresh sessions, the order rotating, and compared epoch by epoch.
WARMUP_RUNS = 3
BLOCK_SECONDS = 0.2
BLOCK_MIN_RUNS = 5
BLOCK_MAX_RUNS = 300
EPOCHS = 7
BOOTSTRAP_SAMPLES = 2000
# Two results within 1 % of each other are a tie: timing a byte-copy of one model against itself
# (the bench does, every model) gives epoch ratios up to 3 % apart and medians up to ~1 % off 1.
TIE_MARGIN = 0.01

# (atol, rtol) per output dtype: |actual − reference| ≤ atol + rtol·|reference|, NaN equal to NaN.
# Other dtypes (integers, bool, strings) must match exactly.
TOLERANCES = {
    np.dtype(np.float16): (1e-2, 1e-2),
    np.dtype(np.float32): (1e-4, 1e-3),
    np.dtype(np.float64): (1e-7, 1e-6),
}

# onnxruntime's type strings for the dtypes an input can be synthesized in.
INPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

OPTIMIZATION_LEVELS = {
    "disabled": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class MeasureError(Exception):
    """The model cannot be measured as asked (e.g. a dynamic input without a verification shape)."""


@dataclass
class Reference:
    """The original model's run at one verification shape: the inputs every result is fed and the
    outputs it must reproduce."""

    shapes: dict[str, list[int]]
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of `graph`, counting those inside the bodies of If, Loop, Scan (any graph attribute)."""
    total = 0
    for node in graph.node:
        total += 1
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_nodes(body) for body in attribute.graphs)
    return total


def op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How many nodes of each op type `graph` has, bodies included, as "domain.Op" outside the
    default domain; sorted by op, so that two results can be compared op by op."""
    counts: dict[str, int] = {}

    def walk(body: onnx.GraphProto) -> None:
        for node in body.node:
            key = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            counts[key] = counts.get(key, 0) + 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for subgraph in attribute.graphs:
                        walk(subgraph)

    walk(graph)
    return dict(sorted(counts.items()))


def input_dims(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """The declared dims of every graph input that is not an initializer: an int where the dim is
    fixed, its name (or "?" when it has none) where it is dynamic. Paddle's exporter writes a
    dynamic dim as the value -1, which onnxruntime also takes for "any size"."""
    initializers = {initializer.name for initializer in model.graph.initializer}
    dims = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers or not graph_input.type.tensor_type.HasField("shape"):
            continue
        dims[graph_input.name] = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0
                                  else (dim.dim_param or "?") for dim in graph_input.type.tensor_type.shape.dim]
    return dims


def fixed_dims(original: dict[str, list[int | str]], result: dict[str, list[int | str]]) -> list[str]:
    """The inputs' dims that are dynamic in `original` and fixed in `result`, as "input[axis]=value"."""
    fixed = []
    for name, dims in original.items():
        for axis, (before, after) in enumerate(zip(dims, result.get(name, []))):
            if isinstance(before, str) and isinstance(after, int):
                fixed.append(f"{name}[{axis}]={after}")
    return fixed


def file_bytes(path: Path) -> int:
    """Size of the model file plus its external data file, if it has one beside it."""
    external = path.with_name(path.name + ".data")
    return path.stat().st_size + (external.stat().st_size if external.is_file() else 0)


def check_validity(path: Path) -> str | None:
    """None if onnx.checker accepts the model (full check, with shape inference), else its message."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return _first_line(error)
    return None


def session(path: Path, level: str) -> onnxruntime.InferenceSession:
    """A CPU session on one thread, with onnxruntime's graph optimizations at `level`."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: unused-initializer warnings are not our business
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def synthesize_inputs(model_session: onnxruntime.InferenceSession, shapes: dict[str, list[int]]) -> dict:
    """Seeded inputs for every input the session needs; `shapes` fixes the dynamic dims.

    The seed is the same at every shape, so a shape's inputs do not depend on the shapes before it.
    """
    rng = np.random.default_rng(SEED)
    feeds = {}
    for model_input in model_session.get_inputs():
        shape = shapes.get(model_input.name, model_input.shape)
        if not all(isinstance(dim, int) for dim in shape):
            raise MeasureError(f"input {model_input.name!r} has dynamic shape {shape}: give a verification shape")
        dtype = INPUT_DTYPES.get(model_input.type)
        if dtype is None:
            raise MeasureError(f"input {model_input.name!r} has type {model_input.type}, which cannot be synthesized")
        if np.issubdtype(dtype, np.floating):
            feeds[model_input.name] = rng.random(shape).astype(dtype)  # [0, 1), like a normalized image
        elif dtype is np.bool_:
            feeds[model_input.name] = rng.random(shape) < 0.5
        else:
            # 0/1: valid indices into any table (token types have two rows), and valid masks.
            feeds[model_input.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def run(model_session: onnxruntime.InferenceSession, feeds: dict) -> dict[str, np.ndarray]:
    names = [output.name for output in model_session.get_outputs()]
    return dict(zip(names, (np.asarray(value) for value in model_session.run(names, feeds))))


def reference_runs(path: Path, verify_shapes: list[dict[str, list[int]]]
                   ) -> tuple[list[Reference], onnxruntime.InferenceSession]:
    """Run the original with graph optimizations disabled at every verification shape; also return
    that session, for timing."""
    original = session(path, "disabled")
    references = []
    for shapes in verify_shapes:
        feeds = synthesize_inputs(original, shapes)
        references.append(Reference(shapes, feeds, run(original, feeds)))
    return references, original


def compare(reference: Reference, model_session: onnxruntime.InferenceSession) -> dict:
    """Verdict of a result against the reference at its shape: {"verdict", "detail", "max_abs_diff"}."""
    needed = {model_input.name for model_input in model_session.get_inputs()}
    if needed != set(reference.feeds):
        return _verdict("mismatch", "inputs changed: " + _difference(needed, set(reference.feeds)))
    outputs = run(model_session, reference.feeds)
    if list(outputs) != list(reference.outputs):
        return _verdict("mismatch", "outputs changed: " + _difference(set(outputs), set(reference.outputs)))
    max_abs_diff = 0.0
    for name, expected in reference.outputs.items():
        actual = outputs[name]
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            return _verdict("mismatch", f"{name}: {actual.dtype}{list(actual.shape)} "
                                        f"vs {expected.dtype}{list(expected.shape)}")
        if expected.dtype not in TOLERANCES:
            if not np.array_equal(actual, expected):
                return _verdict("mismatch", f"{name}: values differ ({expected.dtype} must match exactly)")
            continue
        atol, rtol = TOLERANCES[expected.dtype]
        both_finite = np.isfinite(actual) & np.isfinite(expected)
        if both_finite.any():
            difference = np.abs(actual[both_finite].astype(np.float64) - expected[both_finite])
            max_abs_diff = max(max_abs_diff, float(difference.max()))
        if not np.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True).all():
            return _verdict("mismatch", f"{name}: beyond atol {atol:g} + rtol {rtol:g}", max_abs_diff)
    return _verdict("ok", "", max_abs_diff)


def epoch_latency(paths: dict[str, Path], feeds: dict, level: str, epochs: int = EPOCHS) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per model of `paths`, its steady-state milliseconds in each epoch (see EPOCHS), one
    session at a time; also why a model could not be timed (onnxruntime's optimizer failing on it
    is a finding, not a crash of the bench)."""
    times, errors = {key: [] for key in paths}, {}
    keys = list(paths)
    for epoch in range(epochs):
        for offset in range(len(keys)):
            key = keys[(epoch + offset) % len(keys)]
            if key in errors:
                continue
            try:
                times[key].append(_block_ms(session(paths[key], level), feeds))
            except Exception as error:  # noqa: BLE001 — onnxruntime raises its own unrelated exception types
                errors[key] = _first_line(error)
    return {key: runs for key, runs in times.items() if key not in errors}, errors


def _block_ms(model_session: onnxruntime.InferenceSession, feeds: dict) -> float:
    for _ in range(WARMUP_RUNS):
        model_session.run(None, feeds)
    runs = []
    started = time.monotonic()
    while len(runs) < BLOCK_MIN_RUNS or (time.monotonic() - started < BLOCK_SECONDS and len(runs) < BLOCK_MAX_RUNS):
        begun = time.perf_counter()
        model_session.run(None, feeds)
        runs.append(time.perf_counter() - begun)
    return float(np.median(runs)) * 1000


def paired_ratio(ours: list[float], peer: list[float]) -> dict:
    """ours/peer epoch by epoch: the median ratio and a 95 % bootstrap interval of it. "slower"
    only when the whole interval lies above 1 + TIE_MARGIN, "faster" when below 1 − TIE_MARGIN."""
    ratios = np.asarray(ours) / np.asarray(peer)
    rng = np.random.default_rng(SEED)
    resampled = np.median(rng.choice(ratios, size=(BOOTSTRAP_SAMPLES, ratios.size)), axis=1)
    low, high = (float(value) for value in np.percentile(resampled, [2.5, 97.5]))
    verdict = "slower" if low > 1 + TIE_MARGIN else "faster" if high < 1 - TIE_MARGIN else "tie"
    return {"median": float(np.median(ratios)), "low": low, "high": high, "verdict": verdict, "epochs": int(ratios.size)}


def measure(path: Path, references: list[Reference],
            disabled_session: onnxruntime.InferenceSession | None = None) -> dict:
    """Everything the bench reports about one model file.

    The verdict is "ok" only if the result reproduces the original at every verification shape;
    "verdicts" holds one per shape, so a dim baked into a constant shows as a failure at the
    second shape. Latency is timed apart, every result of a model together (epoch_latency).
    The original is measured like any result (its verdict then says that it reproduces itself);
    `disabled_session` lets the caller reuse the session the references were computed with.
    """
    model = onnx.load(str(path), load_external_data=False)  # nodes only: the weights are not needed
    measured = {
        "nodes": count_nodes(model.graph),
        "op_counts": op_counts(model.graph),
        "bytes": file_bytes(path),
        "input_dims": input_dims(model),
    }
    del model
    invalid = check_validity(path)
    measured.update(valid=invalid is None, validity_message=invalid)
    try:
        disabled_session = disabled_session or session(path, "disabled")
    except Exception as error:  # noqa: BLE001 — onnxruntime raises its own unrelated exception types
        failure = _verdict("error", f"onnxruntime cannot load it: {_first_line(error)}")
        measured["verdicts"] = [{"shapes": reference.shapes, **failure} for reference in references]
        measured.update(failure)
        return measured
    verdicts = []
    for reference in references:
        try:
            verdict = compare(reference, disabled_session)
        except Exception as error:  # noqa: BLE001 — as above: a failed run is a result to report
            verdict = _verdict("error", f"onnxruntime run failed: {_first_line(error)}")
        verdicts.append({"shapes": reference.shapes, **verdict})
    measured["verdicts"] = verdicts
    measured.update(_overall(verdicts))
    return measured


def _overall(verdicts: list[dict]) -> dict:
    """One verdict for all shapes: the first failure (its shape named), else ok with the largest
    difference seen."""
    for verdict in verdicts:
        if verdict["verdict"] != "ok":
            shape = ", ".join(f"{name}={dims}" for name, dims in verdict["shapes"].items())
            return _verdict(verdict["verdict"], f"at {shape or 'its static shape'}: {verdict['detail']}",
                            verdict["max_abs_diff"])
    differences = [verdict["max_abs_diff"] for verdict in verdicts if verdict["max_abs_diff"] is not None]
    return _verdict("ok", "", max(differences, default=None))


def _verdict(verdict: str, detail: str, max_abs_diff: float | None = None) -> dict:
    return {"verdict": verdict, "detail": detail, "max_abs_diff": max_abs_diff}


def _difference(names: set[str], expected: set[str], shown: int = 3) -> str:
    """Which names a result added and lost (a few of each), for a one-line message."""
    parts = []
    for what, changed in (("added", sorted(names - expected)), ("lost", sorted(expected - names))):
        if changed:
            more = f" and {len(changed) - shown} more" if len(changed) > shown else ""
            parts.append(f"{what} {', '.join(changed[:shown])}{more}")
    return "; ".join(parts) or "same names, another order"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
