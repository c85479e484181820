"""Whether this thread is inside a `mlx_fusion` trace.

While `fuse` captures a function, fused objects (and fused ops) that the
function calls must run as plain MLX ops: a nested trace cannot run inside
``mx.export_function``, and a fused op's ``custom_function`` cannot be exported
("Unable to get state for primitive CustomTransforms"). They read this flag:

    from mlx_fusion._tracing import tracing
    if tracing():
        return reference(*inputs)   # the unfused MLX ops
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["tracing", "trace_scope"]

_local = threading.local()


def tracing() -> bool:
    """True while this thread traces a function for `fuse`."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def trace_scope():
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
