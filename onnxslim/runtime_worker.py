"""The onnxruntime worker process (see onnxslim/runtime.py, which starts it) and the wire format
both sides speak.

Run as a script, not imported as part of the package: the worker needs only the standard library,
numpy and onnxruntime, and importing `onnxslim` would cost it the imports of onnx and
onnx-graphsurgeon. So this file imports nothing from onnxslim.

Wire format, both ways, on a Unix stream socket: a header of four little-endian uint64 (pickle
length, number of buffers, bytes of shared memory, its region number), the buffer lengths (uint64 each), the pickle
(protocol 5), then each out-of-band buffer's raw bytes. numpy arrays and model bytes travel out
of band, so neither side copies them into a pickle. A reply whose buffers are large (a
calibration sample's activations are hundreds of megabytes) puts them in a shared memory file
instead, passed with the header: the socket would copy them twice, at a fraction of memcpy's
speed; this way the worker copies them once and the parent's arrays are views of that memory.
The files are reused (SharedPool): the parent says which replies' arrays are all gone.
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct("<QQQQ")
LENGTH = struct.Struct("<Q")
# Replies with at least this many bytes of buffers go through shared memory (Linux: memfd).
SHARED_MEMORY_FROM = 1 << 20
ALIGNMENT = 64  # of each buffer in shared memory: any dtype's, and a cache line
# A larger socket buffer means fewer wake-ups per megabyte of activations (the kernel caps it).
SOCKET_BUFFER_BYTES = 4 << 20
# onnxruntime's message when an allocation fails (its BFCArena and CPU allocator say so).
ALLOCATION_FAILURES = ("Failed to allocate memory", "bad_alloc", "std::bad_alloc")
# Tensor types onnxruntime's numpy bridge cannot convert, with their ONNX type numbers: they cross
# it as their bits, typed on our side with ml_dtypes' types (as onnx types them).
BIT_TYPES = {"tensor(bfloat16)": 16, "tensor(float8e4m3fn)": 17, "tensor(float8e4m3fnuz)": 18,
             "tensor(float8e5m2)": 19, "tensor(float8e5m2fnuz)": 20, "tensor(uint4)": 21, "tensor(int4)": 22,
             "tensor(uint2)": 25, "tensor(int2)": 26}
# Bits per element of the sub-byte types, which onnxruntime packs low bits first.
PACKED_BITS = {"uint4": 4, "int4": 4, "uint2": 2, "int2": 2}
# Relu on float[1], IR 3, opset 7 (onnx.helper's bytes; the worker has no onnx to make them).
WARM_UP_MODEL = (b'\x08\x03:3\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x01gZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02'
                 b'\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x07')
# Exit status of a worker whose parent is gone (it had nobody to answer).
ORPHANED = 0
# Exit status of a worker that ran out of memory where it could not answer (a half-read request).
OUT_OF_MEMORY_STATUS = 75


class ChannelClosed(Exception):
    """The other end of the socket is gone (a clean end of stream)."""


def send(sock: socket.socket, message, *, pool: SharedPool | None = None) -> None:
    """Send one message; with a `pool`, large buffers go through its shared memory."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    lengths = b"".join(LENGTH.pack(view.nbytes) for view in views)
    offsets, size = _layout([view.nbytes for view in views])
    if pool is None or size < SHARED_MEMORY_FROM or not hasattr(os, "memfd_create"):
        sock.sendall(HEADER.pack(len(data), len(views), 0, 0) + lengths + data)
        for view in views:
            sock.sendall(view)
        return
    region = pool.lease(size)
    for view, offset in zip(views, offsets):
        region.memory[offset:offset + view.nbytes] = view
    message = HEADER.pack(len(data), len(views), size, region.number) + lengths + data
    sent = socket.send_fds(sock, [message], [region.descriptor])
    sock.sendall(memoryview(message)[sent:])


class Region:
    """A shared memory file and the worker's own mapping of it, kept across replies: its pages
    are in place, so a reply costs one memcpy (a fresh file costs a page fault per 4 KiB, twice)."""

    def __init__(self, number: int, size: int):
        import mmap

        self.number, self.size = number, size
        self.descriptor = os.memfd_create(f"onnxslim-outputs-{number}", os.MFD_CLOEXEC)
        os.ftruncate(self.descriptor, size)
        self.memory = mmap.mmap(self.descriptor, size)

    def close(self) -> None:
        # The parent's mappings keep the memory they show: only ours goes.
        self.memory.close()
        os.close(self.descriptor)


class SharedPool:
    """The regions replies are written to. The parent maps a region per reply and says when its
    last array of that reply is gone (`release`); a region is written again only then."""

    KEEP = 4  # regions kept at most: enough for a reference and a candidate's outputs in turn

    def __init__(self):
        self.regions: dict[int, Region] = {}
        self.free: set[int] = set()
        self.numbers = itertools.count(1)

    def lease(self, size: int) -> Region:
        fitting = [self.regions[number] for number in self.free if self.regions[number].size >= size]
        if fitting:
            region = min(fitting, key=lambda region: region.size)
        else:
            region = Region(next(self.numbers), max(size, 1 << 20))
            self.regions[region.number] = region
            while len(self.regions) > self.KEEP:  # the oldest goes; its reader may still hold it
                self._drop(min(self.regions))
        self.free.discard(region.number)
        return region

    def release(self, numbers) -> None:
        self.free.update(number for number in numbers if number in self.regions)

    def _drop(self, number: int) -> None:
        self.regions.pop(number).close()
        self.free.discard(number)


def _layout(sizes: list[int]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // ALIGNMENT) * ALIGNMENT
    return offsets, end


def receive(sock: socket.socket, wait=None, on_region=None):
    """One message; `wait(sock)` is called before each blocking read (the parent's deadline and
    Ctrl-C handling live there); `on_region(mapping, number)` for a reply in shared memory, whose
    arrays are views of `mapping`."""
    head, descriptors = _read_header(sock, wait)
    try:
        length, count, shared, number = HEADER.unpack(head)
        sizes = [size for (size,) in LENGTH.iter_unpack(_read(sock, LENGTH.size * count, wait))]
        data = _read(sock, length, wait)
        import numpy as np  # both sides have numpy; the buffers become the arrays' memory without a copy

        if shared:
            if not descriptors:
                raise ChannelClosed
            import mmap

            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # one fault-in, not one per page
            region = mmap.mmap(descriptors[0], shared, flags=flags)
            if on_region is not None:
                on_region(region, number)
            offsets, _ = _layout(sizes)
            buffers = [np.frombuffer(region, np.uint8, count=size, offset=offset) for size, offset in zip(sizes, offsets)]
        else:
            buffers = []
            for size in sizes:
                buffer = np.empty(size, dtype=np.uint8)
                _read_into(sock, memoryview(buffer), wait)
                buffers.append(buffer)
    finally:
        for descriptor in descriptors:
            os.close(descriptor)  # a mapping outlives its descriptor
    return pickle.loads(data, buffers=buffers)


def _read_header(sock: socket.socket, wait) -> tuple[bytes, list[int]]:
    """The header, and the descriptor of the shared memory that came with its first byte."""
    if wait is not None:
        wait(sock)
    head, descriptors, _, _ = socket.recv_fds(sock, HEADER.size, 1)
    if not head:
        raise ChannelClosed
    if len(head) < HEADER.size:
        try:
            head += _read(sock, HEADER.size - len(head), wait)
        except BaseException:
            for descriptor in descriptors:
                os.close(descriptor)
            raise
    return head, descriptors


def read_message(reader):
    """One message from a buffered reader over the socket (the worker's side, which has no
    deadline). Out-of-band buffers arrive as bytes, read straight into place: onnxruntime takes
    model bytes only as `bytes`, and the arrays are inputs it only reads."""
    head = reader.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ChannelClosed
    length, count, _, _ = HEADER.unpack(head)  # requests never use shared memory
    sizes = [size for (size,) in LENGTH.iter_unpack(_exactly(reader, LENGTH.size * count))]
    data = _exactly(reader, length)
    return pickle.loads(data, buffers=[_exactly(reader, size) for size in sizes])


def _exactly(reader, size: int) -> bytes:
    data = reader.read(size)
    if len(data) < size:
        raise ChannelClosed
    return data


def _read(sock: socket.socket, size: int, wait) -> bytes:
    buffer = bytearray(size)
    _read_into(sock, memoryview(buffer), wait)
    return bytes(buffer)


def _read_into(sock: socket.socket, view: memoryview, wait) -> None:
    done = 0
    while done < len(view):
        if wait is not None:
            wait(sock)
        count = sock.recv_into(view[done:])
        if count == 0:
            raise ChannelClosed
        done += count


# ----------------------------------------------------------------------------- the worker


def serve(channel_fd: int, lifeline_fd: int, memory_limit: int) -> None:
    """Answer requests until the parent closes the channel or dies."""
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent decides (it kills us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_die_with_parent, args=(lifeline_fd,), daemon=True).start()
    sock = socket.socket(fileno=channel_fd)
    try:
        import numpy as np
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # fatal only; our stderr goes nowhere anyway
    except Exception as error:  # the parent reports it as our failure, in one line
        send(sock, ("failed", f"cannot import onnxruntime in the worker: {type(error).__name__}: {error}"))
        return
    if memory_limit > 0:
        _limit_memory(memory_limit)
    worker = Worker(ort, np)
    worker.warm_up()
    worker.loop(sock)


def _die_with_parent(lifeline_fd: int) -> None:
    # The parent holds the only write end and never writes: EOF means it is gone, even while the
    # main thread is inside onnxruntime.
    while os.read(lifeline_fd, 1):
        pass
    os._exit(ORPHANED)


def _limit_memory(limit: int) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


class Worker:
    """Sessions by handle; one request at a time."""

    def __init__(self, ort, np):
        self.ort, self.np = ort, np
        self.sessions: dict[int, object] = {}
        self.defaults: dict[int, dict] = {}
        self.bit_outputs: set[int] = set()  # sessions with an output of one of BIT_TYPES
        self.next_handle = 1
        self.pool = SharedPool() if hasattr(os, "memfd_create") else None

    def loop(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        while True:
            try:
                request = read_message(reader)
            except ChannelClosed:
                return
            except MemoryError:
                os._exit(OUT_OF_MEMORY_STATUS)
            for handle in request.get("close", ()):
                self.sessions.pop(handle, None)
                self.defaults.pop(handle, None)
                self.bit_outputs.discard(handle)
            if self.pool is not None:
                self.pool.release(request.get("released", ()))
            try:
                reply = ("ok", getattr(self, "do_" + request["op"])(**request["args"]))
            except MemoryError as error:
                reply = ("oom", str(error) or "MemoryError")
            except Exception as error:  # onnxruntime raises its own untyped errors
                text = f"{error}".strip() or type(error).__name__
                kind = "oom" if any(marker in text for marker in ALLOCATION_FAILURES) else request["op"]
                reply = (kind, text)
            try:
                send(sock, reply, pool=self.pool)
            except MemoryError:  # part of the reply may be on its way: the stream cannot be trusted
                os._exit(OUT_OF_MEMORY_STATUS)

    def warm_up(self) -> None:
        """onnxruntime's first sessions set up its environment and kernel registry, which takes
        time: done here, while the parent is still importing, not at its first fold or
        verification."""
        for _ in range(2):
            session = self.ort.InferenceSession(WARM_UP_MODEL, self._options(False, 1), providers=["CPUExecutionProvider"])
            session.run(None, {"x": self.np.ones(1, self.np.float32)})

    def _options(self, optimized: bool, threads: int):
        ort = self.ort
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 4
        if threads:
            options.intra_op_num_threads = threads
        return options

    def do_nothing(self):
        return None

    def do_load(self, source, optimized: bool, threads: int, defaults: dict):
        session = self.ort.InferenceSession(source, self._options(optimized, threads), providers=["CPUExecutionProvider"])
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.sessions[handle] = session
        self.defaults[handle] = defaults
        if any(value.type in BIT_TYPES for value in session.get_outputs()):
            self.bit_outputs.add(handle)
        return handle, [value.name for value in session.get_inputs()], [value.name for value in session.get_outputs()]

    def do_run(self, handle: int, names, feed: dict):
        session, feed = self.sessions[handle], self._feed(handle, feed)
        if handle not in self.bit_outputs:
            return session.run(names, feed)
        values = session.run_with_ort_values(names, feed)
        return [self._from_bits(value) if value.data_type() in BIT_TYPES else value.numpy() for value in values]

    def _feed(self, handle: int, feed: dict) -> dict:
        """bfloat16 and float8 arrays (ml_dtypes' types, which onnx uses) go over as OrtValues of
        their bits: onnxruntime's numpy bridge knows no such dtype."""
        feed = {**self.defaults[handle], **feed}
        for name, array in feed.items():
            dtype_name = getattr(getattr(array, "dtype", None), "name", "")
            onnx_type = BIT_TYPES.get(f"tensor({dtype_name})")
            if onnx_type is not None and dtype_name not in PACKED_BITS:
                bits = self.np.ascontiguousarray(array).view(self.np.uint16 if array.dtype.itemsize == 2 else self.np.uint8)
                feed[name] = self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_type)
        return feed

    def _from_bits(self, value):
        """An output of a type numpy's bridge cannot give, as ml_dtypes' array of its bits."""
        import ctypes

        import ml_dtypes  # onnx's own dependency, so there wherever onnxslim is

        np = self.np
        name = value.data_type()[len("tensor("):-1]
        dtype = np.dtype(getattr(ml_dtypes, name.replace("float8e", "float8_e")))
        shape = tuple(value.shape())
        count = 1
        for dim in shape:
            count *= dim
        bits = PACKED_BITS.get(name)
        size = -(-count * bits // 8) if bits else count * dtype.itemsize
        raw = np.frombuffer((ctypes.c_uint8 * size).from_address(value.data_ptr()), np.uint8) if count else \
            np.empty(0, np.uint8)
        if not bits:
            return raw.copy().view(dtype).reshape(shape)
        per_byte, mask = 8 // bits, (1 << bits) - 1
        unpacked = np.stack([(raw >> (bits * index)) & mask for index in range(per_byte)], axis=-1).ravel()[:count]
        numbers = unpacked.astype(np.int8)
        if name.startswith("int"):
            numbers = np.where(numbers >= 1 << (bits - 1), numbers - (1 << bits), numbers).astype(np.int8)
        return numbers.astype(dtype).reshape(shape)

    def do_time(self, handle: int, feed: dict, runs: int):
        session, feed = self.sessions[handle], self._feed(handle, feed)
        seconds = []
        for _ in range(runs):
            begin = time.perf_counter()
            session.run(None, feed)
            seconds.append(time.perf_counter() - begin)
        return seconds

    def do_peak_memory(self, path: str, feed: dict, runs: int):
        """Peak RSS growth while a 1-thread session is created from the file and run (Linux)."""
        status = "/proc/self/status"
        if not os.path.exists(status):
            raise OSError("no /proc/self/status on this system")
        try:
            # "5" resets VmHWM to the current RSS (Linux 4.0+): the peak of imports is forgotten.
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError as error:
            raise OSError(f"cannot reset the peak RSS ({error.strerror or error})") from error
        before = _status_kilobytes(status, "VmRSS")
        ort = self.ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feed)
        return (_status_kilobytes(status, "VmHWM") - before) * 1024


def _status_kilobytes(path: str, key: str) -> int:
    with open(path) as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"no {key} in {path}")


if __name__ == "__main__":
    # The folder of this file would shadow third-party modules (onnxslim has a model.py, ...).
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
