"""Shared test setup: the tests folder itself (never the repo root) is importable, for `builder`."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
