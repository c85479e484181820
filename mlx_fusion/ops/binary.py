"""The binary family: act(a op b) for op in add/sub/mul/div, with broadcasting.

One `mx.custom_function` whose forward runs the `binary_activation` kernel
(Metal or CUDA, from metal_src/) and whose vjp runs one fused backward kernel
(activation derivative times cotangent, plus the operand gradients). On the
CPU, where MLX has no custom-kernel API, the op is MLX's own expression
(float32 under `mx.compile`), differentiated by MLX: see `common.cpu_reference`.

Inputs MLX cannot fuse here (integer, bool, complex, float64 dtypes; empty
arrays) run the unfused reference, so results are always what MLX would give.
`DEFINITION` (at the end) is the op as the rest of mlx-fusion sees it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Union

import mlx.core as mx

from .. import kernels
from .._tracing import tracing
from ..kernels import KernelSpec
from ..patterns import (Activation, BinaryActivation, BinaryOp, activation_reference, activation_spellings,
                        as_activation, as_binary_op)
from .base import FusedOp, OpCase, Spelling
from .common import (FUSED_DTYPES, activation_grad, as_number, binary_operand_grads, cpu_compile, cpu_reference, f32,
                     flat1d, is_fusable_dtype, promote, relu_grad_from_output, runs_mlx_code, same_shape_launch,
                     sum_to_shape, with_reference_rules)
from .scalar import _params, _run, launch_scalar_backward

__all__ = ["fused_binary", "binary_reference", "launch_binary", "launch_binary_backward", "DEFINITION"]

Number = Union[int, float]
FUSABLE = frozenset(FUSED_DTYPES)


# --- references (the unfused MLX expressions) ----------------------------------

def binary_reference(a, b, op="add", activation="relu", relu_at_zero: float = 0.0) -> mx.array:
    """act(a op b) computed by MLX op by op: the ground truth for fused_binary."""
    return activation_reference(as_activation(activation), relu_at_zero)(as_binary_op(op).reference(a, b))


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


_LAUNCHES = kernels.LaunchCache("binary_activation", same_shape_launch)  # same-shape a, b: (backend, dtype, shape)


@lru_cache(maxsize=None)
def _cpu_binary(op: BinaryOp, act: Activation, relu_at_zero: float = 0.0):
    """The CPU path: act(a op b) as MLX code, with MLX's autodiff (common.cpu_reference)."""
    fn = activation_reference(act, relu_at_zero)
    return cpu_reference(lambda a, b: fn(op.reference(a, b)), act)


def _fused(op: BinaryOp, act: Activation, relu_at_zero: float):
    if runs_mlx_code():
        return _cpu_binary(op, act, relu_at_zero)
    return _binary_primitive(op, act, relu_at_zero)


@lru_cache(maxsize=None)
def _binary_primitive(op: BinaryOp, act: Activation, relu_at_zero: float = 0.0):
    fn = activation_reference(act, relu_at_zero)

    def reference(a, b):
        return fn(op.reference(a, b))

    # Only reached on the CPU when the device changes between the call and its vjp
    # (fused_binary sends CPU calls to _cpu_binary): the kernels' math as MLX expressions,
    # in float32 like the kernels
    # (half-precision cancellation in e.g. 1 + tanh(u) would zero gradients);
    # mx.compile fuses each into one loop, so the casts cost no memory traffic.
    def cpu_forward(a, b):
        return reference(f32(a), f32(b)).astype(a.dtype)

    cpu_forward = cpu_compile(cpu_forward, act)

    @mx.compile
    def cpu_backward(a, b, g):
        # Like the kernel: add/sub return dz alone (one output to write).
        a32, b32 = f32(a), f32(b)
        dz = f32(g) * activation_grad(act, op.reference(a32, b32), relu_at_zero)
        if op in (BinaryOp.ADD, BinaryOp.SUB):
            return dz.astype(a.dtype), None
        return tuple(d.astype(a.dtype) for d in binary_operand_grads(op, dz, a32, b32))

    mode = _mode(op, act)

    @mx.custom_function
    def fused(a, b):
        backend = kernels.backend_key()
        if backend is None:
            return cpu_forward(a, b)
        # stop_gradient keeps MLX's jvp from tracing into the kernel (which has
        # no jvp of its own); this function's custom rules stand for it.
        a, b = mx.stop_gradient(a), mx.stop_gradient(b)
        shape = a.shape
        if shape == b.shape and shape:  # the common call: one launch made per (dtype, shape)
            return _LAUNCHES[(backend, a.dtype, shape)](inputs=[a, b, mode])[0]
        return launch_binary(op, act, a, b, mx.broadcast_shapes(shape, b.shape))

    # add/sub + ReLU: relu'(a op b) is read off the output (z > 0 exactly where
    # y > 0), so the backward reads y and g instead of a, b and g. Not with
    # relu'(0) = 1, which needs z: that convention runs the MLX code backward
    # (the kernels' ReLU derivative is 0 at 0).
    relu_from_output = act is Activation.RELU and op in (BinaryOp.ADD, BinaryOp.SUB) and not relu_at_zero
    relu_params = _params(1.0, 0.0, act) if relu_from_output else None

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        a, b = primals
        if relu_from_output:
            if kernels.kernel_backend() is None:
                da, db = relu_grad_from_output(output, cotangent), None
            else:
                da, db = launch_scalar_backward(output, relu_params, cotangent), None
        elif kernels.kernel_backend() is None or relu_at_zero:
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
    relu_at_zero: float = 0.0,
) -> mx.array:
    """``act(a op b)`` as one fused primitive.

    Args:
        a, b (array or scalar): operands, with MLX broadcasting and type
            promotion (a Python or NumPy number takes the other operand's dtype;
            integer, bool and NumPy array operands run unfused, as MLX computes them).
        op (str or BinaryOp): ``"add"``, ``"sub"``, ``"mul"`` or ``"div"``.
        activation (str or Activation): ``"relu"``, ``"gelu"`` (erf form, as
            ``nn.gelu``), ``"gelu_approx"`` (tanh form) or ``"silu"``.
        relu_at_zero (float): ReLU's derivative at exactly 0: ``0.0`` as ``nn.relu``
            (``mx.maximum(z, 0)``), ``1.0`` as ``mx.maximum(0, z)``. Default: ``0.0``.

    Returns:
        array: the same values as the unfused ``act(a op b)`` in MLX.
    """
    # Fast path (the common call): two arrays of one shape and one fusable dtype, with
    # arguments seen before (their primitive is looked up by the arguments as passed).
    if type(a) is mx.array and type(b) is mx.array:
        try:
            fns = _SEEN.get((op, activation, relu_at_zero))
        except TypeError:  # an unhashable argument: the checks below judge it
            fns = None
        dtype = a.dtype
        if (fns is not None and a.shape == b.shape and dtype == b.dtype and dtype in FUSABLE and a.size
                and not tracing()):
            return (fns[0] if runs_mlx_code() else fns[1])(a, b)  # see _fused
    key = (op, activation, relu_at_zero)
    op, act = as_binary_op(op), as_activation(activation)
    if tracing():  # inside a fuse() trace: plain MLX ops, which the trace can capture and re-match
        return binary_reference(a, b, op, act, relu_at_zero)
    # A Python or NumPy number is weakly typed: it takes the other operand's float dtype.
    # Anything else that is not two float arrays (ints, bools, NumPy arrays, two numbers)
    # runs the unfused expression: MLX's own promotion, result and errors.
    if isinstance(a, mx.array) and not isinstance(b, mx.array) and as_number(b) is not None:
        if is_fusable_dtype(a.dtype):
            b = mx.array(as_number(b), dtype=a.dtype)
    elif isinstance(b, mx.array) and not isinstance(a, mx.array) and as_number(a) is not None:
        if is_fusable_dtype(b.dtype):
            a = mx.array(as_number(a), dtype=b.dtype)
    if not (isinstance(a, mx.array) and isinstance(b, mx.array)
            and is_fusable_dtype(a.dtype) and is_fusable_dtype(b.dtype)):
        return binary_reference(a, b, op, act, relu_at_zero)
    try:
        out_shape = mx.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return binary_reference(a, b, op, act, relu_at_zero)  # raises MLX's own error
    if _prod(out_shape) == 0:
        return binary_reference(a, b, op, act, relu_at_zero)
    dtype = promote(a.dtype, b.dtype)
    if a.dtype != dtype:
        a = a.astype(dtype)
    if b.dtype != dtype:
        b = b.astype(dtype)
    relu = float(relu_at_zero)
    if len(_SEEN) < _SEEN_SIZE and type(relu_at_zero) in (float, int):  # not arrays: hashed by identity
        _SEEN[key] = (_cpu_binary(op, act, relu), _binary_primitive(op, act, relu))
    return _fused(op, act, relu)(a, b)


# (op, activation, relu_at_zero) as callers pass them -> (CPU function, GPU primitive); a few dozen.
_SEEN: dict = {}
_SEEN_SIZE = 256


# --- the definition ----------------------------------------------------------------

_MLX_OPS = {BinaryOp.ADD: mx.add, BinaryOp.SUB: mx.subtract, BinaryOp.MUL: mx.multiply,
            BinaryOp.DIV: mx.divide}


def _broadcast_shape(a: tuple, b: tuple):
    try:
        return tuple(mx.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        return None


def _spelling(op: BinaryOp, act: Activation, fn, tie: float) -> Spelling:
    mlx_op = _MLX_OPS[op]

    def build(m):
        (a, b), out = m.args, m.output
        (a0, via_a), (b0, via_b) = m.unbroadcast(a), m.unbroadcast(b)
        # Prefer the un-broadcast operands, as long as together they still give the output shape.
        for (ia, va), (ib, vb) in (((a0, via_a), (b0, via_b)), ((a0, via_a), (b, [])),
                                   ((a, []), (b0, via_b)), ((a, []), (b, []))):
            if _broadcast_shape(ia.shape, ib.shape) == tuple(out.shape):
                params = {"op": op, "activation": act}
                if tie:
                    params["relu_at_zero"] = tie
                return [ia, ib], params, va + vb
        return None

    return Spelling(pattern=BinaryActivation(op, act), reference=lambda a, b: fn(mlx_op(a, b)),
                    example=lambda dt: (mx.zeros((4, 8), dt), mx.zeros((4, 8), dt)),
                    build=build, rule=f"binary+{act.value}")


def _spellings():
    return [_spelling(op, act, fn, tie) for act, fn, tie in activation_spellings() for op in BinaryOp]


def _call(ins, p):
    return [fused_binary(ins[0], ins[1], op=p["op"], activation=p["activation"],
                         relu_at_zero=p.get("relu_at_zero", 0.0))]


def _reference_call(ins, p):
    return [binary_reference(ins[0], ins[1], p["op"], p["activation"], p.get("relu_at_zero", 0.0))]


def _inputs(case, shape, dtype, key):
    """[a, b], both of `shape`; a divisor is kept away from 0 (a well-conditioned division)."""
    k1, k2, _ = mx.random.split(key, 3)
    a = mx.random.normal(shape, key=k1).astype(dtype)
    b = mx.random.normal(shape, key=k2).astype(dtype)
    if case.pattern.binary_op is BinaryOp.DIV:
        b = mx.where(mx.abs(b) < 0.25, 0.25, b).astype(dtype)
    return [a, b]


def _cases():
    return [OpCase(f"{op.value}+{act.value}", "binary", BinaryActivation(op, act),
                   lambda a, b, op=op, act=act: fused_binary(a, b, op, act),
                   lambda a, b, op=op, act=act: binary_reference(a, b, op, act), _inputs)
            for op in BinaryOp for act in Activation]


_MIL_OPS = {BinaryOp.ADD: "add", BinaryOp.SUB: "sub", BinaryOp.MUL: "mul", BinaryOp.DIV: "real_div"}


def _coreml(c, node, ins):
    a, b = c.operands(ins, node.outputs[0].shape)
    y = getattr(c.mb, _MIL_OPS[as_binary_op(node.params["op"])])(x=a, y=b)
    return [c.activation(y, node.params.get("activation"))]


DEFINITION = FusedOp(
    name="binary", order=0, node_op="FusedBinary", spellings=_spellings, call=_call,
    reference_call=_reference_call, cases=_cases, coreml=_coreml,
    kernels=(
        # act(a op b); a and b full, one element, row-broadcast or strided (see the body);
        # m = (op code, activation code), int32.
        KernelSpec("binary_activation", ("a", "b", "m"), ("out",), header_parts=("binary",)),
        # dz = g * act'(a op b) and, for mul/div, the two operand gradients.
        KernelSpec("binary_activation_backward", ("a", "b", "g", "m"), ("da", "db"),
                   header_parts=("binary_backward",)),
    ),
    doc="act(a op b): FusedBinary(a, b), params {pattern, op, activation}; a and b broadcast.")
