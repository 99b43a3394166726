"""Activation statistics and the clipping ranges drawn from them: observers that reduce one
tensor's values sample by sample (MinMaxObserver, HistogramObserver over a Histogram), and the
range methods (minmax, percentile, entropy, mse), plain functions over a Histogram.

Pure numpy: onnxslim.calibration runs the samples and feeds the observers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from .errors import UsageError

logger = logging.getLogger("onnxslim")

DEFAULT_BINS = 2048


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


def histogram_ranges(histograms: HistogramObserver, function) -> dict[str, tuple[float, float]]:
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
