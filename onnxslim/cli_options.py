"""The command line's option groups: each adds its options to a command and its values become
one option object (onnxslim.options), so that a command's body reads as a few stages.

A group's values reach the command as one namespace; the functions below make the option objects
from them at the point where the command's checks have always run, so that of two mistakes the
same one is reported first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import click

from .errors import UsageError
from .manager import preset_names
from .options import FidelityTarget, QuantizeOptions, SimplifyOptions, VerifyOptions
from .prune import PruneOptions
from .verify import FidelityBudget, parse_shape_specs


class FiniteFloat(click.FloatRange):
    """A number option that refuses NaN and the infinities: every comparison with NaN is false, so a
    NaN threshold or tolerance passes anything, and an infinite one means nothing."""

    name = "finite float"

    def __init__(self, min=None, max=None, min_open=False, max_open=False):
        super().__init__(min, max, min_open, max_open)

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


def option_group(name: str, *options):
    """A decorator that adds `options` (click.option decorators) to a command and hands their
    values to it as one namespace, the argument `name`. A group may come in several blocks, which
    fill the same namespace: the help lists each option where it reads best."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            group = kwargs.setdefault(name, SimpleNamespace())
            for key in keys:
                setattr(group, key, kwargs.pop(key))
            return function(*args, **kwargs)

        known = len(getattr(wrapper, "__click_params__", ()))
        for option in reversed(options):  # click lists a command's options in the reverse order they were added
            option(wrapper)
        keys = [param.name for param in wrapper.__click_params__[known:]]
        return wrapper

    return decorate


SIMPLIFY_OPTIONS = (
    click.option("--pipeline", default=None, help=f"A preset ({', '.join(preset_names())}) or a pipeline text."),
    click.option("--passes", default=None, help="Run exactly these passes, e.g. 'fold-constants,eliminate-dead-nodes'."),
    click.option("--skip", multiple=True, help="Leave this pass out of the pipeline (repeatable, or comma-separated)."),
    click.option(
        "--fold-size-cap", type=click.IntRange(-1), default=None, metavar="BYTES",
        help="Let constant folding store results up to this size even if the model grows (-1: no cap).",
    ),
    click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
        help="Make an input static, e.g. x:1,3,640,640 (changes the model's interface; more folds).",
    ),
)

INSTRUMENT_OPTIONS = (
    click.option("--verify-each", is_flag=True, help="Verify after every pass that changed something; name the first that breaks."),
    click.option("--dump-dir", type=click.Path(file_okay=False, path_type=Path), help="Save the model after every pass that changed it."),
    click.option("--pass-limit", type=click.IntRange(0), default=None, help="Run only the first N pass executions (for bisection)."),
)

# Shared by every command that runs models in onnxruntime.
VERIFICATION_OPTIONS = (
    click.option("--inputs", "inputs", type=click.Path(dir_okay=False), help="An .npz file with one array per input name."),
    click.option(
        "--verify-shape", "verify_shapes", multiple=True, metavar="NAME:DIMS",
        help="Shape of a dynamic input for verification only, e.g. x:1,3,640,640 (the model stays dynamic).",
    ),
    click.option("--samples", default=2, show_default=True, type=click.IntRange(1), help="Random input samples to compare on."),
    click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the random inputs."),
    click.option(
        "--tolerance", type=FiniteFloat(min=0), default=None,
        help="Relative tolerance for float outputs (default by dtype: float32 1e-3, float16 1e-2).",
    ),
    click.option("--min-cosine", type=FiniteFloat(-1, 1), default=None,
                 help="Lossy mode: smallest cosine similarity accepted per output."),
    click.option("--min-sqnr", type=FiniteFloat(), default=None, help="Lossy mode: smallest SQNR (dB) accepted per output."),
    click.option("--min-top1", type=FiniteFloat(0, 1), default=None,
                 help="Lossy mode: smallest top-1 agreement accepted (class scores)."),
)

OUTPUT_OPTIONS = (
    click.option("--overwrite", is_flag=True, help="Allow DESTINATION to be the input file."),
    click.option("--external-data/--no-external-data", default=None, help="Store tensors in DESTINATION.data (default: only past 2 GB)."),
    click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON (for CI)."),
    click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line."),
)

QUANTIZATION_OPTIONS = (
    click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Quantize the simplified model (QDQ int8)."),
    click.option(
        "--calibration", metavar="PATH",
        help="Calibration samples: a folder or file of .npz (one array per input name), .npy or images; 'random' for smoke tests only.",
    ),
    click.option("--preprocess", metavar="SPEC", help="How images become inputs, e.g. size=224x224,mean=0.485:0.456:0.406,std=0.229:0.224:0.225."),
    click.option(
        "--calibration-method", type=click.Choice(["auto", "minmax", "percentile", "entropy", "mse"]), default="auto",
        show_default=True, help="How activation ranges are chosen (auto: minmax, percentile and mse are tried, the most faithful kept).",
    ),
    click.option("--calibration-limit", type=click.IntRange(1), default=None, help="Use at most this many calibration samples."),
    click.option("--held-out", type=click.IntRange(0), default=0, show_default=True, metavar="N",
                 help="Keep the last N calibration samples apart: quantization and pruning do not fit on them, and "
                      "fidelity (and --fidelity-target) is measured on them. 0: all samples serve, and fidelity is "
                      "measured on the last 8 of them."),
    click.option(
        "--quantize-mode", type=click.Choice(["auto", "full", "weights"]), default="auto", show_default=True,
        help="full: weights and activations (integer kernels); weights: weights only (float speed, 4x smaller); "
        "auto: full if measured faster here and within the fidelity floor, else weights.",
    ),
    click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True),
    click.option("--symmetric-activations", is_flag=True, help="Symmetric activation ranges (zero point fixed)."),
    click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel."),
    click.option(
        "--weight-form", type=click.Choice(["cast-mul", "dequantize"]), default=None,
        help="Weights-only mode: Cast*scale (folded to float at load) or DequantizeLinear (the QDQ form other runtimes read).",
    ),
    click.option("--exclude", multiple=True, metavar="NAME|OP", help="Keep this node (by name) or op type in float (repeatable)."),
    click.option(
        "--fidelity-target", metavar="TARGET",
        help="Keep the most sensitive layers in float until every output meets this, e.g. 30dB or cosine=0.999.",
    ),
    click.option("--no-bias-correction", is_flag=True, help="Do not correct the biases for the weights' rounding."),
    click.option(
        "--reduce-range/--full-range", default=None,
        help="7-bit weights in full mode (default: on x86 CPUs without VNNI, whose u8 x s8 kernels saturate).",
    ),
    click.option(
        "--keep-names", is_flag=True,
        help="Keep the internal tensors' names (by default the quantized model shortens them: smaller file).",
    ),
)

PRUNING_OPTIONS = (
    click.option("--prune", type=FiniteFloat(0, 1, max_open=True), default=None, metavar="RATIO",
                 help="Remove this share of every prunable channel group (0.25: a quarter), then refit on --calibration."),
    click.option("--prune-criterion", type=click.Choice(["auto", "l2", "l1", "bn", "activation", "reconstruction"]),
                 default="auto", show_default=True,
                 help="Which channels go: the weakest by weight magnitude summed over the group's layers (l2, l1), "
                      "by the |γ| of the BatchNormalization that followed the layer (bn, l2 where there was none), "
                      "by the energy they carry into their consumers on the calibration data (activation), or by "
                      "the part of that energy the other channels cannot predict, which the refit cannot win back "
                      "(reconstruction); auto: activation with --calibration, else l2."),
    click.option("--prune-allocation", type=click.Choice(["sensitivity", "uniform"]), default="sensitivity",
                 show_default=True,
                 help="How the ratio is shared among groups: by each group's measured cost to the outputs "
                      "(with --calibration), or the same share everywhere."),
    click.option("--prune-macs", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=None, metavar="SHARE",
                 help="Instead of a channel ratio: remove this share of the multiply-adds, where it costs least "
                      "(needs --calibration; --prune still enables pruning and caps nothing)."),
    click.option("--prune-params", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=None, metavar="SHARE",
                 help="Instead of a channel ratio: remove this share of the parameters, where it costs least "
                      "(needs --calibration)."),
    click.option("--prune-round", type=click.IntRange(1), default=1, show_default=True,
                 help="Round each group's kept channels to a multiple of this (8, 16: fast kernels)."),
    click.option("--no-reconstruct", is_flag=True, help="Do not refit the layers that lost input channels."),
    click.option("--plot", "prune_plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write a PNG of the channels kept per layer and each refit layer's error (needs matplotlib)."),
    click.option("--check-surgery", is_flag=True,
                 help="Check that the pruned model equals the original with the removed channels' weights zeroed."),
)


def simplify_options(values: SimpleNamespace) -> SimplifyOptions:
    """The SimplifyOptions of `optimize`'s simplification options, its pipeline checked."""
    options = SimplifyOptions(
        pipeline=values.pipeline, passes=values.passes,
        skip=tuple(name.strip() for entry in values.skip for name in entry.split(",") if name.strip()),
        fold_size_cap=values.fold_size_cap, verify_each=values.verify_each, dump_dir=values.dump_dir,
        pass_limit=values.pass_limit,
    )
    options.pipeline_to_run()  # a pipeline's error comes before the work (and before --input-shape's)
    return replace(options, input_shapes=parse_shape_specs(values.input_shapes))


def verify_options(values: SimpleNamespace) -> VerifyOptions:
    """The VerifyOptions of the verification options (and of `optimize`'s --no-verify and --force)."""
    budget = FidelityBudget(min_cosine=values.min_cosine, min_sqnr_db=values.min_sqnr, min_top1=values.min_top1)
    return VerifyOptions(
        enabled=not getattr(values, "no_verify", False), inputs=values.inputs,
        verify_shapes=parse_shape_specs(values.verify_shapes), samples=values.samples, seed=values.seed,
        tolerance=values.tolerance, budget=budget if budget.is_set() else None, force=getattr(values, "force", False),
    )


def pruning_asked(values: SimpleNamespace) -> bool:
    return values.prune is not None or values.prune_macs is not None or values.prune_params is not None


def prune_options(values: SimpleNamespace, fidelity_target: str | None, held_out: int) -> PruneOptions | None:
    """The PruneOptions of the pruning options (None without --prune, --prune-macs or --prune-params)."""
    if not pruning_asked(values):
        return None
    return PruneOptions(ratio=values.prune if values.prune is not None else 0.0, criterion=values.prune_criterion,
                        macs=values.prune_macs, parameters=values.prune_params, round_to=values.prune_round,
                        reconstruct=not values.no_reconstruct, check_surgery=values.check_surgery,
                        allocation=values.prune_allocation, held_out=held_out,
                        fidelity_target=FidelityTarget.parse(fidelity_target) if fidelity_target else None)


def quantize_options(values: SimpleNamespace, fidelity_target: str | None, pruning: bool) -> QuantizeOptions | None:
    """The QuantizeOptions of the quantization options (None without --quantize); the options
    that apply only to quantization are refused without it."""
    if values.quantize is None:
        _refuse_quantize_only(values, pruning)
        return None
    if values.weight_form and values.quantize_mode != "weights":
        raise UsageError("--weight-form applies to --quantize-mode weights")
    return QuantizeOptions(
        mode=values.quantize_mode,
        method=values.calibration_method,
        per_channel=not values.per_tensor,
        activation_type=values.activation_type,
        symmetric_activations=values.symmetric_activations,
        weight_form=values.weight_form or "",
        exclude=tuple(name.strip() for entry in values.exclude for name in entry.split(",") if name.strip()),
        fidelity_target=FidelityTarget.parse(fidelity_target) if fidelity_target else None,
        bias_correction=not values.no_bias_correction,
        reduce_range=values.reduce_range,
        keep_names=values.keep_names,
        held_out=values.held_out,
    )


def _refuse_quantize_only(values: SimpleNamespace, pruning: bool) -> None:
    """Without --quantize: an option of quantization alone is a usage error (the calibration
    options serve pruning too)."""
    quantize_only = {
        "--calibration": values.calibration, "--preprocess": values.preprocess,
        "--calibration-limit": values.calibration_limit, "--held-out": values.held_out,
        "--fidelity-target": values.fidelity_target, "--weight-form": values.weight_form,
        "--exclude": values.exclude, "--symmetric-activations": values.symmetric_activations,
        "--per-tensor": values.per_tensor, "--keep-names": values.keep_names,
    }
    if pruning:  # calibration data serves pruning's refit too
        quantize_only = {flag: value for flag, value in quantize_only.items()
                         if flag not in ("--calibration", "--preprocess", "--calibration-limit", "--held-out")}
    given = [flag for flag, value in quantize_only.items() if value]
    if given == ["--held-out"]:
        raise UsageError("--held-out applies to quantization and pruning: add --quantize int8 or --prune RATIO")
    if given:
        raise UsageError(f"{given[0]} applies to quantization: add --quantize int8")
