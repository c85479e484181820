"""Fused linear layer: act(x @ weight.T + bias) as one custom primitive.

Forward, on a GPU:
- few rows (M <= SMALL_M_ROWS, half/bfloat16, K % 8 == 0: decoding, small
  batches): one kernel, `linear_activation`, a GEMM whose epilogue adds the
  bias and applies the activation (tensor-core tiles on CUDA).
- otherwise MLX's GEMM with the bias in its epilogue (`mx.addmm`, cuBLASLt),
  then one elementwise pass for the activation (see `_mlx_epilogue` for which).
The pre-activation is returned as a hidden second output (except for ReLU) so
the backward pass reuses it instead of recomputing the product.

Backward: one kernel for dz = g * act'(z), then MLX matmuls for dx = dz @ W
and dW = dz.T @ x, and a reduction for the bias gradient.

With no activation there is nothing to add to MLX: `mx.addmm` already fuses the
bias into the GEMM, so that is what runs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional, Union

import mlx.core as mx

from .. import kernels
from ..patterns import Activation, as_activation
from .common import (activation_grad, cpu_compile, f32, is_fusable_dtype, promote, relu_grad_from_output,
                     tangents_for)
from .elementwise import _params, launch_scalar, launch_scalar_backward

__all__ = ["fused_linear", "linear_reference", "SMALL_M_ROWS"]

# Largest row count sent to the small-M kernel (at most 32: two 16-row tiles).
# On an H100 (bf16, K = 4096, docs/performance.md) it beat mx.compile's
# addmm + activation up to M = 32 and lost at M = 64, where cuBLASLt's tiles
# reuse the weight better. MLX_FUSION_SMALL_M overrides it (0 turns it off).
SMALL_M_ROWS = int(os.environ.get("MLX_FUSION_SMALL_M", "32"))
# 8-column tiles per block of 8 warps, by 16-row tiles: measured best on the
# H100 (M = 32, N = 4096: 28.3 us with 4, 43.6 us with 2; M <= 16: 2 is best).
SMALL_M_COLUMN_TILES = {1: 2, 2: 4}


def small_m_eligible(m: int, k: int, dtype: mx.Dtype) -> bool:
    return 0 < m <= min(SMALL_M_ROWS, 32) and k % 8 == 0 and dtype in (mx.float16, mx.bfloat16)


def launch_linear(act: Activation, x: mx.array, w: mx.array, b: Optional[mx.array], p: mx.array):
    """(act(z), z) with z = x @ w.T + b, in one kernel; x is (M, K) with M <= 32."""
    m, n = x.shape[0], w.shape[0]
    mt = 1 if m <= 16 else 2
    nt = SMALL_M_COLUMN_TILES[mt]
    blocks = -(-n // (8 * nt))
    return kernels.get_kernel("linear_activation")(
        inputs=[x, w, b if b is not None else x, p],
        output_shapes=[(m, n), (m, n)],
        output_dtypes=[x.dtype, x.dtype],
        grid=(blocks * 256, 1, 1),
        threadgroup=(256, 1, 1),
        template=[("T", x.dtype), ("MT", mt), ("NT", nt), ("HAS_BIAS", b is not None)],
    )


def linear_reference(x, weight, bias=None, activation=None) -> mx.array:
    """act(x @ weight.T + bias) computed by MLX op by op."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    act = as_activation(activation, allow_none=True)
    return act.reference(y) if act is not None else y


def _mlx_epilogue() -> bool:
    """Large M on a GPU: activation and its derivative as MLX's own compiled
    elementwise code (True) or as the mlx-fusion kernels (False)?

    Both are one pass over the GEMM output, but MLX can write an elementwise
    result into a dying input's buffer and a custom kernel always allocates:
    in a compiled 6-layer training step that was 1344 vs 2112 MiB peak on an
    H100 (docs/performance.md). MLX_FUSION_LINEAR_EPILOGUE=kernel selects the
    kernels (measuring; or where no g++ makes mx.compile a no-op on the CPU)."""
    return os.environ.get("MLX_FUSION_LINEAR_EPILOGUE", "mlx") != "kernel"


@lru_cache(maxsize=None)
def _linear_primitive(act: Activation, has_bias: bool):
    # ReLU's derivative can be read off its output (z > 0 exactly where y > 0),
    # so the backward keeps only y, which the next layer holds anyway; other
    # activations keep the pre-activation z as a hidden second output. This is
    # where a fused training step saves memory: the unfused graph keeps both.
    keep_z = act is not Activation.RELU

    def preactivation(x, w, *b):
        # The bias rides in the GEMM (MLX's addmm: an axpby epilogue on Metal,
        # cuBLASLt's bias epilogue on CUDA), so the epilogue is one pass.
        return mx.addmm(b[0], x, w.T) if has_bias else x @ w.T

    def outputs_of(y, z):
        return (y, z) if keep_z else y

    def parts(x, w, *b):
        z = preactivation(x, w, *b)
        return outputs_of(act.reference(z), z)

    # MLX's own elementwise code (the CPU path, and the GPU path at large M);
    # mx.compile fuses each into one loop. The forward activation runs in the
    # input dtype, as the unfused expression computes it: where the step is not
    # compiled (and on the CPU under autodiff, where the inner compile is
    # skipped) float32 temporaries here would live until the backward pass
    # (bf16 MLP on the CPU: 2x the unfused eager peak). ReLU's derivative is
    # read off y exactly in any dtype; the others are taken in float32, like
    # the kernels: their closed forms cancel badly in bfloat16.
    def mlx_parts(x, w, *b):
        z = preactivation(x, w, *b)
        return outputs_of(act.reference(z), z)

    def dz_of(t, g):  # t is z
        return (f32(g) * activation_grad(act, f32(t))).astype(t.dtype)

    mlx_forward = cpu_compile(mlx_parts, act)
    mlx_dz = mx.compile(dz_of) if keep_z else relu_grad_from_output
    identity = _params(1.0, 0.0, act)

    @mx.custom_function
    def fused(x, w, *b):
        backend = kernels.kernel_backend()
        if backend is not None and small_m_eligible(x.shape[0], x.shape[1], x.dtype):
            # stop_gradient: MLX's jvp must not trace into the kernel (it has
            # none); this function's own rules stand for it.
            inputs = [mx.stop_gradient(t) for t in (x, w, *b)]
            y, z = launch_linear(act, inputs[0], inputs[1], inputs[2] if has_bias else None, identity)
            return outputs_of(y, z)
        if backend is None or _mlx_epilogue():
            return mlx_forward(x, w, *b)
        z = preactivation(x, w, *b)
        return outputs_of(launch_scalar(act, mx.stop_gradient(z), identity), z)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        x, w = primals[0], primals[1]
        if keep_z:
            g, t = cotangents[0], outputs[1]
        else:
            g, t = (c[0] if isinstance(c, (list, tuple)) else c for c in (cotangents, outputs))
        if kernels.kernel_backend() is None or _mlx_epilogue():
            dz = mlx_dz(t, g)
        else:
            dz = launch_scalar_backward(act, t, identity, g)
        grads = (dz @ w, dz.T @ x)
        if has_bias:
            grads += (dz.sum(axis=0).astype(primals[2].dtype),)
        return grads

    @fused.jvp
    def fused_jvp(primals, tangents):
        out = mx.jvp(parts, list(primals), tangents_for(primals, tangents))[1]
        return list(out)

    @fused.vmap
    def fused_vmap(inputs, axes):
        out = mx.vmap(parts, in_axes=tuple(axes))(*inputs)
        return (list(out), [0, 0]) if keep_z else (out, 0)

    return fused, keep_z


def _empty_linear(x, weight, bias, act, dtype):
    """An empty product (M, N or K = 0) without a GEMM: its sum over K is zero.
    (MLX 0.32.4's CUDA matmul crashes on some empty operands.)"""
    y = mx.zeros((*x.shape[:-1], weight.shape[0]), dtype)
    if bias is not None:
        y = y + bias
    return act.reference(y) if act is not None else y


def fused_linear(
    x: mx.array,
    weight: mx.array,
    bias: Optional[mx.array] = None,
    activation: Union[str, Activation, None] = None,
) -> mx.array:
    """``act(x @ weight.T + bias)`` as one fused primitive.

    Args:
        x (array): input of shape ``(..., in)``; any number of leading dims.
        weight (array): ``(out, in)``, the layout of ``nn.Linear.weight``.
        bias (array, optional): ``(out,)``. Default: ``None``.
        activation (str or Activation, optional): as in :func:`fused_binary`,
            or ``None`` for no activation. Default: ``None``.

    Returns:
        array: ``(..., out)``, the same values as the unfused expression.
    """
    act = as_activation(activation, allow_none=True)
    arrays = [x, weight] + ([bias] if bias is not None else [])
    if not all(isinstance(t, mx.array) for t in arrays):
        raise TypeError("fused_linear: x, weight and bias must be mx.array")
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.ndim > 1):
        return linear_reference(x, weight, bias, act)  # MLX raises its own shape error, or broadcasts
    out_features = weight.shape[0]
    if bias is not None and bias.size not in (1, out_features):
        return linear_reference(x, weight, bias, act)
    dtype = promote(*(t.dtype for t in arrays))
    if not all(is_fusable_dtype(t.dtype) for t in arrays):
        return linear_reference(x, weight, bias, act)
    if x.size == 0 or weight.size == 0:
        return _empty_linear(x, weight, bias, act, dtype)
    if act is None:
        if bias is None:
            return x @ weight.T
        return mx.addmm(bias, x, weight.T)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    args = [x2, weight]
    if bias is not None:
        args.append(bias if bias.shape == (out_features,) else mx.broadcast_to(bias, (out_features,)))
    args = [t.astype(dtype) if t.dtype != dtype else t for t in args]
    prim, keep_z = _linear_primitive(act, bias is not None)
    y = prim(*args)
    y = y[0] if keep_z else y
    return y.reshape(*lead, out_features)
