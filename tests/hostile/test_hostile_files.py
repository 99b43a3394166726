"""Hostile files (issue 17): no output ever lands on a file the input reads (its external data, a
dump, a link to one) or on a special file; broken models, external data outside the model's folder,
hard-linked or unreadable, short weights, FIFOs and text-format models are refused in one line;
a write or report that fails midway (a full disk) leaves no output and no temp file behind, and the
input and its data stay byte-identical.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from hostile.common import _assert_usage_error, _files, _invoke, _leftovers, _usage_model


def test_a_fifo_or_device_model_is_not_a_regular_file_and_is_not_read(tmp_path):
    """Opening a FIFO blocks until someone writes to it; /dev/zero never ends. The run is a
    subprocess, so a read that blocks fails the test by its timeout instead of hanging it (the
    sweep above runs every command on a FIFO in-process)."""
    os.mkfifo(tmp_path / "model.onnx")
    for model in (tmp_path / "model.onnx", Path("/dev/zero")):
        finished = subprocess.run([sys.executable, "-m", "onnxslim.cli", "inspect", str(model)],
                                  capture_output=True, text=True, timeout=60)
        assert finished.returncode == 2, finished.stderr
        assert finished.stderr.splitlines() == [f"onnxslim: error: {model} is not a regular file (a device, FIFO or "
                                                "socket), not an ONNX model file"]


def _with_external_data(name: str, folder: Path, **entries: str) -> Path:
    """ext-style model `name` whose weight's external data reference gets `entries` (offset, length,
    location) as given, however wrong."""
    model = onnx.load(folder / "ext.onnx", load_external_data=False)
    tensor = model.graph.initializer[0]
    for key, value in entries.items():
        found = [entry for entry in tensor.external_data if entry.key == key]
        if found:
            found[0].value = value
        else:
            tensor.external_data.add(key=key, value=value)
    onnx.save(model, folder / name)
    return folder / name


def _no_ir_version(folder: Path) -> Path:
    model = _usage_model()
    model.ClearField("ir_version")
    onnx.save(model, folder / "no_ir_version.onnx")
    return folder / "no_ir_version.onnx"


def _short_weight(folder: Path) -> Path:
    """A 160x160 float weight (100 KiB, over the size the checker is shown) holding 100 bytes."""
    model = _usage_model(160)
    model.graph.initializer[0].raw_data = b"\0" * 100
    onnx.save(model, folder / "short_weight.onnx")
    return folder / "short_weight.onnx"


HOSTILE_MODELS = {
    "no ir_version": _no_ir_version,
    "weight shorter than its dims": _short_weight,
    "external data offset abc": lambda folder: _with_external_data("offset_abc.onnx", folder, offset="abc"),
    "external data offset -5": lambda folder: _with_external_data("offset_negative.onnx", folder, offset="-5"),
    "external data length abc": lambda folder: _with_external_data("length_abc.onnx", folder, length="abc"),
    "external data past the file's end": lambda folder: _with_external_data("past_end.onnx", folder, offset="64"),
    "external data location too long": lambda folder: _with_external_data("long.onnx", folder, location="w" * 300),
    "external data in a FIFO": lambda folder: _with_external_data("fifo_data.onnx", folder, location="fifo"),
    "external data missing": lambda folder: _with_external_data("missing_data.onnx", folder, location="gone.bin"),
    "model name too long": lambda folder: folder / ("m" * 300 + ".onnx"),
    "a FIFO": lambda folder: folder / "fifo",
    "a folder": lambda folder: folder / "a_folder",
}
LOADING_COMMANDS = {
    "optimize": lambda model: ["optimize", model, "out.onnx"],
    "optimize --no-verify": lambda model: ["optimize", model, "out.onnx", "--no-verify"],
    "verify": lambda model: ["verify", model, "model.onnx"],
    "inspect": lambda model: ["inspect", model],
    "inspect --json": lambda model: ["inspect", "--json", model],
    "prune-plan": lambda model: ["prune-plan", model],
    "bench": lambda model: ["bench", model, "--runs", "1", "--warmup", "0"],
}


@pytest.mark.parametrize("hostile", list(HOSTILE_MODELS))
@pytest.mark.parametrize("command", list(LOADING_COMMANDS))
def test_every_command_that_loads_a_model_refuses_a_broken_one_in_one_line(usage_folder, command, hostile):
    """inspect and prune-plan used to accept a short weight and a model without an IR version
    (prune-plan then failed with an internal error); external data offsets that are no numbers
    and names too long for the file system were internal errors everywhere."""
    model = HOSTILE_MODELS[hostile](usage_folder)
    before = _files(usage_folder)
    _assert_usage_error(_invoke(*LOADING_COMMANDS[command](model.name)))
    assert _files(usage_folder) == before
    assert not (usage_folder / "out.onnx").exists()


def test_a_model_refused_for_its_weights_names_the_weight_and_its_size(usage_folder):
    line = _assert_usage_error(_invoke("inspect", _short_weight(usage_folder).name))
    assert "'w'" in line and "100 bytes" in line and "160x160" in line


OUTPUTS_ON_THE_USERS_FILES = {
    "the input's external data": ["optimize", "ext.onnx", "weights.bin"],
    "the input's external data, with --overwrite": ["optimize", "ext.onnx", "weights.bin", "--overwrite"],
    "the input's external data, through ./": ["optimize", "ext.onnx", "./a_folder/../weights.bin"],
    "--json on the input's external data": ["optimize", "ext.onnx", "out.onnx", "--json", "weights.bin"],
    "--json on the input": ["optimize", "ext.onnx", "out.onnx", "--json", "ext.onnx"],
    "verify --json on the external data": ["verify", "ext.onnx", "model.onnx", "--json", "weights.bin"],
    "bench --json on the external data": ["bench", "ext.onnx", "--runs", "1", "--json", "weights.bin"],
    "bench --markdown on the external data": ["bench", "ext.onnx", "--runs", "1", "--markdown", "weights.bin"],
    "a device node": ["optimize", "ext.onnx", "/dev/null"],
    "a FIFO": ["optimize", "ext.onnx", "fifo"],
    "a folder": ["optimize", "ext.onnx", "a_folder"],
    "a name too long": ["optimize", "ext.onnx", "o" * 300 + ".onnx"],
    "a missing folder": ["optimize", "ext.onnx", "no_folder/out.onnx"],
    "a folder that is a file": ["optimize", "ext.onnx", "model.onnx/out.onnx"],
    "external data beside a name too long": ["optimize", "ext.onnx", "o" * 252 + ".onnx", "--external-data"],
    "--plot with a model's name": ["optimize", "ext.onnx", "out.onnx", "--prune", "0.25", "--plot", "out.onnx"],
    "--plot on the input": ["optimize", "ext.onnx", "out.onnx", "--prune", "0.25", "--plot", "ext.onnx"],
    "--plot on the --json report": ["optimize", "ext.onnx", "out.onnx", "--prune", "0.25", "--plot", "r.png",
                                    "--json", "r.png"],
}


@pytest.mark.parametrize("args", list(OUTPUTS_ON_THE_USERS_FILES.values()), ids=list(OUTPUTS_ON_THE_USERS_FILES))
def test_no_output_lands_on_a_file_the_input_reads_or_on_a_special_file(usage_folder, args):
    """`optimize m.onnx weights.bin` replaced the input's weights with the output model."""
    before = _files(usage_folder)
    _assert_usage_error(_invoke(*args))
    assert _files(usage_folder) == before  # the input, its external data and everything else
    assert sorted(os.listdir(usage_folder)) == sorted(["a_folder", "fifo", *before])
    assert stat.S_ISFIFO(os.stat(usage_folder / "fifo").st_mode)


def test_the_python_api_refuses_the_same_outputs(usage_folder):
    before = _files(usage_folder)
    for destination in ("weights.bin", "/dev/null", "fifo", "a_folder"):
        with pytest.raises(onnxslim.UsageError):
            onnxslim.optimize_file("ext.onnx", destination)
        with pytest.raises(onnxslim.UsageError):
            onnxslim.save(_usage_model(), destination, protect="ext.onnx")
    assert _files(usage_folder) == before


def test_a_run_on_a_dump_never_overwrites_it(usage_folder):
    """Re-running on a --dump-dir dump, with the same --dump-dir, wrote the new dumps over it."""
    result = _invoke("optimize", "ext.onnx", "out.onnx", "--dump-dir", "dumps")
    assert result.exit_code == 0, result.output
    assert (usage_folder / "dumps" / "000-input.onnx").is_file()
    before = _files(usage_folder)
    for dump_dir in ("dumps", "./dumps/", "a_folder/../dumps"):
        line = _assert_usage_error(_invoke("optimize", "dumps/000-input.onnx", "again.onnx", "--dump-dir", dump_dir))
        assert "000-input.onnx" in line
    (usage_folder / "onnxslim-verify-each").mkdir()
    shutil.copy(usage_folder / "model.onnx", usage_folder / "onnxslim-verify-each" / "003-fold-constants-after.onnx")
    before = _files(usage_folder)
    _assert_usage_error(_invoke("optimize", "onnxslim-verify-each/003-fold-constants-after.onnx", "again.onnx",
                                "--verify-each"))
    assert _files(usage_folder) == before
    # Another folder, or a file that is not named like a dump, is fine.
    assert _invoke("optimize", "dumps/000-input.onnx", "again.onnx", "--dump-dir", "other").exit_code == 0
    assert _files(usage_folder)["dumps/000-input.onnx"] == before["dumps/000-input.onnx"]


def test_optimizing_a_model_with_external_data_leaves_it_and_its_data_byte_identical(usage_folder):
    before = {name: _files(usage_folder)[name] for name in ("ext.onnx", "weights.bin")}
    for args in (["out.onnx"], ["out2.onnx", "--external-data"], ["out3.onnx", "--dump-dir", "dumps", "--verify-each"],
                 ["out4.onnx", "--json", "report.json"]):
        result = _invoke("optimize", "ext.onnx", *args)
        assert result.exit_code == 0, result.output
    _invoke("inspect", "ext.onnx")
    _invoke("verify", "ext.onnx", "out.onnx", "--json", "verify.json")
    _invoke("prune-plan", "ext.onnx")
    after = _files(usage_folder)
    assert {name: after[name] for name in before} == before


@pytest.mark.parametrize("hostile", list(HOSTILE_MODELS))
def test_verify_refuses_a_broken_candidate_as_bad_input_naming_it(usage_folder, hostile):
    """`verify A B` loaded B without the checks A gets: a B with no IR version or a short weight was
    'verification failed' (exit 1) with onnxruntime's error and a --no-verify hint verify has not."""
    model = HOSTILE_MODELS[hostile](usage_folder)
    before = _files(usage_folder)
    line = _assert_usage_error(_invoke("verify", "model.onnx", model.name))
    assert model.name[:60] in line
    assert "no-verify" not in line
    assert _files(usage_folder) == before


def test_the_python_api_names_the_broken_model_of_two_protos():
    broken = _usage_model()
    broken.ClearField("ir_version")
    with pytest.raises(onnxslim.ModelLoadError, match="^the candidate model: .*ir_version"):
        onnxslim.verify(_usage_model(), broken)
    with pytest.raises(onnxslim.ModelLoadError, match="^the reference model: .*ir_version"):
        onnxslim.verify(broken, _usage_model())


def _located(folder: Path, name: str, location: str) -> Path:
    """ext.onnx (in `folder`'s parent) saved as folder/name, its weight read from `location`."""
    model = onnx.load(folder.parent / "ext.onnx", load_external_data=False)
    entry = next(entry for entry in model.graph.initializer[0].external_data if entry.key == "location")
    entry.value = location
    onnx.save(model, folder / name)
    return folder / name


ESCAPING_LOCATIONS = {
    "absolute": lambda folder: str(folder.parent / "weights.bin"),
    "../": lambda folder: "../weights.bin",
    "down then up past the folder": lambda folder: "x/../../weights.bin",
    "../ to a FIFO": lambda folder: "../fifo",
    "a link to a file outside": lambda folder: os.symlink(folder.parent / "weights.bin", folder / "link.bin") or "link.bin",
    "through a linked folder": lambda folder: os.symlink(folder.parent, folder / "up") or "up/weights.bin",
    "through a linked folder, then ../": lambda folder: os.symlink(folder.parent / "a_folder", folder / "up") or "up/../x",
}


@pytest.mark.parametrize("where", list(ESCAPING_LOCATIONS))
@pytest.mark.parametrize("command", ["inspect", "optimize", "verify", "prune-plan", "bench"])
def test_external_data_outside_the_model_folder_is_refused(usage_folder, command, where):
    """onnx refused most of these itself, but onnxslim looked first (a stat of the file outside):
    'not a regular file' for a FIFO outside, 'not found in sub' for a name that escapes."""
    folder = usage_folder / "sub"
    folder.mkdir()
    model = _located(folder, "m.onnx", ESCAPING_LOCATIONS[where](folder)).relative_to(usage_folder)
    args = {"inspect": ["inspect", model], "optimize": ["optimize", model, "out.onnx"],
            "verify": ["verify", "model.onnx", model], "prune-plan": ["prune-plan", model],
            "bench": ["bench", model, "--runs", "1", "--warmup", "0"]}[command]
    before = _files(usage_folder)
    line = _assert_usage_error(_invoke(*args))
    assert ("outside the model's folder: only files in sub are read" in line
            or "is reached through a link (sub/" in line and "only plain files in sub are read" in line), line
    assert _files(usage_folder) == before
    assert not (usage_folder / "out.onnx").exists()


def test_external_data_in_the_model_file_itself_with_no_location_or_behind_a_link_inside_is_refused(usage_folder):
    """onnx reads external data through no link, even one that stays in the folder: one line saying so
    (onnx's own was 'kernel rejected path')."""
    folder = usage_folder / "sub"
    (folder / "data").mkdir(parents=True)
    shutil.copy(usage_folder / "weights.bin", folder / "data" / "weights.bin")
    os.symlink("data", folder / "linked")
    os.symlink("data/weights.bin", folder / "linked.bin")
    for location, ending in (("m.onnx", "is the model file itself"), ("", "the location is empty"),
                             ("linked/weights.bin", "only plain files in sub are read"),
                             ("linked.bin", "only plain files in sub are read")):
        model = _located(folder, "m.onnx", location).relative_to(usage_folder)
        assert _assert_usage_error(_invoke("inspect", model)).endswith(ending), location
    assert _invoke("optimize", _located(folder, "m.onnx", "data/weights.bin"), "out.onnx").exit_code == 0


def _wire_cases(tmp_path: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal([160, 160]).astype(np.float32), "w")
    model = _usage_model(160)
    typed = _usage_model(160)
    typed.graph.initializer[0].CopyFrom(helper.make_tensor("w", TensorProto.FLOAT, [160, 160],
                                                           rng.standard_normal(160 * 160).tolist()))
    several = _usage_model(160)
    several.graph.initializer.extend([numpy_helper.from_array(np.ones([3], np.float32), "small"), big,
                                      helper.make_tensor("typed", TensorProto.INT64, [2], [1, 2])])
    second = onnx.ModelProto()
    second.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.zeros([2], np.float32), "extra"))
    return {
        "one weight": model.SerializeToString(),
        "typed values": typed.SerializeToString(),
        "raw and typed tensors": several.SerializeToString(),
        # protobuf merges a message field given twice: the graph's initializers are those of both
        "the graph given twice": several.SerializeToString() + second.SerializeToString(),
        "raw_data given twice": _raw_data_twice(),
    }


def _raw_data_twice() -> bytes:
    """_usage_model(160) whose weight's raw_data is written twice, 102,400 bytes then 100: protobuf
    keeps the last."""
    model = _usage_model(160)
    weight = model.graph.initializer.pop()
    tensor = weight.SerializeToString() + b"\x4a" + _varint_bytes(100) + b"\0" * 100  # field 9, length-delimited
    graph = b"\x2a" + _varint_bytes(len(tensor)) + tensor  # GraphProto.initializer, field 5
    return model.SerializeToString() + b"\x3a" + _varint_bytes(len(graph)) + graph  # ModelProto.graph, field 7


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def test_raw_data_lengths_read_from_the_wire_match_what_protobuf_parses(tmp_path):
    from onnxslim.model import raw_data_lengths

    for name, data in _wire_cases(tmp_path).items():
        model = onnx.ModelProto.FromString(data)
        expected = {index: len(tensor.raw_data) for index, tensor in enumerate(model.graph.initializer)
                    if tensor.HasField("raw_data")}
        assert raw_data_lengths(data, len(model.graph.initializer)) == expected, name
    assert raw_data_lengths(b"\x3a\x05\x2a\x10", 1) == {}  # a field past the end: not guessed
    assert raw_data_lengths(_wire_cases(tmp_path)["one weight"], 2) == {}  # a count that does not agree


def test_a_short_weight_is_found_without_reading_it_back(tmp_path, monkeypatch):
    """The size check takes raw_data's length from the file: a short weight behind a long one of the
    same tensor (protobuf keeps the last), and a short external one, are still refused."""
    import onnxslim.model

    (tmp_path / "twice.onnx").write_bytes(_raw_data_twice())
    with pytest.raises(onnxslim.ModelLoadError, match="holds 100 bytes"):
        onnxslim.model.load(tmp_path / "twice.onnx")
    onnx.save(_usage_model(160), tmp_path / "ext.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    with open(tmp_path / "w.bin", "r+b") as data_file:
        data_file.truncate(1000)
    with pytest.raises(onnxslim.ModelLoadError):
        onnxslim.model.load(tmp_path / "ext.onnx")
    # The lengths the load measured are the ones checked: none is read back from the tensor.
    seen = {}
    original = onnxslim.model._check_weight_sizes
    monkeypatch.setattr(onnxslim.model, "_check_weight_sizes",
                        lambda model, held: seen.update(held) or original(model, held))
    onnx.save(_usage_model(160), tmp_path / "good.onnx")
    onnx.save(_usage_model(160), tmp_path / "good_ext.onnx", save_as_external_data=True, location="g.bin",
              size_threshold=0)
    onnxslim.model.load(tmp_path / "good.onnx")
    assert seen == {0: 160 * 160 * 4}
    seen.clear()
    onnxslim.model.load(tmp_path / "good_ext.onnx")
    assert seen == {0: 160 * 160 * 4}


def test_a_model_importing_an_operator_set_at_two_versions_is_refused(usage_folder):
    """The checker accepts it; the passes read the first version, onnxruntime may run the other."""
    model = _usage_model()
    model.opset_import.append(helper.make_opsetid("ai.onnx", 13))
    onnx.save(model, "two_opsets.onnx")
    for args in (["inspect", "two_opsets.onnx"], ["optimize", "two_opsets.onnx", "out.onnx"],
                 ["verify", "model.onnx", "two_opsets.onnx"]):
        assert "at two versions, 17 and 13" in _assert_usage_error(_invoke(*args))


def test_ten_thousand_operator_sets_are_a_model_like_any_other(usage_folder):
    model = _usage_model()
    model.opset_import.extend(helper.make_opsetid(f"domain{index}", 1) for index in range(10_000))
    onnx.save(model, "opsets.onnx")
    assert _invoke("optimize", "opsets.onnx", "out.onnx").exit_code == 0


def _failing_write(failure: BaseException):
    """A stand-in for onnx.save_model that writes half a model, then fails as a full disk or a Ctrl-C would."""
    def save_model(model, path, *args, **kwargs):
        Path(path).write_bytes(model.SerializeToString()[:10])
        raise failure

    return save_model


@pytest.mark.parametrize(("failure", "code", "message"), [
    (OSError(28, "No space left on device"), 2, "cannot write out.onnx: No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
@pytest.mark.parametrize("external", [False, True])
def test_a_write_that_fails_midway_leaves_no_output_and_no_temp_file(usage_folder, monkeypatch, failure, code, message,
                                                                     external):
    before = _files(usage_folder)
    monkeypatch.setattr(onnx, "save_model", _failing_write(failure))
    result = _invoke("optimize", "ext.onnx", "out.onnx", *(["--external-data"] if external else []))
    assert _assert_usage_error(result, code) == f"onnxslim: error: {message}"
    assert _files(usage_folder) == before
    assert not Path("out.onnx").exists() and not Path("out.onnx.data").exists()
    assert _leftovers(usage_folder) == []


@pytest.mark.parametrize("command", [["verify", "model.onnx", "model.onnx"], ["bench", "model.onnx", "--runs", "1"],
                                     ["optimize", "model.onnx", "out.onnx"]])
def test_a_report_the_disk_cannot_hold_is_not_left_half_written(usage_folder, monkeypatch, command):
    """A full disk left an empty --json report behind (a CI would read it); after `optimize` has
    written the model, the line says so."""
    def write_text(self, text, *args, **kwargs):
        with open(self, "w") as file:
            file.write(text[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)
    line = _assert_usage_error(_invoke(*command, "--json", "report.json"))
    assert line.startswith("onnxslim: error: cannot write report.json: No space left on device"), line
    assert not Path("report.json").exists()
    assert _leftovers(usage_folder) == []
    if command[0] == "optimize":
        assert line.endswith("(the model was written to out.onnx)")


def test_external_data_with_two_hard_links_or_that_cannot_be_read_is_refused_in_our_words(usage_folder):
    """onnx refuses both, saying 'kernel rejected path' for a file it may not read, and calling a
    second hard link 'a potential hardlink attack'."""
    os.link("weights.bin", "a_folder/second_name.bin")
    line = _assert_usage_error(_invoke("inspect", "ext.onnx"))
    assert line.endswith("'weights.bin' (tensor 'w') has 2 hard links: onnx reads external data only from a file "
                         "with one name")
    os.unlink("a_folder/second_name.bin")
    if os.geteuid() == 0:
        return  # root reads every file
    os.chmod("weights.bin", 0)
    try:
        assert _assert_usage_error(_invoke("inspect", "ext.onnx")).endswith("cannot be read: permission denied")
    finally:
        os.chmod("weights.bin", 0o644)


def test_a_run_on_a_link_to_a_dump_never_overwrites_the_dump(usage_folder):
    """The dump-folder check compared the link's own folder and name: a link beside the dump folder
    let this run's dumps replace the dump it reads."""
    assert _invoke("optimize", "model.onnx", "out.onnx", "--dump-dir", "dumps").exit_code == 0
    os.symlink("dumps/000-input.onnx", "linked.onnx")
    before = _files(usage_folder)
    line = _assert_usage_error(_invoke("optimize", "linked.onnx", "again.onnx", "--dump-dir", "dumps"))
    assert "000-input.onnx" in line
    assert _files(usage_folder) == before


def test_text_format_models_load_and_a_broken_one_is_bad_input(usage_folder):
    """Loading reads the file's bytes itself now (for the weights' lengths); onnx's text formats,
    chosen by the file's extension, still go through onnx's own readers. A file that onnx's
    onnxtxt reader cannot parse was an internal error (its ParseError), after onnx's warning."""
    onnx.save(_usage_model(), "model.txtpb", format="textproto")
    onnx.save(_usage_model(), "model.onnxtxt", format="onnxtxt")
    assert _invoke("inspect", "model.txtpb").exit_code == 0
    assert _invoke("inspect", "model.onnxtxt").exit_code == 0
    onnx.save(_usage_model(), "textproto.onnxtxt", format="textproto")
    assert "textproto.onnxtxt is not an ONNX model" in _assert_usage_error(_invoke("inspect", "textproto.onnxtxt"))


def test_the_no_verify_hint_is_given_only_where_no_verify_is_the_remedy(tmp_path, monkeypatch):
    """A model onnxruntime cannot load (an op of a domain it does not know): `optimize` may skip
    verification and says how; `verify` has no such option and must not suggest one."""
    graph = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "custom.onnx")
    monkeypatch.chdir(tmp_path)
    line = _assert_usage_error(_invoke("verify", "custom.onnx", "custom.onnx"))
    assert "com.example" in line and "no-verify" not in line
    line = _assert_usage_error(_invoke("optimize", "custom.onnx", "out.onnx"))
    assert "com.example" in line and "use --no-verify" in line
    assert not (tmp_path / "out.onnx").exists()
