"""MIL emitters: one per op `eligibility.SUPPORTED_OPS` accepts (a test keeps them in sync).

``emit(ctx, node, inputs) -> [MIL values]``; `inputs` are MIL values, NumPy constants
(folded weights) or `_Bcast` (a broadcast not yet materialized). The fused ops' emitters
live in their definitions (mlx_fusion/ops/, `FusedOp.coreml`) and use `_Ctx`'s helpers.
Nothing here imports coremltools: `ctx.mb` is its MIL builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..graph.ir import Node
from ..ops.registry import DEFINITIONS

__all__ = ["EMITTERS", "ConversionError"]


class ConversionError(RuntimeError):
    """A block could not be expressed as a Core ML program."""


@dataclass
class _Bcast:
    """A broadcast not yet materialized: `src` (ndarray or Var) stands for `shape`."""

    src: object
    shape: tuple



# -- emitters: one per supported op ----------------------------------------------------------------
class _Ctx:
    def __init__(self, mb):
        self.mb = mb

    def shape(self, e) -> tuple:
        if isinstance(e, _Bcast):
            return e.shape
        if isinstance(e, np.ndarray):
            return e.shape
        return tuple(e.shape)

    def const(self, a: np.ndarray):
        """MIL accepts NumPy values as constants; scalars as 0-d fp16."""
        a = np.asarray(a, dtype=np.float16) if a.dtype.kind == "f" else a
        return np.float16(a.reshape(())) if a.size == 1 and a.ndim == 0 else a

    def full(self, e):
        """Materialize a broadcast."""
        if not isinstance(e, _Bcast):
            return self.const(e) if isinstance(e, np.ndarray) else e
        src = e.src if not isinstance(e.src, _Bcast) else self.full(e.src)
        if isinstance(src, (np.ndarray, np.generic)):
            return np.ascontiguousarray(np.broadcast_to(np.asarray(src, np.float16), e.shape))
        src_shape = (1,) * (len(e.shape) - len(src.shape)) + tuple(src.shape)
        if src_shape != tuple(src.shape):
            src = self.mb.reshape(x=src, shape=list(src_shape))
        reps = [t // s for t, s in zip(e.shape, src_shape)]
        return self.mb.tile(x=src, reps=reps) if any(r != 1 for r in reps) else src

    def operands(self, entries, out_shape):
        """Binary operands: broadcast sources when they still give `out_shape`, else materialized."""
        srcs = [e.src if isinstance(e, _Bcast) else e for e in entries]
        try:
            ok = tuple(np.broadcast_shapes(*(self.shape(s) for s in srcs))) == tuple(out_shape)
        except ValueError:
            ok = False
        if not ok or any(isinstance(s, _Bcast) for s in srcs):
            srcs = [self.full(e) for e in entries]
        return [self.const(s) if isinstance(s, np.ndarray) else s for s in srcs]

    def var(self, e):
        e = self.full(e)
        if isinstance(e, (np.ndarray, np.generic)):  # a dynamic op on a folded input
            return self.mb.const(val=np.asarray(e, np.float16))
        return e

    # What the fused ops' emitters (their definitions' `coreml`) build with.
    def activation(self, x, act):
        return _activation(self, x, act)

    def mm(self, node: Node, ins, bias=None):
        return _mm(self, node, ins, bias)

    def bias_vector(self, e, n: int):
        return _bias_vector(self, e, n)


def _binary(name):
    def emit(c: _Ctx, node: Node, ins):
        a, b = c.operands(ins, node.outputs[0].shape)
        return [getattr(c.mb, name)(x=a, y=b)]
    return emit


def _maximum(c: _Ctx, node: Node, ins):
    """relu as MLX spells it, Maximum(x, 0), becomes MIL relu."""
    a, b = c.operands(ins, node.outputs[0].shape)
    for x, z in ((a, b), (b, a)):
        if isinstance(z, (np.ndarray, np.generic)) and np.size(z) == 1 and float(np.asarray(z).reshape(-1)[0]) == 0.0 \
                and tuple(x.shape) == tuple(node.outputs[0].shape) and not isinstance(x, (np.ndarray, np.generic)):
            return [c.mb.relu(x=x)]
    return [c.mb.maximum(x=a, y=b)]


def _unary(name, **kw):
    def emit(c: _Ctx, node: Node, ins):
        return [getattr(c.mb, name)(x=c.var(ins[0]), **kw)]
    return emit


def _reshape(c: _Ctx, node: Node, ins):
    return [c.mb.reshape(x=c.var(ins[0]), shape=list(node.outputs[0].shape))]


def _activation(c: _Ctx, x, act):
    act = getattr(act, "value", act)
    if act is None:
        return x
    if act == "relu":
        return c.mb.relu(x=x)
    if act == "gelu":
        return c.mb.gelu(x=x, mode="EXACT")
    if act == "gelu_approx":
        return c.mb.gelu(x=x, mode="TANH_APPROXIMATION")
    if act == "silu":
        return c.mb.silu(x=x)
    raise ConversionError(f"activation {act!r}")


def _matmul_const(c: _Ctx, x, rhs: np.ndarray, bias=None):
    """x @ rhs (+ bias) with a constant 2-D rhs: MIL `linear` (weight is (N, K), like nn.Linear)."""
    if rhs.ndim == 2 and 1 <= len(x.shape) <= 3:
        kw = {"bias": c.const(bias)} if bias is not None else {}
        return c.mb.linear(x=x, weight=c.const(np.ascontiguousarray(rhs.T)), **kw)
    y = c.mb.matmul(x=x, y=c.const(rhs))
    return y if bias is None else c.mb.add(x=y, y=c.const(bias))


def _bias_vector(c: _Ctx, e, n: int) -> Optional[np.ndarray]:
    """A static bias that is one row of length n (or a scalar) as a (n,) vector, else None."""
    src = e.src if isinstance(e, _Bcast) else e
    if isinstance(src, np.ndarray) and src.size in (1, n) and (src.ndim == 0 or src.shape[-1] in (1, n)):
        return np.broadcast_to(src.reshape(-1), (n,)).astype(np.float16)
    return None


def _mm(c: _Ctx, node: Node, ins, bias=None):
    a, b = ins[0], ins[1]
    if isinstance(b, np.ndarray) and not isinstance(a, np.ndarray):
        return _matmul_const(c, c.var(a), b, bias)
    y = c.mb.matmul(x=c.var(a), y=c.var(b))
    return y if bias is None else c.mb.add(x=y, y=c.const(bias))


def _matmul(c: _Ctx, node: Node, ins):
    return [_mm(c, node, ins)]


def _addmm(c: _Ctx, node: Node, ins):
    alpha, beta = (float(p) for p in node.params)
    n = node.outputs[0].shape[-1]
    bias = _bias_vector(c, ins[2], n)
    if alpha == 1.0 and beta == 1.0 and bias is not None:
        return [_mm(c, node, ins, bias)]
    y = _mm(c, node, ins)
    if alpha != 1.0:
        y = c.mb.mul(x=y, y=np.float16(alpha))
    cterm = ins[2]
    if beta != 1.0:
        cterm = c.mb.mul(x=c.var(cterm), y=np.float16(beta))
    y2, c2 = c.operands([y, cterm], node.outputs[0].shape)
    return [c.mb.add(x=y2, y=c2)]


_REDUCE_MIL = {2: "reduce_sum", 3: "reduce_prod", 4: "reduce_min", 5: "reduce_max"}

EMITTERS = {
    "Matmul": _matmul,
    "AddMM": _addmm,
    "Add": _binary("add"), "Subtract": _binary("sub"), "Multiply": _binary("mul"),
    "Divide": _binary("real_div"), "Maximum": _maximum, "Minimum": _binary("minimum"),
    "Power": _binary("pow"),
    "Exp": _unary("exp"), "Erf": _unary("erf"), "Tanh": _unary("tanh"), "Sigmoid": _unary("sigmoid"),
    "Abs": _unary("abs"), "Square": _unary("square"), "Sin": _unary("sin"), "Cos": _unary("cos"),
    "Log": _unary("log"),
    "Sqrt": lambda c, n, ins: [(c.mb.rsqrt if n.params[0] else c.mb.sqrt)(x=c.var(ins[0]))],
    "Negative": lambda c, n, ins: [c.mb.mul(x=c.var(ins[0]), y=np.float16(-1.0))],
    "Copy": lambda c, n, ins: [ins[0]],
    "AsType": lambda c, n, ins: [ins[0]],  # float -> float: everything is fp16 here
    "Softmax": lambda c, n, ins: [c.mb.softmax(x=c.var(ins[0]), axis=-1)],
    "LogSumExp": lambda c, n, ins: [c.mb.reduce_log_sum_exp(x=c.var(ins[0]), axes=[-1], keep_dims=True)],
    "Reduce": lambda c, n, ins: [getattr(c.mb, _REDUCE_MIL[n.params[0]])(
        x=c.var(ins[0]), axes=[int(a) for a in n.params[1]], keep_dims=True)],
    "Reshape": _reshape, "Flatten": _reshape, "Unflatten": _reshape, "Squeeze": _reshape,
    "ExpandDims": _reshape,
    "Transpose": lambda c, n, ins: [c.mb.transpose(x=c.var(ins[0]), perm=[int(p) for p in n.params[0]])],
    "Broadcast": lambda c, n, ins: [_Bcast(ins[0], tuple(n.outputs[0].shape))],
    # one per fused op definition that has a Core ML emitter
    **{d.node_op: d.coreml for d in DEFINITIONS if d.coreml is not None},
}
