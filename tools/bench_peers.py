"""Measure onnxslim against other ONNX optimizers on the same models, in one run.

    python tools/bench_peers.py                                  # every corpus model, every tool
    python tools/bench_peers.py --models ppocr-det,light-vgg19 --tools ours,onnxoptimizer
    python tools/bench_peers.py --model-file exports/resnet18.onnx:resnet18:input=1,3,224,224
    python tools/bench_peers.py --no-latency --timeout 120 --out /tmp/bench

Tools: ours (this repository's onnxslim.optimize, run by the current Python), and the peers pinned
in tools/peers/requirements.txt: OnnxSlim (PyPI's onnxslim.slim), onnxsim (simplify), onnxoptimizer
(optimize, default passes), polygraphy (sanitize --fold-constants) and ort-basic (onnxruntime's
offline optimizer at the basic level). The peers live in their own virtualenv, <cache>/peers-venv,
made on first use, because PyPI's onnxslim has the same import name as ours. The cache is
ONNXSLIM_CACHE if set, else .cache/ at the repository root.

Every tool × model runs in a process of its own (tools/peers/run_peer.py), which times only the
optimization; the bench records that process's peak RSS and, for a crash or a time-out, the last
line of its error. Then, in this Python, every result and the original are measured alike
(tools/peers/measure.py): nodes (If/Loop/Scan bodies included), file size, onnx.checker full-check
validity, the verdict against the original under onnxruntime (graph optimizations disabled, seeded
inputs at the model's first verification shape), and onnxruntime latency on one thread with graph
optimizations disabled and with ORT_ENABLE_ALL. Ratios are ours/peer: below 1 means ours is smaller
or faster. Results go to <cache>/bench/<tool>/<model>.onnx; the table to <out>/peers.md and
<out>/peers.json (default <cache>/bench), and to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:  # also when imported as tools.bench_peers
    sys.path.insert(0, str(TOOLS_DIR))

import fetch_models  # noqa: E402 — needs TOOLS_DIR on sys.path
from peers import measure  # noqa: E402

PEERS_DIR = TOOLS_DIR / "peers"
REQUIREMENTS = PEERS_DIR / "requirements.txt"
RUN_PEER = PEERS_DIR / "run_peer.py"
DEFAULT_TIMEOUT = 600.0
TOOL_UNAVAILABLE = 3  # run_peer.py's exit status when the tool cannot be imported


@dataclass(frozen=True)
class Tool:
    key: str  # as --tools and run_peer.py name it
    label: str  # as the tables name it
    is_peer: bool  # runs in the peers virtualenv rather than in the current Python


TOOLS = {tool.key: tool for tool in [
    Tool("ours", "ours", is_peer=False),
    Tool("onnxslim", "OnnxSlim", is_peer=True),
    Tool("onnxsim", "onnxsim", is_peer=True),
    Tool("onnxoptimizer", "onnxoptimizer", is_peer=True),
    Tool("polygraphy", "polygraphy", is_peer=True),
    Tool("ort-basic", "ort-basic", is_peer=True),
]}


@dataclass
class ModelCase:
    name: str
    path: Path
    shapes: dict[str, list[int]]  # input name -> verification shape (for the dynamic inputs)
    source: str


@dataclass
class ChildRun:
    status: str  # "ok", "crashed", "timeout" or "unavailable"
    error: str | None
    peak_rss_mib: float | None
    report: dict = field(default_factory=dict)  # what run_peer.py wrote: version, seconds, notes


class BenchError(Exception):
    """The bench cannot run as asked; the message says what to change."""


# ---- models -------------------------------------------------------------------------------------

def corpus_models(names: list[str] | None) -> list[ModelCase]:
    """The manifest's models (all, or `names` in that order), fetched into the cache."""
    manifest = fetch_models.load_manifest()
    unknown = [name for name in names or [] if name not in manifest]
    if unknown:
        raise BenchError(f"unknown model(s) {', '.join(unknown)}; the corpus has: {', '.join(manifest)}")
    cases = []
    for name in names if names is not None else manifest:
        entry = manifest[name]
        shapes = {input_name: list(shape) for input_name, shape in entry["verify_shapes"][0].items()}
        cases.append(ModelCase(name, fetch_models.fetch(name), shapes, entry["source"]))
    return cases


def model_file(spec: str) -> ModelCase:
    """A model given on the command line as PATH:NAME[:SHAPES].

    SHAPES is `input=1,3,224,224` (several joined by ';'), or just `1,3,224,224` when the model has
    one input. Static inputs need no shape.
    """
    parts = spec.rsplit(":", 2)
    if len(parts) < 2 or not parts[1]:
        raise BenchError(f"--model-file {spec!r}: expected PATH:NAME[:SHAPES]")
    path, name = Path(parts[0]).expanduser(), parts[1]
    if not path.is_file():
        raise BenchError(f"--model-file {spec!r}: no file {path}")
    shapes: dict[str, list[int]] = {}
    for item in filter(None, (parts[2] if len(parts) == 3 else "").split(";")):
        input_name, _, dims = item.rpartition("=")
        try:
            shape = [int(dim) for dim in dims.split(",")]
        except ValueError:
            raise BenchError(f"--model-file {spec!r}: {dims!r} is not a comma-separated shape") from None
        shapes[input_name or _only_input(path, spec)] = shape
    return ModelCase(name, path.resolve(), shapes, f"file {path}")


def _only_input(path: Path, spec: str) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {initializer.name for initializer in graph.initializer}
    inputs = [graph_input.name for graph_input in graph.input if graph_input.name not in initializers]
    if len(inputs) != 1:
        raise BenchError(f"--model-file {spec!r}: the model has inputs {inputs}: name the one each shape is for")
    return inputs[0]


# ---- running the tools --------------------------------------------------------------------------

def peers_python(cache: Path) -> Path:
    """The peers virtualenv's Python: created and filled from requirements.txt on first use, and
    refilled when requirements.txt changes."""
    venv = cache / "peers-venv"
    python = venv / "bin" / "python"
    stamp = venv / "requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == wanted:
        return python
    _progress(f"preparing the peers virtualenv {venv} (once)")
    if not python.exists():
        _run_or_fail([sys.executable, "-m", "venv", str(venv)], "creating the peers virtualenv")
    _run_or_fail([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                  "-r", str(REQUIREMENTS)], "installing the peers")
    stamp.write_text(wanted + "\n")
    return python


def _run_or_fail(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"{what} failed: {_last_line(result.stderr) or f'exit status {result.returncode}'}")


def run_tool(tool: Tool, case: ModelCase, python: Path, output: Path, timeout: float) -> ChildRun:
    """Optimize `case` with `tool` in a process of its own, writing the result to `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in (output, output.with_name(output.name + ".data")):
        stale.unlink(missing_ok=True)  # a crash must not leave an earlier run's result behind
    report_path, log_path = output.with_suffix(".json"), output.with_suffix(".log")
    report_path.unlink(missing_ok=True)
    command = [str(python), str(RUN_PEER), tool.key, str(case.path), str(output), str(report_path)]
    environment = dict(os.environ)
    if tool.is_peer:
        # The peers' `import onnxslim` must find PyPI's, never this repository's package.
        environment.pop("PYTHONPATH", None)
    with open(log_path, "wb") as log:
        status, peak_rss_mib = _wait_watching_memory(command, environment, log, timeout, cwd=output.parent)
    if status == "timeout":
        return ChildRun("timeout", f"no result after {timeout:g} s", peak_rss_mib)
    if status != 0:
        last_line = _last_line(log_path.read_text(errors="replace"))
        kind = "unavailable" if status == TOOL_UNAVAILABLE else "crashed"
        return ChildRun(kind, last_line or _describe_exit(status), peak_rss_mib)
    if not output.is_file():
        return ChildRun("crashed", "finished without writing a model", peak_rss_mib)
    report = json.loads(report_path.read_text())
    # The child's own reading at its end also covers the moments after the last look from here.
    return ChildRun("ok", None, _larger(peak_rss_mib, report.get("peak_rss_mib")), report)


def _wait_watching_memory(command, environment, log, timeout: float, cwd: Path) -> tuple[int | str, float | None]:
    """Run `command`; return its exit status (or "timeout") and the peak RSS seen, in MiB.

    The peak is the kernel's high-water mark of the child's own memory, read while it runs. Not
    ru_maxrss (os.wait4, resource): on Linux a child's ru_maxrss starts at the peak of the process
    that forked it, so here it would report the bench's own memory, which grows with every model.
    """
    process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                               cwd=cwd, start_new_session=True)
    deadline = time.monotonic() + timeout
    peak_mib = None
    try:
        while (status := process.poll()) is None:
            peak_mib = _larger(peak_mib, high_water_mib(process.pid))
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return "timeout", peak_mib
            time.sleep(0.02)
    except BaseException:  # e.g. Ctrl-C: do not leave the child running
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise
    return status, peak_mib


def high_water_mib(pid: int | str) -> float | None:
    """VmHWM of a live process from /proc, in MiB; None where there is no /proc or it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the kernel writes it in kB
    return None


def _larger(first: float | None, second: float | None) -> float | None:
    return max((value for value in (first, second) if value is not None), default=None)


def _describe_exit(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- one run ------------------------------------------------------------------------------------

def bench(cases: list[ModelCase], tools: list[Tool], bench_dir: Path, timeout: float,
          with_latency: bool, python_for_peers: Path | None) -> dict:
    """Run every tool on every model and measure everything; the report as JSON-ready data."""
    report = {
        "environment": _environment(),
        "tools": {tool.key: {"label": tool.label, "version": None} for tool in tools},
        "models": [],
    }
    for case in cases:
        _progress(f"{case.name}: measuring the original")
        try:
            reference, original_session = measure.reference_run(case.path, case.shapes)
        except Exception as error:  # noqa: BLE001 — no reference, no verdicts: report and go on
            report["models"].append({"name": case.name, "source": case.source,
                                     "error": f"the original does not run: {_last_line(str(error))}"})
            continue
        model_report = {
            "name": case.name,
            "source": case.source,
            "shapes": case.shapes,
            "original": measure.measure(case.path, reference, with_latency, original_session),
            "results": {},
        }
        for tool in tools:
            python = python_for_peers if tool.is_peer else Path(sys.executable)
            output = bench_dir / tool.key / f"{case.name}.onnx"
            child = run_tool(tool, case, python, output, timeout)
            result = {
                "status": child.status,
                "error": child.error,
                "seconds": child.report.get("seconds"),
                "peak_rss_mib": None if child.peak_rss_mib is None else round(child.peak_rss_mib, 1),
                "notes": child.report.get("notes"),
            }
            if child.status == "ok":
                report["tools"][tool.key]["version"] = child.report["version"]
                result.update(_measure_result(output, reference, with_latency))
            _progress(f"{case.name}: {tool.label}: {_summary(result)}")
            model_report["results"][tool.key] = result
        _add_ratios(model_report["results"])
        report["models"].append(model_report)
    return report


def _measure_result(output: Path, reference: measure.Reference, with_latency: bool) -> dict:
    try:
        return measure.measure(output, reference, with_latency)
    except Exception as error:  # noqa: BLE001 — e.g. a file onnx cannot parse: a result to report
        return {"nodes": None, "bytes": output.stat().st_size, "valid": False,
                "validity_message": f"cannot load: {_last_line(str(error))}", "latency_ms": {},
                "verdict": "error", "detail": "not measured", "max_abs_diff": None}


def _add_ratios(results: dict[str, dict]) -> None:
    """ours/peer for nodes, seconds and latency, for every peer with a verified result."""
    ours = results.get("ours")
    if not _usable(ours):
        return
    for key, peer in results.items():
        if key == "ours" or not _usable(peer):
            continue
        peer["ours_over_peer"] = {
            "nodes": _ratio(ours["nodes"], peer["nodes"]),
            "seconds": _ratio(ours["seconds"], peer["seconds"]),
            "latency_disabled": _ratio(ours["latency_ms"].get("disabled"), peer["latency_ms"].get("disabled")),
            "latency_all": _ratio(ours["latency_ms"].get("all"), peer["latency_ms"].get("all")),
        }


def _usable(result: dict | None) -> bool:
    return result is not None and result["status"] == "ok" and result.get("verdict") == "ok"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _summary(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result['error']}"
    return (f"{result['nodes']} nodes, {result['seconds']:.2f} s, {result['verdict']}"
            f"{'' if result['valid'] else ', invalid'}")


def _environment() -> dict:
    import onnx
    import onnxruntime

    commit = subprocess.run(["git", "-C", str(TOOLS_DIR), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"repository": commit or None,
            "python": platform.python_version(), "platform": platform.platform(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu_count": os.cpu_count(), "seed": measure.SEED,
            "latency_runs": {"warmup": measure.WARMUP_RUNS, "timed": measure.TIMED_RUNS},
            "tolerances": {str(dtype): {"atol": atol, "rtol": rtol}
                           for dtype, (atol, rtol) in measure.TOLERANCES.items()}}


# ---- the Markdown report ------------------------------------------------------------------------

def markdown(report: dict) -> str:
    tools = report["tools"]
    versions = ", ".join(f"{info['label']} {info['version'] or '(did not run)'}" for info in tools.values())
    environment = report["environment"]
    lines = [
        "# onnxslim vs peers",
        "",
        f"{versions}. Measured with onnx {environment['onnx']}, onnxruntime {environment['onnxruntime']}, "
        f"Python {environment['python']}, {environment['cpu_count']} CPUs.",
        "Nodes include If/Loop/Scan bodies. Seconds: the optimization alone, in its own process "
        "(ort-basic: session set-up, which includes writing the model). Latency: onnxruntime median, "
        "one thread, graph optimizations disabled / ORT_ENABLE_ALL. ours/peer below 1: ours is smaller "
        "or faster. Peak RSS: the tool's whole process (Python, imports, the model). ✗ marks a result "
        "that does not reproduce the original's outputs, (invalid) one that onnx.checker rejects.",
        "",
        "## Nodes after optimization",
        "",
        "| model | original | " + " | ".join(info["label"] for info in tools.values()) + " |",
        "|---|" + "---:|" * (len(tools) + 1),
    ]
    for model in report["models"]:
        if "error" in model:
            continue
        cells = [_nodes_cell(model["original"])]
        cells += [_nodes_cell(model["results"][key]) for key in tools]
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Details",
        "",
        "| model | tool | nodes | ours/peer | seconds | ours/peer | peak RSS MiB | KiB | valid | verdict "
        "| max abs diff | latency ms | ours/peer latency |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    notes = []
    for model in report["models"]:
        if "error" in model:
            notes.append(f"- {model['name']}: {model['error']}")
            continue
        lines.append(_detail_row(model["name"], "original", model["original"]))
        for key, result in model["results"].items():
            lines.append(_detail_row(model["name"], tools[key]["label"], result))
            notes += _notes(model["name"], tools[key]["label"], result)
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _nodes_cell(result: dict) -> str:
    if result.get("status", "ok") != "ok":
        return result["status"]
    marks = ("" if result.get("verdict") == "ok" else " ✗") + ("" if result["valid"] else " (invalid)")
    return f"{result['nodes']}{marks}"


def _detail_row(model: str, label: str, result: dict) -> str:
    ratios = result.get("ours_over_peer", {})
    if result.get("status", "ok") != "ok":
        cells = ["", "", "", "", _number(result["peak_rss_mib"], "{:.0f}"), "", "", result["status"], "", "", ""]
    else:
        latency = result["latency_ms"]
        cells = [
            str(result["nodes"]),
            _number(ratios.get("nodes"), "{:.2f}"),
            _number(result.get("seconds"), "{:.3g}"),
            _number(ratios.get("seconds"), "{:.3g}"),
            _number(result.get("peak_rss_mib"), "{:.0f}"),
            f"{result['bytes'] / 1024:.0f}",
            "yes" if result["valid"] else "**no**",
            result["verdict"] if result["verdict"] == "ok" else f"**{result['verdict']}**",
            _number(result.get("max_abs_diff"), "{:.1e}"),
            _pair(latency.get("disabled"), latency.get("all"), "{:.2f}"),
            _pair(ratios.get("latency_disabled"), ratios.get("latency_all"), "{:.2f}"),
        ]
    return f"| {model} | {label} | " + " | ".join(cells) + " |"


def _notes(model: str, label: str, result: dict) -> list[str]:
    notes = []
    if result["status"] != "ok":
        notes.append(f"- {model} / {label}: {result['status']}: {result['error']}")
        return notes
    if not result["valid"]:
        notes.append(f"- {model} / {label}: onnx.checker: {result['validity_message']}")
    if result["verdict"] != "ok":
        notes.append(f"- {model} / {label}: {result['verdict']}: {result['detail']}")
    return notes


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else spec.format(value)


def _pair(first: float | None, second: float | None, spec: str) -> str:
    if first is None and second is None:
        return ""
    return f"{_number(first, spec) or '–'} / {_number(second, spec) or '–'}"


# ---- command line -------------------------------------------------------------------------------

def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure onnxslim against other ONNX optimizers on the same models, in one run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"tools: {', '.join(TOOLS)}. Default output: <cache>/bench/peers.md and peers.json.")
    parser.add_argument("--models", help="comma-separated corpus models (default: all; none with --model-file alone)")
    parser.add_argument("--model-file", action="append", default=[], metavar="PATH:NAME[:SHAPES]",
                        help="an extra model, e.g. net.onnx:net:input=1,3,224,224 (repeatable)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tools (default: all)")
    parser.add_argument("--out", type=Path, help="where peers.md and peers.json go (default: <cache>/bench)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds one tool may take on one model (default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--no-latency", action="store_true", help="skip the onnxruntime latency runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        tools = _selected_tools(args.tools)
        extra = [model_file(spec) for spec in args.model_file]
        names = _split(args.models) if args.models else ([] if extra else None)
        cases = corpus_models(names) + extra
        if len({case.name for case in cases}) != len(cases):
            raise BenchError("two models have the same name: give --model-file another NAME")
        cache = fetch_models.cache_dir()
        python_for_peers = peers_python(cache) if any(tool.is_peer for tool in tools) else None
        bench_dir = cache / "bench"
        report = bench(cases, tools, bench_dir, args.timeout, not args.no_latency, python_for_peers)
    except (BenchError, fetch_models.FetchError, measure.MeasureError) as error:
        print(f"bench_peers: error: {error}", file=sys.stderr)
        return 2
    out = args.out or bench_dir
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (out / "peers.md").write_text(table, encoding="utf-8")
    (out / "peers.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table)
    _progress(f"wrote {out / 'peers.md'} and {out / 'peers.json'}")
    return 0


def _selected_tools(text: str) -> list[Tool]:
    keys = [key.lower() for key in _split(text)]
    unknown = [key for key in keys if key not in TOOLS]
    if unknown:
        raise BenchError(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(TOOLS)}")
    return [TOOLS[key] for key in keys]


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
