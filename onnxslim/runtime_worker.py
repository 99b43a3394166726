"""The onnxruntime worker process (see onnxslim/runtime.py, which starts it) and the wire format
both sides speak.

Run as a script, not imported as part of the package: the worker needs only the standard library,
numpy and onnxruntime, and importing `onnxslim` would cost it a second of onnx and graphsurgeon
imports. So this file imports nothing from onnxslim.

Wire format, both ways, on a Unix stream socket: a header of two little-endian uint64 (pickle
length, number of buffers), the buffer lengths (uint64 each), the pickle (protocol 5) and
then each out-of-band buffer's raw bytes. numpy arrays and model bytes travel out of band, so
neither side copies them into a pickle; the receiver reads each straight into a fresh array.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct("<QQ")
LENGTH = struct.Struct("<Q")
# A larger socket buffer means fewer wake-ups per megabyte of activations (the kernel caps it).
SOCKET_BUFFER_BYTES = 4 << 20
# onnxruntime's message when an allocation fails (its BFCArena and CPU allocator say so).
ALLOCATION_FAILURES = ("Failed to allocate memory", "bad_alloc", "std::bad_alloc")
# Exit status of a worker whose parent is gone (it had nobody to answer).
ORPHANED = 0
# Exit status of a worker that ran out of memory where it could not answer (a half-read request).
OUT_OF_MEMORY_STATUS = 75


class ChannelClosed(Exception):
    """The other end of the socket is gone (a clean end of stream)."""


def send(sock: socket.socket, message) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    head = HEADER.pack(len(data), len(views)) + b"".join(LENGTH.pack(view.nbytes) for view in views)
    sock.sendall(head + data)
    for view in views:
        sock.sendall(view)


def receive(sock: socket.socket, wait=None):
    """One message; `wait(sock)` is called before each blocking read (the parent's deadline and
    Ctrl-C handling live there)."""
    length, count = HEADER.unpack(_read(sock, HEADER.size, wait))
    sizes = [size for (size,) in LENGTH.iter_unpack(_read(sock, LENGTH.size * count, wait))]
    data = _read(sock, length, wait)
    import numpy as np  # both sides have numpy; the buffers become the arrays' memory without a copy

    buffers = []
    for size in sizes:
        buffer = np.empty(size, dtype=np.uint8)
        _read_into(sock, memoryview(buffer), wait)
        buffers.append(buffer)
    return pickle.loads(data, buffers=buffers)


def read_message(reader):
    """One message from a buffered reader over the socket (the worker's side, which has no
    deadline). Out-of-band buffers arrive as bytes, read straight into place: onnxruntime takes
    model bytes only as `bytes`, and the arrays are inputs it only reads."""
    head = reader.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ChannelClosed
    length, count = HEADER.unpack(head)
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
    Worker(ort, np).loop(sock)


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
        self.next_handle = 1

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
            try:
                reply = ("ok", getattr(self, "do_" + request["op"])(**request["args"]))
            except MemoryError as error:
                reply = ("oom", str(error) or "MemoryError")
            except Exception as error:  # onnxruntime raises its own untyped errors
                text = f"{error}".strip() or type(error).__name__
                kind = "oom" if any(marker in text for marker in ALLOCATION_FAILURES) else request["op"]
                reply = (kind, text)
            try:
                send(sock, reply)
            except MemoryError:  # part of the reply may be on its way: the stream cannot be trusted
                os._exit(OUT_OF_MEMORY_STATUS)

    def do_nothing(self):
        return None

    def do_load(self, source, optimized: bool, threads: int, defaults: dict):
        ort = self.ort
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 4
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.sessions[handle] = session
        self.defaults[handle] = defaults
        return handle, [value.name for value in session.get_inputs()], [value.name for value in session.get_outputs()]

    def do_run(self, handle: int, names, feed: dict):
        return self.sessions[handle].run(names, {**self.defaults[handle], **feed})

    def do_time(self, handle: int, feed: dict, runs: int):
        session, feed = self.sessions[handle], {**self.defaults[handle], **feed}
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
