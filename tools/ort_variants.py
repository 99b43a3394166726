"""The corpus as onnxruntime's own offline optimizer leaves it: `<name>-ort-extended`, `<name>-ort-all`.

For a model of models/corpus.toml or models/exports.toml, onnxruntime (CPU provider) builds a
session at ORT_ENABLE_EXTENDED or ORT_ENABLE_ALL with SessionOptions.optimized_model_filepath set,
which saves the graph it would run: com.microsoft fused ops (Attention, SkipLayerNormalization,
FusedConv, Gelu, ...), and at the "all" level its CPU layout transforms (the com.microsoft.nchwc
domain). Those files are what users who pre-optimize with onnxruntime bring to a simplifier. They
are made with this repository's own onnxruntime (a dependency; no other environment) into
`<cache>/ort-optimized/<name>-ort-<level>.onnx` and verified at the base model's verify_shapes.

    python tools/ort_variants.py                        # both variants of every corpus model
    python tools/ort_variants.py --exports              # ... and of every export there is
    python tools/ort_variants.py vit-b16-ort-all yolov8n-320-ort-extended --force
    python tools/ort_variants.py --list

A variant older than its base model's file is made again.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:  # also when imported as tools.ort_variants
    sys.path.insert(0, str(TOOLS_DIR))

import export_models  # noqa: E402 — needs TOOLS_DIR on sys.path
import fetch_models  # noqa: E402

# Suffix -> the name of onnxruntime's GraphOptimizationLevel it saves the model at.
LEVELS = {"ort-extended": "ORT_ENABLE_EXTENDED", "ort-all": "ORT_ENABLE_ALL"}


class VariantError(Exception):
    """A variant cannot be made: an unknown name, or onnxruntime failing on the base model."""


def split(name: str) -> tuple[str, str] | None:
    """(base model, level suffix) for a variant's name, e.g. ("vit-b16", "ort-all"); None if `name`
    does not end in a level suffix."""
    for suffix in LEVELS:
        if name.endswith("-" + suffix) and len(name) > len(suffix) + 1:
            return name[: -len(suffix) - 1], suffix
    return None


def variant_names(base: str) -> list[str]:
    return [f"{base}-{suffix}" for suffix in LEVELS]


def variant_path(name: str) -> Path:
    """Where variant `name` is (or will be) written."""
    return fetch_models.cache_dir() / "ort-optimized" / f"{name}.onnx"


def base_entry(name: str) -> tuple[dict, str]:
    """The manifest entry of the variant's base model and its group, "corpus" or "exports"."""
    parts = split(name)
    if parts is None:
        raise VariantError(f"{name!r} is not a variant name: it must end in -{' or -'.join(LEVELS)}")
    base = parts[0]
    corpus = fetch_models.load_manifest()
    if base in corpus:
        return corpus[base], "corpus"
    exports = export_models.load_manifest()
    if base in exports:
        if "skipped" in exports[base]:
            raise VariantError(f"{base} is not exported: {exports[base]['skipped']}")
        return exports[base], "exports"
    raise VariantError(f"no model {base!r} in models/corpus.toml or models/exports.toml (for {name})")


def base_path(name: str) -> Path:
    """The base model's file, fetched or exported first if it is not there yet."""
    base = split(name)[0]
    _, group = base_entry(name)
    return fetch_models.fetch(base) if group == "corpus" else export_models.ensure_exported(base)


def ensure_variant(name: str, force: bool = False) -> Path:
    """Make variant `name` unless it exists and is newer than its base model's file; its path."""
    source = base_path(name)
    target = variant_path(name)
    if not force and target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    make_variant(source, target, LEVELS[split(name)[1]])
    return target


def make_variant(source: Path, target: Path, level: str) -> None:
    """Save `source` as onnxruntime's CPU provider optimizes it at `level` (a GraphOptimizationLevel
    name), atomically."""
    import onnxruntime

    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".onnx")
    os.close(handle)
    partial = Path(partial_name)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(partial)
    options.log_severity_level = 3  # its warning that an NCHWc model is hardware-specific is expected
    try:
        onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        if partial.stat().st_size == 0:
            raise VariantError(f"onnxruntime wrote nothing for {source.name} at {level}")
        partial.chmod(0o644)  # mkstemp creates it private to the user
        os.replace(partial, target)
    except Exception as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, VariantError):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise VariantError(f"onnxruntime {level} on {source.name} failed: {first_line}") from error


def all_variant_names(with_exports: bool) -> list[str]:
    bases = list(fetch_models.load_manifest())
    if with_exports:
        bases += export_models.exportable(export_models.load_manifest())
    return [name for base in bases for name in variant_names(base)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Save the corpus models as onnxruntime's offline optimizer leaves them at "
                    "ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL: <cache>/ort-optimized/NAME-ort-LEVEL.onnx.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="variants (BASE-ort-extended, BASE-ort-all) or base models (both variants)")
    parser.add_argument("--exports", action="store_true", help="also the exports of models/exports.toml")
    parser.add_argument("--force", action="store_true", help="make them again even if they exist")
    parser.add_argument("--list", action="store_true", help="show which variants exist; make none")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        names = [variant for name in args.names
                 for variant in ([name] if split(name) else variant_names(name))] or all_variant_names(args.exports)
        for name in names:
            base_entry(name)
        width = max(map(len, names))
        failures = 0
        for name in names:
            path = variant_path(name)
            if not args.list:
                try:
                    path = ensure_variant(name, args.force)
                except VariantError as error:
                    print(f"ort_variants: error: {error}", file=sys.stderr, flush=True)
                    failures += 1
                    continue
            size = f"{path.stat().st_size / 1024:.1f} KiB" if path.is_file() else "not made"
            nodes = f"  {export_models.count_nodes(path)} nodes" if path.is_file() else ""
            print(f"{name:<{width}}  {path}  {size}{nodes}", flush=True)
    except (VariantError, fetch_models.FetchError, export_models.ExportError) as error:
        if args.debug:
            raise
        print(f"ort_variants: error: {error}", file=sys.stderr)
        return 2
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
