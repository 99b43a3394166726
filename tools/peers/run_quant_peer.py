"""Quantize one model to INT8 QDQ with one peer quantizer, in a process of its own; tools/bench_quant.py
starts it in the peers virtualenv.

    python run_quant_peer.py TOOL FP32.onnx CALIBRATION_DIR OUTPUT.onnx REPORT.json [--transformer]

CALIBRATION_DIR holds one .npz per calibration sample ({input name: array}), read in name order.
Tools, each with its defaults except where the bench asks otherwise:
  ort     onnxruntime.quantization: an opset below 13 upgraded to 13 (per-channel DequantizeLinear
          needs it), quant_pre_process (shape inference and optimization; where its
          symbolic shape inference fails, again with skip_symbolic_shape=True; if that fails too, the
          raw model; the notes say which), then quantize_static in QDQ format,
          per-channel weights, uint8 activations, int8 weights, MinMax calibration
  ort-rr  the same with reduce_range=True (7-bit weights), onnxruntime's advice for x86 CPUs
          without VNNI
  nncf    nncf.quantize on the loaded ModelProto with an nncf.Dataset of the samples, its defaults
          (ONNX backend), saved with onnx.save; with --transformer, model_type=ModelType.TRANSFORMER,
          NNCF's documented setting for transformer models (onnxruntime's quantizer has none)

It imports nothing but the standard library, numpy, onnx and the tool. It times only the quantize
calls and writes {"tool", "version", "seconds", "phases", "notes"} to REPORT.json; the bench
measures everything else about the result.

Exit status: 0 done; 3 the tool cannot be imported here; anything else is the tool failing
(its traceback is on stderr, whose last line the bench reports).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
from run_peer import PROTOBUF_LIMIT, save  # beside this script: python puts its folder on sys.path

TOOL_UNAVAILABLE = 3


class ToolUnavailable(Exception):
    """The tool is not importable in this environment (not a failure of the tool on the model)."""


def calibration_feeds(directory: Path) -> list[dict[str, np.ndarray]]:
    """Every sample of `directory`, in file-name order, as {input name: array}."""
    feeds = []
    for path in sorted(directory.glob("*.npz")):
        with np.load(path) as sample:
            feeds.append({name: sample[name] for name in sample.files})
    if not feeds:
        raise FileNotFoundError(f"no .npz calibration samples in {directory}")
    return feeds


def quantize_with_ort(model_path: Path, feeds: list[dict], output: Path, transformer: bool = False,
                      reduce_range: bool = False) -> dict:
    """onnxruntime's recommended static flow: quant_pre_process, then quantize_static (QDQ)."""
    try:
        import onnxruntime
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise ToolUnavailable(f"onnxruntime.quantization: {error}") from error

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(feeds)

        def get_next(self):
            return next(self.samples, None)

    notes = []
    phases = {}
    with tempfile.TemporaryDirectory(prefix="ort-pre-", dir=output.parent) as scratch:
        started = time.perf_counter()
        source = upgrade_for_per_channel(model_path, Path(scratch) / f"opset13-{model_path.name}", notes)
        phases["opset_upgrade"] = time.perf_counter() - started
        started = time.perf_counter()
        quantize_input = pre_process(quant_pre_process, source, Path(scratch) / model_path.name, notes)
        phases["quant_pre_process"] = time.perf_counter() - started
        started = time.perf_counter()
        quantize_static(str(quantize_input), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=model_path.stat().st_size > PROTOBUF_LIMIT // 2)
        phases["quantize_static"] = time.perf_counter() - started
    return {"version": onnxruntime.__version__, "seconds": sum(phases.values()), "phases": phases,
            "notes": "; ".join(notes) or None}


def upgrade_for_per_channel(model_path: Path, upgraded: Path, notes: list[str]) -> Path:
    """The model at opset 13 if it is older: per-channel weights need DequantizeLinear's `axis`,
    which opset 13 introduced, and quantize_static writes it whatever the opset (so an opset 11/12
    model comes out invalid). onnx's version converter does the upgrade."""
    model = onnx.load(str(model_path))
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= 13:
        return model_path
    save(onnx.version_converter.convert_version(model, 13), upgraded)
    notes.append(f"opset {opset} upgraded to 13 with onnx.version_converter (per-channel needs it)")
    return upgraded


def pre_process(quant_pre_process, model_path: Path, prepared: Path, notes: list[str]) -> Path:
    """onnxruntime's quant_pre_process with its defaults; where its symbolic shape inference fails
    (dynamic dims it cannot follow), again with skip_symbolic_shape=True, its documented way out,
    which still runs the optimization and ONNX shape inference; the raw model if both fail."""
    for options in ({}, {"skip_symbolic_shape": True}):
        try:
            quant_pre_process(str(model_path), str(prepared), **options)
            if options:
                notes.append("quant_pre_process with skip_symbolic_shape=True (symbolic shape inference failed)")
            return prepared
        except Exception as error:  # noqa: BLE001 — the tool's own helper failing is a finding to record
            failure = _first_line(error)
    notes.append(f"quant_pre_process failed ({failure}); quantized the raw model")
    return model_path


def quantize_with_ort_reduce_range(model_path: Path, feeds: list[dict], output: Path, transformer: bool = False
                                   ) -> dict:
    return quantize_with_ort(model_path, feeds, output, transformer, reduce_range=True)


def quantize_with_nncf(model_path: Path, feeds: list[dict], output: Path, transformer: bool = False) -> dict:
    """nncf.quantize with its defaults on the ONNX ModelProto (model_type TRANSFORMER if asked)."""
    os.environ.setdefault("NNCF_CI", "1")  # NNCF's switch that keeps its telemetry off
    try:
        import nncf
    except ImportError as error:
        raise ToolUnavailable(f"import nncf failed: {error}") from error
    model = onnx.load(str(model_path))
    started = time.perf_counter()
    options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
    seconds = time.perf_counter() - started
    save(quantized, output)
    return {"version": nncf.__version__, "seconds": seconds, "phases": {"quantize": seconds},
            "notes": "model_type=ModelType.TRANSFORMER" if transformer else None}


QUANTIZERS = {
    "ort": quantize_with_ort,
    "ort-rr": quantize_with_ort_reduce_range,
    "nncf": quantize_with_nncf,
}


def _first_line(error: BaseException) -> str:
    """The message's first line; for an error without a message (a bare assert), its type and the
    function that raised it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return f"{type(error).__name__}: {lines[0]}"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].name}" if frames else ""
    return f"{type(error).__name__}{where}"


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    feeds = calibration_feeds(arguments.calibration)
    try:
        report = QUANTIZERS[arguments.tool](arguments.model, feeds, arguments.output, arguments.transformer)
    except ToolUnavailable as error:
        print(error, file=sys.stderr)
        return TOOL_UNAVAILABLE
    arguments.report.write_text(json.dumps({"tool": arguments.tool, **report}))
    return 0


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Quantize one model with one peer quantizer.")
    parser.add_argument("tool", choices=list(QUANTIZERS))
    parser.add_argument("model", type=Path, help="the float32 model")
    parser.add_argument("calibration", type=Path, help="a folder of .npz samples")
    parser.add_argument("output", type=Path, help="where the quantized model goes")
    parser.add_argument("report", type=Path, help="where the JSON report goes")
    parser.add_argument("--transformer", action="store_true", help="the model is a transformer")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
