"""Linear + cross-entropy: ``nn.losses.cross_entropy(h @ W.T, targets)`` without the logits.

The loss head of a language model in training: h (tokens, D), the lm_head or tied embedding
W (V, D), V up to 128256. The unfused code writes the (tokens, V) logits, a shifted copy and,
in the backward, their softmax and gradient: several times the size of everything else at
a large vocabulary. The fused op runs over blocks of rows (ops/lce_chunks.py, like Liger
Kernel's FusedLinearCrossEntropy): per chunk ``z = h_c @ W.T`` (an MLX matmul), then the
per-row ``lse`` and loss (the `cross_entropy_rows` kernel on a GPU, MLX ops on the CPU). The
backward keeps h, W, the targets and the float32 lse per row, recomputes each chunk's logits
and gets ``dz = (softmax(z) - onehot(t)) * g`` (`cross_entropy_rows_backward`), then
``dh_c = dz @ W`` and ``dW += dz.T @ h_c`` (MLX matmuls).

The primitive's output is the per-row loss (reduction "none"); "mean" and "sum" are MLX ops
after it, so one backward (a per-row cotangent) serves every reduction and a graph match
needs only the per-row spelling. `DEFINITION` (at the end) is the op as the rest of
mlx-fusion sees it; docs/linear-cross-entropy.md has the design and measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..kernels import KernelSpec
from .base import FusedOp, OpCase, Spelling, Workload
from .common import FUSED_DTYPES, with_reference_rules
from . import lce_chunks
from .lce_chunks import backward_chunks, default_chunk_rows, forward_chunks, valid_targets, worth_chunking

__all__ = ["LinearCrossEntropy", "LINEAR_CROSS_ENTROPY", "FastCrossEntropy", "FAST_CROSS_ENTROPY",
           "linear_cross_entropy", "linear_cross_entropy_reference", "traceable_cross_entropy", "fast_cross_entropy",
           "DEFINITION"]

REDUCTIONS = ("none", "mean", "sum")


@dataclass(frozen=True)
class LinearCrossEntropy:
    """cross_entropy(h @ W.T, t) per row, computed in chunks of rows."""

    @property
    def name(self) -> str:
        return "linear+cross_entropy"


LINEAR_CROSS_ENTROPY = LinearCrossEntropy()


@dataclass(frozen=True)
class FastCrossEntropy:
    """A cross-entropy of logits that are not ``h @ W.T`` (a quantized lm_head, soft-capped logits)
    traced on a GPU: replayed as the `mx.fast.cross_entropy` the traced code called."""

    @property
    def name(self) -> str:
        return "cross_entropy"


FAST_CROSS_ENTROPY = FastCrossEntropy()


def linear_cross_entropy_reference(h, weight, targets, reduction: str = "none", upcast: bool = False):
    """``nn.losses.cross_entropy(h @ weight.T, targets, reduction=...)``, the logits cast to
    float32 first when `upcast`: the unfused code."""
    logits = h @ weight.T
    if upcast:
        logits = logits.astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets, reduction=reduction)


# --- the primitive ------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _primitive(chunk: int, upcast: bool):
    """(loss per row, lse per row float32) of (rows, D) h2, (V, D) w and valid int32 targets."""

    def parts(h2, w, t):  # what the primitive computes, as MLX code (jvp, vmap)
        t = mx.stop_gradient(t)  # class indices: no derivative (MLX's gather refuses one)
        z = h2 @ w.T
        z = z.astype(mx.float32) if upcast else z
        loss = nn.losses.cross_entropy(z, mx.maximum(t, 0))
        return mx.where(t >= 0, loss, float("nan")).astype(loss.dtype), mx.logsumexp(z.astype(mx.float32), axis=-1)

    @mx.custom_function
    def fused(h2, w, t):
        # stop_gradient: MLX's jvp must not trace into the chunks; `parts` stands for them.
        h2, w = mx.stop_gradient(h2), mx.stop_gradient(w)
        out_dtype = mx.float32 if upcast else h2.dtype
        return forward_chunks(h2, w, t, chunk, upcast, out_dtype)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h2, w, t = primals  # with the lse per row, all the backward keeps
        g = cotangents[0]
        if g is None:
            g = mx.zeros(outputs[0].shape, mx.float32)
        dh, dw = backward_chunks(h2, w, t, outputs[1], g, chunk, upcast)
        return dh, dw, mx.zeros_like(t)

    return with_reference_rules(fused, parts, outputs=2)


def _fusable(h, weight, targets) -> bool:
    return (isinstance(h, mx.array) and isinstance(weight, mx.array) and isinstance(targets, mx.array)
            and h.ndim >= 1 and weight.ndim == 2 and h.dtype in FUSED_DTYPES and weight.dtype == h.dtype
            and weight.shape[1] == h.shape[-1] and weight.shape[0] > 0
            and mx.issubdtype(targets.dtype, mx.integer) and targets.shape == h.shape[:-1])


def linear_cross_entropy(h: mx.array, weight: mx.array, targets: mx.array, reduction: str = "none",
                         chunk_size: Optional[int] = None, upcast: bool = False) -> mx.array:
    """``nn.losses.cross_entropy(h @ weight.T, targets, reduction=reduction)`` without
    materializing the logits: computed in chunks of rows, forward and backward.

    Args:
        h (array): hidden states ``(..., D)``.
        weight (array): ``(V, D)``, as ``nn.Linear.weight`` (an lm_head without bias) or an
            embedding matrix used ``as_linear``; the same dtype as ``h``.
        targets (array): integer class indices of shape ``h.shape[:-1]``.
        reduction (str): ``"none"``, ``"mean"`` or ``"sum"``. Default: ``"none"``.
        chunk_size (int, optional): rows per chunk. Default: rows whose logits take a
            bounded number of bytes in float32 (ops/lce_chunks.py, docs/linear-cross-entropy.md).
        upcast (bool): the logits are cast to float32 before the loss (the common spelling
            ``cross_entropy((h @ W.T).astype(mx.float32), t)``). Default: ``False``.

    Returns:
        array: what the unfused code returns: the loss per row (``targets``' shape) in the
        logits' dtype (float32 with ``upcast``), or its mean or sum. Anything else (other
        dtypes, shapes, float targets, no rows) runs the unfused code, with MLX's result or
        error. A target outside ``[-V, V)`` (MLX reads outside the row there) gives NaN.
    """
    if reduction not in REDUCTIONS or not _fusable(h, weight, targets) or h.size == 0:
        return linear_cross_entropy_reference(h, weight, targets, reduction, upcast)
    d, vocab = h.shape[-1], weight.shape[0]
    h2 = h.reshape(-1, d)
    rows = h2.shape[0]
    gpu = kernels.kernel_backend() is not None
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk = int(chunk_size) if chunk_size else default_chunk_rows(rows, vocab, gpu)
    if (chunk_size is None and not worth_chunking(rows, vocab, gpu)) or (not gpu and chunk >= rows):
        # The CPU: one chunk would hold every logit anyway, and small logits are not worth a
        # second GEMM; a GPU: MLX's own cross-entropy is the leaner and faster one (lce_chunks).
        # MLX's own code is the fused op there (docs/linear-cross-entropy.md).
        return linear_cross_entropy_reference(h, weight, targets, reduction, upcast)
    t = mx.stop_gradient(valid_targets(targets.reshape(-1), vocab))
    loss = _primitive(min(chunk, rows), bool(upcast))(h2, weight, t)[0].reshape(targets.shape)
    if reduction == "mean":
        return mx.mean(loss)
    return mx.sum(loss) if reduction == "sum" else loss


def traceable_cross_entropy(logits, targets):
    """`mx.fast.cross_entropy(logits, targets)` as exportable ops (float32 logsumexp minus the
    target's logit, float32): how graph/trace.py spells the fast op on a GPU, where
    `nn.losses.cross_entropy` calls it and `mx.export_function` cannot write it."""
    z = logits.astype(mx.float32)
    return mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, mx.expand_dims(targets, -1), axis=-1).squeeze(-1)


# --- the definition -----------------------------------------------------------------------------

def _reference_2d(h, w, t):
    return nn.losses.cross_entropy(h @ w.T, t)


def _reference_upcast(h, w, t):
    return nn.losses.cross_entropy((h @ w.T).astype(mx.float32), t)


def _reference_gpu(h, w, t):  # nn.losses.cross_entropy on a GPU, as traced (float32 logits: the same)
    return traceable_cross_entropy(h @ w.T, t)


def _reference_gpu_cast(h, w, t):  # the same for 16-bit logits: the float32 loss cast back
    return traceable_cross_entropy(h @ w.T, t).astype(h.dtype)


def _example(rank: int, source: Optional[mx.Dtype] = None):
    shape = (6, 8) if rank == 2 else (2, 3, 8)

    def example(dt):
        dt = source or dt
        return mx.zeros(shape, dt), mx.zeros((16, 8), dt), mx.zeros(shape[:-1], mx.int32)

    return example


def _builder(f32_math: bool):
    """build for the CPU spellings (f32_math False: the loss in the logits' dtype unless they were
    cast to float32) and the GPU ones (float32 math, the loss cast back to the logits' dtype)."""

    def build(m):
        h, w, t = m.args[:3]
        out = m.output
        if m.is_constant(h) or m.is_constant(w) or len(w.shape) != 2 or not h.shape:
            return None
        if tuple(t.shape) != tuple(h.shape[:-1]) or tuple(out.shape) != tuple(t.shape) or w.shape[1] != h.shape[-1]:
            return None
        if h.dtype != w.dtype or not mx.issubdtype(t.dtype, mx.integer):
            return None
        rows, vocab = int(out.size), int(w.shape[0])
        if not lce_chunks.worth_chunking(rows, vocab, kernels.kernel_backend() is not None):
            return None  # MLX's own code runs (linear_cross_entropy): small CPU logits, and GPUs
        upcast = h.dtype != mx.float32 and (f32_math or out.dtype == mx.float32)
        cast = out.dtype if upcast and out.dtype != mx.float32 else None
        # The size the legality check and the price see is the logits' (rows x V): what the op saves.
        return [h, w, t], {"upcast": upcast, "cast": cast, "size": rows * vocab}, []

    return build


def _fast_build(m):
    """build of the fast cross-entropy spellings: z (rows.., V) and its targets; GPU only (on the CPU
    the traced code is MLX's own decomposition, and nothing replaces it)."""
    z, t = m.args[:2]
    out = m.output
    if kernels.kernel_backend() is None or m.is_constant(z) or not z.shape or not mx.issubdtype(t.dtype, mx.integer):
        return None
    if tuple(t.shape) != tuple(z.shape[:-1]) or tuple(out.shape) != tuple(t.shape):
        return None
    upcast = z.dtype != mx.float32
    cast = out.dtype if upcast and out.dtype != mx.float32 else None
    return [z, t], {"fast": True, "upcast": upcast, "cast": cast, "size": int(z.size)}, []


def _fast_spellings():
    def example(rank, source=None):
        shape = (6, 16) if rank == 2 else (2, 3, 16)
        return lambda dt: (mx.zeros(shape, source or dt), mx.zeros(shape[:-1], mx.int32))

    out = []
    for rank in (3, 2):
        for src in (None, mx.bfloat16, mx.float16):
            out.append(Spelling(pattern=FAST_CROSS_ENTROPY, reference=traceable_cross_entropy, example=example(rank, src),
                                build=_fast_build, rule=FAST_CROSS_ENTROPY.name))
        out.append(Spelling(pattern=FAST_CROSS_ENTROPY, reference=lambda z, t: traceable_cross_entropy(z, t).astype(z.dtype),
                            example=example(rank), build=_fast_build, rule=FAST_CROSS_ENTROPY.name))
    return out


def _spellings():
    rule = LINEAR_CROSS_ENTROPY.name
    out = []
    for rank in (3, 2):
        def add(reference, source=None, f32_math=False):
            out.append(Spelling(pattern=LINEAR_CROSS_ENTROPY, reference=reference, example=_example(rank, source),
                                build=_builder(f32_math), rule=rule))

        add(_reference_2d)
        for src in (mx.bfloat16, mx.float16):  # (h @ W.T).astype(float32): its root is float32
            add(_reference_upcast, src)
        # The GPU's spellings (mx.fast.cross_entropy as graph/trace.py spells it), traced on any device.
        add(_reference_gpu, f32_math=True)
        for src in (mx.bfloat16, mx.float16):
            add(_reference_gpu, src, f32_math=True)
        add(_reference_gpu_cast, f32_math=True)
    return out + _fast_spellings()


def _cast(y, p):
    return y.astype(p["cast"]) if p.get("cast") is not None else y


def fast_cross_entropy(z, t):
    """`mx.fast.cross_entropy` on a GPU; its traced spelling elsewhere (what a CPU trace replays)."""
    return mx.fast.cross_entropy(z, t) if kernels.kernel_backend() is not None else traceable_cross_entropy(z, t)


def _call(ins, p):
    if p.get("fast"):
        return [_cast(fast_cross_entropy(ins[0], ins[1]), p)]
    return [_cast(linear_cross_entropy(ins[0], ins[1], ins[2], upcast=p.get("upcast", False)), p)]


def _reference_call(ins, p):
    if p.get("fast"):
        return [_cast(traceable_cross_entropy(ins[0], ins[1]), p)]
    return [_cast(linear_cross_entropy_reference(ins[0], ins[1], ins[2], upcast=p.get("upcast", False)), p)]


def _inputs(case, shape, dtype, key):
    """[h (tokens, D), W (V, D)] for shape (tokens, D, V) (the workload's); a shape of another
    length (the registry tests' elementwise shapes) is h's, with V = 3 D + 1. The targets are
    the case's own (case_targets)."""
    hshape, v = ((shape[0], shape[1]), shape[2]) if len(shape) == 3 else (shape, 3 * shape[-1] + 1)
    d = hshape[-1]
    k1, k2 = mx.random.split(key)
    h = mx.random.normal(hshape, key=k1).astype(dtype)
    w = (mx.random.normal((v, d), key=k2) * (d ** -0.5)).astype(dtype)
    return [h, w]


def case_targets(h, w) -> mx.array:
    """The registry case's targets, a function of the shapes: the registry tests differentiate
    every input, and class indices have no gradient."""
    rows = h.size // h.shape[-1]
    return ((mx.arange(rows) * 7919 + 3) % w.shape[0]).reshape(h.shape[:-1]).astype(mx.int32)


def _case_chunk(h) -> Optional[int]:
    """Small inputs (the registry tests') run in three chunks, so the chunked code runs on the CPU
    too; benchmark sizes take the default."""
    rows = h.size // h.shape[-1]
    return max(1, -(-rows // 3)) if rows <= 64 else None


def _defaults(gpu: bool, quick: bool = False) -> list:
    """(tokens, D, V): a small head, and the llama-3 training head (4 x 1024 tokens, 2048, 128256)."""
    if quick:
        return [(256, 256, 8192)]
    return [(1024, 2048, 32000), (4096, 2048, 128256)] if gpu else [(256, 256, 8192), (512, 64, 32000)]


TOKENS_D_V = Workload(
    shape_for_size=lambda n: (max(1, n // 8192), 256, 8192),  # n logits elements
    output_size=lambda s: s[0] * s[2],
    copy_size=lambda s: s[0] * s[2],
    flops=lambda s: 2.0 * s[0] * s[1] * s[2],
    default_shapes=_defaults, own_shapes=True)


def _cases():
    return [OpCase(LINEAR_CROSS_ENTROPY.name, "linear_cross_entropy", LINEAR_CROSS_ENTROPY,
                   lambda h, w: linear_cross_entropy(h, w, case_targets(h, w), chunk_size=_case_chunk(h)),
                   lambda h, w: linear_cross_entropy_reference(h, w, case_targets(h, w)), _inputs, TOKENS_D_V)]


def _fast_inputs(case, shape, dtype, key):
    """[z] of `shape` (the targets are the case's own, as for linear+cross_entropy)."""
    return [mx.random.normal(tuple(shape), key=key).astype(dtype)]


def _fast_targets(z):
    rows = z.size // z.shape[-1]
    return ((mx.arange(rows) * 7919 + 3) % z.shape[-1]).reshape(z.shape[:-1]).astype(mx.int32)


def _case_for(pattern):
    if pattern != FAST_CROSS_ENTROPY and pattern != FAST_CROSS_ENTROPY.name:
        return None
    return OpCase(FAST_CROSS_ENTROPY.name, "linear_cross_entropy", FAST_CROSS_ENTROPY,
                  lambda z: fast_cross_entropy(z, _fast_targets(z)),
                  lambda z: traceable_cross_entropy(z, _fast_targets(z)), _fast_inputs)


DEFINITION = FusedOp(
    name="linear_cross_entropy", order=4, node_op="FusedLinearCrossEntropy", spellings=_spellings,
    call=_call, reference_call=_reference_call, cases=_cases, case_for=_case_for,
    flops=lambda node: 2.0 * node.inputs[0].size * node.inputs[1].shape[0],
    kernels=(
        # lse and loss (float32) per row of a logits chunk (rows, V) and its int32 targets; one
        # threadgroup/block per row, online max/sum over V.
        KernelSpec("cross_entropy_rows", ("logits", "t"), ("lse", "loss"), elementwise=False,
                   ensure_row_contiguous=True),
        # dlogits = (exp(logits - lse) - [j == t]) * g in T; one threadgroup/block per row.
        KernelSpec("cross_entropy_rows_backward", ("logits", "t", "lse", "g"), ("dlogits",), elementwise=False,
                   ensure_row_contiguous=True),
    ),
    doc="cross_entropy(h @ W.T, t) per row: FusedLinearCrossEntropy(h, W, t), params {pattern, upcast, cast, size}; "
        "h (..., D), W (V, D), t integer h.shape[:-1]. On a GPU also a cross-entropy of other logits as "
        "mx.fast.cross_entropy: FusedLinearCrossEntropy(z, t), params {pattern, fast, upcast, cast, size}.")
