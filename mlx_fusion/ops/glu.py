"""The gated linear unit: act(g) * u for silu (SwiGLU), gelu and gelu_approx (GeGLU).

The MLP of llama / mistral / qwen (``swiglu(gate, x) = nn.silu(gate) * x`` in
mlx_lm.models.activations) and of gemma (``nn.gelu_approx(gate) * x``). One
`mx.custom_function` whose forward runs the `glu` kernel (Metal or CUDA, from
metal_src/) and whose vjp runs `glu_backward`: the backward keeps only g and u
(not act(g), not the product) and recomputes act(g) in the kernel that writes
``dg = dy * u * act'(g)`` and ``du = dy * act(g)``. On the CPU, where MLX has no
custom-kernel API, `fused_glu` runs MLX's own expression under `mx.compile`
instead (see `_cpu_glu` for why), and MLX's autodiff differentiates it.

Only two arrays of one shape and one fusable dtype are fused; anything else
(broadcast operands, mixed or integer dtypes, empty arrays) runs the unfused
reference, so results, promotion and errors are MLX's own. In the models both
operands are projections of the same input, so they always share a shape.
`DEFINITION` (at the end) is the op as the rest of mlx-fusion sees it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Union

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..kernels import KernelSpec
from ..patterns import Activation, GatedActivation, as_activation
from .base import FusedOp, OpCase, Spelling
from .common import FUSED_DTYPES, activation_grad, cpu_compile, f32, runs_mlx_code, same_shape_launch, \
    with_reference_rules
from .scalar import _run

__all__ = ["fused_glu", "glu_reference", "launch_glu", "launch_glu_backward", "GLU_ACTIVATIONS", "DEFINITION"]

# The gates of the models MLX users run; ReGLU (relu) is rare and would need both
# of MLX's ReLU tie conventions, so it is left unfused.
GLU_ACTIVATIONS = (Activation.SILU, Activation.GELU, Activation.GELU_APPROX)

# How mlx.nn spells each gate (the code a user's MLP calls; `nn.silu` is also what
# mlx-lm's compiled `swiglu` runs).
_NN = {Activation.SILU: nn.silu, Activation.GELU: nn.gelu, Activation.GELU_APPROX: nn.gelu_approx}


def _gate(activation) -> Activation:
    act = as_activation(activation)
    if act not in GLU_ACTIVATIONS:
        raise ValueError(f"unsupported GLU activation {act.value!r}; expected one of "
                         f"{[a.value for a in GLU_ACTIVATIONS]}")
    return act


def glu_reference(g, u, activation="silu") -> mx.array:
    """act(g) * u computed by MLX op by op: the ground truth for fused_glu."""
    return _gate(activation).reference(g) * u


# --- kernel launches -------------------------------------------------------------------

@lru_cache(maxsize=None)
def _mode(act: Activation) -> mx.array:
    """The activation code for the kernels (one int32 element, made once per gate)."""
    m = mx.array([act.code], dtype=mx.int32)
    mx.eval(m)
    return m


def _view(x: mx.array) -> mx.array:
    # 0-d inputs reach the kernels as (1,): MLX passes no shape buffers for 0-d arrays.
    return x.reshape(1) if x.ndim == 0 else x


def launch_glu(act: Activation, g: mx.array, u: mx.array) -> mx.array:
    """act(g) * u by the `glu` kernel; g and u share shape and dtype."""
    out = _run("glu", [_view(g), _view(u), _mode(act)], [_view(g).shape], g.dtype, g.size)[0]
    return out.reshape(g.shape)


def launch_glu_backward(act: Activation, g: mx.array, u: mx.array, dy: mx.array):
    """(dg, du) of act(g) * u for cotangent dy, in one kernel."""
    dy = dy.astype(g.dtype) if dy.dtype != g.dtype else dy
    shape = _view(g).shape
    dg, du = _run("glu_backward", [_view(g), _view(u), _view(dy), _mode(act)], [shape, shape], g.dtype, g.size)
    return dg.reshape(g.shape), du.reshape(g.shape)


# --- the fused primitive ---------------------------------------------------------------

@lru_cache(maxsize=None)
def _cpu_glu(act: Activation):
    """The CPU path: act(g) * u as MLX code under `mx.compile` (one loop when called eagerly).

    Not a custom vjp: under mx.grad / mx.vjp the inputs are tracers, and MLX runs a compiled
    function with tracer inputs op by op, so a custom vjp's "fused" CPU backward runs eagerly,
    and recomputing act(g) there costs a second sigmoid/erf/tanh pass: slower than the
    unfused code (measured: docs/llm-ops.md). MLX's own expression is exactly as fast as
    the unfused code eagerly and fuses with its neighbours inside an outer mx.compile.
    (The GPU paths keep the memory-lean vjp.)
    """
    return cpu_compile(lambda g, u: act.reference(g) * u, act)


_LAUNCHES = kernels.LaunchCache("glu", same_shape_launch)  # (backend, dtype, shape)


@lru_cache(maxsize=None)
def _glu_primitive(act: Activation):
    fn = act.reference

    def reference(g, u):
        return fn(g) * u

    # Only reached on the CPU when the device changes between the call and its vjp (fused_glu
    # sends CPU calls to _cpu_glu): the kernels' math in float32 as MLX expressions.
    cpu_forward = cpu_compile(lambda g, u: (fn(f32(g)) * f32(u)).astype(g.dtype), act)

    @mx.compile
    def cpu_backward(g, u, dy):
        g32, d32 = f32(g), f32(dy)
        dg = d32 * f32(u) * activation_grad(act, g32)
        du = d32 * fn(g32)
        return dg.astype(g.dtype), du.astype(g.dtype)

    mode = _mode(act)

    @mx.custom_function
    def fused(g, u):
        backend = kernels.backend_key()
        if backend is None:
            return cpu_forward(g, u)
        # stop_gradient: MLX's jvp must not trace into the kernel (see binary.py).
        g, u = mx.stop_gradient(g), mx.stop_gradient(u)
        if g.ndim:  # the common call: one launch made per (dtype, shape), no views
            return _LAUNCHES[(backend, g.dtype, g.shape)](inputs=[g, u, mode])[0]
        return launch_glu(act, g, u)

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        g, u = primals  # all the backward keeps: act(g) is recomputed
        if kernels.kernel_backend() is None:
            return cpu_backward(g, u, cotangent)
        return launch_glu_backward(act, g, u, cotangent)

    return with_reference_rules(fused, reference)


def fused_glu(g: mx.array, u: mx.array, activation: Union[str, Activation] = "silu") -> mx.array:
    """``act(g) * u`` as one fused primitive (SwiGLU, GeGLU).

    Args:
        g (array): the gate (the gate projection's output).
        u (array): the value it gates (the up projection's output).
        activation (str or Activation): ``"silu"`` (as ``nn.silu``), ``"gelu"`` (erf
            form, as ``nn.gelu``) or ``"gelu_approx"`` (tanh form, as ``nn.gelu_approx``).
            Default: ``"silu"``.

    Returns:
        array: the same values as the unfused ``act(g) * u`` in MLX. Operands of
        different shapes or dtypes, non-float dtypes and empty arrays run unfused; on
        the CPU it is MLX's own expression under ``mx.compile`` (docs/llm-ops.md).
    """
    try:
        fns = _SEEN.get(activation)
    except TypeError:  # unhashable: _gate says what is wrong with it
        fns = None
    if fns is None:
        act = _gate(activation)
        fns = (_cpu_glu(act), _glu_primitive(act), act)
        if len(_SEEN) < 64:
            _SEEN[activation] = fns
    if (isinstance(g, mx.array) and isinstance(u, mx.array) and g.shape == u.shape and g.dtype == u.dtype
            and g.dtype in FUSED_DTYPES and g.size):
        return fns[0](g, u) if runs_mlx_code() else fns[1](g, u)  # the CPU, or a shapeless trace
    return glu_reference(g, u, fns[2])


# activation as passed -> (CPU function, GPU primitive, Activation): looked up once per call.
_SEEN: dict = {}


# --- the definition --------------------------------------------------------------------

def _spelling(act: Activation, gate_first: bool) -> Spelling:
    nn_fn = _NN[act]

    def build(m):
        (g, u), out = m.args, m.output
        if m.is_constant(g) or m.is_constant(u):
            return None  # act(g) * 2.0 is not a gated unit
        if m.unbroadcast(g)[1] or m.unbroadcast(u)[1]:
            return None  # broadcast operands stay unfused (see fused_glu)
        if not tuple(g.shape) == tuple(u.shape) == tuple(out.shape):
            return None
        return [g, u], {"activation": act}, []

    # Multiply matches either operand order (graph/pattern.py), so `u * act(g)` needs no
    # spelling of its own; listing it costs nothing and documents that it is covered.
    reference = (lambda g, u: nn_fn(g) * u) if gate_first else (lambda g, u: u * nn_fn(g))
    return Spelling(pattern=GatedActivation(act), reference=reference,
                    example=lambda dt: (mx.zeros((4, 8), dt), mx.zeros((4, 8), dt)),
                    build=build, rule=f"glu+{act.value}")


def _spellings():
    return [_spelling(act, first) for act in GLU_ACTIVATIONS for first in (True, False)]


def _call(ins, p):
    return [fused_glu(ins[0], ins[1], p["activation"])]


def _reference_call(ins, p):
    return [glu_reference(ins[0], ins[1], p["activation"])]


def _inputs(case, shape, dtype, key):
    """[g, u], both of `shape`."""
    k1, k2 = mx.random.split(key)
    return [mx.random.normal(shape, key=k1).astype(dtype), mx.random.normal(shape, key=k2).astype(dtype)]


def _cases():
    return [OpCase(f"glu+{act.value}", "glu", GatedActivation(act),
                   lambda g, u, act=act: fused_glu(g, u, act),
                   lambda g, u, act=act: glu_reference(g, u, act), _inputs)
            for act in GLU_ACTIVATIONS]


def _coreml(c, node, ins):
    g, u = c.operands(ins, node.outputs[0].shape)
    return [c.mb.mul(x=c.activation(g, node.params["activation"]), y=u)]


DEFINITION = FusedOp(
    name="glu", order=3, node_op="FusedGLU", spellings=_spellings, call=_call,
    reference_call=_reference_call, cases=_cases, coreml=_coreml,
    kernels=(
        # act(g) * u; g, u row contiguous of one shape; m = (activation code,), int32.
        KernelSpec("glu", ("g", "u", "m"), ("out",), ensure_row_contiguous=True),
        # dg = dy * u * act'(g), du = dy * act(g), recomputing act(g).
        KernelSpec("glu_backward", ("g", "u", "dy", "m"), ("dg", "du"), ensure_row_contiguous=True),
    ),
    doc="act(g) * u: FusedGLU(g, u), params {pattern, activation}; g and u of one shape.")
