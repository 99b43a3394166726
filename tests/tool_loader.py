"""tools/ is not installed: its scripts are loaded by path, so the repository root never goes on
sys.path (that would shadow the installed onnxslim and its onnxslim.passes mapping). A tool loaded
once is the same module everywhere (bench_quant and fuzz import their siblings by name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
