"""Hostile and careless inputs (issue 17): every case that once broke onnxslim's promise.

The promise: exit 0 only for a correct model, 1 only for "verification failed", 2 for bad input
(one line, no traceback), 3 for our bug, 130 when interrupted; the input file and every file it
reads are byte-identical afterwards. Each section below is one class of hostile input.
"""

from __future__ import annotations


# ----------------------------------------------------------------------------- calibration data: NaN, Inf, huge and zero-width ranges


# ----------------------------------------------------------------------------- thresholds, tolerances and other usage


# ----------------------------------------------------------------------------- the model's interface: overridable inputs, dynamic dims, types


# ----------------------------------------------------------------------------- the user's files


# ----------------------------------------------------------------------------- onnxruntime in a worker: crashes, hangs, memory


# ----------------------------------------------------------------------------- generated graphs and models onnxruntime already optimized
