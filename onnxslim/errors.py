"""User-facing errors. Each cause has its own type; the CLI maps them to exit codes."""

from __future__ import annotations


class OnnxSlimError(Exception):
    """Base of every error onnxslim reports to a person. `exit_code` is what the CLI returns."""

    exit_code = 2


class UsageError(OnnxSlimError):
    """An option or argument does not make sense (e.g. the output path is the input path)."""


class ModelLoadError(OnnxSlimError):
    """The input is not a readable, valid ONNX model."""


class ModelSaveError(OnnxSlimError):
    """The output could not be written."""


class PipelineError(OnnxSlimError):
    """A pipeline text names an unknown pass or is malformed."""


class InputSpecError(OnnxSlimError):
    """Verification inputs are missing or do not match the model (shapes, names, dtypes)."""


class VerificationUnavailable(OnnxSlimError):
    """onnxruntime cannot run a model, so equivalence cannot be checked."""


class RuntimeFailure(VerificationUnavailable):
    """onnxruntime's worker process crashed, hung or ran out of memory on a model.

    Exit 2: the model is at fault when it happens to the model the user gave; where it happens to
    a model onnxslim made, the caller turns it into a failed verification instead.
    """


class RuntimeCrash(RuntimeFailure):
    """onnxruntime died of a signal (e.g. SIGFPE from an int64 division overflow) on a model."""


class RuntimeTimeout(RuntimeFailure):
    """onnxruntime did not finish loading or running a model within the time limit."""


class RuntimeOutOfMemory(RuntimeFailure):
    """onnxruntime ran out of memory (the worker's memory limit) on a model."""


class WorkerFailure(OnnxSlimError):
    """onnxruntime's worker process could not start or broke its protocol: our bug, not the model's."""

    exit_code = 3


class VerificationError(OnnxSlimError):
    """The optimized model does not compute what the original computes."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class PassFailure(OnnxSlimError):
    """A pass raised on this model: a bug in that pass, not in the model."""

    exit_code = 3
