"""What pruning did, in words: the report a pruning returns, its one-line summary and the notes
the driver adds (allocation, surgery check, fidelity, a fidelity target's search)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .allocation import SENSITIVITY_LEVELS


@dataclass
class PruneReport:
    """What pruning did: the groups (channels before/after, frozen and why), parameters, the
    surgery check, each refit layer's error, and the pruned model's fidelity."""

    ratio: float
    criterion: str
    groups: list[dict]
    prunable_channels: int
    removed_channels: int
    parameters_before: int
    parameters_after: int = 0
    surgery_check: str = "not run"
    surgery_exact: bool | None = None
    reconstruction: dict = field(default_factory=dict)  # layer -> {status, error_before, error_after, ridge, reason}
    fidelity: dict = field(default_factory=dict)  # worst output's sqnr_db / cosine, with and without refit
    notes: list[str] = field(default_factory=list)
    target: str | None = None
    target_met: bool | None = None
    macs_before: int = 0
    macs_after: int = 0

    def final_fidelity(self) -> dict:
        """The delivered model's figures: refit if there was one."""
        return self.fidelity.get("pruned + refit") or self.fidelity.get("pruned") or {}

    def summary(self) -> str:
        share = self.removed_channels / self.prunable_channels if self.prunable_channels else 0.0
        frozen = sum(1 for group in self.groups if group["frozen"])
        text = (f"pruned {self.removed_channels} of {self.prunable_channels} prunable channels ({share:.0%}) in "
                f"{len(self.groups) - frozen} groups ({frozen} frozen); parameters {self.parameters_before:,} -> "
                f"{self.parameters_after:,}")
        if self.macs_before:
            text += f"; MACs {self.macs_before / 1e6:,.1f} M -> {self.macs_after / 1e6:,.1f} M"
        refit = [layer for layer in self.reconstruction.values() if layer["status"] == "refit"]
        if self.reconstruction:
            text += f"; {len(refit)} of {len(self.reconstruction)} layers refit"
        if self.fidelity:
            text += "; " + ", ".join(f"{key} SQNR {value['sqnr_db']:.1f} dB cosine {value['cosine']:.4f}"
                                     for key, value in self.fidelity.items())
        return text

    def to_dict(self) -> dict:
        return asdict(self)


NO_DATA = "no calibration data: no reconstruction and no fidelity figures"
REFIT_NOT_FINITE = "the refit gave NaN or infinity on the evaluation samples: the pruned weights are kept"


def allocation_note(samples: int | None) -> str:
    """How the groups' shares were chosen: measured sensitivity on `samples`, or uniform (None)."""
    if samples is None:
        return "allocation: every group loses the same share (uniform)"
    return (f"allocation: shares by measured sensitivity on {samples} calibration "
            f"samples (levels {', '.join(f'{level:g}' for level in SENSITIVITY_LEVELS)})")


def gamma_note(gamma_layers: tuple[int, int]) -> str:
    return (f"criterion bn: {gamma_layers[0]} of {gamma_layers[1]} layers scored by their "
            "BatchNormalization's |γ|, the others by l2")


def surgery_note(passed: bool, message: str, samples: int) -> str:
    """The surgery check's result on `samples` calibration samples (0: none, random inputs only) and 2 random inputs."""
    inputs = f"{count(samples, 'calibration sample')} and 2 random inputs" if samples else "2 random inputs"
    if passed:
        return f"exact: equal to the original with the removed channels' weights zeroed on {inputs}, {message}"
    return f"NOT exact on {inputs}: {message}"


def fidelity_note(samples: int, held_out: bool, used: list[str]) -> str:
    """Which samples the fidelity figures come from, and which steps of pruning saw them too."""
    if held_out:
        return f"fidelity measured on {count(samples, 'sample')} held out from pruning"
    return (f"fidelity measured on the last {count(samples, 'sample')} of the calibration data"
            + (f", which {series(used)} used too" if used else "") + " (--held-out N keeps samples apart)")


def target_note(target, ratio: float, tried: list[tuple[float, dict]]) -> str:
    return (f"fidelity target {target}: ratio {ratio:.3f} is the largest found meeting it (tried "
            + ", ".join(f"{value:.3f}: SQNR {fidelity['sqnr_db']:.1f} dB" for value, fidelity in tried) + ")")


def count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def series(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else "".join(words)
