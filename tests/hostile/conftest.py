"""Fixtures of the hostile-input suite: `usage_folder`, a working folder holding a small model, one
with external data, a folder, a FIFO and corrupt --inputs archives.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from hostile.common import _usage_model


@pytest.fixture
def usage_folder(tmp_path, monkeypatch):
    """The cwd: model.onnx, ext.onnx reading its weight from weights.bin, a folder, a FIFO, and
    corrupt --inputs archives."""
    monkeypatch.chdir(tmp_path)
    onnx.save(_usage_model(), tmp_path / "model.onnx")
    onnx.save(_usage_model(), tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    (tmp_path / "a_folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    np.savez(tmp_path / "good.npz", x=np.ones([1, 4], np.float32))
    good = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "zip_garbage.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}, None], dtype=object))
    np.save(tmp_path / "one_array.npy", np.ones([1, 4], np.float32))
    return tmp_path
