"""Time `onnxslim.optimize` on corpus models, each run in a fresh process, median of several runs.

    python tools/bench_optimize.py                                   # every corpus model, 5 runs
    python tools/bench_optimize.py --models light-squeezenet,ppocr-det --runs 7
    python tools/bench_optimize.py --baseline /tmp/onnxslim-main    # this checkout against another
    python tools/bench_optimize.py --compare before.json after.json  # the table again, nothing run

What onnxruntime's worker process costs (or any change to the framework) shows as the difference
between two checkouts: a fresh process per run, as the command line runs, so the worker's start,
its onnxruntime import overlapping our own work, and our own imports all count. Each run records
the optimize() call (load, passes, verification; the default pipeline), its CPU seconds (ours and
the worker's: a figure that load from elsewhere on the machine moves far less than the wall
time) and the whole process (`import onnxslim` included); with --no-verify, verification off (as tools/bench_peers.py times).
The runs of the models (and of the two checkouts) take turns, so load from elsewhere on the
machine hits them alike.

--baseline DIR also times DIR's onnxslim (DIR on PYTHONPATH) and prints the table of both:
DIR/onnxslim/passes must resolve, e.g.
`git archive main | tar -x -C DIR && ln -s ../passes DIR/onnxslim/passes`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import fetch_models  # noqa: E402 — needs TOOLS_DIR on sys.path

DEFAULT_MODELS = [
    "light-squeezenet", "light-shufflenet", "light-densenet121", "ppocr-det", "ppocr-rec", "ppocr-cls", "yolov8n-320",
]
CHILD = """
import json, os, sys, time
started = time.perf_counter()
import onnxslim
imported = time.perf_counter()

def worker_cpu():  # onnxruntime's worker, where this checkout has one (Linux: /proc)
    runtime = getattr(onnxslim, "_runtime", None)
    pid = runtime.worker_pid() if runtime is not None else None
    if not pid or not os.path.exists(f"/proc/{pid}/stat"):
        return 0.0
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

cpu = time.process_time() + worker_cpu()
begin = time.perf_counter()
if hasattr(onnxslim, "VerifyOptions"):  # a checkout with option objects (--baseline may be older)
    verify = onnxslim.VerifyOptions(enabled=sys.argv[3] == "1", verify_shapes=json.loads(sys.argv[2]))
    onnxslim.optimize(sys.argv[1], verify=verify)
else:
    onnxslim.optimize(sys.argv[1], verify=sys.argv[3] == "1", verify_shapes=json.loads(sys.argv[2]))
print(json.dumps({"import": imported - started, "optimize": time.perf_counter() - begin,
                  "optimize_cpu": time.process_time() + worker_cpu() - cpu}))
"""


def time_once(path: Path, shapes: dict, verify: bool, tree: Path | None) -> dict:
    environment = dict(os.environ)
    if tree is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), environment.get("PYTHONPATH")]))
    cpu_before = _children_cpu()
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(shapes), "1" if verify else "0"],
                          capture_output=True, text=True, env=environment, cwd="/")
    process = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(f"{path.name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    # CPU of the process and of the children it reaped (the worker): what the worker adds even
    # where it overlaps, and a figure that load from elsewhere on the machine barely moves.
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process": process, "cpu": _children_cpu() - cpu_before}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench(names: list[str], runs: int, verify: bool, trees: list[Path | None]) -> list[dict]:
    """One report per tree (None: this checkout)."""
    manifest = fetch_models.load_manifest()
    cases = {name: (fetch_models.fetch(name), manifest[name]["verify_shapes"][0]) for name in names}
    samples = [{name: [] for name in names} for _ in trees]
    for run in range(runs):
        for name in names[run % len(names):] + names[: run % len(names)]:
            order = list(range(len(trees)))
            for index in order[run % len(order):] + order[: run % len(order)]:
                samples[index][name].append(time_once(*cases[name], verify, trees[index]))
                print(f"run {run + 1}/{runs} {name} {trees[index] or 'this checkout'}: "
                      f"{samples[index][name][-1]['optimize']:.3f} s", file=sys.stderr)
    return [{
        "tree": str(tree or TOOLS_DIR.parent), "verify": verify, "runs": runs,
        "models": {name: {key: statistics.median(sample[key] for sample in series) for key in series[0]}
                   | {"optimize_runs": [sample["optimize"] for sample in series]}
                   for name, series in tree_samples.items()},
    } for tree, tree_samples in zip(trees, samples)]


def compare(before: dict, after: dict) -> str:
    """Medians (and the fastest run of optimize(), which load from elsewhere inflates least)."""
    rows = ["| model | optimize() before | after | change | fastest before | after | change "
            "| optimize() CPU before | after | change | process before | after | change "
            "| process CPU before | after | change |",
            "|---|" + "---:|" * 15]
    totals = {key: [0.0, 0.0] for key in ("optimize", "fastest", "optimize_cpu", "process", "cpu")}
    for name, old in before["models"].items():
        new = after["models"].get(name)
        if new is None:
            continue
        cells = [name]
        for key in totals:
            pair = [_figure(old, key), _figure(new, key)]
            totals[key] = [total + value for total, value in zip(totals[key], pair)]
            cells += [f"{pair[0]:.3f} s", f"{pair[1]:.3f} s", _change(*pair)]
        rows.append("| " + " | ".join(cells) + " |")
    cells = ["total"] + [cell for pair in totals.values() for cell in (f"{pair[0]:.3f} s", f"{pair[1]:.3f} s", _change(*pair))]
    rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _figure(model: dict, key: str) -> float:
    return min(model["optimize_runs"]) if key == "fastest" else model.get(key, math.nan)


def _change(old: float, new: float) -> str:
    return f"{(new - old) / old:+.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated corpus names")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per model (the median is kept)")
    parser.add_argument("--no-verify", action="store_true", help="verification off, as tools/bench_peers.py times")
    parser.add_argument("--baseline", type=Path, help="also time this checkout's onnxslim, and compare")
    parser.add_argument("--json", type=Path, help="write the medians here (with --baseline, NAME.baseline.json too)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="print the table of two --json files")
    options = parser.parse_args(argv)
    if options.compare:
        before, after = (json.loads(path.read_text()) for path in options.compare)
        print(compare(before, after))
        return 0
    trees = [None] + ([options.baseline] if options.baseline else [])
    results = bench(options.models.split(","), options.runs, not options.no_verify, trees)
    if options.json:
        options.json.write_text(json.dumps(results[0], indent=2) + "\n")
        if options.baseline:
            options.json.with_suffix(".baseline.json").write_text(json.dumps(results[1], indent=2) + "\n")
    print(compare(results[1], results[0]) if options.baseline else json.dumps(results[0], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
