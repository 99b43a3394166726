"""onnxslim: an ONNX graph optimizer for deployment.

    import onnxslim
    model = onnxslim.optimize("model.onnx")          # lossless pipeline, verified with onnxruntime
    model, report = onnxslim.optimize(model, return_report=True)
    onnxslim.save(model, "model.slim.onnx")
"""

from . import runtime as _runtime

_runtime.start_early()  # before the imports below, which its own import of onnxruntime overlaps

from .api import optimize, optimize_file, resolve_pipeline, verify
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
from .verify import FidelityBudget, VerificationReport

from . import passes as _builtin_passes  # registers onnxslim's own passes at import, like any library's setup

__version__ = "0.1.0"

__all__ = [
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
    "UsageError",
    "VerificationError",
    "VerificationReport",
    "VerificationUnavailable",
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
