"""Per-group shares: how much pruning each group alone costs the model's outputs (measured on a
few calibration samples), and a greedy allocation of a ratio, a multiply-add or a parameter budget
to the groups where it costs least."""

from __future__ import annotations

import math

import numpy as np
import onnx

from ..graph import constant_value
from ..model import to_graph
from ..sessions import with_weights_as_inputs
from ..verify import numeric_view
from .records import PrunePlan, nodes_by_key
from .surgery import compensate, zero_removed

ALLOCATIONS = ("sensitivity", "uniform")
# The shares of a group sensitivity allocation measures (linear in between, 0 costs nothing).
# Steps of 1/8: with quarters the shares were too coarse and the pruned model less faithful.
SENSITIVITY_LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
# Sensitivity runs the model groups x levels x samples times: as many calibration samples as fit
# in this many multiply-adds, at least SENSITIVITY_SAMPLES (all of them for a small model).
SENSITIVITY_SAMPLES = 4
SENSITIVITY_WORK = 2e12


def allocate(model: onnx.ModelProto, plan: PrunePlan, data, ratio: float, *, progress=None) -> dict[int, float]:
    """Each prunable group's share, so that `ratio` of all prunable channels go where they cost
    the outputs least (sensitivity_costs, then allocate_from_costs)."""
    return allocate_from_costs(plan, sensitivity_costs(model, plan, data, progress=progress), ratio)


def sensitivity_costs(model: onnx.ModelProto, plan: PrunePlan, data, *, progress=None) -> dict[int, list[float]]:
    """Each prunable group's cost at the shares 0 and SENSITIVITY_LEVELS: the model's outputs
    with only that group's removed channels zeroed in its consumers (what the cut computes, see
    prune_model's zeroed reference), as noise energy over signal energy, on a few calibration
    samples (_NoiseProbe)."""
    groups = [gid for gid, group in plan.groups.items() if group.prunable and group.scores is not None]
    probe = _NoiseProbe(model, plan, data.limit(sensitivity_samples(plan, data)))
    costs = {}
    for done, gid in enumerate(groups):
        costs[gid] = [0.0] + [probe.noise(plan.choose(0.0, ratios={gid: level})) for level in SENSITIVITY_LEVELS]
        if progress:
            progress("pruning sensitivity", done + 1, len(groups))
    return costs


class _NoiseProbe:
    """The model's output noise with a chosen plan's removed channels zeroed in their consumers
    (and their means moved into the consumers' biases), as noise energy over signal energy pooled
    over `samples`. One onnxruntime session serves every measurement: the consumers' weights are
    its inputs."""

    def __init__(self, model: onnx.ModelProto, plan: PrunePlan, samples):
        from ..runtime import Session

        self.plan = plan
        self.nodes = nodes = nodes_by_key(to_graph(model))
        self.reads = [cut for cut in plan.cuts if cut.reads]
        names = {cut.slot: nodes[cut.node].inputs[cut.index].name for cut in self.reads}
        self.slots = {layer: slot for layer, slot in plan.biases.items() if layer in plan.means}
        for slot in self.slots.values():  # the biases that mean compensation moves
            names[slot.slot] = nodes[slot.node].inputs[slot.index].name
        self.names = names
        self.originals = {name: constant_value(nodes[key].inputs[index]) for (key, index), name in names.items()}
        probe = with_weights_as_inputs(model, set(self.originals))
        # The original weights stay in the worker: a trial sends only the weights it changed.
        self.session = Session(probe, label="model to probe", optimized=True, defaults=self.originals)
        self.feeds = list(samples)
        self.reference = [_measurable(self.session.run(None, feed)) for feed in self.feeds]
        # Pooled over the samples, like the SQNR fidelity reports: a sample whose outputs are all
        # but zero (a detector's map of an image without text) would make any per-sample ratio explode.
        # Outputs the model itself overflows (NaN, infinity) measure nothing and are left out.
        self.signal = max(sum(float(np.sum(np.square(output[np.isfinite(output)], dtype=np.float64)))
                              for outputs in self.reference for output in outputs), 1e-30)

    def noise(self, trial: PrunePlan) -> float:
        weights = dict(self.originals)
        for cut in self.reads:
            if not trial.cuts_any(cut.groups):
                continue
            name = self.names[cut.slot]
            kept = trial.kept_indices(cut)
            slot = self.slots.get(cut.node)
            if slot is not None:
                biases = {slot.slot: weights[self.names[slot.slot]]}
                compensate(self.nodes, cut, weights[name], kept, self.plan.means[cut.node], slot, biases)
                weights[self.names[slot.slot]] = biases[slot.slot]
            weights[name] = zero_removed(weights[name], cut.axis, kept)
        changed = {name: value for name, value in weights.items() if value is not self.originals[name]}
        total = 0.0
        for feed, expected in zip(self.feeds, self.reference):
            actual = _measurable(self.session.run(None, {**feed, **changed}))
            total += sum(_noise(a, e) for a, e in zip(actual, expected)
                         if a.shape == e.shape)  # a count that follows the data (NonZero) may differ
        return total / self.signal


def _measurable(outputs: list) -> list[np.ndarray]:
    """The outputs as float arrays noise can be measured on (a classifier's ZipMap as rows of
    probabilities, see numeric_view); labels, strings and the like carry no noise energy."""
    views = [numeric_view(output) for output in outputs]
    return [view for view in views if view is not None and view.dtype.kind == "f"]


def _noise(actual: np.ndarray, expected: np.ndarray) -> float:
    """Σ (actual − expected)² where the original's output is finite; an infinity or NaN the cut
    brings where the original has a number is infinite noise (that cut is never the cheapest)."""
    finite = np.isfinite(expected)
    difference = actual.astype(np.float64)[finite] - expected[finite]
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.sum(np.square(difference)))
    return total if math.isfinite(total) else math.inf


def sensitivity_samples(plan: PrunePlan, data) -> int:
    """How many calibration samples the sensitivity measurements use: what SENSITIVITY_WORK
    multiply-adds allow (all of them for a small model), at least SENSITIVITY_SAMPLES."""
    runs = max(1, sum(group.prunable and group.scores is not None for group in plan.groups.values())) \
        * len(SENSITIVITY_LEVELS)
    affordable = int(SENSITIVITY_WORK // (runs * plan.total_macs)) if plan.total_macs else SENSITIVITY_SAMPLES
    return min(len(data), max(SENSITIVITY_SAMPLES, affordable))


def allocate_from_costs(plan: PrunePlan, costs: dict[int, list[float]], ratio: float, *,
                        macs: float | None = None, parameters: float | None = None) -> dict[int, float]:
    """Greedily, the group whose next level adds the least noise per channel removed takes it,
    until `ratio` of the prunable channels are removed (the last step part-way). With `macs`
    the budget is that share of the model's multiply-adds instead, priced per MAC removed."""
    groups = list(costs)
    if macs is not None:
        groups = [gid for gid in groups if plan.groups[gid].macs > 0]
        unit = {gid: plan.groups[gid].macs for gid in groups}
        budget = macs * plan.total_macs
    elif parameters is not None:
        groups = [gid for gid in groups if plan.groups[gid].parameters > 0]
        unit = {gid: float(plan.groups[gid].parameters) for gid in groups}
        budget = parameters * plan.total_parameters
    else:
        unit = {gid: 1.0 for gid in groups}
        budget = ratio * sum(plan.groups[gid].size for gid in groups)
    levels = (0.0,) + SENSITIVITY_LEVELS
    step = {gid: 0 for gid in groups}
    removed = 0.0
    while removed < budget:
        best, best_price = None, math.inf
        for gid in groups:
            if step[gid] + 1 >= len(levels):
                continue
            amount = plan.groups[gid].size * (levels[step[gid] + 1] - levels[step[gid]]) * unit[gid]
            price = (costs[gid][step[gid] + 1] - costs[gid][step[gid]]) / amount
            if price < best_price:
                best, best_price = gid, price
        if best is None:
            break
        size = plan.groups[best].size
        take = size * (levels[step[best] + 1] - levels[step[best]]) * unit[best]
        if removed + take > budget:
            share = levels[step[best]] + (budget - removed) / (size * unit[best])
            return {**{gid: levels[step[gid]] for gid in groups}, best: share}
        step[best] += 1
        removed += take
    return {gid: levels[step[gid]] for gid in groups}
