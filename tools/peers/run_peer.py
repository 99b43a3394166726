"""Optimize one model with one tool, in a process of its own; tools/bench_peers.py starts it.

    python run_peer.py TOOL INPUT.onnx OUTPUT.onnx REPORT.json

Runs in the peers virtualenv for the peers and in our own environment for "ours" (and
"ours-cap-lifted"), so it imports nothing but the standard library, onnx and the tool it runs. It
times only the optimization call (the model is already loaded, the result not yet saved) and
writes {"version", "seconds", "notes"} to REPORT.json, with this process's peak RSS; for ours also
"pass_seconds" (the passes alone), "phases" and "pipeline". The parent measures everything else
about the result.

Exit status: 0 done; 3 the tool cannot be imported here; anything else is the tool failing
(its traceback is on stderr, whose last line the parent reports).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import onnx

TOOL_UNAVAILABLE = 3
PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto larger than this must keep its weights in external data


class ToolUnavailable(Exception):
    """The tool is not importable in this environment (not a failure of the tool on the model)."""


def optimize_with_ours(model: onnx.ModelProto, output: Path) -> tuple[onnx.ModelProto, str, dict]:
    """This repository's onnxslim with its default pipeline, verification off (as the peers run)."""
    return _ours(model, pipeline=None)


def optimize_with_ours_cap_lifted(model: onnx.ModelProto, output: Path) -> tuple[onnx.ModelProto, str, dict]:
    """The default pipeline with fold-constants' size cap lifted: every foldable result is stored,
    even where that grows the file (onnx's light models make their weights with ConstantOfShape)."""
    onnxslim = _import_ours()
    pipeline = onnxslim.Pipeline.preset("default").with_options("fold-constants", size_cap=-1)
    return _ours(model, pipeline=str(pipeline))


def _import_ours():
    try:
        import onnxslim
    except ImportError as error:
        raise ToolUnavailable(f"import onnxslim failed: {error}") from error
    if not hasattr(onnxslim, "optimize"):
        # Our environment may hold the PyPI onnxslim instead of this repository's package.
        raise ToolUnavailable(f"{onnxslim.__file__} has no optimize(): not this repository's onnxslim")
    return onnxslim


def _ours(model: onnx.ModelProto, pipeline: str | None) -> tuple[onnx.ModelProto, str, dict]:
    """Optimize with this repository's onnxslim. The report's seconds are the whole optimize()
    call, the same span as a peer's; pass_seconds the pipeline's passes alone; phases optimize()'s
    own breakdown of its time."""
    onnxslim = _import_ours()
    version = getattr(onnxslim, "__version__", "dev")
    started = time.perf_counter()
    optimized, report = onnxslim.optimize(model, simplify=pipeline, verify=False, return_report=True)
    seconds = time.perf_counter() - started
    return optimized, version, {"seconds": seconds, "pass_seconds": report.run.seconds,
                                "phases": dict(report.seconds), "pipeline": report.pipeline}


def optimize_with_pypi_onnxslim(model: onnx.ModelProto, output: Path) -> tuple[onnx.ModelProto, str, dict]:
    import onnxslim

    started = time.perf_counter()
    optimized = onnxslim.slim(model)
    return optimized, onnxslim.__version__, {"seconds": time.perf_counter() - started}


def optimize_with_onnxsim(model: onnx.ModelProto, output: Path) -> tuple[onnx.ModelProto, str, dict]:
    import onnxsim

    started = time.perf_counter()
    optimized, check_ok = onnxsim.simplify(model)
    seconds = time.perf_counter() - started
    return optimized, onnxsim.__version__, {"seconds": seconds, "notes": f"simplify() check_ok={check_ok}"}


def optimize_with_onnxoptimizer(model: onnx.ModelProto, output: Path) -> tuple[onnx.ModelProto, str, dict]:
    import onnxoptimizer

    started = time.perf_counter()
    optimized = onnxoptimizer.optimize(model)  # its default: the fuse-and-elimination passes
    return optimized, onnxoptimizer.__version__, {"seconds": time.perf_counter() - started}


def optimize_with_polygraphy(model: onnx.ModelProto, output: Path) -> tuple[onnx.ModelProto, str, dict]:
    import polygraphy
    from polygraphy.backend.onnx import fold_constants, infer_shapes

    # What `polygraphy surgeon sanitize --fold-constants` does: shape inference on load, then
    # constant folding repeated until nothing changes, with its default options.
    started = time.perf_counter()
    optimized = fold_constants(infer_shapes(model))
    return optimized, polygraphy.__version__, {"seconds": time.perf_counter() - started}


def optimize_with_ort_basic(model: onnx.ModelProto, output: Path) -> tuple[None, str, dict]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(output)
    # onnxruntime writes the optimized model while it builds the session, so its time includes the
    # save and the session set-up: there is no separate optimize call to time.
    started = time.perf_counter()
    onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - started
    return None, onnxruntime.__version__, {"seconds": seconds, "notes": "time includes session set-up and save"}


OPTIMIZERS = {
    "ours": optimize_with_ours,
    "ours-cap-lifted": optimize_with_ours_cap_lifted,
    "onnxslim": optimize_with_pypi_onnxslim,
    "onnxsim": optimize_with_onnxsim,
    "onnxoptimizer": optimize_with_onnxoptimizer,
    "polygraphy": optimize_with_polygraphy,
    "ort-basic": optimize_with_ort_basic,
}


def save(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > PROTOBUF_LIMIT:
        onnx.save(model, path, save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(model, path)


def high_water_mib() -> float | None:
    """This process's peak RSS (VmHWM) in MiB, where /proc has it.

    Not resource.getrusage: on Linux its ru_maxrss starts at the peak of the process that started
    this one, the bench, and so would not be this tool's own.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the kernel writes it in kB
    return None


def main(tool: str, input_path: Path, output_path: Path, report_path: Path) -> int:
    model = onnx.load(input_path)
    try:
        optimized, version, report = OPTIMIZERS[tool](model, output_path)
    except ToolUnavailable as error:
        print(error, file=sys.stderr)
        return TOOL_UNAVAILABLE
    if optimized is not None:  # ort-basic has written its own file
        save(optimized, output_path)
    report["peak_rss_mib"] = high_water_mib()
    report_path.write_text(json.dumps({"tool": tool, "version": version, **report}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in OPTIMIZERS:
        sys.exit(f"usage: run_peer.py {{{','.join(OPTIMIZERS)}}} INPUT.onnx OUTPUT.onnx REPORT.json")
    sys.exit(main(sys.argv[1], *map(Path, sys.argv[2:])))
