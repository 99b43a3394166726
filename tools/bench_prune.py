"""Measure onnxslim's structured channel pruning against onnxsim's, on the same real images, in one run.

    python tools/bench_prune.py                                   # six models, ratios 0.1,0.25,0.3,0.5
    python tools/bench_prune.py --models ppocr-cls,resnet50 --ratios 0.25
    python tools/bench_prune.py --criteria l2,l1 --peer-variants plain --out /tmp/prune
    python tools/bench_prune.py --render .cache/bench-prune/prune.json    # prune.md again, nothing run

Models and data: those of tools/bench_quant.py (yolov8n-320, ppocr-det, ppocr-rec, ppocr-cls,
resnet50, mobilenetv2) with its preprocessing and its real images: 16 calibrate (and refit), 13
are held out for evaluation, one .npz per image in <out>/data/<model>/{calibration,evaluation}/.
The OCR models get text instead (--ocr-data text, the default): windows of real scanned pages for
ppocr-det (16 and 13), the text lines in them for ppocr-rec and ppocr-cls (128 and 128).

Configurations, at every ratio of --ratios (the share of each prunable group's channels removed):
  ours l2 + refit       onnxslim.optimize(FP32, prune=PruneOptions(ratio=R, criterion="l2",
                        reconstruct=True, check_surgery=True), calibration=CALIBRATION_DIR,
                        verify=False, return_report=True), then saved
  ours l2, no refit     the same with reconstruct=False (and l1 likewise with --criteria l2,l1)
  ours l2 + refit, onnxsim's parameter cut   the first criterion with refit and, instead of the
                        ratio, PruneOptions(parameters=P): P is the most parameters an onnxsim variant
                        removed at that ratio in a model that passes onnx.checker (as a share of
                        ours' count, +0.2 %), at least 20 % on
                        ppocr-cls; run after onnxsim, not run where onnxsim removed nothing
  onnxsim               onnxsim.apply_structured_pruning(model, sparsity=R, importance_norm="l2") on
                        the float32 model as loaded (tools/peers/run_prune_peer.py, peers virtualenv)
  onnxsim + finetune    then onnxsim.apply_pruning_finetune(model, pruned, calibration_data=the same
                        calibration samples); it refits MatMul/Gemm layers only, so on most of these
                        models it changes no weight, which the row says instead of measuring a copy
  onnxsim (simplified first) [+ finetune]   the same after onnxsim.simplify: apply_structured_pruning
                        expects BatchNormalization fused into the Conv already and does not fuse it
                        itself (ppocr-cls keeps 35 of them), while ours simplifies before it prunes
Every configuration runs in a process of its own (ours as `python tools/bench_prune.py --child ...`
in this Python), so memory and crashes stay its own; its seconds are the library call's (the process's
wall time in brackets). A run that fails or times out is a row with its one-line error. Ours runs
from a copy of onnxslim/ and passes/ taken at the start (<out>/onnxslim-snapshot, first on the
children's PYTHONPATH; --live-sources runs the working tree instead), so a sweep measures one
version of the code even while the working tree changes; the report gives both digests.

Measured in this Python, for the float32 model and every result alike: file bytes and parameters
(initializer and Constant elements) and their ratios to float32; onnx.checker full-check validity;
whether onnxruntime (CPU, ORT_ENABLE_ALL) runs it with the same input names and output shapes; on
the held-out images against float32's outputs: SQNR of the worst output and of the first one, pooled
over the images (tools/bench_quant.py's fidelity()), cosine, top-1 agreement for the classifiers
(per timestep for ppocr-rec); latency at one intra-op thread, every file of a model open at once and
run in turn round by round (bench_quant's interleaved_latencies_ms), compared with float32 per round
(median of the per-round ratios and its 95 % interval, paired_ratio). For ours also its PruneReport:
channels and parameters removed by the pruning step and the surgery check's verdict; "pruned
params" of either tool count the model handed to the pruner against the pruned one (for ours after
its simplification, for onnxsim after simplify where it ran), so neither gets credit for the other
work of its pipeline.

The acceptance checks at the top of prune.md are computed from the figures at ratio 0.25; one that
is missed also says at which ratios of the sweep it is met. The report goes to <out>/prune.md,
<out>/prune.json and stdout, the SQNR/latency chart to <out>/prune.png (when matplotlib is
importable); result models to <out>/<configuration>/<model>-r<ratio>.onnx, deleted once their
model is measured unless --keep-models. <out> is --out, default <cache>/bench-prune; the cache is
ONNXSLIM_CACHE if set, else .cache/ at the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:  # also when imported as tools.bench_prune
    sys.path.insert(0, str(TOOLS_DIR))

import bench_peers  # noqa: E402 — needs TOOLS_DIR on sys.path
import bench_quant as quant  # noqa: E402
import export_models  # noqa: E402
import fetch_models  # noqa: E402
from peers import measure as peer_measure  # noqa: E402

_split = bench_peers._split  # comma-separated --models / --ratios / --criteria
_progress = bench_peers._progress  # one line to stderr

THIS_SCRIPT = Path(__file__).resolve()
RUN_PRUNE_PEER = TOOLS_DIR / "peers" / "run_prune_peer.py"
DEFAULT_RATIOS = (0.1, 0.25, 0.3, 0.5)
DEFAULT_CRITERIA = ("auto",)  # activation with the calibration data (onnxslim.prune)
PEER_VARIANTS = ("plain", "simplified")
DEFAULT_TIMEOUT = 1800.0
TOOL_UNAVAILABLE = quant.TOOL_UNAVAILABLE  # run_prune_peer.py's exit status when onnxsim cannot be imported
SURGERY_NOT_EXACT = 4  # the --child's exit status when optimize() refused a pruning whose surgery check failed

# The acceptance targets the summary checks, at TARGET_RATIO.
TARGET_RATIO = 0.25
SQNR_TARGETS_DB = {"yolov8n-320": 27.5, "ppocr-det": 20.0}  # ours' worst-output SQNR
PARAMETER_MODEL, PARAMETER_CUT_TARGET, PARAMETER_SQNR_DB = "ppocr-cls", 0.20, 20.0
RECONSTRUCTION_MODELS, RECONSTRUCTION_GAIN_DB = ("yolov8n-320", "ppocr-det", "ppocr-cls"), 3.0
SIZE_CUT_TARGET = 0.20  # every ours file at least this much smaller than float32's


class BenchError(Exception):
    """The bench cannot run as asked; the message says what to change."""


# ---- configurations ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    key: str  # as the output folders and result keys name it
    label: str  # as the tables name it
    tool: str  # "ours" or "onnxsim"
    criterion: str = "l2"
    reconstruct: bool = False  # ours: refit the layers that lost input channels
    simplify: bool = False  # onnxsim: simplify before pruning
    finetune: bool = False  # onnxsim: apply_pruning_finetune after pruning
    # ours: a --prune-params budget instead of the ratio: onnxsim's parameter cut at the same ratio
    # (its valid variant that removed most), at least PARAMETER_CUT_TARGET on PARAMETER_MODEL (matched_share)
    matched: bool = False

    def as_dict(self) -> dict:
        return {"label": self.label, "tool": self.tool, "criterion": self.criterion, "reconstruct": self.reconstruct,
                "simplify": self.simplify, "finetune": self.finetune, "matched": self.matched}


def ours_config(criterion: str, reconstruct: bool) -> Config:
    suffix = ("-refit", " + refit") if reconstruct else ("", ", no refit")
    return Config(f"ours-{criterion}{suffix[0]}", f"ours {criterion}{suffix[1]}", "ours", criterion, reconstruct)


def peer_configs(variant: str) -> tuple[Config, Config]:
    """The pruned model and its finetuned refit, which one peer process makes together."""
    simplify = variant == "simplified"
    key, label = ("onnxsim-simplified", "onnxsim (simplified first)") if simplify else ("onnxsim", "onnxsim")
    return (Config(key, label, "onnxsim", simplify=simplify),
            Config(f"{key}-ft", f"{label} + finetune", "onnxsim", simplify=simplify, finetune=True))


def matched_config(criterion: str) -> Config:
    return Config(f"ours-{criterion}-refit-matched", f"ours {criterion} + refit, onnxsim's parameter cut", "ours",
                  criterion, reconstruct=True, matched=True)


def configurations(criteria: list[str], peer_variants: list[str]) -> list[Config]:
    """Ours (each criterion with and without refit, then the first with onnxsim's parameter cut
    when onnxsim runs), then onnxsim's variants."""
    ours = [ours_config(criterion, reconstruct) for criterion in criteria for reconstruct in (True, False)]
    matched = [matched_config(criteria[0])] if peer_variants else []
    return ours + matched + [config for variant in peer_variants for config in peer_configs(variant)]


def matched_share(model: str, ratio: float, results: dict, configs: list[Config]) -> float | None:
    """The --prune-params share for the matched configuration at `ratio`: the most parameters any
    onnxsim variant removed in a valid model, as a share of what ours' pruning counts (its main run's parameters
    before, plus 0.2 % so that rounding never leaves ours below the peer), and on PARAMETER_MODEL
    at least PARAMETER_CUT_TARGET. None when neither applies (onnxsim removed nothing)."""
    main = main_config(configs)
    ours = (results.get(result_key(main, ratio)) or {}) if main is not None else {}
    before = (ours.get("pruning") or {}).get("parameters_before") if ours.get("status") == "ok" else None
    peer = best_removed(results, [config.key for config in configs if config.tool == "onnxsim" and not config.finetune],
                        ratio)
    share = peer / before + 0.002 if peer and before else 0.0
    if model == PARAMETER_MODEL:
        share = max(share, PARAMETER_CUT_TARGET)
    return min(share, 0.95) if share > 0 else None


def main_config(configs: list[Config]) -> str | None:
    """The configuration the checks judge: ours with refit at the ratio (the first criterion)."""
    return next((config.key for config in configs if config.tool == "ours" and config.reconstruct
                 and not config.matched), None)


def best_removed(results: dict, peer_keys: list[str], ratio: float) -> int | None:
    """The most parameters any of these (onnxsim) configurations' pruning removed at `ratio`, in a
    model that passes onnx.checker: an invalid model is no reduction a user can deploy."""
    found = [results.get(result_key(key, ratio)) or {} for key in peer_keys]
    return max((value for result in found if result.get("valid") and (value := _removed(result)) is not None),
               default=None)


def result_key(config_key: str, ratio: float) -> str:
    return f"{config_key}@{ratio:g}"


# ---- running the pruners -------------------------------------------------------------------------

def ours_command(fp32: Path, calibration: Path, output: Path, report: Path, config: Config, ratio: float,
                 parameters: float | None = None) -> list[str]:
    return [sys.executable, str(THIS_SCRIPT), "--child", str(fp32), str(calibration), str(output), str(report),
            "--ratio", f"{ratio:g}", "--criterion", config.criterion,
            *([] if config.reconstruct else ["--no-reconstruct"]),
            *(["--parameters", f"{parameters:.4f}"] if parameters is not None else [])]


def peer_command(python: Path, fp32: Path, calibration: Path, output: Path, report: Path, simplify: bool,
                 ratio: float) -> list[str]:
    return [str(python), str(RUN_PRUNE_PEER), str(fp32), str(calibration), str(output), str(report),
            "--sparsity", f"{ratio:g}", "--importance-norm", "l2", *(["--simplify"] if simplify else []),
            "--finetune", str(finetuned_path(output))]


def finetuned_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}-ft.onnx")


def run_child(command: list[str], output: Path, timeout: float, peer: bool, snapshot: Path | None = None) -> dict:
    """Run one pruning process to its end or time-out; {"status", "error", "wall_seconds", "report"}."""
    output.parent.mkdir(parents=True, exist_ok=True)
    report_path, log_path = output.with_suffix(".json"), output.with_suffix(".log")
    for stale in (output, output.with_name(output.name + ".data"), report_path, finetuned_path(output)):
        stale.unlink(missing_ok=True)  # a failure must not leave an earlier run's result behind
    environment = dict(os.environ)
    if peer:
        environment.pop("PYTHONPATH", None)  # PyPI's onnxslim in the peers venv has our import name
    elif snapshot is not None:  # ahead of the editable install's finder, which maps the working tree
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snapshot), environment.get("PYTHONPATH")]))
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        status = quant._run_child(command, environment, log, timeout, cwd=output.parent)
    run = {"wall_seconds": time.perf_counter() - started, "error": None,
           "report": json.loads(report_path.read_text()) if report_path.is_file() else {}}
    if status == "timeout":
        return {**run, "status": "timeout", "error": f"no result after {timeout:g} s"}
    if status != 0:
        kinds = {SURGERY_NOT_EXACT: "surgery not exact", TOOL_UNAVAILABLE: "unavailable" if peer else "failed"}
        error = quant._last_line(log_path.read_text(errors="replace")) or quant._describe_exit(status)
        return {**run, "status": kinds.get(status, "failed"), "error": error}
    if not output.is_file():
        return {**run, "status": "failed", "error": "finished without writing a model"}
    return {**run, "status": "ok"}


def ours_result(run: dict) -> dict:
    report = run["report"]
    return {"status": run["status"], "error": run["error"], "seconds": report.get("seconds"),
            "wall_seconds": run["wall_seconds"], "version": report.get("version"), "pruning": report.get("pruning"),
            "phases": report.get("phases") or {}, "options": report.get("options"), "module": report.get("module"),
            "notes": report.get("notes") or []}


def peer_results(run: dict) -> tuple[dict, dict]:
    """The pruned and the finetuned result of one peer process."""
    report = run["report"]
    pruned = {"status": run["status"], "error": run["error"], "seconds": report.get("seconds"),
              "wall_seconds": run["wall_seconds"], "version": report.get("version"), "phases": report.get("phases"),
              "pruning": ({"parameters_before": report["parameters_before"],
                           "parameters_after": report["parameters_after"]} if "parameters_before" in report else None),
              "notes": [report["notes"]] if report.get("notes") else []}
    finetune = report.get("finetune") or {}
    refit = {**pruned, "notes": list(pruned["notes"])}
    if run["status"] != "ok":
        return pruned, refit
    refit["seconds"] = (report.get("seconds") or 0.0) + (finetune.get("seconds") or 0.0)
    refit["phases"] = {**(report.get("phases") or {}), "apply_pruning_finetune": finetune.get("seconds")}
    if finetune.get("status") == "failed":
        refit.update(status="failed", error=f"apply_pruning_finetune: {finetune.get('error')}")
    elif finetune.get("status") == "unchanged":
        refit.update(status="unchanged", error="apply_pruning_finetune changed no weight (it refits MatMul/Gemm "
                                               "layers only): the same model as without it")
    elif finetune.get("status") == "ok":
        refit["notes"].append(f"apply_pruning_finetune changed {len(finetune['changed'])} weights: "
                              + ", ".join(finetune["changed"][:5]) + (", ..." if len(finetune["changed"]) > 5 else ""))
    else:
        refit.update(status="failed", error="apply_pruning_finetune did not report")
    return pruned, refit


def snapshot_sources(out: Path) -> Path:
    """A copy of this repository's package (passes/ as onnxslim/passes, as pyproject.toml maps it)
    that every ours run imports: others may edit the working tree during an hour-long sweep, and
    the sweep must measure one version of the code."""
    root = out / "onnxslim-snapshot"
    shutil.rmtree(root, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(fetch_models.REPO_ROOT / "onnxslim", root / "onnxslim", ignore=ignore)
    shutil.copytree(fetch_models.REPO_ROOT / "passes", root / "onnxslim" / "passes", ignore=ignore)
    return root


def sources_digest(snapshot: Path | None = None) -> str:
    """sha256 (12 digits) of the package's Python files, of a snapshot or of the working tree;
    equal digests mean the same code."""
    if snapshot is not None:
        files = {str(path.relative_to(snapshot)): path for path in snapshot.glob("onnxslim/**/*.py")}
    else:
        root = fetch_models.REPO_ROOT
        files = {str(path.relative_to(root)): path for path in root.glob("onnxslim/**/*.py")}
        files.update({f"onnxslim/{path.relative_to(root)}": path for path in root.glob("passes/**/*.py")})
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes())
    return digest.hexdigest()[:12]


def peers_python(cache: Path) -> Path:
    """The peers virtualenv's Python (tools/bench_peers.py makes it); this bench never installs into it."""
    python = cache / "peers-venv" / "bin" / "python"
    if not python.exists():
        raise BenchError(f"no peers virtualenv at {python.parent.parent}: make it once with "
                         "`python tools/bench_peers.py --tools onnxsim --models ppocr-cls`, or pass "
                         "--peer-variants none")
    return python


# ---- the --child: ours in a process of its own ---------------------------------------------------

def child_main(argv: list[str]) -> int:
    """Prune one model with this repository's onnxslim and write the result and its report."""
    parser = argparse.ArgumentParser(prog="bench_prune.py --child", description="Prune one model with onnxslim.")
    parser.add_argument("model", type=Path)
    parser.add_argument("calibration", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("--ratio", type=float, required=True)
    parser.add_argument("--criterion", default="auto")
    parser.add_argument("--no-reconstruct", dest="reconstruct", action="store_false")
    parser.add_argument("--parameters", type=float, help="a --prune-params budget instead of the ratio")
    arguments = parser.parse_args(argv)

    import onnxslim
    from onnxslim.errors import VerificationError
    from onnxslim.prune import PruneOptions

    options = PruneOptions(ratio=arguments.ratio, criterion=arguments.criterion, reconstruct=arguments.reconstruct,
                           check_surgery=True, parameters=arguments.parameters)
    version = getattr(onnxslim, "__version__", "dev")
    started = time.perf_counter()
    try:
        optimized, report = onnxslim.optimize(str(arguments.model), prune=options,
                                              calibration=str(arguments.calibration), verify=False,
                                              return_report=True)
    except VerificationError as error:
        pruning = getattr(error.report, "pruning", None)
        if pruning is None or pruning.surgery_exact is not False:
            raise
        arguments.report.write_text(json.dumps({"version": version, "seconds": time.perf_counter() - started,
                                                "options": dataclasses.asdict(options),
                                                "pruning": pruning_summary(pruning)}, default=str))
        print(f"VerificationError: {error}", file=sys.stderr)
        return SURGERY_NOT_EXACT
    seconds = time.perf_counter() - started
    onnxslim.save(optimized, arguments.output)
    arguments.report.write_text(json.dumps({"version": version, "seconds": seconds, "phases": dict(report.seconds),
                                            "options": dataclasses.asdict(options), "module": onnxslim.__file__,
                                            "pruning": pruning_summary(report.pruning), "notes": report.notes},
                                           default=str))
    return 0


def pruning_summary(pruning) -> dict:
    """A PruneReport as JSON, its per-group and per-layer lists reduced to counts."""
    summary = pruning.to_dict()
    groups = summary.pop("groups")
    layers = summary.pop("reconstruction")
    statuses: dict[str, int] = {}
    for layer in layers.values():
        statuses[layer["status"]] = statuses.get(layer["status"], 0) + 1
    return {**summary, "groups": len(groups), "frozen_groups": sum(1 for group in groups if group["frozen"]),
            "reconstruction": {"layers": len(layers), "statuses": statuses}}


# ---- measuring one model file --------------------------------------------------------------------

def parameters(path: Path) -> int:
    """Elements of the initializers and Constant values, counted as onnxslim.prune counts them."""
    graph = onnx.load(str(path), load_external_data=False).graph
    total = sum(math.prod(tensor.dims) for tensor in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            total += sum(math.prod(attribute.t.dims) for attribute in node.attribute if attribute.name == "value")
    return total


def measure(path: Path, model: quant.QuantModel, reference: quant.Reference, input_names: list[str],
            fp32: dict | None = None) -> dict:
    """Size, parameters, validity, whether onnxruntime runs it as float32 is run, and (for a result,
    fp32 given) its fidelity on the held-out samples. Latency comes later, with the model's other files."""
    measured = {"bytes": peer_measure.file_bytes(path), "parameters": parameters(path)}
    if fp32 is not None:
        measured["size_ratio"] = measured["bytes"] / fp32["bytes"]
        measured["parameters_ratio"] = measured["parameters"] / fp32["parameters"] if fp32["parameters"] else None
    measured["validity_message"] = quant._validity(path)
    measured["valid"] = measured["validity_message"] is None
    try:
        session = quant.make_session(path, "all", os.cpu_count() or 1)
    except Exception as error:  # noqa: BLE001 — onnxruntime rejecting the model is a result to report
        measured["measure_error"] = f"onnxruntime cannot load it: {quant._first_line(error)}"
        return measured
    measured["inputs_kept"] = [value.name for value in session.get_inputs()] == input_names
    try:
        outputs = [session.run(reference.output_names, sample) for sample in reference.samples]
    except Exception as error:  # noqa: BLE001 — as above
        measured["measure_error"] = f"onnxruntime run failed: {quant._first_line(error)}"
        return measured
    finally:
        del session
    measured["output_shapes_kept"] = all(expected.shape == actual.shape for expected_outputs, actual_outputs
                                         in zip(reference.outputs, outputs)
                                         for expected, actual in zip(expected_outputs, actual_outputs))
    if fp32 is not None:
        if measured["output_shapes_kept"]:
            measured["fidelity"] = quant.fidelity(model.task, reference, outputs)
        else:
            measured["measure_error"] = "onnxruntime gives outputs of other shapes than float32's"
    return measured


def measure_latencies(entry: dict, paths: dict[str, Path], feed: dict, timed_runs: int) -> None:
    """One-thread latency of float32 and every result onnxruntime ran, interleaved round by round,
    and each result's per-round ratio to float32."""
    results = {"fp32": entry["fp32"], **entry["results"]}
    runnable = {key: path for key, path in paths.items() if not results[key].get("measure_error")}
    if "fp32" not in runnable:
        return
    try:
        rounds = quant.interleaved_latencies_ms(runnable, feed, timed_runs)
    except Exception as error:  # noqa: BLE001 — onnxruntime's own exception types
        for key in runnable:
            results[key]["measure_error"] = f"onnxruntime run failed while timing: {quant._first_line(error)}"
        return
    for key in runnable:
        results[key]["latency_ms"] = {"one_thread": statistics.median(rounds[key]),
                                      "one_thread_rounds": [round(value, 3) for value in rounds[key]]}
        if key != "fp32":
            results[key]["latency_ratio"] = quant.paired_ratio(rounds[key], rounds["fp32"])


# ---- one run -------------------------------------------------------------------------------------

def bench(models: list[quant.QuantModel], ratios: list[float], configs: list[Config], out: Path,
          peers_python_: Path | None, timeout: float, timed_runs: int, keep_models: bool,
          snapshot: Path | None, ocr_data: str = "text") -> dict:
    """Prune every model with every configuration at every ratio and measure everything."""
    started = time.monotonic()
    report = {
        "environment": {**quant.environment(timed_runs), "sources_start": sources_digest(),
                        "sources_ran": sources_digest(snapshot) if snapshot is not None else None},
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "configs": {config.key: config.as_dict() for config in configs},
        "main_config": main_config(configs),
        "versions": {"ours": None, "onnxsim": None},
        "ours_call": "onnxslim.optimize(FP32, prune=PruneOptions(ratio=R, criterion=C, reconstruct=True|False, "
                     "check_surgery=True), calibration=CALIBRATION_DIR, verify=False, return_report=True)",
        "peer_call": "onnxsim.apply_structured_pruning(model, sparsity=R, importance_norm='l2') [after "
                     "onnxsim.simplify(model)]; then onnxsim.apply_pruning_finetune(model, pruned, "
                     "calibration_data=CALIBRATION_SAMPLES)",
        "models": [],
    }
    images = quant.fetch_images(quant.load_image_manifest(), ocr_data)
    report["images"] = quant.image_sets_summary(images)
    for model in models:
        report["models"].append(bench_model(model, ratios, configs, out, images, peers_python_, timeout, timed_runs,
                                            keep_models, report["versions"], snapshot))
        _write_json(report, out)  # a run stopped half-way keeps what it measured
    report["environment"]["load_average_end"] = quant._load_average()
    report["environment"]["sources_end"] = sources_digest()
    report["environment"]["bench_seconds"] = round(time.monotonic() - started, 1)
    report["summary"] = summarize(report)
    return report


def bench_model(model: quant.QuantModel, ratios: list[float], configs: list[Config], out: Path, images: dict,
                peers_python_: Path | None, timeout: float, timed_runs: int, keep_models: bool,
                versions: dict, snapshot: Path | None) -> dict:
    """One model: its samples and float32 baseline, every configuration at every ratio, then latency."""
    entry = {"name": model.name, "task": model.task, "preprocessing": model.preprocessing, "timed_runs": timed_runs}
    try:
        path, directories, reference = quant.prepare(model, images, out / "data")
    except (quant.BenchError, fetch_models.FetchError, export_models.ExportError) as error:
        entry["error"] = str(error)
        _progress(f"{model.name}: not benched: {error}")
        return entry
    path = path.resolve()  # the children run in their output folder
    input_names = quant._input_names(path)
    entry["samples"] = {role: len(list(directory.glob("*.npz"))) for role, directory in directories.items()}
    entry["fp32"] = measure(path, model, reference, input_names)
    entry["results"] = {}
    paths = {"fp32": path}
    _progress(f"{model.name}: float32: {entry['fp32']['bytes'] / 2**20:.1f} MiB, {entry['fp32']['parameters']:,} "
              "parameters")

    def measure_into(key: str, config: Config, ratio: float, result: dict, output: Path) -> None:
        result.update(config=config.key, ratio=ratio)
        if snapshot is not None and result.get("module") and not result["module"].startswith(str(snapshot)):
            result["notes"] = [*result["notes"], f"imported onnxslim from {result['module']}, not the snapshot"]
        if result["status"] == "ok":
            result.update(measure(output, model, reference, input_names, entry["fp32"]))
            paths[key] = output
            versions[config.tool] = result.get("version") or versions[config.tool]
        entry["results"][key] = result
        _progress(f"{model.name}: {config.label} @{ratio:g}: {_progress_line(result)}")

    # The matched configuration needs onnxsim's cut and ours' count of parameters first.
    in_order = sorted(configs, key=lambda config: config.matched)
    for ratio in ratios:
        for config in in_order:
            output = out / config.key / f"{model.name}-r{ratio:g}.onnx"
            if config.tool == "ours":
                share = matched_share(model.name, ratio, entry["results"], configs) if config.matched else None
                if config.matched and share is None:
                    entry["results"][result_key(config.key, ratio)] = {
                        "status": "not run", "error": "onnxsim removed no parameters at this ratio",
                        "config": config.key, "ratio": ratio}
                    continue
                _progress(f"{model.name}: {config.label} @{ratio:g}: pruning"
                          + (f" to {share:.1%} fewer parameters" if share is not None else ""))
                run = run_child(ours_command(path, directories["calibration"], output, output.with_suffix(".json"),
                                             config, ratio, share), output, timeout, peer=False, snapshot=snapshot)
                measure_into(result_key(config.key, ratio), config, ratio, ours_result(run), output)
            elif not config.finetune:  # one peer process makes the pruned and the finetuned model
                _progress(f"{model.name}: {config.label} @{ratio:g}: pruning (and finetuning)")
                run = run_child(peer_command(peers_python_, path, directories["calibration"], output,
                                             output.with_suffix(".json"), config.simplify, ratio),
                                output, timeout, peer=True)
                pruned, refit = peer_results(run)
                measure_into(result_key(config.key, ratio), config, ratio, pruned, output)
                finetuned = next((other for other in configs if other.finetune and other.simplify == config.simplify),
                                 None)
                if finetuned is not None:
                    measure_into(result_key(finetuned.key, ratio), finetuned, ratio, refit, finetuned_path(output))
    _progress(f"{model.name}: timing {len(paths)} files in turn, one thread")
    measure_latencies(entry, paths, reference.samples[0], timed_runs)
    if not keep_models:
        for key, result_path in paths.items():
            if key != "fp32":
                result_path.unlink(missing_ok=True)
                result_path.with_name(result_path.name + ".data").unlink(missing_ok=True)
    return entry


def _progress_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result['error']}"
    parts = [f"{result['bytes'] / 2**20:.2f} MiB ({result['size_ratio']:.3f}x)",
             f"parameters {result['parameters_ratio']:.3f}x" if result.get("parameters_ratio") else ""]
    if result.get("measure_error"):
        parts.append(result["measure_error"])
    if result.get("fidelity"):
        fidelity = result["fidelity"]
        parts.append(f"worst-output SQNR {fidelity['sqnr_db_worst_output']:.1f} dB, cosine {fidelity['cosine']:.4f}")
        if fidelity["top1"] is not None:
            parts.append(f"top-1 {fidelity['top1']:.3f}")
    surgery = (result.get("pruning") or {}).get("surgery_exact")
    if surgery is not None:
        parts.append("surgery exact" if surgery else "surgery NOT exact")
    if not result["valid"]:
        parts.append("invalid")
    parts.append(f"{_number(result.get('seconds'), '{:.1f}')} s")
    return ", ".join(part for part in parts if part)


# ---- the summary ---------------------------------------------------------------------------------

def summarize(report: dict) -> dict:
    """The acceptance checks, each computed from this run's figures: at the target ratio, and where
    one is missed there, at every ratio of the sweep."""
    checks = {}
    ratio_checks = {f"sqnr_{name}": _sqnr_check(name, target) for name, target in SQNR_TARGETS_DB.items()}
    ratio_checks.update(parameters=_parameter_check, removed_vs_peer=_removed_vs_peer_check,
                        reconstruction_gain=_reconstruction_check, size_latency=_size_latency_check)
    target = report.get("target_ratio", TARGET_RATIO)
    for key, check in ratio_checks.items():
        at_target = check(report, target) if target in report["ratios"] else \
            {**check(report, target), "passed": None, "detail": f"ratio {target:g} is not in the sweep"}
        met_at = [ratio for ratio in report["ratios"] if check(report, ratio)["passed"]]
        checks[key] = {**at_target, "met_at": met_at}
    checks["sound"] = _soundness_check(report)
    return {"checks": checks,
            "models_not_run": {model["name"]: model["error"] for model in report["models"] if "error" in model}}


def _models(report: dict) -> dict[str, dict]:
    return {model["name"]: model for model in report["models"] if "error" not in model}


def _get(report: dict, model: str, config_key: str | None, ratio: float) -> dict | None:
    """A measured result (ran, onnxruntime ran it, fidelity known), or None."""
    entry = _models(report).get(model)
    if entry is None or config_key is None:
        return None
    result = entry["results"].get(result_key(config_key, ratio))
    if result is None or result["status"] != "ok" or result.get("measure_error") or "fidelity" not in result:
        return None
    return result


def _worst(result: dict) -> float:
    return result["fidelity"]["sqnr_db_worst_output"]


def _matched_key(report: dict) -> str | None:
    return next((key for key, config in report["configs"].items() if config.get("matched")), None)


def _cut(result: dict) -> float | None:
    """The share of parameters ours' (or the peer's) pruning step removed."""
    pruning = result.get("pruning") or {}
    removed = _removed(result)
    return removed / pruning["parameters_before"] if removed is not None and pruning["parameters_before"] else None


def _peer_keys(report: dict) -> list[str]:
    return [key for key, config in report["configs"].items() if config["tool"] == "onnxsim" and not config["finetune"]]


def _sqnr_check(name: str, target_db: float):
    """Met by ours at the ratio itself, or by ours pruned to onnxsim's parameter cut at that ratio
    (the matched configuration), which must then remove at least as many parameters as onnxsim."""
    def check(report: dict, ratio: float) -> dict:
        text = (f"{name}: ours' worst-output SQNR ≥ {target_db:g} dB, at the ratio or with at least onnxsim's "
                f"parameter cut at it")
        if name not in _models(report):
            return {"passed": None, "text": text, "detail": "not benched"}
        strict, matched = _get(report, name, report["main_config"], ratio), _get(report, name, _matched_key(report),
                                                                                ratio)
        peer = best_removed(_models(report)[name]["results"], _peer_keys(report), ratio)
        parts, passed = [], False
        if strict is not None:
            passed = _worst(strict) >= target_db
            parts.append(f"at {ratio:g}: {_worst(strict):.1f} dB, −{_cut(strict):.1%} parameters")
        if matched is not None:
            enough = peer is not None and _removed(matched) >= peer
            passed = passed or (_worst(matched) >= target_db and enough)
            parts.append(f"at onnxsim's cut: {_worst(matched):.1f} dB, −{_cut(matched):.1%} parameters "
                         f"({_removed(matched):,} removed vs onnxsim's {_number(peer, '{:,}') or '–'})")
        if not parts:
            return {"passed": False, "text": text, "detail": "no measured result"}
        return {"passed": passed, "text": text, "detail": "; ".join(parts)}
    return check


def _parameter_check(report: dict, ratio: float) -> dict:
    text = (f"{PARAMETER_MODEL}: ours' pruning removes ≥ {PARAMETER_CUT_TARGET:.0%} of the parameters with a "
            f"worst-output SQNR ≥ {PARAMETER_SQNR_DB:g} dB")
    results = [(label, result) for label, key in (("at the ratio", report["main_config"]),
                                                   ("with a parameter budget", _matched_key(report)))
               if (result := _get(report, PARAMETER_MODEL, key, ratio)) is not None]
    if not results:
        benched = PARAMETER_MODEL in _models(report)
        return {"passed": False if benched else None, "text": text,
                "detail": "no measured result" if benched else "not benched"}
    passed, parts = False, []
    for label, result in results:
        cut = _cut(result) or 0.0
        file_cut = 1 - result["parameters_ratio"] if result.get("parameters_ratio") is not None else None
        passed = passed or (cut >= PARAMETER_CUT_TARGET and _worst(result) >= PARAMETER_SQNR_DB)
        parts.append(f"{label}: −{cut:.1%} by pruning (the file −{_number(file_cut, '{:.1%}')} vs float32), "
                     f"SQNR {_worst(result):.1f} dB")
    return {"passed": passed, "text": text, "detail": "; ".join(parts)}


def _removed_vs_peer_check(report: dict, ratio: float) -> dict:
    """Parameters removed by the pruning step: ours against the peer configuration that removed most."""
    text = "ours' pruning removes ≥ as many parameters as onnxsim's (its best valid variant) on each model"
    peers = _peer_keys(report)
    if not peers:
        return {"passed": None, "text": text, "detail": "onnxsim did not run (--peer-variants none)"}
    values, failing = [], []
    for name, entry in _models(report).items():
        ours = entry["results"].get(result_key(report["main_config"], ratio)) or {}
        removed = _removed(ours)
        best = best_removed(entry["results"], peers, ratio)
        if removed is None or (best is not None and removed < best):
            failing.append(name)
        values.append(f"{name} {_number(removed, '{:,}') or '–'} vs {_number(best, '{:,}') or '–'}")
    return {"passed": not failing and bool(values), "text": text, "failing": failing,
            "detail": "; ".join(values) + (f"; not: {', '.join(failing)}" if failing else "")}


def _removed(result: dict) -> int | None:
    pruning = result.get("pruning") if result.get("status") == "ok" else None
    if not pruning or pruning.get("parameters_before") is None:
        return None
    return pruning["parameters_before"] - pruning["parameters_after"]


def _reconstruction_check(report: dict, ratio: float) -> dict:
    main = report["main_config"]
    without = main[:-len("-refit")] if main and main.endswith("-refit") else None
    text = (f"reconstruction's gain (ours with − without, worst-output SQNR), median over "
            f"{', '.join(RECONSTRUCTION_MODELS)} ≥ {RECONSTRUCTION_GAIN_DB:g} dB")
    gains, missing, not_benched = {}, [], []
    for name in RECONSTRUCTION_MODELS:
        with_, without_ = _get(report, name, main, ratio), _get(report, name, without, ratio)
        if name not in _models(report):
            not_benched.append(name)
        elif with_ is None or without_ is None:
            missing.append(name)
        else:
            gains[name] = _worst(with_) - _worst(without_)
    median = statistics.median(gains.values()) if gains else None
    detail = ", ".join(f"{name} {gain:+.1f} dB" for name, gain in gains.items())
    detail += f"; median {_number(median, '{:+.1f}')} dB" if median is not None else "no model with both"
    if missing:
        detail += f"; no measured result with and without: {', '.join(missing)}"
    if not_benched:
        detail += f"; not benched: {', '.join(not_benched)}"
    passed = median is not None and median >= RECONSTRUCTION_GAIN_DB and not missing
    return {"passed": None if not_benched and passed else passed, "text": text, "detail": detail}


def _size_latency_check(report: dict, ratio: float) -> dict:
    """Every ours configuration on every model: file ≥ 20 % smaller, and faster than float32 at one
    thread (the median of the per-round ratios below 1; its 95 % interval is shown)."""
    text = (f"every ours model ≥ {SIZE_CUT_TARGET:.0%} smaller than float32 and lower latency (1 thread, median "
            "per-round ratio < 1)")
    ours = [key for key, config in report["configs"].items() if config["tool"] == "ours"]
    values, failing = [], []
    for name, entry in _models(report).items():
        for key in ours:
            result = entry["results"].get(result_key(key, ratio))
            if result is None:
                continue
            if result["status"] != "ok" or "size_ratio" not in result:
                failing.append(f"{name} {key} ({result['status']})")
                continue
            latency = result.get("latency_ratio")
            small = result["size_ratio"] <= 1 - SIZE_CUT_TARGET
            fast = latency is not None and latency["median"] < 1
            if not (small and fast):
                failing.append(f"{name} {key}")
            if key == report["main_config"]:
                values.append(f"{name} ×{result['size_ratio']:.2f} size, latency{_ratio_text(latency) or ' –'}")
    return {"passed": not failing and bool(values), "text": text, "failing": failing,
            "detail": "; ".join(values) + (f"; not: {', '.join(failing)}" if failing else "")}


def _soundness_check(report: dict) -> dict:
    """Over every ours result of the sweep: it ran, onnx.checker accepts it, onnxruntime runs it with
    float32's inputs and output shapes, and the surgery check found the cut exact."""
    failing = {}
    for name, entry in _models(report).items():
        for key, result in entry["results"].items():
            if report["configs"][result["config"]]["tool"] != "ours":
                continue
            surgery = (result.get("pruning") or {}).get("surgery_exact")
            if result["status"] != "ok":
                failing[f"{name} {key}"] = f"{result['status']}: {result['error']}"
            elif not result["valid"]:
                failing[f"{name} {key}"] = f"invalid: {result['validity_message']}"
            elif result.get("measure_error"):
                failing[f"{name} {key}"] = result["measure_error"]
            elif not (result.get("inputs_kept") and result.get("output_shapes_kept")):
                failing[f"{name} {key}"] = "inputs or output shapes changed"
            elif surgery is not True:
                failing[f"{name} {key}"] = f"surgery check: {(result.get('pruning') or {}).get('surgery_check')}"
    results = sum(1 for entry in _models(report).values() for result in entry["results"].values()
                  if report["configs"][result["config"]]["tool"] == "ours")
    return {"passed": not failing and results > 0, "failing": failing,
            "text": "over all ours results of the sweep: 0 failed runs, 0 invalid models (onnx.checker; onnxruntime "
                    "runs it with float32's inputs and output shapes), 0 surgery-exactness failures",
            "detail": f"{results - len(failing)}/{results} sound" + ("; " + "; ".join(
                f"{key}: {reason}" for key, reason in failing.items()) if failing else "")}


# ---- the Markdown report -------------------------------------------------------------------------

def markdown(report: dict) -> str:
    environment = report["environment"]
    versions = report["versions"]
    lines = [
        "# Structured channel pruning: onnxslim vs onnxsim",
        "",
        f"ours {versions.get('ours') or '(did not run)'}, onnxsim {versions.get('onnxsim') or '(did not run)'}. "
        f"Measured with onnxruntime {environment['onnxruntime']} (CPUExecutionProvider, ORT_ENABLE_ALL), onnx "
        f"{environment['onnx']}, Python {environment['python']}; CPU {environment['cpu']} "
        f"({environment['cpu_count']} CPUs); repository {environment['repository']} "
        f"({environment['uncommitted_files_in_onnxslim_and_passes']} uncommitted files in onnxslim/ and passes/); "
        f"load average {quant._load_text(environment.get('load_average_start'))} at the start, "
        f"{quant._load_text(environment.get('load_average_end'))} at the end; the run took "
        f"{quant._minutes(environment.get('bench_seconds'))}. Ratios: {', '.join(f'{r:g}' for r in report['ratios'])}.",
        "",
        _sources_text(environment),
        "",
        f"Ours ran as `{report['ours_call']}`{_options_text(report)}; onnxsim as `{report['peer_call']}`.",
        "",
        *_summary_lines(report),
        *_sweep_lines(report),
        "## Results",
        "",
        "×fp32: over the float32 file's. params: initializer and Constant elements in the file. pruned params: "
        "removed by the pruning step alone (the model handed to the pruner against its result) and their share; for "
        "ours also the channels removed of the prunable ones. ORT: onnxruntime runs it / same input names / same "
        "output shapes. SQNR (dB), pooled over the held-out images (Σ ref² / Σ noise²): the worst output (which "
        "one) and the first output with its per-image median (min). Cosine: the first output's, median over the "
        "images. top-1: argmax agreement (ppocr-rec: per timestep). Latency: median of the timed rounds at one "
        "intra-op thread, every file of the model run in turn each round; ×fp32: the median of the per-round "
        "ratios and its 95 % interval. surgery: ours' check that the pruned model equals the original with the "
        "removed channels' weights zeroed. refit: layers refit / layers that lost input channels. seconds: the "
        "pruning call (optimize() for ours: load, simplification, pruning, surgery check, refit), process wall "
        "time in brackets.",
        "",
        "| model | configuration | ratio | MiB | ×fp32 | params | ×fp32 | pruned params | valid | ORT | "
        "SQNR worst out | SQNR first out, per image | cosine | top-1 | latency ms | ×fp32 | surgery | refit | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    notes = []
    for model in report["models"]:
        if "error" in model:
            notes.append(f"- {model['name']}: not benched: {model['error']}")
            continue
        lines.append(_fp32_row(model))
        for result in sorted(model["results"].values(), key=lambda result: (result["ratio"],
                                                                            list(report["configs"]).index(result["config"]))):
            label = report["configs"][result["config"]]["label"]
            lines.append(_result_row(model["name"], label, result))
            notes += _notes(model["name"], f"{label} @{result['ratio']:g}", result)
    lines += ["", "## Data", ""]
    images = report.get("images")
    if images:
        lines += [*quant.image_sets_lines(images), ""]
    for model in report["models"]:
        samples = model.get("samples", {})
        lines.append(f"- {model['name']}: {model['preprocessing']}; {samples.get('calibration', '?')} calibration "
                     f"/ {samples.get('evaluation', '?')} evaluation samples; {model['timed_runs']} timed rounds.")
    if report.get("plot_note"):
        lines += ["", f"Chart: {report['plot_note']}."]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _sources_text(environment: dict) -> str:
    start, end, ran = (environment.get(key) for key in ("sources_start", "sources_end", "sources_ran"))
    if ran:
        text = (f"Ours ran from a copy of onnxslim/ and passes/ taken at the start (sha256 {ran} of its Python "
                "files); the working tree")
        return text + (f" was {end} at the end." if end and end != ran else " was the same at the end.")
    text = f"Ours ran from the working tree: onnxslim/ and passes/ sha256 {start or '?'}"
    if end and end != start:
        return text + f" at the start, **{end} at the end: they changed during the run**, so ours' rows may " \
                      "come from different code."
    return text + " (unchanged during the run)." if end else text + "."


def _options_text(report: dict) -> str:
    """The PruneOptions ours' children ran with, beyond ratio and criterion (their defaults included)."""
    options = next((result["options"] for model in _models(report).values() for result in model["results"].values()
                    if result.get("options") and result["config"] == report["main_config"]), None)
    if not options:
        return ""
    rest = ", ".join(f"{key}={value}" for key, value in options.items() if key not in ("ratio", "criterion"))
    return f" (PruneOptions as run: {rest})"


def _summary_lines(report: dict) -> list[str]:
    summary = report["summary"]
    ratio = report.get("target_ratio", TARGET_RATIO)
    main = report["configs"].get(report["main_config"] or "", {}).get("label", "–")
    lines = [f"## Acceptance checks (ratio {ratio:g}; ours = {main})", ""]
    for key, check in summary["checks"].items():
        line = f"- {_mark(check['passed'])} {check['text']}: {check['detail']}"
        if check["passed"] is False and "met_at" in check:
            met = check["met_at"]
            line += (f" — met at ratio {', '.join(f'{r:g}' for r in met)} of the sweep" if met
                     else " — met at no ratio of the sweep")
        lines.append(line)
    for name, error in summary["models_not_run"].items():
        lines.append(f"- {name} not benched: {error}")
    return lines + [""]


def _sweep_lines(report: dict) -> list[str]:
    """Worst-output SQNR and latency ×fp32 per configuration and ratio: the sweep at a glance."""
    ratios = report["ratios"]
    lines = ["## The sweep at a glance", "",
             "Worst-output SQNR (dB) / latency ×fp32 (1 thread) / parameters ×fp32, per ratio.", "",
             "| model | configuration | " + " | ".join(f"{ratio:g}" for ratio in ratios) + " |",
             "|---|---|" + "---:|" * len(ratios)]
    for model in report["models"]:
        if "error" in model:
            continue
        for key, config in report["configs"].items():
            cells = []
            for ratio in ratios:
                result = model["results"].get(result_key(key, ratio))
                if result is None:
                    cells.append("")
                elif result["status"] != "ok":
                    cells.append(result["status"])
                elif result.get("fidelity") is None:
                    cells.append("not run by onnxruntime")
                else:
                    latency = result.get("latency_ratio")
                    cells.append(f"{_worst(result):.1f} / {_number(latency and latency['median'], '{:.2f}') or '–'}"
                                 f" / {_number(result.get('parameters_ratio'), '{:.2f}')}")
            if any(cells):
                lines.append(f"| {model['name']} | {config['label']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _fp32_row(model: dict) -> str:
    fp32 = model["fp32"]
    latency = _number((fp32.get("latency_ms") or {}).get("one_thread"), "{:.1f}")
    return (f"| {model['name']} | float32 | | {fp32['bytes'] / 2**20:.2f} | 1 | {fp32['parameters']:,} | 1 | | "
            f"{_valid_text(fp32)} | {_ort_text(fp32)} | | | | | {latency} | | | | |")


def _result_row(model: str, label: str, result: dict) -> str:
    ratio = f"{result['ratio']:g}"
    if result["status"] != "ok":
        return f"| {model} | {label} | {ratio} | {result['status']}: {_cell(result['error'])} |" + " |" * 15
    fidelity = result.get("fidelity") or {}
    pruning = result.get("pruning") or {}
    removed = _removed(result)
    pruned = ""
    if removed is not None:
        pruned = f"{removed:,} ({removed / pruning['parameters_before']:.0%})" if pruning["parameters_before"] else "0"
        if pruning.get("prunable_channels") is not None:
            pruned += f"; {pruning['removed_channels']}/{pruning['prunable_channels']} ch"
    refit = ""
    if pruning.get("reconstruction", {}).get("layers"):
        refit = f"{pruning['reconstruction']['statuses'].get('refit', 0)}/{pruning['reconstruction']['layers']}"
    surgery = {True: "exact", False: "**NOT exact**", None: ""}[pruning.get("surgery_exact")]
    cells = [
        f"{result['bytes'] / 2**20:.2f}", f"{result['size_ratio']:.3f}", f"{result['parameters']:,}",
        _number(result.get("parameters_ratio"), "{:.3f}"), pruned, _valid_text(result), _ort_text(result),
        f"{fidelity['sqnr_db_worst_output']:.1f} ({fidelity['worst_output']})" if fidelity else "",
        f"{fidelity['sqnr_db']:.1f}, {fidelity['sqnr_db_median']:.1f} ({fidelity['sqnr_db_min']:.1f})"
        if fidelity else "",
        _number(fidelity.get("cosine"), "{:.4f}"), _number(fidelity.get("top1"), "{:.3f}"),
        _number((result.get("latency_ms") or {}).get("one_thread"), "{:.1f}"),
        _ratio_text(result.get("latency_ratio")).strip(" ()"), surgery, refit,
        f"{_number(result.get('seconds'), '{:.1f}')} ({_number(result.get('wall_seconds'), '{:.0f}')})",
    ]
    return f"| {model} | {label} | {ratio} | " + " | ".join(cells) + " |"


def _notes(model: str, label: str, result: dict) -> list[str]:
    if result["status"] == "unchanged":
        return []  # its row says so
    if result["status"] != "ok":
        return [f"- {model} / {label}: {result['status']}: {result['error']}"]
    notes = [f"- {model} / {label}: {note}" for note in result.get("notes") or []
             if not note.startswith("pruned ")]  # ours' PruneReport summary: the table has its figures
    if not result["valid"]:
        notes.append(f"- {model} / {label}: onnx.checker: {result['validity_message']}")
    if result.get("measure_error"):
        notes.append(f"- {model} / {label}: {result['measure_error']}")
    return notes


def _ratio_text(ratio: dict | None) -> str:
    """" (×0.72, 0.70–0.75)": this file's time over float32's per round, its 95 % interval."""
    if not ratio:
        return ""
    return f" (×{ratio['median']:.3f}, {ratio['low']:.3f}–{ratio['high']:.3f})"


def _ort_text(result: dict) -> str:
    if result.get("measure_error") and "inputs_kept" not in result:
        return "**no**"
    flags = [True, result.get("inputs_kept"), result.get("output_shapes_kept")]
    return "/".join("yes" if flag else ("**no**" if flag is False else "?") for flag in flags)


def _valid_text(result: dict) -> str:
    return "yes" if result["valid"] else "**no**"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


def _mark(passed: bool | None) -> str:
    return {True: "✓", False: "✗", None: "–"}[passed]


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else spec.format(value)


# ---- the chart -----------------------------------------------------------------------------------

def plot(report: dict, path: Path) -> str:
    """Per model, worst-output SQNR against latency ×fp32 for every configuration, each point
    labelled with its ratio; what was written, or why nothing was."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        return "matplotlib is not importable in this Python, so no prune.png"
    models = list(_models(report).values())
    if not models:
        return "no model was measured, so no prune.png"
    columns = min(3, len(models))
    rows = math.ceil(len(models) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(5.5 * columns, 4.5 * rows), squeeze=False)
    for axis, model in zip(axes.flat, models):
        for key, config in report["configs"].items():
            points = sorted((result["ratio"], result["latency_ratio"]["median"], _worst(result))
                            for ratio in report["ratios"]
                            if (result := _get(report, model["name"], key, ratio)) is not None
                            and result.get("latency_ratio"))
            if not points:
                continue
            axis.plot([point[1] for point in points], [point[2] for point in points], marker="o",
                      linestyle="-" if config["tool"] == "ours" else "--", label=config["label"])
            for ratio, latency, sqnr in points:
                axis.annotate(f"{ratio:g}", (latency, sqnr), textcoords="offset points", xytext=(4, 3), fontsize=7)
        axis.axvline(1.0, color="gray", linestyle=":", linewidth=1)
        axis.set_title(model["name"])
        axis.set_xlabel("latency ×fp32 (1 thread)")
        axis.set_ylabel("worst-output SQNR (dB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(models):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return f"{path.name}, worst-output SQNR against latency ×fp32 per model"


# ---- command line --------------------------------------------------------------------------------

def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure onnxslim's structured channel pruning against onnxsim's apply_structured_pruning "
                    "on the same real images, in one run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python tools/bench_prune.py                              # six models, four ratios\n"
               "  python tools/bench_prune.py --models ppocr-cls,resnet50 --ratios 0.25\n"
               "  python tools/bench_prune.py --criteria l2,l1 --peer-variants plain\n"
               "  python tools/bench_prune.py --render .cache/bench-prune/prune.json\n\n"
               f"models: {', '.join(quant.MODELS)}.\n"
               "Output: <out>/prune.md, prune.json, prune.png (with matplotlib), <configuration>/<model>-r<ratio>"
               ".{json,log} and data/<model>/{calibration,evaluation}/NN.npz; <out> defaults to <cache>/bench-prune.")
    parser.add_argument("--models", help=f"comma-separated models (default: all of {', '.join(quant.MODELS)})")
    parser.add_argument("--ratios", default=",".join(f"{ratio:g}" for ratio in DEFAULT_RATIOS),
                        help="comma-separated shares of each group's channels to remove (default: %(default)s)")
    parser.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                        help="comma-separated channel rankings for ours (onnxslim.prune.CRITERIA, e.g. l2, l1); each "
                             "runs with reconstruction on and off (default: %(default)s)")
    parser.add_argument("--peer-variants", default=",".join(PEER_VARIANTS),
                        help="onnxsim on the float32 model as loaded (plain) and/or after onnxsim.simplify "
                             "(simplified), or none (default: %(default)s)")
    parser.add_argument("--ocr-data", choices=quant.OCR_DATA, default="text",
                        help="what the OCR models calibrate and are judged on: the text pages of models/images.toml, "
                             "or the photographs the other models get (tools/bench_quant.py; default: %(default)s)")
    parser.add_argument("--runs", type=int, default=quant.DEFAULT_TIMED_RUNS, metavar="N",
                        help="timed latency rounds per model (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds one pruning run may take (default: %(default)g)")
    parser.add_argument("--out", type=Path, help="where the report, results and samples go (default: "
                                                 "<cache>/bench-prune)")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep the pruned models (by default each model's are deleted once measured)")
    parser.add_argument("--live-sources", action="store_true",
                        help="run ours from the working tree as it is at each run, not from the copy of onnxslim/ "
                             "and passes/ taken at the start (<out>/onnxslim-snapshot)")
    parser.add_argument("--render", type=Path, metavar="PRUNE_JSON",
                        help="run nothing: write prune.md (and the chart) again from an earlier prune.json, checks "
                             "recomputed, into --out or beside it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    args = parse_arguments(argv)
    if args.render is not None:
        return render(args.render, args.out)
    cache = fetch_models.cache_dir()
    out = (args.out or cache / "bench-prune").resolve()
    snapshot = None
    if not args.live_sources:
        snapshot = snapshot_sources(out)
        sys.path.insert(0, str(snapshot))  # this process's own imports of onnxslim (preprocessing) too
    try:
        models = _selected_models(args.models)
        ratios = _selected_ratios(args.ratios)
        criteria = _selected(args.criteria, _ours_criteria(), "criterion")
        variants = [] if args.peer_variants.strip().lower() == "none" else \
            _selected(args.peer_variants, PEER_VARIANTS, "peer variant")
        if args.runs < 6:
            raise BenchError("--runs must be at least 6 (the paired latency ratio needs 6 rounds)")
        python = peers_python(cache) if variants else None
        report = bench(models, ratios, configurations(criteria, variants), out, python, args.timeout, args.runs,
                       args.keep_models, snapshot, args.ocr_data)
    except (BenchError, quant.BenchError, fetch_models.FetchError, export_models.ExportError) as error:
        print(f"bench_prune: error: {error}", file=sys.stderr)
        return 2
    _write_report(report, out)
    return 0


def render(prune_json: Path, out: Path | None) -> int:
    """Write prune.md (and prune.json, its checks recomputed, and the chart) again from an earlier run's JSON."""
    try:
        report = json.loads(prune_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        print(f"bench_prune: error: cannot read {prune_json}: {error}", file=sys.stderr)
        return 2
    report["summary"] = summarize(report)
    _write_report(report, (out or prune_json.parent).resolve())
    return 0


def _write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["plot_note"] = plot(report, out / "prune.png")
    _progress(f"chart: {report['plot_note']}")
    table = markdown(report)
    (out / "prune.md").write_text(table, encoding="utf-8")
    _write_json(report, out)
    print(table)
    _progress(f"wrote {out / 'prune.md'} and {out / 'prune.json'}")


def _write_json(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _selected_models(text: str | None) -> list[quant.QuantModel]:
    names = _split(text) if text else list(quant.MODELS)
    unknown = [name for name in names if name not in quant.MODELS]
    if unknown:
        raise BenchError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(quant.MODELS)}")
    return [quant.MODELS[name] for name in names]


def _selected_ratios(text: str) -> list[float]:
    try:
        ratios = [float(item) for item in _split(text)]
    except ValueError as error:
        raise BenchError(f"--ratios takes comma-separated numbers, not {text!r}") from error
    if not ratios or any(not 0 < ratio < 1 for ratio in ratios):
        raise BenchError(f"--ratios takes shares in (0, 1), not {text!r}")
    return sorted(set(ratios))


def _ours_criteria() -> tuple[str, ...]:
    from onnxslim.prune import CRITERIA

    return tuple(CRITERIA)


def _selected(text: str, known: tuple[str, ...], what: str) -> list[str]:
    items = [item.lower() for item in _split(text)]
    unknown = [item for item in items if item not in known]
    if unknown or not items:
        raise BenchError(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return list(dict.fromkeys(items))


if __name__ == "__main__":
    sys.exit(main())
