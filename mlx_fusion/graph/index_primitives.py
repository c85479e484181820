"""Interpreter entries for the indexing primitives: Gather, Scatter, MaskedScatter.

Each is ``fn(inputs, params) -> list[mx.array]`` like the rest of
`interpreter.PRIMITIVES`, rebuilt from Python advanced indexing.
"""

from __future__ import annotations

import mlx.core as mx

__all__ = ["indices", "full_index", "gather", "scatter", "masked_scatter"]


def indices(x):
    """Index operands never carry a gradient.

    The trace loses `mx.stop_gradient` (export drops it as a no-op), and MLX
    refuses a VJP through gather indices computed from differentiable values
    (MoE routing: take_along_axis(scores, argpartition(scores))).
    """
    return mx.stop_gradient(x)


def full_index(idx, axes, slice_sizes, ndim):
    """Gather/Scatter's index arrays as plain advanced indexing.

    One broadcast index array per source axis, shaped
    (*index_shape, *slice_sizes): index + offset on the indexed axes, the
    offset alone on the others.
    """
    ishape = idx[0].shape if idx else ()
    n, index = len(ishape), []
    for d in range(ndim):
        offs = mx.arange(slice_sizes[d]).reshape((1,) * (n + d) + (slice_sizes[d],) + (1,) * (ndim - d - 1))
        if d in axes:
            ind = idx[axes.index(d)].reshape(ishape + (1,) * ndim)
            offs = ind + offs.astype(ind.dtype)
        index.append(offs)
    return tuple(index)


def gather(ins, p):
    """Gather [axes, slice_sizes]; inputs src and one index array per axis in `axes`."""
    src, idx = ins[0], [indices(i) for i in ins[1:]]
    axes, slice_sizes = list(p[0]), tuple(p[1])
    if axes == [0] and slice_sizes[0] == 1 and tuple(slice_sizes[1:]) == src.shape[1:]:
        # Embedding lookups: take rows, keep the unit slice dim of Gather.
        return [mx.expand_dims(mx.take(src, idx[0], axis=0), idx[0].ndim)]
    return [src[full_index(idx, axes, slice_sizes, src.ndim)]]


def masked_scatter(ins, p):
    """MaskedScatter []: inputs dst, mask (dst's shape), src, with a leading batch axis.

    ``a[mask] = v`` traces with a batch of one (ExpandDims before, Squeeze
    after); assigning the unbatched arrays the same way rebuilds that node.
    """
    dst, mask, src = ins
    out = mx.array(dst[0])
    out[indices(mask[0])] = src[0].reshape(-1)  # consumed in row-major order
    return [out[None]]


# Scatter::ReduceType {Max, Min, Sum, Prod, None}; None assigns.
_SCATTER = {0: "maximum", 1: "minimum", 2: "add", 3: "multiply"}


def scatter(ins, p):
    """Scatter [reduce, axes]; inputs src, one index array per axis, updates.

    The updates are shaped (*index_shape, *slice_sizes), which `full_index` indexes exactly.
    """
    reduce_type, axes = p[0], list(p[1])
    src, idx, updates = ins[0], [indices(i) for i in ins[1:-1]], ins[-1]
    n = idx[0].ndim if idx else 0
    index = full_index(idx, axes, updates.shape[n:], src.ndim)
    if reduce_type == 4:
        out = mx.array(src)  # a fresh handle, as interpreter._slice_update does
        out[index] = updates
        return [out]
    return [getattr(src.at[index], _SCATTER[reduce_type])(updates)]
