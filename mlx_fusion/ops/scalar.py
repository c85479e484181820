"""The scalar-affine family: act(x * scale + shift) with one-element scale and shift.

One `mx.custom_function` whose forward runs the `scalar_activation` kernel
(Metal or CUDA, metal_src/) and whose vjp runs `scalar_activation_backward`. On
the CPU, where MLX has no custom-kernel API, the op is MLX's own expression
(float32 under `mx.compile`), differentiated by MLX: see `common.cpu_reference`. Inputs MLX
cannot fuse here (integer, bool, complex, float64 dtypes; empty arrays) run the
unfused reference, so results are always what MLX would give.

`DEFINITION` (at the end) is the op as the rest of mlx-fusion sees it.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from .. import kernels
from .._tracing import tracing
from ..kernels import KernelSpec
from ..patterns import (Activation, ScalarActivation, ScalarOp, activation_reference, activation_spellings,
                        as_activation)
from .base import FusedOp, OpCase, Spelling
from .common import (FUSED_DTYPES, activation_grad, as_number, cpu_compile, cpu_reference, elementwise_launch, f32,
                     is_fusable_dtype, promote, runs_mlx_code, same_shape_launch, with_reference_rules)

__all__ = ["fused_scalar", "scalar_reference", "launch_scalar", "launch_scalar_backward", "DEFINITION"]

Number = Union[int, float]


def scalar_reference(x, scale=1.0, shift=0.0, activation="relu", relu_at_zero: float = 0.0) -> mx.array:
    """act(x * scale + shift) computed by MLX op by op: the ground truth for fused_scalar."""
    return activation_reference(as_activation(activation), relu_at_zero)(x * scale + shift)


def _run(name: str, inputs, output_shapes, dtype: mx.Dtype, n: int):
    """Launch kernel `name` over n elements; every output has the compute dtype. The launch's
    fixed arguments are made once per (kernel, dtype, output shapes)."""
    launches = _RUN.get(name)
    if launches is None:
        launches = _RUN.setdefault(name, kernels.LaunchCache(name, elementwise_launch))
    return launches[(kernels.backend_key(), dtype, tuple(output_shapes), n)](inputs=inputs)


_RUN: dict = {}  # kernel name -> its LaunchCache for `_run`
_SCALAR = kernels.LaunchCache("scalar_activation", same_shape_launch)


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


def launch_scalar(x: mx.array, p: mx.array) -> mx.array:
    """act(x * p[0] + p[1]) with the activation code in p[2] (see `_params`)."""
    xk = _kernel_view(x)
    return _run("scalar_activation", [xk, p], [xk.shape], x.dtype, x.size)[0].reshape(x.shape)


def launch_scalar_backward(x: mx.array, p: mx.array, g: mx.array) -> mx.array:
    xk = _kernel_view(x)
    gk = _kernel_view(g.astype(x.dtype) if g.dtype != x.dtype else g)
    return _run("scalar_activation_backward", [xk, p, gk], [xk.shape], x.dtype, x.size)[0].reshape(x.shape)


@lru_cache(maxsize=_PARAMS_CACHE_SIZE)
def _cpu_scalar(act: Activation, relu_at_zero: float, scale: float, shift: float):
    """The CPU path for number scale and shift: act(x * scale + shift) as MLX code, with
    MLX's autodiff (common.cpu_reference); one function per value, as `_params`."""
    fn = activation_reference(act, relu_at_zero)
    return cpu_reference(lambda x: fn(x * scale + shift), act)


@lru_cache(maxsize=None)
def _scalar_primitive(act: Activation, relu_at_zero: float = 0.0, stop_p: bool = False):
    """stop_p: p is computed from the caller's scale/shift arrays (not a cached constant)."""
    fn = activation_reference(act, relu_at_zero)

    def reference(x, p):
        return fn(x * p[0].astype(x.dtype) + p[1].astype(x.dtype))

    def dz_of(x, p, g):  # in float32, as the kernels compute
        return f32(g) * activation_grad(act, f32(x) * p[0] + p[1], relu_at_zero)

    # Only reached on the CPU when the device changes between the call and its vjp
    # (fused_scalar sends CPU calls to the unfused code): the kernels' math in float32.
    cpu_forward = cpu_compile(lambda x, p: fn(f32(x) * p[0] + p[1]).astype(x.dtype), act)
    cpu_backward = mx.compile(lambda x, p, g: (dz_of(x, p, g) * p[0]).astype(x.dtype))

    @mx.custom_function
    def fused(x, p):
        backend = kernels.backend_key()
        if backend is None:
            return cpu_forward(x, p)
        x = mx.stop_gradient(x)  # see _binary_primitive
        if stop_p:  # p made from the caller's arrays: a jvp must not reach the kernel through it either
            p = mx.stop_gradient(p)
        if x.ndim:  # the common call: one launch made per (dtype, shape)
            return _SCALAR[(backend, x.dtype, x.shape)](inputs=[x, p])[0]
        return launch_scalar(x, p)

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        x, p = primals
        # The kernels' ReLU derivative is 0 at 0; the other convention runs as MLX code.
        if kernels.kernel_backend() is None or relu_at_zero:
            dx = cpu_backward(x, p, cotangent)
        else:
            dx = launch_scalar_backward(x, p, cotangent)
        # Gradients for scale/shift matter only when they were arrays; MLX
        # evaluates lazily, so these reductions run only if someone asks.
        dz = dz_of(x, p, cotangent)
        dp = mx.stack([(dz * f32(x)).sum(), dz.sum(), mx.array(0.0)])
        return dx, dp

    return with_reference_rules(fused, reference)


_MLX_DECIDES = object()


def _check_number(name: str, v):
    """A Python float for a weakly typed number, `_MLX_DECIDES` for what only MLX should
    judge (bools, NumPy arrays, huge ints: the unfused code runs), TypeError otherwise."""
    if isinstance(v, mx.array):
        return v
    n = as_number(v)
    if n is not None:
        return float(n)
    if isinstance(v, (bool, int, np.ndarray, np.generic)):
        return _MLX_DECIDES
    raise TypeError(f"fused_scalar: {name} must be a number or an mx.array, got {type(v).__name__}")


def fused_scalar(
    x: mx.array,
    scale: Union[Number, mx.array] = 1.0,
    shift: Union[Number, mx.array] = 0.0,
    activation: Union[str, Activation] = "relu",
    relu_at_zero: float = 0.0,
) -> mx.array:
    """``act(x * scale + shift)`` as one fused primitive.

    Covers the design's MulScalar+act (``shift=0``), AddScalar+act (``scale=1``)
    and Affine+act.

    Args:
        x (array): input.
        scale, shift (number or one-element array): Python and NumPy numbers are
            weakly typed (the result keeps ``x.dtype``); arrays follow MLX promotion
            and receive gradients. Integer or bool inputs run unfused, as MLX computes them.
        activation (str or Activation): as in :func:`fused_binary`.
        relu_at_zero (float): ReLU's derivative at exactly 0: ``0.0`` as ``nn.relu``,
            ``1.0`` as ``mx.maximum(0, z)``. Default: ``0.0``.
    """
    # Fast path (the common call): an array of a fusable dtype and two Python floats, with an
    # activation seen before (its primitive is looked up by the arguments as passed).
    if type(x) is mx.array and type(scale) is float and type(shift) is float:
        try:
            seen = _SEEN.get((activation, relu_at_zero))
        except TypeError:  # an unhashable argument: the checks below judge it
            seen = None
        if seen is not None and x.dtype in FUSABLE and x.size and not tracing():
            if runs_mlx_code():  # the CPU, or a shapeless trace
                return _cpu_scalar(seen[1], seen[2], scale, shift)(x)
            return seen[0](x, _params(scale, shift, seen[1]))
    key = (activation, relu_at_zero)
    act = as_activation(activation)
    if tracing():  # inside a fuse() trace: plain MLX ops, which the trace can capture and re-match
        return scalar_reference(x, scale, shift, act, relu_at_zero)
    if not isinstance(x, mx.array):
        x = mx.array(x)
    s, t = _check_number("scale", scale), _check_number("shift", shift)
    if s is _MLX_DECIDES or t is _MLX_DECIDES or not is_fusable_dtype(x.dtype) or x.size == 0:
        return scalar_reference(x, scale, shift, act, relu_at_zero)
    cpu = runs_mlx_code()
    if isinstance(s, mx.array) or isinstance(t, mx.array):
        scale_a, shift_a = (v if isinstance(v, mx.array) else mx.array(v, dtype=x.dtype) for v in (s, t))
        if scale_a.size != 1 or shift_a.size != 1:
            raise ValueError(
                "fused_scalar: scale and shift must be scalars (one element); "
                f"got shapes {scale_a.shape} and {shift_a.shape} — use fused_binary for tensors"
            )
        if cpu or not all(is_fusable_dtype(d) for d in (scale_a.dtype, shift_a.dtype)):
            # The CPU (or a shapeless trace): MLX's own code and autodiff; rare, so not compiled.
            return scalar_reference(x, scale, shift, act, relu_at_zero)
        out_shape = mx.broadcast_shapes(x.shape, scale_a.shape, shift_a.shape)
        dtype = promote(x.dtype, scale_a.dtype, shift_a.dtype)
        p = mx.concatenate([scale_a.reshape(1).astype(mx.float32), shift_a.reshape(1).astype(mx.float32),
                            _params(0.0, 0.0, act)[2:]])
        xk = x.astype(dtype) if x.dtype != dtype else x
        y = _scalar_primitive(act, float(relu_at_zero), True)(xk, p)
        return y.reshape(out_shape) if tuple(y.shape) != tuple(out_shape) else y
    relu = float(relu_at_zero)
    if len(_SEEN) < 256 and type(relu_at_zero) in (float, int):  # not arrays: hashed by identity
        _SEEN[key] = (_scalar_primitive(act, relu), act, relu)
    if cpu:
        return _cpu_scalar(act, relu, s, t)(x)
    return _scalar_primitive(act, relu)(x, _params(s, t, act))


# (activation, relu_at_zero) as callers pass them -> (GPU primitive, Activation, relu_at_zero).
_SEEN: dict = {}
FUSABLE = frozenset(FUSED_DTYPES)


# --- the definition ----------------------------------------------------------------

def _reciprocal(s: float, dtype) -> Optional[float]:
    """1/s when x*(1/s) rounds like x/s: exactly for powers of two; for 16-bit floats the float32
    reciprocal's error (2^-24) is far below the storage precision. Else None (stay unfused)."""
    if s == 0 or not math.isfinite(s):
        return None
    if math.frexp(s)[0] in (0.5, -0.5) or dtype in (mx.float16, mx.bfloat16):
        return 1.0 / s
    return None


# (multiply-like op, add-like op) of each spelling, longest first: x*s+t is worth more
# than the x*s or +t inside it, and falls back to them when x*s has another reader.
_FORMS = [(m, a) for m in "*/" for a in "+-"] + [(m, None) for m in "*/"] + [(None, a) for a in "+-"]


def _body(mul, add):
    """The affine part of a spelling as plain MLX code over (x[, s][, t])."""
    ops = {"*": mx.multiply, "/": mx.divide, "+": mx.add, "-": mx.subtract}
    if mul and add:
        return lambda x, s, t: ops[add](ops[mul](x, s), t)
    return lambda x, c: ops[mul or add](x, c)


def _spelling(act, fn, tie, mul, add) -> Spelling:
    body = _body(mul, add)
    n = 2 if mul and add else 1
    kind = ScalarOp.AFFINE if mul and add else (ScalarOp.MUL if mul else ScalarOp.ADD)

    def build(m):
        x, consts = m.args[0], m.args[1:]
        if m.is_constant(x) or tuple(x.shape) != tuple(m.output.shape):
            return None  # the tensor side must be a real full-size tensor
        scale = consts[0] if mul else 1.0
        shift = consts[-1] if add else 0.0
        if mul == "/":
            scale = _reciprocal(scale, x.dtype)
            if scale is None:
                return None  # left to the binary op, which divides exactly
        if add == "-":
            shift = -shift
        params = {"scale": float(scale), "shift": float(shift), "activation": act}
        if tie:
            params["relu_at_zero"] = tie
        return [x], params, []

    return Spelling(
        pattern=ScalarActivation(kind, act),
        reference=lambda x, *c: fn(body(x, *c)),
        example=lambda dt: (mx.zeros((4, 8), dt),) + tuple(mx.array(v, dt) for v in (1.5, 0.25)[:n]),
        build=build, rule=f"scalar+{act.value}", scalars=tuple(range(1, n + 1)))


def _spellings():
    return [_spelling(act, fn, tie, mul, add) for act, fn, tie in activation_spellings() for mul, add in _FORMS]


def _call(ins, p):
    return [fused_scalar(ins[0], scale=p["scale"], shift=p["shift"], activation=p["activation"],
                         relu_at_zero=p.get("relu_at_zero", 0.0))]


def _reference_call(ins, p):
    return [scalar_reference(ins[0], p["scale"], p["shift"], p["activation"], p.get("relu_at_zero", 0.0))]


def _inputs(case, shape, dtype, key):
    return [mx.random.normal(shape, key=mx.random.split(key, 3)[0]).astype(dtype)]


def _cases():
    return [OpCase(f"affine+{act.value}", "scalar", ScalarActivation(ScalarOp.AFFINE, act),
                   lambda x, act=act: fused_scalar(x, 1.5, -0.25, act),
                   lambda x, act=act: scalar_reference(x, 1.5, -0.25, act), _inputs)
            for act in Activation]


# The tracker measures scale-only and shift-only patterns with these constants.
_CASE_SCALARS = {ScalarOp.MUL: (1.5, 0.0), ScalarOp.ADD: (1.0, -0.25), ScalarOp.AFFINE: (1.5, -0.25)}


def _case_for(pattern):
    if not isinstance(pattern, ScalarActivation):
        return None
    (scale, shift), act = _CASE_SCALARS[pattern.scalar_op], pattern.activation
    return OpCase(pattern.name, "scalar", pattern, lambda x: fused_scalar(x, scale, shift, act),
                  lambda x: scalar_reference(x, scale, shift, act), _inputs)


def _coreml(c, node, ins):
    y, p = c.var(ins[0]), node.params
    if float(p.get("scale", 1.0)) != 1.0:
        y = c.mb.mul(x=y, y=np.float16(p["scale"]))
    if float(p.get("shift", 0.0)) != 0.0:
        y = c.mb.add(x=y, y=np.float16(p["shift"]))
    return [c.activation(y, p.get("activation"))]


DEFINITION = FusedOp(
    name="scalar", order=1, node_op="FusedScalar", spellings=_spellings, call=_call,
    reference_call=_reference_call, cases=_cases, case_for=_case_for, coreml=_coreml,
    kernels=(
        # act(x * p[0] + p[1]); p = (scale, shift, activation code), float32.
        KernelSpec("scalar_activation", ("x", "p"), ("out",), ensure_row_contiguous=True, header_parts=("affine",)),
        KernelSpec("scalar_activation_backward", ("x", "p", "g"), ("dx",), ensure_row_contiguous=True,
                   header_parts=("affine_backward",)),
    ),
    doc="act(x * scale + shift): FusedScalar(x), params {pattern, scale, shift, activation}.")
