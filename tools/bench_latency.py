"""onnxruntime latency of an earlier bench_peers run's results, timed again (on a quiet machine).

    python tools/bench_latency.py <cache>/bench/peers.json              # every corpus model and export
    python tools/bench_latency.py RUN/peers.partial.json --models vit-tiny-legacy,ssdlite-legacy

bench_peers times latency after each model's tools have run, on whatever else the machine is
doing; its byte-copy control shows when that was too much. This re-times the same files with the
same method (tools/peers/measure.py: ORT_ENABLE_ALL, one thread, steady state, epochs of fresh
sessions, ours vs each verified peer epoch by epoch, ours against a byte-copy of itself as the
control) and nothing else: the results stay where the run wrote them (<run>/<tool>/<model>.onnx).
Prints one line per model and writes latency.json beside the report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS_DIR))

import bench_peers  # noqa: E402 — needs TOOLS_DIR on sys.path
from peers import measure  # noqa: E402


def time_model(model: dict, run_dir: Path, scratch: Path) -> dict | None:
    """The latency figures of one model of the report, or None when ours did not verify."""
    case = bench_peers.manifest_models([model["name"]])[0]
    references, _ = measure.reference_runs(case.path, case.verify_shapes[:1])
    verified = [key for key, result in model["results"].items()
                if result.get("status") == "ok" and result.get("verdict") == "ok" and key != "ours-cap-lifted"]
    if "ours" not in verified:
        return None
    paths = {"original": case.path, **{key: run_dir / key / f"{case.name}.onnx" for key in verified}}
    paths["ours-copy"] = scratch / f"{case.name}.onnx"
    shutil.copyfile(paths["ours"], paths["ours-copy"])
    times, errors = measure.epoch_latency(paths, references[0].feeds, "all")
    return {
        "ms": {key: statistics.median(runs) for key, runs in times.items()},
        "control": measure.paired_ratio(times["ours"], times["ours-copy"]),
        "peers": {key: measure.paired_ratio(times["ours"], times[key])
                  for key in verified if key != "ours" and key in times},
        "errors": errors,
    }


def line(name: str, figures: dict) -> str:
    control = figures["control"]
    slower = [f"{key} {paired['median']:.3f} [{paired['low']:.3f}, {paired['high']:.3f}]"
              for key, paired in figures["peers"].items() if paired["verdict"] == "slower"]
    faster = sum(paired["verdict"] == "faster" for paired in figures["peers"].values())
    return (f"{name:30s} ours {figures['ms']['ours']:.3f} ms, control {control['median']:.3f} "
            f"[{control['low']:.3f}, {control['high']:.3f}], faster than {faster}/{len(figures['peers'])} peers"
            + (f"; SLOWER than {', '.join(slower)}" if slower else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a bench_peers peers.json or peers.partial.json")
    parser.add_argument("--models", help="comma-separated models (default: every corpus model and export)")
    arguments = parser.parse_args()
    report = json.loads(arguments.report.read_text(encoding="utf-8"))
    chosen = set(arguments.models.split(",")) if arguments.models else None
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for model in report["models"]:
            if "error" in model or (chosen is None and model["group"] not in ("corpus", "exports")):
                continue
            if chosen is not None and model["name"] not in chosen:
                continue
            figures = time_model(model, arguments.report.parent, Path(scratch))
            if figures is None:
                print(f"{model['name']:30s} ours did not verify: not timed", flush=True)
                continue
            results[model["name"]] = figures
            print(line(model["name"], figures), flush=True)
    slower = [name for name, figures in results.items()
              if any(paired["verdict"] == "slower" for paired in figures["peers"].values())]
    print(f"not slower than any verified peer on {len(results) - len(slower)} of {len(results)} models"
          + (f"; slower on {', '.join(slower)}" if slower else ""))
    (arguments.report.parent / "latency.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
