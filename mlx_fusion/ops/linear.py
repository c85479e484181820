"""Fused linear layer: act(x @ weight.T + bias) as one custom primitive.

Forward: MLX's GEMM with the bias in its epilogue (`mx.addmm`), then one
activation kernel over the GEMM output (scalar_activation with scale 1, shift
0). The pre-activation is returned as a hidden second output so the backward
pass reuses it instead of recomputing the product.

Backward: one kernel for dz = g * act'(z), then MLX matmuls for dx = dz @ W
and dW = dz.T @ x, and a reduction for the bias gradient.

With no activation there is nothing to add to MLX: `mx.addmm` already fuses the
bias into the GEMM, so that is what runs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Union

import mlx.core as mx

from .. import kernels
from ..patterns import Activation, as_activation
from .common import activation_grad, cpu_compile, f32, is_fusable_dtype, promote, tangents_for
from .elementwise import _params, launch_scalar, launch_scalar_backward

__all__ = ["fused_linear", "linear_reference"]


def linear_reference(x, weight, bias=None, activation=None) -> mx.array:
    """act(x @ weight.T + bias) computed by MLX op by op."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    act = as_activation(activation, allow_none=True)
    return act.reference(y) if act is not None else y


@lru_cache(maxsize=None)
def _linear_primitive(act: Activation, has_bias: bool):
    # ReLU's derivative can be read off its output (z > 0 exactly where y > 0),
    # so the backward keeps only y, which the next layer holds anyway; other
    # activations keep the pre-activation z as a hidden second output.
    keep_z = act is not Activation.RELU

    def preactivation(x, w, *b):
        # The bias rides in the GEMM (MLX's addmm: an axpby epilogue on Metal,
        # cuBLASLt's bias epilogue on CUDA), so the epilogue kernel is one pass.
        return mx.addmm(b[0], x, w.T) if has_bias else x @ w.T

    def outputs_of(y, z):
        return (y, z) if keep_z else y

    def parts(x, w, *b):
        z = preactivation(x, w, *b)
        return outputs_of(act.reference(z), z)

    # CPU: the activation in float32, as the kernels compute it; mx.compile
    # fuses it into one loop over the GEMM output.
    def cpu_parts(x, w, *b):
        z = preactivation(x, w, *b)
        return outputs_of(act.reference(f32(z)).astype(z.dtype), z)

    def dz_of(t, g):  # t is z, or y for relu
        return (f32(g) * activation_grad(act, f32(t))).astype(t.dtype)

    cpu_forward = cpu_compile(cpu_parts, act)
    cpu_dz = mx.compile(dz_of)
    identity = _params(1.0, 0.0, act)

    @mx.custom_function
    def fused(x, w, *b):
        if kernels.kernel_backend() is None:
            return cpu_forward(x, w, *b)
        z = preactivation(x, w, *b)
        # stop_gradient: MLX's jvp must not trace into the kernel (it has none);
        # this function's own rules stand for it.
        return outputs_of(launch_scalar(act, mx.stop_gradient(z), identity), z)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        x, w = primals[0], primals[1]
        if keep_z:
            g, t = cotangents[0], outputs[1]
        else:
            g, t = (c[0] if isinstance(c, (list, tuple)) else c for c in (cotangents, outputs))
        if kernels.kernel_backend() is None:
            dz = cpu_dz(t, g)
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
