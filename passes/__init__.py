"""onnxslim's own passes, one module each; importing this package registers them.

This folder installs as `onnxslim.passes`. Imported as top-level `passes` (from the repo root)
it would load a second copy of every module and a second registry, so that is refused.
"""

if __name__ != "onnxslim.passes":
    raise ImportError(
        "passes/ is onnxslim's pass package and only imports as onnxslim.passes "
        "(run tests with `pytest`, not `python -m pytest`, and install with `pip install -e .`)"
    )

import importlib
import pkgutil

for _module in sorted(module.name for module in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
