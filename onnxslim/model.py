"""Reading and writing models: paths or ModelProtos, external data, atomic writes.

This is the only module that touches model files. The conversion between the ONNX protobuf and
the onnx-graphsurgeon graph the passes work on, keeping everything the graph does not model
(metadata, doc strings, old-IR input listings) intact, is onnxslim.importer (to_graph) and
onnxslim.exporter (to_model); both are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
import onnx.parser
import onnx.external_data_helper
import onnx.numpy_helper
import onnx_graphsurgeon as gs  # noqa: F401 (the type to_graph returns, for callers of this module)
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, ModelSaveError, UsageError
from .exporter import to_model  # noqa: F401 (re-exported)
from .graph import ONNX_DOMAINS, proto_graphs
from .importer import to_graph  # noqa: F401 (re-exported)
from .repair import placeholder_interface, structure_repaired
from .text import first_line

# protobuf refuses to serialize a message of 2 GiB or more; past this we write external data.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def load(source: str | os.PathLike | onnx.ModelProto, *, check: bool = True,
         notes: list[str] | None = None) -> onnx.ModelProto:
    """Return the model at `source` (a path or a ModelProto), external data included.

    With `check`, what onnx.checker refuses but onnxruntime runs is repaired where the repair
    cannot change what the model computes (onnxslim.repair; a ModelProto given is copied, not
    changed), one line per repair added to `notes`.

    Raises ModelLoadError with one line saying what is wrong: no such file, a directory or
    another file that is not a regular one, an empty file, not a protobuf, a missing or
    malformed external data reference, an invalid model.
    """
    if isinstance(source, onnx.ModelProto):
        return _checked(source, None, notes) if check else source
    path = Path(source)
    _check_model_file(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error.strerror or error}") from error
    serialization = _serialization_format(path)
    try:
        with warnings.catch_warnings():  # onnx calls its onnxtxt reader experimental, on stderr
            warnings.simplefilter("ignore")
            model = onnx.load_model_from_string(data, format=serialization)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError, onnx.parser.ParseError) as error:
        raise ModelLoadError(f"{path} is not an ONNX model (it does not parse: {first_line(error, limit=None)})") from error
    if not model.HasField("graph"):
        raise ModelLoadError(f"{path} is not an ONNX model (it has no graph)")
    held = raw_data_lengths(data, len(model.graph.initializer)) if serialization == "protobuf" else {}
    del data  # the model holds its own copy of every weight
    held.update(_load_external_data(model, path))
    return _checked(model, path, notes, held) if check else model


def _checked(model: onnx.ModelProto, path: Path | None, notes: list[str] | None,
             held: dict[int, int] | None = None) -> onnx.ModelProto:
    """The model, checked; one the checker refuses is repaired (see onnxslim.repair; a valid model
    costs nothing more) and checked again. `held`: the weights' data sizes as the file holds them."""
    try:
        _check(model, path, held)
        return model
    except ModelLoadError:
        try:
            model, found = structure_repaired(model, own=path is not None)
        except ModelLoadError as error:
            raise ModelLoadError(f"{path}: {error}" if path else str(error)) from error
        if not found:
            raise  # nothing to repair: the checker's word stands
    _check(model, path)  # a repair may drop initializers: their sizes are measured again
    if notes is not None:
        notes.extend(found)
    return model


def _serialization_format(path: Path) -> str:
    """The format onnx.load reads the file in: its extension's (.onnxtxt, .json...), else protobuf."""
    found = onnx.serialization.registry.get_format_from_file_extension(path.suffix)
    return found or "protobuf"


def _check_model_file(path: Path) -> None:
    """A model must be a regular, non-empty file. A FIFO or a device is refused from its stat
    alone: opening a FIFO blocks until someone writes to it, and /dev/zero never ends."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"no such file: {path}") from None
    except OSError as error:  # a name too long, a loop of links, a folder we may not enter
        raise ModelLoadError(f"cannot read {_shortened(path)}: {error.strerror or error}") from error
    if stat.S_ISDIR(status.st_mode):
        raise ModelLoadError(f"{path} is a directory, not an ONNX model file")
    if not stat.S_ISREG(status.st_mode):
        raise ModelLoadError(f"{path} is not a regular file (a device, FIFO or socket), not an ONNX model file")
    if status.st_size == 0:
        raise ModelLoadError(f"{path} is empty")


def _load_external_data(model: onnx.ModelProto, path: Path) -> dict[int, int]:
    """Read the external data of every tensor into the model, from files in the model's folder only.

    Returns the byte count each top-level initializer holds afterwards, by index, as the
    references and the files' sizes give it: reading raw_data's length back would copy it."""
    base = path.parent
    sizes: dict[str, int] = {}  # location -> the data file's size
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            info = _external_data_info(tensor, path)
            if info.location not in sizes:
                named = f"{path}: external data file '{_shortened(info.location)}' (tensor '{tensor.name}')"
                sizes[info.location] = _external_data_file_size(path, info.location, named)
    if not sizes:
        return {}
    held = {}
    for index, tensor in enumerate(model.graph.initializer):
        if onnx.external_data_helper.uses_external_data(tensor):
            info = _external_data_info(tensor, path)
            # onnx refuses a reference past the file's end (below); a length-less one reads to it.
            held[index] = info.length if info.length is not None else max(sizes[info.location] - (info.offset or 0), 0)
    try:
        with warnings.catch_warnings():  # onnx warns about (and ignores) unknown keys
            warnings.simplefilter("ignore")
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelLoadError(f"{path}: cannot read external data: {first_line(error, limit=None)}") from error
    return held


def _external_data_file_size(path: Path, location: str, named: str) -> int:
    """The size of the external data file at `location`, which must be a regular file in the model's
    folder, other than the model, reached through no link (onnx refuses links, to files or to folders,
    anywhere on the location). The name is checked before anything outside the folder is looked at,
    even its metadata (a `../` name, an absolute one)."""
    base = path.parent
    if not location:
        raise ModelLoadError(f"{named}: the location is empty")
    if os.path.isabs(location) or os.path.normpath(location).split(os.sep)[0] == os.pardir:
        raise ModelLoadError(f"{named} is outside the model's folder: only files in {base} are read")
    data_file = base
    try:
        for part in Path(location).parts:
            data_file = data_file / part
            if data_file.is_symlink():
                raise ModelLoadError(f"{named} is reached through a link ({_shortened(data_file)}): only plain files "
                                     f"in {base} are read")
        if os.path.realpath(data_file) == os.path.realpath(path):
            raise ModelLoadError(f"{named} is the model file itself")
        status = data_file.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{named} not found in {base}") from None
    except OSError as error:  # e.g. a location longer than the file system allows
        raise ModelLoadError(f"{named} cannot be read: {error.strerror or error}") from error
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block the read
        raise ModelLoadError(f"{named} is not a regular file")
    # onnx refuses these too, in words that do not say why ('kernel rejected path').
    if status.st_nlink > 1:  # the other name may be anywhere: the data would come from outside the folder
        raise ModelLoadError(f"{named} has {status.st_nlink} hard links: onnx reads external data only from a "
                             "file with one name")
    if not os.access(data_file, os.R_OK):
        raise ModelLoadError(f"{named} cannot be read: permission denied")
    return status.st_size


def _external_data_info(tensor: onnx.TensorProto, path: Path) -> onnx.external_data_helper.ExternalDataInfo:
    """The tensor's external data reference; an offset or length that is not a non-negative
    integer is the model's fault (onnx raises a bare ValueError for it)."""
    for entry in tensor.external_data:
        if entry.key in ("offset", "length") and not (entry.value.isascii() and entry.value.isdigit()):
            raise ModelLoadError(
                f"{path}: tensor '{tensor.name}' has external data {entry.key} '{_shortened(entry.value)}', "
                "not a non-negative integer"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnx.external_data_helper.ExternalDataInfo(tensor)
    except ValueError as error:
        raise ModelLoadError(f"{path}: tensor '{tensor.name}': {first_line(error, limit=None)}") from error


def _shortened(text, limit: int = 80) -> str:
    """A name as long as the file system refuses, cut to fit the one-line error."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Field numbers on the wire: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
# A tensor with more fields than this on the wire holds typed values written unpacked, not raw_data.
_TENSOR_FIELDS_READ = 64


def raw_data_lengths(data: bytes, initializers: int) -> dict[int, int]:
    """The length of each top-level initializer's raw_data, by index, read from the serialized
    ModelProto `data` without copying the bytes: protobuf's Python API copies a bytes field to
    give its length, the wire format states it.

    `initializers` is how many the parsed model has; where the wire does not agree, or a tensor
    is not written as this reader expects, its index is left out (the caller measures it)."""
    lengths: dict[int, int] = {}
    count = 0
    try:
        for number, start, end in _length_fields(data, 0, len(data)):
            if number != _MODEL_GRAPH:
                continue
            # A field given twice is merged by protobuf: the initializers of both, in order.
            for field, tensor_start, tensor_end in _length_fields(data, start, end):
                if field != _GRAPH_INITIALIZER:
                    continue
                length = _raw_data_length(data, tensor_start, tensor_end)
                if length is not None:
                    lengths[count] = length
                count += 1
    except ValueError:
        return {}
    return lengths if count == initializers else {}


def _raw_data_length(data: bytes, start: int, end: int) -> int | None:
    """The length of the last raw_data field of the TensorProto in data[start:end] (the last one is
    the one protobuf keeps), or None if it has none or too many fields to read here."""
    length = None
    for read, (number, field_start, field_end) in enumerate(_length_fields(data, start, end)):
        if read >= _TENSOR_FIELDS_READ:
            return None
        if number == _TENSOR_RAW_DATA:
            length = field_end - field_start
    return length


def _length_fields(data: bytes, position: int, end: int):
    """(field number, start, end) of each length-delimited field of the message in data[position:end];
    the other fields are stepped over. Raises ValueError on a wire format protobuf would not parse
    (or a group, which no ONNX message has)."""
    while position < end:
        key, position = _varint(data, position, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(data, position, end)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            size, position = _varint(data, position, end)
            if position + size > end:
                raise ValueError("field past the message's end")
            yield number, position, position + size
            position += size
        else:
            raise ValueError(f"wire type {wire_type}")
        if position > end:
            raise ValueError("field past the message's end")


def _varint(data: bytes, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while position < end and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise ValueError("malformed varint")


def _check(model: onnx.ModelProto, path: Path | None, held: dict[int, int] | None = None) -> None:
    where = f"{path}: " if path else ""
    try:
        # Read as declared: a model to be written gets the shapes the checker wants (repair.interface_repaired).
        check_structure(model, shapeless_interface=True)
        _check_weight_sizes(model, held or {})
    except (onnx.checker.ValidationError, ValueError) as error:
        raise ModelLoadError(f"{where}invalid ONNX model: {first_line(error, limit=None)}") from error


# Initializers above this size are handed to the checker as typed graph inputs.
CHECKED_TENSOR_BYTES = 1 << 16


def check_structure(model: onnx.ModelProto, *, full: bool = False, shapeless_interface: bool = False) -> None:
    """onnx.checker on the model with its large top-level weights replaced by typed inputs.

    The checker serializes the whole model: on a large transformer, time spent copying weights
    whose only checkable property, dims against data size, numpy and protobuf already guarantee.
    Graph structure, ops, attributes, types, small tensors and bodies are checked in full. `full`:
    the checker's full check, which adds strict shape inference (the weights' dims take part in
    it as the inputs' dims). `shapeless_interface`: the main graph's inputs and outputs may lack
    a shape or type (onnxruntime takes that). Raises onnx.checker.ValidationError (or
    onnx.shape_inference.InferenceError with `full`).
    """
    def large(tensor: onnx.TensorProto) -> bool:
        itemsize = _itemsize(tensor.data_type)
        return bool(itemsize) and math.prod(tensor.dims) * itemsize > CHECKED_TENSOR_BYTES

    # The skeleton gets an IR version of its own (see weightless_copy): the model's is checked here.
    if not model.HasField("ir_version"):
        raise onnx.checker.ValidationError("the model has no ir_version")
    _check_opset_imports(model)
    skeleton = weightless_copy(model, large)
    skeleton.metadata_props.extend(model.metadata_props)
    if shapeless_interface:
        placeholder_interface(skeleton)
    set_aside_runtime_ops(skeleton)
    onnx.checker.check_model(skeleton, full_check=full)


def _check_opset_imports(model: onnx.ModelProto) -> None:
    """One version per operator set: the checker accepts a domain imported twice at two versions,
    and then the passes read one (the first) while onnxruntime may run the other."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain in ONNX_DOMAINS else entry.domain
        if versions.setdefault(domain, entry.version) != entry.version:
            raise onnx.checker.ValidationError(
                f"the model imports operator set '{domain or 'ai.onnx'}' at two versions, "
                f"{versions[domain]} and {entry.version}"
            )


# The domain runtime_only ops are moved to for the checker, which checks no node of a domain it does not know.
RUNTIME_DOMAIN = "onnxslim.runtime-registered"


def set_aside_runtime_ops(model: onnx.ModelProto) -> None:
    """Move the nodes of the ONNX domain that onnx has no schema for at the model's opset, but
    onnxruntime registers there, to a domain of their own, in place. onnxruntime's offline
    optimizer writes such nodes (LayerNormalization at opset 12, say, one of its own kernels
    registered under the ONNX domain); onnxruntime runs them, so the model is as checkable as one
    with custom ops: everything around them is checked, and they are left to onnxruntime."""
    opset = next((entry.version for entry in model.opset_import if entry.domain in ONNX_DOMAINS), None)
    if opset is None:
        return
    moved = False
    for body in proto_graphs(model.graph):
        for node in body.node:
            if node.domain in ONNX_DOMAINS and _runtime_only(node.op_type, opset):
                node.domain = RUNTIME_DOMAIN
                moved = True
    if moved:
        model.opset_import.append(onnx.helper.make_opsetid(RUNTIME_DOMAIN, 1))


@functools.cache
def _runtime_only(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
        return False
    except onnx.defs.SchemaError:
        return (op_type, opset) in _runtime_registered(opset)


@functools.cache
def _runtime_registered(opset: int) -> frozenset[tuple[str, int]]:
    """The ONNX-domain ops onnxruntime registers at or below `opset`, as (op, opset) pairs."""
    from onnxruntime.capi import _pybind_state  # onnxruntime's schema list has no public name

    return frozenset(
        (schema.name, opset)
        for schema in _pybind_state.get_all_operator_schema()
        if schema.domain in ONNX_DOMAINS and schema.since_version <= opset
    )
# The field holding a tensor's values when it has no raw_data, and how many entries one element takes.
_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1),
    **{data_type: ("int32_data", 1) for data_type in (
        onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT8, onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    )},
}


def _check_weight_sizes(model: onnx.ModelProto, held: dict[int, int]) -> None:
    """The check check_structure leaves out: each large top-level weight holds as many values as its
    dims say. A short one would otherwise reach the passes (and `inspect` would count parameters
    that are not there). `held` gives raw_data's length by initializer index where the file told it
    (see raw_data_lengths); any other raw_data is measured, which copies it. Raises ValueError."""
    for index, tensor in enumerate(model.graph.initializer):
        itemsize = _itemsize(tensor.data_type)
        expected = math.prod(tensor.dims)
        if not itemsize or expected * itemsize <= CHECKED_TENSOR_BYTES:
            continue  # the checker saw it, or its size is not a whole number of bytes per element
        if tensor.HasField("raw_data"):
            length = held.get(index)
            held_now, needed = (len(tensor.raw_data) if length is None else length), expected * itemsize
            unit = "bytes"
        elif tensor.data_type in _TYPED_FIELDS:
            field_name, per_element = _TYPED_FIELDS[tensor.data_type]
            held_now, needed = len(getattr(tensor, field_name)), expected * per_element
            unit = "values"
        else:
            continue
        if held_now != needed:
            dims = "x".join(str(dim) for dim in tensor.dims)
            raise ValueError(f"weight '{tensor.name}' holds {held_now:,} {unit}, but its dims {dims} need {needed:,}")


def weightless_copy(model: onnx.ModelProto, large, inputs: list[onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
    """A copy of `model` for checking or shape inference that leaves the large weights behind:
    each top-level initializer `large(tensor)` picks becomes a typed graph input (only its dims
    matter there); nodes, value infos, bodies and small initializers are copied. The graph's
    inputs are `inputs` when given, else the model's own."""
    skeleton = onnx.ModelProto(ir_version=max(model.ir_version, 4), producer_name=model.producer_name)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, source = skeleton.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input if inputs is None else inputs)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    listed = {value.name for value in graph.input}
    for tensor in source.initializer:
        if not large(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: str | os.PathLike | None = None,
    overwrite_input: bool = False,
) -> Path:
    """Write `model` to `path` atomically (temp file, then rename).

    external_data: True writes the tensors to `<name>.data` beside the model, False keeps
    them inside, None decides by size (protobuf cannot hold 2 GiB). `protect` is the input
    model's path: writing over it or over any file it reads (its external data) is refused,
    unless overwrite_input is set and `path` is the input model itself. A device node, FIFO or
    folder at `path` is refused too (the atomic rename would replace it).
    """
    path = Path(path)
    protected = files_read(protect) if protect is not None else []
    replaces_input = overwrite_input and protect is not None and same_file(path, protect)
    if replaces_input:  # the user's choice: the input model goes, and the files only it read with it
        protected = []
    check_output_path(path, "output model", protected)
    folder = path.parent if str(path.parent) else Path(".")
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_file = folder / (path.name + ".data")
    if external_data:
        check_output_path(data_file, "output model's external data", protected)
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".onnxslim-") as staging:
            staged = Path(staging) / path.name
            if external_data:
                data_name = path.name + ".data"
                onnx.save_model(
                    model,
                    str(staged),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=data_name,
                    size_threshold=1024,
                )
                if (Path(staging) / data_name).exists():
                    os.replace(Path(staging) / data_name, folder / data_name)
            else:
                onnx.save_model(model, str(staged))
            os.replace(staged, path)
    except OSError as error:  # the temp folder and what was staged in it are gone
        raise ModelSaveError(f"cannot write {path}: {error.strerror or first_line(error, limit=None)}") from error
    except ValueError as error:
        raise ModelSaveError(f"cannot write {path}: {first_line(error, limit=None)}") from error
    return path


def external_data_files(path: Path) -> list[Path]:
    """The files the model at `path` reads external tensors from (none if it cannot be read)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError):
        return []
    files = []
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        file = path.parent / location
        if location and file not in files:
            files.append(file)
    return files


def files_read(path: str | os.PathLike) -> list[tuple[Path, str]]:
    """The files loading the model at `path` reads, each with what it is to the user: the model
    itself and its external data files (locations are relative to the model's folder)."""
    path = Path(path)
    try:
        status = path.stat()
    except OSError:
        return []
    if not stat.S_ISREG(status.st_mode):
        return []
    # The command line and the API both ask before a run; parsing a large model twice costs.
    key = (os.path.realpath(path), status.st_ino, status.st_size, status.st_mtime_ns)
    if _last_files_read[0] != key:
        _last_files_read[:] = [key, external_data_files(Path(os.path.abspath(path)))]  # cwd may change
    return [(path, "the input model")] + [
        (file, f"the input model's external data file {file.name}") for file in _last_files_read[1]
    ]


_last_files_read: list = [None, []]  # [(realpath, inode, size, mtime), external data files]


def check_output_path(path: str | os.PathLike, what: str, protected: list[tuple[Path, str]] = ()) -> None:
    """Refuse, before any work, an output `path` (`what` names it: "output model", "--json report")
    that cannot be written as a new regular file or that names a file in `protected` (the files
    the input reads, the other outputs). Raises UsageError with one line."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        status = None
    except NotADirectoryError:
        raise UsageError(f"cannot write the {what} {_shortened(path)}: a folder on its path is a file") from None
    except OSError as error:  # a name longer than the file system allows, a loop of links
        raise UsageError(f"cannot write the {what} {_shortened(path)}: {error.strerror or error}") from error
    if status is not None and stat.S_ISDIR(status.st_mode):
        raise UsageError(f"cannot write the {what} {path}: it is a directory")
    if status is not None and not stat.S_ISREG(status.st_mode):
        # An atomic write would replace a device node or FIFO with a file (as root, /dev/null too).
        raise UsageError(f"cannot write the {what} {path}: it is not a regular file (a device, FIFO or socket)")
    for file, description in protected:
        if same_file(path, file):
            raise UsageError(f"the {what} path {path} is {description}; choose another path")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write the {what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the {what} {path}: folder {folder} is not writable")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (links, hard links and relative paths resolved)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:  # a name the file system refuses names no existing file
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by every tensor in the model (initializers and Constant attributes, subgraphs too).

    Computed from dims and dtype: reading `raw_data` would copy every weight into Python.
    """
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        itemsize = _itemsize(tensor.data_type)
        if itemsize:
            total += math.prod(tensor.dims) * itemsize
        else:  # strings and sub-byte types: their serialized size is close enough
            total += tensor.ByteSize()
    return total


def _itemsize(data_type: int) -> int:
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0


def fits_protobuf(model: onnx.ModelProto) -> bool:
    """Whether the model can be serialized as one protobuf message (under 2 GiB, with room for the graph)."""
    return tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD


def model_bytes(model: onnx.ModelProto) -> int:
    """The size the model has as one .onnx file (tensor bytes past protobuf's 2 GiB limit)."""
    if fits_protobuf(model):
        # Serializing is faster than ByteSize() in protobuf's upb backend.
        return len(model.SerializeToString())
    return tensor_bytes(model)
