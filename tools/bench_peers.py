"""Measure onnxslim against other ONNX optimizers on the same models, in one run.

    python tools/bench_peers.py                                  # every corpus model, every tool
    python tools/bench_peers.py --exports --light-cap-lifted     # also the torch exports; the run
                                                                 # the acceptance figures come from
    python tools/bench_peers.py --models ppocr-det,vit-b16 --tools ours,onnxsim
    python tools/bench_peers.py --exports --ort-variants --no-latency   # everything, ORT-optimized too
    python tools/bench_peers.py --models gpt2-kv-dynamo,gpt2-kv-dynamo-ort-all
    python tools/bench_peers.py --model-file net.onnx:net:'input=1,3,224,224|input=2,3,224,224'
    python tools/bench_peers.py --no-latency --timeout 120 --out /tmp/bench
    python tools/bench_peers.py --tools ours,onnxsim,onnxslim --no-latency --time-repeats 5
    python tools/bench_peers.py --render /tmp/bench/peers.json   # peers.md again, nothing run

Models: the corpus of models/corpus.toml (fetched on first use), with --exports the exports of
models/exports.toml (tools/export_models.py: torch's two exporters and skl2onnx; exported on first
use; those marked skipped are left out), with --ort-variants each selected model also as
onnxruntime's offline optimizer leaves it, NAME-ort-extended and NAME-ort-all (tools/ort_variants.py;
made on first use), or any of them by name in --models, plus files given with --model-file.

Tools: ours (this repository's onnxslim.optimize, default pipeline, run by the current Python), and
the peers pinned in tools/peers/requirements.txt: OnnxSlim (PyPI's onnxslim.slim), onnxsim
(simplify), onnxoptimizer (optimize, default passes), polygraphy (sanitize --fold-constants) and
ort-basic (onnxruntime's offline optimizer at the basic level), each with its defaults. With
--light-cap-lifted also "ours (cap lifted)": ours with fold-constants' size cap lifted, on the
light-* models only (their weights are ConstantOfShape fills, which the default cap keeps unfolded
so the file does not grow). The peers live in their own virtualenv, <cache>/peers-venv, made on
first use, because PyPI's onnxslim has the same import name as ours. The cache is ONNXSLIM_CACHE
if set, else .cache/ at the repository root.

Every tool × model runs in a process of its own (tools/peers/run_peer.py), which times only the
optimize call, in process (the model already loaded, the result not yet saved; verification off,
as the peers run by default); for ours it also records the passes' own time. With --time-repeats N
every tool that succeeded is timed N times in all, fresh processes taking turns, and the median is
reported (the runs are in the JSON as seconds_runs). The bench records
that process's peak RSS and, for a crash or a time-out, the last line of its error. Then, in this
Python, every result and the original are measured alike (tools/peers/measure.py): nodes
(If/Loop/Scan bodies included), file size, onnx.checker full-check validity, whether the inputs'
dynamic dims stay dynamic, the verdict against the original under onnxruntime (graph optimizations
disabled, seeded inputs) at EVERY verification shape of the manifest. Last, onnxruntime latency at
the first shape on one thread, in steady state (a block of back-to-back runs of a fresh session):
with ORT_ENABLE_ALL the original and every result that verifies are timed in 7 epochs, fresh
sessions each, the order rotating, and each peer is compared with ours epoch by epoch (a median
ratio and its 95 % bootstrap interval; ours counts as slower only where the whole interval lies
above 1); with graph optimizations disabled, one epoch. Ratios are ours/peer, from the same run:
below 1 means ours is smaller or faster.

Results go to <out>/<tool>/<model>.onnx; the report to <out>/peers.md (a summary first) and
<out>/peers.json, and to stdout. <out> is --out, default <cache>/bench.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:  # also when imported as tools.bench_peers
    sys.path.insert(0, str(TOOLS_DIR))

import export_models  # noqa: E402 — needs TOOLS_DIR on sys.path
import fetch_models  # noqa: E402
import ort_variants  # noqa: E402
from peers import measure  # noqa: E402

PEERS_DIR = TOOLS_DIR / "peers"
REQUIREMENTS = PEERS_DIR / "requirements.txt"
RUN_PEER = PEERS_DIR / "run_peer.py"
DEFAULT_TIMEOUT = 600.0
TOOL_UNAVAILABLE = 3  # run_peer.py's exit status when the tool cannot be imported
LIGHT_PREFIX = "light-"  # onnx's backend-test models, whose weights are ConstantOfShape fills

# The acceptance targets the summary checks (from the issue that asked for this bench).
SECONDS_RATIO_TARGETS = {"onnxsim": 0.5, "onnxslim": 0.2}  # median ours/peer over the corpus
VIT_MODEL, VIT_PASS_SECONDS_TARGET = "vit-b16", 1.5


@dataclass(frozen=True)
class Tool:
    key: str  # as --tools and run_peer.py name it
    label: str  # as the tables name it
    is_peer: bool  # runs in the peers virtualenv rather than in the current Python
    model_prefix: str = ""  # runs only on the models whose name starts with it

    def applies_to(self, model: str) -> bool:
        return model.startswith(self.model_prefix)


TOOLS = {tool.key: tool for tool in [
    Tool("ours", "ours", is_peer=False),
    Tool("ours-cap-lifted", "ours (cap lifted)", is_peer=False, model_prefix=LIGHT_PREFIX),
    Tool("onnxslim", "OnnxSlim", is_peer=True),
    Tool("onnxsim", "onnxsim", is_peer=True),
    Tool("onnxoptimizer", "onnxoptimizer", is_peer=True),
    Tool("polygraphy", "polygraphy", is_peer=True),
    Tool("ort-basic", "ort-basic", is_peer=True),
]}
DEFAULT_TOOLS = [key for key in TOOLS if key != "ours-cap-lifted"]


@dataclass
class ModelCase:
    name: str
    path: Path
    verify_shapes: list[dict[str, list[int]]]  # per shape: input name -> dims (the dynamic inputs)
    source: str
    group: str  # "corpus", "exports", "ort" or "file": the sets the summary takes medians over


@dataclass
class ChildRun:
    status: str  # "ok", "crashed", "timeout" or "unavailable"
    error: str | None
    peak_rss_mib: float | None
    report: dict = field(default_factory=dict)  # what run_peer.py wrote: version, seconds, notes


class BenchError(Exception):
    """The bench cannot run as asked; the message says what to change."""


# ---- models -------------------------------------------------------------------------------------

def manifest_models(names: list[str]) -> list[ModelCase]:
    """Models of models/corpus.toml and models/exports.toml by name, and their onnxruntime-optimized
    variants (NAME-ort-extended, NAME-ort-all), fetched, exported or made into the cache if they
    are not there yet."""
    corpus = fetch_models.load_manifest()
    exports = export_models.load_manifest()
    known = set(corpus) | set(exports)
    unknown = [name for name in names if name not in known
               and (ort_variants.split(name) is None or ort_variants.split(name)[0] not in known)]
    if unknown:
        raise BenchError(f"unknown model(s) {', '.join(unknown)}; the corpus has: {', '.join(corpus)}; "
                         f"the exports: {', '.join(exports)}; and each as NAME-"
                         f"{' or NAME-'.join(ort_variants.LEVELS)}")
    skipped = [f"{name} ({exports[name]['skipped']})" for name in names
               if name in exports and "skipped" in exports[name]]
    if skipped:
        raise BenchError(f"not exported: {'; '.join(skipped)}")
    cases = []
    for name in names:
        if name in corpus:
            entry = corpus[name]
            path, source, group = fetch_models.fetch(name), entry["source"], "corpus"
        elif name in exports:
            entry = exports[name]
            if not export_models.export_path(name).is_file():
                _progress(f"{name}: exporting it with tools/export_models.py (once)")
            path, source, group = export_models.ensure_exported(name), _export_source(entry), "exports"
        else:
            entry, _ = ort_variants.base_entry(name)
            base, level = ort_variants.split(name)
            if not ort_variants.variant_path(name).is_file():
                _progress(f"{name}: saving {base} as onnxruntime optimizes it (once)")
            path, group = ort_variants.ensure_variant(name), "ort"
            source = f"{base} through onnxruntime's {ort_variants.LEVELS[level]}"
        shapes = [{input_name: list(dims) for input_name, dims in shape.items()} for shape in entry["verify_shapes"]]
        cases.append(ModelCase(name, path, shapes, source, group))
    return cases


def _export_source(entry: dict) -> str:
    exporter = entry.get("exporter", "torchscript")
    if exporter == "skl2onnx":
        return f"skl2onnx=={entry['skl2onnx']} export"
    return f"torch=={entry['torch']} {exporter} export, opset {entry.get('opset', export_models.DEFAULT_OPSET)}"


def model_file(spec: str) -> ModelCase:
    """A model given on the command line as PATH:NAME[:SHAPES].

    SHAPES is `input=1,3,224,224` (several inputs joined by ';'), or just `1,3,224,224` when the
    model has one input; a second verification shape follows a '|'. Static inputs need no shape.
    """
    parts = spec.rsplit(":", 2)
    if len(parts) < 2 or not parts[1]:
        raise BenchError(f"--model-file {spec!r}: expected PATH:NAME[:SHAPES]")
    path, name = Path(parts[0]).expanduser(), parts[1]
    if not path.is_file():
        raise BenchError(f"--model-file {spec!r}: no file {path}")
    verify_shapes = []
    for shape_set in (parts[2] if len(parts) == 3 else "").split("|"):
        shapes: dict[str, list[int]] = {}
        for item in filter(None, shape_set.split(";")):
            input_name, _, dims = item.rpartition("=")
            try:
                shape = [int(dim) for dim in dims.split(",")]
            except ValueError:
                raise BenchError(f"--model-file {spec!r}: {dims!r} is not a comma-separated shape") from None
            shapes[input_name or _only_input(path, spec)] = shape
        verify_shapes.append(shapes)
    return ModelCase(name, path.resolve(), verify_shapes, f"file {path}", "file")


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
          with_latency: bool, python_for_peers: Path | None, time_repeats: int = 1) -> dict:
    """Run every tool on every model and measure everything; the report as JSON-ready data."""
    started = time.monotonic()
    report = {
        "environment": _environment(),
        "tools": {tool.key: {"label": tool.label, "version": None, "is_peer": tool.is_peer} for tool in tools},
        "summary": {},
        "models": [],
    }
    report["environment"]["time_repeats"] = time_repeats
    for case in cases:
        _progress(f"{case.name}: measuring the original")
        try:
            references, original_session = measure.reference_runs(case.path, case.verify_shapes)
        except Exception as error:  # noqa: BLE001 — no reference, no verdicts: report and go on
            report["models"].append({"name": case.name, "source": case.source, "group": case.group,
                                     "error": f"the original does not run: {_last_line(str(error))}"})
            continue
        original = measure.measure(case.path, references, original_session)
        del original_session  # a large model's weights: free them before the tools run
        model_report = {
            "name": case.name,
            "source": case.source,
            "group": case.group,
            "verify_shapes": case.verify_shapes,
            "dynamic": any(isinstance(dim, str) for dims in original["input_dims"].values() for dim in dims),
            "original": original,
            "results": {},
        }
        for tool in tools:
            if not tool.applies_to(case.name):
                continue
            python = python_for_peers if tool.is_peer else Path(sys.executable)
            output = bench_dir / tool.key / f"{case.name}.onnx"
            child = run_tool(tool, case, python, output, timeout)
            result = {
                "status": child.status,
                "error": child.error,
                "seconds": child.report.get("seconds"),
                "pass_seconds": child.report.get("pass_seconds"),
                "phases": child.report.get("phases"),
                "pipeline": child.report.get("pipeline"),
                "peak_rss_mib": None if child.peak_rss_mib is None else round(child.peak_rss_mib, 1),
                "notes": child.report.get("notes"),
            }
            if child.status == "ok":
                report["tools"][tool.key]["version"] = child.report["version"]
                result.update(_measure_result(output, references))
                result["fixed_dims"] = measure.fixed_dims(original["input_dims"], result["input_dims"])
                result["not_larger"] = result["bytes"] <= original["bytes"]
            _progress(f"{case.name}: {tool.label}: {_progress_line(result)}")
            model_report["results"][tool.key] = result
        if time_repeats > 1:
            _repeat_timings(case, tools, model_report["results"], bench_dir, timeout, python_for_peers, time_repeats)
        if with_latency:
            _progress(f"{case.name}: timing onnxruntime runs (steady state, {measure.EPOCHS} epochs)")
            _time_latency(model_report, case, bench_dir, references[0].feeds)
        _add_ratios(model_report["results"])
        report["models"].append(model_report)
        # A long run stopped part-way keeps what it measured: --render makes a report of it.
        (bench_dir / "peers.partial.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["environment"]["load_average_end"] = _load_average()
    report["environment"]["bench_seconds"] = round(time.monotonic() - started, 1)
    report["summary"] = summarize(report)
    return report


def _repeat_timings(case: ModelCase, tools: list[Tool], results: dict, bench_dir: Path, timeout: float,
                    python_for_peers: Path | None, repeats: int) -> None:
    """Time every tool that succeeded `repeats` times in all, each in a fresh process, the tools
    taking turns, and keep the median: one 0.1 s call on a shared VM moves by 30-80 % from
    run to run, and turns spread the machine's drift over all tools alike."""
    timed = [tool for tool in tools if results.get(tool.key, {}).get("status") == "ok"]
    runs = {tool.key: [results[tool.key]["seconds"]] for tool in timed}
    pass_runs = {tool.key: [results[tool.key]["pass_seconds"]] for tool in timed}
    for round_ in range(1, repeats):
        _progress(f"{case.name}: timing again ({round_ + 1} of {repeats})")
        for tool in timed:
            python = python_for_peers if tool.is_peer else Path(sys.executable)
            scratch = bench_dir / "repeats" / tool.key / f"{case.name}.onnx"
            child = run_tool(tool, case, python, scratch, timeout)
            for stale in (scratch, scratch.with_name(scratch.name + ".data")):
                stale.unlink(missing_ok=True)  # only the time is wanted; the disk is not
            if child.status == "ok":
                runs[tool.key].append(child.report.get("seconds"))
                pass_runs[tool.key].append(child.report.get("pass_seconds"))
    for tool in timed:
        result = results[tool.key]
        result["seconds_runs"] = runs[tool.key]
        result["seconds"] = statistics.median(runs[tool.key])
        if all(value is not None for value in pass_runs[tool.key]):
            result["pass_seconds"] = statistics.median(pass_runs[tool.key])


def _time_latency(model_report: dict, case: ModelCase, bench_dir: Path, feeds: dict) -> None:
    """Latency of the original and of every result that verifies (see measure.epoch_latency):
    ORT_ENABLE_ALL in epochs, ours/peer epoch by epoch; optimizations disabled, one epoch."""
    results = model_report["results"]
    timed = {key: result for key, result in results.items() if result["status"] == "ok" and result["verdict"] == "ok"}
    paths = {"original": case.path, **{key: bench_dir / key / f"{case.name}.onnx" for key in timed}}
    if "ours" in paths:  # the control: ours against a byte-copy of itself shows the timing's own noise
        copy = bench_dir / "ours-copy" / f"{case.name}.onnx"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths["ours"], copy)
        paths["ours-copy"] = copy
    everyone = {"original": model_report["original"], **timed}
    everyone["ours-copy"] = {}
    for result in everyone.values():
        result["latency_ms"] = {}
    for level, epochs in (("disabled", 1), ("all", measure.EPOCHS)):
        times, errors = measure.epoch_latency(paths, feeds, level, epochs)
        for key, runs in times.items():
            everyone[key]["latency_ms"][level] = statistics.median(runs)
        for key, error in errors.items():
            everyone[key]["latency_error"] = f"with {level}: {error}"
        if "ours" not in times:
            continue
        for key in timed:
            if TOOLS[key].is_peer and key in times and epochs > 1:
                timed[key].setdefault("latency_paired", {})[level] = measure.paired_ratio(times["ours"], times[key])
        if "ours-copy" in times and epochs > 1:
            model_report["latency_control"] = measure.paired_ratio(times["ours"], times["ours-copy"])


def _measure_result(output: Path, references: list[measure.Reference]) -> dict:
    try:
        return measure.measure(output, references)
    except Exception as error:  # noqa: BLE001 — e.g. a file onnx cannot parse: a result to report
        return {"nodes": None, "bytes": measure.file_bytes(output), "input_dims": {}, "valid": False,
                "validity_message": f"cannot load: {_last_line(str(error))}", "latency_ms": {},
                "verdicts": [], "verdict": "error", "detail": "not measured", "max_abs_diff": None}


def _add_ratios(results: dict[str, dict]) -> None:
    """ours/peer for every peer with a result: seconds whenever both tools produced a model
    (pass seconds too, for ours' passes alone); nodes and latency only when both results verify."""
    ours = results.get("ours")
    if ours is None or ours["status"] != "ok":
        return
    for key, peer in results.items():
        if not TOOLS[key].is_peer or peer["status"] != "ok":
            continue
        both_verify = ours["verdict"] == "ok" and peer["verdict"] == "ok"
        peer["ours_over_peer"] = {
            "seconds": _ratio(ours["seconds"], peer["seconds"]),
            "pass_seconds": _ratio(ours["pass_seconds"], peer["seconds"]),
            "nodes": _ratio(ours["nodes"], peer["nodes"]) if both_verify else None,
            "latency_disabled": _ratio(ours.get("latency_ms", {}).get("disabled"), peer.get("latency_ms", {}).get("disabled")),
            "latency_all": peer.get("latency_paired", {}).get("all", {}).get("median"),
        }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _progress_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result['error']}"
    verdicts = ", ".join(verdict["verdict"] for verdict in result["verdicts"]) or result["verdict"]
    return (f"{result['nodes']} nodes, {result['seconds']:.2f} s, {verdicts}"
            f"{'' if result['valid'] else ', invalid'}")


def _environment() -> dict:
    import onnx
    import onnxruntime

    def git(*arguments: str) -> str:
        return subprocess.run(["git", "-C", str(TOOLS_DIR), *arguments],
                              capture_output=True, text=True, check=False).stdout.strip()

    # Uncommitted work in the framework and the passes changes what "ours" is: say how much.
    changed = git("status", "--porcelain", "--", "../onnxslim", "../passes").splitlines()
    return {"repository": git("describe", "--always", "--dirty") or None,
            "uncommitted_files_in_onnxslim_and_passes": len(changed),
            "python": platform.python_version(), "platform": platform.platform(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu_count": os.cpu_count(), "load_average_start": _load_average(), "seed": measure.SEED,
            "latency_runs": {"warmup": measure.WARMUP_RUNS, "block_seconds": measure.BLOCK_SECONDS,
                             "block_min_runs": measure.BLOCK_MIN_RUNS, "epochs": measure.EPOCHS},
            "tolerances": {str(dtype): {"atol": atol, "rtol": rtol}
                           for dtype, (atol, rtol) in measure.TOLERANCES.items()}}


def _load_average() -> list[float] | None:
    """1/5/15-minute load: the bench times things, so say how busy the machine was."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except OSError:
        return None


# ---- the summary --------------------------------------------------------------------------------

def summarize(report: dict) -> dict:
    """The figures the acceptance criteria name, from one run's report (JSON-ready)."""
    peers = [key for key in report["tools"] if TOOLS[key].is_peer]
    models = [model for model in report["models"] if "error" not in model]
    return {
        "models": [_model_summary(model, peers) for model in models],
        "tools": {key: _tool_summary(key, models) for key in report["tools"]},
        "seconds_ratios": {peer: _seconds_ratios(models, peer, "ours-cap-lifted" in report["tools"])
                           for peer in SECONDS_RATIO_TARGETS if peer in report["tools"]},
        "vit": _vit_summary(models),
        "models_not_run": {model["name"]: model["error"] for model in report["models"] if "error" in model},
    }


def _seconds_ratios(models: list[dict], peer: str, with_cap_lifted: bool) -> dict:
    ratios = {group: _ratio_statistics(models, peer, group) for group in ("corpus", "all")}
    if with_cap_lifted:
        ratios.update({f"{group}_light_cap_lifted": _ratio_statistics(models, peer, group, light_cap_lifted=True)
                       for group in ("corpus", "all")})
    return ratios


def _model_summary(model: dict, peers: list[str]) -> dict:
    results = model["results"]
    produced = {key: results[key] for key in peers if key in results and results[key]["status"] == "ok"}
    verified = {key: result for key, result in produced.items() if result["verdict"] == "ok"}
    ours, lifted = results.get("ours"), results.get("ours-cap-lifted")
    # A light model's weights are ConstantOfShape fills the default cap keeps as they are (folding
    # them grows the file), so its node count is judged with the cap lifted.
    judged_key = "ours-cap-lifted" if model["name"].startswith(LIGHT_PREFIX) and lifted else "ours"
    judged = results.get(judged_key)
    judged_nodes = judged["nodes"] if _verifies(judged) else None
    summary = {
        "name": model["name"],
        "group": model["group"],
        "dynamic": model["dynamic"],
        "verify_shapes": len(model["verify_shapes"]),
        "original_nodes": model["original"]["nodes"],
        "original_bytes": model["original"]["bytes"],
        "ours": _ours_summary(ours),
        "ours_cap_lifted": _ours_summary(lifted) if lifted else None,
        "judged_by": judged_key,
        "peer_min_all": _minimum(produced),
        "peer_min_verified": _minimum(verified),
        # ours vs each verified peer at ORT_ENABLE_ALL, run by run (None: latency not timed)
        "latency_all": {key: result["latency_paired"]["all"] for key, result in verified.items()
                        if "all" in result.get("latency_paired", {})} if _verifies(ours) else {},
        "latency_control": model.get("latency_control"),
    }
    for which in ("all", "verified"):
        minimum = summary[f"peer_min_{which}"]
        summary[f"nodes_le_min_{which}"] = (None if minimum is None or judged is None else
                                            judged_nodes is not None and judged_nodes <= minimum["nodes"])
    return summary


def _ours_summary(result: dict | None) -> dict | None:
    if result is None:
        return None
    if result["status"] != "ok":
        return {"status": result["status"], "error": result["error"]}
    return {
        "status": "ok",
        "nodes": result["nodes"],
        "bytes": result["bytes"],
        "not_larger": result["not_larger"],
        "valid": result["valid"],
        "verdicts": [verdict["verdict"] for verdict in result["verdicts"]],
        "verified": result["verdict"] == "ok",
        "fixed_dims": result["fixed_dims"],
        "seconds": result["seconds"],
        "pass_seconds": result["pass_seconds"],
    }


def _minimum(results: dict[str, dict]) -> dict | None:
    """The smallest node count among `results`, with every tool that reaches it."""
    counts = {key: result["nodes"] for key, result in results.items() if result["nodes"] is not None}
    if not counts:
        return None
    smallest = min(counts.values())
    return {"nodes": smallest, "tools": [key for key, nodes in counts.items() if nodes == smallest]}


def _verifies(result: dict | None) -> bool:
    return result is not None and result["status"] == "ok" and result["verdict"] == "ok"


def _tool_summary(key: str, models: list[dict]) -> dict:
    """Where one tool failed: not run to the end, not verified (and at which shapes), invalid,
    a dynamic input dim fixed, the file grown."""
    summary = {"models": 0, "not_run": {}, "verification_failures": {}, "invalid": [], "fixed_dims": {},
               "larger_files": []}
    for model in models:
        result = model["results"].get(key)
        if result is None:
            continue
        summary["models"] += 1
        if result["status"] != "ok":
            summary["not_run"][model["name"]] = f"{result['status']}: {result['error']}"
            continue
        if result["verdict"] != "ok":
            failed = [index + 1 for index, verdict in enumerate(result["verdicts"]) if verdict["verdict"] != "ok"]
            summary["verification_failures"][model["name"]] = {
                "shapes_failed": failed, "of": len(model["verify_shapes"]), "detail": result["detail"]}
        if not result["valid"]:
            summary["invalid"].append(model["name"])
        if result["fixed_dims"]:
            summary["fixed_dims"][model["name"]] = result["fixed_dims"]
        if not result["not_larger"]:
            summary["larger_files"].append(model["name"])
    return summary


def _ratio_statistics(models: list[dict], peer: str, group: str, light_cap_lifted: bool = False) -> dict | None:
    """Median of the per-model ours/peer seconds ratios over `group` ("all": every model), where
    both tools produced a result. With `light_cap_lifted`, a light-* model's ratio is that of ours
    with the cap lifted, which folds what the peers fold there (ours' default leaves its weights)."""
    seconds, passes = [], []
    for model in models:
        if group != "all" and model["group"] != group:
            continue
        ours_key = "ours"
        if light_cap_lifted and model["name"].startswith(LIGHT_PREFIX) and "ours-cap-lifted" in model["results"]:
            ours_key = "ours-cap-lifted"
        ours, other = model["results"].get(ours_key), model["results"].get(peer)
        if ours is None or other is None or ours["status"] != "ok" or other["status"] != "ok":
            continue
        seconds.append(_ratio(ours["seconds"], other["seconds"]))
        passes.append(_ratio(ours["pass_seconds"], other["seconds"]))
    seconds = [ratio for ratio in seconds if ratio is not None]
    passes = [ratio for ratio in passes if ratio is not None]
    if not seconds:
        return None
    return {"models": len(seconds), "median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
            "median_pass_seconds": statistics.median(passes) if passes else None}


def _vit_summary(models: list[dict]) -> dict | None:
    for model in models:
        ours = model["results"].get("ours")
        if model["name"] == VIT_MODEL and ours is not None and ours["status"] == "ok":
            return {"model": VIT_MODEL, "pass_seconds": ours["pass_seconds"], "seconds": ours["seconds"],
                    "phases": ours["phases"]}
    return None


# ---- the Markdown report ------------------------------------------------------------------------

def markdown(report: dict) -> str:
    tools = report["tools"]
    versions = ", ".join(f"{info['label']} {info['version'] or '(did not run)'}" for info in tools.values())
    environment = report["environment"]
    lines = [
        "# onnxslim vs peers",
        "",
        f"{versions}. Measured with onnx {environment['onnx']}, onnxruntime {environment['onnxruntime']}, "
        f"Python {environment['python']}, {environment['cpu_count']} CPUs, repository "
        f"{environment['repository']} ({environment['uncommitted_files_in_onnxslim_and_passes']} uncommitted "
        f"files in onnxslim/ and passes/); load average {_load_text(environment.get('load_average_start'))} "
        f"at the start, {_load_text(environment.get('load_average_end'))} at the end; the run took "
        f"{_minutes(environment.get('bench_seconds'))}. Optimize seconds: the median of "
        f"{environment.get('time_repeats', 1)} timed call(s) per tool and model, each in a fresh process, the tools "
        "taking turns.",
        "",
        *_summary_lines(report),
        "## Nodes after optimization",
        "",
        "Nodes include If/Loop/Scan bodies. ✗ marks a result that does not reproduce the original's outputs "
        "at every verification shape, (invalid) one that onnx.checker rejects.",
        "",
        "| model | original | " + " | ".join(info["label"] for info in tools.values()) + " |",
        "|---|" + "---:|" * (len(tools) + 1),
    ]
    for model in report["models"]:
        if "error" in model:
            continue
        cells = [_nodes_cell(model["original"])]
        cells += [_nodes_cell(model["results"][key]) if key in model["results"] else "–" for key in tools]
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    lines += _losses_lines(report)
    lines += [
        "",
        "## Details",
        "",
        "Seconds: the optimize call alone, in process, in the tool's own process (ort-basic: session "
        "set-up, which includes writing the model); pass s: ours' passes alone. Peak RSS: the tool's whole "
        "process (Python, imports, the model). ≤ orig: file bytes not above the original's. dynamic: the "
        "inputs' dynamic dims stay dynamic (– for a static model). Verdict: one per verification shape. "
        "Latency: onnxruntime median ms, one thread, at the first shape, graph optimizations disabled / "
        f"ORT_ENABLE_ALL, steady state ({_latency_rounds(environment)}); ours/peer latency: the median of the "
        "epoch-by-epoch ratios (ORT_ENABLE_ALL only). ours/peer below 1: ours is smaller or faster.",
        "",
        "| model | tool | nodes | ours/peer | seconds | pass s | ours/peer | peak RSS MiB | KiB | ≤ orig "
        "| valid | dynamic | verdict per shape | max abs diff | latency ms | ours/peer latency |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|---:|---:|",
    ]
    notes = []
    for model in report["models"]:
        if "error" in model:
            notes.append(f"- {model['name']}: {model['error']}")
            continue
        lines.append(_detail_row(model, "original", model["original"]))
        for key, result in model["results"].items():
            lines.append(_detail_row(model, tools[key]["label"], result))
            notes += _notes(model["name"], tools[key]["label"], result)
    lines += ["", "## Verification shapes", ""]
    for model in report["models"]:
        if "error" not in model:
            shapes = "; ".join(_shape_text(shape) for shape in model["verify_shapes"])
            lines.append(f"- {model['name']} ({model['source']}): {shapes}")
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _summary_lines(report: dict) -> list[str]:
    summary = report["summary"]
    tools = report["tools"]
    peer_labels = [info["label"] for key, info in tools.items() if info["is_peer"]]
    lines = ["## Summary", ""]
    lines += _acceptance_lines(summary, tools, len(peer_labels))
    lines += [
        "",
        f"### Nodes per model: ours vs the minimum over the peers ({', '.join(peer_labels)})",
        "",
        "Judged: ours, or for a light-* model ours with the cap lifted (when run). ✓: the judged result "
        "verifies and has no more nodes than the peers' minimum, over every peer result (all) or over the "
        "peer results that verify (verified). Ours verified: the verdict per verification shape. "
        "≤ orig: ours' file (default cap) is not larger than the original.",
        "",
        "| model | set | dynamic | original | ours | ours (cap lifted) | peer min (all) | ✓ all "
        "| peer min (verified) | ✓ verified | ours verified | ≤ orig | ours s | pass s |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---|---|---|---:|---:|",
    ]
    for model in summary["models"]:
        ours, lifted = model["ours"], model["ours_cap_lifted"]
        lines.append("| " + " | ".join([
            model["name"], model["group"], "yes" if model["dynamic"] else "no", str(model["original_nodes"]),
            _our_nodes(ours), _our_nodes(lifted) if lifted else "–",
            _minimum_text(model["peer_min_all"], tools), _mark(model["nodes_le_min_all"]),
            _minimum_text(model["peer_min_verified"], tools), _mark(model["nodes_le_min_verified"]),
            _our_verdicts(ours), _mark(ours.get("not_larger")) if ours else "",
            _number(ours.get("seconds") if ours else None, "{:.3g}"),
            _number(ours.get("pass_seconds") if ours else None, "{:.3g}"),
        ]) + " |")
    lines += [
        "",
        "### Failures per tool (verification at every shape, onnx.checker, dynamic inputs)",
        "",
        "| tool | models | not run (crash, time-out) | verification failures | invalid (onnx.checker) "
        "| dynamic dims fixed |",
        "|---|---:|---|---|---|---|",
    ]
    for key, failures in summary["tools"].items():
        verification = {name: f"shape {', '.join(map(str, failure['shapes_failed']))} of {failure['of']}"
                        for name, failure in failures["verification_failures"].items()}
        lines.append("| " + " | ".join([
            tools[key]["label"], str(failures["models"]), _listing(failures["not_run"]), _listing(verification),
            _listing(failures["invalid"]), _listing(failures["fixed_dims"]),
        ]) + " |")
    lines += ["", "The failures' details are in the Notes at the end."]
    lines += [
        "",
        "### Optimize seconds, ours/peer (same run)",
        "",
        "Per model, ours' whole optimize call over the peer's; the median over the models where both "
        "produced a result. Pass-only: ours' passes alone over the peer's whole call. With the default cap "
        "ours folds almost nothing in a light-* model while the peers fold its weights, so the rows "
        "\"light-* by ours (cap lifted)\" take those models' ratios from ours with the cap lifted.",
        "",
        "| peer | models | n | median | min | max | median, pass-only |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for peer, groups in summary["seconds_ratios"].items():
        for group, statistics_ in groups.items():
            if statistics_ is None:
                lines.append(f"| {tools[peer]['label']} | {_group_text(group)} | 0 | | | | |")
                continue
            lines.append(f"| {tools[peer]['label']} | {_group_text(group)} | {statistics_['models']} "
                         f"| {statistics_['median']:.3f} | {statistics_['min']:.3f} | {statistics_['max']:.3f} "
                         f"| {_number(statistics_['median_pass_seconds'], '{:.3f}')} |")
    return lines + ["", *_phase_lines(report), ""]


def _phase_lines(report: dict) -> list[str]:
    """Where ours' optimize call spends its time, in optimize()'s own phases."""
    rows = [(model["name"], model["results"]["ours"]) for model in report["models"]
            if "error" not in model and model["results"].get("ours", {}).get("phases")]
    if not rows:
        return []
    phases = list(rows[0][1]["phases"])
    lines = ["### Ours' optimize call by phase (seconds, as optimize() reports them)", "",
             "| model | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for name, result in rows:
        lines.append(f"| {name} | " + " | ".join(_number(result["phases"].get(phase), "{:.3f}") for phase in phases)
                     + " |")
    return lines


def _losses_lines(report: dict) -> list[str]:
    """Where a peer's verified result has fewer nodes than ours: the op types whose counts differ,
    which usually names the rewrite the peer made (e.g. "Slice +8" for slices it folded)."""
    rows = []
    for model in report["models"]:
        if "error" in model:
            continue
        results = model["results"]
        ours = results.get("ours")
        if not _verifies(ours) or "op_counts" not in ours:
            continue
        verified = {key: result for key, result in results.items()
                    if TOOLS[key].is_peer and _verifies(result) and "op_counts" in result}
        if not verified:
            continue
        best = min(verified, key=lambda key: verified[key]["nodes"])
        peer = verified[best]
        if peer["nodes"] >= ours["nodes"]:
            continue
        ops = sorted(set(ours["op_counts"]) | set(peer["op_counts"]))
        differences = {op: ours["op_counts"].get(op, 0) - peer["op_counts"].get(op, 0) for op in ops}
        changed = sorted(((op, delta) for op, delta in differences.items() if delta),
                         key=lambda item: (-item[1], item[0]))
        rows.append(f"| {model['name']} | {ours['nodes']} | {report['tools'][best]['label']} | {peer['nodes']} | "
                    + ", ".join(f"{op} {delta:+d}" for op, delta in changed) + " |")
    if not rows:
        return []
    return ["", "## Where a peer leaves fewer nodes", "",
            "Against the verified peer result with the fewest nodes; op-type counts of ours minus the peer's "
            "(bodies included).", "",
            "| model | ours | peer | peer nodes | ours − peer, by op type |", "|---|---:|---|---:|---|", *rows]


def _acceptance_lines(summary: dict, tools: dict, peers: int) -> list[str]:
    """The acceptance criteria, each with its figure from this run and ✓/✗."""
    lines = ["### Acceptance checks", ""]
    models = summary["models"]
    judged = [model for model in models if model["nodes_le_min_all"] is not None]
    for which in ("all", "verified"):
        passed = [model["name"] for model in judged if model[f"nodes_le_min_{which}"]]
        failed = [model["name"] for model in judged if not model[f"nodes_le_min_{which}"]]
        lines.append(f"- {_mark(not failed and bool(judged))} nodes ≤ the minimum over the {peers} peers "
                     f"({which} peer results; light-* models with the cap lifted): {len(passed)}/{len(judged)} "
                     f"models{_failing(failed)}")
    for key in ("ours", "ours-cap-lifted"):
        if key in summary["tools"]:
            failures = summary["tools"][key]
            broken = {**failures["not_run"], **failures["verification_failures"],
                      **{name: "invalid" for name in failures["invalid"]}}
            lines.append(f"- {_mark(not broken)} {tools[key]['label']}: {len(failures['verification_failures'])} "
                         f"verification failures, {len(failures['invalid'])} invalid, {len(failures['not_run'])} "
                         f"not run, over {failures['models']} models{_failing(sorted(broken))}")
    for peer, target in SECONDS_RATIO_TARGETS.items():
        statistics_ = summary["seconds_ratios"].get(peer, {}).get("corpus")
        if statistics_ is None:
            continue
        ratios = summary["seconds_ratios"][peer]
        line = (f"- {_mark(statistics_['median'] <= target)} optimize seconds, median ours/{tools[peer]['label']} "
                f"over the corpus: {statistics_['median']:.3f} (target ≤ {target}; {statistics_['models']} models); "
                f"over all models incl. exports: {ratios['all']['median']:.3f} ({ratios['all']['models']} models)")
        lifted = ratios.get("corpus_light_cap_lifted")
        if lifted is not None:
            line += (f"; with the light-* models by ours (cap lifted): corpus {lifted['median']:.3f}, "
                     f"all {ratios['all_light_cap_lifted']['median']:.3f}")
        lines.append(line)
    vit = summary["vit"]
    if vit is not None:
        lines.append(f"- {_mark(vit['pass_seconds'] <= VIT_PASS_SECONDS_TARGET)} {VIT_MODEL}: ours' passes "
                     f"{vit['pass_seconds']:.2f} s (target ≤ {VIT_PASS_SECONDS_TARGET} s); the whole optimize "
                     f"call {vit['seconds']:.2f} s")
    timed = [model for model in models if model.get("latency_all")]
    if timed:
        slower = [_slower_text(model, tools) for model in timed
                  if any(paired["verdict"] == "slower" for paired in model["latency_all"].values())]
        faster = sum(all(paired["verdict"] == "faster" for paired in model["latency_all"].values()) for model in timed)
        lines.append(f"- {_mark(not slower)} onnxruntime latency (ORT_ENABLE_ALL, one thread) not above any verified "
                     f"peer's (95 % interval of the epoch-by-epoch ratio not wholly above 1 + {measure.TIE_MARGIN:g}): "
                     f"{len(timed) - len(slower)}/{len(timed)} models; faster than every peer on {faster}{_failing(slower)}")
        controls = [model["latency_control"]["median"] for model in timed if model.get("latency_control")]
        if controls:
            lines.append(f"- timing control, ours against a byte-copy of itself: median ratio {min(controls):.3f} to "
                         f"{max(controls):.3f} over {len(controls)} models (what a tie looks like)")
    dynamic = [model for model in models if model["dynamic"] and model["ours"] and model["ours"]["status"] == "ok"]
    if dynamic:
        kept = [model["name"] for model in dynamic if model["ours"]["verified"] and not model["ours"]["fixed_dims"]
                and model["verify_shapes"] >= 2]
        lost = [model["name"] for model in dynamic if model["name"] not in kept]
        lines.append(f"- {_mark(not lost)} dynamic models stay dynamic (no input dim fixed) and ours verifies at "
                     f"two or more shapes: {len(kept)}/{len(dynamic)}{_failing(lost)}")
    light = [model for model in models if model["name"].startswith(LIGHT_PREFIX) and model["ours"]
             and model["ours"]["status"] == "ok"]
    if light:
        grown = [model["name"] for model in light if not model["ours"]["not_larger"]]
        lines.append(f"- {_mark(not grown)} light-* models with the default cap do not grow: "
                     f"{len(light) - len(grown)}/{len(light)}{_failing(grown)}")
    if summary["models_not_run"]:
        lines.append(f"- models whose original does not run (not benched): {', '.join(summary['models_not_run'])}")
    return lines


def _our_nodes(result: dict | None) -> str:
    if result is None:
        return ""
    if result["status"] != "ok":
        return result["status"]
    return f"{result['nodes']}{'' if result['verified'] else ' ✗'}{'' if result['valid'] else ' (invalid)'}"


def _our_verdicts(result: dict | None) -> str:
    if result is None or result["status"] != "ok":
        return ""
    return ", ".join(verdict if verdict == "ok" else f"**{verdict}**" for verdict in result["verdicts"])


def _minimum_text(minimum: dict | None, tools: dict) -> str:
    if minimum is None:
        return "–"
    return f"{minimum['nodes']} ({', '.join(tools[key]['label'] for key in minimum['tools'])})"


def _mark(passed: bool | None) -> str:
    return "" if passed is None else ("✓" if passed else "✗")


def _slower_text(model: dict, tools: dict) -> str:
    """"model (ours/peer 1.043 [1.021, 1.060] vs OnnxSlim, …)": the peers ours is slower than."""
    pairs = [f"{paired['median']:.3f} [{paired['low']:.3f}, {paired['high']:.3f}] vs {tools[key]['label']}"
             for key, paired in model["latency_all"].items() if paired["verdict"] == "slower"]
    return f"{model['name']} (ours/peer {', '.join(pairs)})"


def _failing(names: list[str]) -> str:
    return f"; not: {', '.join(names)}" if names else ""


def _listing(items: dict | list) -> str:
    if isinstance(items, dict):
        return "; ".join(f"{name} ({detail if isinstance(detail, str) else ', '.join(detail)})"
                         for name, detail in items.items()) or "–"
    return ", ".join(items) or "–"


def _latency_rounds(environment: dict) -> str:
    runs = environment["latency_runs"]
    if "epochs" not in runs:  # a report from before latency was timed in epochs
        return f"{runs['timed']} runs each after {runs['warmup']} warm-up runs"
    return (f"per session {runs['warmup']} warm-up runs, then the median of {runs['block_seconds']:g} s of runs, at "
            f"least {runs['block_min_runs']}; ORT_ENABLE_ALL in {runs['epochs']} epochs of fresh sessions, the median")


def _group_text(group: str) -> str:
    return {"corpus": "corpus", "all": "all (incl. exports)",
            "corpus_light_cap_lifted": "corpus, light-* by ours (cap lifted)",
            "all_light_cap_lifted": "all, light-* by ours (cap lifted)"}[group]


def _load_text(load: list[float] | None) -> str:
    return "unknown" if load is None else " / ".join(f"{value:.2f}" for value in load)


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f} min"


def _shape_text(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{name} {dims}" for name, dims in shapes.items()) or "static inputs"


def _nodes_cell(result: dict) -> str:
    if result.get("status", "ok") != "ok":
        return result["status"]
    marks = ("" if result.get("verdict") == "ok" else " ✗") + ("" if result["valid"] else " (invalid)")
    return f"{result['nodes']}{marks}"


def _detail_row(model: dict, label: str, result: dict) -> str:
    ratios = result.get("ours_over_peer", {})
    if result.get("status", "ok") != "ok":
        cells = [""] * 5 + [_number(result["peak_rss_mib"], "{:.0f}")] + [""] * 3 + [result["status"]] + [""] * 4
    else:
        latency = result.get("latency_ms", {})
        verdicts = ", ".join(verdict["verdict"] if verdict["verdict"] == "ok" else f"**{verdict['verdict']}**"
                             for verdict in result["verdicts"]) or f"**{result['verdict']}**"
        dynamic = "–" if not model["dynamic"] else ("**no**" if result.get("fixed_dims") else "yes")
        cells = [
            _number(result["nodes"], "{}"),
            _number(ratios.get("nodes"), "{:.2f}"),
            _number(result.get("seconds"), "{:.3g}"),
            _number(result.get("pass_seconds"), "{:.3g}"),
            _number(ratios.get("seconds"), "{:.3g}"),
            _number(result.get("peak_rss_mib"), "{:.0f}"),
            f"{result['bytes'] / 1024:.0f}",
            {None: "", True: "yes", False: "**no**"}[result.get("not_larger")],
            "yes" if result["valid"] else "**no**",
            dynamic,
            verdicts,
            _number(result.get("max_abs_diff"), "{:.1e}"),
            _pair(latency.get("disabled"), latency.get("all"), "{:.2f}"),
            _pair(ratios.get("latency_disabled"), ratios.get("latency_all"), "{:.2f}"),
        ]
    return f"| {model['name']} | {label} | " + " | ".join(cells) + " |"


def _notes(model: str, label: str, result: dict) -> list[str]:
    notes = []
    if result["status"] != "ok":
        notes.append(f"- {model} / {label}: {result['status']}: {result['error']}")
        return notes
    if not result["valid"]:
        notes.append(f"- {model} / {label}: onnx.checker: {result['validity_message']}")
    if result["verdict"] != "ok":
        notes.append(f"- {model} / {label}: {result['verdict']} {result['detail']}")
    if result.get("fixed_dims"):
        notes.append(f"- {model} / {label}: dynamic input dims made fixed: {', '.join(result['fixed_dims'])}")
    if result.get("latency_error"):
        notes.append(f"- {model} / {label}: latency not measured {result['latency_error']}")
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
        epilog=f"tools: {', '.join(TOOLS)} (default: {', '.join(DEFAULT_TOOLS)}). "
               "Default output: <cache>/bench/peers.md, peers.json and <tool>/<model>.onnx.")
    parser.add_argument("--models", help="comma-separated models of models/corpus.toml or models/exports.toml "
                                         "(default: the whole corpus, unless --model-file is given)")
    parser.add_argument("--exports", action="store_true",
                        help="also every export of models/exports.toml not marked skipped (exported on first use)")
    parser.add_argument("--ort-variants", action="store_true",
                        help="also each selected manifest model as onnxruntime's offline optimizer leaves it, "
                             "NAME-ort-extended and NAME-ort-all (tools/ort_variants.py; made on first use)")
    parser.add_argument("--model-file", action="append", default=[], metavar="PATH:NAME[:SHAPES]",
                        help="an extra model, e.g. net.onnx:net:'input=1,3,224,224|input=2,3,224,224' "
                             "(a second verification shape after '|'; repeatable)")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                        help="comma-separated tools (default: ours and the five peers)")
    parser.add_argument("--light-cap-lifted", action="store_true",
                        help="also run ours with fold-constants' size cap lifted on the light-* models, "
                             "as the tool 'ours (cap lifted)'")
    parser.add_argument("--out", type=Path,
                        help="where peers.md, peers.json and the results go (default: <cache>/bench)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds one tool may take on one model (default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--no-latency", action="store_true", help="skip the onnxruntime latency runs")
    parser.add_argument("--time-repeats", type=int, default=1, metavar="N",
                        help="time each tool's optimize call N times, fresh processes taking turns, and report the "
                             "median (default 1)")
    parser.add_argument("--render", type=Path, metavar="PEERS_JSON",
                        help="run nothing: write peers.md again from an earlier run's peers.json "
                             "(summary recomputed), into --out or beside it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.render is not None:
        return render(args.render, args.out)
    cache = fetch_models.cache_dir()
    out = (args.out or cache / "bench").resolve()
    try:
        tools = _selected_tools(args.tools, args.light_cap_lifted)
        cases = _selected_models(args.models, args.exports, args.model_file, args.ort_variants)
        python_for_peers = peers_python(cache) if any(tool.is_peer for tool in tools) else None
        report = bench(cases, tools, out, args.timeout, not args.no_latency, python_for_peers, args.time_repeats)
    except (BenchError, fetch_models.FetchError, export_models.ExportError, ort_variants.VariantError,
            measure.MeasureError) as error:
        print(f"bench_peers: error: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (out / "peers.md").write_text(table, encoding="utf-8")
    (out / "peers.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table)
    _progress(f"wrote {out / 'peers.md'} and {out / 'peers.json'}")
    return 0


def render(peers_json: Path, out: Path | None) -> int:
    """Write peers.md (and peers.json, its summary recomputed) again from an earlier run's JSON."""
    try:
        report = json.loads(peers_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        print(f"bench_peers: error: cannot read {peers_json}: {error}", file=sys.stderr)
        return 2
    report["summary"] = summarize(report)
    out = out or peers_json.parent
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (out / "peers.md").write_text(table, encoding="utf-8")
    (out / "peers.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table)
    _progress(f"wrote {out / 'peers.md'} and {out / 'peers.json'}")
    return 0


def _selected_models(models: str | None, with_exports: bool, model_files: list[str],
                     with_ort_variants: bool = False) -> list[ModelCase]:
    extra = [model_file(spec) for spec in model_files]
    if models:
        names = _split(models)
    else:
        names = [] if extra else list(fetch_models.load_manifest())
    if with_exports:
        names += [name for name in export_models.exportable(export_models.load_manifest()) if name not in names]
    if with_ort_variants:
        names += [variant for name in list(names) if ort_variants.split(name) is None
                  for variant in ort_variants.variant_names(name) if variant not in names]
    cases = manifest_models(names) + extra
    if len({case.name for case in cases}) != len(cases):
        raise BenchError("two models have the same name: give --model-file another NAME")
    return cases


def _selected_tools(text: str, light_cap_lifted: bool) -> list[Tool]:
    keys = [key.lower() for key in _split(text)]
    if light_cap_lifted and "ours-cap-lifted" not in keys:
        # Beside ours, so the two read side by side.
        keys.insert(keys.index("ours") + 1 if "ours" in keys else 0, "ours-cap-lifted")
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
