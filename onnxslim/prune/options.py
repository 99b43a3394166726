"""How to prune: the options of one pruning, checked when they are made."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .allocation import ALLOCATIONS
from .criteria import CRITERIA


@dataclass(frozen=True)
class PruneOptions:
    """How to prune: `ratio` of each prunable group's channels removed (the strongest kept by
    `criterion`), kept counts rounded to `round_to`; `reconstruct` refits the layers that lost
    input channels on the calibration data; `check_surgery` compares the pruned model with the
    zeroed original (they must be equal)."""

    ratio: float = 0.25
    criterion: str = "auto"
    round_to: int = 1
    reconstruct: bool = True
    check_surgery: bool = False
    # "sensitivity": with calibration data, each group's share follows how much pruning it alone
    # costs the model's outputs (measured); "uniform": every group loses `ratio`.
    allocation: str = "sensitivity"
    # Which layers are refit: those that lost input channels ("consumers"), or also every layer
    # after the first of them ("downstream").
    refit: str = "consumers"
    fidelity_target: object | None = None  # onnxslim.quantize.FidelityTarget: search the ratio (at most `ratio`)
    macs: float | None = None  # instead of `ratio`: this share of the model's multiply-adds removed
    parameters: float | None = None  # instead of `ratio`: this share of the model's parameters removed
    compensate: bool = True  # with data: removed channels' mean contribution moves into the consumers' biases
    # Samples kept apart: the last `held_out` calibration samples are not used to choose, allocate
    # or refit, and the fidelity figures (and the fidelity target's search) are measured on them.
    # Default 0: every sample serves, and fidelity is measured on the last 8 of them.
    held_out: int = 0

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise UsageError(f"--prune takes a ratio in [0, 1), not {self.ratio}")
        if self.criterion not in CRITERIA:
            raise UsageError(f"prune criterion must be one of {', '.join(CRITERIA)}, not '{self.criterion}'")
        if self.parameters is not None and not 0 < self.parameters < 1:
            raise UsageError(f"--prune-params takes the share of parameters to remove, in (0, 1), not {self.parameters}")
        if self.macs is not None and not 0 < self.macs < 1:
            raise UsageError(f"--prune-macs takes the share of multiply-adds to remove, in (0, 1), not {self.macs}")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"prune allocation must be one of {', '.join(ALLOCATIONS)}, not '{self.allocation}'")
        if self.round_to < 1:
            raise UsageError(f"--prune-round takes a positive multiple, not {self.round_to}")
        if self.held_out < 0:
            raise UsageError(f"--held-out takes a number of samples, not {self.held_out}")
