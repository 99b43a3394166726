"""Packaging: the explicit package list matches the folders, passes/ only imports as onnxslim.passes."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def packages_on_disk() -> set[str]:
    """Every folder holding an __init__.py under a mapped package directory, named as it installs."""
    found = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root)
            found.add(".".join([package, *relative.parts]))
    return found


def test_package_dir_mapping():
    assert SETUPTOOLS["package-dir"] == {"onnxslim": "onnxslim", "onnxslim.passes": "passes"}


def test_listed_packages_match_the_folders_on_disk():
    listed = SETUPTOOLS["packages"]
    assert len(listed) == len(set(listed))
    assert set(listed) == packages_on_disk()
    assert {"onnxslim", "onnxslim.pipelines", "onnxslim.passes"} <= set(listed)


def test_every_top_level_python_folder_is_mapped_or_not_a_package():
    """A new top-level package (a folder with __init__.py) must be mapped, or it is left out of the wheel."""
    mapped = {REPO / folder for folder in SETUPTOOLS["package-dir"].values()}
    not_installed = {REPO / "tests", REPO / "tools"}
    unmapped = {init.parent.name for init in REPO.glob("*/__init__.py") if init.parent not in mapped | not_installed}
    assert unmapped == set(), f"top-level packages not in pyproject.toml: {unmapped}"


def test_pipeline_presets_are_package_data():
    patterns = SETUPTOOLS["package-data"]["onnxslim.pipelines"]
    presets = sorted((REPO / "onnxslim" / "pipelines").glob("*.toml"))
    assert presets
    for preset in presets:
        assert any(fnmatch.fnmatch(preset.name, pattern) for pattern in patterns), preset.name


def run_python(code: str) -> subprocess.CompletedProcess:
    """`python -c` from the repo root, where the cwd comes first on sys.path (as with `python -m pytest`)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_passes_does_not_import_as_a_top_level_package():
    completed = run_python("import passes")
    assert completed.returncode != 0
    assert "ImportError" in completed.stderr and "onnxslim.passes" in completed.stderr


def test_passes_imports_as_onnxslim_passes_from_the_repo_root():
    completed = run_python(
        "import onnxslim.passes, onnxslim; "
        "print(onnxslim.passes.__file__); print(len(onnxslim.registered_passes()))"
    )
    assert completed.returncode == 0, completed.stderr
    path, count = completed.stdout.split()
    assert Path(path).resolve() == REPO / "passes" / "__init__.py"
    assert int(count) >= 1
