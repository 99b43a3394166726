"""The pass contract, the registry, pipelines as text, and the manager that runs them.

A pass is a function `(graph, ctx, **options) -> PassResult` registered by name. A pipeline is
a text such as `lift-constants,fixpoint(eliminate-noops,fold-constants,eliminate-dead-nodes)`
that parses to steps and prints back to the same text, so the model plus that text reproduces
a run. Instrumentation (statistics, verify-each, dumps, pass limits) lives here, not in passes.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import onnx_graphsurgeon as gs

from .errors import OnnxSlimError, PassFailure, PipelineError
from .graph import count_nodes, initializer_bytes

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ENTRY_POINT_GROUP = "onnxslim.passes"
DEFAULT_FIXPOINT_ROUNDS = 8
MAX_NESTING = 32  # fixpoint groups inside fixpoint groups
PIPELINES_FOLDER = Path(__file__).parent / "pipelines"

logger = logging.getLogger("onnxslim")


# ----------------------------------------------------------------------------- the contract


class PassResult:
    """What a pass reports: whether it changed the graph, and its own counters (e.g. folded=12).

    `changed` defaults to "some counter is non-zero", which is what almost every pass means.
    """

    def __init__(self, changed: bool | None = None, **counters: int):
        self.counters = {name: int(value) for name, value in counters.items()}
        self.changed = bool(changed) if changed is not None else any(self.counters.values())

    def __repr__(self) -> str:
        counters = ", ".join(f"{name}={value}" for name, value in self.counters.items())
        return f"PassResult(changed={self.changed}{', ' if counters else ''}{counters})"


@dataclass
class PassContext:
    """What a pass may know besides the graph: global options, a logger, calibration data."""

    options: dict = field(default_factory=dict)
    logger: logging.Logger = logger
    calibration: object | None = None


@dataclass(frozen=True)
class PassSpec:
    """A registered pass: its name, summary, whether it is lossless, and the options it takes."""

    name: str
    function: Callable
    summary: str
    lossless: bool
    options: dict
    # Whether it joins layers into one (e.g. parallel MatMuls into one and a Split): pruning then
    # runs on the model without it, so it sees the layers as exported, and it runs after pruning.
    joins_layers: bool = False

    def __call__(self, graph: gs.Graph, ctx: PassContext, **options) -> PassResult:
        result = self.function(graph, ctx, **self.check_options(options))
        if not isinstance(result, PassResult):
            raise PassFailure(f"pass '{self.name}' returned {type(result).__name__}, not a PassResult")
        return result


    def check_options(self, options: dict) -> dict:
        """`options` checked against the ones the pass declares, by the types of their defaults, and
        converted where that loses nothing (an integer where a float is declared, a number where text
        is). Raises PipelineError: a wrong value is refused before the pass runs, not only when it
        happens to be read (size_cap=abc went unnoticed when nothing folded)."""
        unknown = set(options) - set(self.options)
        if unknown:
            raise PipelineError(
                f"pass '{self.name}' has no option {', '.join(_quoted(key)[1:-1] for key in sorted(unknown))}"
                f" (it takes: {', '.join(self.options) or 'none'})"
            )
        return {key: _checked_option(self.name, key, value, self.options[key]) for key, value in options.items()}


def _checked_option(pass_name: str, key: str, value, default):
    def refuse(expected: str):
        return PipelineError(f"pass '{pass_name}' option {key} takes {expected}, not {_quoted(_format_value(value))}")

    if default is None:  # nothing declared
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 1e6
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise refuse("an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise refuse("a finite number")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        return _format_value(value)  # a node name such as 123 was read as a number
    return value


_REGISTRY: dict[str, PassSpec] = {}
_discovered = False  # plug-in entry points loaded
_builtins_imported = False


def register_pass(name: str, *, lossless: bool = True, joins_layers: bool = False):
    """Register `function(graph, ctx, **options) -> PassResult` under `name` (kebab-case).

    Its docstring's first line is the summary `onnxslim passes` prints; keyword-only
    parameters with defaults are its options (`name{option=value}` in a pipeline text).
    `joins_layers`: see PassSpec.
    """
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
        raise ValueError(f"pass names are kebab-case: {name!r}")

    def decorate(function: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].function is not function:
            raise ValueError(f"a pass named {name!r} is already registered")
        summary = (inspect.getdoc(function) or "").strip().splitlines()
        options = {
            parameter.name: parameter.default
            for parameter in inspect.signature(function).parameters.values()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }
        _REGISTRY[name] = PassSpec(name, function, summary[0] if summary else "", lossless, options, joins_layers)
        return function

    return decorate


def _discover(plugins: bool = True) -> None:
    """Import onnxslim's own passes, and (once, when `plugins`) every package's `onnxslim.passes`
    entry points. Reading the installed packages' metadata costs milliseconds, so a pipeline of
    built-in passes does not wait for it."""
    global _discovered, _builtins_imported
    if not _builtins_imported:
        importlib.import_module("onnxslim.passes")
        _builtins_imported = True
    if _discovered or not plugins:
        return
    _discovered = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:  # a broken plug-in must not break onnxslim itself
            logger.warning("could not load passes from %s: %s", entry_point.value, error)


def registered_passes() -> list[PassSpec]:
    _discover()
    return sorted(_REGISTRY.values(), key=lambda spec: spec.name)


def get_pass(name: str) -> PassSpec:
    _discover(plugins=False)
    if name not in _REGISTRY:
        _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise PipelineError(f"unknown pass {_quoted(name)} (known passes: {known})") from None


# ----------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class PassCall:
    """One pass in a pipeline, with its options."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{key}={_format_value(value)}" for key, value in self.options) + "}"


@dataclass(frozen=True)
class Fixpoint:
    """Steps repeated until none of them changes the graph, at most `rounds` times."""

    steps: tuple
    rounds: int = DEFAULT_FIXPOINT_ROUNDS

    def __str__(self) -> str:
        bound = "" if self.rounds == DEFAULT_FIXPOINT_ROUNDS else f"[{self.rounds}]"
        return f"fixpoint{bound}(" + ",".join(str(step) for step in self.steps) + ")"


Step = PassCall | Fixpoint


class Pipeline:
    """An ordered list of passes and fixed-point groups; `str(pipeline)` parses back to it."""

    def __init__(self, steps: Sequence[Step]):
        self.steps = tuple(steps)

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        parser = _PipelineParser(text)
        steps = parser.steps(closing=None)
        return cls(steps)

    @classmethod
    def preset(cls, name: str) -> "Pipeline":
        """A pipeline from onnxslim/pipelines/NAME.toml."""
        return cls.parse(load_preset(name)["pipeline"])

    def __str__(self) -> str:
        return ",".join(str(step) for step in self.steps)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Pipeline) and self.steps == other.steps

    def pass_names(self) -> list[str]:
        return [call.name for call in _calls(self.steps)]

    def without(self, names: Sequence[str]) -> "Pipeline":
        """This pipeline minus the named passes (a fixed-point group left empty disappears)."""
        for name in names:
            get_pass(name)
        return Pipeline(_remove(self.steps, set(names)))

    def with_options(self, name: str, **options) -> "Pipeline":
        """This pipeline with `options` set on every call of pass `name`."""
        return Pipeline(_set_options(self.steps, name, options))

    def validate(self) -> None:
        """Raise PipelineError if a pass is unknown or given an option it does not take or a value
        of another type than the option's."""
        for call in _calls(self.steps):
            get_pass(call.name).check_options(dict(call.options))

    def is_lossless(self) -> bool:
        return all(get_pass(name).lossless for name in self.pass_names())


def load_preset(name: str) -> dict:
    path = PIPELINES_FOLDER / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(preset_names()))
        raise PipelineError(f"unknown pipeline preset '{name}' (presets: {known})")
    with path.open("rb") as file:
        return tomllib.load(file)


def preset_names() -> list[str]:
    return sorted(path.stem for path in PIPELINES_FOLDER.glob("*.toml"))


def _calls(steps) -> Iterator[PassCall]:
    for step in steps:
        if isinstance(step, Fixpoint):
            yield from _calls(step.steps)
        else:
            yield step


def _remove(steps, names: set[str]) -> list[Step]:
    kept: list[Step] = []
    for step in steps:
        if isinstance(step, Fixpoint):
            inner = _remove(step.steps, names)
            if inner:
                kept.append(Fixpoint(tuple(inner), step.rounds))
        elif step.name not in names:
            kept.append(step)
    return kept


def _set_options(steps, name: str, options: dict) -> list[Step]:
    result: list[Step] = []
    for step in steps:
        if isinstance(step, Fixpoint):
            result.append(Fixpoint(tuple(_set_options(step.steps, name, options)), step.rounds))
        elif step.name == name:
            merged = dict(step.options) | options
            result.append(PassCall(step.name, tuple(sorted(merged.items()))))
        else:
            result.append(step)
    return result


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _quoted(text: str | None, limit: int = 80) -> str:
    """`text` quoted for a one-line error, cut to `limit` characters (a pipeline text may be 100 KB)."""
    if text is None:
        return "the end"
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


class _PipelineParser:
    """Recursive descent over `step (',' step)*` where step is `name{k=v,...}` or `fixpoint[N](steps)`."""

    TOKEN = re.compile(r"\s*([A-Za-z0-9_.\-]+|[(){}\[\],=])")

    def __init__(self, text: str):
        self.text = text
        self.tokens = self._tokenize(text)
        if not self.tokens:  # `--passes ''` ran the default pipeline
            raise PipelineError("the pipeline is empty: name at least one pass")
        self.position = 0
        self.depth = 0

    def _tokenize(self, text: str) -> list[str]:
        tokens, position = [], 0
        while position < len(text):
            if text[position:].strip() == "":
                break
            match = self.TOKEN.match(text, position)
            if not match:
                raise PipelineError(f"cannot parse pipeline {_quoted(text)} at {_quoted(text[position:])}")
            tokens.append(match.group(1))
            position = match.end()
        return tokens

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        if token is None or (expected is not None and token != expected):
            wanted = f"'{expected}'" if expected else "more"
            raise PipelineError(f"cannot parse pipeline {_quoted(self.text)}: expected {wanted}, found {_quoted(token)}")
        self.position += 1
        return token

    def steps(self, closing: str | None) -> list[Step]:
        steps = [self.step()]
        while self._peek() == ",":
            self._take(",")
            steps.append(self.step())
        if closing is None and self._peek() is not None:
            raise PipelineError(f"cannot parse pipeline {_quoted(self.text)}: unexpected {_quoted(self._peek())}")
        return steps

    def step(self) -> Step:
        name = self._take()
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9\-_]*", name):
            raise PipelineError(f"cannot parse pipeline {_quoted(self.text)}: {_quoted(name)} is not a pass name")
        if name == "fixpoint":
            rounds = DEFAULT_FIXPOINT_ROUNDS
            if self._peek() == "[":
                self._take("[")
                bound = self._take()
                if not bound.isdigit() or int(bound) < 1:
                    raise PipelineError(f"fixpoint bound must be a positive integer, got {_quoted(bound)}")
                rounds = int(bound)
                self._take("]")
            self._take("(")
            self.depth += 1
            if self.depth > MAX_NESTING:  # no pipeline needs more; Python's recursion limit would be next
                raise PipelineError(f"cannot parse pipeline: fixpoint groups nested more than {MAX_NESTING} deep")
            inner = self.steps(closing=")")
            self.depth -= 1
            self._take(")")
            return Fixpoint(tuple(inner), rounds)
        options: list[tuple[str, object]] = []
        if self._peek() == "{":
            self._take("{")
            while True:
                key = self._take().replace("-", "_")
                self._take("=")
                if any(key == given for given, _ in options):  # which one was meant?
                    raise PipelineError(f"cannot parse pipeline {_quoted(self.text)}: pass '{name}' is given option "
                                        f"{_quoted(key)} twice")
                options.append((key, _parse_value(self._take())))
                if self._peek() == ",":
                    self._take(",")
                    continue
                self._take("}")
                break
        return PassCall(name, tuple(options))


# ----------------------------------------------------------------------------- running


@dataclass
class PassExecution:
    """Statistics of one execution of one pass (a pass in a fixed-point group runs several times)."""

    index: int
    name: str
    changed: bool
    counters: dict
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Instrument:
    """Hooks the manager calls around passes; subclasses override what they need."""

    def before_run(self, graph: gs.Graph) -> None: ...

    def after_pass(self, execution: PassExecution, graph: gs.Graph) -> None: ...


@dataclass
class RunRecord:
    """What the manager did: the pipeline text, every execution, and whether a limit stopped it."""

    pipeline: str
    executions: list[PassExecution] = field(default_factory=list)
    stopped_at_limit: bool = False
    unconverged: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _LimitReached(Exception):
    pass


class PassManager:
    """Runs a pipeline over a graph, measuring nodes, initializer bytes and time around every pass."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        context: PassContext | None = None,
        instruments: Sequence[Instrument] = (),
        pass_limit: int | None = None,
    ):
        pipeline.validate()
        self.pipeline = pipeline
        self.context = context or PassContext()
        self.instruments = list(instruments)
        self.pass_limit = pass_limit

    def run(self, graph: gs.Graph) -> RunRecord:
        record = RunRecord(pipeline=str(self.pipeline))
        self._measured: tuple[int, int] | None = None
        started = time.perf_counter()
        for instrument in self.instruments:
            instrument.before_run(graph)
        try:
            self._run_steps(self.pipeline.steps, graph, record)
        except _LimitReached:
            record.stopped_at_limit = True
        record.seconds = time.perf_counter() - started
        return record

    def _run_steps(self, steps, graph: gs.Graph, record: RunRecord) -> bool:
        changed = False
        for step in steps:
            if isinstance(step, Fixpoint):
                changed |= self._run_fixpoint(step, graph, record)
            else:
                changed |= self._run_pass(step, graph, record)
        return changed

    def _run_fixpoint(self, group: Fixpoint, graph: gs.Graph, record: RunRecord) -> bool:
        """Repeat the group until a full cycle of its steps changes nothing, at most `rounds` rounds.

        The cycle may end mid-round: passes are deterministic and idempotent (the contract), so a
        step that ran after the last change would change nothing if it ran again.
        """
        changed_any = False
        unchanged_in_a_row = 0
        for _ in range(group.rounds):
            for step in group.steps:
                if unchanged_in_a_row >= len(group.steps):
                    return changed_any
                changed = self._run_steps([step], graph, record)
                unchanged_in_a_row = 0 if changed else unchanged_in_a_row + 1
                changed_any |= changed
            if unchanged_in_a_row >= len(group.steps):
                return changed_any
        record.unconverged.append(str(group))
        self.context.logger.warning("%s did not converge in %d rounds", group, group.rounds)
        return changed_any

    def _run_pass(self, call: PassCall, graph: gs.Graph, record: RunRecord) -> bool:
        if self.pass_limit is not None and len(record.executions) >= self.pass_limit:
            raise _LimitReached
        spec = get_pass(call.name)
        if self._measured is None:
            self._measured = (count_nodes(graph), initializer_bytes(graph))
        nodes_before, bytes_before = self._measured
        started = time.perf_counter()
        try:
            result = spec(graph, self.context, **dict(call.options))
        except OnnxSlimError:
            raise
        except Exception as error:
            raise PassFailure(f"pass '{call.name}' failed on this model: {type(error).__name__}: {error}") from error
        seconds = time.perf_counter() - started
        if result.changed:  # an unchanged graph keeps its figures; measuring costs a walk
            self._measured = (count_nodes(graph), initializer_bytes(graph))
        nodes_after, bytes_after = self._measured
        execution = PassExecution(
            index=len(record.executions) + 1,
            name=call.name,
            changed=result.changed,
            counters=result.counters,
            nodes_before=nodes_before,
            nodes_after=nodes_after,
            bytes_before=bytes_before,
            bytes_after=bytes_after,
            seconds=seconds,
        )
        record.executions.append(execution)
        for instrument in self.instruments:
            instrument.after_pass(execution, graph)
        return result.changed
