"""Residual add + norm: ``h = x + r; y = rms_norm(h, w, eps)`` (or ``layer_norm(h, w, b, eps)``,
ops/add_layer_norm.py) as one primitive with two outputs; this module holds the definition of both.

``h`` is an output too: in a transformer block it is the residual stream the next add
reads (mlx-lm's llama: ``h = x + attn(...)``, ``mlp(post_attention_layernorm(h))``,
``out = h + mlp``; ``out`` feeds the next layer's ``input_layernorm``).

On a GPU the forward is one row-wise kernel, `add_rms_norm` (one threadgroup/block per
row, the sum of squares reduced in float32): it reads x, r, w once and writes h, y and
the per-row ``rstd = 1/sqrt(mean(h^2) + eps)`` (float32, a hidden output). The backward
keeps h and rstd only (not the normalized tensor) and runs `add_rms_norm_backward`, one
kernel per row for ``dx = dr = dh + rstd * (g - n * mean(g * n))`` with ``g = dy * w``,
``n = h * rstd``; ``dw = sum_rows(dy * n)`` is an MLX reduction.

On the CPU the op is MLX's own code, ``x + r`` and ``mx.fast.rms_norm`` (already one op
there), with MLX's own autodiff: a custom primitive measured no faster than that, and
slower with its backward (docs/add-norm.md, tools/add_norm_cpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import mlx.core as mx

from .. import kernels
from ..kernels import KernelSpec
from .add_layer_norm import add_layer_norm_reference, fused_add_layer_norm
from .base import FusedOp, OpCase, Spelling, Workload
from .common import FUSED_DTYPES, f32, runs_mlx_code, with_reference_rules

__all__ = ["AddNorm", "fused_add_rms_norm", "add_rms_norm_reference", "fused_add_layer_norm",
           "add_layer_norm_reference", "DEFINITION"]


@dataclass(frozen=True)
class AddNorm:
    """h = x + r; y = norm(h, w, eps), both outputs from one kernel."""

    norm: str = "rms_norm"

    @property
    def name(self) -> str:
        return f"add+{self.norm}"


ADD_RMS_NORM = AddNorm("rms_norm")
ADD_LAYER_NORM = AddNorm("layer_norm")


def add_rms_norm_reference(x, residual, weight=None, eps: float = 1e-5) -> Tuple[mx.array, mx.array]:
    """(h, y) with h = x + residual and y = mx.fast.rms_norm(h, weight, eps), op by op."""
    h = x + residual
    return h, mx.fast.rms_norm(h, weight, eps)


# --- kernel launches ------------------------------------------------------------------

def _threads(d: int) -> int:
    """Threads per row: one per element up to 256 (whole simdgroups/warps), then each
    thread walks the row in strides of 256."""
    return min(256, max(32, -(-d // 32) * 32))


@lru_cache(maxsize=None)
def _eps_array(eps: float) -> mx.array:
    """eps as a one-element float32 input, made once per value (not a template constant:
    the kernels take it at run time, so one compiled kernel per dtype serves every model)."""
    e = mx.array([eps], dtype=mx.float32)
    mx.eval(e)
    return e


def _add_rms_launch(kernel, dtype, shape, has_weight: bool):
    rows, d = _prod(shape[:-1]), shape[-1]
    tg = _threads(d)
    return kernels.make_launch(kernel, [shape, shape, (rows,)], [dtype, dtype, mx.float32], (rows * tg, 1, 1),
                               (tg, 1, 1), [("T", dtype), ("HAS_WEIGHT", has_weight)])


def _prod(shape) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


def launch_add_rms_norm(x, r, w, eps: float):
    """(h, y, rstd) for row-contiguous (..., D) x, r and w (D,) or None, in one kernel: h and y
    of x's shape (the kernels read only the last dimension, so no reshape nodes), rstd (rows,).
    The launch is made once per (backend, dtype, shape, weight)."""
    launch = _LAUNCHES[(kernels.backend_key(), x.dtype, x.shape, w is not None)]
    return launch(inputs=[x, r, w if w is not None else x, _eps_array(eps)])


_LAUNCHES = kernels.LaunchCache("add_rms_norm", _add_rms_launch)  # (backend, dtype, shape, has weight)


def launch_add_rms_norm_backward(h2, w, rstd, dy2, dh2):
    """dx (= dr) for (rows, D) h2, dy2, dh2 and float32 rstd (rows,), in one kernel."""
    rows, d = h2.shape
    tg = _threads(d)
    return kernels.get_kernel("add_rms_norm_backward")(
        inputs=[h2, w if w is not None else h2, rstd, dy2, dh2],
        output_shapes=[(rows, d)], output_dtypes=[h2.dtype],
        grid=(rows * tg, 1, 1), threadgroup=(tg, 1, 1),
        template=[("T", h2.dtype), ("HAS_WEIGHT", w is not None)])[0]


# --- the primitive -----------------------------------------------------------------------

@mx.compile
def weight_grad(dy2, h2, rstd, mean):
    """sum over rows of dy * (h - mean) * rstd in float32, for (rows, D) dy2, h2 and float32 (rows,)
    rstd, mean (0 for RMSNorm). Compiled: the product is one pass into the reduction, not three
    float32 (rows, D) temporaries."""
    return (f32(dy2) * ((f32(h2) - mean[..., None]) * rstd[:, None])).sum(axis=0)


def _rstd(h, eps):
    """1/sqrt(mean(h^2) + eps) per row, in float32 as the kernel computes it."""
    hf = f32(h)
    return mx.rsqrt(mx.mean(hf * hf, axis=-1) + eps)


@lru_cache(maxsize=None)
def _add_rms_primitive(has_weight: bool, eps: float):
    """The GPU primitive: (h, y, rstd) from one kernel, the backward from another."""

    def parts(x, r, *w):  # what the kernels compute, as MLX code (jvp, vmap)
        h = x + r
        return h, mx.fast.rms_norm(h, w[0] if w else None, eps), _rstd(h, eps).reshape(-1)

    e = _eps_array(eps)

    @mx.custom_function
    def fused(x, r, *w):
        # stop_gradient: MLX's jvp must not trace into the kernel; this function's rules stand for it.
        x, r = mx.stop_gradient(x), mx.stop_gradient(r)
        w = mx.stop_gradient(w[0]) if has_weight else x
        return _LAUNCHES[(kernels.backend_key(), x.dtype, x.shape, has_weight)](inputs=[x, r, w, e])

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        # Saved for the backward: h and rstd (float32, one per row), never the normalized tensor.
        w = primals[2] if has_weight else None
        h, rstd = outputs[0], outputs[2]
        dh, dy = cotangents[0], cotangents[1]
        dh = mx.zeros_like(h) if dh is None else dh.astype(h.dtype)
        dy = mx.zeros_like(h) if dy is None else dy.astype(h.dtype)
        d = h.shape[-1]
        h2, dy2 = h.reshape(-1, d), dy.reshape(-1, d)
        dx = launch_add_rms_norm_backward(h2, w, rstd, dy2, dh.reshape(-1, d)).reshape(h.shape)
        if not has_weight:
            return dx, dx
        return dx, dx, weight_grad(dy2, h2, rstd, mx.zeros((), mx.float32)).astype(w.dtype)

    return with_reference_rules(fused, parts, outputs=3)  # parts: the kernel's 3 outputs as MLX code


def fused_add_rms_norm(x: mx.array, residual: mx.array, weight: Optional[mx.array] = None,
                       eps: float = 1e-5) -> Tuple[mx.array, mx.array]:
    """``h = x + residual`` and ``y = mx.fast.rms_norm(h, weight, eps)`` as one fused primitive.

    Args:
        x (array): input of shape ``(..., D)``.
        residual (array): the same shape and dtype as ``x``.
        weight (array, optional): ``(D,)``, as ``nn.RMSNorm.weight``. Default: ``None`` (no scale).
        eps (float): added to the mean square. Default: ``1e-5``.

    Returns:
        tuple(array, array): ``(h, y)``, the same values as the unfused code. Anything else
        (other shapes, dtypes, broadcasting, empty arrays) runs the unfused code, with MLX's
        own result or error.
    """
    if (type(x) is mx.array and type(residual) is mx.array and x.shape == residual.shape
            and x.dtype == residual.dtype and x.dtype in FUSED_DTYPES and x.ndim and x.size
            and (weight is None or (type(weight) is mx.array and weight.dtype == x.dtype
                                    and weight.shape == x.shape[-1:]))
            and not runs_mlx_code()):
        if weight is None:
            out = _add_rms_primitive(False, float(eps))(x, residual)
        else:
            out = _add_rms_primitive(True, float(eps))(x, residual, weight)
        return out[0], out[1]
    # The CPU: MLX's own code is the fused op. Its rms_norm is already one op there, and a
    # custom primitive measured slower than it (docs/add-norm.md), so nothing is replaced.
    # A shapeless trace accepts no custom primitive (mlx_fusion/_shapeless.py).
    return add_rms_norm_reference(x, residual, weight, eps)


# --- the definition ----------------------------------------------------------------

# The example's eps and D: their values in the trace (eps, and 1/D of the mean on the
# CPU; RMSNorm's [eps] argument on a GPU) are bound by the match, not compared.
_EPS, _D = 1e-5, 8


def _rms_reference(x, r, w):
    h = x + r
    return h, mx.fast.rms_norm(h, w, _EPS)


def _layer_reference(x, r, w, b):
    h = x + r
    return h, mx.fast.layer_norm(h, w, b, _EPS)


def _example(rank, vectors):
    shape = (4, _D) if rank == 2 else (2, 4, _D)
    return lambda dt: (mx.zeros(shape, dt), mx.zeros(shape, dt)) + (mx.zeros((_D,), dt),) * vectors


def _gpu_graph(op, vectors):
    """The GPU export of a reference (``Add``, then ``RMSNorm(h, w) [eps]`` or ``LayerNorm(h, w, b)
    [eps]``), built by hand: on the CPU, mx.fast's norms trace as their decomposition, so a CPU
    session cannot trace this spelling (on a GPU the traced spelling gives the same pattern)."""
    from ..graph.ir import Graph, Node, Value

    def graph(dtype):
        x, r = Value("x", (4, _D), dtype), Value("r", (4, _D), dtype)
        vs = [Value(n, (_D,), dtype) for n in "wb"[:vectors]]
        h, y = Value("h", (4, _D), dtype), Value("y", (4, _D), dtype)
        eps = float(mx.array(_EPS, mx.float32).item())
        return Graph([x, r, *vs], [h, y], [Node(0, "Add", [x, r], [h]), Node(1, op, [h, *vs], [y], (eps,))])

    return graph


def _builder(vectors):
    """build for a spelling with `vectors` (D,) operands (w; w and b), then eps (and 1/D on the CPU)."""

    def build(m):
        x, r, vs = m.args[0], m.args[1], m.args[2:2 + vectors]
        eps = m.args[2 + vectors]
        inv_d = m.args[3 + vectors] if len(m.args) > 3 + vectors else None
        h, y = m.outputs
        d = x.shape[-1] if x.shape else 0
        if not tuple(x.shape) == tuple(r.shape) == tuple(y.shape) == tuple(h.shape):
            return None
        if any(tuple(v.shape) != (d,) for v in vs):
            return None  # a GPU norm without weight/bias records a 0-d placeholder
        if inv_d is not None and inv_d != mx.array(1.0 / d, mx.float32).item():
            return None  # the CPU decomposition's mean multiplies by 1/D (float32): another D is another function
        return [x, r, *vs], {"eps": float(eps)}, []

    return build


def _spellings():
    out = []
    # add+layer_norm is not searched for: its kernels are not verified on a GPU (docs/add-norm.md);
    # its spellings come back here when they are.
    for pattern, ref, vectors, op in ((ADD_RMS_NORM, _rms_reference, 1, "RMSNorm"),):
        rule, build = pattern.name, _builder(vectors)
        out += [Spelling(pattern=pattern, reference=ref, example=_example(rank, vectors), build=build,
                         rule=rule, constants=(_EPS, 1.0 / _D)) for rank in (3, 2)]
        out.append(Spelling(pattern=pattern, reference=ref, example=_example(2, vectors), build=build,
                            rule=rule, constants=(_EPS,), graph=_gpu_graph(op, vectors)))
    return out


def _call(ins, p):
    if p["pattern"] == ADD_LAYER_NORM:
        return list(fused_add_layer_norm(*ins[:4], eps=p["eps"]))
    return list(fused_add_rms_norm(ins[0], ins[1], ins[2], p["eps"]))


def _reference_call(ins, p):
    if p["pattern"] == ADD_LAYER_NORM:
        return list(add_layer_norm_reference(*ins[:4], eps=p["eps"]))
    return list(add_rms_norm_reference(ins[0], ins[1], ins[2], p["eps"]))


CASE_EPS = 1e-5


def _pack(h, y):
    """The case's one output: y + h / 2, so the registry tests (written for one output) see
    both, with different cotangents (a swapped dh/dy would show)."""
    return y + h * 0.5


def _inputs(case, shape, dtype, key):
    """[x, r, w(, b)]: x and r of `shape`, w (shape[-1],) around 1, b (layer_norm) around 0."""
    k1, k2, k3, k4 = mx.random.split(key, 4)
    x = mx.random.normal(shape, key=k1).astype(dtype)
    r = mx.random.normal(shape, key=k2).astype(dtype)
    w = (1.0 + 0.5 * mx.random.normal(shape[-1:], key=k3)).astype(dtype)
    if case.pattern == ADD_LAYER_NORM:
        return [x, r, w, (0.5 * mx.random.normal(shape[-1:], key=k4)).astype(dtype)]
    return [x, r, w]


def _defaults(gpu: bool, quick: bool = False) -> list:
    """(rows, D): decode (one row) and prefill/training shapes of a 2048/4096 hidden size."""
    if quick:
        return [(1, 2048), (256, 2048)]
    return [(1, 4096), (32, 4096), (4096, 4096)] if gpu else [(1, 2048), (64, 2048), (512, 2048)]


ROWS = Workload(
    shape_for_size=lambda n: (max(1, n // min(n, 2048)), min(n, 2048)),
    output_size=lambda s: s[0] * s[-1],
    copy_size=lambda s: s[0] * s[-1],
    flops=lambda s: 0.0,
    default_shapes=_defaults)


def _cases():
    return [OpCase(ADD_RMS_NORM.name, "add_norm", ADD_RMS_NORM,
                   lambda x, r, w=None: _pack(*fused_add_rms_norm(x, r, w, CASE_EPS)),
                   lambda x, r, w=None: _pack(*add_rms_norm_reference(x, r, w, CASE_EPS)), _inputs, ROWS),
            OpCase(ADD_LAYER_NORM.name, "add_norm", ADD_LAYER_NORM,
                   lambda x, r, w=None, b=None: _pack(*fused_add_layer_norm(x, r, w, b, CASE_EPS)),
                   lambda x, r, w=None, b=None: _pack(*add_layer_norm_reference(x, r, w, b, CASE_EPS)),
                   _inputs, ROWS)]


DEFINITION = FusedOp(
    name="add_norm", order=3, node_op="FusedAddNorm", spellings=_spellings, call=_call,
    reference_call=_reference_call, cases=_cases,
    kernels=(
        # h = x + r, y = rms_norm(h, w, e[0]) and rstd per row; one threadgroup/block per row of
        # x (rows, D). w is read only when HAS_WEIGHT; e is eps (float32, one element).
        KernelSpec("add_rms_norm", ("x", "r", "w", "e"), ("h", "y", "rstd"), elementwise=False,
                   ensure_row_contiguous=True, shared_header=False, templates=(("HAS_WEIGHT", (False, True)),)),
        # dx = dh + rstd * (g - n * mean(g * n)), g = dy * w, n = h * rstd; one block per row.
        KernelSpec("add_rms_norm_backward", ("h", "w", "rstd", "dy", "dh"), ("dx",), elementwise=False,
                   ensure_row_contiguous=True, shared_header=False, templates=(("HAS_WEIGHT", (False, True)),)),
        # h = x + r, y = layer_norm(h, w, b, e[0]), mean and rstd per row; as add_rms_norm.
        KernelSpec("add_layer_norm", ("x", "r", "w", "b", "e"), ("h", "y", "mean", "rstd"), elementwise=False,
                   ensure_row_contiguous=True, shared_header=False,
                   templates=(("HAS_WEIGHT", (False, True)), ("HAS_BIAS", (False, True)))),
        # dx = dh + rstd * (g - mean(g) - n * mean(g * n)), g = dy * w, n = (h - mean) * rstd.
        KernelSpec("add_layer_norm_backward", ("h", "w", "mean", "rstd", "dy", "dh"), ("dx",), elementwise=False,
                   ensure_row_contiguous=True, shared_header=False, templates=(("HAS_WEIGHT", (False, True)),)),
    ),
    doc="h = x + r; y = rms_norm(h, w, eps) or layer_norm(h, w, b, eps): FusedAddNorm(x, r, w[, b]) -> (h, y), "
        "params {pattern, eps}.")
