"""Is the code running inside a shapeless trace (``mx.compile(..., shapeless=True)``)?

A shapeless compile recomputes every node's output shape on every call
(``Primitive::output_shapes`` in mlx/compile.cpp's ``compile_replace``), and MLX
0.32.4 has no shape rule for ``CustomTransforms`` (anything made by
``mx.custom_function``) or for custom kernels, so a fused op's primitive inside such a
trace fails every call with "[Primitive::output_shapes] CustomTransforms cannot infer
output shapes." (docs/never-wrong.md). The fused ops ask `in_shapeless_trace()` and run
their unfused MLX code there instead.

MLX has no Python API for this, but one op behaves observably differently: a
reduction over size-1 axes is elided (the result *is* the input, the same buffer)
except during a shapeless trace, where the dimension may change and MLX keeps the
reduction (mlx/ops.cpp ``compute_reduce_shape``, "Fix shapeless compile eliding
reductions over size-1 dimensions", ml-explore/mlx#3672). The probe reduces a fixed,
already evaluated one-element CPU array: it depends on no traced value, so evaluating
it is allowed inside any trace, and it costs a few microseconds.
"""

from __future__ import annotations

import contextlib
import threading

import mlx.core as mx
import numpy as np

__all__ = ["in_shapeless_trace", "known_outside", "known_outside_now", "NOT_KNOWN"]

_PROBE = mx.zeros((1,), dtype=mx.float32, stream=mx.cpu)
mx.eval(_PROBE)
_PROBE_ADDRESS = np.asarray(_PROBE).__array_interface__["data"][0]


# Set while a fused module or function that probed False runs: its replays and children
# (a decode step calls dozens of fused ops and children per token) need not probe again.
_known = threading.local()


class known_outside:
    """``with known_outside(): ...`` -- code in the block is not in a shapeless trace."""

    __slots__ = ()

    def __enter__(self):
        _known.depth = getattr(_known, "depth", 0) + 1

    def __exit__(self, *exc):
        _known.depth -= 1


KNOWN_OUTSIDE = known_outside()
NOT_KNOWN = contextlib.nullcontext()  # the other branch of ``with (NOT_KNOWN if ... else KNOWN_OUTSIDE)``


def known_outside_now() -> bool:
    """Whether an enclosing fused call has already probed (and found no shapeless trace)."""
    return bool(getattr(_known, "depth", 0))


def in_shapeless_trace() -> bool:
    """True while a shapeless ``mx.compile`` (or shapeless export) traces the caller."""
    if getattr(_known, "depth", 0):
        return False
    reduced = mx.sum(_PROBE, axis=0, keepdims=True, stream=mx.cpu)
    # Elided: the probe itself (same buffer). Kept: a new array, evaluated by np.asarray.
    return np.asarray(reduced).__array_interface__["data"][0] != _PROBE_ADDRESS
