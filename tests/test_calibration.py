"""Calibration data (.npz, .npy, images, random), activation capture and the range methods."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builder import ModelBuilder

from onnxslim.calibration import (
    CalibrationData,
    Histogram,
    HistogramObserver,
    MinMaxObserver,
    Preprocess,
    calibrate_ranges,
    capture_activations,
    entropy_range,
    input_specs,
    minmax_range,
    mse_range,
    percentile_range,
    range_method,
)
from onnxslim.errors import InputSpecError, UsageError, VerificationUnavailable

try:
    from PIL import Image
except ImportError:
    Image = None

needs_pillow = pytest.mark.skipif(
    Image is None, reason="Pillow is not installed (pip install 'onnxslim[images]'): image calibration is untested"
)


def two_input_model() -> onnx.ModelProto:
    """x: float32 [1, 3]; ids: int64 [batch, 5]; each passes through an Identity."""
    b = ModelBuilder()
    b.output(b.node("Identity", [b.input("x", [1, 3])]))
    b.output(b.node("Identity", [b.input("ids", ["batch", 5], np.int64)]))
    return b.build()


def image_model(shape: list, dtype=np.float32) -> onnx.ModelProto:
    b = ModelBuilder()
    b.output(b.node("Identity", [b.input("image", shape, dtype)]))
    return b.build()


def relu_mul_model() -> onnx.ModelProto:
    """x [1, 4] -> Relu -> relu_out -> Mul 2 -> y."""
    b = ModelBuilder()
    relu = b.node("Relu", [b.input("x", [1, 4])], ["relu_out"])
    b.output(b.node("Mul", [relu, b.initializer("two", np.array(2, np.float32))], ["y"]))
    return b.build()


def write_npz(folder, name: str, **arrays) -> str:
    folder.mkdir(exist_ok=True)
    path = folder / name
    np.savez(path, **arrays)
    return str(path)


def good_npz(folder, name: str, value: float) -> str:
    return write_npz(
        folder, name, x=np.full([1, 3], value, np.float32), ids=np.full([2, 5], int(value), np.int64)
    )


# ----------------------------------------------------------------------------- .npz and .npy


def test_npz_folder_round_trip_in_sorted_order(tmp_path):
    folder = tmp_path / "calib"
    for name, value in [("b.npz", 2.0), ("a.npz", 1.0), ("c.npz", 3.0)]:
        good_npz(folder, name, value)
    (folder / ".hidden.npz").write_bytes(b"not read")
    data = CalibrationData.from_path(two_input_model(), folder)
    assert len(data) == 3
    assert [label.rsplit("/", 1)[-1] for label in data.labels] == ["a.npz", "b.npz", "c.npz"]
    feeds = list(data)
    assert [float(feed["x"][0, 0]) for feed in feeds] == [1.0, 2.0, 3.0]
    assert feeds[0]["ids"].dtype == np.int64 and feeds[0]["ids"].shape == (2, 5)  # dynamic batch: any size
    assert "3 samples: .npz files in" in data.description
    assert not data.synthetic

    assert len(CalibrationData.from_path(two_input_model(), folder, limit=2)) == 2
    calibration, evaluation = data.split(held_out=1)
    assert [float(feed["x"][0, 0]) for feed in calibration] == [1.0, 2.0]
    assert [float(feed["x"][0, 0]) for feed in evaluation] == [3.0]
    assert len(data.limit(1)) == 1


IDS = np.zeros([1, 5], np.int64)


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"x": np.zeros([1, 3], np.float32), "idz": IDS}, "no array for input 'ids'.*'idz' is not an input"),
        ({"x": np.zeros([1, 3]), "ids": IDS}, r"'x' is float64, the model's input is float32 \(save it with .astype"),
        ({"x": np.zeros([3], np.float32), "ids": IDS}, r"'x' has shape \[3\] \(rank 1\), the model's input has rank 2"),
        ({"x": np.zeros([1, 4], np.float32), "ids": IDS}, "dim 1 must be 3"),
    ],
    ids=["name", "dtype", "rank", "dim"],
)
def test_npz_that_does_not_fit_the_model_is_named(tmp_path, arrays, problem):
    folder = tmp_path / "calib"
    good_npz(folder, "a.npz", 1.0)
    write_npz(folder, "bad.npz", **arrays)
    with pytest.raises(InputSpecError, match=f"bad.npz: .*{problem}"):
        CalibrationData.from_path(two_input_model(), folder)


def test_unreadable_npz_is_named(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "broken.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(InputSpecError, match="broken.npz: not a readable .npz file"):
        CalibrationData.from_path(two_input_model(), folder)


def test_folder_problems(tmp_path):
    model = two_input_model()
    with pytest.raises(InputSpecError, match="not found"):
        CalibrationData.from_path(model, tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(InputSpecError, match=r"holds no .npz, .npy or image files \(found: .txt\)"):
        CalibrationData.from_path(model, empty)
    mixed = tmp_path / "mixed"
    good_npz(mixed, "a.npz", 1.0)
    np.save(mixed / "b.npy", np.zeros([1, 3], np.float32))
    with pytest.raises(InputSpecError, match="mixes npy and npz files"):
        CalibrationData.from_path(model, mixed)
    npz_only = tmp_path / "npz"
    good_npz(npz_only, "a.npz", 1.0)
    with pytest.raises(InputSpecError, match="--preprocess applies to images"):
        CalibrationData.from_path(model, npz_only, preprocess="size=8x8")
    data = CalibrationData.from_path(model, npz_only)
    with pytest.raises(InputSpecError, match="cannot hold out 1 of 1"):
        data.split(held_out=1)
    with pytest.raises(InputSpecError, match="limit=0"):
        CalibrationData.from_path(model, npz_only, limit=0)


def test_npy_samples_and_stacks(tmp_path):
    model = image_model([1, 2])
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "one.npy", np.array([[1, 2]], np.float32))
    np.save(folder / "stack.npy", np.arange(6, dtype=np.float32).reshape(3, 1, 2))  # three samples
    data = CalibrationData.from_path(model, folder)
    assert len(data) == 4
    assert data.labels[1].endswith("stack.npy[0]")
    assert [feed["image"].tolist() for feed in data] == [[[1, 2]], [[0, 1]], [[2, 3]], [[4, 5]]]
    single = CalibrationData.from_path(model, folder / "stack.npy", limit=2)
    assert len(single) == 2
    np.save(folder / "wrong.npy", np.zeros([1, 5], np.float32))
    with pytest.raises(InputSpecError, match="wrong.npy: 'image' has shape"):
        CalibrationData.from_path(model, folder)
    with pytest.raises(InputSpecError, match="single-input models; this one has inputs x, ids"):
        CalibrationData.from_path(two_input_model(), folder / "one.npy")


def test_feeds_in_memory_are_checked():
    model = two_input_model()
    feeds = [{"x": np.ones([1, 3], np.float32), "ids": np.ones([1, 5], np.int64)}]
    assert len(CalibrationData.from_feeds(model, feeds)) == 1
    with pytest.raises(InputSpecError, match="sample 0: no array for input 'ids'"):
        CalibrationData.from_feeds(model, [{"x": np.ones([1, 3], np.float32)}])


# ----------------------------------------------------------------------------- random data


def test_random_data_warns_loudly_and_is_seeded(caplog):
    model = two_input_model()
    with caplog.at_level(logging.WARNING, logger="onnxslim"):
        data = CalibrationData.random(model, count=3, seed=7)
    assert any("RANDOM DATA" in record.getMessage() and record.name == "onnxslim" for record in caplog.records)
    assert data.synthetic and "RANDOM" in data.description and len(data) == 3
    first, again = list(data), list(CalibrationData.random(model, count=3, seed=7))
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, again))
    assert not np.array_equal(first[0]["x"], first[1]["x"])
    assert first[0]["ids"].shape == (1, 5)  # the dynamic batch defaults to 1
    assert list(CalibrationData.random(model, {"ids": [4, 5]}, count=1))[0]["ids"].shape == (4, 5)


def test_random_data_needs_dynamic_dims():
    model = image_model([1, 3, "height", "width"])
    with pytest.raises(InputSpecError, match="dynamic dim 2 \\('height'\\)"):
        CalibrationData.random(model)
    assert list(CalibrationData.random(model, {"image": [1, 3, 4, 4]}, count=1))[0]["image"].shape == (1, 3, 4, 4)


# ----------------------------------------------------------------------------- preprocessing text


def test_preprocess_parses_and_round_trips():
    text = (
        "size=224x224,layout=NCHW,scale=1/255,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,"
        "color=RGB,resize=center-crop"
    )
    preprocess = Preprocess.parse(text)
    assert preprocess.size == (224, 224) and preprocess.layout == "NCHW" and preprocess.color == "RGB"
    assert preprocess.scale == 1 / 255 and preprocess.mean == (0.485, 0.456, 0.406)
    assert preprocess.std == (0.229, 0.224, 0.225) and preprocess.resize == "center-crop"
    assert Preprocess.parse(str(preprocess)) == preprocess
    assert str(preprocess).startswith("size=224x224,layout=NCHW,color=RGB,scale=1/255,mean=0.485:0.456:0.406")
    loose = Preprocess.parse(" size=320 , layout=nhwc, resize=letterbox, pad=0, scale=0.5, mean=127 ")
    assert loose.size == (320, 320) and loose.layout == "NHWC" and loose.pad == 0 and loose.mean == (127.0,)
    assert Preprocess.parse(str(loose)) == loose
    assert Preprocess.parse("") == Preprocess()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("size=224", None),  # a square: valid
        ("size=axb", "size=axb is not valid"),
        ("size=1x2x3", "size=1x2x3 is not valid"),
        ("size=0x4", "size .* should be two positive integers"),
        ("layout=NCWH", "layout=NCWH: choose one of NCHW, NHWC"),
        ("color=CMYK", "color=CMYK: choose one of RGB, BGR, GRAY"),
        ("resize=crop", "resize=crop: choose one of stretch, letterbox, center-crop"),
        ("scale=1/0", "scale=1/0 is not valid"),
        ("scale=-1", "scale=-1.0: must be a positive number"),
        ("mean=a:b", "mean=a:b is not valid"),
        ("std=1:0:1", "std=.*give positive numbers"),
        ("gamma=2", "unknown key 'gamma' \\(known: size, layout"),
        ("size", "'size' should be key=value"),
        ("size=8,size=9", "'size' is given twice"),
        ("crop=1.5", "crop=1.5: the cropped share"),
    ],
)
def test_preprocess_rejects_bad_text(text, problem):
    if problem is None:
        Preprocess.parse(text)
        return
    with pytest.raises(InputSpecError, match=f"--preprocess '{text}': {problem}"):
        Preprocess.parse(text)


def test_preprocess_resolves_against_the_model():
    (spec,) = input_specs(image_model([1, 3, 16, 8]))
    resolved = Preprocess().resolve(spec)
    assert (resolved.size, resolved.layout, resolved.color, resolved.scale) == ((16, 8), "NCHW", "RGB", 1 / 255)
    (spec,) = input_specs(image_model(["n", 8, 8, 1], np.uint8))
    resolved = Preprocess().resolve(spec)
    assert (resolved.layout, resolved.color, resolved.scale) == ("NHWC", "GRAY", 1.0)
    problems = [
        (image_model([1, 3, 8, 8]), "size=4x4", "height is 8, size gives 4"),
        (image_model([1, 3, "h", "w"]), "", "dynamic height or width: add size=HxW"),
        (image_model([1, 1, 8, 8]), "color=RGB", "color=RGB gives 3 channels, but input 'image'"),
        (image_model([1, 3, 8, 8]), "mean=1:2", "mean has 2 values"),
        (image_model([1, 8, 8]), "", "images feed rank-4 inputs"),
        (image_model([1, 5, 8, 8]), "", "cannot tell the channel axis"),
    ]
    for model, text, problem in problems:
        with pytest.raises(InputSpecError, match=problem):
            Preprocess.parse(text).resolve(input_specs(model)[0])


def test_missing_pillow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(UsageError, match=r"reading images needs Pillow: pip install 'onnxslim\[images\]'"):
        CalibrationData.from_path(image_model([1, 3, 8, 8]), tmp_path)


# ----------------------------------------------------------------------------- images


def write_image(path, width: int, height: int, color=(200, 100, 50), left_quarter=None):
    pixels = np.zeros([height, width, 3], np.uint8)
    pixels[:] = color
    if left_quarter is not None:
        pixels[:, : width // 4] = left_quarter
    Image.fromarray(pixels).save(path)


@needs_pillow
def test_images_nchw_with_mean_and_std(tmp_path):
    for name in ("b.png", "a.jpg", "c.bmp"):
        write_image(tmp_path / name, 12, 10)
    data = CalibrationData.from_path(
        image_model([1, 3, 8, 8]), tmp_path, preprocess="mean=0.5:0.5:0.5,std=0.25,scale=1/255"
    )
    assert [label.rsplit("/", 1)[-1] for label in data.labels] == ["a.jpg", "b.png", "c.bmp"]
    assert "size=8x8,layout=NCHW,color=RGB,scale=1/255,mean=0.5:0.5:0.5,std=0.25" in data.description
    feed = list(data)[1]  # the lossless png
    image = feed["image"]
    assert image.shape == (1, 3, 8, 8) and image.dtype == np.float32
    expected = (np.array([200, 100, 50]) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(image[0, :, 4, 4], expected, rtol=1e-5)


@needs_pillow
def test_images_nhwc_and_bgr(tmp_path):
    write_image(tmp_path / "a.png", 8, 8)
    model = image_model([1, 8, 8, 3])
    rgb = list(CalibrationData.from_path(model, tmp_path, preprocess="scale=1"))[0]["image"]
    assert rgb.shape == (1, 8, 8, 3)
    assert rgb[0, 3, 3].tolist() == [200, 100, 50]
    bgr = list(CalibrationData.from_path(model, tmp_path, preprocess="scale=1,color=BGR"))[0]["image"]
    assert bgr[0, 3, 3].tolist() == [50, 100, 200]


@needs_pillow
def test_letterbox_stretch_and_center_crop(tmp_path):
    # 16 wide, 8 high: the left quarter green, the rest red
    write_image(tmp_path / "wide.png", 16, 8, color=(255, 0, 0), left_quarter=(0, 255, 0))
    model = image_model([1, 3, 8, 8])

    def first(preprocess):
        return list(CalibrationData.from_path(model, tmp_path, preprocess=preprocess))[0]["image"][0]

    stretched = first("scale=1,resize=stretch")  # squeezed to 8x8: green in the first two columns
    assert stretched.shape == (3, 8, 8)
    assert stretched[1, :, 0].min() > 200 and stretched[0, :, 7].min() > 200
    letterboxed = first("scale=1,resize=letterbox")  # fit to 8x4, padded with gray 114 above and below
    assert (letterboxed[:, :2, :] == 114).all() and (letterboxed[:, 6:, :] == 114).all()
    assert letterboxed[0, 2:6, 7].min() > 200 and letterboxed[1, 2:6, 0].min() > 200
    cropped = first("scale=1,resize=center-crop")  # the middle 8 columns: red only
    assert cropped[0].min() > 200 and cropped[1].max() < 50
    assert first("scale=1,resize=letterbox,pad=0")[:, 0, :].max() == 0


@needs_pillow
def test_images_gray_uint8_batches_and_errors(tmp_path):
    for index in range(3):
        write_image(tmp_path / f"{index}.png", 8, 8, color=(100, 100, 100))
    gray = list(CalibrationData.from_path(image_model([1, 1, 8, 8], np.uint8), tmp_path))[0]["image"]
    assert gray.dtype == np.uint8 and gray.shape == (1, 1, 8, 8) and (gray == 100).all()  # scale 1 for uint8
    batched = CalibrationData.from_path(image_model([2, 3, 8, 8]), tmp_path)
    assert len(batched) == 1 and list(batched)[0]["image"].shape == (2, 3, 8, 8)
    assert "the last 1 image(s) do not fill a batch of 2" in batched.description
    dynamic = CalibrationData.from_path(image_model(["n", 3, "h", "w"]), tmp_path, preprocess="size=6x4", limit=2)
    assert len(dynamic) == 2 and list(dynamic)[0]["image"].shape == (1, 3, 6, 4)
    (tmp_path / "3.png").write_bytes(b"not an image")
    with pytest.raises(InputSpecError, match="3.png: not a readable image"):
        CalibrationData.from_path(image_model([1, 3, 8, 8]), tmp_path)


# ----------------------------------------------------------------------------- capturing activations


def samples(*rows) -> list[dict[str, np.ndarray]]:
    return [{"x": np.array([row], np.float32)} for row in rows]


def test_capture_gets_the_relu_range_across_samples():
    model = relu_mul_model()
    before = model.SerializeToString()
    data = CalibrationData.from_feeds(model, samples([-1, 2, -3, 0.5], [4, -5, 1, 0], [0.25, 3, -2, -1]))
    observer, progress = MinMaxObserver(), []
    done = capture_activations(
        model, data, ["relu_out", "y", "x"], reduce=observer, progress=lambda *call: progress.append(call)
    )
    assert done == 3 and progress == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert observer.ranges == {"relu_out": (0.0, 4.0), "y": (0.0, 8.0), "x": (-5.0, 4.0)}
    assert model.SerializeToString() == before  # the outputs are added to a copy


def test_capture_holds_one_sample_at_a_time():
    """reduce sees each tensor once per sample, as that sample's array, in sample order."""
    model = relu_mul_model()
    calls = []
    histograms = HistogramObserver()
    capture_activations(
        model,
        (feed for feed in samples([1, 2, 3, 4], [5, 6, 7, 8])),  # a generator: no length, no list of all samples
        ["relu_out", "y"],
        reduce=[lambda name, value: calls.append((name, value.shape, float(value.max()))), histograms],
    )
    assert calls == [("relu_out", (1, 4), 4.0), ("y", (1, 4), 8.0), ("relu_out", (1, 4), 8.0), ("y", (1, 4), 16.0)]
    assert histograms.histograms["relu_out"].total == 8


@pytest.mark.parametrize("declared", [[1, 4], [7, 5]], ids=["value_info", "stale-value_info"])
def test_capture_types_outputs_from_value_info(declared):
    b = ModelBuilder()
    relu = b.node("Relu", [b.input("x", [1, 4])], ["relu_out"])
    b.annotate(relu, np.float32, declared)
    b.output(b.node("Neg", [relu], ["y"]), np.float32, [1, 4])
    model = b.build(check=False)
    observer = MinMaxObserver()
    capture_activations(model, samples([-1, 2, -3, 0.5]), ["relu_out"], reduce=observer)
    assert observer.ranges == {"relu_out": (0.0, 2.0)}


def test_capture_names_a_model_onnxruntime_cannot_load():
    b = ModelBuilder()
    b.output(b.node("NoSuchOp", [b.input("x", [1, 4])], ["y"], domain="custom.domain"), np.float32, [1, 4])
    b.use_domain("custom.domain")
    with pytest.raises(VerificationUnavailable, match="onnxruntime cannot load the model to calibrate: "):
        capture_activations(b.build(check=False), samples([1, 2, 3, 4]), ["y"], reduce=MinMaxObserver())


def test_capture_rejects_unknown_tensors():
    model = relu_mul_model()
    with pytest.raises(UsageError, match="no tensor 'nothing' in the model's main graph"):
        capture_activations(model, samples([1, 2, 3, 4]), ["nothing"], reduce=MinMaxObserver())
    with pytest.raises(UsageError, match="'two' is an initializer"):
        capture_activations(model, samples([1, 2, 3, 4]), ["two"], reduce=MinMaxObserver())


def test_calibrate_ranges_by_method():
    model = relu_mul_model()
    data = CalibrationData.from_feeds(model, samples([-1, 2, -3, 0.5], [4, -5, 1, 0]))
    assert calibrate_ranges(model, data, ["relu_out"]) == {"relu_out": (0.0, 4.0)}
    assert calibrate_ranges(model, data, ["x"], symmetric=True) == {"x": (-5.0, 5.0)}
    low, high = calibrate_ranges(model, data, ["relu_out"], method="percentile", percentile=99.0)["relu_out"]
    assert low == pytest.approx(0.0, abs=1e-3) and 3.0 < high <= 4.0  # values spread within bins: not exact
    with pytest.raises(UsageError, match="unknown calibration method 'kl': choose one of minmax, percentile, entropy"):
        range_method("kl")


# ----------------------------------------------------------------------------- histograms and ranges


def histogram_of(values: np.ndarray, chunks: int = 8) -> Histogram:
    histogram = Histogram()
    for chunk in np.array_split(values, chunks):
        histogram.add(chunk.astype(np.float32))
    return histogram


def test_histogram_widens_exactly():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 1, 5000), rng.uniform(-3, 10, 5000), [40.0, -20.0]])
    histogram = Histogram(bins=256)
    for chunk in (values[:5000], values[5000:7000], values[7000:]):  # the range widens twice
        histogram.add(chunk)
    assert histogram.total == values.size and (histogram.min, histogram.max) == (-20.0, 40.0)
    assert histogram.start <= -20.0 and histogram.end >= 40.0
    direct, _ = np.histogram(values, bins=256, range=(histogram.start, histogram.end))
    assert np.abs(direct - histogram.counts).sum() <= 2  # whole bins merged: only float edge ties may move


def test_histogram_starts_from_a_constant_and_skips_non_finite():
    histogram = Histogram(bins=64)
    histogram.add(np.zeros(10, np.float32))
    histogram.add(np.array([1.0, -1.0, np.nan, np.inf, 0.0], np.float32))
    assert histogram.total == 13 and histogram.zeros == 11 and histogram.nonfinite == 2
    assert (histogram.min, histogram.max) == (-1.0, 1.0)
    assert minmax_range(histogram) == (-1.0, 1.0)
    assert np.diff(histogram.cdf([0.0, histogram.width])) == [11]  # the first zeros kept their place


def test_uniform_ranges_agree():
    histogram = histogram_of(np.random.default_rng(1).uniform(-1, 1, 200_000))
    low, high = minmax_range(histogram)
    for method in (percentile_range, entropy_range, mse_range):
        method_low, method_high = method(histogram)
        assert abs(method_low - low) < 0.02 and abs(method_high - high) < 0.02, method.__name__
    assert percentile_range(histogram, symmetric=True)[1] == pytest.approx(1.0, abs=0.01)


def test_outliers_are_clipped_except_by_minmax():
    """A Gaussian with one huge outlier: minmax keeps it; the other methods clip far below it."""
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.standard_normal(1_000_000), [200.0]])
    histogram = histogram_of(rng.permutation(values))
    assert minmax_range(histogram)[1] == 200.0
    assert 3.5 < percentile_range(histogram)[1] < 4.5  # 99.99th percentile of N(0, 1): 3.72
    assert percentile_range(histogram)[0] == pytest.approx(-3.72, abs=0.2)
    assert entropy_range(histogram)[1] < 40
    # the MSE-optimal bound balances one outlier's clipping error against the step's rounding error
    assert 20 < mse_range(histogram)[1] < 120
    assert 10 < mse_range(histogram, symmetric=True)[1] < 60
    assert entropy_range(histogram, symmetric=True)[1] < 40


def test_mse_is_exact_for_coarse_steps_and_zeros():
    """ReLU output: half exact zeros. The range starts at 0; MSE and percentile clip the long tail."""
    values = np.maximum(np.random.default_rng(3).standard_normal(200_000), 0)
    histogram = histogram_of(values)
    assert histogram.zeros == np.count_nonzero(values == 0)
    low, high = mse_range(histogram)
    assert low == 0.0 and 2.5 < high <= values.max()
    low, high = entropy_range(histogram)
    assert low == 0.0 and 0.5 < high <= values.max()
    assert mse_range(Histogram()) == (0.0, 0.0)


def quantization_error(values: np.ndarray, low: float, high: float) -> float:
    """Mean squared error of uint8 quantization with this range, as onnxruntime computes scale and zero point."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255
    zero_point = np.rint(-low / scale)
    quantized = np.clip(np.rint(values / scale) + zero_point, 0, 255)
    return float(np.mean(((quantized - zero_point) * scale - values) ** 2))


@pytest.mark.parametrize("case", ["outlier", "relu", "uniform", "skewed"])
def test_mse_range_beats_the_other_methods_on_real_quantization(case):
    rng = np.random.default_rng(4)
    values = {
        "outlier": np.concatenate([rng.standard_normal(300_000), [60.0]]),
        "relu": np.maximum(rng.standard_normal(300_000), 0),
        "uniform": rng.uniform(-2, 1, 300_000),
        "skewed": rng.exponential(1.0, 300_000) - 0.5,
    }[case]
    histogram = histogram_of(values)
    errors = {
        method.__name__: quantization_error(values, *method(histogram))
        for method in (minmax_range, percentile_range, entropy_range, mse_range)
    }
    assert errors["mse_range"] <= 1.01 * min(errors.values()), errors


# ----------------------------------------------------------------------------- degenerate and extreme ranges


def _extreme_values(case: str) -> list[np.ndarray]:
    """Chunks added one after another to a histogram (the order matters: it widens as they come)."""
    normal = np.random.default_rng(3).standard_normal(4000).astype(np.float32)
    if case == "constant":
        return [np.full(1000, 0.5, np.float32)] * 2
    if case == "negative-constant":
        return [np.full(1000, -2.0, np.float32)]
    if case == "zeros":
        return [np.zeros(1000, np.float32)]
    if case == "denormal":
        return [normal * np.float32(1e-40)]
    if case == "huge":  # float32's extremes among ordinary values
        return [np.concatenate([normal, np.float32([3e38, -3e38, 3.4e38])])]
    if case == "constant-then-huge":
        return [np.full(1000, 0.5, np.float32), np.float32([-3e38, 1.0]), normal]
    assert case == "tiny-then-huge"
    return [normal * np.float32(1e-30), np.float32([3e38])]


EXTREME_CASES = ("constant", "negative-constant", "zeros", "denormal", "huge", "constant-then-huge", "tiny-then-huge")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("case", EXTREME_CASES)
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_range_method_copes_with_zero_width_tiny_and_huge_ranges(method, case, symmetric):
    """Once np.histogram raised 'Too many bins for data range' on a constant or on 3e38 next to 1
    (it bins in float32); every method must give a finite range, low <= high, that holds the
    constant it saw, and the quantizer a normal, finite scale."""
    from onnxslim.passes.quantize_qdq import activation_parameters

    chunks = _extreme_values(case)
    histogram = Histogram()
    for chunk in chunks:
        histogram.add(chunk)
    values = np.concatenate(chunks)
    assert histogram.total == values.size and (histogram.min, histogram.max) == (values.min(), values.max())
    low, high = range_method(method)(histogram, symmetric=symmetric)
    assert math.isfinite(low) and math.isfinite(high) and low <= high
    if values.min() == values.max():  # a constant: its value is inside the range, give or take a step
        step = (high - low) / 255
        assert low - step <= values[0] <= high + step
    if case == "huge" and method == "minmax":
        assert high == pytest.approx(3.4e38, rel=1e-6)
    for activation_type in ("uint8", "int8"):
        scale, zero_point = activation_parameters((low, high), activation_type, symmetric)
        assert scale.dtype == np.float32 and np.isfinite(scale) and scale >= np.finfo(np.float32).tiny
        levels = np.arange(*((0, 256) if activation_type == "uint8" else (-128, 128)), dtype=np.float32)
        assert np.isfinite((levels - np.float32(zero_point)) * scale).all()  # every dequantized level is a number


def test_calibrate_ranges_on_a_constant_activation_with_every_method():
    model = relu_mul_model()
    feeds = [{"x": np.full([1, 4], 0.25, np.float32)}] * 3
    for method in ("minmax", "percentile", "entropy", "mse"):
        ranges = calibrate_ranges(model, feeds, ["x"], method=method)
        low, high = ranges["x"]
        assert low <= 0.25 <= high, method


def test_non_finite_samples_are_skipped_with_one_warning_naming_them(tmp_path, caplog):
    model = relu_mul_model()
    good = np.ones([1, 4], np.float32)
    feeds = [{"x": good}, {"x": np.float32([[1, np.inf, 2, np.nan]])}, {"x": good * 2}]
    with caplog.at_level(logging.WARNING, logger="onnxslim"):
        data = CalibrationData.from_feeds(model, feeds)
    assert len(data) == 2 and data.labels == ["sample 0", "sample 2"]
    (warning,) = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert "sample 1 ('x' holds 1 NaN and 1 infinite value)" in warning
    assert "1 skipped for NaN or infinite values" in data.description
    with pytest.raises(InputSpecError, match=r"no usable calibration sample .* \(first: sample 0 \('x' holds 4 NaN\)\)"):
        CalibrationData.from_feeds(model, [{"x": np.full([1, 4], np.nan, np.float32)}] * 2)


def test_non_finite_npz_and_npy_samples_are_skipped_and_the_limit_counts_usable_ones(tmp_path):
    model = relu_mul_model()
    (tmp_path / "npz").mkdir()
    for index, value in enumerate([np.inf, 1.0, 2.0, 3.0]):
        np.savez(tmp_path / "npz" / f"{index}.npz", x=np.full([1, 4], value, np.float32))
    data = CalibrationData.from_path(model, tmp_path / "npz", limit=2)
    assert [Path(label).name for label in data.labels] == ["1.npz", "2.npz"]
    stack = np.ones([3, 1, 4], np.float32)
    stack[1, 0, 2] = -np.inf
    np.save(tmp_path / "stack.npy", stack)
    data = CalibrationData.from_path(model, tmp_path / "stack.npy")
    assert [label.rsplit("/", 1)[-1] for label in data.labels] == ["stack.npy[0]", "stack.npy[2]"]
    np.save(tmp_path / "nan.npy", np.full([2, 1, 4], np.nan, np.float32))
    with pytest.raises(InputSpecError, match=r"nan\.npy\[0\]"):
        CalibrationData.from_path(model, tmp_path / "nan.npy")


def test_preprocessing_that_leaves_float32_is_refused():
    spec = input_specs(image_model([1, 3, 8, 8]))[0]
    with pytest.raises(InputSpecError, match="beyond float32"):
        Preprocess(std=(1e-40,)).resolve(spec)
    assert Preprocess(std=(1e-3,)).resolve(spec).std == (1e-3,)
