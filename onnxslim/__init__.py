"""onnxslim: an ONNX graph optimizer for deployment.

    import onnxslim
    model = onnxslim.optimize("model.onnx")          # lossless pipeline, verified with onnxruntime
    model, report = onnxslim.optimize(model, return_report=True)
    onnxslim.save(model, "model.slim.onnx")
"""

import os as _os

# onnxruntime's telemetry prints a coloured warning of its own to stderr at import when it cannot
# store its device ID (a HOME the user cannot write, as a service account's); an explicit setting is kept.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # the worker inherits it

from . import runtime as _runtime  # noqa: E402 (after the setting above)

_runtime.start_early()  # before the imports below, which its own import of onnxruntime overlaps

from .api import optimize, optimize_file, verify  # noqa: E402
from .errors import (
    InputSpecError,
    ModelLoadError,
    ModelSaveError,
    OnnxSlimError,
    PassFailure,
    PipelineError,
    UsageError,
    VerificationError,
    VerificationUnavailable,
)
from .manager import PassContext, PassResult, Pipeline, get_pass, register_pass, registered_passes
from .model import load, save
from .options import CalibrationOptions, QuantizeOptions, SimplifyOptions, VerifyOptions, resolve_pipeline
from .prune import PruneOptions
from .verify import FidelityBudget, VerificationReport

from . import passes as _builtin_passes  # registers onnxslim's own passes at import, like any library's setup

__version__ = "0.1.0"

__all__ = [
    "CalibrationOptions",
    "FidelityBudget",
    "InputSpecError",
    "ModelLoadError",
    "ModelSaveError",
    "OnnxSlimError",
    "PassContext",
    "PassFailure",
    "PassResult",
    "Pipeline",
    "PipelineError",
    "PruneOptions",
    "QuantizeOptions",
    "SimplifyOptions",
    "UsageError",
    "VerificationError",
    "VerificationReport",
    "VerificationUnavailable",
    "VerifyOptions",
    "get_pass",
    "load",
    "optimize",
    "optimize_file",
    "register_pass",
    "registered_passes",
    "resolve_pipeline",
    "save",
    "verify",
]
