"""Reading and writing models: paths or ModelProtos, external data, atomic writes.

This is the only module that touches model files. It also converts between the ONNX
protobuf and the onnx-graphsurgeon graph the passes work on, keeping everything the
graph does not model (metadata, doc strings, old-IR input listings) intact.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
import onnx.parser
import onnx.external_data_helper
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx, update_import_domains
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter, get_numpy_type
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.logger import G_LOGGER
from onnx_graphsurgeon.util.misc import SynchronizedList
from google.protobuf.message import DecodeError

from . import repair
from .errors import ModelLoadError, ModelSaveError, UsageError
from .graph import ONNX_DOMAINS, inferred_symbol, proto_bodies, proto_graphs, tensor_map, walk

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
        raise ModelLoadError(f"{path} is not an ONNX model (it does not parse: {_first_line(error)})") from error
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
            model, found = repair.structure_repaired(model, own=path is not None)
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
        raise ModelLoadError(f"{path}: cannot read external data: {_first_line(error)}") from error
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
        raise ModelLoadError(f"{path}: tensor '{tensor.name}': {_first_line(error)}") from error


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
    give its length (half a second per 400 MB of weights), the wire format states it.

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
        raise ModelLoadError(f"{where}invalid ONNX model: {_first_line(error)}") from error


# Initializers above this size are handed to the checker as typed graph inputs.
CHECKED_TENSOR_BYTES = 1 << 16


def check_structure(model: onnx.ModelProto, *, full: bool = False, shapeless_interface: bool = False) -> None:
    """onnx.checker on the model with its large top-level weights replaced by typed inputs.

    The checker serializes the whole model; for a 350 MB transformer that is over a second,
    spent copying weights whose only checkable property, dims against data size, numpy and
    protobuf already guarantee. Graph structure, ops, attributes, types, small tensors and
    bodies are checked in full. `full`: the checker's full check, which adds strict shape
    inference (the weights' dims take part in it as the inputs' dims). `shapeless_interface`:
    the main graph's inputs and outputs may lack a shape or type (onnxruntime takes that). Raises
    onnx.checker.ValidationError (or onnx.shape_inference.InferenceError with `full`).
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
        repair.placeholder_interface(skeleton)
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


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
        raise ModelSaveError(f"cannot write {path}: {error.strerror or _first_line(error)}") from error
    except ValueError as error:
        raise ModelSaveError(f"cannot write {path}: {_first_line(error)}") from error
    return path


def _external_data_files(path: Path) -> list[Path]:
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
        _last_files_read[:] = [key, _external_data_files(Path(os.path.abspath(path)))]  # cwd may change
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
        # Serializing is several times faster than ByteSize() in protobuf's upb backend.
        return len(model.SerializeToString())
    return tensor_bytes(model)


# What the graph does not model, kept on the gs.Graph for export (see to_graph and to_model).
# Initializers that are also graph inputs (IR >= 4): defaults the caller may override, so the
# graph holds them as inputs (variables no pass can fold) and export writes the default back.
INPUT_DEFAULTS = "_onnxslim_input_defaults"
# The main graph's declared output types, and every non-tensor type (sequence, map, optional,
# sparse tensor) of any graph: onnx-graphsurgeon models tensor types only.
DECLARED_TYPES = "_onnxslim_declared_types"


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import `model` as an onnx-graphsurgeon graph (subgraphs included).

    onnx-graphsurgeon silently drops `sparse_value` attributes, which would leave Constant nodes
    without a value; such nodes are imported with their dense value instead (same result).

    Only the graph inputs keep their declared shapes: every other tensor's shape is left for
    shape inference to compute from the graph. A value_info or an output declaration is a claim
    the runtime does not enforce (onnxruntime warns and goes on), and a pass that folded a wrong
    one (an `[N,4]` tensor declared `[1,4]`) would bake it into the model. Declared element types
    stay: onnxruntime refuses a model whose declared and computed types differ.
    """
    defaults = overridable_defaults(model)
    binary = _binary_strings(model)
    if any(_sparse_constants(model.graph)) or (defaults and model.functions) or binary:
        model = copy.deepcopy(model)
        if binary:
            _encode_binary_strings(model)
        for node in _sparse_constants(model.graph):
            attribute = next(attribute for attribute in node.attribute if attribute.name == "sparse_value")
            dense = onnx.numpy_helper.from_array(_dense(attribute.sparse_tensor), node.output[0])
            node.attribute.remove(attribute)
            node.attribute.append(onnx.helper.make_attribute("value", dense))
        if model.functions:
            kept = [tensor for tensor in model.graph.initializer if tensor.name not in defaults]
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept)
    severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR  # its warnings about skipped attributes
    try:
        graph = gs.import_onnx(model) if model.functions else _import(model, set(defaults))
    finally:
        G_LOGGER.severity = severity
    _restore_skipped_attributes(graph, model, binary)  # which this restores
    _settle_constants(graph)
    graph.__dict__[INPUT_DEFAULTS] = defaults
    graph.__dict__[DECLARED_TYPES] = _declared_types(model.graph)
    _keep_input_shapes_only(graph, model.graph)
    return graph


def overridable_defaults(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The initializers that are also graph inputs, by name, where the input may be fed (IR >= 4;
    IR 3 lists every initializer as an input, and they are constants)."""
    if model.ir_version < 4 or not model.graph.input:
        return {}
    listed = {value.name for value in model.graph.input}
    return {tensor.name: tensor for tensor in model.graph.initializer if tensor.name in listed}


def _declared_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    declared = {value.name: value.type for value in graph.output}
    for body in proto_graphs(graph):
        for value in (*body.input, *body.output, *body.value_info):
            if value.type.WhichOneof("value") not in (None, "tensor_type"):
                declared[value.name] = value.type
    return {name: _copied(kind) for name, kind in declared.items()}


def _copied(kind: onnx.TypeProto) -> onnx.TypeProto:
    held = onnx.TypeProto()
    held.CopyFrom(kind)
    return held


def _keep_input_shapes_only(graph: gs.Graph, source: onnx.GraphProto) -> None:
    """Forget every declared shape but the graph inputs' (see to_graph); a body's inputs keep
    theirs too (Loop and Scan bodies declare what they are given)."""
    declared = {value.name: value for value in source.input}
    kept: set[int] = set()
    for tensor in graph.inputs:
        kept.add(id(tensor))
        value = declared.get(tensor.name)
        if isinstance(tensor, gs.Variable) and value is not None and value.type.HasField("tensor_type"):
            # A value_info of the same name must not stand in for the input's own declaration.
            read = _read_tensor_type(value.type.tensor_type)
            if read is not None:
                tensor.shape = None if read[1] is None else list(read[1])
    for body in walk(graph):
        if body is not graph:
            kept.update(id(tensor) for tensor in body.inputs)
    for body in walk(graph):
        for tensor in tensor_map(body).values():
            if isinstance(tensor, gs.Variable) and id(tensor) not in kept:
                tensor.shape = None


def _import(model: onnx.ModelProto, overridable: set[str] = frozenset()) -> gs.Graph:
    """gs.import_onnx for a model without functions: the same Graph, with the common cases (tensors,
    nodes, tensor value infos, plain and tensor attributes) built directly. onnx-graphsurgeon's
    importer logs and converts through generic helpers for every tensor and node, a quarter of a
    small model's optimize time. Bodies and unusual attributes go through onnx-graphsurgeon's own code."""
    source = model.graph
    opset = OnnxImporter.get_opset(model)
    tensors: dict[str, gs.Tensor] = {}
    types: dict[bytes, tuple | None] = {}  # see _import_value
    for initializer in source.initializer:
        if initializer.name not in tensors and initializer.name not in overridable:
            tensors[initializer.name] = _import_constant(initializer)
    for sparse in source.sparse_initializer:
        if sparse.values.name not in tensors:
            tensors[sparse.values.name] = OnnxImporter.import_tensor(sparse)
    for value in source.value_info:
        known = tensors.get(value.name)
        if known is None:
            tensors[value.name] = _import_value(value, types)
        elif isinstance(known, gs.Variable):  # as onnx-graphsurgeon: fill in what is missing
            imported = _import_value(value, types)
            known.dtype = known.dtype or imported.dtype
            known.shape = known.shape or imported.shape
    initializer_names = {tensor.name for tensor in source.initializer if tensor.name not in overridable} | {
        tensor.values.name for tensor in source.sparse_initializer
    }

    def interface(value: onnx.ValueInfoProto) -> gs.Tensor:
        if value.name not in tensors:
            tensors[value.name] = _import_value(value, types)
        return tensors[value.name]

    inputs = [interface(value) for value in source.input if value.name not in initializer_names]
    outputs = [interface(value) for value in source.output]

    def tensor(name: str) -> gs.Tensor:
        found = tensors.get(name)
        if found is None:
            if not name:
                return _new_variable("")  # an omitted optional tensor: a new one at each use
            found = tensors[name] = _new_variable(name)
        return found

    nodes = []
    owns_body = False
    for proto in source.node:
        attrs = {}
        for attribute in proto.attribute:
            value = _plain_attribute(attribute)
            if value is _NOT_PLAIN:
                value = OnnxImporter.import_attributes([attribute], {}, tensors, opset, model.opset_import)
                if attribute.name not in value:
                    continue  # onnx-graphsurgeon skips (and warns about) attribute types it does not know
                value = value[attribute.name]
                owns_body |= isinstance(value, gs.Graph)
            attrs[attribute.name] = value
        nodes.append(_new_node(
            proto.op_type,
            proto.name,
            attrs,
            [tensor(name) for name in proto.input],
            [tensor(name) for name in proto.output],
            proto.domain if proto.HasField("domain") else None,
        ))
    # gs.Graph() walks every node for bodies, to merge their function lists into its own; with no
    # functions and no bodies there is nothing to merge, so the nodes are given afterwards.
    graph = gs.Graph(
        nodes=nodes if owns_body else [], inputs=inputs, outputs=outputs, name=source.name,
        doc_string=source.doc_string, producer_name=model.producer_name, producer_version=model.producer_version,
        opset=opset, import_domains=model.opset_import, functions=[], ir_version=model.ir_version,
    )
    graph.nodes = nodes
    return graph


_NOT_PLAIN = object()
# Attribute types onnx-graphsurgeon's importer skips with a warning (Optional's `type`, and
# whatever a custom op carries): the node would lose them silently. They are held as the protos
# they are, which onnx.helper.make_attribute writes back as they were.
_SKIPPED_ATTRIBUTES = {
    onnx.AttributeProto.TYPE_PROTO: lambda attribute: _copied(attribute.tp),
    onnx.AttributeProto.TYPE_PROTOS: lambda attribute: [_copied(kind) for kind in attribute.type_protos],
    onnx.AttributeProto.SPARSE_TENSOR: lambda attribute: copy.deepcopy(attribute.sparse_tensor),
    onnx.AttributeProto.SPARSE_TENSORS: lambda attribute: [copy.deepcopy(item) for item in attribute.sparse_tensors],
    onnx.AttributeProto.TENSORS: lambda attribute: [copy.deepcopy(item) for item in attribute.tensors],
    onnx.AttributeProto.GRAPHS: lambda attribute: [copy.deepcopy(item) for item in attribute.graphs],
}


def _text(value: bytes) -> str | bytes:
    """A string attribute as onnx-graphsurgeon reads it; bytes that are not UTF-8 (a custom op's
    binary blob) stay bytes, which are written back as they were."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


_PLAIN_ATTRIBUTES = {
    onnx.AttributeProto.INT: lambda attribute: attribute.i,
    onnx.AttributeProto.FLOAT: lambda attribute: attribute.f,
    onnx.AttributeProto.STRING: lambda attribute: _text(attribute.s),
    onnx.AttributeProto.INTS: lambda attribute: list(attribute.ints) or EmptyList(attribute.type),
    onnx.AttributeProto.FLOATS: lambda attribute: list(attribute.floats) or EmptyList(attribute.type),
    onnx.AttributeProto.STRINGS: lambda attribute: [_text(item) for item in attribute.strings] or EmptyList(attribute.type),
    onnx.AttributeProto.TENSOR: lambda attribute: _import_constant(attribute.t),
    **{kind: lambda attribute, read=read: read(attribute) for kind, read in _SKIPPED_ATTRIBUTES.items() if kind != onnx.AttributeProto.GRAPHS},
}


def _plain_attribute(attribute: onnx.AttributeProto):
    """The value onnx-graphsurgeon would import for a plain attribute, else _NOT_PLAIN."""
    read = _PLAIN_ATTRIBUTES.get(attribute.type)
    if read is None or attribute.ref_attr_name:
        return _NOT_PLAIN
    return read(attribute)


_NUMPY_TYPES: dict[int, object] = {}


def _numpy_type(elem_type: int):
    """get_numpy_type(elem_type), remembered: None for a type numpy lacks."""
    dtype = _NUMPY_TYPES.get(elem_type)
    if dtype is None:
        dtype = get_numpy_type(elem_type)
        if dtype is not None:
            _NUMPY_TYPES[elem_type] = dtype
    return dtype


def _import_value(value: onnx.ValueInfoProto, types: dict[bytes, tuple | None]) -> gs.Variable:
    """OnnxImporter.import_tensor for a ValueInfoProto, tensor types read directly. `types` holds
    the types read so far by their bytes: a network's tensors share a few dozen."""
    if value.type.WhichOneof("value") != "tensor_type":
        return OnnxImporter.import_tensor(value)
    key = value.type.SerializeToString()
    if key not in types:
        types[key] = _read_tensor_type(value.type.tensor_type)
    if types[key] is None:  # a type numpy lacks: onnx-graphsurgeon's way (it keeps the ONNX enum)
        return OnnxImporter.import_tensor(value)
    dtype, shape = types[key]
    return _new_variable(value.name, dtype, None if shape is None else list(shape))


def _read_tensor_type(tensor_type: onnx.TypeProto.Tensor) -> tuple | None:
    """(numpy dtype, dims or None) as onnx-graphsurgeon reads them; None for a type neither numpy
    nor ml_dtypes has. bfloat16 and float8 tensors are typed with ml_dtypes' types, which passes
    can ask numpy about (onnx-graphsurgeon would keep the ONNX enum, which numpy cannot read)."""
    dtype = _numpy_type(tensor_type.elem_type)
    if dtype is None:
        dtype = _extended_type(tensor_type.elem_type)
    if dtype is None:
        return None
    if not tensor_type.HasField("shape"):
        return dtype, None
    shape = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        elif dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            shape.append(None)
    return dtype, tuple(shape)


@functools.cache
def _extended_type(elem_type: int) -> np.dtype | None:
    if elem_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def _import_constant(proto: onnx.TensorProto) -> gs.Constant:
    """OnnxImporter.import_tensor for a TensorProto, for element types numpy or ml_dtypes has
    (bfloat16, float8, int4...: onnx-graphsurgeon would keep the ONNX enum as the dtype, which
    no pass can hand to numpy)."""
    dtype = _numpy_type(proto.data_type) or _extended_type(proto.data_type)
    if dtype is None:
        return OnnxImporter.import_tensor(proto)
    values = object.__new__(LazyValues)
    values.__dict__.update(tensor=proto, shape=proto.dims, dtype=dtype, nbytes=math.prod(proto.dims) * dtype.itemsize)
    tensor = object.__new__(gs.Constant)
    tensor.__dict__.update(
        name=proto.name,
        inputs=_synchronized(tensor, "outputs"),
        outputs=_synchronized(tensor, "inputs"),
        _values=values,
        data_location=int(proto.data_location) if proto.HasField("data_location") else None,
        _export_dtype=None,
    )
    return tensor


# onnx-graphsurgeon's constructors set every field through __setattr__ overrides and fill the
# edge lists through SynchronizedList's Python methods; import builds thousands of objects, and
# that was over half of its time. These fill in the same fields, in the same order, directly.


def _synchronized(owner, field_name: str) -> SynchronizedList:
    """SynchronizedList(owner, field_name, initial=[])."""
    items = SynchronizedList.__new__(SynchronizedList)
    items.parent_obj = owner
    items.field_name = field_name
    return items


def _new_variable(name: str, dtype=None, shape=None) -> gs.Variable:
    """gs.Variable(name, dtype, shape)."""
    tensor = object.__new__(gs.Variable)
    tensor.__dict__.update(
        name=name,
        inputs=_synchronized(tensor, "outputs"),
        outputs=_synchronized(tensor, "inputs"),
        dtype=dtype,
        shape=shape,
        type="tensor_type",
    )
    return tensor


def _new_node(op: str, name: str, attrs: dict, inputs: list, outputs: list, domain: str | None) -> gs.Node:
    """gs.Node(op, name, attrs, inputs, outputs, domain): each tensor lists the node as a reader or writer."""
    node = object.__new__(gs.Node)
    reads, writes = _synchronized(node, "outputs"), _synchronized(node, "inputs")
    list.extend(reads, inputs)
    list.extend(writes, outputs)
    node.__dict__.update(op=op, name=name, attrs=attrs, inputs=reads, outputs=writes, domain=domain)
    for tensor in inputs:
        list.append(tensor.outputs, node)
    for tensor in outputs:
        list.append(tensor.inputs, node)
    return node


def _restore_skipped_attributes(graph: gs.Graph, model: onnx.ModelProto, binary: bool = False) -> None:
    """Give back the attributes onnx-graphsurgeon skipped (see _SKIPPED_ATTRIBUTES), and with
    `binary` the bytes of strings that are not UTF-8 (see _encode_binary_strings), in the main
    graph, its bodies and the model's functions: import makes one node per NodeProto, in order."""
    pairs = [(graph.nodes, model.graph.node)]
    pairs += [(function.nodes, proto.node) for function, proto in zip(graph.functions, model.functions)]
    while pairs:
        nodes, protos = pairs.pop()
        if len(nodes) != len(protos):
            continue
        for node, proto in zip(nodes, protos):
            for attribute in proto.attribute:
                held = node.attrs.get(attribute.name)
                if binary and isinstance(held, (str, list)):
                    node.attrs[attribute.name] = _decoded(held)
                if attribute.type == onnx.AttributeProto.GRAPH and isinstance(held, gs.Graph):
                    pairs.append((held.nodes, attribute.g.node))
                elif attribute.ref_attr_name:
                    continue
                elif attribute.type in _SKIPPED_ATTRIBUTES and held is None:
                    node.attrs[attribute.name] = _SKIPPED_ATTRIBUTES[attribute.type](attribute)
                elif type(held) is list and not held:
                    node.attrs[attribute.name] = EmptyList(attribute.type)


def _model_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for body in proto_graphs(model.graph):
        yield from body.node
    for function in model.functions:
        yield from function.node


def _binary_strings(model: onnx.ModelProto) -> bool:
    """Whether a string attribute somewhere is not UTF-8 (onnx-graphsurgeon's importer would raise)."""
    for node in _model_nodes(model):
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.STRING and isinstance(_text(attribute.s), bytes):
                return True
            if attribute.type == onnx.AttributeProto.STRINGS and any(isinstance(_text(item), bytes) for item in attribute.strings):
                return True
    return False


# onnx-graphsurgeon decodes every string attribute as UTF-8: one that is not (a custom op's
# binary blob) is given to it as this prefix and its bytes in hex, and read back as the bytes.
_BINARY = "\x00onnxslim-binary:"


def _encode_binary_strings(model: onnx.ModelProto) -> None:
    """Write the string attributes that are not UTF-8 as _BINARY text, in place."""
    def encoded(item: bytes) -> bytes:
        return item if isinstance(_text(item), str) else (_BINARY + item.hex()).encode()

    for node in _model_nodes(model):
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.STRING:
                attribute.s = encoded(attribute.s)
            elif attribute.type == onnx.AttributeProto.STRINGS:
                items = [encoded(item) for item in attribute.strings]
                del attribute.strings[:]
                attribute.strings.extend(items)


def _decoded(value):
    """An attribute value as it was before _encode_binary_strings."""
    if isinstance(value, str) and value.startswith(_BINARY):
        return bytes.fromhex(value[len(_BINARY):])
    if isinstance(value, list) and any(isinstance(item, str) and item.startswith(_BINARY) for item in value):
        return [_decoded(item) for item in value]
    return value


class _SparseValues(SparseValues):
    """A sparse initializer's values. onnx-graphsurgeon's reader ignores raw_data and makes every
    value float64, so a pass folding a sparse weight folded zeros of the wrong type."""

    def load(self):
        return _dense(self.tensor)


def _every_constant(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every constant of the graph and its bodies: initializers and node attribute values."""
    for body in walk(graph):
        for tensor in tensor_map(body).values():
            if isinstance(tensor, gs.Constant):
                yield tensor
        for node in body.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Constant):
                    yield value


def _settle_constants(graph: gs.Graph) -> None:
    """Constants and tensors onnx-graphsurgeon's own importer made (bodies, functions, sparse
    initializers) made like _import's: a sparse initializer reads its values right, and a type
    numpy lacks but ml_dtypes has (bfloat16, float8, int4) is that type, not the ONNX enum."""
    for constant in _every_constant(graph):
        values = constant._values
        if type(values) is SparseValues:
            settled = object.__new__(_SparseValues)
            settled.__dict__.update(values.__dict__)
            constant._values = values = settled
        if isinstance(values, LazyValues) and isinstance(values.dtype, (int, np.integer)):
            values.dtype = _extended_type(int(values.dtype)) or values.dtype
    for body in walk(graph):
        for tensor in tensor_map(body).values():
            if isinstance(tensor, gs.Variable) and tensor.type == "tensor_type" and isinstance(tensor.dtype, (int, np.integer)):
                tensor.dtype = _extended_type(int(tensor.dtype)) or tensor.dtype


def exportable_constants(graph: gs.Graph) -> None:
    """Hold every constant onnx-graphsurgeon cannot write from a numpy array as a TensorProto,
    in place: strings (it writes raw data, which a string tensor cannot have) and ml_dtypes'
    types (int4, float4 and int2 pack several values per byte). A pass may fold such a value."""
    for constant in _every_constant(graph):
        values = constant._values
        if isinstance(values, np.ndarray) and (values.dtype.kind in "OUS" or _is_extended(values.dtype)):
            proto = onnx.numpy_helper.from_array(values.astype(object) if values.dtype.kind in "US" else values, constant.name)
            held = LazyValues(proto)
            held.dtype = values.dtype if values.dtype.kind not in "US" else np.dtype(object)
            constant._values = held


def _is_extended(dtype: np.dtype) -> bool:
    return type(dtype.type).__module__.startswith("ml_dtypes") or dtype.type.__module__.startswith("ml_dtypes")


def _sparse_constants(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    found = []
    for body in proto_graphs(graph):
        for node in body.node:
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
                found += [node for attribute in node.attribute if attribute.name == "sparse_value"]
    return found


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a sparse tensor: indices are [NNZ] linear or [NNZ, rank] coordinates."""
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` as a ModelProto that keeps everything of `template` the graph does not hold."""
    known_value_info = _value_info_names(template.graph)
    exportable_constants(graph)
    model = _export(graph, known_value_info)
    bodies = proto_bodies(model.graph)
    for body in bodies:
        drop_disconnected_nodes(body)
        _keep_known_value_info(body, known_value_info)
    forget_inferred_symbols(model.graph)
    _restore_declared_types(model.graph, graph.__dict__.get(DECLARED_TYPES, {}))
    _restore_denotations(model.graph, template.graph)
    defaults = graph.__dict__.get(INPUT_DEFAULTS, {})
    if defaults:
        inputs = {value.name for value in model.graph.input}
        model.graph.initializer.extend(tensor for name, tensor in defaults.items() if name in inputs)
    if bodies:  # one graph has nothing to share
        _share_outer_initializers(model.graph)
    # Only the fields the template sets: an empty string written out still costs bytes.
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if template.HasField(name):
            setattr(model, name, getattr(template, name))
        else:
            model.ClearField(name)
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    if template.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    return model


def _export(graph: gs.Graph, known_value_info: set[str]) -> onnx.ModelProto:
    """onnx-graphsurgeon's export_onnx, writing the graph straight into the ModelProto (see
    ProtoWriter.graph), with value_info only for the names in `known_value_info` (see
    _keep_known_value_info).

    export_onnx builds a GraphProto and make_model copies it: two copies of every weight
    (0.2 s on a 350 MB model).
    """
    model = onnx.ModelProto()
    ProtoWriter(graph.__dict__.get(DECLARED_TYPES), known_value_info).graph(model.graph, graph)
    model.functions.extend(OnnxExporter.export_function(function) for function in graph.functions)
    model.opset_import.extend(update_import_domains(graph))
    return model


class EmptyList(list):
    """An empty list attribute, which remembers its type (INTS, FLOATS, STRINGS...): onnx cannot
    write an empty list without being told, and a node of a custom domain may carry one."""

    def __init__(self, attr_type: int):
        super().__init__()
        self.attr_type = attr_type


_LIST_ATTRIBUTES = {int: ("INTS", "ints"), float: ("FLOATS", "floats")}
_ONNX_TYPES: dict = {}


class ProtoWriter:
    """Writes nodes and value infos into empty protos as onnx-graphsurgeon's exporter would
    (export_node; export_value_info_proto without its type check), in place: a graph's
    node.add() is not copied again.

    The common attributes (int, float, string, non-empty lists of one of them, tensors) and
    tensor types are written directly: onnx.helper.make_attribute's checks were a tenth of a small
    model's optimize time. Anything else goes through onnx-graphsurgeon. One writer serves one
    export: a tensor type it wrote before is copied from its bytes (a network's tensors share a
    few dozen shapes), several times faster than writing it field by field.
    """

    def __init__(self, declared: dict[str, onnx.TypeProto] | None = None, known_value_info: set[str] | None = None):
        self._types: dict[tuple, bytes] = {}
        self._declared = declared or {}  # a graph's DECLARED_TYPES: non-tensor types are written as declared
        self._known = known_value_info  # the tensors that get a value_info (None: every typed one)

    def graph(self, target: onnx.GraphProto, graph: gs.Graph) -> onnx.GraphProto:
        """Write `graph` (the main graph or a body) into the empty `target` as onnx-graphsurgeon's
        export_graph would, without the nodes passes disconnected (see drop_disconnected_nodes).
        Bodies are written by this writer too, so what it writes that onnx-graphsurgeon cannot
        (empty list attributes, constants it cannot hold) may sit at any depth."""
        target.name = graph.name or "graph"
        if graph.doc_string:
            target.doc_string = graph.doc_string
        for node in graph.nodes:
            if any(tensor.name for tensor in node.outputs):
                self.node(target.node.add(), node)
        for tensor in graph.inputs:
            self.value_info(target.input.add(), tensor)
        for tensor in graph.outputs:
            self.value_info(target.output.add(), tensor)
        tensors = tensor_map(graph)
        constants = [tensor for tensor in tensors.values() if isinstance(tensor, gs.Constant)]
        target.initializer.extend(_tensor_proto(tensor) for tensor in constants if not isinstance(tensor._values, SparseValues))
        target.sparse_initializer.extend(
            OnnxExporter.export_sparse_tensor_proto(tensor) for tensor in constants if isinstance(tensor._values, SparseValues)
        )
        interface = {tensor.name for tensor in [*graph.inputs, *graph.outputs]}
        # A body's value_info holds only what its own nodes compute: an entry for an outer-scope
        # value read there would stand for it in the body, and onnx's inference of the body then
        # fails (nothing in the body gets a shape) or uses an older, less precise type.
        produced = {tensor.name for node in graph.nodes for tensor in node.outputs}
        for name, tensor in tensors.items():
            if (
                (self._known is None or name in self._known)
                and name not in interface
                and name in produced
                and isinstance(tensor, gs.Variable)
                and (tensor.dtype is not None or tensor.shape is not None)
            ):
                self.value_info(target.value_info.add(), tensor)
        return target

    def node(self, proto: onnx.NodeProto, node: gs.Node) -> onnx.NodeProto:
        proto.op_type = node.op
        if node.name:
            proto.name = node.name
        if node.domain is not None:
            proto.domain = node.domain
        proto.input.extend([tensor.name for tensor in node.inputs])
        proto.output.extend([tensor.name for tensor in node.outputs])
        for key, value in node.attrs.items():
            if isinstance(value, gs.Graph):
                self.graph(proto.attribute.add(name=key, type=onnx.AttributeProto.GRAPH).g, value)
            elif isinstance(value, list) and value and all(isinstance(item, gs.Graph) for item in value):
                attribute = proto.attribute.add(name=key, type=onnx.AttributeProto.GRAPHS)
                for body in value:
                    self.graph(attribute.graphs.add(), body)
            elif not _add_plain_attribute(proto, key, value):
                proto.attribute.extend(OnnxExporter.export_attributes({key: value}))
        return proto

    def value_info(self, proto: onnx.ValueInfoProto, tensor: gs.Tensor) -> onnx.ValueInfoProto:
        declared = self._declared.get(tensor.name) if isinstance(tensor, gs.Variable) and tensor.type != "tensor_type" else None
        if declared is not None and declared.WhichOneof("value") not in (None, "tensor_type"):
            proto.name = tensor.name
            proto.type.CopyFrom(declared)
            return proto
        if tensor.dtype is not None and not (isinstance(tensor, gs.Constant) or tensor.type == "tensor_type"):
            proto.CopyFrom(OnnxExporter.export_value_info_proto(tensor, False))  # sequences, sparse tensors
            return proto
        proto.name = tensor.name
        if tensor.dtype is None:
            return proto
        dtype = tensor.dtype
        elem_type = _ONNX_TYPES.get(dtype)
        if elem_type is None:
            elem_type = _ONNX_TYPES[dtype] = dtype_to_onnx(dtype)
        shape = tensor.shape
        # The dims' types belong in the key: 1 == 1.0 == True, but only an int is written as a dim.
        key = (elem_type,) if shape is None else (elem_type, tuple(shape), tuple(map(type, shape)))
        written = self._types.get(key)
        if written is not None:
            proto.type.MergeFromString(written)
            return proto
        tensor_type = proto.type.tensor_type
        tensor_type.elem_type = elem_type
        if shape is not None:
            dims = tensor_type.shape
            dims.SetInParent()  # a scalar's shape has no dims but is present
            for size in shape:
                dim = dims.dim.add()
                if isinstance(size, (int, np.integer)):
                    dim.dim_value = int(size)
                elif isinstance(size, str):
                    dim.dim_param = size
        self._types[key] = proto.type.SerializeToString()
        return proto


def _add_plain_attribute(proto: onnx.NodeProto, key: str, value) -> bool:
    kind = type(value)
    if kind is int:
        attribute = proto.attribute.add(name=key, type=onnx.AttributeProto.INT)
        attribute.i = value
    elif kind is float:
        attribute = proto.attribute.add(name=key, type=onnx.AttributeProto.FLOAT)
        attribute.f = value
    elif kind is str:
        proto.attribute.add(name=key, type=onnx.AttributeProto.STRING, s=value.encode())
    elif kind in (list, tuple) and value and type(value[0]) in _LIST_ATTRIBUTES:
        item = type(value[0])
        if any(type(element) is not item for element in value):
            return False
        type_name, field = _LIST_ATTRIBUTES[item]
        attribute = proto.attribute.add(name=key, type=getattr(onnx.AttributeProto, type_name))
        getattr(attribute, field).extend(value)
    elif kind is gs.Constant:  # a Constant's or ConstantOfShape's value
        attribute = proto.attribute.add(name=key, type=onnx.AttributeProto.TENSOR)
        attribute.t.CopyFrom(_tensor_proto(value))
    elif kind is EmptyList:
        proto.attribute.add(name=key, type=value.attr_type)
    else:
        return False
    return True


def _tensor_proto(tensor: gs.Constant) -> onnx.TensorProto:
    """The initializer for `tensor`. onnx-graphsurgeon exports a weight still held by the source
    model by writing the tensor's name into the source's TensorProto; a renamed one is
    exported as a renamed copy, so the source model is left as it was."""
    if isinstance(tensor._values, LazyValues) and tensor._values.tensor.name != tensor.name:
        renamed = onnx.TensorProto()
        renamed.CopyFrom(tensor._values.tensor)
        renamed.name = tensor.name
        return renamed
    return OnnxExporter.export_tensor_proto(tensor)


def drop_disconnected_nodes(graph: onnx.GraphProto) -> None:
    """Nodes a pass disconnected (no outputs) wait in the graph for dead-node elimination;
    every ONNX op has an output, so in a file they would be invalid."""
    kept = [node for node in graph.node if any(node.output)]
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    for body in proto_bodies(graph):
        drop_disconnected_nodes(body)


def _share_outer_initializers(graph: onnx.GraphProto) -> None:
    """Keep one copy of each initializer, in the innermost graph enclosing every graph that holds it.

    onnx-graphsurgeon writes a constant into every graph whose nodes read it, so a weight that
    If/Loop bodies read from the outer scope comes out once per body. Only equal copies are
    merged: sibling bodies may each hold a different tensor under the same name.
    """
    graphs, parents = [graph], [None]
    for index, current in enumerate(graphs):  # grows while it is walked: breadth first
        for body in proto_bodies(current):
            graphs.append(body)
            parents.append(index)
    holders: dict[str, list[int]] = {}
    for index, current in enumerate(graphs):
        for tensor in current.initializer:
            holders.setdefault(tensor.name, []).append(index)
    for name, indices in holders.items():
        if len(indices) < 2:
            continue
        copies = [next(tensor for tensor in graphs[index].initializer if tensor.name == name) for index in indices]
        if any(duplicate.SerializeToString() != copies[0].SerializeToString() for duplicate in copies[1:]):
            continue
        target = _enclosing(indices, parents)
        kept = onnx.TensorProto()
        kept.CopyFrom(copies[0])
        for index, duplicate in zip(indices, copies):
            if index != target:
                graphs[index].initializer.remove(duplicate)
        if target not in indices:
            graphs[target].initializer.append(kept)


def _enclosing(indices: list[int], parents: list[int | None]) -> int:
    """The innermost graph that is, or encloses, every graph in `indices`."""

    def chain(index: int | None) -> list[int]:
        path = []
        while index is not None:
            path.append(index)
            index = parents[index]
        return path

    common = set(chain(indices[0]))
    for index in indices[1:]:
        common &= set(chain(index))
    return next(index for index in chain(indices[0]) if index in common)


def _restore_declared_types(graph: onnx.GraphProto, declared: dict[str, onnx.TypeProto]) -> None:
    """Write back what onnx-graphsurgeon cannot hold (see DECLARED_TYPES): non-tensor types as
    they were declared, and the main graph's outputs as declared (the model's interface), with
    a dynamic dim that inference found static filled in, as the graph has it."""
    for output in graph.output:
        kind = declared.get(output.name)
        if kind is not None:
            output.type.CopyFrom(_refined(kind, output.type))
    for body in proto_graphs(graph):
        for value in (*body.input, *body.output, *body.value_info):
            kind = declared.get(value.name)
            if kind is not None and kind.WhichOneof("value") not in (None, "tensor_type"):
                value.type.CopyFrom(kind)


def _restore_denotations(graph: onnx.GraphProto, template: onnx.GraphProto) -> None:
    """Write back the denotations of the main graph's tensor inputs (a type's and its dims'),
    which onnx-graphsurgeon does not hold: they are part of the model's interface."""
    declared = {value.name: value.type for value in template.input}
    for value in graph.input:
        kind = declared.get(value.name)
        if kind is None or kind.WhichOneof("value") != "tensor_type" or value.type.WhichOneof("value") != "tensor_type":
            continue
        if kind.denotation:
            value.type.denotation = kind.denotation
        dims, written = kind.tensor_type.shape.dim, value.type.tensor_type.shape.dim
        if len(dims) == len(written):
            for dim, written_dim in zip(dims, written):
                if dim.denotation:
                    written_dim.denotation = dim.denotation


def _refined(declared: onnx.TypeProto, computed: onnx.TypeProto) -> onnx.TypeProto:
    if declared.WhichOneof("value") != "tensor_type" or computed.WhichOneof("value") != "tensor_type":
        return declared
    refined = _copied(declared)
    if not computed.tensor_type.HasField("shape"):
        return refined
    if not refined.tensor_type.HasField("shape"):
        refined.tensor_type.shape.CopyFrom(computed.tensor_type.shape)
        return refined
    dims, known = refined.tensor_type.shape.dim, computed.tensor_type.shape.dim
    if len(dims) == len(known):
        for dim, found in zip(dims, known):
            if not dim.HasField("dim_value") and found.HasField("dim_value") and found.dim_value > 0:
                dim.dim_value = found.dim_value
    return refined


def _value_info_names(graph: onnx.GraphProto) -> set[str]:
    return {value.name for body in proto_graphs(graph) for value in body.value_info}


def _keep_known_value_info(graph: onnx.GraphProto, known: set[str]) -> None:
    """Drop value_info the input model did not have: annotations from shape inference are
    optional, and writing them for every tensor would make the output larger than the input."""
    kept = [value for value in graph.value_info if value.name in known]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for body in proto_bodies(graph):
        _keep_known_value_info(body, known)


def forget_inferred_symbols(graph: onnx.GraphProto, outputs: bool = False) -> None:
    """Write the dims onnx's shape inference named itself (`unk__7`) as unnamed: in value_info,
    in bodies' outputs, and in the graph's own outputs if `outputs`. Inputs keep theirs (declared).

    Such a name holds only within the inference that gave it (see onnxslim.graph.inferred_symbol).
    A model written with them would not be a fixed point: a shape is refined over the passes,
    so its names come from several inferences, and a second run, which infers them from the
    final graph, names them otherwise. Handed back to inference, they would stand in for what
    it could now find (onnx keeps a named dim it is given over the one it computes).
    """
    values = [*graph.value_info, *graph.output] if outputs else [*graph.value_info]
    for value in values:
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param and inferred_symbol(dim.dim_param):
                    dim.ClearField("dim_param")
    for body in proto_bodies(graph):
        forget_inferred_symbols(body, outputs=True)


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR version 3 requires every initializer to be listed as a graph input too."""
    listed = {value.name for value in graph.input}
    for tensor in graph.initializer:
        if tensor.name not in listed:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
