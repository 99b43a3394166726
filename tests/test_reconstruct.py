"""Layer-wise least-squares reconstruction after channel pruning (onnxslim.reconstruct)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from builder import ModelBuilder, random

from onnxslim.calibration import CalibrationData
from onnxslim.errors import UsageError
from onnxslim.reconstruct import RIDGES, RefitOptions, im2col_rows, reconstruct
from onnxslim.verify import Runner, model_inputs

KEPT_HIDDEN = np.array([0, 2, 3, 5, 6])  # conv1 / the first layer keeps 5 of its 8 outputs
KEPT_OUTPUTS = np.array([0, 2, 4, 5])  # the second layer keeps 4 of its 6 outputs, where it loses some


def weight(shape, seed: int) -> np.ndarray:
    return (random(shape, seed) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def conv_model(w1, b1, w2, b2, *, conv2: dict | None = None) -> onnx.ModelProto:
    """x [2, 3, 8, 8] -> conv1 (3x3, pad 1) -> Relu -> conv2 (3x3, pad 1 unless `conv2` says otherwise) -> y."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 8, 8])
    hidden = b.node("Conv", [x, b.initializer("w1", w1), b.initializer("b1", b1)], name="conv1", pads=[1, 1, 1, 1])
    relu = b.node("Relu", [hidden])
    attributes = conv2 or {"pads": [1, 1, 1, 1]}
    inputs = [relu, b.initializer("w2", w2), b.initializer("b2", b2)]
    b.output(b.node("Conv", inputs, ["y"], name="conv2", **attributes))
    return b.build()


def conv_weights() -> list[np.ndarray]:
    return [weight([8, 3, 3, 3], 1), random([8], 2) * 0.5, weight([6, 8, 3, 3], 3), random([6], 4) * 0.1]


def pruned_conv(w1, b1, w2, b2, kept_outputs=None) -> onnx.ModelProto:
    """conv1 loses 3 output channels, so conv2 loses the matching inputs (and its own outputs if asked)."""
    rows = slice(None) if kept_outputs is None else kept_outputs
    return conv_model(w1[KEPT_HIDDEN], b1[KEPT_HIDDEN], w2[rows][:, KEPT_HIDDEN], b2[rows])


def feeds(model: onnx.ModelProto, count: int, first_seed: int) -> list[dict[str, np.ndarray]]:
    shapes = {value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim] for value in model_inputs(model)}
    return [{name: random(shape, first_seed + index) for name, shape in shapes.items()} for index in range(count)]


def calibration(model: onnx.ModelProto, count: int = 8) -> CalibrationData:
    return CalibrationData.from_feeds(model, feeds(model, count, first_seed=10))


def output_error(original: onnx.ModelProto, candidate: onnx.ModelProto, kept: np.ndarray | None = None) -> float:
    """‖y − ŷ‖² / ‖y‖² of the first output on held-out inputs (channels `kept` of the original's)."""
    reference, tested = Runner(original), Runner(candidate)
    residual = energy = 0.0
    for feed in feeds(original, 4, first_seed=100):
        expected = next(iter(reference.run(feed).values()))
        if kept is not None:
            expected = np.take(expected, kept, axis=1 if expected.ndim == 4 else -1)
        residual += float(np.sum((next(iter(tested.run(feed).values())) - expected) ** 2))
        energy += float(np.sum(expected**2))
    return residual / energy


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(tensor for tensor in model.graph.initializer if tensor.name == name))


# ----------------------------------------------------------------------------- im2col


@pytest.mark.parametrize(
    "shape, kernel, attributes",
    [
        ([2, 3, 9, 10], [4, 3, 3, 2], {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}),
        ([2, 3, 7, 7], [5, 3, 1, 1], {"strides": [2, 2]}),
        ([3, 2, 17], [4, 2, 3], {"pads": [2, 1], "strides": [3], "dilations": [2]}),
    ],
)
def test_im2col_rows_times_the_weight_give_the_conv_output(shape, kernel, attributes):
    b = ModelBuilder()
    w, bias = weight(kernel, 1), random([kernel[0]], 2)
    x = b.input("x", shape)
    b.output(b.node("Conv", [x, b.initializer("w", w), b.initializer("b", bias)], ["y"], **attributes))
    inputs = random(shape, 3)
    outputs = Runner(b.build()).run({"x": inputs})["y"]
    spatial = len(shape) - 2
    rng = np.random.default_rng(0)
    positions = tuple(rng.integers(0, size, 25) for size in (outputs.shape[0], *outputs.shape[2:]))

    rows = im2col_rows(
        inputs,
        kernel[2:],
        attributes.get("pads", [0] * 2 * spatial),
        attributes.get("strides", [1] * spatial),
        attributes.get("dilations", [1] * spatial),
        positions,
    )

    batch, *where = positions
    expected = np.stack([outputs[(index, slice(None), *point)] for index, *point in zip(batch, *where)])
    np.testing.assert_allclose(rows @ w.reshape(kernel[0], -1).T + bias, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- one layer


def test_conv_after_pruned_conv_is_refit_and_the_output_gets_closer():
    original = conv_model(*conv_weights())
    pruned = pruned_conv(*conv_weights())

    rebuilt, fits = reconstruct(original, pruned, ["conv2"], calibration(original))

    fit = fits["conv2"]
    assert (fit.status, fit.op, fit.rows) == ("refit", "Conv", 8 * 2 * 8 * 8)
    assert fit.error_after < 0.5 * fit.error_before
    assert output_error(original, rebuilt) < 0.5 * output_error(original, pruned)
    assert initializer(rebuilt, "w2").shape == (6, 5, 3, 3) and initializer(rebuilt, "w2").dtype == np.float32
    onnx.checker.check_model(rebuilt)


def test_conv_samples_positions_per_sample_rows():
    original = conv_model(*conv_weights())
    pruned = pruned_conv(*conv_weights())
    _, fits = reconstruct(original, pruned, ["conv2"], calibration(original), options=RefitOptions(positions_per_sample=40))
    assert fits["conv2"].rows == 8 * 40 and fits["conv2"].status == "refit"


def test_conv_that_lost_output_channels_too_is_compared_on_the_kept_ones():
    original = conv_model(*conv_weights())
    pruned = pruned_conv(*conv_weights(), kept_outputs=KEPT_OUTPUTS)

    rebuilt, fits = reconstruct(
        original, pruned, ["conv2"], calibration(original), kept_outputs={"conv2": KEPT_OUTPUTS}
    )

    assert fits["conv2"].status == "refit" and fits["conv2"].error_after < 0.5 * fits["conv2"].error_before
    assert output_error(original, rebuilt, KEPT_OUTPUTS) < 0.5 * output_error(original, pruned, KEPT_OUTPUTS)


def test_a_layer_that_lost_outputs_needs_kept_outputs():
    original = conv_model(*conv_weights())
    pruned = pruned_conv(*conv_weights(), kept_outputs=KEPT_OUTPUTS)
    _, fits = reconstruct(original, pruned, ["conv2"], calibration(original))
    assert fits["conv2"].status == "skipped" and "kept_outputs" in fits["conv2"].reason
    with pytest.raises(UsageError, match="kept_outputs"):
        reconstruct(original, pruned, ["conv2"], calibration(original), kept_outputs={"conv2": np.array([0, 1, 9, 2])})


def gemm_model(w1, c1, w2, c2, trans_b: int, **gemm2) -> onnx.ModelProto:
    """x [32, 6] -> gemm1 -> Relu -> gemm2 -> y; weights stored [out, in] for transB=1, else [in, out]."""
    b = ModelBuilder()
    x = b.input("x", [32, 6])
    hidden = b.node("Gemm", [x, b.initializer("w1", w1), b.initializer("c1", c1)], name="gemm1", transB=trans_b)
    relu = b.node("Relu", [hidden])
    inputs = [relu, b.initializer("w2", w2), b.initializer("c2", c2)]
    b.output(b.node("Gemm", inputs, ["y"], name="gemm2", transB=trans_b, **gemm2))
    return b.build()


@pytest.mark.parametrize("trans_b, gemm2", [(1, {}), (0, {"alpha": 0.5, "beta": 2.0})])
def test_gemm_after_pruned_gemm(trans_b, gemm2):
    w1, c1, w2, c2 = weight([10, 6], 1), random([10], 2) * 0.5, weight([5, 10], 3), random([5], 4) * 0.1
    kept = np.array([0, 1, 3, 4, 6, 8, 9])
    pruned_w1, pruned_w2 = w1[kept], w2[:, kept]
    if not trans_b:
        w1, w2, pruned_w1, pruned_w2 = w1.T, w2.T, pruned_w1.T, pruned_w2.T
    original = gemm_model(w1, c1, w2, c2, trans_b, **gemm2)
    pruned = gemm_model(pruned_w1, c1[kept], pruned_w2, c2, trans_b, **gemm2)

    rebuilt, fits = reconstruct(original, pruned, ["gemm2"], calibration(original))

    assert fits["gemm2"].status == "refit" and fits["gemm2"].error_after < 0.5 * fits["gemm2"].error_before
    assert output_error(original, rebuilt) < 0.5 * output_error(original, pruned)


def matmul_model(w1, b1, w2, b2) -> onnx.ModelProto:
    """x [2, 16, 6] -> mm1 + b1 -> Relu -> mm2 + b2 -> y (3-D activations: every leading position is a row)."""
    b = ModelBuilder()
    x = b.input("x", [2, 16, 6])
    hidden = b.node("Add", [b.node("MatMul", [x, b.initializer("w1", w1)], name="mm1"), b.initializer("b1", b1)])
    relu = b.node("Relu", [hidden])
    product = b.node("MatMul", [relu, b.initializer("w2", w2)], name="mm2")
    b.output(b.node("Add", [product, b.initializer("b2", b2)], ["y"]))
    return b.build()


def test_matmul_with_a_bias_add_after_pruned_matmul():
    w1, b1, w2, b2 = weight([10, 6], 1).T, random([10], 2) * 0.5, weight([5, 10], 3).T, random([5], 4) * 0.1
    kept = np.array([0, 1, 3, 4, 6, 8, 9])
    original = matmul_model(w1, b1, w2, b2)
    pruned = matmul_model(w1[:, kept], b1[kept], w2[kept], b2)

    rebuilt, fits = reconstruct(original, pruned, ["mm2"], calibration(original))

    assert fits["mm2"].status == "refit" and fits["mm2"].rows == 8 * 2 * 16
    assert fits["mm2"].error_after < 0.5 * fits["mm2"].error_before
    assert output_error(original, rebuilt) < 0.5 * output_error(original, pruned)
    assert not np.array_equal(initializer(rebuilt, "b2"), b2)  # the bias is refit with the weight


# ----------------------------------------------------------------------------- when not to refit


def test_nothing_pruned_keeps_the_weights():
    original = conv_model(*conv_weights())

    rebuilt, fits = reconstruct(original, original, ["conv1", "conv2"], calibration(original))

    for fit in fits.values():  # conv1 reads the graph input: it comes from the feed
        assert fit.error_before < 1e-10 and fit.rows == 1024
        assert fit.status == "kept" or fit.error_after <= fit.error_before
    assert rebuilt.SerializeToString() == original.SerializeToString()


def test_unsupported_layers_are_skipped_with_a_reason_and_the_inputs_stay():
    w1, b1, _, b2 = conv_weights()
    original = conv_model(w1, b1, weight([6, 4, 3, 3], 3), b2, conv2={"pads": [1, 1, 1, 1], "group": 2})
    pruned = conv_model(w1, b1, weight([6, 4, 3, 3], 3), b2, conv2={"pads": [1, 1, 1, 1], "group": 2})
    before = (original.SerializeToString(), pruned.SerializeToString())

    relu = pruned.graph.node[1].name
    rebuilt, fits = reconstruct(original, pruned, ["conv2", "missing", relu], calibration(original))

    assert [fit.status for fit in fits.values()] == ["skipped"] * 3
    assert "group=2" in fits["conv2"].reason
    assert "no node named 'missing'" in fits["missing"].reason
    assert "Relu is not supported" in fits[relu].reason
    assert (original.SerializeToString(), pruned.SerializeToString()) == before
    assert rebuilt.SerializeToString() == pruned.SerializeToString() and rebuilt is not pruned


def test_a_refit_leaves_the_inputs_as_they_were():
    original, pruned = conv_model(*conv_weights()), pruned_conv(*conv_weights())
    before = (original.SerializeToString(), pruned.SerializeToString())
    reconstruct(original, pruned, ["conv2"], calibration(original))
    assert (original.SerializeToString(), pruned.SerializeToString()) == before


# ----------------------------------------------------------------------------- several layers


def chain_model(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x [2, 3, 8, 8] -> conv1 -> Relu -> conv2 -> Relu -> conv3 -> y, all 3x3 with pad 1."""
    b = ModelBuilder()
    current = b.input("x", [2, 3, 8, 8])
    for index in range(3):
        w, bias = weights[2 * index : 2 * index + 2]
        inputs = [current, b.initializer(f"w{index + 1}", w), b.initializer(f"b{index + 1}", bias)]
        current = b.node("Conv", inputs, ["y"] if index == 2 else 1, name=f"conv{index + 1}", pads=[1, 1, 1, 1])
        if index < 2:
            current = b.node("Relu", [current])
    b.output(current)
    return b.build()


def chain_weights() -> list[np.ndarray]:
    return [
        weight([8, 3, 3, 3], 1), random([8], 2) * 0.5,
        weight([8, 8, 3, 3], 3), random([8], 4) * 0.5,
        weight([4, 8, 3, 3], 5), random([4], 6) * 0.1,
    ]  # fmt: skip


def pruned_chain() -> onnx.ModelProto:
    w1, b1, w2, b2, w3, b3 = chain_weights()
    return chain_model([w1[KEPT_HIDDEN], b1[KEPT_HIDDEN], w2[:, KEPT_HIDDEN], b2, w3, b3])


class CountedPasses(CalibrationData):
    """Calibration data that counts the passes made over it."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def counted(data: CalibrationData) -> CountedPasses:
    return CountedPasses(data._samples, source=data.source)


def test_a_layer_is_fitted_on_the_activations_of_the_layers_refit_before_it():
    original, pruned = chain_model(chain_weights()), pruned_chain()
    data = counted(calibration(original))
    calls = []

    rebuilt, fits = reconstruct(
        original, pruned, ["conv2", "conv3"], data, progress=lambda *call: calls.append(call)
    )

    assert [fit.status for fit in fits.values()] == ["refit", "refit"]
    assert data.passes == 2  # conv3 reads conv2: its input is captured after conv2's refit
    assert calls == [("reconstructing", 0, 2), ("reconstructing", 1, 2), ("reconstructing", 2, 2)]
    # Every position is sampled (128 < positions_per_sample), so refitting conv3 of the model with
    # conv2 already refit gives exactly the joint run's conv3; refitting it on the pruned model does not.
    first, _ = reconstruct(original, pruned, ["conv2"], calibration(original))
    stepwise, step_fits = reconstruct(original, first, ["conv3"], calibration(original))
    _, alone = reconstruct(original, pruned, ["conv3"], calibration(original))
    assert step_fits["conv3"].error_before == pytest.approx(fits["conv3"].error_before, rel=1e-6)
    np.testing.assert_allclose(initializer(rebuilt, "w3"), initializer(stepwise, "w3"), rtol=1e-4, atol=1e-6)
    assert fits["conv3"].error_before < 0.5 * alone["conv3"].error_before
    assert output_error(original, rebuilt) < output_error(original, first) < output_error(original, pruned)


def branches_model(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x -> conv1 -> Relu -> (conv_a -> ya, conv_b -> yb)."""
    w1, b1, wa, ba, wb, bb = weights
    b = ModelBuilder()
    x = b.input("x", [2, 3, 8, 8])
    relu = b.node("Relu", [b.node("Conv", [x, b.initializer("w1", w1), b.initializer("b1", b1)], name="conv1")])
    b.output(b.node("Conv", [relu, b.initializer("wa", wa), b.initializer("ba", ba)], ["ya"], name="conv_a"))
    b.output(b.node("Conv", [relu, b.initializer("wb", wb), b.initializer("bb", bb)], ["yb"], name="conv_b"))
    return b.build()


def test_independent_layers_share_one_pass_over_the_data():
    weights = [
        weight([8, 3, 3, 3], 1), random([8], 2) * 0.5,
        weight([4, 8, 1, 1], 3), random([4], 4),
        weight([3, 8, 3, 3], 5), random([3], 6),
    ]  # fmt: skip
    w1, b1, wa, ba, wb, bb = weights
    original = branches_model(weights)
    pruned = branches_model([w1[KEPT_HIDDEN], b1[KEPT_HIDDEN], wa[:, KEPT_HIDDEN], ba, wb[:, KEPT_HIDDEN], bb])
    data = counted(calibration(original))

    _, fits = reconstruct(original, pruned, ["conv_b", "conv_a"], data)

    assert data.passes == 1
    assert list(fits) == ["conv_b", "conv_a"]
    assert all(fit.status == "refit" and fit.error_after < fit.error_before for fit in fits.values())  # judged on held-out rows
    _, alone = reconstruct(original, pruned, ["conv_a"], calibration(original))
    assert alone["conv_a"].error_after == pytest.approx(fits["conv_a"].error_after, rel=1e-6)


# ----------------------------------------------------------------------------- the ridge, by cross-validation


def pooled_model(w1, c1, w2, c2, rows: int) -> onnx.ModelProto:
    """x [rows, 24] (one row a sample, as after global pooling) -> gemm1 -> Relu -> gemm2 -> y."""
    b = ModelBuilder()
    x = b.input("x", [rows, 24])
    hidden = b.node("Gemm", [x, b.initializer("w1", w1), b.initializer("c1", c1)], name="gemm1", transB=1)
    inputs = [b.node("Relu", [hidden]), b.initializer("w2", w2), b.initializer("c2", c2)]
    b.output(b.node("Gemm", inputs, ["y"], name="gemm2", transB=1))
    return b.build()


def pooled_pair(rows: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The original and gemm1 with half its 40 outputs cut: gemm2 has 21 unknowns per output."""
    w1, c1, w2, c2 = weight([40, 24], 1), random([40], 2) * 0.5, weight([8, 40], 3), random([8], 4) * 0.1
    kept = np.arange(0, 40, 2)
    return pooled_model(w1, c1, w2, c2, rows), pooled_model(w1[kept], c1[kept], w2[:, kept], c2, rows)


def test_a_layer_with_few_rows_per_unknown_is_not_refit(monkeypatch):
    original, pruned = pooled_pair(rows=1)
    data = calibration(original, count=12)  # 12 rows for 21 unknowns

    rebuilt, fits = reconstruct(original, pruned, ["gemm2"], data)

    assert fits["gemm2"].status == "skipped" and "12 calibration rows for 21 unknowns" in fits["gemm2"].reason
    assert rebuilt.SerializeToString() == pruned.SerializeToString()
    # Fitted and judged on those 12 rows, the layer matches them and misses other inputs.
    monkeypatch.setattr("onnxslim.reconstruct.ROWS_PER_UNKNOWN", 0)
    monkeypatch.setattr("onnxslim.reconstruct.FOLDS", 1)
    fitted_to_samples, in_sample = reconstruct(original, pruned, ["gemm2"], data, options=RefitOptions(ridge=1e-4))
    assert in_sample["gemm2"].status == "refit" and in_sample["gemm2"].error_after < 0.1 * in_sample["gemm2"].error_before
    assert output_error(original, fitted_to_samples) > output_error(original, pruned)


def test_the_ridge_is_chosen_on_held_out_samples():
    original, pruned = pooled_pair(rows=8)
    data = calibration(original, count=12)  # 96 rows for 21 unknowns

    chosen, fits = reconstruct(original, pruned, ["gemm2"], data)

    singles = {ridge: reconstruct(original, pruned, ["gemm2"], data, options=RefitOptions(ridge=ridge)) for ridge in RIDGES}
    # The least cross-validated error of the grid is the one chosen and fitted on every sample...
    assert fits["gemm2"].status == "refit"
    assert fits["gemm2"].error_after == min(fit["gemm2"].error_after for _, fit in singles.values())
    np.testing.assert_array_equal(initializer(chosen, "w2"), initializer(singles[fits["gemm2"].ridge][0], "w2"))
    # ...and on fresh inputs it does about as well as the best single ridge would have.
    best = min(output_error(original, model) for model, _ in singles.values())
    assert output_error(original, chosen) <= 1.01 * best
    with pytest.raises(UsageError, match="positive"):
        reconstruct(original, pruned, ["gemm2"], data, options=RefitOptions(ridge=[1e-3, 0.0]))


def test_a_large_ridge_keeps_the_pruned_weights_and_refits_the_bias():
    original, pruned = conv_model(*conv_weights()), pruned_conv(*conv_weights())

    rebuilt, fits = reconstruct(original, pruned, ["conv2"], calibration(original), options=RefitOptions(ridge=1e9))

    # Pulled to the pruned weights (not to zero); the bias is free and takes up the lost mean.
    np.testing.assert_allclose(initializer(rebuilt, "w2"), initializer(pruned, "w2"), atol=1e-6)
    assert not np.allclose(initializer(rebuilt, "b2"), initializer(pruned, "b2"))
    assert fits["conv2"].status == "refit" and fits["conv2"].error_after < fits["conv2"].error_before
