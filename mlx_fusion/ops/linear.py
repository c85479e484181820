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

On the CPU, and inside a shapeless mx.compile, the op is MLX code with MLX's autodiff
(see `common.cpu_reference`): float32 as act(mx.addmm(bias, x, weight.T)), the bias in
the GEMM and the activation compiled; 16-bit types as the unfused act(x @ weight.T + bias).
Never `mx.addmm` in a shapeless trace: there MLX 0.32.4's AddMM with a broadcast bias
returns wrong values for a new batch size, then corrupts the heap (docs/never-wrong.md).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional, Union

import mlx.core as mx

from .. import kernels
from .._shapeless import in_shapeless_trace
from .._tracing import tracing
from ..kernels import KernelSpec
from ..patterns import Activation, LinearLayer, activation_reference, activation_spellings, as_activation
from .base import FusedOp, OpCase, Spelling, Workload
from .common import (activation_grad, cpu_compile, cpu_reference, f32, is_fusable_dtype, promote,
                     relu_grad_from_output, runs_mlx_code, tangents_for)
from .scalar import _params, launch_scalar, launch_scalar_backward

__all__ = ["fused_linear", "linear_reference", "SMALL_M_ROWS", "DEFINITION"]

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


def linear_reference(x, weight, bias=None, activation=None, relu_at_zero: float = 0.0) -> mx.array:
    """act(x @ weight.T + bias) computed by MLX op by op."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    act = as_activation(activation, allow_none=True)
    return activation_reference(act, relu_at_zero)(y) if act is not None else y


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
def _linear_primitive(act: Activation, has_bias: bool, relu_at_zero: float = 0.0):
    # ReLU's derivative can be read off its output (z > 0 exactly where y > 0),
    # so the backward keeps only y, which the next layer holds anyway; other
    # activations keep the pre-activation z as a hidden second output. This is
    # where a fused training step saves memory: the unfused graph keeps both.
    # relu'(0) = 1 (mx.maximum(0, z)) needs z: kept, and its derivative runs as MLX code.
    keep_z = act is not Activation.RELU or bool(relu_at_zero)
    fn = activation_reference(act, relu_at_zero)

    def preactivation(x, w, *b):
        # The bias rides in the GEMM (MLX's addmm: an axpby epilogue on Metal,
        # cuBLASLt's bias epilogue on CUDA), so the epilogue is one pass.
        return mx.addmm(b[0], x, w.T) if has_bias else x @ w.T

    def outputs_of(y, z):
        return (y, z) if keep_z else y

    def parts(x, w, *b):
        z = preactivation(x, w, *b)
        return outputs_of(fn(z), z)

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
        return outputs_of(fn(z), z)

    def dz_of(t, g):  # t is z
        return (f32(g) * activation_grad(act, f32(t), relu_at_zero)).astype(t.dtype)

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
        return outputs_of(launch_scalar(mx.stop_gradient(z), identity), z)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        x, w = primals[0], primals[1]
        if keep_z:
            g, t = cotangents[0], outputs[1]
        else:
            g, t = (c[0] if isinstance(c, (list, tuple)) else c for c in (cotangents, outputs))
        if kernels.kernel_backend() is None or _mlx_epilogue() or relu_at_zero:
            dz = mlx_dz(t, g)
        else:
            dz = launch_scalar_backward(t, identity, g)
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


@lru_cache(maxsize=None)
def _mlx_epilogue_of(act: Activation, relu_at_zero: float, has_bias: bool):
    """The MLX-code path's epilogue, act(y + bias) or act(y) for the product y, with MLX's
    autodiff (common.cpu_reference)."""
    fn = activation_reference(act, relu_at_zero)
    return cpu_reference((lambda y, b: fn(y + b)) if has_bias else fn, act)


def _empty_linear(x, weight, bias, act, dtype, relu_at_zero):
    """An empty product (M, N or K = 0) without a GEMM: its sum over K is zero.
    (MLX 0.32.4's CUDA matmul crashes on some empty operands.)"""
    y = mx.zeros((*x.shape[:-1], weight.shape[0]), dtype)
    if bias is not None:
        y = y + bias
    return activation_reference(act, relu_at_zero)(y) if act is not None else y


def fused_linear(
    x: mx.array,
    weight: mx.array,
    bias: Optional[mx.array] = None,
    activation: Union[str, Activation, None] = None,
    relu_at_zero: float = 0.0,
) -> mx.array:
    """``act(x @ weight.T + bias)`` as one fused primitive.

    Args:
        x (array): input of shape ``(..., in)``; any number of leading dims.
        weight (array): ``(out, in)``, the layout of ``nn.Linear.weight``.
        bias (array, optional): ``(out,)``. Default: ``None``.
        activation (str or Activation, optional): as in :func:`fused_binary`,
            or ``None`` for no activation. Default: ``None``.
        relu_at_zero (float): ReLU's derivative at exactly 0, as in :func:`fused_binary`.

    Returns:
        array: ``(..., out)``, the same values as the unfused expression.
    """
    act = as_activation(activation, allow_none=True)
    if tracing():  # inside a fuse() trace: plain MLX ops, which the trace can capture and re-match
        return linear_reference(x, weight, bias, act, relu_at_zero)
    arrays = [x, weight] + ([bias] if bias is not None else [])
    if not all(isinstance(t, mx.array) for t in arrays):
        raise TypeError("fused_linear: x, weight and bias must be mx.array")
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.ndim > 1):
        # MLX raises its own shape error, or broadcasts
        return linear_reference(x, weight, bias, act, relu_at_zero)
    out_features = weight.shape[0]
    if bias is not None and bias.size not in (1, out_features):
        return linear_reference(x, weight, bias, act, relu_at_zero)
    dtype = promote(*(t.dtype for t in arrays))
    if not all(is_fusable_dtype(t.dtype) for t in arrays):
        return linear_reference(x, weight, bias, act, relu_at_zero)
    if x.size == 0 or weight.size == 0:
        return _empty_linear(x, weight, bias, act, dtype, relu_at_zero)
    if act is None:
        if bias is None:
            return x @ weight.T
        if in_shapeless_trace():  # AddMM is wrong there (see the module docstring)
            return linear_reference(x, weight, bias)
        return mx.addmm(bias, x, weight.T)
    if runs_mlx_code():
        # No reshapes: a shapeless compile replays this code with new shapes.
        tie = float(relu_at_zero)
        if bias is not None and dtype == mx.float32 and all(t.dtype == dtype for t in arrays) \
                and not in_shapeless_trace():
            # The bias in MLX's CPU GEMM: 1.02-1.2x the unfused float32 code (docs/performance.md).
            return _mlx_epilogue_of(act, tie, False)(mx.addmm(bias, x, weight.T))
        y = x @ weight.T
        return _mlx_epilogue_of(act, tie, True)(y, bias) if bias is not None else _mlx_epilogue_of(act, tie, False)(y)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    args = [x2, weight]
    if bias is not None:
        args.append(bias if bias.shape == (out_features,) else mx.broadcast_to(bias, (out_features,)))
    args = [t.astype(dtype) if t.dtype != dtype else t for t in args]
    prim, keep_z = _linear_primitive(act, bias is not None, float(relu_at_zero))
    y = prim(*args)
    y = y[0] if keep_z else y
    return y.reshape(*lead, out_features)


# --- the definition ----------------------------------------------------------------

def _row_vector(shape, n: int) -> bool:
    """Broadcastable to one output row (N,): a bias, not a residual."""
    s = tuple(shape)
    return len(s) == 0 or (s[-1] in (1, n) and all(d == 1 for d in s[:-1]))


def _build(act, tie, has_bias):
    def build(m):
        x, rhs = m.args[0], m.args[1]
        if len(rhs.shape) != 2 or len(x.shape) < 2 or x.shape[-1] != rhs.shape[0]:
            return None
        # Rows are independent, so (..., K) -> (M, K) @ W -> (..., N) is x @ W on the original x.
        if tuple(m.output.shape) != tuple(x.shape[:-1]) + (rhs.shape[1],):
            return None
        if has_bias and not _row_vector(m.args[2].shape, rhs.shape[1]):
            return None
        params = {"activation": act, "has_bias": has_bias}
        if tie:
            params["relu_at_zero"] = tie
        return list(m.args), params, []
    return build


def _examples(rank, has_bias):
    def example(dt):
        x = mx.zeros((4, 8) if rank == 2 else (2, 4, 8), dt)
        return (x, mx.zeros((8, 6), dt)) + ((mx.zeros((6,), dt),) if has_bias else ())
    return example


def _spellings():
    """x @ rhs (+ bias) then act, as MLX exports it: Matmul + Add(bias), AddMM (what nn.Linear
    calls), Matmul alone; 2-D, and 3-D through Flatten/Reshape. `rhs` is the (K, N) operand as it
    enters the matmul (Transpose(W) for nn.Linear). Longest first; a bare AddMM or Matmul is
    never a candidate (it already is one kernel)."""
    out = []
    spelled = [(act, fn, tie) for act, fn, tie in activation_spellings()] + [(None, lambda y: y, 0.0)]
    for act, fn, tie in spelled:
        rule = f"linear+{act.value}" if act else "linear+bias"
        forms = [("mm+bias", lambda x, r, c, fn=fn: fn(x @ r + c), True)]
        if act is not None:
            forms += [("addmm", lambda x, r, c, fn=fn: fn(mx.addmm(c, x, r)), True),
                      ("mm", lambda x, r, fn=fn: fn(x @ r), False)]
        for _, ref, has_bias in forms:
            for rank in (2, 3):
                out.append(Spelling(pattern=LinearLayer(has_bias, act), reference=ref,
                                    example=_examples(rank, has_bias), build=_build(act, tie, has_bias),
                                    rule=rule))
    return out


def _call(ins, p):
    # The node holds rhs (K, N) exactly as it entered the matmul; fused_linear takes W (N, K).
    return [fused_linear(ins[0], ins[1].T, ins[2] if len(ins) > 2 else None, activation=p["activation"],
                         relu_at_zero=p.get("relu_at_zero", 0.0))]


def _reference_call(ins, p):
    return [linear_reference(ins[0], ins[1].T, ins[2] if len(ins) > 2 else None, p["activation"],
                             p.get("relu_at_zero", 0.0))]


def _inputs(case, shape, dtype, key):
    """shape is (M, K, N): [x (M, K), weight (N, K)(, bias (N,))]."""
    m, k, n = shape
    k1, k2, k3 = mx.random.split(key, 3)
    x = mx.random.normal((m, k), key=k1).astype(dtype)
    w = (mx.random.normal((n, k), key=k2) / k**0.5).astype(dtype)
    arrays = [x, w]
    if case.pattern.has_bias:
        arrays.append(mx.random.normal((n,), key=k3).astype(dtype))
    return arrays


def _linear_defaults(gpu: bool, quick: bool = False) -> list:
    """(M, K, N) at decode and large shapes."""
    if quick:
        # A CPU GEMM at 256x1024x1024 takes ~0.1 s a call: too slow for a quick run.
        return [(1, 1024, 1024), (256, 1024, 1024)] if gpu else [(1, 512, 512), (64, 512, 512)]
    if gpu:
        return [(1, 4096, 4096), (32, 4096, 4096), (4096, 4096, 4096), (8192, 4096, 11008)]
    return [(1, 2048, 2048), (32, 2048, 2048), (512, 2048, 2048)]


# Benchmark shapes are (M, K, N); an output of n elements is M x 1024 with K = N = 1024.
LINEAR = Workload(
    shape_for_size=lambda n: (max(1, n // min(1024, n)), 1024, min(1024, n)),
    output_size=lambda s: s[0] * s[2],
    copy_size=lambda s: max(s[0] * s[1], s[1] * s[2], s[0] * s[2]),
    flops=lambda s: 2.0 * s[0] * s[1] * s[2],
    default_shapes=_linear_defaults)


def _cases():
    out = []
    for has_bias in (True, False):
        for act in list(Activation) + [None]:
            pat = LinearLayer(has_bias, act)
            out.append(OpCase(
                pat.name, "linear", pat,
                lambda x, w, *b, act=act: fused_linear(x, w, b[0] if b else None, act),
                lambda x, w, *b, act=act: linear_reference(x, w, b[0] if b else None, act), _inputs, LINEAR))
    return out


def _coreml(c, node, ins):
    bias = None
    if len(ins) > 2:
        bias = c.bias_vector(ins[2], node.outputs[0].shape[-1])
    y = c.mm(node, ins[:2], bias)
    if len(ins) > 2 and bias is None:
        a, b = c.operands([y, ins[2]], node.outputs[0].shape)
        y = c.mb.add(x=a, y=b)
    return [c.activation(y, node.params.get("activation"))]


DEFINITION = FusedOp(
    name="linear", order=2, node_op="FusedLinear", spellings=_spellings, call=_call,
    reference_call=_reference_call, cases=_cases, coreml=_coreml,
    # 2*M*K*N, plus the epilogue: the node reads the same (K, N) right-hand side as AddMM/Matmul.
    flops=lambda node: 2.0 * node.inputs[0].size * node.inputs[1].shape[-1] + node.outputs[0].size,
    kernels=(
        # z = x @ w.T + b, out = act(z) for M <= 16 * MT rows (tensor-core tiles on CUDA);
        # p = (scale, shift, activation code) as for scalar_activation. b is read only when HAS_BIAS.
        KernelSpec("linear_activation", ("x", "w", "b", "p"), ("out", "z"), elementwise=False,
                   ensure_row_contiguous=True, dtypes=("float16", "bfloat16"),
                   templates=(("MT", (1, 2)), ("NT", (2, 4)), ("HAS_BIAS", (False, True))), header_parts=("mma",)),
    ),
    doc="act(x @ rhs + bias): FusedLinear(x, rhs[, bias]), params {pattern, activation, has_bias}.")
