"""Layer-wise least-squares reconstruction of pruned layers, with the original model as teacher.

    rebuilt, fits = reconstruct(original, pruned, ["conv2", "conv5"], CalibrationData.from_path(original, "calib/"))

After channel pruning a layer sees fewer input channels than it was trained with. As in He et al.
2017 ("Channel Pruning for Accelerating Very Deep Neural Networks"), each named layer is refit by
ridge regression so that, fed its input in the pruned model, it reproduces the same layer's
output in the original model (before any activation):

    min ‖X W + b − Y‖² + λ‖W − W₀‖²,   X: rows of the layer's input in the pruned model, earlier refits applied
                                        Y: rows of the original layer's output, on the output channels kept
                                        W₀: the pruned layer's weights (the fit's anchor: a large λ keeps them)

λ is chosen per layer by cross-validation: the samples fall into folds, each λ of a grid is
fitted without each fold and scored on it, and the λ with the least held-out error is fitted on
every sample. A layer's new weights are kept only when that held-out error is below the pruned
weights' error. A layer with fewer than ROWS_PER_UNKNOWN rows per unknown (one row a sample
after global pooling) is not refit.

Memory holds each layer's normal equations per fold (XᵀX, XᵀY and ‖Y‖², float64) and one
sample's activations, never all of them; a Conv contributes im2col rows at
`positions_per_sample` random output positions per sample. Layers of which none feeds another
share one pass over the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from .calibration import CalibrationData
from .errors import UsageError
from .layers import BIAS_INPUT, output_axis
from .sessions import Runner, open_runner, with_outputs, with_weights_as_inputs

SUPPORTED_OPS = ("Conv", "Gemm", "MatMul")
REFIT, KEPT, SKIPPED = "refit", "kept", "skipped"
# Cross-validation folds: sample i is in fold i % FOLDS (fewer folds, of two samples or more,
# with fewer than 2·FOLDS samples; under four samples, one: the fit is judged on its own rows).
FOLDS = 4
# The ridge weights tried, as multiples of the mean squared input (trace(XᵀX) / columns of X).
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# A least-squares refit needs several sampled rows per unknown weight of a row.
ROWS_PER_UNKNOWN = 4
# A refit is kept when its held-out error is below this share of the pruned weights' error: a
# layer that lost nothing (float32 rounding error only) keeps its weights.
KEEP_BELOW = 0.99
PURPOSE = " for reconstruction"  # how an onnxruntime failure to load a model names this step

Progress = Callable[[str, int, int | None], None]


@dataclass
class LayerFit:
    """How one layer's reconstruction went.

    Errors are relative, ‖Y − Ŷ‖² / ‖Y‖², over the rows sampled for the layer: `error_before`
    with the pruned weights, `error_after` the refit's cross-validated error (each fold's rows
    predicted by the fit without them; with one sample, the error on its own rows). None for a
    skipped layer. `ridge` is the λ factor chosen.
    `status` is "refit" (new weights written), "kept" (the refit did not lower the error, the
    pruned weights stay) or "skipped" (`reason` says why).
    """

    name: str
    op: str
    status: str
    reason: str = ""
    error_before: float | None = None
    error_after: float | None = None
    rows: int = 0
    ridge: float | None = None


@dataclass(frozen=True)
class RefitOptions:
    """How `reconstruct` fits. The ridge weight is λ = ridge · trace(XᵀX) / (columns of X), with
    `ridge` the value cross-validation picks from the given ones (one value: that one); it pulls W
    towards the pruned weights, the bias is free. A Conv contributes im2col rows at
    `positions_per_sample` random output positions per sample, drawn with `seed`."""

    ridge: float | Sequence[float] = RIDGES
    positions_per_sample: int = 2048
    seed: int = 0

    def __post_init__(self):
        if not self.ridges or any(not (value > 0 and math.isfinite(value)) for value in self.ridges):
            raise UsageError(f"ridge={self.ridge}: give positive numbers (1e-3 is the usual choice)")
        if self.positions_per_sample < 1:
            raise UsageError(
                f"positions_per_sample={self.positions_per_sample}: give a positive number of rows per sample"
            )

    @property
    def ridges(self) -> tuple[float, ...]:
        return (self.ridge,) if isinstance(self.ridge, (int, float)) else tuple(self.ridge)


def reconstruct(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    layers: Sequence[str],
    data: CalibrationData,
    *,
    kept_outputs: dict[str, np.ndarray] | None = None,
    options: RefitOptions = RefitOptions(),
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, dict[str, LayerFit]]:
    """Refit the weights (and bias) of the named layers of `pruned` to reproduce `original`, as
    `options` say.

    `layers` names nodes present in both models with the same op: Conv (group 1), Gemm (transA 0)
    or MatMul with a constant 2-D weight, whose weight and bias are initializers read by that node
    alone (a MatMul's bias is the constant 1-D operand of an Add that is its only reader). Other
    layers are skipped with a reason. `kept_outputs` maps a layer whose own output channels were
    pruned to the original's output channels it still produces (an entry that does not fit the
    layer raises UsageError; layers without one keep all their outputs). Returns a new model (the
    inputs are left as they were) and each layer's LayerFit, in the order of `layers`.
    """
    ridges = options.ridges
    names = list(dict.fromkeys(layers))
    kept_outputs = kept_outputs or {}  # it may name other pruned layers too

    teacher_index, student_index = _ModelIndex(original), _ModelIndex(pruned)
    fits: dict[str, LayerFit] = {}
    found: list[_Layer] = []
    for name in names:
        try:
            found.append(_describe(teacher_index, student_index, name, kept_outputs.get(name)))
        except _Unsupported as unsupported:
            fits[name] = LayerFit(name, student_index.op_of(name), SKIPPED, str(unsupported))
    found.sort(key=lambda layer: layer.position)

    done, total = len(fits), len(names)
    if progress is not None:
        progress("reconstructing", done, total)
    weights = {
        tensor: onnx.numpy_helper.to_array(student_index.initializers[tensor])
        for layer in found
        for tensor in (layer.weight, layer.bias)
        if tensor is not None
    }
    if found:
        activations = [layer.activation for layer in found]
        student = open_runner(with_weights_as_inputs(pruned, weights, activations), "pruned model", PURPOSE)
        teacher = open_runner(with_outputs(original, [layer.target for layer in found]), "original model", PURPOSE)
        rng = np.random.default_rng(options.seed)
        for batch in _batches(pruned.graph, found):
            statistics = _gather(batch, data, student, teacher, weights, rng, options.positions_per_sample)
            for layer in batch:
                fits[layer.name] = _refit(layer, statistics[layer.name], weights, ridges)
                done += 1
                if progress is not None:
                    progress("reconstructing", done, total)

    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(pruned)
    initializers = {tensor.name: tensor for tensor in rebuilt.graph.initializer}
    for layer in found:
        if fits[layer.name].status == REFIT:
            for tensor in (layer.weight, layer.bias):
                if tensor is not None:
                    initializers[tensor].CopyFrom(onnx.numpy_helper.from_array(weights[tensor], tensor))
    return rebuilt, {name: fits[name] for name in names}


# ----------------------------------------------------------------------------- the layers


class _Unsupported(Exception):
    """Why a layer cannot be reconstructed; it becomes the reason of a skipped LayerFit."""


@dataclass
class _Layer:
    """A layer to refit: where its weights are in the pruned model and its teacher output in the original."""

    name: str
    op: str
    position: int  # the node's index in the pruned graph, a topological order
    activation: str  # X: the node's input in the pruned model
    target: str  # Y: the same layer's output in the original (its bias Add's output for a MatMul)
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    kept: np.ndarray
    output_major: bool  # the weight is stored [outputs, inputs, ...] (Conv, Gemm transB=1), not [inputs, outputs]
    alpha: float = 1.0  # Gemm: Y = alpha·A·B + beta·C
    beta: float = 1.0
    pads: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()

    def matrix(self, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """The weights as θ [inputs (+1 for the bias), outputs], float64, so that Ŷ = [X, 1] θ."""
        matrix = weight.reshape(weight.shape[0], -1).T if self.output_major else weight
        matrix = matrix.astype(np.float64) * self.alpha
        if self.bias is None:
            return matrix
        return np.vstack([matrix, bias.astype(np.float64)[None, :] * self.beta])

    def weights(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The float32 weight and bias initializers that compute θ (inverse of `matrix`)."""
        matrix = theta[: len(theta) - (self.bias is not None)] / self.alpha
        weight = (matrix.T if self.output_major else matrix).reshape(self.weight_shape).astype(np.float32)
        bias = None if self.bias is None else (theta[-1] / self.beta).astype(np.float32)
        return weight, bias


class _ModelIndex:
    """Lookups over one model's main graph: nodes by name, initializers, who reads each tensor."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        self.outputs = {value.name for value in model.graph.output}
        self.nodes: dict[str, list[int]] = {}
        self.readers: dict[str, list[int]] = {}
        for index, node in enumerate(model.graph.node):
            self.nodes.setdefault(node.name, []).append(index)
            for tensor in _reads(node):
                self.readers.setdefault(tensor, []).append(index)

    def op_of(self, name: str) -> str:
        indices = self.nodes.get(name, [])
        return self.graph.node[indices[0]].op_type if indices else ""

    def node(self, name: str, model: str) -> tuple[int, onnx.NodeProto]:
        indices = self.nodes.get(name, []) if name else []
        if len(indices) != 1:
            found = "no node" if not indices else f"{len(indices)} nodes"
            raise _Unsupported(f"the {model} model's main graph has {found} named '{name}'")
        return indices[0], self.graph.node[indices[0]]

    def constant(self, tensor: str, what: str, model: str) -> onnx.TensorProto:
        if tensor not in self.initializers:
            raise _Unsupported(f"its {what} '{tensor}' is not an initializer in the {model} model")
        return self.initializers[tensor]

    def read_only_by(self, tensor: str, index: int) -> bool:
        return self.readers.get(tensor) == [index] and tensor not in self.outputs


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads, including those its If/Loop/Scan bodies read from the outer scope."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
            for inner in body.node:
                names |= _reads(inner)
    return names


def _settings(node: onnx.NodeProto, spatial: int) -> dict:
    """The attributes that decide what the layer computes, defaults filled in: a model that
    leaves out a default attribute computes the same as one that states it."""
    given = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    if node.op_type == "Conv":
        auto_pad = given.get("auto_pad", b"NOTSET").decode()
        pads = list(given.get("pads", [0] * 2 * spatial))
        if auto_pad == "VALID":
            auto_pad, pads = "NOTSET", [0] * 2 * spatial
        return {
            "group": given.get("group", 1),
            "auto_pad": auto_pad,
            "pads": pads,
            "strides": list(given.get("strides", [1] * spatial)),
            "dilations": list(given.get("dilations", [1] * spatial)),
        }
    if node.op_type == "Gemm":
        defaults = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
        return {key: given.get(key, default) for key, default in defaults.items()}
    return {}


def _describe(teacher: _ModelIndex, student: _ModelIndex, name: str, kept: np.ndarray | None) -> _Layer:
    """The layer `name`, checked; raises _Unsupported with the reason it cannot be refit."""
    position, node = student.node(name, "pruned")
    _, teacher_node = teacher.node(name, "original")
    if node.op_type != teacher_node.op_type:
        raise _Unsupported(f"it is a {node.op_type} in the pruned model but a {teacher_node.op_type} in the original")
    if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
        raise _Unsupported(f"{node.op_type} is not supported (Conv, Gemm and MatMul are)")
    if len(node.input) < 2 or len(teacher_node.input) < 2:
        raise _Unsupported("it has no weight input")
    weight = student.constant(node.input[1], "weight", "pruned")
    original_weight = teacher.constant(teacher_node.input[1], "weight", "original")
    if len(original_weight.dims) != len(weight.dims) or (
        node.op_type == "Conv" and list(original_weight.dims[2:]) != list(weight.dims[2:])
    ):
        raise _Unsupported(f"its weight {list(weight.dims)} does not match the original's {list(original_weight.dims)}")
    settings = _settings(node, len(weight.dims) - 2)
    if settings != _settings(teacher_node, len(weight.dims) - 2):
        raise _Unsupported("its attributes differ from the original's")
    layer = _Layer(
        name=name,
        op=node.op_type,
        position=position,
        activation=node.input[0],
        target=teacher_node.output[0],
        weight=weight.name,
        bias=None,
        weight_shape=tuple(weight.dims),
        kept=np.zeros(0, np.int64),
        output_major=output_axis(node, len(weight.dims)) == 0,
    )
    if node.op_type == "Conv":
        _describe_conv(layer, settings)
    elif node.op_type == "Gemm":
        _describe_gemm(layer, settings)
    else:
        _describe_matmul(layer, student, teacher, teacher_node)
    axis = output_axis(node, len(weight.dims))
    if layer.op != "MatMul" and len(node.input) > BIAS_INPUT and node.input[BIAS_INPUT] and layer.beta != 0:
        # A Gemm with beta = 0 adds nothing of C: it has no bias to refit.
        layer.bias = student.constant(node.input[BIAS_INPUT], "bias", "pruned").name
        outputs = layer.weight_shape[axis]
        if list(student.initializers[layer.bias].dims) != [outputs]:
            shape = list(student.initializers[layer.bias].dims)
            raise _Unsupported(f"its bias has shape {shape}; only a 1-D bias of {outputs} values is supported")
        if not student.read_only_by(layer.bias, position):
            raise _Unsupported(f"its bias '{layer.bias}' is shared with other nodes or is a graph output")

    for tensor, what in ((layer.weight, "weight"), (layer.bias, "bias")):
        if tensor is not None and student.initializers[tensor].data_type != onnx.TensorProto.FLOAT:
            raise _Unsupported(f"its {what} '{tensor}' is not float32")
    if not student.read_only_by(layer.weight, position):
        raise _Unsupported(f"its weight '{layer.weight}' is shared with other nodes or is a graph output")

    layer.kept = _kept_channels(name, kept, weight.dims[axis], original_weight.dims[axis])
    return layer


def _describe_conv(layer: _Layer, settings: dict) -> None:
    if settings["group"] != 1:
        raise _Unsupported(f"grouped Conv (group={settings['group']}) is not supported")
    if settings["auto_pad"] != "NOTSET":
        raise _Unsupported(f"Conv with auto_pad={settings['auto_pad']} is not supported (explicit pads are)")
    if len(layer.weight_shape) < 3:
        raise _Unsupported(f"its weight has rank {len(layer.weight_shape)}, a Conv weight has at least 3")
    layer.pads, layer.strides, layer.dilations = (tuple(settings[key]) for key in ("pads", "strides", "dilations"))


def _describe_gemm(layer: _Layer, settings: dict) -> None:
    if settings["transA"]:
        raise _Unsupported("Gemm with transA=1 is not supported")
    if len(layer.weight_shape) != 2:
        raise _Unsupported(f"its weight has shape {list(layer.weight_shape)}, not 2-D")
    layer.alpha, layer.beta = float(settings["alpha"]), float(settings["beta"])
    if layer.alpha == 0:
        raise _Unsupported("Gemm with alpha=0 ignores its weight")


def _describe_matmul(layer: _Layer, student: _ModelIndex, teacher: _ModelIndex, teacher_node: onnx.NodeProto) -> None:
    if len(layer.weight_shape) != 2:
        raise _Unsupported(f"its weight has shape {list(layer.weight_shape)}, not 2-D")
    add = _bias_add(student, student.graph.node[layer.position], layer.weight_shape[1])
    if add is not None:
        layer.bias = _other_input(add, student.graph.node[layer.position].output[0])
    # The teacher's output includes its bias, whether or not the pruned layer still has one to fit.
    teacher_add = _bias_add(teacher, teacher_node, None)
    if teacher_add is not None:
        layer.target = teacher_add.output[0]


def _bias_add(index: _ModelIndex, matmul: onnx.NodeProto, outputs: int | None) -> onnx.NodeProto | None:
    """The Add that adds a constant 1-D bias (of `outputs` values, if given) to the MatMul's
    output and is its only reader, or None."""
    readers = index.readers.get(matmul.output[0], [])
    if len(readers) != 1 or matmul.output[0] in index.outputs:
        return None
    add = index.graph.node[readers[0]]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    bias = index.initializers.get(_other_input(add, matmul.output[0]))
    if bias is None or len(bias.dims) != 1 or (outputs is not None and bias.dims[0] != outputs):
        return None
    if not index.read_only_by(bias.name, readers[0]):
        return None  # a shared bias cannot change for this layer alone
    return add


def _other_input(add: onnx.NodeProto, tensor: str) -> str:
    return add.input[1] if add.input[0] == tensor else add.input[0]


def _kept_channels(name: str, kept: np.ndarray | None, outputs: int, original_outputs: int) -> np.ndarray:
    if kept is None:
        if outputs != original_outputs:
            raise _Unsupported(
                f"it has {outputs} output channels, the original {original_outputs}: "
                "say which it kept with kept_outputs"
            )
        return np.arange(outputs)
    kept = np.asarray(kept)
    if (
        kept.ndim != 1
        or kept.dtype.kind not in "iu"
        or len(kept) != outputs
        or len(np.unique(kept)) != len(kept)
        or (len(kept) and (kept.min() < 0 or kept.max() >= original_outputs))
    ):
        raise UsageError(
            f"kept_outputs['{name}'] should hold {outputs} distinct channel indices below {original_outputs} "
            f"(the pruned layer's outputs, as channels of the original); it is {kept.tolist()}"
        )
    return kept.astype(np.int64)


# ----------------------------------------------------------------------------- capture


def _batches(graph: onnx.GraphProto, layers: list[_Layer]) -> Iterator[list[_Layer]]:
    """Groups of layers, in topological order, whose inputs no refit of their own group changes.

    A layer joins the current group unless a layer before it (in the group or left for a later
    one) is its ancestor: that layer's refit must be applied before this one's input is captured.
    """
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for tensor in _reads(node):
            readers.setdefault(tensor, []).append(index)
    downstream = {layer.position: _descendants(graph, readers, layer.position) for layer in layers}
    remaining = layers
    while remaining:
        batch, later, blocked = [], [], set()
        for layer in remaining:
            (later if layer.position in blocked else batch).append(layer)
            blocked |= downstream[layer.position]
        yield batch
        remaining = later


def _descendants(graph: onnx.GraphProto, readers: dict[str, list[int]], start: int) -> set[int]:
    seen: set[int] = set()
    frontier = [start]
    while frontier:
        node = graph.node[frontier.pop()]
        for tensor in node.output:
            for reader in readers.get(tensor, []):
                if reader not in seen:
                    seen.add(reader)
                    frontier.append(reader)
    return seen


def _gather(
    batch: list[_Layer],
    data: CalibrationData,
    student: Runner,
    teacher: Runner,
    weights: dict[str, np.ndarray],
    rng: np.random.Generator,
    positions_per_sample: int,
) -> dict[str, _Folds]:
    """One pass over the data: each layer's normal equations per fold, from its pruned input and original output."""
    folds = min(FOLDS, len(data) // 2) if len(data) >= 4 else 1
    statistics = {layer.name: _Folds(layer, folds) for layer in batch}
    for index, feed in enumerate(data):
        inputs = student.fetch([layer.activation for layer in batch], {**feed, **weights})
        targets = teacher.fetch([layer.target for layer in batch], feed)
        for layer in batch:
            activation, target = inputs[layer.activation], targets[layer.target]
            rows = _sampled_rows(layer, activation, target, positions_per_sample, rng)
            statistics[layer.name].add(index % folds, *rows)
        del inputs, targets  # this sample's activations go before the next sample runs
    return statistics


def _sampled_rows(
    layer: _Layer, inputs: np.ndarray, outputs: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(X rows, Y rows) of one sample at up to `count` random output positions: row i of X times
    the layer's weight matrix gives row i of Y (on the kept output channels)."""
    if layer.op == "Conv":
        positions = _choose(rng, (outputs.shape[0], *outputs.shape[2:]), count)
        batch, *spatial = positions
        rows = im2col_rows(inputs, layer.weight_shape[2:], layer.pads, layer.strides, layer.dilations, positions)
        # The slice splits the advanced indices, so numpy puts their common axis first: [positions, channels].
        target_rows = outputs[(batch, slice(None), *spatial)]
    else:
        rows = inputs.reshape(-1, inputs.shape[-1])
        target_rows = outputs.reshape(-1, outputs.shape[-1])
        (chosen,) = _choose(rng, (len(rows),), count)
        rows, target_rows = rows[chosen], target_rows[chosen]
    target_rows = target_rows[:, layer.kept]
    # A row holding an activation the model overflowed (an infinity, a NaN) would make the whole
    # fit NaN: it is left out.
    finite = np.isfinite(rows).all(axis=1) & np.isfinite(target_rows).all(axis=1)
    if not finite.all():
        rows, target_rows = rows[finite], target_rows[finite]
    return rows, target_rows


def _choose(rng: np.random.Generator, shape: tuple[int, ...], count: int) -> tuple[np.ndarray, ...]:
    """`count` distinct random indices into an array of `shape` (all of them if fewer), in order."""
    total = math.prod(shape)
    chosen = np.arange(total) if total <= count else np.sort(rng.choice(total, size=count, replace=False))
    return np.unravel_index(chosen, shape)


def im2col_rows(
    inputs: np.ndarray,
    kernel_shape: Sequence[int],
    pads: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    positions: tuple[np.ndarray, ...],
) -> np.ndarray:
    """The receptive fields of a group-1 Conv at the given output positions, one row each.

    `inputs` is [N, C, *spatial]; `positions` holds index arrays (batch, out_1, ..., out_d), and
    `pads` is ONNX's [begin_1, ..., begin_d, end_1, ..., end_d]. A row is laid out [C, k_1, ...,
    k_d] like a weight row, so rows @ W.reshape(C_out, -1).T + b is the Conv's output there.
    """
    spatial = inputs.ndim - 2
    padded = np.pad(inputs, [(0, 0), (0, 0)] + [(pads[axis], pads[axis + spatial]) for axis in range(spatial)])
    batch, *outputs = positions
    count, channels = len(batch), inputs.shape[1]
    index = [batch.reshape(count, *[1] * (spatial + 1)), np.arange(channels).reshape(1, channels, *[1] * spatial)]
    for axis in range(spatial):
        # Output o reads input o·stride + k·dilation (in padded coordinates) for kernel tap k.
        taps = outputs[axis][:, None] * strides[axis] + np.arange(kernel_shape[axis])[None, :] * dilations[axis]
        shape = [count] + [1] * (spatial + 1)
        shape[2 + axis] = kernel_shape[axis]
        index.append(taps.reshape(shape))
    return padded[tuple(index)].reshape(count, -1)


# ----------------------------------------------------------------------------- the fit


class _NormalEquations:
    """ZᵀZ, ZᵀY and ‖Y‖² summed over sampled rows, Z = [X, 1] (the ones only for a layer with a
    bias), in float64: all the least-squares fit and its error need."""

    def __init__(self, intercept: bool):
        self.intercept = intercept
        self.gram: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.energy = 0.0
        self.rows = 0

    def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        if not len(inputs):
            return
        design = inputs.astype(np.float64)
        if self.intercept:
            design = np.hstack([design, np.ones((len(design), 1))])
        targets = targets.astype(np.float64)
        if self.gram is None:
            self.gram = np.zeros((design.shape[1], design.shape[1]))
            self.cross = np.zeros((design.shape[1], targets.shape[1]))
        self.gram += design.T @ design
        self.cross += design.T @ targets
        self.energy += float(np.sum(targets * targets))
        self.rows += len(design)

    def without(self, part: _NormalEquations) -> _NormalEquations:
        """These sums less those of `part` (rows that were added to these too)."""
        rest = _NormalEquations(self.intercept)
        rest.gram, rest.cross = self.gram - part.gram, self.cross - part.cross
        rest.energy, rest.rows = self.energy - part.energy, self.rows - part.rows
        return rest

    def residual(self, theta: np.ndarray) -> float:
        """‖Y − Zθ‖² = ‖Y‖² − 2 tr(θᵀZᵀY) + tr(θᵀZᵀZθ)."""
        return max(float(self.energy - 2 * np.sum(theta * self.cross) + np.sum(theta * (self.gram @ theta))), 0.0)

    def solve(self, ridge: float, anchor: np.ndarray) -> np.ndarray:
        """argmin ‖Y − Zθ‖² + λ‖W − W₀‖², λ = ridge · trace(XᵀX) / columns of X, W₀ the anchor's
        weight rows; the bias row is free."""
        columns = len(self.gram) - self.intercept
        penalty = np.ones(len(self.gram))
        if self.intercept:
            penalty[-1] = 0.0
        strength = ridge * max(np.trace(self.gram[:columns, :columns]) / columns, np.finfo(float).tiny)
        lhs, rhs = self.gram + strength * np.diag(penalty), self.cross + strength * penalty[:, None] * anchor
        try:
            return np.linalg.solve(lhs, rhs)
        except np.linalg.LinAlgError:  # singular: a layer whose sampled rows are all zero
            return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


class _Folds:
    """A layer's normal equations, one set per cross-validation fold."""

    def __init__(self, layer: _Layer, folds: int):
        self.folds = [_NormalEquations(layer.bias is not None) for _ in range(folds)]

    def add(self, fold: int, inputs: np.ndarray, targets: np.ndarray) -> None:
        self.folds[fold].add(inputs, targets)

    def total(self) -> _NormalEquations:
        total = _NormalEquations(self.folds[0].intercept)
        used = [fold for fold in self.folds if fold.rows]
        if used:
            total.gram, total.cross = sum(fold.gram for fold in used), sum(fold.cross for fold in used)
            total.energy, total.rows = sum(fold.energy for fold in used), sum(fold.rows for fold in used)
        return total

    def held_out_errors(self, ridges: Sequence[float], anchor: np.ndarray, total: _NormalEquations) -> list[float]:
        """For each ridge: each fold's residual under the fit without it, summed, over ‖Y‖² (one
        fold: in-sample)."""
        used = [fold for fold in self.folds if fold.rows]
        if len(used) < 2:
            return [total.residual(total.solve(ridge, anchor)) / total.energy for ridge in ridges]
        rests = [(fold, total.without(fold)) for fold in used]
        return [sum(fold.residual(rest.solve(ridge, anchor)) for fold, rest in rests) / total.energy for ridge in ridges]


def _refit(layer: _Layer, statistics: _Folds, weights: dict[str, np.ndarray], ridges: Sequence[float]) -> LayerFit:
    """Fit the layer with the cross-validated ridge; its new weights replace those in `weights`
    only if their held-out error is below the pruned weights' error."""
    total = statistics.total()
    if total.rows == 0:
        return LayerFit(layer.name, layer.op, SKIPPED, "no calibration rows: the data is empty")
    if total.energy == 0:
        reason = "the original output is zero on every sampled row"
        return LayerFit(layer.name, layer.op, SKIPPED, reason, rows=total.rows)
    unknowns = total.gram.shape[0]
    if total.rows < ROWS_PER_UNKNOWN * unknowns:
        # A layer after global pooling sees one row per sample. Fitted to a few images, such
        # layers miss everything else, and cross-validation over those images does not see it:
        # refitting them raised the calibration images' SQNR and lowered the held-out one.
        reason = f"{total.rows} calibration rows for {unknowns} unknowns: too few to fit without overfitting"
        return LayerFit(layer.name, layer.op, SKIPPED, reason, rows=total.rows)
    if not (math.isfinite(total.energy) and np.isfinite(total.gram).all() and np.isfinite(total.cross).all()):
        reason = "the layer's activations are too large for float64 sums"
        return LayerFit(layer.name, layer.op, SKIPPED, reason, rows=total.rows)
    bias = weights[layer.bias] if layer.bias is not None else None
    anchor = layer.matrix(weights[layer.weight], bias)
    before = total.residual(anchor) / total.energy
    errors = statistics.held_out_errors(ridges, anchor, total)
    # A NaN error (a solve that failed) ranks last, never first: min() would keep it if it came first.
    after, ridge = min(zip((error if math.isfinite(error) else math.inf for error in errors), ridges))
    if not after < KEEP_BELOW * before:
        reason = f"the refit did not lower the error on held-out samples ({before:.4g} -> {after:.4g} at best)"
        return LayerFit(layer.name, layer.op, KEPT, reason, before, after, total.rows, ridge)
    with np.errstate(over="ignore", invalid="ignore"):
        new_weight, new_bias = layer.weights(total.solve(ridge, anchor))
    if not np.isfinite(new_weight).all() or (new_bias is not None and not np.isfinite(new_bias).all()):
        reason = "the refit's weights are not finite in float32"
        return LayerFit(layer.name, layer.op, KEPT, reason, before, after, total.rows, ridge)
    if not total.residual(layer.matrix(new_weight, new_bias)) < total.residual(anchor):
        # The float32 weights that would be written do no better (a layer that lost nothing).
        reason = "the refit did not lower the error once rounded to float32"
        return LayerFit(layer.name, layer.op, KEPT, reason, before, after, total.rows, ridge)
    weights[layer.weight] = new_weight
    if layer.bias is not None:
        weights[layer.bias] = new_bias
    return LayerFit(layer.name, layer.op, REFIT, "", before, after, total.rows, ridge)
