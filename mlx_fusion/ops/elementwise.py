"""Fused elementwise primitives: act(a op b) and act(x * scale + shift).

Each public op is one `mx.custom_function` whose forward runs one kernel
(Metal or CUDA, from metal_src/) and whose vjp runs one fused backward kernel
(activation derivative times cotangent, plus the operand gradients). On the
CPU, where MLX has no custom-kernel API, forward and backward are the same
math as MLX expressions under `mx.compile`, which fuses them into one loop.

Inputs MLX cannot fuse here (integer, bool, complex, float64 dtypes; empty
arrays) run the unfused reference, so results are always what MLX would give.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Union

import mlx.core as mx

from .. import kernels
from ..patterns import Activation, BinaryOp, as_activation, as_binary_op
from .common import (
    activation_grad,
    as_array,
    binary_operand_grads,
    f32,
    flat1d,
    launch_geometry,
    is_fusable_dtype,
    promote,
    relu_grad_from_output,
    sum_to_shape,
    with_reference_rules,
    cpu_compile,
)

__all__ = ["fused_binary", "fused_scalar", "binary_reference", "scalar_reference"]

Number = Union[int, float]
FUSABLE = frozenset((mx.float32, mx.float16, mx.bfloat16))


# --- references (the unfused MLX expressions) ----------------------------------

def binary_reference(a, b, op="add", activation="relu") -> mx.array:
    """act(a op b) computed by MLX op by op: the ground truth for fused_binary."""
    return as_activation(activation).reference(as_binary_op(op).reference(a, b))


def scalar_reference(x, scale=1.0, shift=0.0, activation="relu") -> mx.array:
    """act(x * scale + shift) computed by MLX op by op: the ground truth for fused_scalar."""
    return as_activation(activation).reference(x * scale + shift)


# --- act(a op b) ---------------------------------------------------------------

def _operand(x: mx.array, work_shape) -> mx.array:
    """A one-element operand is passed as shape (1,) and read once by the
    kernel; any other is broadcast to the output shape as a stride-0 view."""
    if x.size == 1 and x.size != _prod(work_shape):
        return x.reshape(1)
    if tuple(x.shape) != tuple(work_shape):
        return mx.broadcast_to(x, work_shape)
    return x


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _run(name: str, inputs, output_shapes, dtype: mx.Dtype, n: int):
    """Launch kernel `name` over n elements; every output has the compute dtype."""
    grid, group = launch_geometry(n, dtype)
    return kernels.get_kernel(name)(
        inputs=inputs,
        output_shapes=output_shapes,
        output_dtypes=[dtype] * len(output_shapes),
        grid=grid,
        threadgroup=group,
        template=[("T", dtype)],
    )


def launch_binary(op: BinaryOp, act: Activation, a: mx.array, b: mx.array, out_shape) -> mx.array:
    """Run the binary_activation kernel; a and b share the output dtype."""
    work = tuple(out_shape) or (1,)
    ak, bk = _operand(a, work), _operand(b, work)
    out = _run("binary_activation", [ak, bk, _mode(op, act)], [work], a.dtype, _prod(work))[0]
    return out.reshape(out_shape) if work != tuple(out_shape) else out


def launch_binary_backward(op: BinaryOp, act: Activation, a, b, g, out_shape):
    """Full-shape (da, db) of act(a op b) for cotangent g, in one kernel."""
    work = tuple(out_shape) or (1,)
    ak, bk = _operand(a, work), _operand(b, work)
    gk = flat1d(g.astype(a.dtype) if g.dtype != a.dtype else g)
    if tuple(gk.shape) != work:
        gk = mx.broadcast_to(gk, work)
    two = op in (BinaryOp.MUL, BinaryOp.DIV)
    da, db = _run("binary_activation_backward", [ak, bk, gk, _mode(op, act)],
                  [work, work if two else (1,)], a.dtype, _prod(work))
    if work != tuple(out_shape):
        da, db = da.reshape(out_shape), (db.reshape(out_shape) if two else db)
    return da, (db if two else None)


@lru_cache(maxsize=None)
def _mode(op: BinaryOp, act: Activation) -> mx.array:
    """(op, activation) codes for the kernel, made once per pair: the kernels
    switch on them at run time, so one JIT-compiled kernel per dtype serves all."""
    m = mx.array([op.code, act.code], dtype=mx.int32)
    mx.eval(m)
    return m


@lru_cache(maxsize=None)
def _binary_primitive(op: BinaryOp, act: Activation):
    def reference(a, b):
        return act.reference(op.reference(a, b))

    # CPU: the kernels' math as MLX expressions, in float32 like the kernels
    # (half-precision cancellation in e.g. 1 + tanh(u) would zero gradients);
    # mx.compile fuses each into one loop, so the casts cost no memory traffic.
    def cpu_forward(a, b):
        return reference(f32(a), f32(b)).astype(a.dtype)

    cpu_forward = cpu_compile(cpu_forward, act)

    @mx.compile
    def cpu_backward(a, b, g):
        # Like the kernel: add/sub return dz alone (one output to write).
        a32, b32 = f32(a), f32(b)
        dz = f32(g) * activation_grad(act, op.reference(a32, b32))
        if op in (BinaryOp.ADD, BinaryOp.SUB):
            return dz.astype(a.dtype), None
        return tuple(d.astype(a.dtype) for d in binary_operand_grads(op, dz, a32, b32))

    @mx.custom_function
    def fused(a, b):
        if kernels.kernel_backend() is None:
            return cpu_forward(a, b)
        # stop_gradient keeps MLX's jvp from tracing into the kernel (which has
        # no jvp of its own); this function's custom rules stand for it.
        return launch_binary(op, act, mx.stop_gradient(a), mx.stop_gradient(b),
                             mx.broadcast_shapes(a.shape, b.shape))

    # add/sub + ReLU: relu'(a op b) is read off the output (z > 0 exactly where
    # y > 0), so the backward reads y and g instead of a, b and g.
    relu_from_output = act is Activation.RELU and op in (BinaryOp.ADD, BinaryOp.SUB)
    relu_params = _params(1.0, 0.0, act) if relu_from_output else None

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        a, b = primals
        if relu_from_output:
            if kernels.kernel_backend() is None:
                da, db = relu_grad_from_output(output, cotangent), None
            else:
                da, db = launch_scalar_backward(act, output, relu_params, cotangent), None
        elif kernels.kernel_backend() is None:
            da, db = cpu_backward(a, b, cotangent)
        else:
            da, db = launch_binary_backward(op, act, a, b, cotangent, output.shape)
        if db is None:  # add/sub: da holds dz; reduce first, negate the small result
            db = sum_to_shape(da, b.shape)
            return sum_to_shape(da, a.shape), (db if op is BinaryOp.ADD else -db)
        return sum_to_shape(da, a.shape), sum_to_shape(db, b.shape)

    return with_reference_rules(fused, reference)


def fused_binary(
    a: Union[mx.array, Number],
    b: Union[mx.array, Number],
    op: Union[str, BinaryOp] = "add",
    activation: Union[str, Activation] = "relu",
) -> mx.array:
    """``act(a op b)`` as one fused primitive.

    Args:
        a, b (array or scalar): operands, with MLX broadcasting and type
            promotion (a Python number takes the other operand's dtype).
        op (str or BinaryOp): ``"add"``, ``"sub"``, ``"mul"`` or ``"div"``.
        activation (str or Activation): ``"relu"``, ``"gelu"`` (erf form, as
            ``nn.gelu``), ``"gelu_approx"`` (tanh form) or ``"silu"``.

    Returns:
        array: the same values as the unfused ``act(a op b)`` in MLX.
    """
    op, act = as_binary_op(op), as_activation(activation)
    # Fast path (the common call): two arrays of one fusable dtype.
    if type(a) is mx.array and type(b) is mx.array and a.dtype == b.dtype and a.dtype in FUSABLE:
        shape = a.shape if a.shape == b.shape else None
        if shape is not None and a.size:
            return _binary_primitive(op, act)(a, b)
    if not isinstance(a, mx.array) and not isinstance(b, mx.array):
        a = mx.array(a)
    a = as_array(a, b.dtype if isinstance(b, mx.array) else a.dtype)
    b = as_array(b, a.dtype)
    if not (is_fusable_dtype(a.dtype) and is_fusable_dtype(b.dtype)):
        return binary_reference(a, b, op, act)
    try:
        out_shape = mx.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return binary_reference(a, b, op, act)  # raises MLX's own error
    if _prod(out_shape) == 0:
        return binary_reference(a, b, op, act)
    dtype = promote(a.dtype, b.dtype)
    if a.dtype != dtype:
        a = a.astype(dtype)
    if b.dtype != dtype:
        b = b.astype(dtype)
    return _binary_primitive(op, act)(a, b)


# --- act(x * scale + shift) ------------------------------------------------------

_PARAMS_CACHE_SIZE = 1024


@lru_cache(maxsize=_PARAMS_CACHE_SIZE)
def _params(scale: float, shift: float, act: Activation) -> mx.array:
    """(scale, shift, activation code) as a float32 array, made once per value:
    no per-call host allocation for the usual constant scale/shift."""
    p = mx.array([scale, shift, act.code], dtype=mx.float32)
    mx.eval(p)
    return p


def _kernel_view(x: mx.array) -> mx.array:
    """x as the scalar kernels take it: its own shape, except 0-d as (1,) (MLX's
    CUDA kernels get no x_shape for a 0-d input). Not flattened: a flat view of
    more than 2^31 elements is not an MLX shape."""
    return x.reshape(1) if x.ndim == 0 else x


def launch_scalar(act: Activation, x: mx.array, p: mx.array) -> mx.array:
    """act(x * scale + shift); `act` travels in p[2], the argument documents the call."""
    xk = _kernel_view(x)
    return _run("scalar_activation", [xk, p], [xk.shape], x.dtype, x.size)[0].reshape(x.shape)


def launch_scalar_backward(act: Activation, x: mx.array, p: mx.array, g: mx.array) -> mx.array:
    xk = _kernel_view(x)
    gk = _kernel_view(g.astype(x.dtype) if g.dtype != x.dtype else g)
    return _run("scalar_activation_backward", [xk, p, gk], [xk.shape], x.dtype, x.size)[0].reshape(x.shape)


@lru_cache(maxsize=None)
def _scalar_primitive(act: Activation):
    def reference(x, p):
        return act.reference(x * p[0].astype(x.dtype) + p[1].astype(x.dtype))

    def dz_of(x, p, g):  # in float32, as the kernels compute
        return f32(g) * activation_grad(act, f32(x) * p[0] + p[1])

    cpu_forward = cpu_compile(lambda x, p: act.reference(f32(x) * p[0] + p[1]).astype(x.dtype), act)
    cpu_backward = mx.compile(lambda x, p, g: (dz_of(x, p, g) * p[0]).astype(x.dtype))

    @mx.custom_function
    def fused(x, p):
        if kernels.kernel_backend() is None:
            return cpu_forward(x, p)
        return launch_scalar(act, mx.stop_gradient(x), p)  # see _binary_primitive

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        x, p = primals
        if kernels.kernel_backend() is None:
            dx = cpu_backward(x, p, cotangent)
        else:
            dx = launch_scalar_backward(act, x, p, cotangent)
        # Gradients for scale/shift matter only when they were arrays; MLX
        # evaluates lazily, so these reductions run only if someone asks.
        dz = dz_of(x, p, cotangent)
        dp = mx.stack([(dz * f32(x)).sum(), dz.sum(), mx.array(0.0)])
        return dx, dp

    return with_reference_rules(fused, reference)


def _check_number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"fused_scalar: {name} must be a Python number or an mx.array, got {type(v).__name__}")
    return float(v)


def fused_scalar(
    x: mx.array,
    scale: Union[Number, mx.array] = 1.0,
    shift: Union[Number, mx.array] = 0.0,
    activation: Union[str, Activation] = "relu",
) -> mx.array:
    """``act(x * scale + shift)`` as one fused primitive.

    Covers the design's MulScalar+act (``shift=0``), AddScalar+act (``scale=1``)
    and Affine+act.

    Args:
        x (array): input.
        scale, shift (number or one-element array): Python numbers are weakly
            typed (the result keeps ``x.dtype``); arrays follow MLX promotion
            and receive gradients.
        activation (str or Activation): as in :func:`fused_binary`.
    """
    act = as_activation(activation)
    if not isinstance(x, mx.array):
        x = mx.array(x)
    if isinstance(scale, mx.array) or isinstance(shift, mx.array):
        scale_a, shift_a = as_array(scale, x.dtype), as_array(shift, x.dtype)
        if scale_a.size != 1 or shift_a.size != 1:
            raise ValueError(
                "fused_scalar: scale and shift must be scalars (one element); "
                f"got shapes {scale_a.shape} and {shift_a.shape} — use fused_binary for tensors"
            )
        if not all(is_fusable_dtype(d) for d in (x.dtype, scale_a.dtype, shift_a.dtype)) or x.size == 0:
            return scalar_reference(x, scale_a, shift_a, act)
        out_shape = mx.broadcast_shapes(x.shape, scale_a.shape, shift_a.shape)
        dtype = promote(x.dtype, scale_a.dtype, shift_a.dtype)
        p = mx.concatenate([scale_a.reshape(1).astype(mx.float32), shift_a.reshape(1).astype(mx.float32),
                            _params(0.0, 0.0, act)[2:]])
        xk = x.astype(dtype) if x.dtype != dtype else x
        y = _scalar_primitive(act)(xk, p)
        return y.reshape(out_shape) if tuple(y.shape) != tuple(out_shape) else y
    s, t = _check_number("scale", scale), _check_number("shift", shift)
    if not is_fusable_dtype(x.dtype) or x.size == 0:
        return scalar_reference(x, scale, shift, act)
    return _scalar_primitive(act)(x, _params(s, t, act))
