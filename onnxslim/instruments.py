"""Instrumentation the manager runs around passes: verify-each and dumping every step."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from .errors import VerificationError
from .manager import Instrument, PassExecution
from .model import save, to_model
from .verify import Verifier


class VerifyEach(Instrument):
    """After every pass that changed the graph, check it against reference outputs captured once.

    The first pass that breaks equivalence is named, and the models before and after it are
    saved in `folder`, so the failing rewrite can be looked at in isolation.
    """

    def __init__(self, verifier: Verifier, template: onnx.ModelProto, folder: str | Path):
        self.verifier = verifier
        self.template = template
        self.folder = Path(folder)
        self.last_good = template
        self.checked = 0

    def after_pass(self, execution: PassExecution, graph: gs.Graph) -> None:
        if not execution.changed:
            return
        candidate = to_model(graph, self.template)
        report = self.verifier.check(candidate, label=f"model after pass '{execution.name}'")
        self.checked += 1
        if report.passed:
            self.last_good = candidate
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"{execution.index:03d}-{execution.name}"
        before = save(self.last_good, self.folder / f"{stem}-before.onnx")
        after = save(candidate, self.folder / f"{stem}-after.onnx")
        raise VerificationError(
            f"pass '{execution.name}' (execution {execution.index}) broke equivalence: {report.message}; "
            f"models before and after it: {before}, {after}",
            report,
        )


class DumpEach(Instrument):
    """Save the model before the first pass and after every pass that changed it."""

    def __init__(self, template: onnx.ModelProto, folder: str | Path):
        self.template = template
        self.folder = Path(folder)

    def before_run(self, graph: gs.Graph) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save(to_model(graph, self.template), self.folder / "000-input.onnx")

    def after_pass(self, execution: PassExecution, graph: gs.Graph) -> None:
        if execution.changed:
            save(to_model(graph, self.template), self.folder / f"{execution.index:03d}-{execution.name}.onnx")
