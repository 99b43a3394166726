"""The plan of a pruning: channel groups, and a record of every tensor and node the groups touch.

Records name a node by `node_key`, its first output's tensor name, not by its place in a graph's
node list: a plan is made on one import of the model and applied to others (the cut, the zeroed
reference, the sensitivity probe, the moments), and a tensor name is what every import shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UsageError

GroupIds = tuple[int, ...]
# Maps the groups a record holds to the groups it holds afterwards (a group divided in two, the
# union-find's roots): every record re-maps itself through one.
Regroup = Callable[[GroupIds], GroupIds]


def node_key(node: gs.Node) -> str:
    """A node's name across imports of one model: its first output's tensor name (unique in a
    valid graph, where node names may be empty or repeated)."""
    return node.outputs[0].name if node.outputs else ""


def nodes_by_key(graph: gs.Graph) -> dict[str, gs.Node]:
    return {node_key(node): node for node in graph.nodes if node_key(node)}


@dataclass(frozen=True)
class Channels:
    """What is known of a tensor's channel axis: the groups laid along it, in order (each whole),
    the axis and the tensor's rank, and `block`: elements per channel along the axis (1, or the
    spatial size after a Flatten folded it in, or a head's size)."""

    groups: GroupIds
    axis: int
    rank: int
    block: int = 1
    # A fused projection's parts (Q, K, V) split onto an axis of their own: then the groups lie one
    # per index along axis `parts`, each with its channels along `axis` (the heads).
    parts: int | None = None

    def regroup(self, regroup: Regroup) -> Channels:
        return replace(self, groups=regroup(self.groups))


@dataclass(frozen=True)
class Cut:
    """One tensor cut along a channel axis: input `index` of node `node` (its node_key) loses,
    along `axis`, the removed channels of `groups` (laid out in order, `block` elements each).
    `reads` marks a consumer's weight (it reads the channels)."""

    node: str
    index: int
    axis: int
    groups: GroupIds
    block: int = 1
    reads: bool = False

    @property
    def slot(self) -> tuple[str, int]:
        return self.node, self.index

    def regroup(self, regroup: Regroup) -> Cut:
        return replace(self, groups=regroup(self.groups))


@dataclass(frozen=True)
class NodeGroups:
    """A node whose attribute or shape input counts the channels of `groups`."""

    node: str
    groups: GroupIds

    def members(self) -> GroupIds:
        return self.groups

    def regroup(self, regroup: Regroup):
        return replace(self, groups=regroup(self.groups))


@dataclass(frozen=True)
class Depthwise(NodeGroups):
    """A depthwise (or grouped) Conv: its `group` attribute becomes the kept count of `groups`."""


@dataclass(frozen=True)
class Flatten(NodeGroups):
    """A Reshape that flattens `groups` with a shape that spells their count: it becomes [0, -1]."""


@dataclass(frozen=True)
class HeadReshape(NodeGroups):
    """A Reshape that splits a tensor's channels into (heads, head size) or merges them back:
    shape entry `entry` counts the heads' elements, `unit` per head (1 where the entry is the
    head count, the head size where it is heads x size)."""

    entry: int = 0
    unit: int = 1


@dataclass(frozen=True)
class ChannelSplit:
    """A Split on a channel axis: the groups each output carries (its sizes follow them)."""

    node: str
    outputs: tuple[GroupIds, ...]

    def members(self) -> GroupIds:
        return tuple(gid for part in self.outputs for gid in part)

    def regroup(self, regroup: Regroup) -> ChannelSplit:
        return replace(self, outputs=tuple(regroup(part) for part in self.outputs))


@dataclass(frozen=True)
class ChannelSlice:
    """A Slice of a channel axis: `entry` is the axis's index among its starts/ends, `before` the
    groups before its start, `kept` the groups it keeps; its bounds follow them."""

    node: str
    entry: int
    before: GroupIds
    kept: GroupIds

    def members(self) -> GroupIds:
        return self.before + self.kept

    def regroup(self, regroup: Regroup) -> ChannelSlice:
        return replace(self, before=regroup(self.before), kept=regroup(self.kept))


@dataclass(frozen=True)
class BiasSlot:
    """Where a layer's constant bias is: input `index` of node `node` (the layer, or the Add after a MatMul)."""

    node: str
    index: int

    @property
    def slot(self) -> tuple[str, int]:
        return self.node, self.index


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
    depthwise: list[Depthwise]
    kept: dict[int, np.ndarray] = field(default_factory=dict)
    total_parameters: int = 0
    flattens: list[Flatten] = field(default_factory=list)
    head_reshapes: list[HeadReshape] = field(default_factory=list)
    total_macs: int = 0  # Conv/ConvTranspose/Gemm/MatMul multiply-adds of one sample (0 where shapes are unknown)
    # Consumer (node_key) -> mean of each input feature on calibration data: a removed channel's
    # mean contribution moves into the consumer's bias (see input_moments).
    means: dict[str, np.ndarray] = field(default_factory=dict)
    splits: list[ChannelSplit] = field(default_factory=list)
    slices: list[ChannelSlice] = field(default_factory=list)
    # Layer (node_key) -> where its constant bias is (bias_slots): where mean compensation goes
    biases: dict[str, BiasSlot] = field(default_factory=dict)
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

    def cuts_any(self, groups) -> bool:
        """Whether the chosen plan removes channels of any of `groups`."""
        return any(gid in self.kept for gid in groups)

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
        return [self._row(gid, group) for gid, group in sorted(self.groups.items())]

    def _row(self, gid: int, group: Group) -> dict:
        removed_score = None
        if group.scores is not None and float(np.sum(group.scores)) > 0:
            kept = self.kept.get(gid, np.arange(group.size))
            removed_score = 1.0 - float(np.sum(group.scores[kept]) / np.sum(group.scores))
        return {
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
        }

    def kept_indices(self, cut: Cut) -> np.ndarray:
        """Indices along the cut axis that stay: each group's kept channels at its offset, each
        expanded to its block of `cut.block` elements."""
        parts, offset = [], 0
        for gid in cut.groups:
            size = self.groups[gid].size
            kept = self.kept.get(gid, np.arange(size))
            parts.append(offset + kept)
            offset += size
        channels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if cut.block == 1:
            return channels
        return (channels[:, None] * cut.block + np.arange(cut.block)[None, :]).reshape(-1)
