"""Small text helpers every layer uses for messages and reports: an error's first line, a byte
count for people, figures made safe for JSON.

Standard library only: onnxslim.runtime imports this before anything heavy (see its docstring).
"""

from __future__ import annotations

import math

# An error's first line is cut to this many characters: onnxruntime's messages can carry a whole
# graph dump on one line, and the CLI prints one line.
FIRST_LINE_LIMIT = 400
BYTE_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def first_line(error: BaseException | str, limit: int | None = FIRST_LINE_LIMIT) -> str:
    """The first line of an error's message (or of a text), at most `limit` characters (None: all).
    An exception without a message is named by its type, an empty text is 'unknown error'."""
    text = str(error).strip()
    if not text:
        text = type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    line = text.splitlines()[0]
    return line if limit is None else line[:limit]


def human_bytes(count: float, figure: str = ".3g") -> str:
    """A byte count in the largest binary unit it fills (KiB, MiB, ...), its number formatted by
    `figure` (".3g": '1.5 GiB'; ".1f": '1.0 GiB'); under a KiB, whole bytes."""
    for unit in BYTE_UNITS:
        if count < 1024 or unit == BYTE_UNITS[-1]:
            return f"{count:.0f} bytes" if unit == "bytes" else f"{count:{figure}} {unit}"
        count /= 1024
    return ""


def json_safe(value):
    """`value` with every non-finite float as its text ('inf', 'nan'; JSON has no such numbers)
    and tuples as lists, through dicts and lists."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
