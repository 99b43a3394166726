"""The whole step: plan, cut, check, refit and measure (prune), with a ratio, a multiply-add or
parameter budget, or a fidelity target to meet."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import onnx

from ..calibration import check_finite_outputs, fidelity_split
from ..errors import UsageError, VerificationError
from ..graph import constant_value
from ..layers import LAYER_OPS, count_parameters
from ..model import to_graph
from .allocation import allocate_from_costs, sensitivity_costs, sensitivity_samples
from .analysis import analyze, bn_gammas
from .criteria import DATA_CRITERIA, activation_scores, input_moments
from .layers import model_macs
from .options import PruneOptions
from .records import PrunePlan, nodes_by_key
from .report import (NO_DATA, REFIT_NOT_FINITE, PruneReport, allocation_note, fidelity_note, gamma_note, surgery_note,
                     target_note)
from .surgery import apply_plan

BUDGET_STEPS = 8  # allocations tried to meet a --prune-params / --prune-macs budget
SEARCH_STEPS = 6  # bisection steps of a fidelity-target search: the ratio to within max/64


def prune(model: onnx.ModelProto, data, options: PruneOptions = PruneOptions(), *, progress=None,
          shapes: dict | None = None, original: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune a simplified model: plan, cut, optionally check the cut, refit on `data`
    (a CalibrationData) and return (pruned model, report). The caller reruns the lossless pipeline.
    Criterion "bn" reads the BatchNormalization γ of `original`, the model before simplification
    (default: `model`).

    With `options.fidelity_target` the ratio is searched (bisection, at most `options.ratio`):
    the largest whose result, refit included, meets the target on the evaluation samples."""
    options = _resolved(options, data)
    data, evaluation = fidelity_split(data, options.held_out)
    measured = evaluation, _expected_outputs(model, evaluation)  # first: a sample the model overflows is refused
    plan = _plan(model, data, options, original)
    costs = None
    if (options.macs is not None or options.parameters is not None) and (data is None or options.allocation != "sensitivity"):
        raise UsageError("--prune-macs and --prune-params need calibration data (--calibration DIR) and sensitivity allocation")
    if options.allocation == "sensitivity" and data is not None:
        costs = sensitivity_costs(model, plan, data, progress=progress)
    run = _Run(model, plan, costs, data, measured, progress, shapes)
    if options.fidelity_target is None:
        return run.at(options, options.ratio)
    if data is None:
        raise UsageError("a fidelity target for pruning needs calibration data (--calibration DIR)")
    return run.search(options)


def _resolved(options: PruneOptions, data) -> PruneOptions:
    """The options with criterion "auto" made concrete, refused where they need data there is not."""
    criterion = options.criterion
    if criterion == "auto":
        criterion = "activation" if data is not None else "l2"
        options = replace(options, criterion=criterion)
    if criterion in DATA_CRITERIA and data is None:
        raise UsageError(f"--prune-criterion {criterion} needs calibration data (--calibration DIR)")
    if options.held_out and data is None:
        raise UsageError("--held-out needs calibration data (--calibration DIR)")
    return options


def _plan(model: onnx.ModelProto, data, options: PruneOptions, original: onnx.ModelProto | None) -> PrunePlan:
    """The model's groups, scored by the criterion, with the consumers' input means for mean compensation."""
    criterion = options.criterion
    gammas = bn_gammas(original if original is not None else model) if criterion == "bn" else None
    plan = analyze(model, "l2" if criterion in DATA_CRITERIA else criterion, input_shapes=plan_shapes(data),
                   gammas=gammas)
    if data is not None and (criterion in DATA_CRITERIA or options.compensate):
        moments = input_moments(model, plan, data, grams=criterion == "reconstruction")
        if criterion in DATA_CRITERIA:
            activation_scores(model, plan, moments)
        if options.compensate:
            plan.means.update({layer: value.mean for layer, value in moments.items() if layer in plan.biases})
    return plan


def _expected_outputs(model: onnx.ModelProto, evaluation) -> list[dict] | None:
    """The model's outputs on the evaluation samples, which must be finite to measure fidelity on."""
    from ..sessions import Runner

    if evaluation is None:
        return None
    runner = Runner(model, label="original model")
    outputs = [runner.run(feed) for feed in evaluation]
    check_finite_outputs(outputs, evaluation.labels)
    return outputs


def plan_shapes(data) -> dict | None:
    return {name: list(array.shape) for name, array in next(iter(data)).items()} if data is not None else None


@dataclass
class _Run:
    """What stays the same while a fidelity target's search tries ratios: the model, its plan, the
    groups' sensitivity costs, the data, `measured` (the evaluation samples and the model's
    outputs on them), the progress callback and the verification shapes."""

    model: onnx.ModelProto
    plan: PrunePlan
    costs: dict | None
    data: object
    measured: tuple
    progress: object
    shapes: dict | None

    def search(self, options: PruneOptions) -> tuple[onnx.ModelProto, PruneReport]:
        """The largest ratio (bisection, at most `options.ratio`) whose result meets the fidelity target."""
        target = options.fidelity_target
        trial = replace(options, check_surgery=False)
        tried = []
        low, high = 0.0, options.ratio
        best = None
        candidate = self.at(trial, high)
        tried.append((high, candidate[1].final_fidelity()))
        if target.met(candidate[1].final_fidelity()):
            best = (high, candidate)
        else:
            for _ in range(SEARCH_STEPS):
                middle = (low + high) / 2
                candidate = self.at(trial, middle)
                tried.append((middle, candidate[1].final_fidelity()))
                if target.met(candidate[1].final_fidelity()):
                    low, best = middle, (middle, candidate)
                else:
                    high = middle
        ratio = best[0] if best is not None else 0.0
        pruned, report = self.at(options, ratio) if options.check_surgery or best is None else best[1]
        report.notes.append(target_note(target, ratio, tried))
        report.target = str(target)
        report.target_met = target.met(report.final_fidelity()) if report.fidelity else ratio == 0.0
        return pruned, report

    def at(self, options: PruneOptions, ratio: float) -> tuple[onnx.ModelProto, PruneReport]:
        """Prune at `ratio` (or the options' budget), check, refit and measure."""
        model, plan, data = self.model, self.plan, self.data
        input_shapes = plan_shapes(data)  # a calibration sample is read for them
        chosen, pruned, macs_after = self._cut(options, ratio, input_shapes)
        report = PruneReport(
            ratio=ratio, criterion=options.criterion, groups=chosen.describe(),
            prunable_channels=chosen.prunable_channels, removed_channels=chosen.removed_channels,
            parameters_before=count_parameters(model), parameters_after=count_parameters(pruned),
        )
        if options.criterion == "bn":
            report.notes.append(gamma_note(plan.gamma_layers))
        measures = self.costs is not None and (ratio > 0 or options.macs or options.parameters)
        report.notes.append(allocation_note(sensitivity_samples(plan, data) if measures else None))
        report.macs_before = plan.total_macs
        report.macs_after = macs_after if macs_after is not None else model_macs(pruned, input_shapes)
        if options.check_surgery:
            self._check_surgery(chosen, pruned, report)
        if data is None:
            report.notes.append(NO_DATA)
            return pruned, report
        refit = pruned
        if options.reconstruct and chosen.kept:
            refit = _reconstruct(model, pruned, chosen, data, report, self.progress, options.refit == "downstream")
        refit = self._measure(pruned, refit, report)
        used = [step for step, done in (("the channel choice", options.criterion in DATA_CRITERIA),
                                        ("the allocation", self.costs is not None),
                                        ("the mean compensation", options.compensate),
                                        ("the refit", any(fit["status"] == "refit" for fit in report.reconstruction.values())))
                if done]
        report.notes.append(fidelity_note(len(self.measured[0]), bool(options.held_out), used))
        return refit, report

    def _cut(self, options: PruneOptions, ratio: float, input_shapes: dict | None):
        """(the chosen plan, the pruned model, its multiply-adds where a MAC budget measured them)."""
        costs = self.costs
        if costs is not None and (options.macs or options.parameters):
            chosen, pruned, measured = _meet_budget(self.model, self.plan, costs, options, input_shapes)
            return chosen, pruned, measured if options.parameters is None else None
        ratios = allocate_from_costs(self.plan, costs, ratio) if costs is not None and ratio > 0 else None
        chosen = self.plan.choose(ratio, round_to=options.round_to, ratios=ratios)
        return chosen, apply_plan(self.model, chosen, remove=True), None

    def _check_surgery(self, chosen: PrunePlan, pruned: onnx.ModelProto, report: PruneReport) -> None:
        """The pruned model against the zeroed original: they must be equal."""
        from ..verify import Verifier, synthesize_inputs

        data = self.data
        zeroed = apply_plan(self.model, chosen, remove=False)  # built only for the check: a second export of the model
        feeds = list(data.limit(2)) if data is not None and not data.synthetic else []
        if feeds:  # the user's samples, and random ones of their shapes (no data: random ones only)
            feeds += synthesize_inputs(zeroed, {name: list(array.shape) for name, array in feeds[0].items()}, 2)
        check = Verifier(zeroed, inputs=feeds or None, shapes=self.shapes, samples=2).check(pruned, label="pruned model")
        report.surgery_exact = check.passed
        report.surgery_check = surgery_note(check.passed, check.message, len(feeds) - 2 if feeds else 0)

    def _measure(self, pruned: onnx.ModelProto, refit: onnx.ModelProto, report: PruneReport) -> onnx.ModelProto:
        """The fidelity of the pruned model (and of the refit one) on the evaluation samples; a
        refit that brings NaN or infinity is dropped. Returns the model to deliver."""
        from ..sessions import Runner
        from ..verify import FidelityPool

        evaluation, reference_outputs = self.measured
        candidates = {"pruned": Runner(pruned, label="pruned model")}
        if refit is not pruned:
            candidates["pruned + refit"] = Runner(refit, label="refit model")
        for key, runner in candidates.items():
            pools = {}
            for feed, expected in zip(evaluation, reference_outputs):
                actual = runner.run(feed)
                for name in expected:
                    pools.setdefault(name, FidelityPool()).add(expected[name], actual[name])
            report.fidelity[key] = {
                "sqnr_db": FidelityPool.worst(pool.sqnr_db() for pool in pools.values()),
                "cosine": FidelityPool.worst(pool.cosine() for pool in pools.values()),
            }
        if math.isnan(report.fidelity["pruned"]["cosine"]):
            raise VerificationError("the pruned model gives NaN or infinity where the original does not, on the "
                                    "evaluation samples: " + "; ".join(pool.problem() or "" for pool in pools.values()))
        if "pruned + refit" in report.fidelity and math.isnan(report.fidelity["pruned + refit"]["cosine"]):
            # The refit broke what the cut alone kept finite: the pruned weights stay.
            del report.fidelity["pruned + refit"]
            report.notes.append(REFIT_NOT_FINITE)
            for layer in report.reconstruction.values():
                if layer["status"] == "refit":
                    layer["status"], layer["reason"] = "kept", "the refit model gave NaN or infinity"
            return pruned
        return refit


def _meet_budget(model, plan: PrunePlan, costs, options: PruneOptions, shapes: dict | None):
    """Allocate a --prune-params / --prune-macs budget so that the pruned model really has that
    share fewer parameters (or multiply-adds): the allocation prices each channel at first order
    and the kept counts round down, so the budget it is given grows until the cut meets the target.
    Returns (plan chosen, pruned model, its parameters or multiply-adds, whichever the budget is in)."""
    target = options.parameters if options.parameters is not None else options.macs
    before = count_parameters(model) if options.parameters is not None else plan.total_macs
    budget = target
    for _ in range(BUDGET_STEPS):
        ratios = allocate_from_costs(plan, costs, 0.0, **({"parameters": budget} if options.parameters is not None
                                                          else {"macs": budget}))
        chosen = plan.choose(0.0, round_to=options.round_to, ratios=ratios)
        pruned = apply_plan(model, chosen, remove=True)
        after = count_parameters(pruned) if options.parameters is not None else model_macs(pruned, shapes)
        cut = 1 - after / before if before else 0.0
        if cut >= target or budget >= 0.99:
            break
        budget = min(0.99, budget * target / max(cut, 1e-3) + 1e-3)
    return chosen, pruned, after


def _reconstruct(model, pruned, plan: PrunePlan, data, report: PruneReport, progress,
                 downstream: bool = False) -> onnx.ModelProto:
    """Refit every consumer of a pruned group (the layers that lost input channels), in graph order."""
    try:
        from ..reconstruct import reconstruct
    except ImportError:  # pragma: no cover - the module ships with the package
        report.notes.append("reconstruction unavailable")
        return pruned
    graph = to_graph(model)
    nodes = nodes_by_key(graph)
    layers = []
    for cut in plan.cuts:
        node = nodes[cut.node]
        if cut.reads and plan.cuts_any(cut.groups) and node.name not in layers:
            layers.append(node.name)
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    layers.sort(key=order.get)
    if downstream and layers:
        # Every later layer too: its input carries the error of the layers before it, which a
        # refit on the pruned model's own activations takes out as well.
        first = order[layers[0]]
        later = [node.name for node in graph.nodes[first:] if node.op in LAYER_OPS and node.name
                 and len(node.inputs) > 1 and constant_value(node.inputs[1]) is not None]
        layers = sorted(set(layers) | set(later), key=order.get)
    kept_outputs = {}
    for cut in plan.cuts:
        node = nodes[cut.node]
        if node.name in layers and not cut.reads and cut.index == 1 and plan.cuts_any(cut.groups):
            kept_outputs[node.name] = plan.kept_indices(cut)
    refit, fits = reconstruct(model, pruned, layers, data, kept_outputs=kept_outputs, progress=progress)
    for name, fit in fits.items():
        report.reconstruction[name] = {
            "status": fit.status, "reason": fit.reason,
            "error_before": fit.error_before, "error_after": fit.error_after, "ridge": fit.ridge,
        }
    return refit
