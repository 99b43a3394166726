"""Is onnxslim's output a fixed point? Optimize every model of a folder again and compare bytes.

    python tools/fixed_point.py <cache>/bench/ours          # bench_peers' results of ours

Each model is optimized with the default pipeline (verification off: it changes no output); the
result, serialized, must be the same bytes as the model read from the file (whatever wrote the
file). Prints one line per model and a count; exit 1 if any model changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def check(path: Path) -> str:
    import onnx
    import onnxslim

    model = onnx.load(str(path))
    again = onnxslim.optimize(model, verify=False)
    return "same" if again.SerializeToString() == model.SerializeToString() else "changed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder of .onnx files written by onnxslim")
    arguments = parser.parse_args()
    models = sorted(arguments.folder.glob("*.onnx"))
    changed = []
    for path in models:
        verdict = check(path)
        print(f"{path.stem:40s} {verdict}", flush=True)
        if verdict != "same":
            changed.append(path.stem)
    print(f"{len(models) - len(changed)} of {len(models)} models unchanged by a second optimize"
          + (f"; changed: {', '.join(changed)}" if changed else ""))
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
