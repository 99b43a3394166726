"""Image preprocessing for calibration and benchmark data: how an image file becomes one model
input (Preprocess: size, layout, color, scale, mean, std, resize mode), its `key=value,...` text
form, and its fields resolved against the model's input.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .errors import InputSpecError, UsageError
from .inputs import InputSpec


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
        Image, ImageOps = pillow()
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


def pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise UsageError(
            "reading images needs Pillow: pip install 'onnxslim[images]' (or pip install pillow), or give .npz samples"
        ) from None
    return Image, ImageOps
