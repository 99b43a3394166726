"""Structured channel pruning: dependency groups on the ONNX graph, and the surgery that removes them.

    plan = analyze(model)                    # groups of channels that must go together
    pruned, zeroed = prune_model(model, plan.choose(ratio=0.25))

1. **Groups** (analysis.py, with a handler per op in layer_handlers.py, channel_handlers.py and
   shape_handlers.py). Every layer that owns output channels (Conv, ConvTranspose, Gemm and
   MatMul with a constant weight) starts a group. Its channels are followed through the graph:
   ops that act per channel pass them on (activations, pooling, Resize by spatial scales,
   depthwise Conv, BatchNormalization, per-channel Mul/Add constants); element-wise ops joining
   two tensors (residual Add, squeeze-excitation Mul) tie both groups into one; Concat lays groups
   side by side at their offsets, and Split on the channel axis divides them (a group cut by a
   split point becomes two); Flatten turns each channel into a block of features for the Gemm
   that reads it. The layers that read the channels (their weights' input axis) are the group's
   consumers. Anything else that reads a group's channels (a graph output, an unknown op, Slice
   on the channel axis, a Reshape that is not a flatten, LayerNorm over channels...) freezes the
   group, and the plan says why. The plan's records (records.py) name nodes by their first
   output's tensor name, so that a plan made on one import of a model applies to another.
2. **Choice** (criteria.py, allocation.py). Each group keeps its strongest channels (weight
   magnitude summed over the group's producers, each layer's scores normalised by their mean;
   with calibration data, what the channels carry into their consumers, see activation_scores)
   and loses `ratio` of them, never all; with calibration data each group's share follows what
   pruning it alone costs the outputs.
3. **Surgery** (surgery.py). Every tensor that carries the channels is cut: producers' weight
   rows and biases, per-channel constants, depthwise weights (and their `group`), Split sizes,
   consumers' weight columns. Inferred shapes are dropped for re-inference. The same plan applied
   as zeros (the consumers' weight columns for removed channels set to 0, nothing removed) gives
   the model the pruned one must equal exactly (`zeroed_reference`): that separates surgery bugs
   from pruning's cost.
4. **The whole step** (driver.py: prune), its options (options.py), its report in words
   (report.py) and a picture of it (plot.py).
"""

from ..layers import LAYER_OPS
from .allocation import (ALLOCATIONS, SENSITIVITY_LEVELS, SENSITIVITY_SAMPLES, SENSITIVITY_WORK, allocate,
                         allocate_from_costs, sensitivity_costs, sensitivity_samples)
from .analysis import analyze, bn_gammas
from .channel_handlers import ELEMENTWISE_OPS, PER_CHANNEL_OPS, SPATIAL_OPS
from .criteria import (CRITERIA, DATA_CRITERIA, GRAM_RIDGE, IDLE_FLOOR, MOMENT_SAMPLES, ChannelMoments,
                       activation_scores, input_moments)
from .driver import BUDGET_STEPS, SEARCH_STEPS, plan_shapes, prune
from .layers import bias_slots
from .options import PruneOptions
from .plot import plot_report
from .records import Channels, Cut, Group, PrunePlan
from .report import PruneReport
from .surgery import prune_model

__all__ = [
    "ALLOCATIONS", "BUDGET_STEPS", "CRITERIA", "DATA_CRITERIA", "ELEMENTWISE_OPS", "GRAM_RIDGE", "IDLE_FLOOR",
    "LAYER_OPS", "MOMENT_SAMPLES", "PER_CHANNEL_OPS", "SEARCH_STEPS", "SENSITIVITY_LEVELS", "SENSITIVITY_SAMPLES",
    "SENSITIVITY_WORK", "SPATIAL_OPS", "ChannelMoments", "Channels", "Cut", "Group", "PruneOptions", "PrunePlan",
    "PruneReport", "activation_scores", "allocate", "allocate_from_costs", "analyze", "bias_slots", "bn_gammas",
    "input_moments", "plan_shapes", "plot_report", "prune", "prune_model", "sensitivity_costs", "sensitivity_samples",
]
