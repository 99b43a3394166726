"""A picture of a pruning: channels kept per group and each refit layer's error (matplotlib)."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .report import PruneReport


def plot_report(report: PruneReport, path) -> None:
    """A PNG of the channels kept per layer (per channel group, named by the layer that makes its
    channels) and each refit layer's error before and after (matplotlib, the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UsageError("--plot needs matplotlib: pip install 'onnxslim[plot]'") from error
    groups = [group for group in report.groups if not group["frozen"]]
    layers = {name: fit for name, fit in report.reconstruction.items() if fit["error_before"] is not None}
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(groups) * 0.25), 7), constrained_layout=True)
    index = np.arange(len(groups))
    top.bar(index, [group["channels"] for group in groups], color="#d0d0d0", label="channels")
    top.bar(index, [group["kept"] for group in groups], color="#3b75af", label="kept")
    names = [group["producers"][0] + (f" +{len(group['producers']) - 1}" if len(group["producers"]) > 1 else "")
             if group["producers"] else str(group["group"]) for group in groups]
    top.set_xticks(index, names, fontsize=5, rotation=90)
    top.set_xlabel("layer making the channels (+N: others tied to it)")
    top.set_ylabel("channels")
    top.set_title(f"pruned {report.removed_channels} of {report.prunable_channels} prunable channels")
    top.legend()
    if layers:
        positions = np.arange(len(layers))
        before = [fit["error_before"] for fit in layers.values()]
        # a layer whose refit was not kept keeps its pruned weights, and their error
        after = [fit["error_after"] if fit["status"] == "refit" else fit["error_before"] for fit in layers.values()]
        bottom.plot(positions, before, "o-", color="#c44e52", label="before refit")
        bottom.plot(positions, after, "o-", color="#55a868", label="after refit")
        bottom.set_yscale("log")
        bottom.set_xticks(positions, list(layers), fontsize=5, rotation=90)
        bottom.set_ylabel("relative layer error")
        bottom.legend()
    else:
        bottom.text(0.5, 0.5, "no layer refit: no calibration data, --no-reconstruct, or too few rows per layer", ha="center", va="center")
        bottom.set_axis_off()
    figure.savefig(path, dpi=120)
    plt.close(figure)
