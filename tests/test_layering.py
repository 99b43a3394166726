"""Dependencies flow one way: every module of onnxslim/ and passes/ imports only its own layer or
lower ones. The modules are parsed, not imported, and an import inside a function counts as
much as one at the top (a lazy import is still a dependency).

    core         errors, graph, model and the conversion to and from the graph, text, layers, the
                 onnxruntime worker (passes fold constants through it), load-time repair
    passes       the pass manager and every pass
    runtime      sessions, inputs, verification, instruments, the CPU
    algorithms   calibration, quantization, pruning, reconstruction
    bench        benchmark, report
    api          the Python API (and the package root, which exposes it)
    cli          the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "passes", "runtime", "algorithms", "bench", "api", "cli")
# Module (dotted, under onnxslim) -> layer. A module missing here fails the test: a new module
# says where it belongs.
LAYER_OF = {
    "errors": "core",
    "text": "core",
    "graph": "core",
    "rules": "core",
    "model": "core",
    "importer": "core",
    "exporter": "core",
    "shapes": "core",  # shape inference over the graph; the infer-shapes pass runs it
    "layers": "core",  # what each layer's weight holds, its bias, MACs and parameters: passes read it too
    "repair": "core",  # model.load repairs a model's structure as it reads it
    "runtime": "core",  # the onnxruntime worker process: fold-constants (a pass) runs nodes in it
    "runtime_worker": "core",
    "manager": "passes",
    "pipelines": "passes",  # presets as data
    "passes": "passes",
    "sessions": "runtime",
    "inputs": "runtime",
    "verify": "runtime",
    "instruments": "runtime",  # verify-each and dump-each: the manager's instruments that verify
    "cpu": "runtime",
    "options": "algorithms",  # option objects of the algorithms (calibration data among them), read by the API and the CLI
    "calibration": "algorithms",
    "preprocess": "algorithms",
    "ranges": "algorithms",
    "quantize": "algorithms",
    "prune": "algorithms",
    "reconstruct": "algorithms",
    "benchmark": "bench",
    "benchmark_report": "bench",
    "report": "bench",
    "api": "api",
    "": "api",  # the package root re-exports the API
    "cli": "cli",
    "cli_options": "cli",
    "__main__": "cli",
}
# Imports that go the wrong way today, each with why it is allowed and when it goes.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    """The dotted name under onnxslim of a file in onnxslim/ or passes/ ('' for the package root)."""
    relative = path.relative_to(ROOT)
    parts = list(relative.with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["onnxslim", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts[1:])


def layer_of(module: str) -> str:
    """The layer of a dotted module name under onnxslim (a package's modules share its layer)."""
    top = module.split(".")[0]
    if top not in LAYER_OF:
        raise KeyError(f"onnxslim.{module} has no layer: add it to LAYER_OF in tests/test_layering.py")
    return LAYER_OF[top]


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name under onnxslim) of every import of an onnxslim module in the tree,
    wherever it stands (top level, function, class or TYPE_CHECKING block)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = [part for part in package if part]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name[len("onnxslim."):]) for alias in node.names
                      if alias.name.startswith("onnxslim.")]
            found += [(node.lineno, "") for alias in node.names if alias.name == "onnxslim"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "onnxslim" or node.module.startswith("onnxslim.")):
                target = node.module[len("onnxslim."):] if node.module != "onnxslim" else ""
            else:
                continue
            if target:
                found.append((node.lineno, target))
            else:  # `from . import x`: the modules named
                found += [(node.lineno, alias.name) for alias in node.names]
    return found


def wrong_way(source: str, path: str, module: str, is_package: bool = False) -> list[str]:
    """Every import in `source` (the module `module`) of a higher layer, as 'path:line: ...'."""
    own = LAYERS.index(layer_of(module))
    problems = []
    for line, target in imported_modules(ast.parse(source, path), module, is_package):
        if not target and module:  # the package root, from inside the package
            problems.append(f"{path}:{line}: imports the package root (layer api); import the module it needs")
            continue
        other = LAYERS.index(layer_of(target))
        if other > own and (module.split(".")[0], target.split(".")[0]) not in ALLOWED:
            problems.append(f"{path}:{line}: {layer_of(module)} module onnxslim.{module or '__init__'} imports "
                            f"onnxslim.{target} of the higher layer {LAYERS[other]}")
    return problems


def source_files() -> list[Path]:
    return sorted([*(ROOT / "onnxslim").rglob("*.py"), *(ROOT / "passes").rglob("*.py")])


def test_every_module_has_a_layer():
    missing = []
    for path in source_files():
        try:
            layer_of(module_name(path))
        except KeyError as error:
            missing.append(str(error))
    assert not missing, "\n".join(missing)


def test_imports_point_down():
    problems = []
    for path in source_files():
        module = module_name(path)
        problems += wrong_way(path.read_text(), str(path.relative_to(ROOT)), module, path.name == "__init__.py")
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_allowed_exceptions_are_still_needed():
    """An allow-list entry whose import is gone must go too."""
    used = set()
    for path in source_files():
        module = module_name(path)
        for _, target in imported_modules(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            used.add((module.split(".")[0], target.split(".")[0]))
    assert ALLOWED <= used, f"allow-list entries with no import left: {sorted(ALLOWED - used)}"


@pytest.mark.parametrize("source, module, expected", [
    ("from .quantize import cpu_int8_support\n", "benchmark", []),  # bench -> algorithms: down
    ("from .benchmark import count_macs\n", "quantize", ["onnxslim.benchmark of the higher layer bench"]),
    ("def f():\n    from ..api import optimize\n", "passes.fuse_gelu", ["onnxslim.api of the higher layer api"]),
    ("from onnxslim.cli import cli\n", "verify", ["onnxslim.cli of the higher layer cli"]),
    ("import onnxslim.calibration\n", "model", ["onnxslim.calibration of the higher layer algorithms"]),
    ("from . import calibration\n", "sessions", ["onnxslim.calibration of the higher layer algorithms"]),
    ("from . import repair\n", "model", []),
    ("import onnxslim\n", "graph", ["imports the package root"]),
    ("from .benchmark import count_parameters\n", "prune", ["onnxslim.benchmark of the higher layer bench"]),
])
def test_a_wrong_way_import_is_flagged(source, module, expected):
    problems = wrong_way(source, "synthetic.py", module)
    assert len(problems) == len(expected)
    for problem, text in zip(problems, expected):
        assert problem.startswith("synthetic.py:") and text in problem
