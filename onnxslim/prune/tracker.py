"""The state of one dependency analysis: channel groups (a union-find), what each tensor's channel
axis holds, and the records of every tensor and node the groups touch. The per-op handlers
(registry.py) read and extend it; analysis.py walks the graph and turns it into a PrunePlan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import constant_value
from .criteria import weight_scores
from .records import ChannelSlice, ChannelSplit, Channels, Cut, Depthwise, Flatten, Group, GroupIds, HeadReshape, node_key


class Analysis:
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
        self.depthwise: list[Depthwise] = []
        self.flattens: list[Flatten] = []
        self.head_reshapes: list[HeadReshape] = []
        self.fused: list[GroupIds] = []  # a fused projection's parts: they must end as one group
        self.scores: dict[int, list[np.ndarray]] = {}
        self.splits: list[ChannelSplit] = []
        self.slices: list[ChannelSlice] = []
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

    def size(self, groups) -> int:
        """Channels of `groups` together."""
        return sum(self.groups[self.find(g)].size for g in groups)

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

    def lines_up(self, first: GroupIds, second: GroupIds) -> bool:
        """Whether two tensors' groups match one for one in size (so they can be joined)."""
        return len(first) == len(second) and \
            [self.groups[self.find(g)].size for g in first] == [self.groups[self.find(g)].size for g in second]

    def join(self, first: GroupIds, second: GroupIds) -> None:
        """Tie each group of `first` to its peer in `second` (an element-wise join, a product per head)."""
        for mine, theirs in zip(first, second):
            self.union(mine, theirs)

    def records(self) -> list:
        """The records that count channels by group (not the cuts): depthwise Convs, Splits,
        Slices, flattens and head reshapes."""
        return [*self.depthwise, *self.splits, *self.slices, *self.flattens, *self.head_reshapes]

    def regroup_records(self, regroup) -> None:
        """Re-map every record's groups (a group divided, or the union-find's roots at the end)."""
        self.cuts = [cut.regroup(regroup) for cut in self.cuts]
        self.depthwise = [record.regroup(regroup) for record in self.depthwise]
        self.splits = [record.regroup(regroup) for record in self.splits]
        self.slices = [record.regroup(regroup) for record in self.slices]
        self.flattens = [record.regroup(regroup) for record in self.flattens]
        self.head_reshapes = [record.regroup(regroup) for record in self.head_reshapes]

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

        def divided(groups: GroupIds) -> GroupIds:
            return tuple(part for g in groups for part in (parts if g == root else (g,)))

        self.regroup_records(divided)
        self.fused = [divided(fused) for fused in self.fused]
        self.channels = {key: channels.regroup(divided) if root in channels.groups else channels
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
        recorded = [g for record in self.records() if not isinstance(record, Flatten) for g in record.members()]
        recorded += [g for parts in self.fused for g in parts]
        if any(self.groups[root].size % unit for root in roots) or any(self.find(g) in roots for g in recorded):
            return False

        def holds(groups: GroupIds) -> bool:
            return any(self.find(g) in roots for g in groups)

        tensors = [key for key, channels in self.channels.items() if holds(channels.groups)]
        if any(self.find(g) not in roots for cut in self.cuts if holds(cut.groups) for g in cut.groups) or \
                any(self.find(g) not in roots for key in tensors for g in self.channels[key].groups):
            return False
        self.cuts = [replace(cut, block=cut.block * unit) if holds(cut.groups) else cut for cut in self.cuts]
        for key in tensors:
            self.channels[key] = replace(self.channels[key], block=self.channels[key].block * unit)
        for member in range(len(self.groups)):
            if self.find(member) in roots and member not in self.retired:
                self.groups[member].size //= unit
                self.scores[member] = [score.reshape(-1, unit).sum(axis=1) for score in self.scores.get(member, [])]
        return True

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

    def freeze(self, gids, reason: str) -> None:
        for gid in gids:
            group = self.groups[self.find(gid)]
            group.frozen = group.frozen or reason

    def freeze_tensor(self, tensor: gs.Tensor, reason: str) -> None:
        known = self.channels.get(id(tensor))
        if known is not None:
            self.freeze(known.groups, reason)

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            self.freeze_tensor(tensor, reason)

    def pass_on(self, node: gs.Node, channels: Channels, output: int = 0) -> None:
        if len(node.outputs) > output:
            self.channels[id(node.outputs[output])] = channels
            self.tensors[id(node.outputs[output])] = node.outputs[output]

    # -- layers

    def produce(self, node: gs.Node, weight: np.ndarray, axis: int) -> int:
        """A new group for the layer's output channels (its weight's `axis`), scored and cut there."""
        gid = self.new_group(weight.shape[axis], node.name)
        self.score(gid, weight, axis=axis, name=node.name)
        self.cuts.append(Cut(node_key(node), 1, axis, (gid,)))
        return gid

    def cut_bias(self, node: gs.Node, groups: GroupIds, block: int = 1) -> None:
        """A Conv's constant bias (input 2) goes with its output channels."""
        if len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
            self.cuts.append(Cut(node_key(node), 2, 0, groups, block))

    def consume(self, node: gs.Node, source: Channels, weight_axis: int) -> None:
        self.cuts.append(Cut(node_key(node), 1, weight_axis, source.groups, source.block, reads=True))
        for gid in source.groups:
            self.groups[self.find(gid)].consumers.append(node.name)

    def score(self, gid: int, weight: np.ndarray, axis: int, name: str = "") -> None:
        self.scored += 1
        gamma = self.gammas.get(name) if self.criterion == "bn" and name else None
        if gamma is not None and gamma.shape == (weight.shape[axis],):
            norms = gamma
            self.scored_by_gamma += 1
        else:
            norms = weight_scores(weight, axis, self.criterion)
        mean = norms.mean()
        self.scores.setdefault(gid, []).append(norms / mean if mean > 0 else norms)


# -- what shape inference says of a tensor


def label(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'" if node.name else node.op


def rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def dim(tensor: gs.Tensor, axis: int):
    if tensor.shape is None or len(tensor.shape) <= axis:
        return None
    size = tensor.shape[axis]
    return int(size) if isinstance(size, (int, np.integer)) else None


def trailing_size(tensor: gs.Tensor, start: int) -> int | None:
    """The product of the static dims from `start` on, or None if one is unknown."""
    if tensor.shape is None:
        return None
    sizes = tensor.shape[start:]
    if any(not isinstance(size, (int, np.integer)) or size < 0 for size in sizes):
        return None
    return int(np.prod(sizes)) if sizes else 1
