"""onnxruntime out of process: every session that touches a user's model lives in a worker.

A model can crash onnxruntime (SIGFPE from an int64 division overflow), hang it (a Loop with no
trip count and no condition) or make it allocate terabytes; none of that may take onnxslim down
with it, print onnxruntime's own log lines, or ignore Ctrl-C. So one worker process, started
lazily (`start()` early lets its onnxruntime import overlap our own work) and reused across
calls, holds the sessions by handle; onnxslim's process never imports onnxruntime.

Limits: each call (a load or a run) has a time limit, ONNXSLIM_RUN_TIMEOUT seconds (default 300);
the worker's address space is limited to ONNXSLIM_MEMORY_LIMIT (bytes, or with a K/M/G/T suffix;
default the machine's physical memory; 0: none). A crash, a time-out or an allocation failure
raises RuntimeCrash, RuntimeTimeout or RuntimeOutOfMemory (exit 2: the model's fault); the
caller that ran a model of our making turns it into a failed verification or a fold not taken.
The next call starts a new worker; sessions of the old one reload themselves from their source.
Ctrl-C while waiting kills the worker and raises KeyboardInterrupt at once.

`import onnxslim` starts the worker (start_early): a fresh process would otherwise wait for it
at its first fold or verification, which would be most of a small model's optimize().
So this module imports only the standard library at the top.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import RuntimeCrash, RuntimeOutOfMemory, RuntimeTimeout, VerificationUnavailable, WorkerFailure
from .runtime_worker import OUT_OF_MEMORY_STATUS, SOCKET_BUFFER_BYTES, ChannelClosed, receive, send
from .text import first_line, human_bytes

if TYPE_CHECKING:  # imported where used: `import onnxslim` starts the worker before its heavy imports
    import numpy as np
    import onnx

TIME_LIMIT_VARIABLE = "ONNXSLIM_RUN_TIMEOUT"
MEMORY_LIMIT_VARIABLE = "ONNXSLIM_MEMORY_LIMIT"
DEFAULT_TIME_LIMIT = 300.0
WORKER_SCRIPT = str(Path(__file__).with_name("runtime_worker.py"))
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
SIGNAL_MEANINGS = {
    signal.SIGFPE: "an arithmetic fault, such as an integer division overflow",
    signal.SIGSEGV: "an invalid memory access",
    signal.SIGBUS: "an invalid memory access",
    signal.SIGABRT: "onnxruntime aborted",
    signal.SIGILL: "an illegal instruction",
    signal.SIGKILL: "killed from outside, most likely because the system ran out of memory",
}


class OnnxRuntimeMessage(Exception):
    """onnxruntime's own error text, raised in the worker (the cause of a VerificationUnavailable)."""


def time_limit() -> float:
    text = os.environ.get(TIME_LIMIT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIME_LIMIT
    try:
        seconds = float(text)
    except ValueError:
        raise WorkerFailure(f"{TIME_LIMIT_VARIABLE}={text!r} is not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise WorkerFailure(f"{TIME_LIMIT_VARIABLE}={text!r} must be a positive number of seconds")
    return seconds


def memory_limit() -> int:
    """The worker's address-space limit in bytes (0: none)."""
    text = os.environ.get(MEMORY_LIMIT_VARIABLE, "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return physical_memory()
    unit = text[-1] if text[-1] in UNITS else ""
    try:
        value = float(text[: len(text) - len(unit)])
    except ValueError:
        raise WorkerFailure(f"{MEMORY_LIMIT_VARIABLE}={text!r} is not a size like 8G") from None
    if not value >= 0 or value == float("inf"):
        raise WorkerFailure(f"{MEMORY_LIMIT_VARIABLE}={text!r} must be a size like 8G (0: no limit)")
    return int(value * UNITS[unit])


def physical_memory() -> int:
    """This machine's memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


# ----------------------------------------------------------------------------- the worker process


class _Worker:
    """One worker process: the socket to it and the lifeline it watches for our death."""

    def __init__(self, memory: int):
        self.memory = memory
        self.owner = os.getpid()
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                end.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        lifeline_read, self.lifeline = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, WORKER_SCRIPT, str(theirs.fileno()), str(lifeline_read), str(memory)],
                pass_fds=(theirs.fileno(), lifeline_read),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # onnxruntime's log lines must never reach the user's terminal; errors come back as replies.
                stderr=subprocess.DEVNULL,
                # Ctrl-C in a terminal goes to the foreground process group: only we should get it.
                start_new_session=True,
            )
        except OSError as error:
            ours.close()
            os.close(self.lifeline)
            raise WorkerFailure(f"cannot start onnxruntime's worker process: {error}") from error
        finally:
            theirs.close()
            os.close(lifeline_read)
        self.sock = ours

    def stop(self) -> int | None:
        """Kill the process (if still running), reap it and return its exit status."""
        if self.owner != os.getpid():  # a forked child's copy: the process is its parent's
            return None
        try:
            self.process.kill()
        except OSError:
            pass
        status = self.process.wait()
        self.sock.close()
        try:
            os.close(self.lifeline)
        except OSError:
            pass
        return status

    def ended(self) -> int:
        """The exit status of a worker whose end of the socket closed (it is exiting or gone)."""
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return self.stop()


class _Expired(Exception):
    """A call's deadline passed."""


_lock = threading.RLock()
_worker: _Worker | None = None
_generation = 0  # of the current worker: a session made in another one must reload
_closed: list[tuple[int, int]] = []  # (generation, handle) of sessions garbage-collected since the last call
_released: list[tuple[int, int]] = []  # (generation, region) of shared memory whose arrays are all gone


def start() -> None:
    """Start the worker if it is not running, without waiting for it."""
    with _lock:
        _current()


def start_early() -> None:
    """start() for `import onnxslim`: the worker's onnxruntime import then overlaps onnx's and
    onnx-graphsurgeon's in ours. A failure here (a bad limit in the environment, no process to
    be had) is raised again, typed, by the first call that needs the worker, not by an import."""
    try:
        start()
    except WorkerFailure:
        pass


def shutdown() -> None:
    """Stop the worker (sessions reload into a new one if used again)."""
    global _worker
    with _lock:
        if _worker is not None:
            _worker.stop()
            _worker = None


atexit.register(shutdown)


def worker_pid() -> int | None:
    """The running worker's process id (None: none is running)."""
    with _lock:
        return _worker.process.pid if _worker is not None and _worker.owner == os.getpid() else None


def _current() -> _Worker:
    global _worker, _generation
    memory = memory_limit()
    if _worker is not None and (_worker.owner != os.getpid() or _worker.memory != memory):
        shutdown()
    if _worker is None:
        _worker = _Worker(memory)
        _generation += 1
    return _worker


def _call(op: str, label: str, action: str, **args):
    """Send one request and return its result; the worker's failures become typed errors."""
    global _worker
    seconds = time_limit()
    deadline = time.monotonic() + seconds
    with _lock:
        worker = _current()
        closed, released = _drain(_closed), _drain(_released)

        def wait(sock: socket.socket) -> None:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Expired
                # Bounded waits: Ctrl-C is acted on within a second even where a signal does not
                # interrupt select (a non-main thread never gets one; the main thread does).
                if select.select([sock], [], [], min(remaining, 1.0))[0]:
                    return

        try:
            worker.sock.settimeout(seconds)
            send(worker.sock, {"op": op, "args": args, "close": closed, "released": released})
            reply = receive(worker.sock, wait, functools.partial(_watch_region, _generation))
        except (_Expired, socket.timeout):
            worker.stop()
            _worker = None
            raise RuntimeTimeout(
                f"onnxruntime did not finish {action} the {label} within {seconds:g} s "
                f"(a Loop that never ends?); {TIME_LIMIT_VARIABLE}=SECONDS sets the limit"
            ) from None
        except (ChannelClosed, BrokenPipeError, ConnectionResetError):
            status = worker.ended()
            _worker = None
            raise _death(status, label, action, worker.memory) from None
        except BaseException:  # Ctrl-C, or anything that leaves the stream half read: start afresh
            worker.stop()
            _worker = None
            raise
    kind, value = reply
    if kind == "ok":
        return value
    if kind == "oom":
        raise RuntimeOutOfMemory(f"onnxruntime ran out of memory {action} the {label}{_limit_note(worker.memory)}"
                                 f"{_allocation(value)}")
    if kind == "failed":
        shutdown()
        raise WorkerFailure(value)
    verb = "load" if kind == "load" else "run"
    raise VerificationUnavailable(f"onnxruntime cannot {verb} the {label}: {first_line(value)}") \
        from OnnxRuntimeMessage(value)


def _drain(items: list[tuple[int, int]]) -> list[int]:
    """The current worker's entries, taken out one by one: a finalizer may append meanwhile."""
    current = []
    while items:
        generation, value = items.pop()
        if generation == _generation:
            current.append(value)
    return current


def _watch_region(generation: int, mapping, number: int) -> None:
    """When the last array of a reply in shared memory is gone, its region may be written again."""
    weakref.finalize(mapping, _released.append, (generation, number))


def _death(status: int, label: str, action: str, memory: int) -> Exception:
    if status == OUT_OF_MEMORY_STATUS:
        return RuntimeOutOfMemory(f"onnxruntime ran out of memory {action} the {label}{_limit_note(memory)}")
    if status is not None and status < 0:
        number = -status
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
        meaning = SIGNAL_MEANINGS.get(number)
        return RuntimeCrash(f"onnxruntime crashed {action} the {label} ({name}"
                            f"{': ' + meaning if meaning else ''}); the model cannot run as it is")
    return WorkerFailure(f"onnxruntime's worker process ended with status {status} {action} the {label}")


def _allocation(text: str) -> str:
    """What failed to allocate, from onnxruntime's message (its arena names the size in bytes)."""
    match = re.search(r"buffer of size (\d+)", text)
    return f": an allocation of {human_bytes(int(match.group(1)), '.1f')} failed" if match else ""


def _limit_note(memory: int) -> str:
    if not memory:
        return ""
    return f" (limit {human_bytes(memory, '.1f')}; {MEMORY_LIMIT_VARIABLE} sets it)"


# ----------------------------------------------------------------------------- sessions


class Session:
    """An onnxruntime CPU session in the worker: graph optimizations off unless `optimized`.

    `model` is a ModelProto (serialized for the worker; one of EXTERNAL_DATA_THRESHOLD bytes or
    more is staged to a temporary file with external data, as protobuf cannot hold it), model
    bytes, or a path. `defaults` are feeds kept in the worker and merged under every run's feed
    (weights fed as inputs travel once, not at every run). Errors name the model by `label`.
    """

    def __init__(self, model: onnx.ModelProto | bytes | str | os.PathLike, *, label: str = "model",
                 optimized: bool = False, threads: int = 0, defaults: dict[str, np.ndarray] | None = None):
        import onnx

        from .model import EXTERNAL_DATA_THRESHOLD, model_bytes, save

        self.label = label
        self._staging = None
        if isinstance(model, onnx.ModelProto):
            if model_bytes(model) < EXTERNAL_DATA_THRESHOLD:
                model = model.SerializeToString()
            else:
                self._staging = tempfile.TemporaryDirectory(prefix="onnxslim-runtime-")
                model = save(model, Path(self._staging.name) / "model.onnx", external_data=True)
        self._source = str(model) if isinstance(model, (str, os.PathLike)) else model
        self._options = {"optimized": optimized, "threads": threads, "defaults": dict(defaults or {})}
        self._generation = 0
        self._handle = 0
        self._load()

    def _load(self) -> None:
        source = self._source if isinstance(self._source, str) else pickle.PickleBuffer(self._source)
        with _lock:
            handle, self.input_names, self.output_names = _call(
                "load", self.label, "loading", source=source, **self._options
            )
            self._handle, self._generation = handle, _generation

    def _ready(self) -> int:
        """The session's handle in the current worker, reloading it there if the worker restarted."""
        _current()
        if self._generation != _generation:
            self._load()
        return self._handle

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """onnxruntime's InferenceSession.run, in the worker: the outputs `names` (None: all)."""
        with _lock:
            return _call("run", self.label, "running", handle=self._ready(), names=names, feed=feed)

    def seconds(self, feed: dict[str, np.ndarray], runs: int = 1) -> list[float]:
        """The time of each of `runs` runs, measured in the worker (no transfer of outputs)."""
        with _lock:
            return _call("time", self.label, "running", handle=self._ready(), feed=feed, runs=runs)

    def __del__(self):
        # Not a request of its own: a collection can happen in the middle of another one.
        if getattr(self, "_handle", 0) and _closed is not None:  # None: the interpreter is exiting
            _closed.append((self._generation, self._handle))


def peak_memory(path: str | os.PathLike, feed: dict[str, np.ndarray], runs: int, *, label: str) -> int:
    """Bytes the RSS of a fresh worker grows by while it creates a 1-thread session (optimizations
    on) from the file and runs it `runs` times: a process of its own, so no other model's heap
    counts. Linux only (/proc); elsewhere VerificationUnavailable says why."""
    global _worker, _generation
    with _lock:
        saved, saved_generation = _worker, _generation
        _worker = None
        try:
            return _call("peak_memory", label, "running", path=str(path), feed=feed, runs=runs)
        finally:
            if _worker is not None:
                _worker.stop()
            _worker, _generation = saved, saved_generation
