"""Check structured pruning's surgery on every corpus model and export: valid, and exact.

    python tools/prune_exactness.py                                  # every model, ratios 0.1,0.3,0.5
    python tools/prune_exactness.py --models bert-base,resnet50 --ratios 0.5

Each model of models/corpus.toml (fetched on first use) and models/exports.toml (exported on first
use) goes through onnxslim's lossless pipeline (onnxslim.optimize, verify=False), then its plan
(onnxslim.prune.analyze, l2 scores) is cut at every ratio: each prunable group loses that share of
its channels (PrunePlan.choose). For every cut:
  valid   onnx.checker.check_model(full_check=True) passes on the pruned model
  exact   the pruned model equals the original with only the removed channels' consumer weights
          zeroed (prune_model's second model): onnxslim.verify.Verifier on 2 random inputs at the
          manifest's first verify shape (float32 tolerance; same input names and output shapes)
and the share of parameters (onnxslim.benchmark.count_parameters) removed. A model without prunable groups is
listed as such. This separates surgery bugs (there must be none) from pruning's accuracy cost,
which tools/bench_prune.py measures on real images.

Writes <out>/exactness.md and <out>/exactness.json (default <cache>/prune-exactness; the cache
is ONNXSLIM_CACHE if set, else .cache/ at the repository root) and prints the table. Exit status
1 if any cut is invalid or not exact, 2 if the bench could not run as asked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx

TOOLS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS_DIR))

import export_models  # noqa: E402
import fetch_models  # noqa: E402

DEFAULT_RATIOS = (0.1, 0.3, 0.5)
SAMPLES = 2


def model_paths(names: list[str] | None) -> dict[str, tuple[Path | None, dict]]:
    """name -> (the float32 file, fetched or exported now; its verify shape)."""
    corpus, exports = fetch_models.load_manifest(), export_models.load_manifest()
    known = list(corpus) + list(exports)
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = {}
    for name in names or known:
        manifest = corpus if name in corpus else exports
        shape = manifest[name]["verify_shapes"][0]
        path = fetch_models.fetch(name) if name in corpus else export_models.ensure_exported(name)
        chosen[name] = (path, shape)
    return chosen


def check_model(path: Path, shape: dict, ratios: list[float]) -> dict:
    import onnxslim
    from onnxslim.benchmark import count_parameters
    from onnxslim.prune import analyze, prune_model
    from onnxslim.verify import Verifier

    started = time.perf_counter()
    model = onnxslim.optimize(str(path), verify=False)
    plan = analyze(model, input_shapes=shape)
    result = {"groups": len(plan.groups), "prunable": sum(group.prunable for group in plan.groups.values()),
              "cuts": {}}
    if not result["prunable"]:
        result["seconds"] = time.perf_counter() - started
        return result
    before = count_parameters(model)
    for ratio in ratios:
        pruned, zeroed = prune_model(model, plan.choose(ratio))
        try:
            onnx.checker.check_model(pruned, full_check=True)
            invalid = None
        except Exception as error:  # onnx raises several types; the first line says which check failed
            invalid = str(error).strip().splitlines()[0][:200]
        check = Verifier(zeroed, shapes=shape, samples=SAMPLES).check(pruned, label="pruned model")
        result["cuts"][str(ratio)] = {"valid": invalid is None, "invalid": invalid, "exact": check.passed,
                                      "message": check.message, "parameters_removed": 1 - count_parameters(pruned) / before}
    result["seconds"] = time.perf_counter() - started
    return result


def markdown(report: dict) -> str:
    ratios = report["ratios"]
    lines = [
        "# Pruning surgery: validity and exactness",
        "",
        f"onnxslim {report['version']}; ratios {', '.join(f'{r:g}' for r in ratios)} (every prunable group loses "
        f"that share); exact = equal to the zeroed original on {SAMPLES} random inputs.",
        "",
        f"**{report['failures']} invalid or inexact cut(s)** over {report['cut_count']} cuts of "
        f"{report['pruned_models']} models with prunable groups.",
        "",
        "| model | groups | prunable | " + " | ".join(f"{r:g}: valid, exact, params removed" for r in ratios)
        + " | seconds |",
        "|---|---|---|" + "---|" * len(ratios) + "---|",
    ]
    for name, result in report["models"].items():
        cells = []
        for ratio in ratios:
            cut = result["cuts"].get(str(ratio))
            if cut is None:
                cells.append("no prunable groups" if not result["prunable"] else "–")
                continue
            valid = "valid" if cut["valid"] else f"INVALID ({cut['invalid']})"
            exact = "exact" if cut["exact"] else f"NOT EXACT ({cut['message']})"
            cells.append(f"{valid}, {exact}, −{cut['parameters_removed']:.0%}".replace("|", "\\|"))
        lines.append(f"| {name} | {result['groups']} | {result['prunable']} | " + " | ".join(cells)
                     + f" | {result['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names (default: every corpus model and export)")
    parser.add_argument("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS))
    parser.add_argument("--out", type=Path, default=fetch_models.cache_dir() / "prune-exactness")
    arguments = parser.parse_args(argv)
    try:
        ratios = [float(value) for value in arguments.ratios.split(",")]
    except ValueError:
        print(f"--ratios takes comma-separated numbers, not {arguments.ratios!r}", file=sys.stderr)
        return 2
    if any(not 0 < ratio < 1 for ratio in ratios):
        print(f"--ratios must lie in (0, 1): {arguments.ratios}", file=sys.stderr)
        return 2
    import onnxslim

    try:
        models = model_paths(arguments.models.split(",") if arguments.models else None)
    except (ValueError, fetch_models.FetchError, export_models.ExportError) as error:
        print(f"cannot get the models: {error}", file=sys.stderr)
        return 2
    report = {"version": onnxslim.__version__, "ratios": ratios, "models": {}}
    for name, (path, shape) in models.items():
        result = check_model(path, shape, ratios)
        report["models"][name] = result
        cuts = ", ".join(f"{ratio}: {'valid' if cut['valid'] else 'INVALID'} {'exact' if cut['exact'] else 'NOT EXACT'}"
                         for ratio, cut in result["cuts"].items()) or "no prunable groups"
        print(f"{name}: {result['prunable']} prunable groups; {cuts} ({result['seconds']:.0f} s)", flush=True)
    cuts = [cut for result in report["models"].values() for cut in result["cuts"].values()]
    report["cut_count"] = len(cuts)
    report["pruned_models"] = sum(bool(result["cuts"]) for result in report["models"].values())
    report["failures"] = sum(not (cut["valid"] and cut["exact"]) for cut in cuts)
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "exactness.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (arguments.out / "exactness.md").write_text(text)
    print(text)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
