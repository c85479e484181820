"""Helpers shared by the fused ops: dtypes, broadcasting, launch geometry and
the activation derivatives in MLX form (the CPU twin of the kernels' math)."""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Sequence

import mlx.core as mx
import numpy as np

from .. import kernels
from .._shapeless import in_shapeless_trace
from .._tracing import tracing
from ..kernels import make_launch
from ..patterns import Activation, BinaryOp

FUSED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
THREADGROUP = 256


def is_fusable_dtype(dtype: mx.Dtype) -> bool:
    return dtype in FUSED_DTYPES


@lru_cache(maxsize=None)
def promote(*dtypes: mx.Dtype) -> mx.Dtype:
    """MLX's type promotion for arrays of these dtypes (computed once per combination)."""
    out = mx.zeros((), dtypes[0])
    for d in dtypes[1:]:
        out = out + mx.zeros((), d)
    return out.dtype


def as_number(v):
    """`v` as a Python int or float if MLX types it weakly like one (a Python or NumPy int or
    float: `mx.multiply(x, np.float32(2))` keeps x's dtype), else None: bools, NumPy arrays,
    ints beyond int32 and non-numbers are left to MLX itself (its result, or its error)."""
    if isinstance(v, np.generic) and isinstance(v, (np.integer, np.floating)):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int) and not -(2**31) <= v < 2**31:
        return None
    return v


def elements_per_thread(dtype: mx.Dtype) -> int:
    """Each kernel thread handles 16 bytes of output (4 x f32, 8 x f16/bf16)."""
    return 16 // dtype.size


# Each GPU thread walks GPU_VECTORS[dtype size] 16-byte vectors with a
# grid-stride loop (metal_src/): measured best on an H100, 2 for float32 and 4
# for the 16-bit types (docs/performance.md); Metal uses the same numbers, untimed.
# MLX_FUSION_GPU_VECTORS overrides both (for measuring).
GPU_VECTORS = {4: 2, 2: 4}
if os.environ.get("MLX_FUSION_GPU_VECTORS"):
    GPU_VECTORS = {k: int(os.environ["MLX_FUSION_GPU_VECTORS"]) for k in GPU_VECTORS}


def launch_geometry(n: int, dtype: mx.Dtype):
    """(grid, threadgroup) for an elementwise kernel over n elements, on either backend."""
    threads = -(-n // (elements_per_thread(dtype) * GPU_VECTORS.get(dtype.size, 1)))
    if threads >= 2**31:
        raise ValueError(f"array of {n} elements is too large for one kernel launch")
    return (threads, 1, 1), (THREADGROUP, 1, 1)


def elementwise_launch(kernel, dtype: mx.Dtype, output_shapes: tuple, n: int):
    """The launch (`kernels.make_launch`) of an elementwise kernel over n elements whose outputs
    all have `dtype`."""
    grid, group = launch_geometry(n, dtype)
    return make_launch(kernel, output_shapes, [dtype] * len(output_shapes), grid, group, [("T", dtype)])


def same_shape_launch(kernel, dtype: mx.Dtype, shape: tuple, outputs: int = 1):
    """`elementwise_launch` of a kernel whose outputs have the input's shape (and dtype)."""
    n = 1
    for d in shape:
        n *= d
    return elementwise_launch(kernel, dtype, (shape,) * outputs, n)


def sum_to_shape(x: mx.array, shape: Sequence[int]) -> mx.array:
    """Sum a full-shape gradient over the dimensions that were broadcast."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    lead = x.ndim - len(shape)
    axes = list(range(lead)) + [
        lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1
    ]
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return x.reshape(shape)


def activation_grad(act: Activation, z: mx.array, relu_at_zero: float = 0.0) -> mx.array:
    """d act / dz as an MLX expression; the same closed forms as the kernels' fusion_activation_grad.
    `relu_at_zero`: ReLU's derivative at exactly 0 (0 as nn.relu, 1 as mx.maximum(0, x))."""
    if act is Activation.RELU:
        return ((z >= 0) if relu_at_zero else (z > 0)).astype(z.dtype)
    if act is Activation.GELU:
        cdf = 0.5 * (1 + mx.erf(z * (1 / math.sqrt(2))))
        return cdf + z * (mx.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi)))
    if act is Activation.GELU_APPROX:
        c = math.sqrt(2 / math.pi)
        t = mx.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    if act is Activation.SILU:
        s = mx.sigmoid(z)
        return s * (1 + z * (1 - s))
    raise ValueError(f"no derivative for activation {act!r}")


@mx.compile
def relu_grad_from_output(y: mx.array, g: mx.array) -> mx.array:
    """g * relu'(z) read off the output y = relu(z) (z > 0 exactly where y > 0), as a
    select in y's dtype: exact, and where nothing is compiled it holds one boolean mask
    rather than float32 or 0/1 temporaries (bf16 MLP trained eagerly on the CPU: 19.5
    vs 24.5 units of activation memory for the product form)."""
    return mx.where(y > 0, g.astype(y.dtype), mx.zeros((), y.dtype))


def binary_operand_grads(op: BinaryOp, dz, a, b):
    """Gradients of (a op b) w.r.t. a and b at full shape, as MLX's own vjps compute them."""
    if op is BinaryOp.ADD:
        return dz, dz
    if op is BinaryOp.SUB:
        return dz, -dz
    if op is BinaryOp.MUL:
        return dz * b, dz * a
    return dz / b, -(dz * a) / (b * b)


def f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def flat1d(x: mx.array) -> mx.array:
    """0-d arrays are passed to kernels as shape (1,): MLX passes a 0-d input as a
    reference without shape buffers, which the kernels do not expect."""
    return x.reshape(1) if x.ndim == 0 else x


def tangents_for(primals, tangents) -> list:
    """MLX may pass None (or fewer tangents) for inputs it does not differentiate."""
    primals = [primals] if isinstance(primals, mx.array) else list(primals)
    tangents = [tangents] if isinstance(tangents, mx.array) else list(tangents)
    tangents += [None] * (len(primals) - len(tangents))
    return [mx.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]


def with_reference_rules(fused, reference, outputs: int = 1):
    """jvp and vmap of a fused primitive by MLX's own transforms of its unfused
    reference (`outputs` results): correct, not fused (forward-mode and batching are
    rare here)."""

    @fused.jvp
    def fused_jvp(primals, tangents):
        out = mx.jvp(reference, list(primals), tangents_for(primals, tangents))[1]
        return out[0] if outputs == 1 else list(out)

    @fused.vmap
    def fused_vmap(inputs, axes):
        out = mx.vmap(reference, in_axes=tuple(axes))(*inputs)
        return (out, 0) if outputs == 1 else (list(out), [0] * outputs)

    return fused


# MLX's CPU compiler emits a scalar tanh that runs slower than its eager
# vectorized one: gelu_approx forward measured 0.73-0.79x of unfused eager when
# compiled (docs/data/cpu-cli-quick.txt). The CPU forward path runs those eagerly.
CPU_EAGER_FORWARD = frozenset({Activation.GELU_APPROX})


def cpu_compile(fn, act: Activation):
    """mx.compile(fn), except for activations whose compiled CPU code is slower."""
    return fn if act in CPU_EAGER_FORWARD else mx.compile(fn)


def runs_mlx_code() -> bool:
    """Does a fused op run its MLX expression here instead of its kernels? On the CPU
    (no kernel API); inside a `fuse()` trace, which cannot export a custom_function and
    re-matches the plain ops itself; and inside a shapeless mx.compile, which accepts no
    custom_function or custom kernel (mlx_fusion/_shapeless.py)."""
    return kernels.kernel_backend() is None or tracing() or in_shapeless_trace()


def cpu_reference(fn, act: Activation):
    """The CPU path of a fused op: its unfused MLX expression `fn`, differentiated by MLX.

    Not a custom vjp: under mx.grad / mx.vjp every array is a tracer and MLX runs a compiled
    function with tracer inputs op by op (mlx/compile.cpp), so a custom vjp's "fused" CPU
    backward is eager MLX code, and its memory-lean form (a select on the output, or the
    activation recomputed) was slower than MLX's own autodiff; inside an outer mx.compile the
    custom function is an opaque node that the compiler cannot fuse across, and one that no
    shapeless compile accepts. Float32 calls run `fn` under mx.compile (one loop when called
    eagerly); 16-bit ones run it as is: MLX's compiled CPU code converts each intermediate
    to and from the 16-bit type, which measured slower than its eager vectorized ops
    (docs/performance.md, "CPU backward"). Either way the values are the unfused code's.
    """
    compiled = cpu_compile(fn, act)

    def run(*args):
        return compiled(*args) if args[0].dtype == mx.float32 else fn(*args)

    return run
