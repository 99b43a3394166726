"""Export the PyTorch models of models/exports.toml to ONNX, reproducibly, into the cache.

Five architectures with random weights (seeded, eval mode, no download): torchvision's ResNet-50,
MobileNetV2, EfficientNet-B0 and ViT-B/16, and BERT-base (transformers' BertModel built from its
default BertConfig). Each goes through the legacy TorchScript exporter at opset 17 with constant
folding, the way most deployed PyTorch models were exported, to `<cache>/exports/<name>.onnx`. The
cache is ONNXSLIM_CACHE when set, else `.cache/` at the repository root.

torch and torchvision are a 5.5 GB install, so they live in a virtualenv of their own,
`<cache>/export-venv`, which this script creates the first time with Python 3.11 (the release pip
finds torch==2.14.1 and torchvision==0.29.1 for on this machine's disk) and then re-runs itself in.
The script itself starts under any Python 3.10+ with only the standard library.

As a module::

    from tools.export_models import ensure_exported, export_path
    path = ensure_exported("resnet50")      # exports it (and creates the venv) if needed

As a script::

    python tools/export_models.py               # export all that are missing: name, path, size, nodes
    python tools/export_models.py vit-b16 --force
    python tools/export_models.py --list        # what the manifest holds and what is exported
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    try:
        import tomli as tomllib
    except ModuleNotFoundError:  # checked again, with advice, when the manifest is read
        tomllib = None

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_PATH = REPO_ROOT / "models" / "exports.toml"

# What the export venv holds. The manifest records the same torch/torchvision/transformers versions
# per model; the export checks that the two agree, so a bump has to touch both.
VENV_PYTHON = (3, 11)
VENV_REQUIREMENTS = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers==4.57.6",
    "onnx==1.23.1",
)
OPSET = 17
SEED = 0

_MARKER = "onnxslim-requirements.txt"  # written into the venv once its install has succeeded


class ExportError(Exception):
    """A model could not be exported, or the export environment could not be set up."""


def cache_dir() -> Path:
    """The cache root: ONNXSLIM_CACHE if set, else .cache/ at the repository root."""
    configured = os.environ.get("ONNXSLIM_CACHE")
    return Path(configured).expanduser() if configured else REPO_ROOT / ".cache"


def venv_dir() -> Path:
    return cache_dir() / "export-venv"


def export_path(name: str) -> Path:
    """Where model `name` is (or will be) exported: <cache>/exports/<name>.onnx."""
    _entry(name)
    return cache_dir() / "exports" / f"{name}.onnx"


def ensure_exported(name: str, force: bool = False) -> Path:
    """Export model `name` unless it already is (or `force`); return its path.

    From outside the export venv this creates the venv if needed and runs the export there.
    """
    target = export_path(name)
    if target.is_file() and not force:
        return target
    if _in_export_venv():
        _export(name, _entry(name), target)
        return target
    python = ensure_venv()
    command = [str(python), str(Path(__file__).resolve()), name] + (["--force"] if force else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise ExportError(f"exporting {name} in {venv_dir()} failed: {reason}")
    return target


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, dict[str, Any]]:
    """Model name -> manifest entry, in the order of the manifest file."""
    if tomllib is None:
        raise ExportError("reading the manifest on Python 3.10 needs tomli: pip install tomli")
    try:
        with open(path, "rb") as f:
            models = tomllib.load(f).get("models", {})
    except OSError as e:
        raise ExportError(f"cannot read the export manifest {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ExportError(f"the export manifest {path} is not valid TOML: {e}") from e
    for name, entry in models.items():
        if name not in _RECIPES:
            raise ExportError(f"manifest entry {name!r} has no export recipe in {Path(__file__).name}")
        if not entry.get("verify_shapes") or "torch" not in entry:
            raise ExportError(f"manifest entry {name!r} lacks verify_shapes or torch")
    return models


def _entry(name: str) -> dict[str, Any]:
    models = load_manifest()
    if name not in models:
        raise ExportError(f"no model {name!r} in {MANIFEST_PATH.name}; known: {', '.join(models)}")
    return models[name]


# --- the export venv ------------------------------------------------------------------------------

def _in_export_venv() -> bool:
    return Path(sys.prefix).resolve() == venv_dir().resolve()


def ensure_venv() -> Path:
    """Create <cache>/export-venv with VENV_REQUIREMENTS unless it is there; its python's path."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    wanted = "\n".join(VENV_REQUIREMENTS) + "\n"
    marker = venv / _MARKER
    if marker.is_file() and marker.read_text() == wanted and python.exists():
        return python
    import fcntl  # two processes installing 5.5 GB into one venv at once would corrupt it

    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "export-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == wanted and python.exists():
            return python  # another process finished it while this one waited
        base_python = None if python.exists() else _base_python()
        print(f"export_models: installing torch and torchvision into {venv} "
              "(once; about 5.5 GB and a few minutes)", file=sys.stderr, flush=True)
        if base_python is not None:
            _run_logged("creating the venv", [base_python, "-m", "venv", str(venv)],
                        venv.parent / "export-venv.log")
        # pip installs over a half-finished venv as well, so an interrupted install resumes here.
        _run_logged("pip install " + " ".join(VENV_REQUIREMENTS),
                    [str(python), "-m", "pip", "install", "--disable-pip-version-check", *VENV_REQUIREMENTS],
                    venv / "install.log")
        marker.write_text(wanted)
    return python


def _base_python() -> str:
    """A Python 3.11 to build the venv from: pip finds torch 2.14.1 on this disk for 3.11 only."""
    if sys.version_info[:2] == VENV_PYTHON:
        return sys.executable
    name = "python{}.{}".format(*VENV_PYTHON)
    found = shutil.which(name)
    if found is None:
        raise ExportError(f"the export venv needs {name} (torch 2.14.1 lies on this machine's disk "
                          f"for Python 3.11 only); put {name} on PATH or run this script with it")
    return found


def _run_logged(what: str, command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["no message"]
        error_lines = [line for line in lines if line.startswith("ERROR")]
        raise ExportError(f"{what} failed: {(error_lines or lines)[-1].strip()} (full log: {log})")


# --- the recipes (run inside the venv) ------------------------------------------------------------

@dataclass
class ExportSpec:
    """What torch.onnx.export needs for one model."""

    model: Any
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def _torchvision_recipe(constructor: str) -> Callable[[dict[str, Any]], ExportSpec]:
    def build(entry: dict[str, Any]) -> ExportSpec:
        import torch
        import torchvision

        model = getattr(torchvision.models, constructor)(weights=None)
        shape = entry["verify_shapes"][0]["input"]
        _set_batch_norm_statistics(model, shape)
        _initialize_zero_linear_layers(model)
        image = torch.randn(shape)
        return ExportSpec(model, (image,), ["input"], ["output"],
                          {"input": {0: "batch"}, "output": {0: "batch"}})

    return build


def _set_batch_norm_statistics(model: Any, image_shape: list[int], batches: int = 4) -> None:
    """Give every BatchNorm the running statistics of its own input on seeded noise images.

    Fresh running statistics (mean 0, variance 1) make an eval-mode BatchNorm almost an identity,
    and torchvision's fan-out initialization of depthwise convolutions then shrinks activations
    layer after layer: MobileNetV2's logits come out near 1e-9 and EfficientNet-B0's near 1e-14,
    below any absolute tolerance, so a broken graph would still verify. With the statistics of
    actual activations each BatchNorm renormalizes, as in a trained network, and the BatchNorms
    the exporter folds into Convs carry non-trivial scales and distinct biases.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.eval()  # dropout and stochastic depth off; only the BatchNorms gather statistics
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, *image_shape[1:]))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def _initialize_zero_linear_layers(model: Any) -> None:
    """Give random weights to Linear layers that were initialized to zero.

    torchvision zero-initializes ViT's classification head (a fine-tuning convention), which makes
    every output exactly zero: nothing downstream of the encoder could be verified.
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)


def _bert_base(entry: dict[str, Any]) -> ExportSpec:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    # BertConfig's defaults are bert-base-uncased: vocabulary 30522, 12 layers, hidden size 768,
    # 12 heads, FFN 3072 with GELU. "eager" attention is the MatMul/Softmax form, not SDPA.
    config = transformers.BertConfig(attn_implementation="eager")
    model = transformers.BertModel(config)
    batch, sequence = entry["verify_shapes"][0]["input_ids"]
    input_ids = torch.randint(0, config.vocab_size, (batch, sequence))
    # Padding at the end and a second segment, so that no all-ones mask or all-zeros segment
    # shortcut can be traced into the graph.
    attention_mask = torch.ones(batch, sequence, dtype=torch.int64)
    attention_mask[:, sequence - sequence // 4:] = 0
    token_type_ids = torch.zeros(batch, sequence, dtype=torch.int64)
    token_type_ids[:, sequence // 2:] = 1
    tokens = {0: "batch", 1: "sequence"}
    return ExportSpec(
        model, (input_ids, attention_mask, token_type_ids),
        ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state", "pooler_output"],
        {"input_ids": tokens, "attention_mask": tokens, "token_type_ids": tokens,
         "last_hidden_state": tokens, "pooler_output": {0: "batch"}})


_RECIPES: dict[str, Callable[[dict[str, Any]], ExportSpec]] = {
    "resnet50": _torchvision_recipe("resnet50"),
    "mobilenetv2": _torchvision_recipe("mobilenet_v2"),
    "efficientnet-b0": _torchvision_recipe("efficientnet_b0"),
    "regnet-y-400mf": _torchvision_recipe("regnet_y_400mf"),
    "vit-b16": _torchvision_recipe("vit_b_16"),
    "bert-base": _bert_base,
}


def _export(name: str, entry: dict[str, Any], target: Path) -> None:
    """Build model `name` with seeded random weights and export it to `target` (atomically)."""
    import warnings

    import torch

    _check_versions(name, entry)
    torch.manual_seed(SEED)  # per model, so that one model's weights do not depend on the others
    spec = _RECIPES[name](entry)
    spec.model.eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".onnx")
    os.close(handle)
    partial = Path(partial_name)
    try:
        # Not under torch.no_grad(): without autograd, nn.MultiheadAttention (ViT) takes its fused
        # fast path, aten::_native_multi_head_attention, which has no ONNX export.
        with warnings.catch_warnings():
            # The tracer warns about every Python-level shape check (ViT's image-size assert,
            # BERT's mask arithmetic); the verification shapes are what show the export is sound.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(
                spec.model, spec.args, str(partial), dynamo=False, opset_version=OPSET,
                do_constant_folding=True, input_names=spec.input_names,
                output_names=spec.output_names, dynamic_axes=spec.dynamic_axes)
        partial.chmod(0o644)  # mkstemp creates it private to the user
        os.replace(partial, target)
    except Exception as e:
        partial.unlink(missing_ok=True)
        if isinstance(e, ExportError):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"exporting {name} failed: {type(e).__name__}: {first_line}") from e


def _check_versions(name: str, entry: dict[str, Any]) -> None:
    from importlib.metadata import version

    for package in ("torch", "torchvision", "transformers"):
        if package not in entry:
            continue
        installed = version(package).split("+", 1)[0]  # "2.14.1+cu130" -> "2.14.1"
        if installed != entry[package]:
            raise ExportError(f"{name} is pinned to {package} {entry[package]} in {MANIFEST_PATH.name}, "
                              f"the export venv has {installed}; make VENV_REQUIREMENTS and the "
                              "manifest agree")


# --- counting nodes without onnx ------------------------------------------------------------------

def count_nodes(path: Path) -> int:
    """Nodes of the model at `path`, those of If/Loop/Scan bodies included.

    Reads the protobuf wire format directly, so that `--list` needs neither onnx nor the venv.
    """
    model = memoryview(path.read_bytes())  # slices of a memoryview share its bytes: no copies
    return sum(_graph_nodes(graph) for field, graph in _fields(model) if field == 7)  # ModelProto.graph


def _graph_nodes(graph: memoryview) -> int:
    total = 0
    for field, node in _fields(graph):
        if field != 1:  # GraphProto.node
            continue
        total += 1
        for node_field, attribute in _fields(node):
            if node_field != 5:  # NodeProto.attribute
                continue
            for attribute_field, value in _fields(attribute):
                if attribute_field in (6, 11):  # AttributeProto.g, AttributeProto.graphs
                    total += _graph_nodes(value)
    return total


def _fields(buffer: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(field number, bytes) of each length-delimited field of a message; skips the others."""
    position, end = 0, len(buffer)
    while position < end:
        key, position = _varint(buffer, position)
        wire_type = key & 7
        if wire_type == 0:
            _, position = _varint(buffer, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(buffer, position)
            yield key >> 3, buffer[position:position + length]
            position += length
        else:
            raise ExportError(f"unexpected protobuf wire type {wire_type}: not an ONNX model")


def _varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


# --- command line ---------------------------------------------------------------------------------

def _human_size(size: int) -> str:
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def _describe(name: str, width: int) -> str:
    path = export_path(name)
    if not path.is_file():
        return f"{name:<{width}}  {path}  not exported"
    return f"{name:<{width}}  {path}  {_human_size(path.stat().st_size)}  {count_nodes(path)} nodes"


def _rerun_in_venv(arguments: list[str]) -> int:
    command = [str(ensure_venv()), str(Path(__file__).resolve()), *arguments]
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export the PyTorch models of models/exports.toml to <cache>/exports/NAME.onnx "
                    "(cache: ONNXSLIM_CACHE, else .cache/ at the repository root), in a torch "
                    "virtualenv that the first run creates at <cache>/export-venv.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="models to export (default: all)")
    parser.add_argument("--force", action="store_true", help="export again even if already exported")
    parser.add_argument("--list", action="store_true", help="show the manifest's models and which are exported")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    arguments = argv if argv is not None else sys.argv[1:]
    try:
        if tomllib is None and not _in_export_venv():
            # Python 3.10 without tomli cannot read the manifest; the venv's Python 3.11 can.
            return _rerun_in_venv(arguments)
        models = load_manifest()
        names = args.names or list(models)
        for name in names:
            _entry(name)
        width = max(map(len, names))
        if args.list:
            for name in names:
                print(_describe(name, width))
            return 0
        pending = [name for name in names if args.force or not export_path(name).is_file()]
        if pending and not _in_export_venv():
            return _rerun_in_venv(arguments)
        for name in names:
            if name in pending:
                _export(name, models[name], export_path(name))
            print(_describe(name, width), flush=True)
    except ExportError as e:
        if args.debug:
            raise
        print(f"export_models: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the cache directory is not writable
        if args.debug:
            raise
        print(f"export_models: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
