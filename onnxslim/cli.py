"""The `onnxslim` command line: parsing and printing only; the work is done by the Python API.

Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error (a bug),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM, as from a build system or a service manager).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.table import Table

from . import api
from .benchmark import DEFAULT_RUNS, DEFAULT_SAMPLES, DEFAULT_WARMUP, BenchOptions, benchmark
from .errors import OnnxSlimError, UsageError, VerificationError
from .manager import load_preset, preset_names, registered_passes
from .model import check_output_path, files_read, load
from .cli_options import (
    INSTRUMENT_OPTIONS,
    OUTPUT_OPTIONS,
    PRUNING_OPTIONS,
    QUANTIZATION_OPTIONS,
    SIMPLIFY_OPTIONS,
    VERIFICATION_OPTIONS,
    FiniteFloat,
    option_group,
    prune_options,
    pruning_asked,
    quantize_options,
    simplify_options,
    verify_options,
)
from .options import CalibrationOptions
from .prune import analyze, bn_gammas, plot_report
from .report import OptimizeReport, summarize
from .verify import VerificationReport, parse_shape_specs

INTERNAL_ERROR = 3
INTERRUPTED = 130
TERMINATED = 128 + signal.SIGTERM  # 143: what a shell reports for a process SIGTERM ended
# C0 and C1 control characters, DEL, and the line separators str.splitlines() also splits at.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Writing failed for want of room: the user's disk, not our bug.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _Console(Console):
    """rich's Console, except that a closed stdout (`onnxslim inspect m.onnx | head -1`) stops the
    printing, not the command: it still finishes and exits with its own code (rich exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _silence_stdout()


# Not a terminal (CI logs, pipes): wide enough that tables do not wrap.
console = _Console(highlight=False, width=None if sys.stdout.isatty() else 140)


class OnnxSlimGroup(click.Group):
    """Turns onnxslim's errors into one line and an exit code (a traceback only with --debug)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, with every way of ending said in one line: a usage error is one line and a
        hint (click prints the usage and a blank line first), Ctrl-C exits 130, a reader that
        closed our stdout (`| head -1`) ends us quietly, and a full disk under stdout is one line."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        self.arguments = list(sys.argv[1:] if args is None else args)
        previous = _on_sigterm(_raise_terminated)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            sys.stdout.flush()  # a write error on stdout surfaces here, not at interpreter exit
        except click.exceptions.NoArgsIsHelpError as error:  # `onnxslim` alone: the help, as click shows it
            error.show()
            code = error.exit_code
        except click.UsageError as error:
            _print_error(error.format_message(), self.arguments)
            if error.ctx is not None and error.ctx.command.get_help_option(error.ctx) is not None:
                click.echo(f"Try '{error.ctx.command_path} --help'.", err=True)
            code = error.exit_code
        except click.ClickException as error:
            _print_error(error.format_message(), self.arguments)
            code = error.exit_code
        except (click.Abort, KeyboardInterrupt) as error:  # click turns Ctrl-C into Abort (outside a command)
            terminated = isinstance(error, Terminated) or isinstance(error.__cause__, Terminated)
            _print_error("terminated" if terminated else "interrupted", self.arguments)
            code = TERMINATED if terminated else INTERRUPTED
        except OSError as error:
            if error.errno == errno.EPIPE:  # the reader has all it wanted: not an error
                _silence_stdout()
                code = 0
            elif error.errno in DISK_FULL:
                _print_error(f"cannot write the output: {error.strerror}", self.arguments)
                _silence_stdout()
                code = UsageError.exit_code
            else:
                raise
        finally:
            _on_sigterm(previous)
        sys.exit(code or 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM, after the cleanup it unwound through
            terminated = isinstance(error, Terminated)
            _on_sigterm(signal.SIG_IGN)  # a second SIGTERM must not cut our last line short
            _print_error("terminated" if terminated else "interrupted", self.arguments)
            ctx.exit(TERMINATED if terminated else INTERRUPTED)
        except OnnxSlimError as error:
            if ctx.meta.get("onnxslim.debug"):
                raise
            _print_error(str(error), self.arguments)
            ctx.exit(error.exit_code)
        except OSError as error:
            if ctx.meta.get("onnxslim.debug"):
                raise
            if error.errno == errno.EPIPE:  # click.echo to a closed stdout (click itself would exit 1)
                _silence_stdout()
                ctx.exit(0)
            if error.errno not in DISK_FULL:
                _report_bug(error, self.arguments)
            _print_error(f"cannot write the output: {error.strerror}", self.arguments)  # e.g. `onnxslim inspect m.onnx > /dev/full`
            _silence_stdout()  # what stdout still holds would fail again at exit
            ctx.exit(UsageError.exit_code)
        except Exception as error:  # a bug: still one line unless --debug
            if ctx.meta.get("onnxslim.debug"):
                raise
            _report_bug(error, self.arguments)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the command is, so it unwinds as Ctrl-C does: temp files and
    staged outputs are removed on the way out (the default action kills at once, leaving them)."""


def _raise_terminated(signum, frame) -> NoReturn:
    _on_sigterm(signal.SIG_IGN)  # once: a second SIGTERM during the cleanup would cut it short
    raise Terminated()


def _on_sigterm(handler):
    """Install `handler` for SIGTERM and return the one it replaces (None where Python cannot
    handle signals: not the main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _report_bug(error: BaseException, arguments: list[str]) -> NoReturn:
    _print_error(f"internal error: {type(error).__name__}: {error} (run again with --debug for the traceback)", arguments)
    sys.exit(INTERNAL_ERROR)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at interpreter exit finds no closed pipe to complain of."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # not a real file (CliRunner): nothing to flush
        pass


def _print_error(message: str, arguments: list[str] = ()) -> None:
    """One line on stderr: the message's first line (a third-party text's summary), or, when an
    argument holds a control character (a newline in a file name), the whole message with its
    control characters escaped: cut at the file name's newline, it would name another file."""
    if any(_CONTROL.search(str(argument)) for argument in arguments):
        message = _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), message.strip())
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    click.echo(f"onnxslim: error: {first_line}", err=True)


def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta["onnxslim.debug"] = True
    return value


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, callback=_set_debug, is_eager=True,
    help="Show the full traceback of an error.",
)


def _progress_bar():
    """A progress(stage, done, total) callback drawing one rich progress bar per stage (stderr)."""
    from rich.progress import Progress

    bars: dict = {}
    progress = Progress(console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())

    def update(stage: str, done: int, total: int | None) -> None:
        if stage not in bars:
            progress.start()
            bars[stage] = progress.add_task(stage, total=total)
        progress.update(bars[stage], completed=done, total=total)
        if total is not None and done >= total:
            progress.remove_task(bars.pop(stage))
            if not bars:
                progress.stop()

    return update


@click.group(cls=OnnxSlimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxslim")
@debug_option
def cli():
    """Shrink ONNX models for deployment, and prove the result computes the same thing."""


@cli.command()
@click.argument("source", type=click.Path(dir_okay=True, path_type=Path))
@click.argument("destination", type=click.Path(path_type=Path))
@option_group("simplification", *SIMPLIFY_OPTIONS)
@option_group("verification", click.option("--no-verify", is_flag=True, help="Do not check the result with onnxruntime."),
              *VERIFICATION_OPTIONS)
@option_group("simplification", *INSTRUMENT_OPTIONS)
@option_group("verification", click.option(
    "--force", is_flag=True, help="Write the result even if it fails verification (the exit code is still 1)."))
@option_group("output", *OUTPUT_OPTIONS)
@option_group("quantization", *QUANTIZATION_OPTIONS)
@option_group("pruning", *PRUNING_OPTIONS)
@debug_option
def optimize(source, destination, simplification, verification, output, quantization, pruning):
    """Optimize SOURCE and write the result to DESTINATION (verified with onnxruntime first).

    With --quantize int8 the simplified model is then quantized, calibrated on --calibration.
    """
    pruning_wanted = pruning_asked(pruning)
    if pruning.prune_plot is not None and not pruning_wanted:
        raise UsageError("--plot draws a pruning report: add --prune RATIO")
    if pruning.prune_plot is not None:
        _check_plot_path(pruning.prune_plot)
    # Every output is checked before any work: the model is written before the report and the plot.
    outputs = [(destination, "output model")]
    if output.external_data is not False:  # where the model's tensors go when they do not fit in it
        outputs.append((Path(f"{destination}.data"), "output model's external data"))
    _check_outputs([source], [*outputs, (output.json_path, "--json report"), (pruning.prune_plot, "--plot image")],
                   checked=len(outputs))
    verify = verify_options(verification)
    # --fidelity-target bounds quantization when there is one, else it searches the prune ratio.
    prune_target = quantization.fidelity_target if pruning_wanted and quantization.quantize is None else None
    quantize = quantize_options(quantization, None if prune_target else quantization.fidelity_target, pruning_wanted)
    calibration = CalibrationOptions(quantization.calibration, quantization.preprocess, quantization.calibration_limit)
    progress = _progress_bar() if quantize is not None or pruning_wanted else None
    prune = prune_options(pruning, prune_target, quantization.held_out)
    simplify = simplify_options(simplification)
    try:
        report = api.optimize_file(
            source, destination, overwrite_input=output.overwrite, external_data=output.external_data,
            simplify=simplify, verify=verify, quantize=quantize, prune=prune, calibration=calibration, progress=progress,
        )
    except VerificationError as error:
        _write_failure_json(output.json_path, error)
        if isinstance(error.report, OptimizeReport) and not output.quiet:
            _print_optimize_report(error.report)
        raise
    _write_report_files(report, output.json_path, pruning.prune_plot, destination)
    if not output.quiet:
        _print_optimize_report(report)
    console.print(_verdict_line(report))
    if report.verification is not None and not report.verification.passed:
        sys.exit(VerificationError.exit_code)


def _write_report_files(report: OptimizeReport, json_path: Path | None, plot: Path | None, destination: Path) -> None:
    """The --json report and the --plot image, once the model is written."""
    try:
        if json_path:
            _write_text(json_path, report.to_json())
        if plot is not None:
            try:
                with _staged(plot) as staged:
                    plot_report(report.pruning, staged)
            except OSError as error:
                raise UsageError(f"cannot write the --plot image {plot}: {error.strerror or error}") from error
    except UsageError as error:  # e.g. the disk filled up after the model was written
        raise UsageError(f"{error} (the model was written to {destination})") from error


def _verdict_line(report: OptimizeReport) -> str:
    before, after = report.before, report.after
    return (
        f"{report.verdict}: {before.nodes} -> {after.nodes} nodes, "
        f"{_megabytes(before.file_bytes)} -> {_megabytes(after.file_bytes)}, written to {report.output}"
    )


def _write_failure_json(path: Path | None, error: VerificationError) -> None:
    if not path:
        return
    if isinstance(error.report, OptimizeReport):
        data = error.report.to_dict()
    else:
        data = {"verdict": "FAILED", "verification": error.report.to_dict() if error.report else None}
    data["error"] = str(error)
    _write_text(path, json.dumps(data, indent=2, default=str))


def _check_outputs(models: list[Path], outputs: list[tuple[Path | None, str]], checked: int = 0) -> None:
    """Before any work: each output path (with what it is, e.g. "--json report") can be written and
    is neither a file the input models read (the models and their external data) nor another
    output. The first `checked` outputs only protect the others: the API checks them itself (the
    output model may replace the input with --overwrite)."""
    taken = [entry for model in models for entry in files_read(model)]
    for index, (path, what) in enumerate(outputs):
        if path is None:
            continue
        if str(path) == "-":  # would be a file named '-'
            raise UsageError(f"the {what} cannot go to stdout ('-'): give a file path")
        if index >= checked:
            check_output_path(path, what, taken)
        taken.append((path, f"the {what}"))


def _check_plot_path(path: Path) -> None:
    """Found before the model is written: matplotlib picks the format from the name, and fails late."""
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG image: give a path ending in .png, not {path}")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'onnxslim[plot]'")


def _write_text(path: Path, text: str) -> None:
    try:
        with _staged(path) as staged:
            staged.write_text(text + "\n")
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from error


@contextlib.contextmanager
def _staged(path: Path):
    """A path to write `path`'s content to, in a temp folder beside it, moved onto `path` when the
    block ends without an error and removed otherwise: a full disk or Ctrl-C midway leaves neither
    a half-written report (a CI would read a truncated JSON) nor the temp file."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnxslim-") as staging:
        staged = Path(staging) / path.name
        yield staged
        os.replace(staged, path)


@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@option_group("verification", *VERIFICATION_OPTIONS)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@debug_option
def verify(reference, candidate, verification, json_path):
    """Check that CANDIDATE computes what REFERENCE computes (exit 1 if it does not)."""
    _check_outputs([reference, candidate], [(json_path, "--json report")])
    report = api.compare(reference, candidate, verify_options(verification))
    if json_path:
        _write_text(json_path, json.dumps(report.to_dict(), indent=2))
    _print_verification(report)
    console.print(report.message)
    if not report.passed:
        sys.exit(VerificationError.exit_code)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@debug_option
def inspect(model, as_json):
    """Show a model's inputs, outputs, opsets, op counts (subgraphs included) and parameters."""
    summary = summarize(load(model))
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    console.print(f"[bold]{model}[/]  IR {summary.ir_version}, opsets "
                  + ", ".join(f"{domain} {version}" for domain, version in summary.opsets.items()))
    table = Table("", "name", "dtype", "shape", box=None)
    for kind, values in (("input", summary.inputs), ("output", summary.outputs)):
        for value in values:
            table.add_row(kind, value["name"], value["dtype"], _shape_text(value["shape"]))
    console.print(table)
    console.print(
        f"{summary.nodes} nodes, {summary.parameters:,} parameters, "
        f"{_megabytes(summary.tensor_bytes)} of tensors, {_megabytes(summary.file_bytes)} file"
    )
    ops = Table("op", "count", box=None)
    for op, count in sorted(summary.ops.items(), key=lambda item: (-item[1], item[0])):
        ops.add_row(op, str(count))
    console.print(ops)


@cli.command(name="prune-plan")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--ratio", type=FiniteFloat(0, 1, max_open=True), default=0.25, show_default=True,
              help="Show the channels each group keeps at this ratio.")
@click.option("--criterion", type=click.Choice(["l2", "l1", "bn"]), default="l2", show_default=True,
              help="Which channels a group keeps: by weight magnitude, or by the |γ| of the BatchNormalization after the layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
@debug_option
def prune_plan(model, ratio, criterion, as_json):
    """Show MODEL's channel groups: members, channels, share of parameters and MACs, frozen and why."""
    simplified = api.optimize(model, verify=False)
    gammas = bn_gammas(load(model, check=False)) if criterion == "bn" else None
    plan = analyze(simplified, criterion, gammas=gammas).choose(ratio)
    rows = plan.describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("group", "channels", f"kept at {ratio:g}", "params", "MACs", "producers", "consumers", "frozen because",
                  box=None)
    for row in rows:
        table.add_row(
            str(row["group"]), str(row["channels"]), str(row["kept"]), f"{row['parameter_share']:.1%}",
            _share(row["mac_share"]), _names(row["producers"]), _names(row["consumers"]), row["frozen"] or "",
        )
    console.print(table)
    prunable = [row for row in rows if not row["frozen"]]
    console.print(f"{len(prunable)} of {len(rows)} groups prunable, {plan.prunable_channels} channels; "
                  f"at {ratio:g}: {plan.removed_channels} removed")
    reasons: dict[str, list[str]] = {}
    for layer, why in plan.ownerless:
        reasons.setdefault(why, []).append(layer)
    for why, layers in reasons.items():
        console.print(f"{len(layers)} layer(s) make no channel group ({why}): {_names(layers)}", soft_wrap=True)


def _names(names: list[str], shown: int = 3) -> str:
    text = ", ".join(names[:shown])
    return text + (f" +{len(names) - shown}" if len(names) > shown else "")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@option_group("timing",
              click.option("--runs", default=DEFAULT_RUNS, show_default=True, type=click.IntRange(1),
                           help="Timed runs per model and thread count."),
              click.option("--warmup", default=DEFAULT_WARMUP, show_default=True, type=click.IntRange(0),
                           help="Untimed runs before timing."))
@option_group("feeds",
              click.option("--inputs", metavar="PATH",
                           help="Samples to feed: a folder or file of .npz (one array per input name), .npy or images."),
              click.option("--calibration", metavar="PATH", help="Same as --inputs (the calibration set of `optimize --quantize`)."),
              click.option("--preprocess", metavar="SPEC",
                           help="How images become inputs, e.g. size=224x224,mean=0.485:0.456:0.406,std=0.229:0.224:0.225."),
              click.option("--samples", default=DEFAULT_SAMPLES, show_default=True, type=click.IntRange(1),
                           help="Samples fidelity is measured on."),
              click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
                           help="Shape of a dynamic input for the random inputs, e.g. x:1,3,640,640 (without --inputs)."),
              click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the random inputs."))
@option_group("output",
              click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                           help="Also write the figures as JSON."),
              click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
                           help="Also write the table as markdown."))
@debug_option
def bench(models, timing, feeds, output):
    """Compare MODELS on this CPU: size, parameters, MACs, latency, peak memory, energy, and
    fidelity against the first model (e.g. original vs pruned vs int8). The files are only read."""
    if feeds.inputs and feeds.calibration:
        raise UsageError("--inputs and --calibration mean the same: give one of them")
    data = feeds.inputs or feeds.calibration
    _check_outputs(list(models), [(output.json_path, "--json file"), (output.markdown_path, "--markdown file")])
    options = BenchOptions(
        runs=timing.runs, warmup=timing.warmup, data=None if data == "random" else data,
        preprocess=feeds.preprocess, samples=feeds.samples, input_shapes=parse_shape_specs(feeds.input_shapes),
        seed=feeds.seed,
    )
    report = benchmark(models, options, progress=_progress_bar())
    if output.json_path:
        _write_text(output.json_path, report.to_json())
    if output.markdown_path:
        _write_text(output.markdown_path, report.to_markdown())
    header, rows = report.table()
    table = Table(*header, box=None)
    for column in table.columns[1:]:
        column.justify = "right"
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in report.explanations():
        console.print(line, soft_wrap=True)


@cli.command(name="passes")
@click.option("--pipelines", "show_pipelines", is_flag=True, help="List the pipeline presets instead.")
def list_passes(show_pipelines):
    """List the registered passes (or the pipeline presets)."""
    if show_pipelines:
        table = Table("preset", "pipeline", "description", box=None)
        for name in preset_names():
            preset = load_preset(name)
            table.add_row(name, preset["pipeline"], preset.get("description", ""))
        console.print(table)
        return
    table = Table("pass", "kind", "options", "summary", box=None)
    for spec in registered_passes():
        options = ", ".join(f"{key}={value}" for key, value in spec.options.items())
        table.add_row(spec.name, "lossless" if spec.lossless else "lossy", options, spec.summary)
    console.print(table)


# ----------------------------------------------------------------------------- printing


def _print_optimize_report(report: OptimizeReport) -> None:
    console.print(f"pipeline: {report.pipeline}", soft_wrap=True)
    before, after = report.before, report.after
    if after is not None:
        table = Table("", "before", "after", "change", title="model", title_justify="left", box=None)
        table.add_row("nodes", str(before.nodes), str(after.nodes), _change(before.nodes, after.nodes))
        table.add_row("parameters", f"{before.parameters:,}", f"{after.parameters:,}", _change(before.parameters, after.parameters))
        table.add_row("file", _megabytes(before.file_bytes), _megabytes(after.file_bytes), _change(before.file_bytes, after.file_bytes))
        for op in sorted(set(before.ops) | set(after.ops)):
            old, new = before.ops.get(op, 0), after.ops.get(op, 0)
            if old != new:
                table.add_row(f"  {op}", str(old), str(new), _change(old, new))
        console.print(table)
    if report.run is not None:
        passes = Table("pass", "runs", "nodes", "bytes", "seconds", "counters", title="passes", title_justify="left", box=None)
        for summary in report.passes:
            counters = ", ".join(f"{key}={value}" for key, value in summary.counters.items() if value)
            passes.add_row(
                summary.name, str(summary.runs), f"{-summary.nodes_removed:+d}" if summary.nodes_removed else "0",
                f"{-summary.bytes_removed:+,d}" if summary.bytes_removed else "0", f"{summary.seconds:.3f}", counters,
            )
        console.print(passes)
        for group in report.run.unconverged:
            console.print(f"[yellow]warning:[/] {group} did not converge")
    if report.pruning is not None:
        _print_pruning(report.pruning)
    if report.quantization is not None:
        _print_quantization(report.quantization)
    if report.verification is not None:
        _print_verification(report.verification)
    seconds = ", ".join(f"{key} {value:.2f}s" for key, value in report.seconds.items())
    console.print(f"time: {seconds}")
    for note in report.notes:
        console.print(f"note: {note}")


def _print_quantization(report) -> None:
    console.print(f"quantization: {report.summary()}", soft_wrap=True)
    console.print(f"  form: {report.mode} ({report.reason})", soft_wrap=True)
    console.print(f"  CPU: {report.cpu}", soft_wrap=True)
    if report.latency_ms:
        console.print("  latency (1 thread): " + ", ".join(f"{name} {value:.1f} ms" for name, value in report.latency_ms.items()))
    console.print(f"  calibration: {report.calibration_samples} samples ({report.calibration}); "
                  f"fidelity on {report.evaluation_samples} ({report.evaluation})", soft_wrap=True)
    if report.target:
        console.print(f"  target: {report.target}: {'met' if report.target_met else 'NOT met'}")
    kept = [layer for layer in report.layers if layer.status != "int8"]
    ranked = sorted(
        report.layers,
        key=lambda layer: layer.sensitivity_sqnr_db if layer.sensitivity_sqnr_db is not None else (layer.weight_sqnr_db or 0.0),
    )
    table = Table("layer", "op", "status", "weight SQNR dB", "alone: output SQNR dB", "why float", title="layers (worst first)",
                  title_justify="left", box=None)
    for layer in (kept + [layer for layer in ranked if layer.status == "int8"])[:12]:
        table.add_row(
            layer.name, layer.op, layer.status, _decibels(layer.weight_sqnr_db), _decibels(layer.sensitivity_sqnr_db), layer.reason
        )
    console.print(table)
    _print_more(len(report.layers) - 12, "layers")
    for note in report.notes:
        console.print(f"  note: {note}", soft_wrap=True)


def _print_pruning(report, shown: int = 12) -> None:
    console.print(f"pruning: {report.summary()}", soft_wrap=True)
    console.print(f"surgery check: {report.surgery_check}", soft_wrap=True)
    cut = sorted((group for group in report.groups if group["kept"] < group["channels"]),
                 key=lambda group: -(group["removed_score_share"] or 0.0))
    if cut:
        table = Table("group", "producers", "channels", "params", "MACs", "score removed", title="groups cut (most of their score removed first)",
                      title_justify="left", box=None)
        for group in cut[:shown]:
            table.add_row(str(group["group"]), _names(group["producers"], 2), f"{group['channels']} -> {group['kept']}",
                          f"{group['parameter_share']:.1%}", _share(group["mac_share"]), _share(group["removed_score_share"]))
        console.print(table)
        _print_more(len(cut) - shown, "groups")
    fitted = sorted(((name, layer) for name, layer in report.reconstruction.items() if layer["error_before"] is not None),
                    key=lambda item: -item[1]["error_before"])
    if fitted:
        table = Table("layer", "status", "error before", "after", "ridge", title="refit layers (output error, worst first)",
                      title_justify="left", box=None)
        for name, layer in fitted[:shown]:
            after = layer["error_after"] if layer["status"] == "refit" else layer["error_before"]
            table.add_row(name, layer["status"], f"{layer['error_before']:.4f}", f"{after:.4f}",
                          f"{layer['ridge']:g}" if layer["status"] == "refit" else "")
        console.print(table)
        _print_more(len(fitted) - shown, "layers")
    for note in report.notes:
        console.print(f"  note: {note}", soft_wrap=True)


def _print_more(count: int, what: str) -> None:
    """The line under a table cut short: how many rows the --json report has besides."""
    if count > 0:
        console.print(f"  ... {count} more {what} in the --json report")


def _share(value) -> str:
    return "" if value is None else f"{value:.1%}"


def _decibels(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _print_verification(report: VerificationReport) -> None:
    table = Table(
        "output", "shape", "dtype", "max abs", "max rel", "cosine", "needs tol", "verdict",
        title=f"verification ({report.mode}, {report.samples} sample(s), inputs {report.input_source})",
        title_justify="left", box=None,
    )
    for output in report.outputs:
        table.add_row(
            output.name, _shape_text(output.shape), output.dtype, f"{output.max_abs:.3g}", f"{output.max_rel:.3g}",
            f"{output.cosine:.6f}", f"{output.needed_tolerance:.3g}", "ok" if output.passed else f"[red]{output.problem}[/]",
        )
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")


def _shape_text(shape) -> str:
    return "?" if shape is None else "[" + ",".join(str(dim) for dim in shape) + "]"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _change(old: int, new: int) -> str:
    if old == new:
        return ""
    if old == 0:
        return f"+{new}"
    return f"{(new - old) / old:+.1%}"


def main() -> None:
    cli(prog_name="onnxslim")


if __name__ == "__main__":
    main()
