"""SHA-256 of what `optimize` writes for every corpus model and export, in four modes: the check
that a restructure changed no output.

    python tools/output_hashes.py --out before.json                  # on the old tree
    python tools/output_hashes.py --out after.json --compare before.json

Modes: lossless (the default pipeline), int8 (full int8 QDQ with calibration: the mode is pinned,
since `mode=auto` decides between full and weights-only on the machine at hand), prune
(`prune=0.25` with calibration) and prune+int8. The calibration data is seeded and made here: a
few samples per model at its first verification shape (tools/peers/measure.py's inputs, float
inputs perturbed per sample), written once to <cache>/output-hashes/data/<model>/. Values only
need to be the same from run to run, not realistic. Each model and mode runs in a process of its
own with a time limit; a refusal or an error is recorded as its one-line message, so a change in
what is refused shows as a difference too. Verification is off: it changes no output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS_DIR))

import bench_peers  # noqa: E402 — needs TOOLS_DIR on sys.path
import export_models  # noqa: E402
import fetch_models  # noqa: E402
from peers import measure  # noqa: E402

MODES = ("lossless", "int8", "prune", "prune+int8")
SAMPLES = 4
PRUNE_RATIO = 0.25


def model_names() -> list[str]:
    """Every corpus model and every export not marked skipped."""
    exports = [name for name, entry in export_models.load_manifest().items() if "skipped" not in entry]
    return list(fetch_models.load_manifest()) + exports


def calibration_dir(case: bench_peers.ModelCase, root: Path) -> Path:
    """Seeded samples at the model's first verification shape, made once."""
    import numpy as np

    folder = root / "data" / case.name
    if len(list(folder.glob("*.npz"))) == SAMPLES:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    base = measure.synthesize_inputs(measure.session(case.path, "disabled"), case.verify_shapes[0] if case.verify_shapes else {})
    rng = np.random.default_rng(measure.SEED)
    for index in range(SAMPLES):
        sample = {name: value + (0.1 * index * rng.standard_normal(value.shape)).astype(value.dtype)
                  if value.dtype.kind == "f" else value for name, value in base.items()}
        np.savez(folder / f"{index:02d}.npz", **sample)
    return folder


def child(path: str, mode: str, calibration: str, shapes: str) -> None:
    """Optimize one model in one mode and print the written file's SHA-256 (or the refusal)."""
    import onnxslim

    verify = onnxslim.VerifyOptions(enabled=False, verify_shapes=json.loads(shapes) or None)
    options: dict = {}
    if "int8" in mode:
        options.update(quantize=onnxslim.QuantizeOptions(mode="full"), calibration=calibration)
    if "prune" in mode:
        options.update(prune=PRUNE_RATIO, calibration=calibration)
    try:
        model = onnxslim.optimize(path, verify=verify, **options)
    except onnxslim.OnnxSlimError as error:
        print(json.dumps({"result": f"{type(error).__name__}: {str(error).splitlines()[0]}"}))
        return
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "model.onnx"
        onnxslim.save(model, output)
        digest = hashlib.sha256()
        for file in sorted(Path(scratch).iterdir()):  # the model and any external data beside it
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    print(json.dumps({"result": digest.hexdigest()}))


def run(names: list[str], modes: list[str], root: Path, timeout: float) -> dict:
    results: dict = {}
    for case in bench_peers.manifest_models(names):
        calibration = calibration_dir(case, root)
        shapes = json.dumps(case.verify_shapes[0] if case.verify_shapes else {})
        results[case.name] = {}
        for mode in modes:
            started = time.monotonic()
            command = [sys.executable, __file__, "--child", str(case.path), mode, str(calibration), shapes]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
                lines = done.stdout.strip().splitlines()
                result = json.loads(lines[-1])["result"] if done.returncode == 0 and lines else \
                    f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"
            except subprocess.TimeoutExpired:
                result = f"timeout after {timeout:g} s"
            results[case.name][mode] = result
            print(f"{case.name:28s} {mode:11s} {result[:64]}  ({time.monotonic() - started:.0f} s)", flush=True)
    return results


def compare(before: dict, after: dict) -> list[str]:
    """What differs for every model and mode of `after` (a run over a subset compares that subset)."""
    differences = []
    for name in sorted(after):
        for mode in sorted(after[name]):
            old, new = before.get(name, {}).get(mode, "not in the earlier run"), after[name][mode]
            if old != new:
                differences.append(f"{name} {mode}: {old} -> {new}")
    return differences


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON of hashes goes")
    parser.add_argument("--models", help="comma-separated models (default: the corpus and every export)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--compare", type=Path, help="an earlier run's JSON: print what differs, exit 1 if anything")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model and mode")
    arguments = parser.parse_args()
    names = arguments.models.split(",") if arguments.models else model_names()
    root = fetch_models.cache_dir() / "output-hashes"
    results = run(names, arguments.modes.split(","), root, arguments.timeout)
    arguments.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {arguments.out}")
    if arguments.compare:
        differences = compare(json.loads(arguments.compare.read_text()), results)
        print("\n".join(differences) or "every output is byte-identical")
        return 1 if differences else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
