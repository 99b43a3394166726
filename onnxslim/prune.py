"""Structured channel pruning: dependency groups on the ONNX graph, and the surgery that removes them.

    plan = analyze(model)                    # groups of channels that must go together
    pruned, zeroed = prune_model(model, plan.choose(ratio=0.25))

1. **Groups.** Every layer that owns output channels (Conv, ConvTranspose, Gemm and MatMul with a
   constant weight) starts a group. Its channels are followed through the graph: ops that act
   per channel pass them on (activations, pooling, Resize by spatial scales, depthwise Conv,
   BatchNormalization, per-channel Mul/Add constants); element-wise ops joining two tensors
   (residual Add, squeeze-excitation Mul) tie both groups into one; Concat lays groups side by
   side at their offsets, and Split on the channel axis divides them (a group cut by a split point
   becomes two); Flatten turns each channel into a block of features for the Gemm that reads it.
   The layers that read the channels (their weights' input axis) are the group's consumers.
   Anything else that reads a group's channels (a graph output, an unknown op, Slice on the
   channel axis, a Reshape that is not a flatten, LayerNorm over channels...) freezes the group,
   and the plan says why.
2. **Choice.** Each group keeps its strongest channels (weight magnitude summed over the group's
   producers, each layer's scores normalised by their mean; with calibration data, what the
   channels carry into their consumers, see activation_scores) and loses `ratio` of them, never all.
3. **Surgery.** Every tensor that carries the channels is cut: producers' weight rows and biases,
   per-channel constants, depthwise weights (and their `group`), Split sizes, consumers' weight
   columns.
   Inferred shapes are dropped for re-inference. The same plan applied as zeros (the consumers'
   weight columns for removed channels set to 0, nothing removed) gives the model the pruned one
   must equal exactly (`zeroed_reference`): that separates surgery bugs from pruning's cost.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .benchmark import count_parameters
from .calibration import check_finite_outputs, fidelity_split
from .errors import UsageError, VerificationError
from .graph import constant_value, constants, node_subgraphs, set_input, unique_names, walk
from .manager import PassContext, get_pass
from .model import to_graph, to_model
from .shapes import set_input_shapes

CRITERIA = ("auto", "l2", "l1", "bn", "activation", "reconstruction")  # auto: activation with calibration data, else l2
DATA_CRITERIA = ("activation", "reconstruction")  # need calibration data
IDLE_FLOOR = 0.1  # activation_scores: the least E[x²] a feature counts with, as a share of its layer's mean
# The reconstruction criterion inverts each consumer's channel Gram matrix with this ridge (times
# its mean diagonal), so that a channel the others predict exactly still costs a little.
GRAM_RIDGE = 1e-3
ALLOCATIONS = ("sensitivity", "uniform")
# The shares of a group sensitivity allocation measures (linear in between, 0 costs nothing).
# Steps of 1/8: with quarters, PP-OCRv4 det at 7 % fewer parameters was at 19.3 dB, with eighths 20.9.
SENSITIVITY_LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
# Sensitivity runs the model groups x levels x samples times: as many calibration samples as fit
# in this many multiply-adds, at least SENSITIVITY_SAMPLES (PP-OCR cls: all 16; PP-OCRv4 det: 4).
SENSITIVITY_SAMPLES = 4
SENSITIVITY_WORK = 2e12
# The channel means (mean compensation) and mean squares (the data criteria) come from up
# to this many calibration samples, one forward pass each. With 8 of 16, PP-OCRv4 det at 7 %
# fewer parameters was at 19.5 dB held out; with all 16, 26.7 dB.
MOMENT_SAMPLES = 32
BUDGET_STEPS = 8  # allocations tried to meet a --prune-params / --prune-macs budget
SEARCH_STEPS = 6  # bisection steps of a fidelity-target search: the ratio to within max/64

# Ops that compute each channel from the same channel alone (any axis layout): they pass groups on.
PER_CHANNEL_OPS = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Erf", "Gelu", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Sin", "Cos", "Identity", "Dropout", "Cast", "Clip", "ThresholdedRelu", "Shrink", "IsNaN", "Not",
}
# Spatial ops on NCHW tensors (channel axis 1): the channels pass through.
SPATIAL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where"}
# Layers whose constant weight owns output channels (and reads input channels).
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class Channels:
    """What is known of a tensor's channel axis: the groups laid along it, in order (each whole),
    the axis and the tensor's rank, and `block`: elements per channel along the axis (1, or the
    spatial size after a Flatten folded it in, or a head's size)."""

    groups: tuple[int, ...]
    axis: int
    rank: int
    block: int = 1
    # A fused projection's parts (Q, K, V) split onto an axis of their own: then the groups lie one
    # per index along axis `parts`, each with its channels along `axis` (the heads).
    parts: int | None = None


@dataclass
class Cut:
    """One tensor cut along a channel axis: input `index` of the node at `position` (in the
    analyzed graph's node list) loses, along `axis`, the removed channels of `groups` (laid out in
    order, `block` elements each). `reads` marks a consumer's weight (it reads the channels)."""

    position: int
    index: int
    axis: int
    groups: tuple[int, ...]
    block: int = 1
    reads: bool = False


@dataclass
class Group:
    """Channels that are removed together."""

    id: int
    size: int
    producers: list[str] = field(default_factory=list)  # node names owning the channels
    consumers: list[str] = field(default_factory=list)  # node names reading them
    frozen: str = ""  # why the group cannot be pruned ("" when it can)
    scores: np.ndarray | None = None
    # A Split's part: producer name -> the output channels [start, end) of it that the group holds
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    parameters: int = 0  # weights per channel over the group's cuts (for the share of parameters)
    macs: float = 0.0  # multiply-adds per channel over the group's layers

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1


@dataclass
class PrunePlan:
    """The groups of a model and, once chosen, the channels each keeps."""

    groups: dict[int, Group]
    cuts: list[Cut]
    depthwise: list[tuple[int, tuple[int, ...]]]  # (node position, groups along its channels)
    kept: dict[int, np.ndarray] = field(default_factory=dict)
    total_parameters: int = 0
    # Reshapes whose shape spells the channel count: (node position, the groups it flattens)
    flattens: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    # Reshapes that split a tensor's channels into (heads, head size) or merge them back: (node
    # position, index of the shape entry that counts the heads' elements, the groups of heads, elements
    # per head in that entry: 1 where the entry is the head count, the head size where it is heads x size)
    head_reshapes: list[tuple[int, int, tuple[int, ...], int]] = field(default_factory=list)
    total_macs: int = 0  # Conv/ConvTranspose/Gemm/MatMul multiply-adds of one sample (0 where shapes are unknown)
    # Consumer position -> mean of each input feature on calibration data: a removed channel's
    # mean contribution moves into the consumer's bias (see input_moments).
    means: dict[int, np.ndarray] = field(default_factory=dict)
    # Split positions on a channel axis -> the groups each output carries (its sizes follow them)
    splits: list[tuple[int, tuple[tuple[int, ...], ...]]] = field(default_factory=list)
    # Slices of a channel axis: (node position, index of the axis among its starts/ends, the groups
    # before the start, the groups it keeps); its bounds follow them
    slices: list[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    # Layer position -> where its constant bias is (bias_slots): where mean compensation goes
    biases: dict[int, tuple[int, int]] = field(default_factory=dict)
    gamma_layers: tuple[int, int] = (0, 0)  # criterion bn: layers scored by their BatchNormalization's γ, of all
    ownerless: list[tuple[str, str]] = field(default_factory=list)  # (layer, why): layers that make no channel group

    @property
    def removed_macs(self) -> float:
        """First-order: each removed channel takes its group's MACs per channel."""
        return sum(self.groups[gid].macs * (self.groups[gid].size - len(kept)) for gid, kept in self.kept.items())

    @property
    def prunable_channels(self) -> int:
        return sum(group.size for group in self.groups.values() if group.prunable)

    @property
    def removed_channels(self) -> int:
        return sum(self.groups[gid].size - len(kept) for gid, kept in self.kept.items())

    def kept_count(self, groups) -> int:
        """Channels the groups keep, together (all of a group not cut)."""
        return sum(len(self.kept[gid]) if gid in self.kept else self.groups[gid].size for gid in groups)

    def choose(self, ratio: float, *, round_to: int = 1, ratios: dict[int, float] | None = None) -> PrunePlan:
        """Keep each prunable group's strongest channels, removing `ratio` of them, or the group's
        own share in `ratios` (at least one channel stays; with `round_to` the kept count is a
        multiple of it where the group allows)."""
        if not 0 <= ratio < 1:
            raise UsageError(f"prune ratio must be in [0, 1), not {ratio}")
        kept = {}
        for gid, group in self.groups.items():
            if not group.prunable or group.scores is None:
                continue
            share = ratios.get(gid, 0.0) if ratios is not None else ratio
            keep = max(1, group.size - int(math.floor(group.size * share + 1e-9)))
            if round_to > 1 and group.size >= round_to:
                keep = min(group.size, max(round_to, int(round(keep / round_to)) * round_to))
            if keep < group.size:
                kept[gid] = np.sort(np.argsort(-group.scores, kind="stable")[:keep])
        return replace(self, kept=kept)

    def describe(self) -> list[dict]:
        """One row per group: members, channels before/after, share of the model's parameters and
        multiply-adds, the share of the group's criterion score its removed channels carried
        (None for a group not scored), frozen and why."""
        rows = []
        for gid, group in sorted(self.groups.items()):
            removed_score = None
            if group.scores is not None and float(np.sum(group.scores)) > 0:
                kept = self.kept.get(gid, np.arange(group.size))
                removed_score = 1.0 - float(np.sum(group.scores[kept]) / np.sum(group.scores))
            rows.append({
                "group": gid,
                "channels": group.size,
                "kept": int(len(self.kept[gid])) if gid in self.kept else group.size,
                "producers": [f"{name}[{group.spans[name][0]}:{group.spans[name][1]}]" if name in group.spans
                              else name for name in group.producers],
                "consumers": list(group.consumers),
                "parameter_share": group.parameters * group.size / self.total_parameters if self.total_parameters else 0.0,
                "mac_share": group.macs * group.size / self.total_macs if self.total_macs else None,
                "removed_score_share": removed_score,
                "frozen": group.frozen,
            })
        return rows


def analyze(model: onnx.ModelProto, criterion: str = "l2", input_shapes: dict[str, list[int]] | None = None,
            gammas: dict[str, np.ndarray] | None = None) -> PrunePlan:
    """The dependency groups of a (simplified) model, with each prunable group's channel scores.
    `input_shapes` (static dims, e.g. a calibration sample's) give dynamic models MAC counts.
    Criterion "bn" scores a layer's output channels by `gammas` (|γ| of the BatchNormalization
    that followed it, by layer name: bn_gammas of the model before simplification fused them);
    a layer without one is scored by l2."""
    if criterion not in ("l2", "l1", "bn"):
        raise UsageError(f"analyze() scores by weight magnitude (l2 or l1) or BatchNormalization γ (bn), not '{criterion}'")
    graph = to_graph(model)
    if input_shapes:
        set_input_shapes(graph, input_shapes)
    get_pass("infer-shapes")(graph, PassContext())  # ranks and spatial sizes for joins and flattens
    return _Analysis(graph, criterion, gammas or {}).run()


def bn_gammas(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """|γ| of every inference BatchNormalization with a constant γ that is the only reader of a
    named Conv / ConvTranspose / Gemm / MatMul's output, by that layer's name (Network Slimming's
    channel importance, Liu et al. 2017). Read before simplification, which folds them away."""
    graph = to_graph(model)
    names = Counter(node.name for node in graph.nodes)
    gammas = {}
    for node in graph.nodes:
        if node.op != "BatchNormalization" or len(node.inputs) < 2 or not node.inputs[0].inputs:
            continue
        layer = node.inputs[0].inputs[0]
        gamma = constant_value(node.inputs[1])
        if layer.op in LAYER_OPS and layer.name and names[layer.name] == 1 and gamma is not None and \
                gamma.ndim == 1 and len(node.inputs[0].outputs) == 1:
            gammas[layer.name] = np.abs(gamma.astype(np.float64))
    return gammas


class _Analysis:
    def __init__(self, graph: gs.Graph, criterion: str, gammas: dict[str, np.ndarray] | None = None):
        self.graph = graph
        self.criterion = criterion
        self.gammas = gammas or {}
        self.scored_by_gamma = 0  # producers the bn criterion found a γ for
        self.scored = 0
        self.parent: list[int] = []
        self.groups: list[Group] = []
        self.channels: dict[int, Channels] = {}  # id(tensor) -> its channel axis
        self.tensors: dict[int, gs.Tensor] = {}  # id(tensor) -> the tensor, for check_extents
        self.cuts: list[Cut] = []
        self.depthwise: list[tuple[int, tuple[int, ...]]] = []
        self.flattens: list[tuple[int, tuple[int, ...]]] = []
        self.head_reshapes: list[tuple[int, int, tuple[int, ...], int]] = []
        self.fused: list[tuple[int, ...]] = []  # a fused projection's parts: they must end as one group
        self.scores: dict[int, list[np.ndarray]] = {}
        self.splits: list[tuple[int, tuple[tuple[int, ...], ...]]] = []
        self.slices: list[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = []
        self.ownerless: list[tuple[str, str]] = []  # (layer, why) for a layer that makes no channel group
        self.retired: set[int] = set()  # groups a Split divided into two

    # -- groups (union-find)

    def new_group(self, size: int, producer: str) -> int:
        gid = len(self.groups)
        self.parent.append(gid)
        self.groups.append(Group(gid, size, producers=[producer]))
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, first: int, second: int) -> None:
        first, second = self.find(first), self.find(second)
        if first == second:
            return
        kept, merged = self.groups[first], self.groups[second]
        if kept.size != merged.size:
            self.freeze([first, second], f"joined with {merged.size} channels, not {kept.size}")
        self.parent[second] = first
        kept.producers += merged.producers
        kept.consumers += merged.consumers
        kept.spans.update(merged.spans)
        kept.frozen = kept.frozen or merged.frozen

    def divide(self, gid: int, at: int) -> tuple[int, int] | None:
        """Make group `gid` two groups, its first `at` channels and the rest, everywhere it is
        recorded so far (None if it was already joined with another group: then it stays whole)."""
        root = self.find(gid)
        if any(self.parent[other] == root for other in range(len(self.groups)) if other != root):
            return None
        whole = self.groups[root]
        parts = (self.new_group(at, ""), self.new_group(whole.size - at, ""))
        offsets = {name: whole.spans.get(name, (0, 0))[0] for name in whole.producers}
        for part, (start, end) in zip(parts, ((0, at), (at, whole.size))):
            self.groups[part].producers = list(whole.producers)
            self.groups[part].consumers = list(whole.consumers)
            self.groups[part].frozen = whole.frozen
            self.groups[part].spans = {name: (offset + start, offset + end) for name, offset in offsets.items()}
        self.retired.add(root)

        def divided(groups: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(part for g in groups for part in (parts if g == root else (g,)))

        for cut in self.cuts:
            cut.groups = divided(cut.groups)
        self.depthwise = [(position, divided(groups)) for position, groups in self.depthwise]
        self.splits = [(position, tuple(divided(groups) for groups in outputs)) for position, outputs in self.splits]
        self.slices = [(position, entry, divided(before), divided(kept)) for position, entry, before, kept in self.slices]
        self.flattens = [(position, divided(groups)) for position, groups in self.flattens]
        self.head_reshapes = [(position, entry, divided(groups), unit) for position, entry, groups, unit in self.head_reshapes]
        self.fused = [divided(parts) for parts in self.fused]
        self.channels = {key: replace(channels, groups=divided(channels.groups)) if root in channels.groups else channels
                         for key, channels in self.channels.items()}
        for score in self.scores.pop(root, []):
            self.scores.setdefault(parts[0], []).append(score[:at])
            self.scores.setdefault(parts[1], []).append(score[at:])
        return parts

    def coarsen(self, gids: Sequence[int], unit: int) -> bool:
        """Make each of the groups `gids` one of `unit` times fewer channels, each the block of
        `unit` consecutive ones (attention heads out of a projection's features), everywhere they
        are recorded so far. False (nothing changed) where one is not a whole number of blocks, is
        laid out beside another group (a Concat), or is already recorded by a depthwise Conv, a
        Split or Slice, or as heads (their Reshapes count them as they are)."""
        roots = {self.find(gid) for gid in gids}
        recorded = [g for _, groups in self.depthwise for g in groups]
        recorded += [g for _, outputs in self.splits for part in outputs for g in part]
        recorded += [g for *_, before, kept in self.slices for g in before + kept]
        recorded += [g for _, _, groups, _ in self.head_reshapes for g in groups]
        recorded += [g for parts in self.fused for g in parts]
        if any(self.groups[root].size % unit for root in roots) or any(self.find(g) in roots for g in recorded):
            return False
        holds = [cut for cut in self.cuts if any(self.find(g) in roots for g in cut.groups)]
        tensors = [key for key, channels in self.channels.items() if any(self.find(g) in roots for g in channels.groups)]
        if any(self.find(g) not in roots for cut in holds for g in cut.groups) or \
                any(self.find(g) not in roots for key in tensors for g in self.channels[key].groups):
            return False
        for cut in holds:
            cut.block *= unit
        for key in tensors:
            self.channels[key] = replace(self.channels[key], block=self.channels[key].block * unit)
        for member in range(len(self.groups)):
            if self.find(member) in roots and member not in self.retired:
                self.groups[member].size //= unit
                self.scores[member] = [score.reshape(-1, unit).sum(axis=1) for score in self.scores.get(member, [])]
        return True

    def freeze(self, gids, reason: str) -> None:
        for gid in gids:
            group = self.groups[self.find(gid)]
            group.frozen = group.frozen or reason

    def freeze_tensor(self, tensor: gs.Tensor, reason: str) -> None:
        known = self.channels.get(id(tensor))
        if known is not None:
            self.freeze(known.groups, reason)

    # -- the walk

    def run(self) -> PrunePlan:
        graph = self.graph
        body_reads = {name for node in graph.nodes for body in node_subgraphs(node)
                      for inner in walk(body) for sub in inner.nodes for name in (t.name for t in sub.inputs)}
        for position, node in enumerate(graph.nodes):
            self.visit(position, node)
            for tensor in node.outputs:
                if tensor.name in body_reads:
                    self.freeze_tensor(tensor, f"read inside a subgraph of {_label(node)}")
        for tensor in graph.outputs:
            self.freeze_tensor(tensor, f"graph output '{tensor.name}'")
        return self.plan()

    def visit(self, position: int, node: gs.Node) -> None:
        tracked = [self.channels.get(id(tensor)) for tensor in node.inputs]
        if not any(tracked) and node.op not in LAYER_OPS:
            return
        if node.domain not in (None, "", "ai.onnx"):
            self.freeze_inputs(node, f"read by {_label(node)} (domain {node.domain})")
            return
        if any(channels is not None and channels.parts is not None for channels in tracked) and \
                node.op not in ("Transpose", "Gather"):
            self.freeze_inputs(node, f"read by {_label(node)} before the fused projection's parts are taken apart")
            return
        handler = getattr(self, f"visit_{node.op}", None)
        if handler is None:
            if node.op in PER_CHANNEL_OPS:
                handler = self.visit_per_channel
            elif node.op in SPATIAL_OPS:
                handler = self.visit_spatial
            elif node.op in ELEMENTWISE_OPS:
                handler = self.visit_elementwise
        if handler is None:
            self.freeze_inputs(node, f"read by {_label(node)}")
            return
        handler(position, node, tracked)

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            self.freeze_tensor(tensor, reason)

    def pass_on(self, node: gs.Node, channels: Channels, output: int = 0) -> None:
        if len(node.outputs) > output:
            self.channels[id(node.outputs[output])] = channels
            self.tensors[id(node.outputs[output])] = node.outputs[output]

    # -- layers

    def layer_weight(self, node: gs.Node) -> np.ndarray | None:
        if len(node.inputs) < 2:
            return None
        return constant_value(node.inputs[1])

    def visit_Conv(self, position: int, node: gs.Node, tracked) -> None:
        weight = self.layer_weight(node)
        source = tracked[0] if tracked else None
        if weight is None or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            self.freeze_inputs(node, f"read by {_label(node)} (weight not constant or auto_pad)")
            self.ownerless.append((node.name, "weight not constant, or auto_pad"))
            return
        group = int(node.attrs.get("group", 1))
        out_channels, in_per_group = weight.shape[0], weight.shape[1]
        if group > 1 and group == out_channels and in_per_group == 1:
            # Depthwise: output channel k is input channel k; it is one of the group's members.
            if source is None:
                self.ownerless.append((node.name, "depthwise Conv on channels no group holds"))
                return
            if not self.on_channel_axis(node, source, weight):
                return
            if source.block != 1:  # its `group` counts channels, the group's kept count blocks
                self.freeze_inputs(node, f"read by depthwise {_label(node)} in blocks of {source.block} channels")
                return
            self.depthwise.append((position, source.groups))
            self.cuts.append(Cut(position, 1, 0, source.groups, source.block))
            self.cut_bias(position, node, source.groups, source.block)
            for gid in source.groups:
                self.groups[self.find(gid)].consumers.append(node.name)
            self.pass_on(node, source)
            return
        if group > 1:
            self.visit_grouped_conv(position, node, weight, group, source)
            return
        if source is not None and not self.on_channel_axis(node, source, weight):
            return
        if source is not None:
            self.consume(position, node, source, weight_axis=1)
        gid = self.produce(position, node, weight, axis=0)
        self.cut_bias(position, node, (gid,))
        self.pass_on(node, Channels((gid,), 1, weight.ndim))

    def on_channel_axis(self, node: gs.Node, source: Channels, weight: np.ndarray) -> bool:
        """A Conv or ConvTranspose reads axis 1 of its input: channels tracked on another axis (a
        MatMul's features, the last axis of an NCHW tensor) are not the ones its weight reads."""
        if source.axis == 1 and source.rank == weight.ndim:
            return True
        self.freeze_inputs(node, f"read by {_label(node)} on axis {source.axis} of {source.rank}, not its channel axis")
        self.ownerless.append((node.name, "Conv reading channels off axis 1"))
        return False

    def visit_grouped_conv(self, position: int, node: gs.Node, weight: np.ndarray, group: int,
                           source: Channels | None) -> None:
        """A grouped Conv ties its input to its output a whole conv-group at a time: group j reads
        input block j (in_per_group channels) alone and makes output block j. Both groups become
        groups of blocks, one group of `group` blocks, and a removed block takes its input
        channels, its filters and one from the `group` attribute; its weight's input axis stays."""
        out_per_group = weight.shape[0] // group
        reason = f"read by grouped {_label(node)} (group={group})"
        if source is None or source.axis != 1 or source.block != 1 or len(source.groups) != 1:
            self.freeze_inputs(node, reason)
            self.ownerless.append((node.name, "grouped Conv on channels no group holds" if source is None else
                                   "grouped Conv whose input is not one group of whole channels"))
            return
        gid = self.produce(position, node, weight, axis=0)
        self.cut_bias(position, node, (gid,))
        blocks = self.coarsen([gid], out_per_group)  # a fresh group: only a size it does not divide refuses
        if blocks and self.coarsen(source.groups, weight.shape[1]):
            self.union(source.groups[0], gid)
            self.depthwise.append((position, (gid,)))  # its `group` attribute follows the kept blocks
        else:
            self.freeze([gid], reason)
            self.freeze_inputs(node, reason)
        self.pass_on(node, Channels((gid,), 1, weight.ndim, out_per_group if blocks else 1))

    def visit_ConvTranspose(self, position: int, node: gs.Node, tracked) -> None:
        weight = self.layer_weight(node)
        source = tracked[0] if tracked else None
        if weight is None or int(node.attrs.get("group", 1)) != 1 or "output_shape" in node.attrs:
            self.freeze_inputs(node, f"read by {_label(node)} (grouped, output_shape or weight not constant)")
            self.ownerless.append((node.name, "grouped ConvTranspose, output_shape, or weight not constant"))
            return
        if source is not None and not self.on_channel_axis(node, source, weight):
            return
        if source is not None:
            self.consume(position, node, source, weight_axis=0)
        gid = self.produce(position, node, weight, axis=1)
        self.cut_bias(position, node, (gid,))
        self.pass_on(node, Channels((gid,), 1, weight.ndim))

    def visit_Gemm(self, position: int, node: gs.Node, tracked) -> None:
        weight = self.layer_weight(node)
        source = tracked[0] if tracked else None
        if weight is None or node.attrs.get("transA", 0) or (len(tracked) > 1 and tracked[1] is not None):
            self.freeze_inputs(node, f"read by {_label(node)} (transA or weight not constant)")
            self.ownerless.append((node.name, "Gemm with transA, or weight not constant"))
            return
        out_axis, in_axis = (0, 1) if node.attrs.get("transB", 0) else (1, 0)
        if source is not None:
            if source.axis != 1 or source.rank != 2:
                self.freeze_inputs(node, f"read by {_label(node)} on axis {source.axis}")
                self.ownerless.append((node.name, "Gemm reading channels off axis 1 of a matrix"))
                return
            self.consume(position, node, source, weight_axis=in_axis)
        gid = self.produce(position, node, weight, axis=out_axis)
        bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == weight.shape[out_axis]:
            self.cuts.append(Cut(position, 2, bias.ndim - 1, (gid,)))
        elif bias is not None and bias.size != 1:
            self.freeze([gid], f"{_label(node)} bias of shape {list(bias.shape)}")
        self.pass_on(node, Channels((gid,), 1, 2))

    def visit_MatMul(self, position: int, node: gs.Node, tracked) -> None:
        if len(tracked) == 2 and tracked[0] is not None and tracked[1] is not None:
            self.visit_batched_matmul(node, tracked)
            return
        weight = self.layer_weight(node)
        source = tracked[0] if tracked else None
        if weight is None or weight.ndim != 2 or (len(tracked) > 1 and tracked[1] is not None):
            self.freeze_inputs(node, f"read by {_label(node)} (weight not a constant matrix)")
            self.ownerless.append((node.name, "MatMul weight not a constant matrix"))
            return
        rank = source.rank if source is not None else _rank(node.inputs[0])
        if source is not None:
            if source.axis != source.rank - 1:
                self.freeze_inputs(node, f"read by {_label(node)} on axis {source.axis} of {source.rank}")
                self.ownerless.append((node.name, "MatMul reading channels off its last axis"))
                return
            self.consume(position, node, source, weight_axis=0)
        if rank is None or rank < 2:
            self.ownerless.append((node.name, "MatMul input of unknown rank or a vector"))
            return
        gid = self.produce(position, node, weight, axis=1)
        self.pass_on(node, Channels((gid,), rank - 1, rank))

    def visit_batched_matmul(self, node: gs.Node, tracked) -> None:
        """Two activations multiplied per head (attention's Q·Kᵀ and weights·V): the channels are a
        batch axis of both, at the same place, so head h of the product reads head h of each. The
        two sides' heads are one group and the product carries it."""
        first, second = tracked
        if first.block != 1 or second.block != 1 or (first.axis, first.rank) != (second.axis, second.rank) or \
                first.axis >= first.rank - 2 or len(first.groups) != len(second.groups) or \
                [self.groups[self.find(g)].size for g in first.groups] != [self.groups[self.find(g)].size for g in second.groups]:
            self.freeze_inputs(node, f"read by {_label(node)} (two activations whose channels do not line up)")
            return
        for mine, theirs in zip(first.groups, second.groups):
            self.union(mine, theirs)
        self.pass_on(node, first)

    def produce(self, position: int, node: gs.Node, weight: np.ndarray, axis: int) -> int:
        """A new group for the layer's output channels (its weight's `axis`), scored and cut there."""
        gid = self.new_group(weight.shape[axis], node.name)
        self.score(gid, weight, axis=axis, name=node.name)
        self.cuts.append(Cut(position, 1, axis, (gid,)))
        return gid

    def cut_bias(self, position: int, node: gs.Node, groups: tuple[int, ...], block: int = 1) -> None:
        """A Conv's constant bias (input 2) goes with its output channels."""
        if len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
            self.cuts.append(Cut(position, 2, 0, groups, block))

    def consume(self, position: int, node: gs.Node, source: Channels, weight_axis: int) -> None:
        self.cuts.append(Cut(position, 1, weight_axis, source.groups, source.block, reads=True))
        for gid in source.groups:
            self.groups[self.find(gid)].consumers.append(node.name)

    def score(self, gid: int, weight: np.ndarray, axis: int, name: str = "") -> None:
        self.scored += 1
        gamma = self.gammas.get(name) if self.criterion == "bn" and name else None
        if gamma is not None and gamma.shape == (weight.shape[axis],):
            norms = gamma
            self.scored_by_gamma += 1
        else:
            moved = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
            norms = np.abs(moved).sum(axis=1) if self.criterion == "l1" else np.sqrt((moved**2).sum(axis=1))
        mean = norms.mean()
        self.scores.setdefault(gid, []).append(norms / mean if mean > 0 else norms)

    # -- ops that pass channels on

    def visit_per_channel(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        if source is None:
            self.freeze_inputs(node, f"read by {_label(node)} as a parameter")
            return
        for index in range(1, len(node.inputs)):
            if not self.per_channel_constant(position, node, index, source):
                return
        self.pass_on(node, source)

    def visit_spatial(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        # blocks on axis 1 of NCHW features are runs of whole channels (conv-groups): pooling keeps them
        if source is None or source.axis != 1 or (source.block != 1 and source.rank != 4):
            self.freeze_inputs(node, f"read by {_label(node)} off the channel axis")
            return
        self.pass_on(node, source)

    def visit_BatchNormalization(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        if source is None or source.axis != 1 or len(node.outputs) > 1 and any(not t.name == "" for t in node.outputs[1:]):
            self.freeze_inputs(node, f"read by {_label(node)}")
            return
        for index in range(1, 5):
            if constant_value(node.inputs[index]) is None:
                self.freeze_inputs(node, f"{_label(node)} statistics not constant")
                return
            self.cuts.append(Cut(position, index, 0, source.groups, source.block))
        self.pass_on(node, source)

    def visit_InstanceNormalization(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        if source is None or source.axis != 1 or any(constant_value(node.inputs[i]) is None for i in (1, 2)):
            self.freeze_inputs(node, f"read by {_label(node)}")
            return
        self.cuts.append(Cut(position, 1, 0, source.groups, source.block))
        self.cuts.append(Cut(position, 2, 0, source.groups, source.block))
        self.pass_on(node, source)

    def visit_Pad(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else np.array(node.attrs.get("pads", []))
        axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        if source is None or pads is None or axes is not None or any(t is not None for t in tracked[1:]):
            self.freeze_inputs(node, f"read by {_label(node)}")
            return
        pads = np.asarray(pads).reshape(-1)
        if len(pads) != 2 * source.rank or pads[source.axis] != 0 or pads[source.axis + source.rank] != 0:
            self.freeze_inputs(node, f"{_label(node)} pads the channel axis")
            return
        self.pass_on(node, source)

    def visit_Resize(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        scales = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        sizes = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        if source is None or sizes is not None or scales is None or scales.size != source.rank or scales[source.axis] != 1:
            self.freeze_inputs(node, f"read by {_label(node)} (sizes, or scaling the channel axis)")
            return
        self.pass_on(node, source)

    def visit_Softmax(self, position: int, node: gs.Node, tracked) -> None:
        self.visit_softmax_like(node, tracked)

    def visit_LogSoftmax(self, position: int, node: gs.Node, tracked) -> None:
        self.visit_softmax_like(node, tracked)

    def visit_softmax_like(self, node: gs.Node, tracked) -> None:
        source = tracked[0]
        axis = int(node.attrs.get("axis", -1 if _opset(self.graph) >= 13 else 1))
        # From opset 13 the op normalizes along `axis`; before, over every axis from `axis` on.
        mixes = source is not None and (source.axis >= axis % source.rank if _opset(self.graph) < 13
                                        else source.axis == axis % source.rank)
        if source is None or mixes:
            self.freeze_inputs(node, f"read by {_label(node)} across the channel axis")
            return
        self.pass_on(node, source)

    def visit_ReduceMean(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            value = constant_value(node.inputs[1])
            axes = None if value is None else value.tolist()
        if source is None or axes is None or not node.attrs.get("keepdims", 1) or \
                any(axis % source.rank == source.axis for axis in axes) or source.block != 1:
            self.freeze_inputs(node, f"read by {_label(node)} (reduces the channel axis or drops dims)")
            return
        self.pass_on(node, source)

    visit_ReduceMax = visit_ReduceMean

    def visit_elementwise(self, position: int, node: gs.Node, tracked) -> None:
        known = [channels for channels in tracked if channels is not None]
        if len({channels.block for channels in known}) > 1 and self.match_blocks(known):
            tracked = [self.channels.get(id(tensor)) for tensor in node.inputs]
            known = [channels for channels in tracked if channels is not None]
        first = known[0]
        for other in known[1:]:
            if (other.rank - other.axis, other.block) != (first.rank - first.axis, first.block) or \
                    len(other.groups) != len(first.groups):
                self.freeze_inputs(node, f"{_label(node)} joins tensors whose channels do not line up")
                return
            sizes = [self.groups[self.find(g)].size for g in first.groups]
            if sizes != [self.groups[self.find(g)].size for g in other.groups]:
                self.freeze_inputs(node, f"{_label(node)} joins tensors whose channels do not line up")
                return
            for mine, theirs in zip(first.groups, other.groups):
                self.union(mine, theirs)
        if node.op == "Where" and tracked[0] is not None:
            self.freeze_inputs(node, f"{_label(node)} condition")
            return
        widest = max(known, key=lambda channels: channels.rank)
        for index, channels in enumerate(tracked):
            if channels is not None:
                continue
            if not self.per_channel_constant(position, node, index, widest):
                return
        self.pass_on(node, widest)

    def match_blocks(self, known: list[Channels]) -> bool:
        """Conv features of whole conv-groups (a grouped Conv's output, in blocks) joined with
        features of single channels as many in all (a squeeze-excitation gate): the finer side
        becomes blocks of the same size, so that a removed conv-group takes its gates too. Only on
        NCHW features (axis 1 of rank 4), where a block is a run of channels, not a Flatten's."""
        coarsest = max(channels.block for channels in known)
        if any((channels.rank, channels.axis) != (4, 1) or coarsest % channels.block for channels in known):
            return False
        done: set[int] = set()  # a group on two inputs is coarsened once (the second's record is stale)
        for channels in known:
            roots = {self.find(gid) for gid in channels.groups}
            if channels.block == coarsest or roots <= done:
                continue
            if not self.coarsen(channels.groups, coarsest // channels.block):
                return False
            done |= roots
        return True

    def per_channel_constant(self, position: int, node: gs.Node, index: int, source: Channels) -> bool:
        """An untracked operand of a per-channel op: constant or not, it must be 1 along the
        channel axis (broadcast) or hold one value per channel (cut with the channels)."""
        tensor = node.inputs[index]
        if not tensor.name:
            return True
        value = constant_value(tensor)
        shape = value.shape if value is not None else (tensor.shape if tensor.shape is not None else None)
        from_right = source.rank - source.axis
        if shape is not None and len(shape) < from_right:
            return True  # broadcast along the channel axis
        axis = len(shape) - from_right if shape is not None else 0
        if shape is None or not isinstance(shape[axis], (int, np.integer)):  # other dims may be symbolic
            self.freeze_inputs(node, f"{_label(node)} operand '{tensor.name}' of unknown shape")
            return False
        total = sum(self.groups[self.find(g)].size for g in source.groups) * source.block
        if shape[axis] == 1:
            return True
        if value is not None and shape[axis] == total:
            self.cuts.append(Cut(position, index, axis, source.groups, source.block))
            return True
        self.freeze_inputs(node, f"{_label(node)} operand '{tensor.name}' spans the channels")
        return False

    # -- ops that move the channel axis

    def visit_Concat(self, position: int, node: gs.Node, tracked) -> None:
        known = [channels for channels in tracked if channels is not None]
        first = known[0]
        axis = int(node.attrs.get("axis", 0)) % first.rank
        if len(known) != len(tracked) or any((c.axis, c.rank, c.block) != (first.axis, first.rank, first.block) for c in known):
            self.freeze_inputs(node, f"{_label(node)} joins tensors whose channels are not all known")
            return
        if axis == first.axis:
            self.pass_on(node, Channels(tuple(g for channels in known for g in channels.groups), first.axis, first.rank, first.block))
            return
        self.visit_elementwise(position, node, tracked)

    def visit_Split(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        if source is None:
            return
        axis = int(node.attrs.get("axis", 0)) % source.rank
        if axis != source.axis:  # along another axis every part keeps all the channels
            for output in range(len(node.outputs)):
                self.pass_on(node, source, output)
            return
        groups = [self.find(g) for g in source.groups]
        total = sum(self.groups[g].size for g in groups)
        sizes = _split_sizes(node, total * source.block)
        if sizes is None or source.block != 1:
            self.freeze_inputs(node, f"read by {_label(node)} (split sizes unknown or a flattened block)")
            return
        if not self.divide_at(groups, list(itertools.accumulate(sizes))[:-1]):
            self.freeze_inputs(node, f"{_label(node)} splits a group that is tied to other layers or laid out twice")
            return
        outputs, start = [], 0
        for size in sizes:
            part, taken = [], 0
            while taken < size:
                part.append(groups[start])
                taken += self.groups[groups[start]].size
                start += 1
            outputs.append(tuple(part))
        for output, part in enumerate(outputs):
            self.pass_on(node, Channels(part, source.axis, source.rank), output)
        self.splits.append((position, tuple(outputs)))

    def divide_at(self, groups: list[int], bounds: list[int]) -> bool:
        """Divide the groups (laid out in order, roots) so that every bound falls between two of
        them; `groups` is updated in place. False if a group to divide is tied to another or laid
        out twice (a Concat of a tensor with itself)."""
        if len(set(groups)) != len(groups):
            return False
        for bound in bounds:
            offset = 0
            for index, gid in enumerate(groups):
                size = self.groups[gid].size
                if offset < bound < offset + size:
                    parts = self.divide(gid, bound - offset)
                    if parts is None:
                        return False
                    groups[index:index + 1] = parts
                    break
                offset += size
        return True

    def visit_Slice(self, position: int, node: gs.Node, tracked) -> None:
        """Slice along other axes keeps every channel; along the channel axis (step 1) it keeps
        the groups between its bounds, dividing those a bound falls inside of."""
        source = tracked[0]
        given = [node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None
                 for index in range(1, 5)]
        starts, ends, axes, steps = (None if tensor is None else constant_value(tensor) for tensor in given)
        if source is None or any(t is not None for t in tracked[1:]) or starts is None or ends is None or \
                (given[2] is not None and axes is None) or (given[3] is not None and steps is None):
            self.freeze_inputs(node, f"read by {_label(node)} (bounds not constant)")
            return
        starts, ends = starts.reshape(-1), ends.reshape(-1)
        axes = list(range(len(starts))) if axes is None else [int(axis) % source.rank for axis in axes.reshape(-1)]
        if source.axis not in axes:
            self.pass_on(node, source)
            return
        entry = axes.index(source.axis)
        step = 1 if steps is None else int(steps.reshape(-1)[entry])
        groups = [self.find(g) for g in source.groups]
        total = sum(self.groups[g].size for g in groups)
        start, end = (min(max(int(value) + (total if value < 0 else 0), 0), total)
                      for value in (starts[entry], ends[entry]))
        if step != 1 or source.block != 1 or end <= start:
            self.freeze_inputs(node, f"{_label(node)} slices the channel axis with a step, empty or over blocks")
            return
        if not self.divide_at(groups, [start, end]):
            self.freeze_inputs(node, f"{_label(node)} slices a group that is tied to other layers or laid out twice")
            return
        before, kept, offset = [], [], 0
        for gid in groups:
            if offset < start:
                before.append(gid)
            elif offset < end:
                kept.append(gid)
            offset += self.groups[gid].size
        self.slices.append((position, entry, tuple(before), tuple(kept)))
        self.pass_on(node, Channels(tuple(kept), source.axis, source.rank))

    def visit_Flatten(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        axis = int(node.attrs.get("axis", 1))
        block = _trailing_size(node.inputs[0], source.axis + 1) if source is not None else None
        if source is None or axis % source.rank != source.axis or block is None:
            self.freeze_inputs(node, f"{_label(node)} does not flatten from the channel axis")
            return
        self.pass_on(node, Channels(source.groups, 1, 2, source.block * block))

    def visit_Reshape(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        shape = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        block = _trailing_size(node.inputs[0], source.axis + 1) if source is not None else None
        # A flatten written as Reshape: [N, C, ...] -> [N, -1] (or [0, -1] / [N, C*...] / [-1, C*...]).
        # [-1, K] is one only where K is all of C*...: [-1, 2] of a [2, 2, 3, 3] tensor is [18, 2].
        flattens = False
        if source is not None and shape is not None and source.axis == 1 and shape.size == 2 and block is not None \
                and node.attrs.get("allowzero", 0) == 0:
            features = sum(self.groups[self.find(g)].size for g in source.groups) * source.block * block
            batch = {0, _dim(node.inputs[0], 0)}
            flattens = (int(shape[1]) == -1 and int(shape[0]) in batch) or (int(shape[1]) == features and
                                                                            int(shape[0]) in batch | {-1})
        if not flattens:
            if source is not None and shape is not None and node.attrs.get("allowzero", 0) == 0 and \
                    self.reshape_heads(position, node, source, shape.astype(np.int64).reshape(-1)):
                return
            self.freeze_inputs(node, f"read by {_label(node)} (not a flatten from the channel axis, nor heads)")
            return
        if shape[1] != -1:
            self.flattens.append((position, source.groups))  # its shape names the channel count: becomes [0, -1]
        self.pass_on(node, Channels(source.groups, 1, 2, source.block * block))

    def reshape_heads(self, position: int, node: gs.Node, source: Channels, shape: np.ndarray) -> bool:
        """Attention's reshapes of the last axis: [..., H·D] -> [..., H, D] makes the group's
        channels H heads of D features (coarsen), and [..., H, D] -> [..., H·D] reads them back as
        blocks of D. Only the last one or two entries may involve the channels; the leading ones
        (0 copies, -1 infers) only regroup the rows."""
        extra = len(shape) - source.rank  # 1: [..., H·D] -> [..., H, D]; 2: [..., P·H·D] -> [..., P, H, D]
        if source.axis == source.rank - 1 and extra in (1, 2) and (shape[-1 - extra:] > 0).all():
            # The split. With P parts (a fused Q, K, V projection) the group is divided into them first.
            if len(source.groups) != 1 or source.block != 1:
                return False
            parts_count = int(shape[-3]) if extra == 2 else 1
            heads, size = int(shape[-2]), int(shape[-1])
            if parts_count * heads * size != self.groups[self.find(source.groups[0])].size:
                return False
            parts = [source.groups[0]]
            for _ in range(parts_count - 1):
                divided = self.divide(parts[-1], heads * size)
                if divided is None:
                    return False
                parts[-1:] = divided
            if not self.coarsen(parts, size):
                return False
            if extra == 2:
                for part in parts:  # the heads' group spans the whole projection: Q, K and V alike
                    self.groups[part].spans = {}
                self.fused.append(tuple(parts))
            self.head_reshapes.append((position, len(shape) - 2, (parts[0],), 1))
            self.pass_on(node, Channels(tuple(parts), len(shape) - 2, len(shape),
                                        parts=len(shape) - 3 if extra == 2 else None))
            return True
        head = _dim(node.inputs[0], source.rank - 1)
        if source.axis == source.rank - 2 and source.block == 1 and len(shape) == source.rank - 1 and \
                isinstance(head, (int, np.integer)) and head > 0:
            # The merge: [..., H, D] -> [..., H·D].
            total = sum(self.groups[self.find(g)].size for g in source.groups) * int(head)
            if shape[-1] == total:
                self.head_reshapes.append((position, len(shape) - 1, source.groups, int(head)))
            elif not (shape[-1] == -1 and all(entry == 0 for entry in shape[:-1])):
                return False
            self.pass_on(node, Channels(source.groups, len(shape) - 1, len(shape), int(head)))
            return True
        return False

    def visit_Squeeze(self, position: int, node: gs.Node, tracked) -> None:
        self.move_axis(node, tracked, squeeze=True)

    def visit_Unsqueeze(self, position: int, node: gs.Node, tracked) -> None:
        self.move_axis(node, tracked, squeeze=False)

    def move_axis(self, node: gs.Node, tracked, squeeze: bool) -> None:
        source = tracked[0]
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            value = constant_value(node.inputs[1])
            axes = None if value is None else value.reshape(-1).tolist()
        if source is None or axes is None:
            self.freeze_inputs(node, f"read by {_label(node)} (axes unknown)")
            return
        if squeeze:
            axes = sorted(axis % source.rank for axis in axes)
            if source.axis in axes or (source.block != 1 and any(axis > source.axis for axis in axes)):
                self.freeze_inputs(node, f"{_label(node)} squeezes the channel axis")
                return
            new_axis = source.axis - sum(axis < source.axis for axis in axes)
            self.pass_on(node, Channels(source.groups, new_axis, source.rank - len(axes), source.block))
            return
        rank = source.rank + len(axes)
        axes = sorted(axis % rank for axis in axes)
        new_axis = source.axis
        for axis in axes:
            if axis <= new_axis:
                new_axis += 1
        if source.block != 1:
            self.freeze_inputs(node, f"{_label(node)} reshapes a flattened channel axis")
            return
        self.pass_on(node, Channels(source.groups, new_axis, rank, source.block))

    def visit_Transpose(self, position: int, node: gs.Node, tracked) -> None:
        source = tracked[0]
        perm = node.attrs.get("perm") or list(range(source.rank - 1, -1, -1)) if source is not None else None
        if source is None or source.block != 1 or len(perm) != source.rank:
            self.freeze_inputs(node, f"read by {_label(node)}")
            return
        parts = None if source.parts is None else list(perm).index(source.parts)
        self.pass_on(node, Channels(source.groups, list(perm).index(source.axis), source.rank, parts=parts))

    def visit_Gather(self, position: int, node: gs.Node, tracked) -> None:
        """One part of a fused projection (Q, K or V), picked by a constant index on the parts axis."""
        source = tracked[0]
        index = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        axis = int(node.attrs.get("axis", 0)) % source.rank if source is not None else None
        if source is None or source.parts is None or axis != source.parts or index is None or index.ndim != 0 \
                or any(t is not None for t in tracked[1:]):
            self.freeze_inputs(node, f"read by {_label(node)}")
            return
        part = int(index) % len(source.groups)
        self.pass_on(node, Channels((source.groups[part],), source.axis - (source.axis > axis), source.rank - 1))

    # -- result

    def check_extents(self) -> None:
        """Every tensor the plan cuts or follows must hold exactly its groups' channels along its
        axis (shape inference's dims, the constants' shapes). A rule that followed channels
        somewhere they are not (a layer reading another axis, an op that reshapes them) shows up
        here as a count that does not add up: its groups are frozen, never cut into an invalid or
        wrong model."""
        def expected(channels_groups, block: int) -> int:
            return sum(self.groups[self.find(g)].size for g in channels_groups) * block

        nodes = self.graph.nodes
        for cut in self.cuts:
            node = nodes[cut.position]
            value = constant_value(node.inputs[cut.index]) if len(node.inputs) > cut.index else None
            if value is None or value.ndim <= cut.axis or value.shape[cut.axis] != expected(cut.groups, cut.block):
                self.freeze(cut.groups, f"{_label(node)} input {cut.index} does not hold the group's channels "
                                        f"on axis {cut.axis}")
        for key, channels in self.channels.items():
            tensor = self.tensors[key]
            if channels.parts is not None or tensor.shape is None:
                continue  # a fused projection's parts each hold their own heads along the axis
            size = _dim(tensor, channels.axis) if len(tensor.shape) == channels.rank else -1
            if size is not None and size != expected(channels.groups, channels.block):
                self.freeze(channels.groups, f"'{tensor.name}' does not hold the group's channels on axis {channels.axis}")

    def plan(self) -> PrunePlan:
        self.check_extents()
        roots = {}
        for gid in range(len(self.groups)):
            if gid in self.retired:
                continue
            root = self.find(gid)
            roots.setdefault(root, self.groups[root])
            if gid in self.scores and gid != root:
                self.scores.setdefault(root, []).extend(self.scores.pop(gid))
        cuts = [Cut(c.position, c.index, c.axis, tuple(self.find(g) for g in c.groups), c.block, c.reads) for c in self.cuts]
        depthwise = [(position, tuple(self.find(g) for g in groups)) for position, groups in self.depthwise]
        splits = [(position, tuple(tuple(self.find(g) for g in part) for part in outputs))
                  for position, outputs in self.splits]
        head_reshapes = [(position, entry, tuple(self.find(g) for g in groups), unit)
                         for position, entry, groups, unit in self.head_reshapes]
        flattens = [(position, tuple(self.find(g) for g in groups)) for position, groups in self.flattens]
        slices = [(position, entry, tuple(self.find(g) for g in before), tuple(self.find(g) for g in kept))
                  for position, entry, before, kept in self.slices]
        total = 0
        for tensor in constants(self.graph):
            total += int(np.prod(tensor.shape))
        for parts in self.fused:
            if len({self.find(part) for part in parts}) > 1:  # Q, K and V must lose the same heads
                for part in parts:
                    group = roots[self.find(part)]
                    group.frozen = group.frozen or "a part of a fused projection whose other parts are not its heads' peers"
        for group in roots.values():
            parts = self.scores.get(group.id)
            group.scores = np.sum(parts, axis=0) if parts else None
            if group.scores is None and not group.frozen:
                group.frozen = "no layer owns these channels"
            group.producers = list(dict.fromkeys(group.producers))
            group.consumers = list(dict.fromkeys(group.consumers))
        nodes = self.graph.nodes
        total_macs = 0
        for node in nodes:
            total_macs += _layer_macs(node) or 0
        for cut in cuts:
            node = nodes[cut.position]
            value = constant_value(node.inputs[cut.index])
            if value is None:
                continue
            total_channels = sum(roots[g].size for g in cut.groups) * cut.block
            per_channel = value.size // max(total_channels, 1)
            macs = _layer_macs(node) if cut.index == 1 else None
            for gid in cut.groups:
                roots[gid].parameters += per_channel * cut.block
                if macs:
                    roots[gid].macs += macs * cut.block / max(total_channels, 1)
        return PrunePlan(dict(sorted(roots.items())), cuts, depthwise, total_parameters=total, flattens=flattens,
                         total_macs=total_macs, splits=splits, biases=bias_slots(self.graph),
                         head_reshapes=head_reshapes, slices=slices, gamma_layers=(self.scored_by_gamma, self.scored),
                         ownerless=self.ownerless)


def prune_model(model: onnx.ModelProto, plan: PrunePlan) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the pruned model, the zeroed reference): the plan's removed channels cut out, and the
    original with only the consumers' weight columns for those channels set to zero."""
    pruned = _apply(model, plan, remove=True)
    zeroed = _apply(model, plan, remove=False)
    return pruned, zeroed


def _apply(model: onnx.ModelProto, plan: PrunePlan, remove: bool) -> onnx.ModelProto:
    graph = to_graph(model)
    nodes = graph.nodes
    names = unique_names(graph)
    replaced: dict[tuple[int, int], np.ndarray] = {}
    for cut in plan.cuts:
        if not any(gid in plan.kept for gid in cut.groups) or (not remove and not cut.reads):
            continue
        node = nodes[cut.position]
        key = (cut.position, cut.index)
        value = replaced.get(key)
        if value is None:
            value = constant_value(node.inputs[cut.index])
        indices = _kept_indices(plan, cut)
        if cut.reads and cut.position in plan.means and cut.position in plan.biases:
            _compensate(nodes, cut, value, indices, plan.means[cut.position], plan.biases[cut.position], replaced)
        if remove:
            value = np.take(value, indices, axis=cut.axis)
        else:
            value = _zero_removed(value, cut.axis, indices)
        replaced[key] = value
    for (position, index), value in replaced.items():
        node = nodes[position]
        original = node.inputs[index]
        set_input(node, index, gs.Constant(names(f"{original.name}_pruned" if remove else f"{original.name}_zeroed"),
                                           np.ascontiguousarray(value)))
    if remove:
        for position, groups in plan.depthwise:
            if any(gid in plan.kept for gid in groups):
                nodes[position].attrs["group"] = plan.kept_count(groups)
        for position, outputs in plan.splits:
            if any(gid in plan.kept for part in outputs for gid in part):
                sizes = [plan.kept_count(part) for part in outputs]
                _set_split_sizes(nodes[position], sizes, _opset(graph), names)
        for position, groups in plan.flattens:
            if not any(gid in plan.kept for gid in groups):
                continue
            node = nodes[position]
            # [0, -1] flattens the same way whatever the first entry was (0, -1 or the batch size).
            set_input(node, 1, gs.Constant(names(f"{node.inputs[1].name}_pruned"), np.array([0, -1], np.int64)))
        for position, entry, before, sliced in plan.slices:
            if any(gid in plan.kept for gid in before + sliced):
                node = nodes[position]
                start = plan.kept_count(before)
                end = start + plan.kept_count(sliced)
                for index, bound in ((1, start), (2, end)):
                    value = constant_value(node.inputs[index]).copy()
                    value.reshape(-1)[entry] = bound
                    set_input(node, index, gs.Constant(names(f"{node.inputs[index].name}_pruned"), value))
        for position, entry, groups, unit in plan.head_reshapes:
            if any(gid in plan.kept for gid in groups):
                node = nodes[position]
                shape = constant_value(node.inputs[1]).astype(np.int64).copy()
                shape[entry] = unit * plan.kept_count(groups)
                set_input(node, 1, gs.Constant(names(f"{node.inputs[1].name}_pruned"), shape))
        interface = {id(tensor) for tensor in graph.inputs + graph.outputs}
        for node in nodes:
            for tensor in node.outputs:
                if isinstance(tensor, gs.Variable) and id(tensor) not in interface:
                    tensor.shape = None  # re-inferred: channel dims changed
    graph.cleanup()
    return to_model(graph, model)


def _split_sizes(node: gs.Node, total: int) -> list[int] | None:
    """A Split's part sizes along its axis of `total` elements: its 'split' input or attribute,
    else equal parts (num_outputs or one per output; the last smaller as opset 18 allows)."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        sizes = constant_value(node.inputs[1])
        return None if sizes is None else [int(size) for size in sizes]
    if "split" in node.attrs:
        return [int(size) for size in node.attrs["split"]]
    count = int(node.attrs.get("num_outputs", len(node.outputs)))
    each = -(-total // count)
    sizes = [each] * (count - 1) + [total - each * (count - 1)]
    return sizes if sizes[-1] > 0 else None


def _set_split_sizes(node: gs.Node, sizes: list[int], opset: int, names) -> None:
    """Give a Split explicit part sizes (the pruned ones): the 'split' input from opset 13, else the attribute."""
    node.attrs.pop("num_outputs", None)
    if opset < 13:
        node.attrs["split"] = list(sizes)
        return
    constant = gs.Constant(names(f"{node.name or 'split'}_sizes_pruned"), np.array(sizes, np.int64))
    if len(node.inputs) > 1:
        set_input(node, 1, constant)
    else:
        node.inputs.append(constant)


def bias_slots(graph: gs.Graph) -> dict[int, tuple[int, int]]:
    """Where each layer's constant bias is, by the layer's position: (position, input index) of a
    Conv's or Gemm's input 2, or of the constant operand of the Add that alone reads a MatMul."""
    positions = {id(node): index for index, node in enumerate(graph.nodes)}
    slots = {}
    for position, node in enumerate(graph.nodes):
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
            slots[position] = (position, 2)
        elif node.op == "MatMul" and node.outputs and len(node.outputs[0].outputs) == 1:
            add = node.outputs[0].outputs[0]
            if add.op == "Add" and id(add) in positions and len(add.inputs) == 2:
                other = 1 if add.inputs[0] is node.outputs[0] else 0
                if constant_value(add.inputs[other]) is not None:
                    slots[position] = (positions[id(add)], other)
    return slots


def _compensate(nodes: list[gs.Node], cut: Cut, weight: np.ndarray, kept: np.ndarray, means: np.ndarray,
                slot: tuple[int, int], replaced: dict) -> None:
    """Move the removed inputs' mean contribution into the layer's bias (at `slot`, see
    bias_slots): for a Conv, b += Σ_k∈removed mean_k · Σ W[:, k] (the kernel summed; at the
    zero-padded border this is approximate); for a Gemm, C += alpha/beta · Σ_f mean_f · W[f]
    oriented as [K, N]; for a MatMul, b += Σ_f mean_f · W[f, :]. The zeroed reference gets the
    same bias, so the surgery check still compares like with like."""
    node = nodes[cut.position]
    if node.op not in ("Conv", "Gemm", "MatMul") or len(means) != weight.shape[cut.axis]:
        return
    bias = replaced.get(slot)
    if bias is None:
        bias = constant_value(nodes[slot[0]].inputs[slot[1]])
    if bias is None:
        return
    removed = np.setdiff1d(np.arange(weight.shape[cut.axis]), kept)
    if not len(removed):
        return
    columns = np.take(weight.astype(np.float64), removed, axis=cut.axis)  # the weights that read them
    if node.op == "Conv":
        kernels = columns.sum(axis=tuple(range(2, columns.ndim))) if columns.ndim > 2 else columns  # [O, removed]
        shift = kernels @ means[removed]
    elif node.op == "Gemm":
        oriented = columns if cut.axis == 0 else columns.T  # [removed, N]
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        if beta == 0:
            return
        shift = alpha / beta * (means[removed] @ oriented)
    else:
        if columns.ndim != 2:
            return
        shift = means[removed] @ np.moveaxis(columns, cut.axis, 0)  # [removed, N]
    if bias.shape != shift.shape and bias.size != shift.size:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        # asarray: arithmetic on a 0-d bias (a scalar Add after a one-output MatMul) gives a numpy
        # scalar, which onnxruntime does not take as a feed
        compensated = np.asarray((bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype))
    if np.isfinite(compensated).all():  # means too large for the bias's dtype move nothing
        replaced[slot] = compensated


class ChannelMoments(NamedTuple):
    """A layer's input features on calibration data: mean, mean square and (when asked for, for a
    layer the refit supports) the mean square of what the other features cannot predict
    (_unpredictable, from the Gram matrix E[x xᵀ])."""

    mean: np.ndarray
    square: np.ndarray
    unpredictable: np.ndarray | None = None


def input_moments(model: onnx.ModelProto, plan: PrunePlan, data, samples: int = MOMENT_SAMPLES, *,
                  grams: bool = False) -> dict[int, ChannelMoments]:
    """For each layer that reads a group's channels (by position): the moments of each of its
    input features on calibration data, along the channel axis (1, or the last for a MatMul), in
    one pass over the samples. The means feed mean compensation (plan.means), the mean squares
    (and unpredictable parts) the data criteria (activation_scores). With `grams`, the Gram matrix
    of every input read by a layer the refit supports (reconstruct.SUPPORTED_OPS; memory:
    features² per such input) gives its features' unpredictable parts. Layers that read the same
    tensor share its moments."""
    from .calibration import capture_activations
    from .reconstruct import SUPPORTED_OPS

    graph = to_graph(model)
    keys, gram_keys = {}, set()
    for cut in plan.cuts:
        if cut.reads:  # a consumer: a layer of group 1, whose every output reads every input channel
            node = graph.nodes[cut.position]
            keys[cut.position] = (node.inputs[0].name, -1 if node.op == "MatMul" else 1)
            if grams and node.op in SUPPORTED_OPS and cut.block == 1:
                gram_keys.add(keys[cut.position])
    axes: dict[str, set[int]] = {}
    for name, axis in keys.values():
        axes.setdefault(name, set()).add(axis)
    sums: dict[tuple, np.ndarray] = {}
    squares: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, np.ndarray] = {}
    products: dict[tuple, np.ndarray] = {}
    product_counts: dict[tuple, int] = {}

    def accumulate(name: str, value: np.ndarray) -> None:
        for axis in axes[name]:
            along = axis % value.ndim
            moved = np.moveaxis(value.astype(np.float64), along, 0).reshape(value.shape[along], -1)
            # An activation the model overflowed (an infinity, a NaN) says nothing about a channel's
            # moments: only finite values count, and the Gram matrix takes whole finite positions.
            finite = np.isfinite(moved)
            whole = finite.all(axis=0)
            if not whole.all():
                moved = np.where(finite, moved, 0.0)
            key = (name, axis)
            sums[key] = sums.get(key, 0) + moved.sum(axis=1)
            squares[key] = squares.get(key, 0) + np.square(moved).sum(axis=1)
            counts[key] = counts.get(key, 0) + finite.sum(axis=1)
            if key in gram_keys:
                columns = moved if whole.all() else moved[:, whole]
                products[key] = products.get(key, 0) + columns @ columns.T
                product_counts[key] = product_counts.get(key, 0) + columns.shape[1]

    if axes:
        capture_activations(model, data.limit(samples), set(axes), reduce=accumulate)
    moments = {}
    for key in sums:
        if not counts[key].all() or not np.isfinite(squares[key]).all():
            continue  # a channel without one finite value (or beyond float64): no moments for this input
        unpredictable = None
        if product_counts.get(key) and np.isfinite(products[key]).all():
            unpredictable = _unpredictable(products[key] / product_counts[key])
        moments[key] = ChannelMoments(sums[key] / counts[key], squares[key] / counts[key], unpredictable)
    return {position: moments[key] for position, key in keys.items() if key in moments}


def _zero_removed(value: np.ndarray, axis: int, kept: np.ndarray) -> np.ndarray:
    """A copy of `value` with the entries along `axis` that are not in `kept` set to 0."""
    value = value.copy()
    index = [slice(None)] * value.ndim
    index[axis] = np.setdiff1d(np.arange(value.shape[axis]), kept)
    value[tuple(index)] = 0
    return value


def _kept_indices(plan: PrunePlan, cut: Cut) -> np.ndarray:
    """Indices along the cut axis that stay: each group's kept channels at its offset, each
    expanded to its block of `cut.block` elements."""
    parts, offset = [], 0
    for gid in cut.groups:
        size = plan.groups[gid].size
        kept = plan.kept.get(gid, np.arange(size))
        parts.append(offset + kept)
        offset += size
    channels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if cut.block == 1:
        return channels
    return (channels[:, None] * cut.block + np.arange(cut.block)[None, :]).reshape(-1)


def _layer_macs(node: gs.Node) -> int | None:
    """Multiply-adds of one sample of a Conv/ConvTranspose/Gemm/MatMul with a constant weight:
    weight elements times output positions (None where the sizes needed are unknown)."""
    if node.op not in LAYER_OPS or len(node.inputs) < 2 or not node.outputs:
        return None
    weight = constant_value(node.inputs[1])
    if weight is None:
        return None
    if node.op == "Conv":
        sizes = (node.outputs[0].shape or [None, None, None])[2:]
    elif node.op == "ConvTranspose":
        sizes = (node.inputs[0].shape or [None, None, None])[2:]
    elif node.op == "MatMul":
        shape = node.outputs[0].shape
        sizes = shape[1:-1] if shape is not None else [None]
    else:
        sizes = []
    if any(not isinstance(size, (int, np.integer)) for size in sizes):
        return None
    return int(weight.size) * int(np.prod(sizes)) if sizes else int(weight.size)


def _label(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'" if node.name else node.op


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def _dim(tensor: gs.Tensor, axis: int):
    if tensor.shape is None or len(tensor.shape) <= axis:
        return None
    size = tensor.shape[axis]
    return int(size) if isinstance(size, (int, np.integer)) else None


def _trailing_size(tensor: gs.Tensor, start: int) -> int | None:
    """The product of the static dims from `start` on, or None if one is unknown."""
    if tensor.shape is None:
        return None
    sizes = tensor.shape[start:]
    if any(not isinstance(size, (int, np.integer)) or size < 0 for size in sizes):
        return None
    return int(np.prod(sizes)) if sizes else 1


def _opset(graph: gs.Graph) -> int:
    return graph.opset or 0


# ---- the whole step: plan, cut, check, refit -----------------------------------------------------


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


def prune(model: onnx.ModelProto, data, options: PruneOptions = PruneOptions(), *, progress=None,
          shapes: dict | None = None, original: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune a simplified model: plan, cut, optionally check the cut, refit on `data`
    (a CalibrationData) and return (pruned model, report). The caller reruns the lossless pipeline.
    Criterion "bn" reads the BatchNormalization γ of `original`, the model before simplification
    (default: `model`).

    With `options.fidelity_target` the ratio is searched (bisection, at most `options.ratio`):
    the largest whose result, refit included, meets the target on the evaluation samples."""
    criterion = options.criterion
    if criterion == "auto":
        criterion = "activation" if data is not None else "l2"
        options = replace(options, criterion=criterion)
    if criterion in DATA_CRITERIA and data is None:
        raise UsageError(f"--prune-criterion {criterion} needs calibration data (--calibration DIR)")
    if options.held_out and data is None:
        raise UsageError("--held-out needs calibration data (--calibration DIR)")
    data, evaluation = fidelity_split(data, options.held_out)
    measured = evaluation, _expected_outputs(model, evaluation)  # first: a sample the model overflows is refused
    gammas = bn_gammas(original if original is not None else model) if criterion == "bn" else None
    plan = analyze(model, "l2" if criterion in DATA_CRITERIA else criterion, input_shapes=plan_shapes(data),
                   gammas=gammas)
    if data is not None and (criterion in DATA_CRITERIA or options.compensate):
        moments = input_moments(model, plan, data, grams=criterion == "reconstruction")
        if criterion in DATA_CRITERIA:
            activation_scores(model, plan, moments)
        if options.compensate:
            plan.means.update({position: value.mean for position, value in moments.items() if position in plan.biases})
    costs = None
    if (options.macs is not None or options.parameters is not None) and (data is None or options.allocation != "sensitivity"):
        raise UsageError("--prune-macs and --prune-params need calibration data (--calibration DIR) and sensitivity allocation")
    if options.allocation == "sensitivity" and data is not None:
        costs = sensitivity_costs(model, plan, data, progress=progress)
    target = options.fidelity_target
    if target is None:
        return _prune_at(model, plan, costs, data, measured, options, options.ratio, progress, shapes)
    if data is None:
        raise UsageError("a fidelity target for pruning needs calibration data (--calibration DIR)")
    tried = []
    low, high = 0.0, options.ratio
    best = None
    candidate = _prune_at(model, plan, costs, data, measured, replace(options, check_surgery=False), high, progress, shapes)
    tried.append((high, candidate[1].final_fidelity()))
    if target.met(candidate[1].final_fidelity()):
        best = (high, candidate)
    else:
        for _ in range(SEARCH_STEPS):
            middle = (low + high) / 2
            candidate = _prune_at(model, plan, costs, data, measured, replace(options, check_surgery=False), middle,
                                  progress, shapes)
            tried.append((middle, candidate[1].final_fidelity()))
            if target.met(candidate[1].final_fidelity()):
                low, best = middle, (middle, candidate)
            else:
                high = middle
    ratio = best[0] if best is not None else 0.0
    pruned, report = _prune_at(model, plan, costs, data, measured, options, ratio, progress, shapes) \
        if options.check_surgery or best is None \
        else best[1]
    report.notes.append(
        f"fidelity target {target}: ratio {ratio:.3f} is the largest found meeting it (tried "
        + ", ".join(f"{value:.3f}: SQNR {fidelity['sqnr_db']:.1f} dB" for value, fidelity in tried) + ")"
    )
    report.target = str(target)
    report.target_met = target.met(report.final_fidelity()) if report.fidelity else ratio == 0.0
    return pruned, report


def _expected_outputs(model: onnx.ModelProto, evaluation) -> list[dict] | None:
    """The model's outputs on the evaluation samples, which must be finite to measure fidelity on."""
    from .verify import Runner

    if evaluation is None:
        return None
    runner = Runner(model, label="original model")
    outputs = [runner.run(feed) for feed in evaluation]
    check_finite_outputs(outputs, evaluation.labels)
    return outputs


def _prune_at(model, plan: PrunePlan, costs, data, measured, options: PruneOptions, ratio: float, progress, shapes):
    """Prune at `ratio`; `measured` is (the evaluation samples, the model's outputs on them)."""
    from .verify import FidelityPool, Runner, Verifier, synthesize_inputs

    evaluation, reference_outputs = measured

    ratios, allocation_note = None, "every group loses the same share (uniform)"
    if costs is not None and (ratio > 0 or options.macs or options.parameters):
        allocation_note = (f"shares by measured sensitivity on {sensitivity_samples(plan, data)} calibration "
                           f"samples (levels {', '.join(f'{level:g}' for level in SENSITIVITY_LEVELS)})")
    input_shapes = plan_shapes(data)  # a calibration sample is read for them
    macs_after = None
    if costs is not None and (options.macs or options.parameters):
        chosen, pruned, measured = _meet_budget(model, plan, costs, options, input_shapes)
        if options.parameters is None:
            macs_after = measured
    else:
        if costs is not None and ratio > 0:
            ratios = allocate_from_costs(plan, costs, ratio)
        chosen = plan.choose(ratio, round_to=options.round_to, ratios=ratios)
        pruned = _apply(model, chosen, remove=True)
    report = PruneReport(
        ratio=ratio, criterion=options.criterion, groups=chosen.describe(),
        prunable_channels=chosen.prunable_channels, removed_channels=chosen.removed_channels,
        parameters_before=count_parameters(model), parameters_after=count_parameters(pruned),
    )
    if options.criterion == "bn":
        report.notes.append(f"criterion bn: {plan.gamma_layers[0]} of {plan.gamma_layers[1]} layers scored by their "
                            "BatchNormalization's |γ|, the others by l2")
    report.notes.append(f"allocation: {allocation_note}")
    report.macs_before = plan.total_macs
    report.macs_after = macs_after if macs_after is not None else _model_macs(pruned, input_shapes)
    if options.check_surgery:
        zeroed = _apply(model, chosen, remove=False)  # built only for the check: a second export of the model
        feeds = list(data.limit(2)) if data is not None and not data.synthetic else []
        if feeds:  # the user's samples, and random ones of their shapes (no data: random ones only)
            feeds += synthesize_inputs(zeroed, {name: list(array.shape) for name, array in feeds[0].items()}, 2)
        check = Verifier(zeroed, inputs=feeds or None, shapes=shapes, samples=2).check(pruned, label="pruned model")
        inputs = f"{_count(len(feeds) - 2, 'calibration sample')} and 2 random inputs" if feeds else "2 random inputs"
        report.surgery_exact = check.passed
        report.surgery_check = ("exact: equal to the original with the removed channels' weights zeroed "
                                f"on {inputs}, {check.message}") if check.passed else f"NOT exact on {inputs}: {check.message}"
    if data is None:
        report.notes.append("no calibration data: no reconstruction and no fidelity figures")
        return pruned, report
    refit = pruned
    if options.reconstruct and chosen.kept:
        refit = _reconstruct(model, pruned, chosen, data, report, progress, options.refit == "downstream")
    candidates = {"pruned": Runner(pruned, label="pruned model")}
    if refit is not pruned:
        candidates["pruned + refit"] = Runner(refit, label="refit model")
    for key, runner in candidates.items():
        pools = {}
        for feed, expected in zip(evaluation, reference_outputs):
            actual = runner.run(feed)
            for name in expected:
                pools.setdefault(name, FidelityPool()).add(expected[name], actual[name])
        report.fidelity[key] = {
            "sqnr_db": FidelityPool.worst(pool.sqnr_db() for pool in pools.values()),
            "cosine": FidelityPool.worst(pool.cosine() for pool in pools.values()),
        }
    if math.isnan(report.fidelity["pruned"]["cosine"]):
        raise VerificationError("the pruned model gives NaN or infinity where the original does not, on the "
                                "evaluation samples: " + "; ".join(pool.problem() or "" for pool in pools.values()))
    if "pruned + refit" in report.fidelity and math.isnan(report.fidelity["pruned + refit"]["cosine"]):
        # The refit broke what the cut alone kept finite: the pruned weights stay.
        del report.fidelity["pruned + refit"]
        report.notes.append("the refit gave NaN or infinity on the evaluation samples: the pruned weights are kept")
        for layer in report.reconstruction.values():
            if layer["status"] == "refit":
                layer["status"], layer["reason"] = "kept", "the refit model gave NaN or infinity"
        refit = pruned
    used = [step for step, done in (("the channel choice", options.criterion in DATA_CRITERIA),
                                    ("the allocation", costs is not None), ("the mean compensation", options.compensate),
                                    ("the refit", any(fit["status"] == "refit" for fit in report.reconstruction.values())))
            if done]
    count = _count(len(evaluation), "sample")
    if options.held_out:
        report.notes.append(f"fidelity measured on {count} held out from pruning")
    else:
        report.notes.append(f"fidelity measured on the last {count} of the calibration data"
                            + (f", which {_series(used)} used too" if used else "") + " (--held-out N keeps samples apart)")
    return refit, report


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _series(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else "".join(words)


def _meet_budget(model, plan: PrunePlan, costs, options: PruneOptions, shapes: dict | None):
    """Allocate a --prune-params / --prune-macs budget so that the pruned model really has that
    share fewer parameters (or multiply-adds): the allocation prices each channel at first order
    and the kept counts round down, so the budget it is given grows until the cut meets the target.
    Returns (plan chosen, pruned model, its parameters or multiply-adds, whichever the budget is in)."""
    target = options.parameters if options.parameters is not None else options.macs
    before = count_parameters(model) if options.parameters is not None else plan.total_macs
    budget = target
    for _ in range(BUDGET_STEPS):
        ratios = allocate_from_costs(plan, costs, 0.0, **({"parameters": budget} if options.parameters is not None
                                                          else {"macs": budget}))
        chosen = plan.choose(0.0, round_to=options.round_to, ratios=ratios)
        pruned = _apply(model, chosen, remove=True)
        after = count_parameters(pruned) if options.parameters is not None else _model_macs(pruned, shapes)
        cut = 1 - after / before if before else 0.0
        if cut >= target or budget >= 0.99:
            break
        budget = min(0.99, budget * target / max(cut, 1e-3) + 1e-3)
    return chosen, pruned, after


def activation_scores(model: onnx.ModelProto, plan: PrunePlan, moments: dict[int, ChannelMoments]) -> None:
    """Replace each prunable group's scores by what its channels feed forward: for every consumer
    reading channel k, E[x_k²]·‖W[:, k]‖² (the output energy that channel carries into the layer;
    E[x²] from input_moments), summed over the group's consumers, each consumer normalised by its mean.
    E[x_k²] counts as at least IDLE_FLOOR times the layer's mean: a channel idle on the calibration
    images may well not be on others (PP-OCRv4 det, calibrated on printed pages and judged on
    typewriter and handwriting: 15.4 dB held out at ratio 0.1 without the floor, 20.9 dB with it).

    Where the moments hold unpredictable parts (the reconstruction criterion, for a consumer the
    refit supports), E[x_k²] becomes 1 / (G + εI)⁻¹_kk, G the Gram matrix: the part of channel k
    the other channels cannot predict (its residual's mean square under least squares), which is
    what a refit of that consumer cannot win back. A channel that copies another costs next to
    nothing."""
    graph = to_graph(model)
    scores: dict[int, np.ndarray] = {}
    for cut in plan.cuts:
        if not cut.reads or not any(plan.groups[g].prunable for g in cut.groups) or cut.position not in moments:
            continue
        weight = constant_value(graph.nodes[cut.position].inputs[cut.index])
        columns = np.moveaxis(weight.astype(np.float64), cut.axis, 0).reshape(weight.shape[cut.axis], -1)
        carried = np.square(columns).sum(axis=1)  # per input feature of the layer
        features = moments[cut.position].unpredictable
        if features is None:
            # A feature idle on the calibration data is not known to be idle on other data: its
            # E[x²] is floored at IDLE_FLOOR of the layer's mean, so idle channels rank by weight.
            square = moments[cut.position].square
            features = np.maximum(square, IDLE_FLOOR * square.mean())
        per_channel = carried * features if features.shape == carried.shape else carried
        if cut.block > 1:  # a flattened channel or a head: its block of features sums up
            per_channel = per_channel.reshape(-1, cut.block).sum(axis=1)
        per_channel = per_channel / max(per_channel.mean(), 1e-30)
        offset = 0
        for gid in cut.groups:
            size = plan.groups[gid].size
            scores[gid] = scores.get(gid, 0) + per_channel[offset:offset + size]
            offset += size
    for gid, score in scores.items():
        if plan.groups[gid].prunable:
            plan.groups[gid].scores = score


def _unpredictable(gram: np.ndarray) -> np.ndarray:
    """Each feature's residual mean square when the others predict it by (ridge) least squares."""
    ridge = GRAM_RIDGE * max(float(np.trace(gram)) / len(gram), 1e-30)
    return 1.0 / np.diag(np.linalg.inv(gram + ridge * np.eye(len(gram))))


def allocate(model: onnx.ModelProto, plan: PrunePlan, data, ratio: float, *, progress=None) -> dict[int, float]:
    """Each prunable group's share, so that `ratio` of all prunable channels go where they cost
    the outputs least (sensitivity_costs, then allocate_from_costs)."""
    return allocate_from_costs(plan, sensitivity_costs(model, plan, data, progress=progress), ratio)


def sensitivity_costs(model: onnx.ModelProto, plan: PrunePlan, data, *, progress=None) -> dict[int, list[float]]:
    """Each prunable group's cost at the shares 0 and SENSITIVITY_LEVELS: the model's outputs
    with only that group's removed channels zeroed in its consumers (what the cut computes, see
    prune_model's zeroed reference), as noise energy over signal energy, on a few calibration
    samples (_NoiseProbe)."""
    groups = [gid for gid, group in plan.groups.items() if group.prunable and group.scores is not None]
    probe = _NoiseProbe(model, plan, data.limit(sensitivity_samples(plan, data)))
    costs = {}
    for done, gid in enumerate(groups):
        costs[gid] = [0.0] + [probe.noise(plan.choose(0.0, ratios={gid: level})) for level in SENSITIVITY_LEVELS]
        if progress:
            progress("pruning sensitivity", done + 1, len(groups))
    return costs


class _NoiseProbe:
    """The model's output noise with a chosen plan's removed channels zeroed in their consumers
    (and their means moved into the consumers' biases), as noise energy over signal energy pooled
    over `samples`. One onnxruntime session serves every measurement: the consumers' weights are
    its inputs."""

    def __init__(self, model: onnx.ModelProto, plan: PrunePlan, samples):
        from .runtime import Session

        self.plan = plan
        self.graph = graph = to_graph(model)
        self.reads = [cut for cut in plan.cuts if cut.reads]
        names = {(cut.position, cut.index): graph.nodes[cut.position].inputs[cut.index].name for cut in self.reads}
        self.slots = {position: slot for position, slot in plan.biases.items() if position in plan.means}
        for slot in self.slots.values():  # the biases that mean compensation moves
            names[slot] = graph.nodes[slot[0]].inputs[slot[1]].name
        self.names = names
        self.originals = {name: constant_value(graph.nodes[position].inputs[index])
                          for (position, index), name in names.items()}
        probe = _weights_as_inputs(model, set(self.originals))
        # The original weights stay in the worker: a trial sends only the weights it changed.
        self.session = Session(probe, label="model to probe", optimized=True, defaults=self.originals)
        self.feeds = list(samples)
        self.reference = [self.session.run(None, feed) for feed in self.feeds]
        # Pooled over the samples, like the SQNR fidelity reports: a sample whose outputs are all
        # but zero (a detector's map of an image without text) would make any per-sample ratio explode.
        # Outputs the model itself overflows (NaN, infinity) measure nothing and are left out.
        self.signal = max(sum(float(np.sum(np.square(output[np.isfinite(output)], dtype=np.float64)))
                              for outputs in self.reference for output in outputs), 1e-30)

    def noise(self, trial: PrunePlan) -> float:
        weights = dict(self.originals)
        for cut in self.reads:
            if not any(gid in trial.kept for gid in cut.groups):
                continue
            name = self.names[(cut.position, cut.index)]
            kept = _kept_indices(trial, cut)
            slot = self.slots.get(cut.position)
            if slot is not None:
                biases = {slot: weights[self.names[slot]]}
                _compensate(self.graph.nodes, cut, weights[name], kept, self.plan.means[cut.position], slot, biases)
                weights[self.names[slot]] = biases[slot]
            weights[name] = _zero_removed(weights[name], cut.axis, kept)
        changed = {name: value for name, value in weights.items() if value is not self.originals[name]}
        total = 0.0
        for feed, expected in zip(self.feeds, self.reference):
            actual = self.session.run(None, {**feed, **changed})
            total += sum(_noise(a, e) for a, e in zip(actual, expected)
                         if a.shape == e.shape)  # a count that follows the data (NonZero) may differ
        return total / self.signal


def _noise(actual: np.ndarray, expected: np.ndarray) -> float:
    """Σ (actual − expected)² where the original's output is finite; an infinity or NaN the cut
    brings where the original has a number is infinite noise (that cut is never the cheapest)."""
    finite = np.isfinite(expected)
    difference = actual.astype(np.float64)[finite] - expected[finite]
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.sum(np.square(difference)))
    return total if math.isfinite(total) else math.inf


def sensitivity_samples(plan: PrunePlan, data) -> int:
    """How many calibration samples the sensitivity measurements use: what SENSITIVITY_WORK
    multiply-adds allow (all of them for a small model), at least SENSITIVITY_SAMPLES."""
    runs = max(1, sum(group.prunable and group.scores is not None for group in plan.groups.values())) \
        * len(SENSITIVITY_LEVELS)
    affordable = int(SENSITIVITY_WORK // (runs * plan.total_macs)) if plan.total_macs else SENSITIVITY_SAMPLES
    return min(len(data), max(SENSITIVITY_SAMPLES, affordable))


def allocate_from_costs(plan: PrunePlan, costs: dict[int, list[float]], ratio: float, *,
                        macs: float | None = None, parameters: float | None = None) -> dict[int, float]:
    """Greedily, the group whose next level adds the least noise per channel removed takes it,
    until `ratio` of the prunable channels are removed (the last step part-way). With `macs`
    the budget is that share of the model's multiply-adds instead, priced per MAC removed."""
    groups = list(costs)
    if macs is not None:
        groups = [gid for gid in groups if plan.groups[gid].macs > 0]
        unit = {gid: plan.groups[gid].macs for gid in groups}
        budget = macs * plan.total_macs
    elif parameters is not None:
        groups = [gid for gid in groups if plan.groups[gid].parameters > 0]
        unit = {gid: float(plan.groups[gid].parameters) for gid in groups}
        budget = parameters * plan.total_parameters
    else:
        unit = {gid: 1.0 for gid in groups}
        budget = ratio * sum(plan.groups[gid].size for gid in groups)
    levels = (0.0,) + SENSITIVITY_LEVELS
    step = {gid: 0 for gid in groups}
    removed = 0.0
    while removed < budget:
        best, best_price = None, math.inf
        for gid in groups:
            if step[gid] + 1 >= len(levels):
                continue
            amount = plan.groups[gid].size * (levels[step[gid] + 1] - levels[step[gid]]) * unit[gid]
            price = (costs[gid][step[gid] + 1] - costs[gid][step[gid]]) / amount
            if price < best_price:
                best, best_price = gid, price
        if best is None:
            break
        size = plan.groups[best].size
        take = size * (levels[step[best] + 1] - levels[step[best]]) * unit[best]
        if removed + take > budget:
            share = levels[step[best]] + (budget - removed) / (size * unit[best])
            return {**{gid: levels[step[gid]] for gid in groups}, best: share}
        step[best] += 1
        removed += take
    return {gid: levels[step[gid]] for gid in groups}


def _weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `model` in which the named initializers are graph inputs instead."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    kept = [tensor for tensor in probe.graph.initializer if tensor.name not in names]
    moved = [tensor for tensor in probe.graph.initializer if tensor.name in names]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    listed = {value.name for value in probe.graph.input}
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                             for tensor in moved if tensor.name not in listed)
    return probe


def _reconstruct(model, pruned, plan: PrunePlan, data, report: PruneReport, progress,
                 downstream: bool = False) -> onnx.ModelProto:
    """Refit every consumer of a pruned group (the layers that lost input channels), in graph order."""
    try:
        from .reconstruct import reconstruct
    except ImportError:  # pragma: no cover - the module ships with the package
        report.notes.append("reconstruction unavailable")
        return pruned
    graph = to_graph(model)
    layers = []
    for cut in plan.cuts:
        node = graph.nodes[cut.position]
        if cut.reads and any(gid in plan.kept for gid in cut.groups) and node.name not in layers:
            layers.append(node.name)
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    layers.sort(key=order.get)
    if downstream and layers:
        # Every later layer too: its input carries the error of the layers before it, which a
        # refit on the pruned model's own activations takes out as well.
        first = order[layers[0]]
        later = [node.name for node in graph.nodes[first:] if node.op in LAYER_OPS and node.name
                 and len(node.inputs) > 1 and constant_value(node.inputs[1]) is not None]
        layers = sorted(set(layers) | set(later), key=order.get)
    kept_outputs = {}
    for cut in plan.cuts:
        node = graph.nodes[cut.position]
        if node.name in layers and not cut.reads and cut.index == 1 and any(gid in plan.kept for gid in cut.groups):
            kept_outputs[node.name] = _kept_indices(plan, cut)
    refit, fits = reconstruct(model, pruned, layers, data, kept_outputs=kept_outputs, progress=progress)
    for name, fit in fits.items():
        report.reconstruction[name] = {
            "status": fit.status, "reason": fit.reason,
            "error_before": fit.error_before, "error_after": fit.error_after, "ridge": fit.ridge,
        }
    return refit


def plan_shapes(data) -> dict | None:
    return {name: list(array.shape) for name, array in next(iter(data)).items()} if data is not None else None


def _model_macs(model: onnx.ModelProto, input_shapes: dict | None) -> int:
    graph = to_graph(model)
    if input_shapes:
        set_input_shapes(graph, input_shapes)
    get_pass("infer-shapes")(graph, PassContext())
    return sum(_layer_macs(node) or 0 for node in graph.nodes)


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
