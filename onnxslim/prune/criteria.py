"""Channel importance: weight magnitude (l1, l2), and what the channels carry into the layers that
read them on calibration data (activation, reconstruction; see activation_scores)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx

from ..graph import constant_value
from ..model import to_graph
from .records import PrunePlan, nodes_by_key

CRITERIA = ("auto", "l2", "l1", "bn", "activation", "reconstruction")  # auto: activation with calibration data, else l2
DATA_CRITERIA = ("activation", "reconstruction")  # need calibration data
IDLE_FLOOR = 0.1  # activation_scores: the least E[x²] a feature counts with, as a share of its layer's mean
# The reconstruction criterion inverts each consumer's channel Gram matrix with this ridge (times
# its mean diagonal), so that a channel the others predict exactly still costs a little.
GRAM_RIDGE = 1e-3
# The channel means (mean compensation) and mean squares (the data criteria) come from up
# to this many calibration samples, one forward pass each: moments from half of the samples
# gave a clearly less faithful pruned model on held-out data than moments from all of them.
MOMENT_SAMPLES = 32


def weight_scores(weight: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    """Each channel's weight magnitude along `axis`: the sum of |w| (criterion l1), else the L2 norm."""
    moved = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    return np.abs(moved).sum(axis=1) if criterion == "l1" else np.sqrt((moved**2).sum(axis=1))


class ChannelMoments(NamedTuple):
    """A layer's input features on calibration data: mean, mean square and (when asked for, for a
    layer the refit supports) the mean square of what the other features cannot predict
    (_unpredictable, from the Gram matrix E[x xᵀ])."""

    mean: np.ndarray
    square: np.ndarray
    unpredictable: np.ndarray | None = None


class _MomentSums:
    """Running sums of the captured activations, per (tensor name, axis): Σx, Σx², the count of
    finite values and, for the keys in `gram_keys`, Σ x xᵀ over the whole finite positions."""

    def __init__(self, axes: dict[str, set[int]], gram_keys: set[tuple]):
        self.axes, self.gram_keys = axes, gram_keys
        self.sums: dict[tuple, np.ndarray] = {}
        self.squares: dict[tuple, np.ndarray] = {}
        self.counts: dict[tuple, np.ndarray] = {}
        self.products: dict[tuple, np.ndarray] = {}
        self.product_counts: dict[tuple, int] = {}

    def add(self, name: str, value: np.ndarray) -> None:
        for axis in self.axes[name]:
            along = axis % value.ndim
            moved = np.moveaxis(value.astype(np.float64), along, 0).reshape(value.shape[along], -1)
            # An activation the model overflowed (an infinity, a NaN) says nothing about a channel's
            # moments: only finite values count, and the Gram matrix takes whole finite positions.
            finite = np.isfinite(moved)
            whole = finite.all(axis=0)
            if not whole.all():
                moved = np.where(finite, moved, 0.0)
            key = (name, axis)
            self.sums[key] = self.sums.get(key, 0) + moved.sum(axis=1)
            self.squares[key] = self.squares.get(key, 0) + np.square(moved).sum(axis=1)
            self.counts[key] = self.counts.get(key, 0) + finite.sum(axis=1)
            if key in self.gram_keys:
                columns = moved if whole.all() else moved[:, whole]
                self.products[key] = self.products.get(key, 0) + columns @ columns.T
                self.product_counts[key] = self.product_counts.get(key, 0) + columns.shape[1]

    def moments(self) -> dict[tuple, ChannelMoments]:
        moments = {}
        for key in self.sums:
            if not self.counts[key].all() or not np.isfinite(self.squares[key]).all():
                continue  # a channel without one finite value (or beyond float64): no moments for this input
            unpredictable = None
            if self.product_counts.get(key) and np.isfinite(self.products[key]).all():
                unpredictable = _unpredictable(self.products[key] / self.product_counts[key])
            moments[key] = ChannelMoments(self.sums[key] / self.counts[key], self.squares[key] / self.counts[key],
                                          unpredictable)
        return moments


def input_moments(model: onnx.ModelProto, plan: PrunePlan, data, samples: int = MOMENT_SAMPLES, *,
                  grams: bool = False) -> dict[str, ChannelMoments]:
    """For each layer that reads a group's channels (by node_key): the moments of each of its
    input features on calibration data, along the channel axis (1, or the last for a MatMul), in
    one pass over the samples. The means feed mean compensation (plan.means), the mean squares
    (and unpredictable parts) the data criteria (activation_scores). With `grams`, the Gram matrix
    of every input read by a layer the refit supports (reconstruct.SUPPORTED_OPS; memory:
    features² per such input) gives its features' unpredictable parts. Layers that read the same
    tensor share its moments."""
    from ..calibration import capture_activations
    from ..reconstruct import SUPPORTED_OPS

    nodes = nodes_by_key(to_graph(model))
    keys, gram_keys = {}, set()
    for cut in plan.cuts:
        if cut.reads:  # a consumer: a layer of group 1, whose every output reads every input channel
            node = nodes[cut.node]
            keys[cut.node] = (node.inputs[0].name, -1 if node.op == "MatMul" else 1)
            if grams and node.op in SUPPORTED_OPS and cut.block == 1:
                gram_keys.add(keys[cut.node])
    axes: dict[str, set[int]] = {}
    for name, axis in keys.values():
        axes.setdefault(name, set()).add(axis)
    sums = _MomentSums(axes, gram_keys)
    if axes:
        capture_activations(model, data.limit(samples), set(axes), reduce=sums.add)
    moments = sums.moments()
    return {layer: moments[key] for layer, key in keys.items() if key in moments}


def activation_scores(model: onnx.ModelProto, plan: PrunePlan, moments: dict[str, ChannelMoments]) -> None:
    """Replace each prunable group's scores by what its channels feed forward: for every consumer
    reading channel k, E[x_k²]·‖W[:, k]‖² (the output energy that channel carries into the layer;
    E[x²] from input_moments), summed over the group's consumers, each consumer normalised by its mean.
    E[x_k²] counts as at least IDLE_FLOOR times the layer's mean: a channel idle on the calibration
    images may well not be on others (calibration data seldom covers every input a model meets).

    Where the moments hold unpredictable parts (the reconstruction criterion, for a consumer the
    refit supports), E[x_k²] becomes 1 / (G + εI)⁻¹_kk, G the Gram matrix: the part of channel k
    the other channels cannot predict (its residual's mean square under least squares), which is
    what a refit of that consumer cannot win back. A channel that copies another costs next to
    nothing."""
    nodes = nodes_by_key(to_graph(model))
    scores: dict[int, np.ndarray] = {}
    for cut in plan.cuts:
        if not cut.reads or not any(plan.groups[g].prunable for g in cut.groups) or cut.node not in moments:
            continue
        weight = constant_value(nodes[cut.node].inputs[cut.index])
        columns = np.moveaxis(weight.astype(np.float64), cut.axis, 0).reshape(weight.shape[cut.axis], -1)
        carried = np.square(columns).sum(axis=1)  # per input feature of the layer
        features = moments[cut.node].unpredictable
        if features is None:
            # A feature idle on the calibration data is not known to be idle on other data: its
            # E[x²] is floored at IDLE_FLOOR of the layer's mean, so idle channels rank by weight.
            square = moments[cut.node].square
            features = np.maximum(square, IDLE_FLOOR * square.mean())
        per_channel = carried * features if features.shape == carried.shape else carried
        if cut.block > 1:  # a flattened channel or a head: its block of features sums up
            per_channel = per_channel.reshape(-1, cut.block).sum(axis=1)
        per_channel = per_channel / max(per_channel.mean(), 1e-30)
        offset = 0
        for gid in cut.groups:
            size = plan.groups[gid].size
            scores[gid] = scores.get(gid, 0) + per_channel[offset:offset + size]
            offset += size
    for gid, score in scores.items():
        if plan.groups[gid].prunable:
            plan.groups[gid].scores = score


def _unpredictable(gram: np.ndarray) -> np.ndarray:
    """Each feature's residual mean square when the others predict it by (ridge) least squares."""
    ridge = GRAM_RIDGE * max(float(np.trace(gram)) / len(gram), 1e-30)
    return 1.0 / np.diag(np.linalg.inv(gram + ridge * np.eye(len(gram))))

