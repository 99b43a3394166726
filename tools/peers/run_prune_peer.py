"""Prune one model's channels with onnxsim, in a process of its own; tools/bench_prune.py starts it
in the peers virtualenv.

    python run_prune_peer.py FP32.onnx CALIBRATION_DIR OUTPUT.onnx REPORT.json --sparsity 0.25
        [--importance-norm l2] [--simplify] [--finetune FINETUNED.onnx]

onnxsim.apply_structured_pruning(model, sparsity=..., importance_norm=...) on the float32 model as
loaded, or with --simplify on onnxsim.simplify's result (its docstring expects BatchNormalization
already fused into the Conv before it; it does not fuse it itself). With --finetune, then
onnxsim.apply_pruning_finetune(model it was given, pruned, calibration_data=the CALIBRATION_DIR
samples): its ridge-regression refit of the MatMul/Gemm layers that survived. The refit model is
written only if it changed a weight; a refit that raises is a note, the pruned model still counts.

CALIBRATION_DIR holds one .npz per sample ({input name: array}), read in name order.

It imports nothing but the standard library, numpy, onnx and onnxsim, and times the onnxsim calls
alone. REPORT.json gets {"version", "seconds", "phases", "notes", "parameters_before",
"parameters_after", "finetune": {"status", "seconds", "changed", "error"}}: parameters_before
counts the model handed to apply_structured_pruning (after simplify, if asked), the same way
onnxslim's PruneReport counts (initializers and Constant values). The bench measures the rest.

Exit status: 0 done; 3 onnxsim cannot be imported here; anything else is onnxsim failing (its
traceback is on stderr, whose last line the bench reports).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from run_peer import save  # beside this script: python puts its folder on sys.path
from run_quant_peer import TOOL_UNAVAILABLE, calibration_feeds


def prune_with_onnxsim(model_path: Path, calibration: Path, output: Path, sparsity: float, importance_norm: str,
                       simplify: bool, finetuned_output: Path | None) -> dict:
    try:
        import onnxsim
    except ImportError as error:
        print(f"import onnxsim failed: {error}", file=sys.stderr)
        raise SystemExit(TOOL_UNAVAILABLE) from error
    model = onnx.load(str(model_path))
    phases, notes = {}, []
    if simplify:
        started = time.perf_counter()
        model, check_ok = onnxsim.simplify(model)
        phases["simplify"] = time.perf_counter() - started
        if not check_ok:
            notes.append("onnxsim.simplify's own check failed (check_ok=False)")
    started = time.perf_counter()
    pruned = onnxsim.apply_structured_pruning(model, sparsity=sparsity, importance_norm=importance_norm)
    phases["apply_structured_pruning"] = time.perf_counter() - started
    save(pruned, output)
    report = {"version": onnxsim.__version__, "seconds": sum(phases.values()), "phases": phases,
              "parameters_before": parameters(model), "parameters_after": parameters(pruned)}
    if finetuned_output is not None:
        report["finetune"] = finetune(onnxsim, model, pruned, calibration_feeds(calibration), finetuned_output)
    report["notes"] = "; ".join(notes) or None
    return report


def finetune(onnxsim, model: onnx.ModelProto, pruned: onnx.ModelProto, feeds: list[dict], output: Path) -> dict:
    """apply_pruning_finetune with the calibration samples; the model is saved only if a weight changed."""
    started = time.perf_counter()
    try:
        refit = onnxsim.apply_pruning_finetune(model, pruned, calibration_data=feeds)
    except Exception as error:  # noqa: BLE001 — the refit failing is a finding; the pruned model still counts
        return {"status": "failed", "seconds": time.perf_counter() - started, "error": _first_line(error)}
    seconds = time.perf_counter() - started
    before, after = weights(pruned), weights(refit)
    changed = sorted(name for name, value in after.items()
                     if name not in before or before[name].shape != value.shape or not np.array_equal(before[name], value))
    if changed:
        save(refit, output)
    return {"status": "ok" if changed else "unchanged", "seconds": seconds, "changed": changed}


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The graph's initializers and Constant values by name."""
    found = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(attribute.t)
    return found


def parameters(model: onnx.ModelProto) -> int:
    """Elements of the initializers and Constant values, as onnxslim.prune counts them."""
    total = sum(int(np.prod(tensor.dims)) for tensor in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(int(np.prod(attribute.t.dims)) for attribute in node.attribute if attribute.name == "value")
    return total


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Prune one model's channels with onnxsim.")
    parser.add_argument("model", type=Path, help="the float32 model")
    parser.add_argument("calibration", type=Path, help="a folder of .npz samples (for --finetune)")
    parser.add_argument("output", type=Path, help="where the pruned model goes")
    parser.add_argument("report", type=Path, help="where the JSON report goes")
    parser.add_argument("--sparsity", type=float, required=True, help="share of each chain's channels removed")
    parser.add_argument("--importance-norm", default="l2", choices=["l2", "l1"])
    parser.add_argument("--simplify", action="store_true", help="onnxsim.simplify the model first")
    parser.add_argument("--finetune", type=Path, metavar="FINETUNED", help="also apply_pruning_finetune, to here")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    report = prune_with_onnxsim(arguments.model, arguments.calibration, arguments.output, arguments.sparsity,
                                arguments.importance_norm, arguments.simplify, arguments.finetune)
    arguments.report.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
