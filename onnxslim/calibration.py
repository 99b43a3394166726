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
over a Histogram and give each tensor's clipping range (onnxslim.ranges); image preprocessing
is onnxslim.preprocess. Both are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import logging
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from .errors import InputSpecError
from .inputs import InputSpec, check_arrays, input_specs, random_shapes, synthesize_inputs
from .model import load
from .preprocess import Preprocess, pillow
from .ranges import (
    DEFAULT_BINS,
    RANGE_METHODS,
    Histogram,
    HistogramObserver,
    MinMaxObserver,
    entropy_range,
    histogram_ranges,
    minmax_range,
    mse_range,
    percentile_range,
    range_method,
)
from .sessions import Reducer, capture
from .text import first_line

logger = logging.getLogger("onnxslim")

NPZ_SUFFIX = ".npz"
NPY_SUFFIX = ".npy"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DEFAULT_RANDOM_SAMPLES = 8
# Random samples are for smoke tests; past this many, a count is a typo (--calibration-limit 1000000000
# built a billion samples' list before anything ran).
MAX_RANDOM_SAMPLES = 10_000
# Skipped samples named in the warning line; the rest are counted.
SKIPPED_SHOWN = 3

Feed = dict[str, np.ndarray]


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
            check_arrays(str(file), _npz_headers(file), specs)
            samples.append(Sample(str(file), partial(_load_npz, file)))
        return cls._built(samples, f".npz files in {source_name or _common_folder(files)}", limit, screen=True)

    @classmethod
    def from_npy(
        cls, model, files: Sequence[str | Path], *, limit: int | None = None, source_name: str | None = None
    ) -> CalibrationData:
        """Samples of a single-input model from .npy files: an array of the input's rank is one
        sample; one more leading axis stacks several (read one at a time, memory-mapped)."""
        model = load(model, check=False)
        spec = _single_input(model, ".npy files")
        files = sorted((Path(file) for file in files), key=lambda file: file.name)
        samples: list[Sample] = []
        for file in files:
            shape, dtype = _npy_header(file)
            stacked = spec.dims is not None and len(shape) == len(spec.dims) + 1
            if stacked:
                check_arrays(f"{file} (a stack of {shape[0]} samples)", {spec.name: (shape[1:], dtype)}, [spec])
                samples += [
                    Sample(f"{file}[{index}]", partial(_load_npy, file, spec.name, index)) for index in range(shape[0])
                ]
            else:
                check_arrays(str(file), {spec.name: (shape, dtype)}, [spec])
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
        Image, _ = pillow()
        model = load(model, check=False)
        spec = _single_input(model, "images")
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
            check_arrays(f"sample {index}", {name: (value.shape, value.dtype) for name, value in feed.items()}, specs)
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
        raise InputSpecError(f"{file}: not a readable .npz file ({first_line(error)})") from error
    return headers


def _load_npz(file: Path) -> Feed:
    try:
        with np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputSpecError(f"{file}: not a readable .npz file ({first_line(error)})") from error


def _npy_header(file: Path) -> tuple[tuple, np.dtype]:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputSpecError(f"{file}: not a readable .npy file ({first_line(error)})") from error
    return tuple(array.shape), array.dtype


def _load_npy(file: Path, name: str, index: int | None) -> Feed:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputSpecError(f"{file}: not a readable .npy file ({first_line(error)})") from error
    # A copy of one sample only: the memory map keeps the rest of a stack on disk.
    return {name: np.array(array if index is None else array[index])}


def _check_image(file: Path, Image) -> None:
    """Read the header only: a file that is not an image fails now, not halfway through calibration."""
    try:
        with Image.open(file):
            pass  # opening parses the header; the pixels are decoded when the sample is used
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputSpecError(f"{file}: not a readable image ({first_line(error)})") from error


def _load_images(files: Sequence[Path], spec: InputSpec, preprocess: Preprocess) -> Feed:
    Image, _ = pillow()
    arrays = []
    for file in files:
        try:
            with Image.open(file) as image:
                arrays.append(preprocess.apply(image))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise InputSpecError(f"{file}: not a readable image ({first_line(error)})") from error
    batch = np.stack(arrays)
    if spec.dtype.kind in "iu":
        limits = np.iinfo(spec.dtype)
        batch = np.clip(np.rint(batch), limits.min, limits.max)
    return {spec.name: batch.astype(spec.dtype)}


def _random_feed(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int) -> Feed:
    return synthesize_inputs(model, shapes, samples=1, seed=seed)[0]


# ----------------------------------------------------------------------------- activation capture


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
    sample and after each one (total is None for data without a length). Feeds are checked
    against the model's inputs, except a CalibrationData's (checked when it was built).
    """
    model = load(model, check=False)
    return capture(model, data, tensors, reduce=reduce, progress=progress, threads=threads,
                   check_feeds=not isinstance(data, CalibrationData))


# ----------------------------------------------------------------------------- ranges


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
    return histogram_ranges(histograms, partial(function, symmetric=symmetric, **options))


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
    return {method: histogram_ranges(histograms, partial(function, symmetric=symmetric)) for method, function in functions.items()}


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


def _single_input(model: onnx.ModelProto, what: str) -> InputSpec:
    """The model's one input, which `what` (.npy files, images) can feed; else a usage error."""
    specs = input_specs(model)
    if len(specs) != 1:
        raise InputSpecError(
            f"{what} feed single-input models; this one has inputs {', '.join(spec.name for spec in specs)}: "
            "save one .npz per sample, one array per input name"
        )
    return specs[0]
