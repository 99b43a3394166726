"""Per-op channel handlers, by op type: what an op does with the channels its inputs carry.

A handler takes the analysis (tracker.Analysis), the node and what is known of each input's
channel axis (None where nothing is), and passes channels on to the node's outputs, records the
tensors to cut, or freezes the groups it cannot follow. An op with no handler freezes every group
it reads. The handlers live in layer_handlers.py (layers that own channels), channel_handlers.py
(ops that act per channel, join or divide them) and shape_handlers.py (ops that move the axis).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_graphsurgeon as gs

from .records import Channels
from .tracker import Analysis

Handler = Callable[[Analysis, gs.Node, list[Channels | None]], None]
HANDLERS: dict[str, Handler] = {}


def handles(*ops: str) -> Callable[[Handler], Handler]:
    """Register the decorated handler for `ops` (each op has one handler)."""
    def register(handler: Handler) -> Handler:
        for op in ops:
            if op in HANDLERS:
                raise ValueError(f"two channel handlers for {op}")
            HANDLERS[op] = handler
        return handler
    return register
