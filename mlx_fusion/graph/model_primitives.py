"""Interpreter entries for the primitives language models add to a trace.

`mx.fast` ops (RoPE, ScaledDotProductAttention, CrossEntropy) arrive as
primitives on a GPU and decomposed on the CPU; the MoE matmuls (GatherMM,
GatherQMM) and quantized matmuls arrive as primitives everywhere. Each entry is
``fn(inputs, params) -> list[mx.array]`` like the rest of `interpreter.PRIMITIVES`;
param layouts are MLX 0.32's ``state()`` exports (fast_primitives.h,
primitives.h) with null fields dropped.
"""

from __future__ import annotations

import mlx.core as mx

__all__ = ["QMODES", "rope", "sdpa", "attention_logsumexp", "cross_entropy", "gather_mm", "gather_qmm",
           "quantized_matmul", "rms_norm_vjp", "layer_norm_vjp", "sdpa_vjp"]

QMODES = ("affine", "mxfp4", "mxfp8", "nvfp4")  # QuantizationMode


def rope(ins, p):
    """RoPE [dims, traditional, base, scale, forward]; inputs x, offset[, freqs].

    The inverse (``forward=False``, only in gradients) rotates by the negated
    angle, which is the forward rotation with the scale negated.
    """
    dims, traditional, base, scale, forward = p
    freqs = ins[2] if len(ins) > 2 else None
    return [mx.fast.rope(ins[0], dims, traditional=traditional, base=None if freqs is not None else base,
                         scale=scale if forward else -scale, offset=ins[1], freqs=freqs)]


def attention_logsumexp(q, k, scale, mask=None, sinks=None, causal=False):
    """The per-query log-sum-exp of the attention logits, float32, (B, Hq, L, 1).

    What ScaledDotProductAttention's second output holds when MLX traces it for
    a gradient (cuDNN's softmax statistics, natural log): the masked, scaled
    scores with the sink logit, reduced over the keys.
    """
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    q = (q.astype(mx.float32) * scale).reshape(b, hk, hq // hk, lq, d)
    scores = q @ k.astype(mx.float32)[:, :, None].swapaxes(-1, -2)  # (B, Hk, R, L, Lk)
    scores = scores.reshape(b, hq, lq, lk)
    if causal:  # bottom-right aligned, as MLX's causal mask
        mask = mx.arange(lk - lq, lk)[:, None] >= mx.arange(lk)[None]
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask.astype(mx.float32)
    if sinks is not None:
        sink = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, hq, 1, 1), (b, hq, lq, 1))
        scores = mx.concatenate([sink, scores], axis=-1)
    return mx.logsumexp(scores, axis=-1, keepdims=True)


def sdpa(ins, p):
    """ScaledDotProductAttention [scale, causal, has_sinks, logsumexp, force_fused].

    Inputs q, k, v[, mask][, sinks]; a causal node carries no mask input. With
    ``logsumexp`` (a trace taken under a gradient on CUDA) the node has a
    second output, the softmax statistics; only MLX's own attention VJP reads
    it, so in a replayed graph it is normally dead and never evaluated.
    """
    scale, causal, has_sinks, logsumexp = p[:4]
    force_fused = bool(p[4]) if len(p) > 4 else False
    q, k, v, rest = ins[0], ins[1], ins[2], list(ins[3:])
    sinks = rest.pop() if has_sinks else None
    array_mask = rest[0] if rest else None
    mask = array_mask if array_mask is not None else ("causal" if causal else None)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks,
                                               force_fused=force_fused)
    if not logsumexp:
        return [out]
    return [out, attention_logsumexp(q, k, scale, array_mask, sinks, causal and array_mask is None)]


def cross_entropy(ins, p):
    """CrossEntropy []: inputs logits, targets; float32 loss shaped like targets."""
    return [mx.fast.cross_entropy(ins[0], ins[1])]


def gather_mm(ins, p):
    """GatherMM [left_sorted, right_sorted]; inputs a, b, lhs_indices, rhs_indices.

    MLX sets a sorted flag only when one index array was given and the other
    defaulted (``mx.gather_mm(..., sorted_indices=True)``); the flag selects the
    sorted kernels and VJP, so the replay passes the indices the same way.
    """
    a, b = ins[:2]
    lhs, rhs = (mx.stop_gradient(i) for i in ins[2:])  # see index_primitives.indices
    left_sorted, right_sorted = p
    if right_sorted:
        return [mx.gather_mm(a, b, rhs_indices=rhs, sorted_indices=True)]
    if left_sorted:
        return [mx.gather_mm(a, b, lhs_indices=lhs, sorted_indices=True)]
    return [mx.gather_mm(a, b, lhs, rhs)]


def gather_qmm(ins, p):
    """GatherQMM [group_size, bits, mode, transpose, left_sorted, right_sorted].

    Inputs x, w, scales[, biases (affine only)], lhs_indices, rhs_indices.
    """
    group_size, bits, mode, transpose, left_sorted, right_sorted = p
    x, w, scales = ins[:3]
    biases = ins[3] if len(ins) == 6 else None
    lhs, rhs = mx.stop_gradient(ins[-2]), mx.stop_gradient(ins[-1])
    kw = dict(transpose=transpose, group_size=group_size, bits=bits, mode=QMODES[mode])
    if right_sorted:
        return [mx.gather_qmm(x, w, scales, biases, rhs_indices=rhs, sorted_indices=True, **kw)]
    if left_sorted:
        return [mx.gather_qmm(x, w, scales, biases, lhs_indices=lhs, sorted_indices=True, **kw)]
    return [mx.gather_qmm(x, w, scales, biases, lhs_indices=lhs, rhs_indices=rhs, **kw)]


def quantized_matmul(ins, p):
    """QuantizedMatmul [group_size, bits, mode, transpose]; inputs x, w, scales[, biases]."""
    group_size, bits, mode, transpose = p
    x, w, scales = ins[:3]
    biases = ins[3] if len(ins) > 3 else None
    return [mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size,
                                bits=bits, mode=QMODES[mode])]


# -- the backward halves: in a trace only when the traced function itself takes a gradient on a GPU.
# A missing norm weight/bias is a 0-d placeholder input (a real one is 1-D); its gradient is zeros.
def rms_norm_vjp(ins, p):
    """RMSNormVJP [eps]; inputs x, w, cotangent; outputs dx, dw (zeros for a placeholder w)."""
    x, w, g = ins
    if w.ndim == 0:
        _, (dx,) = mx.vjp(lambda x: mx.fast.rms_norm(x, None, p[0]), [x], [g])
        return [dx, mx.zeros_like(w)]
    _, (dx, dw) = mx.vjp(lambda x, w: mx.fast.rms_norm(x, w, p[0]), [x, w], [g])
    return [dx, dw]


def layer_norm_vjp(ins, p):
    """LayerNormVJP [eps]; inputs x, w, b, cotangent; outputs dx, dw, db."""
    x, w, b, g = ins
    present = [a for a in (w, b) if a.ndim != 0]

    def norm(x, *wb):
        it = iter(wb)
        return mx.fast.layer_norm(x, next(it) if w.ndim else None, next(it) if b.ndim else None, p[0])

    _, grads = mx.vjp(norm, [x, *present], [g])
    grads = iter(grads)
    dx = next(grads)
    return [dx] + [next(grads) if a.ndim else mx.zeros_like(a) for a in (w, b)]


def sdpa_vjp(ins, p):
    """ScaledDotProductAttentionVJP [scale, causal, has_sinks]; outputs dq, dk, dv.

    Inputs are the forward's (q, k, v[, mask][, sinks]), then its output, its
    log-sum-exp and the cotangent; the gradient is MLX's own through the forward.
    """
    scale, causal, has_sinks = p[:3]
    primals, g = list(ins[:-3]), ins[-1]
    sinks = primals.pop() if has_sinks else None
    mask = primals[3] if len(primals) > 3 else ("causal" if causal else None)
    attend = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    _, grads = mx.vjp(attend, primals[:3], [g])
    return list(grads)
