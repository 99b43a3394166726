"""Calibration data for quantization, and the activation statistics gathered from it with onnxruntime.

    data = CalibrationData.from_path(model, "calib/", preprocess=Preprocess.parse("size=224x224,scale=1/255"))
    calibration, evaluation = data.split(held_out=4)
    observer = HistogramObserver()
    capture_activations(model, calibration, ["conv1_out", "relu2_out"], reduce=observer)
    ranges = {name: entropy_range(histogram) for name, histogram in observer.histograms.items()}

A CalibrationData is an ordered, lazily loaded sequence of feeds (input name -> array): .npz files
(one sample each), .npy files (single-input models), images with a stated Preprocess, in-memory
feeds, or seeded random data (smoke tests only, with a loud warning). capture_activations runs
each sample through onnxruntime with the requested intermediate tensors exposed as outputs and
hands every value to reducers one sample at a time, so memory holds one sample's activations,
never all of them. The range functions (minmax, percentile, entropy, mse) are plain functions
over a Histogram and give each tensor's clipping range.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from .errors import InputSpecError, RuntimeFailure, UsageError, VerificationUnavailable
from .model import load
from .verify import Runner, _first_line, check_feed, model_inputs, synthesize_inputs

logger = logging.getLogger("onnxslim")

NPZ_SUFFIX = ".npz"
NPY_SUFFIX = ".npy"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DEFAULT_BINS = 2048
DEFAULT_RANDOM_SAMPLES = 8
# Random samples are for smoke tests; past this many, a count is a typo (--calibration-limit 1000000000
# built a billion samples' list before anything ran).
MAX_RANDOM_SAMPLES = 10_000
# Skipped samples named in the warning line; the rest are counted.
SKIPPED_SHOWN = 3

Feed = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- the model's inputs


@dataclass(frozen=True)
class InputSpec:
    """One input a caller feeds: its dtype and dims (an int when static, a name or '?' when
    dynamic); `dims` is None when the model does not state the rank."""

    name: str
    dtype: np.dtype
    dims: tuple | None

    def shape_text(self) -> str:
        return "?" if self.dims is None else "[" + ", ".join(str(dim) for dim in self.dims) + "]"

    def problems(self, shape: Sequence[int], dtype: np.dtype) -> list[str]:
        """What is wrong with an array of this shape and dtype for this input (nothing: [])."""
        problems = []
        if np.dtype(dtype) != self.dtype:
            hint = f" (save it with .astype(np.{self.dtype.name}))" if self.dtype.kind in "fiub" else ""
            problems.append(f"'{self.name}' is {np.dtype(dtype).name}, the model's input is {self.dtype.name}{hint}")
        if self.dims is None:
            return problems
        if len(shape) != len(self.dims):
            problems.append(
                f"'{self.name}' has shape {list(shape)} (rank {len(shape)}), "
                f"the model's input has rank {len(self.dims)}: {self.shape_text()}"
            )
            return problems
        wrong = [
            axis
            for axis, (given, wanted) in enumerate(zip(shape, self.dims))
            if isinstance(wanted, int) and given != wanted
        ]
        if wrong:
            axes = ", ".join(f"dim {axis} must be {self.dims[axis]}" for axis in wrong)
            problems.append(f"'{self.name}' has shape {list(shape)}, the model's input is {self.shape_text()} ({axes})")
        return problems


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds, in the model's order."""
    specs = []
    for value in model_inputs(model):
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or tensor_type.elem_type in (0, onnx.TensorProto.STRING):
            raise InputSpecError(f"input '{value.name}' is not a numeric tensor; calibration cannot feed it")
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else (dim.dim_param or "?")
                for dim in tensor_type.shape.dim
            )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def _check_arrays(label: str, arrays: dict[str, tuple[tuple, np.dtype]], specs: list[InputSpec]) -> None:
    """One InputSpecError naming the sample and every problem in it; `arrays` maps name -> (shape, dtype)."""
    by_name = {spec.name: spec for spec in specs}
    known = ", ".join(by_name)
    problems = [f"no array for input '{name}' (the model's inputs: {known})" for name in by_name if name not in arrays]
    problems += [
        f"array '{name}' is not an input of the model (its inputs: {known})" for name in arrays if name not in by_name
    ]
    for name, (shape, dtype) in arrays.items():
        if name in by_name:
            problems += by_name[name].problems(shape, dtype)
    if problems:
        raise InputSpecError(f"{label}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- image preprocessing

LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR", "GRAY")
RESIZE_MODES = ("stretch", "letterbox", "center-crop")
PREPROCESS_EXAMPLE = "size=224x224,layout=NCHW,scale=1/255,mean=0.485:0.456:0.406,std=0.229:0.224:0.225"


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes one model input: value = (pixel * scale - mean) / std, per channel.

    size (H, W), layout, color and scale left as None are taken from the model by `resolve`:
    the static height and width, NCHW or NHWC from where the channel axis (1 or 3) sits,
    GRAY for one channel else RGB, and 1/255 for float inputs (1 for integer ones). `mean` and
    `std` hold one value or one per channel. Resizing is bilinear: `stretch` ignores the
    aspect ratio, `letterbox` fits the image inside and pads with `pad` (YOLO's gray 114),
    `center-crop` covers the target and crops its middle; with crop=0.875 it covers
    size/0.875 first (torchvision's resize 256, crop 224).
    """

    size: tuple[int, int] | None = None
    layout: str | None = None
    color: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "stretch"
    pad: int = 114
    crop: float = 1.0

    def __post_init__(self):
        if self.size is not None:
            if len(self.size) != 2 or any(int(side) != side or side < 1 for side in self.size):
                raise InputSpecError(f"size {self.size} should be two positive integers, like size=224x224")
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        for key, value, choices in (("layout", self.layout, LAYOUTS), ("color", self.color, COLORS)):
            if value is not None and value not in choices:
                raise InputSpecError(f"{key}={value}: choose one of {', '.join(choices)}")
        if self.resize not in RESIZE_MODES:
            raise InputSpecError(f"resize={self.resize}: choose one of {', '.join(RESIZE_MODES)}")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise InputSpecError(f"scale={self.scale}: must be a positive number, like scale=1/255")
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))
        if not self.mean or not all(math.isfinite(value) for value in self.mean):
            raise InputSpecError(f"mean={self.mean}: give one finite number or one per channel")
        if not self.std or not all(math.isfinite(value) and value > 0 for value in self.std):
            raise InputSpecError(f"std={self.std}: give positive numbers, one or one per channel")
        if not 0 <= self.pad <= 255:
            raise InputSpecError(f"pad={self.pad}: a pixel value from 0 to 255")
        if not 0 < self.crop <= 1:
            raise InputSpecError(f"crop={self.crop}: the cropped share of the resized image, in (0, 1]")

    # -- text form, as the CLI takes it and the report prints it

    @classmethod
    def parse(cls, text: str) -> Preprocess:
        """Parse `key=value,...`: size=HxW (or one number for a square), layout, color, scale
        (a number or a fraction such as 1/255), mean and std (numbers separated by ':'),
        resize, pad, crop. Unnamed keys keep their defaults."""
        fields: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, separator, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not separator or not value:
                raise InputSpecError(f"--preprocess '{text}': '{item}' should be key=value, as in {PREPROCESS_EXAMPLE}")
            if key in fields:
                raise InputSpecError(f"--preprocess '{text}': '{key}' is given twice")
            try:
                fields[key] = _parse_field(key, value)
            except ValueError:
                raise InputSpecError(
                    f"--preprocess '{text}': {key}={value} is not valid ({_FIELD_HELP[key]})"
                ) from None
            except KeyError:
                raise InputSpecError(
                    f"--preprocess '{text}': unknown key '{key}' (known: {', '.join(_FIELD_HELP)})"
                ) from None
        try:
            return cls(**fields)
        except InputSpecError as error:
            raise InputSpecError(f"--preprocess '{text}': {error}") from None

    def __str__(self) -> str:
        parts = []
        if self.size is not None:
            parts.append(f"size={self.size[0]}x{self.size[1]}")
        if self.layout is not None:
            parts.append(f"layout={self.layout}")
        if self.color is not None:
            parts.append(f"color={self.color}")
        if self.scale is not None:
            parts.append(f"scale={_scale_text(self.scale)}")
        parts.append("mean=" + ":".join(_number_text(value) for value in self.mean))
        parts.append("std=" + ":".join(_number_text(value) for value in self.std))
        parts.append(f"resize={self.resize}")
        if self.resize == "letterbox":
            parts.append(f"pad={self.pad}")
        if self.resize == "center-crop" and self.crop != 1.0:
            parts.append(f"crop={_number_text(self.crop)}")
        return ",".join(parts)

    # -- against a model input

    def resolve(self, spec: InputSpec) -> Preprocess:
        """This preprocessing with every field the model decides filled in, checked against `spec`."""
        where = f"input '{spec.name}' {spec.shape_text()}"
        if spec.dims is None or len(spec.dims) != 4:
            raise InputSpecError(
                f"images feed rank-4 inputs (NCHW or NHWC), but {where} is not: give .npz samples instead"
            )
        if spec.dtype.kind not in "fiu":
            raise InputSpecError(f"images cannot feed {where} of dtype {spec.dtype.name}")
        layout = self.layout or _guess_layout(spec.dims)
        if layout is None:
            raise InputSpecError(
                f"cannot tell the channel axis of {where}: add layout=NCHW or layout=NHWC to --preprocess"
            )
        channel_axis, height_axis, width_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
        channels = spec.dims[channel_axis]
        if not isinstance(channels, int):
            channels = 1 if self.color == "GRAY" else 3
        if channels not in (1, 3):
            raise InputSpecError(f"{where} has {channels} channels in {layout}; images give 1 (GRAY) or 3 (RGB, BGR)")
        color = self.color or ("GRAY" if channels == 1 else "RGB")
        if (color == "GRAY") != (channels == 1):
            given = 1 if color == "GRAY" else 3
            raise InputSpecError(f"color={color} gives {given} channels, but {where} takes {channels} in {layout}")
        static = [spec.dims[axis] if isinstance(spec.dims[axis], int) else None for axis in (height_axis, width_axis)]
        size = self.size
        if size is None:
            if None in static:
                raise InputSpecError(f"{where} has a dynamic height or width: add size=HxW to --preprocess")
            size = (static[0], static[1])
        mismatch = [
            f"{label} is {fixed}, size gives {given}"
            for label, fixed, given in zip(("height", "width"), static, size)
            if fixed is not None and fixed != given
        ]
        if mismatch:
            raise InputSpecError(f"{where} in {layout}: " + "; ".join(mismatch))
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise InputSpecError(f"{key} has {len(values)} values, but {where} takes {channels} channel(s)")
        scale = self.scale if self.scale is not None else (1 / 255 if spec.dtype.kind == "f" else 1.0)
        # The largest value a pixel can become must be a float32 number, or calibration sees infinities.
        if (255 * scale + max(abs(value) for value in self.mean)) / min(self.std) >= float(np.finfo(np.float32).max):
            raise InputSpecError(
                f"scale={_number_text(scale)}, mean and std give pixel values beyond float32's range: "
                "check the std (a value, not its inverse)"
            )
        return dataclasses.replace(self, size=size, layout=layout, color=color, scale=scale)

    def apply(self, image) -> np.ndarray:
        """One PIL image as a float32 array of one resolved input without its batch axis (CHW or HWC)."""
        if self.size is None or self.layout is None or self.color is None or self.scale is None:
            raise UsageError("Preprocess.apply needs a resolved preprocessing: call resolve(spec) first")
        Image, ImageOps = _pillow()
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        image = self._resized(image.convert("L" if self.color == "GRAY" else "RGB"), Image)
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.color == "BGR":
            pixels = pixels[:, :, ::-1]
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        values = (pixels * np.float32(self.scale) - mean) / std
        if self.layout == "NCHW":
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values)

    def _resized(self, image, Image):
        height, width = self.size
        bilinear = Image.Resampling.BILINEAR
        if self.resize == "stretch":
            return image.resize((width, height), bilinear)
        if self.resize == "letterbox":
            ratio = min(width / image.width, height / image.height)
            inner = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
            fill = self.pad if image.mode == "L" else (self.pad,) * 3
            canvas = Image.new(image.mode, (width, height), fill)
            canvas.paste(image.resize(inner, bilinear), ((width - inner[0]) // 2, (height - inner[1]) // 2))
            return canvas
        ratio = max(width / image.width, height / image.height) / self.crop
        outer = (max(width, round(image.width * ratio)), max(height, round(image.height * ratio)))
        left, top = (outer[0] - width) // 2, (outer[1] - height) // 2
        return image.resize(outer, bilinear).crop((left, top, left + width, top + height))


_FIELD_HELP = {
    "size": "HxW or one number, like 224x224",
    "layout": "NCHW or NHWC",
    "color": "RGB, BGR or GRAY",
    "scale": "a number or a fraction, like 1/255",
    "mean": "numbers separated by ':', like 0.485:0.456:0.406",
    "std": "numbers separated by ':', like 0.229:0.224:0.225",
    "resize": "stretch, letterbox or center-crop",
    "pad": "a pixel value from 0 to 255",
    "crop": "a share in (0, 1], like 0.875",
}


def _parse_field(key: str, value: str):
    """Raises KeyError for an unknown key, ValueError for a malformed value."""
    if key == "size":
        sides = value.lower().split("x")
        if len(sides) == 1:
            sides = sides * 2
        if len(sides) != 2:
            raise ValueError(value)
        return tuple(int(side) for side in sides)
    if key in ("layout", "color"):
        return value.upper()
    if key == "resize":
        return value.lower()
    if key == "scale":
        numerator, slash, denominator = value.partition("/")
        if not slash:
            return float(value)
        if float(denominator) == 0:
            raise ValueError(value)
        return float(numerator) / float(denominator)
    if key in ("mean", "std"):
        return tuple(float(part) for part in value.split(":"))
    if key == "pad":
        return int(value)
    if key == "crop":
        return float(value)
    raise KeyError(key)


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _scale_text(scale: float) -> str:
    inverse = 1 / scale
    if inverse > 1 and abs(inverse - round(inverse)) < 1e-9 and 1 / round(inverse) == scale:
        return f"1/{round(inverse)}"
    return _number_text(scale)


def _guess_layout(dims: tuple) -> str | None:
    if dims[1] in (1, 3):
        return "NCHW"
    if dims[3] in (1, 3):
        return "NHWC"
    return None


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise UsageError(
            "reading images needs Pillow: pip install 'onnxslim[images]' (or pip install pillow), or give .npz samples"
        ) from None
    return Image, ImageOps


# ----------------------------------------------------------------------------- calibration data


@dataclass(frozen=True)
class Sample:
    """One calibration sample: a label for messages (file name) and how to load its feed."""

    label: str
    load: Callable[[], Feed]


class CalibrationData:
    """An ordered, lazily loaded sequence of samples; iterating yields one feed at a time.

    Build it with `from_path` (a folder or file: .npz, .npy or images), `from_feeds` (arrays in
    memory) or `random` (smoke tests only). Files are read in sorted name order and checked
    against the model when the data is built, so a bad file fails before a long calibration.
    """

    def __init__(self, samples: Sequence[Sample], *, source: str, synthetic: bool = False):
        self._samples = list(samples)
        self.source = source
        self.synthetic = synthetic

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Feed]:
        for sample in self._samples:
            yield sample.load()

    def __repr__(self) -> str:
        return f"CalibrationData({self.description})"

    @property
    def labels(self) -> list[str]:
        return [sample.label for sample in self._samples]

    @property
    def description(self) -> str:
        """What the report prints, e.g. '16 samples: images in calib/ (size=224x224,...)'."""
        return f"{len(self)} sample{'s' * (len(self) != 1)}: {self.source}"

    def limit(self, count: int | None) -> CalibrationData:
        """The first `count` samples (all of them for None)."""
        if count is None:
            return self
        if count < 1:
            raise InputSpecError(f"limit={count}: give a positive number of samples")
        return CalibrationData(self._samples[:count], source=self.source, synthetic=self.synthetic)

    def tail(self, count: int) -> CalibrationData:
        """The last `count` samples, as a view (they stay in this set too)."""
        if count < 1:
            raise InputSpecError(f"count={count}: give a positive number of samples")
        return CalibrationData(self._samples[-count:], source=f"the last {min(count, len(self))} of {self.source}", synthetic=self.synthetic)

    def split(self, held_out: int) -> tuple[CalibrationData, CalibrationData]:
        """(calibration, evaluation): the last `held_out` samples are kept apart for evaluation."""
        if not 0 <= held_out < len(self):
            raise InputSpecError(
                f"cannot hold out {held_out} of {len(self)} samples: at least one must remain for calibration"
            )
        cut = len(self) - held_out
        return (
            CalibrationData(self._samples[:cut], source=self.source, synthetic=self.synthetic),
            CalibrationData(self._samples[cut:], source=f"held out from {self.source}", synthetic=self.synthetic),
        )

    # -- builders

    @classmethod
    def from_path(
        cls,
        model: onnx.ModelProto | str | Path,
        path: str | Path,
        *,
        preprocess: Preprocess | str | None = None,
        limit: int | None = None,
    ) -> CalibrationData:
        """Samples from a folder (its own files, not subfolders; hidden files skipped) or one
        file: .npz, .npy or images (png, jpg, jpeg, bmp). A folder holds one kind."""
        path = Path(path)
        try:
            status = path.stat()
        except FileNotFoundError:
            raise InputSpecError(f"calibration data not found: {path}") from None
        except OSError as error:  # a name too long, a loop of links
            raise InputSpecError(f"cannot read calibration data {path}: {error.strerror or error}") from error
        if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode)):  # a FIFO blocks, /dev/zero never ends
            raise InputSpecError(f"calibration data {path} is not a regular file or a folder")
        files = [path] if path.is_file() else _listing(path)
        kinds = {_kind(file) for file in files} - {None}
        if not kinds:
            seen = ", ".join(sorted({file.suffix or file.name for file in files})[:8]) or "nothing"
            raise InputSpecError(f"{path} holds no .npz, .npy or image files (found: {seen})")
        if len(kinds) > 1:
            raise InputSpecError(f"{path} mixes {' and '.join(sorted(kinds))} files: keep one kind per folder")
        kind = kinds.pop()
        files = [file for file in files if _kind(file) == kind]
        if kind != "image" and preprocess is not None:
            raise InputSpecError(f"--preprocess applies to images, but {path} holds {kind} files")
        builders = {"npz": cls.from_npz, "npy": cls.from_npy, "image": partial(cls.from_images, preprocess=preprocess)}
        builder = builders[kind]
        return builder(model, files, limit=limit, source_name=str(path))

    @classmethod
    def from_npz(
        cls, model, files: Sequence[str | Path], *, limit: int | None = None, source_name: str | None = None
    ) -> CalibrationData:
        """One sample per .npz file, one array per input name."""
        model = load(model, check=False)
        specs = input_specs(model)
        files = sorted((Path(file) for file in files), key=lambda file: file.name)
        samples = []
        for file in files:
            _check_arrays(str(file), _npz_headers(file), specs)
            samples.append(Sample(str(file), partial(_load_npz, file)))
        return cls._built(samples, f".npz files in {source_name or _common_folder(files)}", limit, screen=True)

    @classmethod
    def from_npy(
        cls, model, files: Sequence[str | Path], *, limit: int | None = None, source_name: str | None = None
    ) -> CalibrationData:
        """Samples of a single-input model from .npy files: an array of the input's rank is one
        sample; one more leading axis stacks several (read one at a time, memory-mapped)."""
        model = load(model, check=False)
        specs = input_specs(model)
        if len(specs) != 1:
            raise InputSpecError(
                f".npy files feed single-input models; this one has inputs {', '.join(spec.name for spec in specs)}: "
                "save one .npz per sample, one array per input name"
            )
        spec = specs[0]
        files = sorted((Path(file) for file in files), key=lambda file: file.name)
        samples: list[Sample] = []
        for file in files:
            shape, dtype = _npy_header(file)
            stacked = spec.dims is not None and len(shape) == len(spec.dims) + 1
            if stacked:
                _check_arrays(f"{file} (a stack of {shape[0]} samples)", {spec.name: (shape[1:], dtype)}, specs)
                samples += [
                    Sample(f"{file}[{index}]", partial(_load_npy, file, spec.name, index)) for index in range(shape[0])
                ]
            else:
                _check_arrays(str(file), {spec.name: (shape, dtype)}, specs)
                samples.append(Sample(str(file), partial(_load_npy, file, spec.name, None)))
        return cls._built(samples, f".npy files in {source_name or _common_folder(files)}", limit, screen=True)

    @classmethod
    def from_images(
        cls,
        model,
        files: Sequence[str | Path],
        *,
        preprocess: Preprocess | str | None = None,
        limit: int | None = None,
        source_name: str | None = None,
    ) -> CalibrationData:
        """Samples of a single-input image model: each image preprocessed (see Preprocess); a
        static batch of N > 1 takes N consecutive images per sample."""
        Image, _ = _pillow()
        model = load(model, check=False)
        specs = input_specs(model)
        if len(specs) != 1:
            raise InputSpecError(
                f"images feed single-input models; this one has inputs {', '.join(spec.name for spec in specs)}: "
                "save one .npz per sample, one array per input name"
            )
        spec = specs[0]
        if isinstance(preprocess, str):
            preprocess = Preprocess.parse(preprocess)
        resolved = (preprocess or Preprocess()).resolve(spec)
        batch = spec.dims[0] if isinstance(spec.dims[0], int) else 1
        files = sorted((Path(file) for file in files), key=lambda file: file.name)
        if limit:
            files = files[: limit * batch]
        for file in files:
            _check_image(file, Image)
        groups = [files[start : start + batch] for start in range(0, len(files) - batch + 1, batch)]
        samples = [Sample(", ".join(map(str, group)), partial(_load_images, group, spec, resolved)) for group in groups]
        left = len(files) - batch * len(groups)
        source = f"images in {source_name or _common_folder(files)} ({resolved})"
        if left:
            source += f"; the last {left} image(s) do not fill a batch of {batch} and are unused"
        return cls._built(samples, source, limit)

    @classmethod
    def from_feeds(cls, model, feeds: Iterable[Feed], *, source: str = "feeds given in memory") -> CalibrationData:
        """Samples already in memory, one feed (input name -> array) each, checked against the model."""
        specs = input_specs(load(model, check=False))
        samples = []
        for index, feed in enumerate(feeds):
            feed = {name: np.asarray(value) for name, value in feed.items()}
            _check_arrays(f"sample {index}", {name: (value.shape, value.dtype) for name, value in feed.items()}, specs)
            samples.append(Sample(f"sample {index}", partial(dict, feed)))
        return cls._built(samples, source, None, screen=True)

    @classmethod
    def random(
        cls,
        model,
        shapes: dict[str, Sequence[int]] | None = None,
        count: int = DEFAULT_RANDOM_SAMPLES,
        seed: int = 0,
    ) -> CalibrationData:
        """Seeded random samples (normal floats, 0/1 integers), for smoke tests only: ranges
        calibrated on them do not fit real inputs, so this warns through the `onnxslim` logger.
        Dynamic dims come from `shapes` ({input name: dims}); a dynamic batch defaults to 1."""
        model = load(model, check=False)
        if count < 1:
            raise InputSpecError(f"count={count}: give a positive number of random samples")
        if count > MAX_RANDOM_SAMPLES:
            raise InputSpecError(f"{count:,} random calibration samples: random data is for smoke tests, "
                                 f"give at most {MAX_RANDOM_SAMPLES:,} (--calibration-limit)")
        resolved, _ = random_shapes(input_specs(model), dict(shapes or {}))
        logger.warning(
            "CALIBRATING ON RANDOM DATA (%d samples, seed %d): the ranges will not fit real inputs and the "
            "quantized model's accuracy means nothing; use this for smoke tests only and give real samples "
            "(.npz files or images) for a model you deploy",
            count,
            seed,
        )
        samples = [
            Sample(f"random sample {index}", partial(_random_feed, model, resolved, seed + index))
            for index in range(count)
        ]
        return cls(samples, source=f"RANDOM data (seed {seed}), for smoke tests only", synthetic=True)

    @classmethod
    def _built(cls, samples: list[Sample], source: str, limit: int | None, *, screen: bool = False) -> CalibrationData:
        """The first `limit` samples (all for None); with `screen`, each is loaded once and one
        holding a NaN or an infinity is skipped with a warning naming it (see _finite_samples)."""
        if limit is not None and limit < 1:
            raise InputSpecError(f"limit={limit}: give a positive number of samples")
        if not samples:
            raise InputSpecError(f"no calibration samples in {source}")
        if not screen:
            return cls(samples[:limit] if limit else samples, source=source)
        kept, skipped = _finite_samples(samples, source, limit)
        if skipped:
            source += f"; {skipped} skipped for NaN or infinite values"
        return cls(kept, source=source)


# Without samples held out, fidelity is measured on this many of the last calibration samples.
EVALUATION_SAMPLES = 8


def fidelity_split(data: CalibrationData | None, held_out: int):
    """(the samples to calibrate or fit on, the samples fidelity is measured on): with held_out > 0
    the last samples are kept apart; otherwise all samples serve and the last EVALUATION_SAMPLES
    of them also measure fidelity."""
    if data is None:
        return None, None
    if held_out > 0:
        return data.split(held_out)
    if len(data) <= EVALUATION_SAMPLES:
        return data, data
    return data, data.tail(EVALUATION_SAMPLES)


def _listing(folder: Path) -> list[Path]:
    files = [entry for entry in folder.iterdir() if entry.is_file() and not entry.name.startswith(".")]
    return sorted(files, key=lambda entry: entry.name)


def _kind(file: Path) -> str | None:
    suffix = file.suffix.lower()
    if suffix == NPZ_SUFFIX:
        return "npz"
    if suffix == NPY_SUFFIX:
        return "npy"
    return "image" if suffix in IMAGE_SUFFIXES else None


def _common_folder(files: Sequence[Path]) -> str:
    folders = {str(file.parent) for file in files}
    return folders.pop() if len(folders) == 1 else "several folders"


def nonfinite_problem(feed: Feed) -> str | None:
    """What in a feed is not a finite number ('x' holds 2 NaN and 1 infinite value), or None."""
    problems = []
    for name, array in feed.items():
        array = np.asarray(array)
        if array.dtype.kind not in "fc" or array.size == 0:
            continue
        finite = np.isfinite(array)
        if finite.all():
            continue
        nans = int(np.count_nonzero(np.isnan(array)))
        infinite = int(array.size - np.count_nonzero(finite)) - nans
        counts = [f"{nans} NaN"] * bool(nans) + [f"{infinite} infinite value{'s' * (infinite != 1)}"] * bool(infinite)
        problems.append(f"'{name}' holds {' and '.join(counts)}")
    return "; ".join(problems) or None


def check_finite_outputs(outputs: Sequence[dict[str, np.ndarray]], labels: Sequence[str]) -> None:
    """Fidelity is measured on finite outputs: a sample on which the float model itself gives a
    NaN or an infinity (its values overflow) can measure nothing, and is the data's fault."""
    for values, label in zip(outputs, labels):
        problem = nonfinite_problem({name: value for name, value in values.items() if isinstance(value, np.ndarray)})
        if problem is not None:
            raise InputSpecError(
                f"calibration sample {label}: the float model's output {problem} on it, so no fidelity can be "
                "measured there: leave the sample out or check what the model expects"
            )


def _finite_samples(samples: list[Sample], source: str, limit: int | None) -> tuple[list[Sample], int]:
    """(the first `limit` samples whose arrays are all finite, how many were skipped).

    One NaN or infinity in a sample flows through every activation of the model: a range, a
    bias correction or a refit computed from it would be NaN, and so would the model built
    from them. Such a sample is skipped, named in one warning line; when none is left, that is
    the data's fault (InputSpecError, naming the first).
    """
    kept, skipped = [], []
    for sample in samples:
        if limit and len(kept) >= limit:
            break
        problem = nonfinite_problem(sample.load())
        if problem is None:
            kept.append(sample)
        else:
            skipped.append(f"{sample.label} ({problem})")
    if not kept:
        raise InputSpecError(
            f"no usable calibration sample in {source}: every one holds NaN or infinite values (first: {skipped[0]})"
        )
    if skipped:
        shown = ", ".join(skipped[:SKIPPED_SHOWN]) + (f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else "")
        logger.warning(
            "calibration: %d sample%s skipped for NaN or infinite values (calibration takes finite numbers only): %s",
            len(skipped), "s" * (len(skipped) != 1), shown,
        )
    return kept, len(skipped)


def _npz_headers(file: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """Name -> (shape, dtype) of every array in an .npz file, read from the headers only."""
    headers = {}
    try:
        with zipfile.ZipFile(file) as archive:
            for member in archive.infolist():
                name = member.filename[: -len(NPY_SUFFIX)] if member.filename.endswith(NPY_SUFFIX) else member.filename
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
                    else:  # format 3.0 (utf-8 field names) has no public header reader
                        array = np.lib.format.read_array(stream, allow_pickle=False)
                        shape, dtype = array.shape, array.dtype
                headers[name] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputSpecError(f"{file}: not a readable .npz file ({_first_line(error)})") from error
    return headers


def _load_npz(file: Path) -> Feed:
    try:
        with np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputSpecError(f"{file}: not a readable .npz file ({_first_line(error)})") from error


def _npy_header(file: Path) -> tuple[tuple, np.dtype]:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputSpecError(f"{file}: not a readable .npy file ({_first_line(error)})") from error
    return tuple(array.shape), array.dtype


def _load_npy(file: Path, name: str, index: int | None) -> Feed:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputSpecError(f"{file}: not a readable .npy file ({_first_line(error)})") from error
    # A copy of one sample only: the memory map keeps the rest of a stack on disk.
    return {name: np.array(array if index is None else array[index])}


def _check_image(file: Path, Image) -> None:
    """Read the header only: a file that is not an image fails now, not halfway through calibration."""
    try:
        with Image.open(file):
            pass  # opening parses the header; the pixels are decoded when the sample is used
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputSpecError(f"{file}: not a readable image ({_first_line(error)})") from error


def _load_images(files: Sequence[Path], spec: InputSpec, preprocess: Preprocess) -> Feed:
    Image, _ = _pillow()
    arrays = []
    for file in files:
        try:
            with Image.open(file) as image:
                arrays.append(preprocess.apply(image))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise InputSpecError(f"{file}: not a readable image ({_first_line(error)})") from error
    batch = np.stack(arrays)
    if spec.dtype.kind in "iu":
        limits = np.iinfo(spec.dtype)
        batch = np.clip(np.rint(batch), limits.min, limits.max)
    return {spec.name: batch.astype(spec.dtype)}


def random_shapes(
    specs: list[InputSpec], given: dict[str, Sequence[int]], option: str = "shapes"
) -> tuple[dict[str, list[int]], list[str]]:
    """(dims of every input, notes) for random inputs: `given` dims (checked against the model),
    static dims, a dynamic batch (axis 0) set to 1 (noted); any other dynamic dim is an error that
    says how to give it with `option` (the caller's name for `given`, e.g. --input-shape)."""
    unknown = set(given) - {spec.name for spec in specs}
    if unknown:
        raise InputSpecError(
            f"{option} names {', '.join(sorted(unknown))}, but the model's inputs are "
            f"{', '.join(spec.name for spec in specs)}"
        )
    resolved, notes = {}, []
    for spec in specs:
        if spec.name in given:
            dims = [int(dim) for dim in given[spec.name]]
            problems = spec.problems(tuple(dims), spec.dtype)
            if problems:
                raise InputSpecError(f"{option} {spec.name}: {'; '.join(problems)}")
            resolved[spec.name] = dims
            continue
        if spec.dims is None:
            raise InputSpecError(f"input '{spec.name}' has no stated shape: give it with {option} {spec.name}:DIMS")
        dims = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(1)
                notes.append(f"input '{spec.name}': dynamic batch dim '{dim}' set to 1")
            else:
                example = ",".join(str(d) if isinstance(d, int) else ("1" if i == 0 else "N") for i, d in enumerate(spec.dims))
                raise InputSpecError(
                    f"input '{spec.name}' {spec.shape_text()} has a dynamic dim {axis} ('{dim}'): "
                    f"give its size with {option} {spec.name}:{example}"
                )
        resolved[spec.name] = dims
    return resolved, notes


def _random_feed(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int) -> Feed:
    return synthesize_inputs(model, shapes, samples=1, seed=seed)[0]


# ----------------------------------------------------------------------------- activation capture

Reducer = Callable[[str, np.ndarray], None]


def capture_activations(
    model: onnx.ModelProto | str | Path,
    data: Iterable[Feed],
    tensors: Iterable[str],
    *,
    reduce: Reducer | Sequence[Reducer],
    progress: Callable[[int, int | None], None] | None = None,
    threads: int = 0,
) -> int:
    """Run every sample and call `reduce(name, value)` for each requested tensor, one sample at
    a time; returns the number of samples run.

    Tensors are named as in the model's main graph (node outputs or graph inputs; not
    initializers, not tensors inside If/Loop/Scan bodies). onnxruntime runs on the CPU with its
    graph optimizations disabled (they could fuse away the tensors asked for). Memory holds one
    sample's requested values at a time. `progress(done, total)` is called before the first
    sample and after each one (total is None for data without a length).
    """
    model = load(model, check=False)
    reducers = [reduce] if callable(reduce) else list(reduce)
    names = list(dict.fromkeys(tensors))
    exposed, fed = _locate(model, names)
    runner = _calibration_runner(model, exposed, threads) if exposed else None
    total = len(data) if hasattr(data, "__len__") else None
    if progress is not None:
        progress(0, total)
    done = 0
    for feed in data:
        if not isinstance(data, CalibrationData):
            check_feed(model, feed)
        values = dict(zip(exposed, _run(runner, exposed, feed))) if runner is not None else {}
        for name in names:
            value = values[name] if name in values else feed[name]
            for reducer in reducers:
                reducer(name, value)
        del values  # drop this sample's activations before the next sample runs
        done += 1
        if progress is not None:
            progress(done, total)
    return done


def _locate(model: onnx.ModelProto, names: list[str]) -> tuple[list[str], list[str]]:
    """Split the requested names into tensors to expose as outputs and graph inputs (taken from the feed)."""
    graph = model.graph
    produced = {output for node in graph.node for output in node.output if output}
    inputs = {value.name for value in model_inputs(model)}
    initializers = {tensor.name for tensor in graph.initializer}
    exposed, fed = [], []
    for name in names:
        if name in produced:
            exposed.append(name)
        elif name in inputs:
            fed.append(name)
        elif name in initializers:
            raise UsageError(f"'{name}' is an initializer (a constant), not an activation: nothing to calibrate")
        else:
            raise UsageError(
                f"no tensor '{name}' in the model's main graph (tensors inside If/Loop/Scan bodies cannot be captured)"
            )
    return exposed, fed


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names`, typed from value_info where known (a
    stale shape there only makes onnxruntime warn; untyped outputs it infers)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {value.name for value in copy.graph.output}
    known = {value.name: value for value in copy.graph.value_info}
    for name in names:
        if name not in present:
            copy.graph.output.append(known[name] if name in known else onnx.ValueInfoProto(name=name))
    return copy


def _calibration_runner(model: onnx.ModelProto, names: list[str], threads: int) -> Runner:
    try:
        return Runner(_with_outputs(model, names), label="model to calibrate", threads=threads)
    except RuntimeFailure:
        raise  # a crash, a time-out or an allocation failure says so itself
    except VerificationUnavailable as error:  # said of the model as this step sees it
        cause = error.__cause__ or error
        message = f"onnxruntime cannot load the model to calibrate: {_first_line(cause)}"
        raise VerificationUnavailable(message) from cause


def _run(runner: Runner, names: list[str], feed: Feed) -> list[np.ndarray]:
    return runner.session.run(names, feed)  # its errors name the model to calibrate


# ----------------------------------------------------------------------------- observers


# Values beyond this magnitude (float64 only) count as not finite: no float32 scale reaches
# them, and the span between two of them would overflow the histogram's arithmetic.
HUGE = 1e300


def _finite(array: np.ndarray) -> tuple[np.ndarray, int]:
    """The finite values of `array`, flattened, and how many were not finite."""
    flat = np.asarray(array).ravel()
    if flat.dtype == np.float16:
        flat = flat.astype(np.float32)
    elif flat.dtype == np.bool_:
        flat = flat.astype(np.uint8)
    if flat.size == 0 or flat.dtype.kind not in "f":
        return flat, 0
    # min and max are NaN or out of bounds exactly when some value is: one cheap pass before masking
    if -HUGE <= float(flat.min()) and float(flat.max()) <= HUGE:
        return flat, 0
    mask = np.isfinite(flat)
    if flat.dtype == np.float64:
        mask &= np.abs(flat) <= HUGE
    return flat[mask], int(flat.size - np.count_nonzero(mask))


class MinMaxObserver:
    """A reducer keeping each tensor's running (min, max) over finite values."""

    def __init__(self):
        self.ranges: dict[str, tuple[float, float]] = {}

    def __call__(self, name: str, array: np.ndarray) -> None:
        values, _ = _finite(array)
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if name in self.ranges:
            old_low, old_high = self.ranges[name]
            low, high = min(low, old_low), max(high, old_high)
        self.ranges[name] = (low, high)


class Histogram:
    """Counts of one tensor's finite values in `bins` equal bins from `start`, with the exact
    min, max, number of exact zeros (quantization represents 0 exactly) and of non-finite values.

    The range widens as values arrive: by an integer factor k, with the old edges kept on the
    new grid, so every new bin is the union of k whole old bins and counts move exactly.
    """

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 16:
            raise UsageError(f"bins={bins}: a histogram needs at least 16 bins")
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.start = 0.0
        self.width = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.zeros = 0
        self.nonfinite = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def end(self) -> float:
        return self.start + self.bins * self.width

    @property
    def edges(self) -> np.ndarray:
        return self.start + self.width * np.arange(self.bins + 1, dtype=np.float64)

    def add(self, array: np.ndarray) -> None:
        values, nonfinite = _finite(array)
        self.nonfinite += nonfinite
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if self.width == 0.0:
            self._start_at(low, high)
        else:
            self._cover(low, high)
        self.min, self.max = min(self.min, low), max(self.max, high)
        self.zeros += int(values.size - np.count_nonzero(values))
        # Binned in float64 by hand: np.histogram bins in the data's own dtype and refuses a
        # range whose bins float32 cannot tell apart (a constant activation, or 3e38 next to 1).
        index = np.floor((values.astype(np.float64) - self.start) / self.width)
        self.counts += np.bincount(np.clip(index, 0, self.bins - 1).astype(np.int64), minlength=self.bins)

    def _start_at(self, low: float, high: float) -> None:
        if high > low:
            self.start, self.width = low, (high - low) / self.bins
        else:  # a constant so far: a tiny range around it, widened when other values come
            self.width = max(abs(low), 1.0) * 1e-6 / self.bins
            self.start = low - self.width * (self.bins // 2)
        while self.end < high:  # (high - low) / bins * bins can round below high
            self.width = float(np.nextafter(self.width, math.inf))

    def _cover(self, low: float, high: float) -> None:
        if low >= self.start and high <= self.end:
            return
        if self.min == self.max:  # one value so far: start over on the wider range, it fits one bin
            count, value = self.total, self.min
            self.width = 0.0
            self._start_at(min(low, value), max(high, value))
            self.counts[:] = 0
            self.counts[min(int((value - self.start) // self.width), self.bins - 1)] = count
            return
        new_low, new_high = min(low, self.start), max(high, self.end)
        shift = max(0, math.ceil((self.start - new_low) / self.width))  # old-width bins added below
        while self.start - shift * self.width > new_low:  # rounding
            shift += 1
        new_start = self.start - shift * self.width
        # k must make bins * k * width cover the new span plus up to one old bin of alignment
        factor = max(2, math.ceil(((new_high - new_low) / self.width + 1) / self.bins))
        while shift + self.bins > self.bins * factor or new_start + self.bins * factor * self.width < new_high:
            factor += 1
        merged = np.zeros(self.bins, np.int64)
        if shift + self.bins < 2**62 and factor < 2**62:
            positions = (shift + np.arange(self.bins, dtype=np.int64)) // factor
        else:  # a range grown by more than 2^62 (3e38 after a constant): Python's integers do it
            positions = np.array([(shift + index) // factor for index in range(self.bins)], np.int64)
        np.add.at(merged, positions, self.counts)
        self.counts, self.start, self.width = merged, new_start, self.width * factor

    def cdf(self, points) -> np.ndarray:
        """How many values lie below each point, taking values as spread evenly within a bin."""
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts, dtype=np.float64)])
        return np.interp(points, self.edges, cumulative)

    def quantile(self, share: float) -> float:
        """The value below which `share` (0..1) of the values lie, within [min, max]."""
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts, dtype=np.float64)])
        value = float(np.interp(share * cumulative[-1], cumulative, self.edges))
        return min(max(value, self.min), self.max)


class HistogramObserver:
    """A reducer keeping one Histogram per tensor, for the percentile, entropy and MSE range methods."""

    def __init__(self, bins: int = DEFAULT_BINS):
        self.bins = bins
        self.histograms: dict[str, Histogram] = {}

    def __call__(self, name: str, array: np.ndarray) -> None:
        if name not in self.histograms:
            self.histograms[name] = Histogram(self.bins)
        self.histograms[name].add(array)


# ----------------------------------------------------------------------------- range methods
#
# Each takes a Histogram and returns the clipping range (low, high) as floats; with
# symmetric=True it is (-t, t). The range may exclude 0: making 0 exactly representable
# (zero point) is the quantizer's job. `levels` is the number of quantized values (256: 8 bits).


def minmax_range(histogram: Histogram, *, symmetric: bool = False) -> tuple[float, float]:
    """The observed min and max: nothing clipped, so outliers stretch the step for everyone."""
    if histogram.total == 0:
        return 0.0, 0.0
    if symmetric:
        bound = max(abs(histogram.min), abs(histogram.max))
        return -bound, bound
    return histogram.min, histogram.max


def percentile_range(
    histogram: Histogram, *, percentile: float = 99.99, symmetric: bool = False
) -> tuple[float, float]:
    """Clip the rarest values: keep [the (100 - p)th, the pth] percentile (of |x| when symmetric)."""
    if not 50 < percentile <= 100:
        raise UsageError(f"percentile={percentile}: give a value in (50, 100], like 99.99")
    if histogram.total == 0:
        return 0.0, 0.0
    if symmetric:
        counts, top = _absolute_counts(histogram)
        cumulative = np.concatenate([[0.0], np.cumsum(counts)])
        bound = float(np.interp(percentile / 100 * cumulative[-1], cumulative, np.linspace(0.0, top, len(counts) + 1)))
        return -bound, bound
    return histogram.quantile(1 - percentile / 100), histogram.quantile(percentile / 100)


def entropy_range(histogram: Histogram, *, symmetric: bool = False, levels: int = 256) -> tuple[float, float]:
    """TensorRT's entropy calibration: the threshold t on |x| whose quantized distribution (t
    split into the levels one side gets) loses the least information, by KL divergence."""
    if histogram.total == 0:
        return 0.0, 0.0
    counts, top = _absolute_counts(histogram)
    if top == 0:
        return 0.0, 0.0
    one_sided = histogram.min >= 0 or histogram.max <= 0
    # a one-sided asymmetric range spends all levels on one side; otherwise each side gets half
    quantized = levels if one_sided and not symmetric else levels // 2
    bound = top * _kl_threshold(counts, quantized) / len(counts)
    if one_sided:
        # Values all far from 0 (a constant activation) can put the threshold below the smallest
        # of them, which would clip every value: it stays at least that value.
        bound = max(bound, histogram.min if histogram.min >= 0 else -histogram.max)
    if symmetric:
        return -bound, bound
    return max(histogram.min, -bound), min(histogram.max, bound)


def mse_range(histogram: Histogram, *, symmetric: bool = False, levels: int = 256) -> tuple[float, float]:
    """The range whose quantizer gives the least expected squared error over the histogram.

    The quantizer is what runs: a scale s and an integer zero point z (0 is exact), values
    rounded to the grid and clipped to [-z·s, (levels-1-z)·s]. Its error is exact for values
    spread evenly within each bin (exact zeros count as exact), so a step much coarser than
    the histogram's bins is judged by what rounding really does, not by the step²/12 rule.
    Searched coarse to fine: s from 1e-4 to 1 times the min-max step, z over every integer.
    """
    if histogram.total == 0 or histogram.min == histogram.max == 0:
        return 0.0, 0.0
    top = levels - 1
    if symmetric:
        zero_points, full_scale = np.array([levels // 2]), 2 * max(-histogram.min, histogram.max) / top
    elif histogram.min >= 0:
        zero_points, full_scale = np.array([0]), histogram.max / top
    elif histogram.max <= 0:
        zero_points, full_scale = np.array([top]), -histogram.min / top
    else:
        zero_points, full_scale = np.arange(levels), (histogram.max - histogram.min) / top
    scale, zero_point = _search_quantizer(_quantization_error(histogram, levels), full_scale, zero_points)
    if symmetric:
        return -scale * top / 2, scale * top / 2
    return -zero_point * scale, (top - zero_point) * scale


def _search_quantizer(error, full_scale: float, zero_points: np.ndarray) -> tuple[float, int]:
    """The (scale, zero point) of least error: a geometric grid of scales and every 16th zero point,
    then a fine grid between the best scale's neighbours and around the best zero point."""
    fractions = np.geomspace(1e-4, 1.0, 64)
    coarse_zero_points = zero_points[:: max(1, len(zero_points) // 16)]
    scales, points = np.meshgrid(full_scale * fractions, coarse_zero_points)
    best = int(np.argmin(error(scales.ravel(), points.ravel())))
    fraction_index, zero_point = best % len(fractions), int(points.ravel()[best])
    below, above = fractions[max(fraction_index - 1, 0)], fractions[min(fraction_index + 1, len(fractions) - 1)]
    fine_scales = full_scale * np.linspace(below, above, 33)
    reach = max(1, len(zero_points) // 16)
    fine_zero_points = zero_points[np.abs(zero_points - zero_point) <= reach]
    scales, points = np.meshgrid(fine_scales, fine_zero_points)
    scales, points = scales.ravel(), points.ravel()
    best = int(np.argmin(error(scales, points)))
    return float(scales[best]), int(points[best])


def _quantization_error(histogram: Histogram, levels: int):
    """A function of (scales, zero points) arrays: the summed squared error of quantizing the
    histogram's values with each pair (see mse_range)."""
    counts = histogram.counts.astype(np.float64)
    width = histogram.width
    if histogram.zeros and histogram.start <= 0 <= histogram.end:
        zero_bin = min(int((0 - histogram.start) // width), histogram.bins - 1)
        counts[zero_bin] = max(counts[zero_bin] - histogram.zeros, 0.0)  # exact zeros quantize exactly
    below, above = _clip_errors(histogram.start, width, counts)
    used = np.flatnonzero(counts)
    edges = histogram.edges
    left, right, density = edges[used], edges[used + 1], counts[used] / width

    def error(scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
        low, high = -zero_points * scales, (levels - 1 - zero_points) * scales
        total = below(low) + above(high)
        for start in range(0, len(scales), 256):  # 256 candidates at a time keep the matrices small
            chunk = slice(start, start + 256)
            scale, zero_point = scales[chunk, None], zero_points[chunk, None]
            bin_low = np.clip(left, low[chunk, None], high[chunk, None]) / scale + zero_point
            bin_high = np.clip(right, low[chunk, None], high[chunk, None]) / scale + zero_point
            rounding = (_rounding_integral(bin_high) - _rounding_integral(bin_low)) @ density
            total[chunk] += scales[chunk] ** 3 * rounding
        return total

    return error


def _rounding_integral(u: np.ndarray) -> np.ndarray:
    """An antiderivative of (u - round(u))²: 1/12 per whole step plus the part of the last one."""
    shifted = u + 0.5
    steps = np.floor(shifted)
    offset = shifted - steps - 0.5
    return steps / 12 + (offset**3 + 0.125) / 3


RANGE_METHODS: dict[str, Callable[..., tuple[float, float]]] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "entropy": entropy_range,
    "mse": mse_range,
}


def range_method(name: str) -> Callable[..., tuple[float, float]]:
    """The range function registered as `name` (minmax, percentile, entropy, mse)."""
    if name not in RANGE_METHODS:
        raise UsageError(f"unknown calibration method '{name}': choose one of {', '.join(RANGE_METHODS)}")
    return RANGE_METHODS[name]


def calibrate_ranges(
    model: onnx.ModelProto | str | Path,
    data: Iterable[Feed],
    tensors: Iterable[str],
    *,
    method: str = "minmax",
    symmetric: bool = False,
    bins: int = DEFAULT_BINS,
    progress: Callable[[int, int | None], None] | None = None,
    **options,
) -> dict[str, tuple[float, float]]:
    """Each tensor's clipping range by `method` over all samples: capture_activations with a
    MinMaxObserver for minmax (no histogram needed), a HistogramObserver otherwise. A tensor
    that never held a finite value is left out."""
    function = range_method(method)
    if method == "minmax" and not options:
        observer = MinMaxObserver()
        capture_activations(model, data, tensors, reduce=observer, progress=progress)
        if symmetric:
            return {name: (-max(-low, high), max(-low, high)) for name, (low, high) in observer.ranges.items()}
        return dict(observer.ranges)
    histograms = HistogramObserver(bins)
    capture_activations(model, data, tensors, reduce=histograms, progress=progress)
    return _ranges(histograms, partial(function, symmetric=symmetric, **options))


def calibrate_range_sets(
    model: onnx.ModelProto | str | Path,
    data: Iterable[Feed],
    tensors: Iterable[str],
    methods: Sequence[str],
    *,
    symmetric: bool = False,
    bins: int = DEFAULT_BINS,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, dict[str, tuple[float, float]]]:
    """{method: ranges} for several methods from one pass over the samples (one histogram per tensor)."""
    functions = {method: range_method(method) for method in methods}
    histograms = HistogramObserver(bins)
    capture_activations(model, data, tensors, reduce=histograms, progress=progress)
    return {method: _ranges(histograms, partial(function, symmetric=symmetric)) for method, function in functions.items()}


def _ranges(histograms: HistogramObserver, function) -> dict[str, tuple[float, float]]:
    """{tensor: function(its histogram)} for every tensor that held a finite value. A range that
    comes out NaN, infinite or upside down (a bug in a method, never data) is left out: that
    tensor stays float rather than get a scale of NaN."""
    ranges = {}
    for name, histogram in histograms.histograms.items():
        if not histogram.total:
            continue
        low, high = (float(bound) for bound in function(histogram))
        if math.isfinite(low) and math.isfinite(high) and low <= high:
            ranges[name] = (low, high)
        else:
            logger.warning("calibration: tensor '%s' got the range (%g, %g); it stays float", name, low, high)
    return ranges


def _absolute_counts(histogram: Histogram) -> tuple[np.ndarray, float]:
    """The histogram of |x| over [0, max |x|] in as many bins (float counts, spread evenly within bins)."""
    top = max(-histogram.min, histogram.max, 0.0)
    edges = np.linspace(0.0, top, histogram.bins + 1)
    positive = np.diff(histogram.cdf(edges))
    negative = -np.diff(histogram.cdf(-edges))
    return np.maximum(positive + negative, 0.0), top


def _kl_threshold(counts: np.ndarray, quantized: int) -> int:
    """The number of |x| bins to keep (TensorRT): for each candidate i, P is counts[:i] with the
    clipped mass added to its last bin; Q merges counts[:i] into `quantized` levels and spreads
    each level evenly over its non-empty bins. The i with the smallest KL(P || Q) wins; every
    stride-th i is tried, then every i around the best."""
    size = len(counts)
    if size <= quantized:
        return size
    outside = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # outside[i] = counts[i:].sum()

    def divergence(keep: int) -> float:
        kept = counts[:keep]
        reference = kept.copy()
        reference[-1] += outside[keep]
        starts = (np.arange(quantized) * keep) // quantized
        nonempty = kept > 0
        level_mass = np.add.reduceat(kept, starts)
        level_bins = np.add.reduceat(nonempty.astype(np.float64), starts)
        per_bin = np.divide(level_mass, level_bins, out=np.zeros_like(level_mass), where=level_bins > 0)
        candidate = np.repeat(per_bin, np.diff(np.append(starts, keep))) * nonempty
        return _kl_divergence(reference, candidate)

    stride = max(1, (size - quantized) // 128)
    coarse = [*range(quantized, size, stride), size]
    best = min(coarse, key=divergence)
    fine = range(max(quantized, best - stride + 1), min(size, best + stride - 1) + 1)
    return min([best, *fine], key=divergence)


def _kl_divergence(reference: np.ndarray, candidate: np.ndarray, floor: float = 1e-4) -> float:
    reference_total, candidate_total = reference.sum(), candidate.sum()
    if reference_total <= 0 or candidate_total <= 0:
        return math.inf
    p, q = reference / reference_total, candidate / candidate_total
    used = p > 0
    # Q is empty where P is not when clipped mass lands on an empty last bin: a large, finite penalty
    q = np.where(q[used] > 0, q[used], floor * p[used].min())
    return float(np.sum(p[used] * np.log(p[used] / q)))


def _clip_errors(start: float, width: float, counts: np.ndarray):
    """Functions of threshold arrays: the summed squared clipping error of the values below a
    low threshold and above a high one, over bins from `start` of `width` holding `counts`.

    A bin j with center m_j wholly clipped at t contributes c_j·((m_j − t)² + width²/12) (values
    spread evenly within it), so whole bins sum by prefix sums of c, c·m and c·m²; the bin that
    contains t contributes c/width · (distance from t to its far edge)³ / 3.
    """
    bins = len(counts)
    origin = start + bins * width / 2  # centered coordinates keep the prefix sums well conditioned
    edges = start - origin + width * np.arange(bins + 1, dtype=np.float64)
    centers = edges[:-1] + width / 2
    sum0, sum1, sum2 = (np.concatenate([[0.0], np.cumsum(counts * centers**power)]) for power in (0, 1, 2))
    variance = width * width / 12

    def whole(t, first, last):  # bins first..last-1, wholly clipped at t
        mass = sum0[last] - sum0[first]
        return mass * t * t - 2 * (sum1[last] - sum1[first]) * t + (sum2[last] - sum2[first]) + mass * variance

    def locate(thresholds):
        # t itself stays where it is: a threshold beyond the histogram clips every value on that
        # side by its whole distance (a constant activation, whose bins span 1e-6 of its value).
        t = np.asarray(thresholds, np.float64) - origin
        k = np.clip((np.clip(t, edges[0], edges[-1]) - edges[0]) // width, 0, bins - 1).astype(np.int64)
        return t, k

    def cube(distance):
        return np.clip(distance, 0, None) ** 3 / 3

    def below(thresholds):  # bin k holds the values from edges[k] up to t at most
        t, k = locate(thresholds)
        return whole(t, 0, k) + counts[k] / width * (cube(t - edges[k]) - cube(t - edges[k + 1]))

    def above(thresholds):  # bin k holds the values from t at least up to edges[k + 1]
        t, k = locate(thresholds)
        return whole(t, k + 1, bins) + counts[k] / width * (cube(edges[k + 1] - t) - cube(edges[k] - t))

    return below, above


__all__ = [
    "CalibrationData",
    "Histogram",
    "HistogramObserver",
    "InputSpec",
    "MinMaxObserver",
    "Preprocess",
    "RANGE_METHODS",
    "Sample",
    "calibrate_ranges",
    "capture_activations",
    "check_finite_outputs",
    "entropy_range",
    "input_specs",
    "minmax_range",
    "nonfinite_problem",
    "mse_range",
    "percentile_range",
    "range_method",
]
