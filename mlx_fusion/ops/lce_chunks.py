"""The chunked algorithm of linear + cross-entropy (ops/linear_cross_entropy.py): forward and
backward over blocks of rows, so the (rows, V) logits exist one chunk at a time.

Per chunk the logits are an MLX matmul (``h_c @ W.T``, the reference's own GEMM and dtype);
the row statistics and the logits' gradient come from the `cross_entropy_rows` kernels on a
GPU and from MLX ops on the CPU. In the backward the chunks are chained with `mx.depends` (chunk
c + 1 starts only after chunk c's dh and dW are done), so MLX's evaluation order cannot hold
every chunk's gradient at once, whatever order the caller evaluates the outputs in.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import mlx.core as mx

from .. import kernels
from .common import f32

__all__ = ["default_chunk_rows", "forward_chunks", "backward_chunks", "valid_targets", "worth_chunking",
           "CHUNK_BYTES", "MIN_CHUNK_ROWS", "CPU_MIN_LOGITS_BYTES"]

# A chunk of logits in float32 takes at most this many bytes (GPU; CPU), unless that is fewer
# than MIN_CHUNK_ROWS rows. GPU: 256 MiB is 523 rows at a 128256 vocabulary, enough rows for
# the GEMMs to run near peak, while each chunk's dW update (a read and write of the float32
# (V, D) accumulator) stays a small part of the chunk's GEMM time. CPU: MLX allocates the
# outputs of the next ~10 ops before the earlier ones finish, so about 8 chunks' worth of
# (chunk, V) arrays are alive at once (measured); a small chunk keeps that small, and the
# CPU's GEMMs lose little at 32 rows (docs/linear-cross-entropy.md).
CHUNK_BYTES = {"gpu": 256 << 20, "cpu": 4 << 20}
# MLX_FUSION_LCE_CHUNK_MIB overrides both (for measuring, as MLX_FUSION_GPU_VECTORS in ops/common.py).
if os.environ.get("MLX_FUSION_LCE_CHUNK_MIB"):
    CHUNK_BYTES = {k: int(float(os.environ["MLX_FUSION_LCE_CHUNK_MIB"]) * 2**20) for k in CHUNK_BYTES}
# On the CPU logits below this (in float32) run MLX's own code: the chunked op saves little
# there and its recomputed GEMM makes it slower (docs/linear-cross-entropy.md).
CPU_MIN_LOGITS_BYTES = 32 << 20
MIN_CHUNK_ROWS = 32


def default_chunk_rows(rows: int, vocab: int, gpu: bool) -> int:
    budget = CHUNK_BYTES["gpu" if gpu else "cpu"]
    c = max(MIN_CHUNK_ROWS, budget // (4 * max(vocab, 1)))
    c = c // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS
    return max(1, min(rows, c))


# On a CUDA GPU MLX's own cross-entropy (nn.losses.cross_entropy calls mx.fast.cross_entropy
# there) already keeps only the logits, and MLX allocates every chunk's buffers when the graph is
# encoded, so chunking bounds nothing: measured on the H200, the chunked op ran the llama-3 head
# at 0.37x the time and 14.8x the peak memory of MLX's (docs/linear-cross-entropy.md). A GPU runs
# MLX's code unless a chunk_size is given; MLX_FUSION_LCE_GPU=1 chunks there too (for measuring).
GPU_CHUNKS_BY_DEFAULT = os.environ.get("MLX_FUSION_LCE_GPU") == "1"


def worth_chunking(rows: int, vocab: int, gpu: bool) -> bool:
    """Whether the chunked op pays here: on a GPU not by default (GPU_CHUNKS_BY_DEFAULT), on the
    CPU only for logits of at least CPU_MIN_LOGITS_BYTES in float32."""
    return GPU_CHUNKS_BY_DEFAULT if gpu else 4 * rows * vocab >= CPU_MIN_LOGITS_BYTES


def valid_targets(t: mx.array, vocab: int) -> mx.array:
    """int32 targets in [0, V), or -1 where there is no such class. MLX's take_along_axis
    wraps an index in [-V, 0) to index + V; beyond [-V, V) it reads outside the row (another
    row's logit, or memory past the array): the fused op gives NaN there instead."""
    t = t.astype(mx.int64) if t.dtype in (mx.uint32, mx.uint64, mx.int64) else t.astype(mx.int32)
    w = mx.where(t < 0, t + vocab, t)
    return mx.where((w >= 0) & (w < vocab), w, -1).astype(mx.int32)


def _logits(h_c: mx.array, w: mx.array, upcast: bool, gpu: bool) -> mx.array:
    """The chunk's logits in the reference's dtype; cast to float32 for `upcast` only on the CPU
    (the kernels read them as float32 anyway: the same numbers, without a float32 copy)."""
    z = h_c @ w.T
    return z.astype(mx.float32) if upcast and not gpu else z


# --- the row statistics: kernels (GPU) or MLX ops (CPU) --------------------------------------

def _threads(vocab: int) -> int:
    return min(1024, max(32, -(-vocab // 32) * 32)) if vocab < 256 else 256


def _rows_kernel(z: mx.array, t: mx.array) -> Tuple[mx.array, mx.array]:
    rows, v = z.shape
    tg = _threads(v)
    lse, loss = kernels.get_kernel("cross_entropy_rows")(
        inputs=[z, t], output_shapes=[(rows,), (rows,)], output_dtypes=[mx.float32, mx.float32],
        grid=(rows * tg, 1, 1), threadgroup=(tg, 1, 1), template=[("T", z.dtype)])
    return lse, loss


def _rows_backward_kernel(z, t, lse, g, out_dtype) -> mx.array:
    rows, v = z.shape
    tg = _threads(v)
    return kernels.get_kernel("cross_entropy_rows_backward")(
        inputs=[z, t, lse, g], output_shapes=[(rows, v)], output_dtypes=[out_dtype],
        grid=(rows * tg, 1, 1), threadgroup=(tg, 1, 1), template=[("T", out_dtype)])[0]


def _rows_mlx(z: mx.array, t: mx.array) -> Tuple[mx.array, mx.array]:
    """(lse float32, loss in z's dtype): the loss exactly as nn.losses.cross_entropy computes it
    on the CPU (shift by the max, logsumexp and the pick in z's dtype); lse for the backward."""
    m = mx.max(z, axis=-1, keepdims=True)
    s = z - m
    lse_s = mx.logsumexp(s, axis=-1)
    picked = mx.take_along_axis(s, mx.maximum(t, 0)[:, None], axis=-1).squeeze(-1)
    loss = mx.where(t >= 0, lse_s - picked, mx.array(float("nan"), z.dtype))
    return f32(m.squeeze(-1)) + f32(lse_s), loss


@mx.compile
def _rows_backward_mlx(z, t, lse, g):
    """(exp(z - lse) - onehot(t)) * g in float32 (compiled: one pass on the CPU)."""
    lse = mx.where(t >= 0, lse, float("nan"))
    p = mx.exp(f32(z) - lse[:, None])
    hit = mx.arange(z.shape[-1], dtype=mx.int32)[None, :] == t[:, None]
    return (p - hit.astype(mx.float32)) * g[:, None]


# --- forward and backward over the chunks -------------------------------------------------

def _bounds(rows: int, chunk: int):
    return [(s, min(rows, s + chunk)) for s in range(0, rows, chunk)]


def _after(x: mx.array, prev: mx.array) -> mx.array:
    """x, computed only after `prev`: a select whose condition reads prev (NaN-proof: both
    branches are x). Not mx.depends in the forward: Depends has no vmap rule, and MLX's vmap
    walks into a custom_function's forward. Without the ordering, MLX evaluated the chunks'
    matmuls ahead of their row statistics (2.5x the peak memory, measured on the CPU)."""
    return mx.where(prev[:1] == prev[:1], x, x)


def forward_chunks(h2: mx.array, w: mx.array, t: mx.array, chunk: int, upcast: bool,
                   out_dtype: mx.Dtype) -> Tuple[mx.array, mx.array]:
    """(loss per row in out_dtype, lse per row in float32) for (rows, D) h2, (V, D) w and valid
    int32 targets t (rows,)."""
    gpu = kernels.kernel_backend() is not None
    losses: List[mx.array] = []
    lses: List[mx.array] = []
    for s, e in _bounds(h2.shape[0], chunk):
        h_c = h2[s:e] if not lses else _after(h2[s:e], lses[-1])
        z = _logits(h_c, w, upcast, gpu)
        lse, loss = _rows_kernel(z, t[s:e]) if gpu else _rows_mlx(z, t[s:e])
        losses.append(loss.astype(out_dtype))
        lses.append(lse)
    if len(losses) == 1:
        return losses[0], lses[0]
    return mx.concatenate(losses), mx.concatenate(lses)


@mx.compile
def _accumulate(acc: mx.array, part: mx.array) -> mx.array:
    """acc + float32(part) as one pass over the (V, D) accumulator (compiled: not a cast, then an add)."""
    return acc + part.astype(mx.float32)


def backward_chunks(h2: mx.array, w: mx.array, t: mx.array, lse: mx.array, g: mx.array, chunk: int,
                    upcast: bool) -> Tuple[mx.array, mx.array]:
    """(dh2, dw) for the per-row cotangent g; recomputes each chunk's logits. dw is accumulated
    in float32 over the chunks and rounded to w's dtype once."""
    gpu = kernels.kernel_backend() is not None
    g = f32(g)
    dhs: List[mx.array] = []
    dw: Optional[mx.array] = None
    for s, e in _bounds(h2.shape[0], chunk):
        h_c = h2[s:e] if dw is None else mx.depends(h2[s:e], [dhs[-1], dw])
        z = _logits(h_c, w, upcast, gpu)
        if gpu:
            dz = _rows_backward_kernel(z, t[s:e], lse[s:e], g[s:e], h2.dtype)
        else:
            dz = _rows_backward_mlx(z, t[s:e], lse[s:e], g[s:e]).astype(h2.dtype)
        dhs.append(dz @ w)
        if h2.dtype == mx.float32:
            dw = dz.T @ h_c if dw is None else mx.addmm(dw, dz.T, h_c)
        else:
            part = dz.T @ h_c
            dw = f32(part) if dw is None else _accumulate(dw, part)
    dh = dhs[0] if len(dhs) == 1 else mx.concatenate(dhs)
    return dh, dw.astype(w.dtype)
