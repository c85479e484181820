"""Run a `Graph` with MLX ops.

`PRIMITIVES` maps each primitive name (as `mx.export_function` reports it) to
``fn(inputs: list[mx.array], params) -> list[mx.array]``; `params` is the
node's exported argument tuple (layouts from `state()` in MLX's
primitives.h / fast_primitives.h, with null fields dropped) or, for fused
nodes, their settings dict. An entry marked with `wants_outputs` also gets
``outputs=`` (the node's output `Value`s) for the few primitives whose result
dtype or shape is not in their arguments. The indexing entries are in
`index_primitives`, the mx.fast / MoE / quantized ones in `model_primitives`.

`plan` resolves every node before anything runs, so an unknown primitive
raises `UnsupportedPrimitive` early and the caller can fall back. `Replay`
runs a plan, by default under `mx.compile` (shapes are fixed per trace and the
fused ops are `custom_function`s, which compile keeps).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import mlx.core as mx

from .ir import Graph, Value
from .index_primitives import gather as _gather, indices as _indices, masked_scatter as _masked_scatter
from .index_primitives import scatter as _scatter
from .model_primitives import QMODES as _QMODES, cross_entropy as _cross_entropy, gather_mm as _gather_mm
from .model_primitives import gather_qmm as _gather_qmm, quantized_matmul as _qmm, rope as _rope, sdpa as _sdpa
from .model_primitives import layer_norm_vjp as _layer_norm_vjp, rms_norm_vjp as _rms_norm_vjp, sdpa_vjp as _sdpa_vjp
from .merge import NODE_OP as _MERGED, merged_primitive as _merged_primitive

__all__ = ["PRIMITIVES", "UnsupportedPrimitive", "register_primitive", "plan", "Replay", "run_graph"]


class UnsupportedPrimitive(NotImplementedError):
    """The interpreter has no entry for a primitive (raised at plan time)."""

    def __init__(self, name: str, detail: str = ""):
        super().__init__(f"unsupported primitive {name}" + (f": {detail}" if detail else ""))
        self.name = name


def _wants_outputs(fn):
    fn.wants_outputs = True
    return fn


def _refuse_if(pred, why):
    """Attach a plan-time check: nodes whose params match `pred` are unsupported."""

    def wrap(fn):
        def check(node):
            if pred(node.params):
                raise UnsupportedPrimitive(node.op, why)

        fn.check = check
        return fn

    return wrap


# -- elementwise ---------------------------------------------------------------
_UNARY = {
    "Abs": mx.abs, "ArcCos": mx.arccos, "ArcCosh": mx.arccosh, "ArcSin": mx.arcsin,
    "ArcSinh": mx.arcsinh, "ArcTan": mx.arctan, "ArcTanh": mx.arctanh, "Ceil": mx.ceil,
    "Conjugate": mx.conjugate, "Cos": mx.cos, "Cosh": mx.cosh, "Erf": mx.erf, "ErfInv": mx.erfinv,
    "Exp": mx.exp, "Expm1": mx.expm1, "Floor": mx.floor, "Imag": mx.imag, "Log1p": mx.log1p,
    "LogicalNot": mx.logical_not, "Negative": mx.negative, "Real": mx.real, "Round": mx.round,
    "Sigmoid": mx.sigmoid, "Sign": mx.sign, "Sin": mx.sin, "Sinh": mx.sinh, "Square": mx.square,
    "Tan": mx.tan, "Tanh": mx.tanh, "StopGradient": mx.stop_gradient,
    # Copy/Full only materialize their input (Full's input is already broadcast).
    "Copy": lambda x: x, "Full": lambda x: x,
}
_BINARY = {
    "Add": mx.add, "ArcTan2": mx.arctan2, "Divide": mx.divide, "Greater": mx.greater,
    "GreaterEqual": mx.greater_equal, "Less": mx.less, "LessEqual": mx.less_equal,
    "LogAddExp": mx.logaddexp, "LogicalAnd": mx.logical_and, "LogicalOr": mx.logical_or,
    "FloorDivide": mx.floor_divide, "Maximum": mx.maximum, "Minimum": mx.minimum, "Multiply": mx.multiply,
    "NotEqual": mx.not_equal, "Power": mx.power, "Remainder": mx.remainder, "Subtract": mx.subtract,
}
_LOG = {0: mx.log2, 1: mx.log10, 2: mx.log}  # Log::Base {two, ten, e}
_BITWISE = {0: mx.bitwise_and, 1: mx.bitwise_or, 2: mx.bitwise_xor, 3: mx.left_shift, 4: mx.right_shift}
# Reduce::ReduceType {And, Or, Sum, Prod, Min, Max}; the primitive keeps dims.
_REDUCE = {0: mx.all, 1: mx.any, 2: mx.sum, 3: mx.prod, 4: mx.min, 5: mx.max}
# Scan::ReduceType {Max, Min, Sum, Prod, LogAddExp}
_SCAN = {0: mx.cummax, 1: mx.cummin, 2: mx.cumsum, 3: mx.cumprod, 4: mx.logcumsumexp}


def _equal(ins, p):
    a, b = ins
    if p and p[0]:  # NaNEqual: NaNs compare equal
        return [mx.logical_or(mx.equal(a, b), mx.logical_and(mx.isnan(a), mx.isnan(b)))]
    return [mx.equal(a, b)]


def _optional(x):
    """MLX records a missing norm weight/bias as a 0-d placeholder (a real one is 1-D)."""
    return None if x.ndim == 0 else x


def _slice(ins, p):
    start, stop, strides = p
    # Exported bounds are normalized; for a negative stride "before index 0"
    # is a negative stop, which Python slicing would wrap, so use None.
    idx = tuple(slice(a, None if (s < 0 and b < 0) else b, s) for a, b, s in zip(start, stop, strides))
    return [ins[0][idx]]


@_refuse_if(lambda p: p[0] != 4, "SliceUpdate with a reduction")  # ReduceType None = 4
def _slice_update(ins, p):
    reduce_type, start, stop, strides = p
    idx = tuple(slice(a, None if (s < 0 and b < 0) else b, s) for a, b, s in zip(start, stop, strides))
    # `__setitem__` rewrites the Python object in place; a fresh handle keeps
    # the interpreter's environment value intact.
    out = mx.array(ins[0])
    out[idx] = ins[1]
    return [out]


@_wants_outputs
def _broadcast_axes(ins, p, outputs):
    ignore = {a % len(outputs[0].shape) for a in p[0]}
    outs = []
    for x, v in zip(ins, [outputs[0]] * len(ins)):
        shape = tuple(x.shape[i] if i in ignore else v.shape[i] for i in range(x.ndim))
        outs.append(mx.broadcast_to(x, shape))
    return outs


def _quantize(ins, p):
    group_size, bits, mode, dequantize = p
    kw = dict(group_size=group_size, bits=bits, mode=_QMODES[mode])
    if dequantize:
        return [mx.dequantize(ins[0], ins[1], ins[2] if len(ins) > 2 else None, **kw)]
    return list(mx.quantize(ins[0], **kw))


def _bit_words(p) -> int:
    shape, width = p
    n = 1
    for d in shape:
        n *= d
    return -(-n * width // 4)


def _random_bits(ins, p):
    # Python has no `random.bits`, but `random.split(key, m)` is bits((m, 2))
    # and RandomBits' output bytes depend only on the key and the byte count,
    # so an even word count is reproduced bit for bit (Replay checks the rest).
    shape, width = p
    dtype = {4: mx.uint32, 2: mx.uint16, 1: mx.uint8}[width]
    words = _bit_words(p)
    if words == 0:
        return [mx.zeros(shape, dtype)]
    bits = mx.random.split(ins[0], (words + 1) // 2).reshape(-1)[:words]
    if width != 4:
        bits = bits.view(dtype)  # little-endian: the same bytes as MLX's copy
    n = 1
    for d in shape:
        n *= d
    return [bits[:n].reshape(shape)]


_random_bits.check = lambda node: (
    None if tuple(node.inputs[0].shape) == (2,)
    else _raise_unsupported(node.op, "a batch of keys"))


def _raise_unsupported(name, why):
    raise UnsupportedPrimitive(name, why)


_masked_scatter.check = lambda node: (
    None if node.inputs[0].shape[:1] == (1,) else _raise_unsupported(node.op, "a batch of masks"))


@_wants_outputs
def _arange(ins, p, outputs):
    start, stop, step = p
    return [mx.arange(start, stop, step, dtype=outputs[0].dtype)]


def _number_of_elements(ins, p):
    axes, inverted, dtype = p
    n = 1
    for a in axes:
        n *= ins[0].shape[a]
    return [mx.array(1.0 / n if inverted else n, dtype=dtype)]


def _conv(ins, p):
    strides, lo, hi, kdil, idil, groups, flip = p
    return [mx.conv_general(ins[0], ins[1], stride=list(strides), padding=(list(lo), list(hi)),
                            kernel_dilation=list(kdil), input_dilation=list(idil), groups=groups, flip=flip)]


# -- fused ops: one entry per definition (mlx_fusion.ops.registry) -------------
def _ops():
    from mlx_fusion import ops

    return ops


def _fused(definition):
    def fn(ins, p):
        return definition.call(ins, p)

    def check(node):  # plan-time: the fused ops must be importable, else the caller falls back
        try:
            _ops()
        except (ImportError, AttributeError) as e:
            raise UnsupportedPrimitive(node.op, f"mlx_fusion.ops.fused_{definition.name} unavailable ({e})") from None

    fn.check, fn.definition = check, definition
    return fn


def _fused_entries() -> Dict[str, Callable]:
    from ..ops.registry import DEFINITIONS

    return {d.node_op: _fused(d) for d in DEFINITIONS}


PRIMITIVES: Dict[str, Callable] = {
    **{k: (lambda f: lambda ins, p: [f(ins[0])])(f) for k, f in _UNARY.items()},
    **{k: (lambda f: lambda ins, p: [f(ins[0], ins[1])])(f) for k, f in _BINARY.items()},
    "Equal": _equal,
    "Log": lambda ins, p: [_LOG[p[0]](ins[0])],
    "Sqrt": lambda ins, p: [(mx.rsqrt if p[0] else mx.sqrt)(ins[0])],
    "BitwiseBinary": lambda ins, p: [_BITWISE[p[0]](ins[0], ins[1])],
    "Select": lambda ins, p: [mx.where(ins[0], ins[1], ins[2])],
    "DivMod": lambda ins, p: list(mx.divmod(ins[0], ins[1])),
    # shapes and layout
    "Reshape": lambda ins, p: [mx.reshape(ins[0], p[0])],
    "Broadcast": lambda ins, p: [mx.broadcast_to(ins[0], p[0])],
    "BroadcastAxes": _broadcast_axes,
    "Transpose": lambda ins, p: [mx.transpose(ins[0], p[0])],
    "Squeeze": lambda ins, p: [mx.squeeze(ins[0], p[0])],
    "ExpandDims": lambda ins, p: [mx.expand_dims(ins[0], p[0])],
    "Flatten": lambda ins, p: [mx.flatten(ins[0], p[0], p[1])],
    "Unflatten": lambda ins, p: [mx.unflatten(ins[0], p[0], p[1])],
    "AsType": lambda ins, p: [ins[0].astype(p[0])],
    "View": lambda ins, p: [ins[0].view(p[0])],
    "AsStrided": lambda ins, p: [mx.as_strided(ins[0], p[0], p[1], p[2])],
    "Slice": _slice,
    "SliceUpdate": _slice_update,
    "DynamicSlice": lambda ins, p: [mx.slice(ins[0], ins[1], p[0], p[1])],
    "DynamicSliceUpdate": lambda ins, p: [mx.slice_update(ins[0], ins[1], ins[2], p[0])],
    "Concatenate": lambda ins, p: [mx.concatenate(ins, axis=p[0])],
    "Split": lambda ins, p: list(mx.split(ins[0], list(p[0]), axis=p[1])),
    "Pad": lambda ins, p: [mx.pad(ins[0], _pad_width(ins[0].ndim, *p), constant_values=ins[1])],
    "Gather": _gather,
    "Scatter": _scatter,
    "MaskedScatter": _masked_scatter,
    "GatherAxis": lambda ins, p: [mx.take_along_axis(ins[0], _indices(ins[1]), axis=p[0])],
    "ScatterAxis": _refuse_if(lambda p: p[0] != 1, "ScatterAxis with a sum")(  # ReduceType None = 1
        lambda ins, p: [mx.put_along_axis(ins[0], _indices(ins[1]), ins[2], axis=p[1])]),
    # reductions, scans, sorting
    "Reduce": lambda ins, p: [_REDUCE[p[0]](ins[0], axis=list(p[1]), keepdims=True)],
    "ArgReduce": lambda ins, p: [(mx.argmin if p[0] == 0 else mx.argmax)(ins[0], axis=p[1], keepdims=True)],
    "Scan": lambda ins, p: [_SCAN[p[0]](ins[0], axis=p[1], reverse=p[2], inclusive=p[3])],
    "Softmax": lambda ins, p: [mx.softmax(ins[0], axis=-1, precise=p[0])],
    "LogSumExp": lambda ins, p: [mx.logsumexp(ins[0], axis=-1, keepdims=True)],
    "Sort": lambda ins, p: [mx.sort(ins[0], axis=p[0])],
    "ArgSort": lambda ins, p: [mx.argsort(ins[0], axis=p[0])],
    "Partition": lambda ins, p: [mx.partition(ins[0], p[0], axis=p[1])],
    "ArgPartition": lambda ins, p: [mx.argpartition(ins[0], p[0], axis=p[1])],
    "NumberOfElements": _number_of_elements,
    # linear algebra
    "Matmul": lambda ins, p: [mx.matmul(ins[0], ins[1])],
    "AddMM": lambda ins, p: [mx.addmm(ins[2], ins[0], ins[1], alpha=p[0], beta=p[1])],
    "Convolution": _conv,
    "QuantizedMatmul": _qmm,
    "Quantize": _quantize,
    "Hadamard": lambda ins, p: [mx.hadamard_transform(ins[0], scale=p[0])],
    # mixture-of-experts matmuls (mx.gather_mm / mx.gather_qmm) and the fused loss
    "GatherMM": _gather_mm,
    "GatherQMM": _gather_qmm,
    "CrossEntropy": _cross_entropy,
    # backward halves of mx.fast ops (a traced function that takes a gradient, on a GPU)
    "RMSNormVJP": _rms_norm_vjp,
    "LayerNormVJP": _layer_norm_vjp,
    "ScaledDotProductAttentionVJP": _sdpa_vjp,
    # creation and randomness (the key is an input: see trace.py, Replay)
    "Arange": _arange,
    "RandomBits": _random_bits,
    # mx.fast ops as traced on a GPU (on CPU they arrive decomposed)
    # On a GPU these arrive as primitives; an absent weight/bias is a 0-d placeholder input.
    "RMSNorm": lambda ins, p: [mx.fast.rms_norm(ins[0], _optional(ins[1]), p[0])],
    "LayerNorm": lambda ins, p: [mx.fast.layer_norm(ins[0], _optional(ins[1]), _optional(ins[2]), p[0])],
    "RoPE": _rope,
    "ScaledDotProductAttention": _sdpa,
    # fused nodes written by mlx_fusion.graph.rules
    **_fused_entries(),
}
# several projections of one input as one matmul (graph/merge.py); runs its members' own entries
PRIMITIVES[_MERGED] = _merged_primitive(lambda op: PRIMITIVES[op])


def _pad_width(ndim, axes, low, high):
    width = [(0, 0)] * ndim
    for a, lo, hi in zip(axes, low, high):
        width[a] = (lo, hi)
    return width


def register_primitive(name: str, fn: Callable, wants_outputs: bool = False) -> None:
    """Add or replace the interpreter entry for `name`.

    Args:
        name (str): the node op, e.g. ``"CoreMLBlock"``.
        fn (Callable): ``fn(inputs, params) -> list[mx.array]``; with
          ``wants_outputs=True`` it is also passed ``outputs=`` (output Values).
          A ``fn.check(node)`` attribute, if present, runs at plan time and may raise
          `UnsupportedPrimitive`.
        wants_outputs (bool): default ``False``.
    """
    if wants_outputs:
        fn.wants_outputs = True
    PRIMITIVES[name] = fn


# -- planning and running ------------------------------------------------------
class Replay:
    """A graph resolved into slot-indexed steps; call with the flat graph inputs.

    Args:
        graph (Graph): the graph to run (linted by the caller).
        compile (bool): run under ``mx.compile``. Default ``True``.
    """

    def __init__(self, graph: Graph, compile: bool = True):
        slots: Dict[str, int] = {}

        def slot(v: Value) -> int:
            return slots.setdefault(v.name, len(slots))

        self.num_inputs = len(graph.inputs)
        for v in graph.inputs:
            slot(v)
        self.constants = [(slot(graph.constant_values.get(n) or Value(n, a.shape, a.dtype)), a)
                          for n, a in graph.constants.items()]
        self.steps = []
        random = set(graph.meta.get("rng_inputs", ()))  # values derived from the global key
        for node in graph.nodes:
            if any(v.name in random for v in node.inputs):
                random.update(v.name for v in node.outputs)
            if node.op == "RandomBits" and _bit_words(node.params) % 2 and node.inputs[0].name not in random:
                # An odd word count is drawn validly but not bit-identically to
                # MLX; with a key the caller chose, that would be observable.
                raise UnsupportedPrimitive(node.op, "an odd number of words from an explicit key")
            fn = PRIMITIVES.get(node.op)
            if fn is None:
                raise UnsupportedPrimitive(node.op)
            if hasattr(fn, "check"):
                fn.check(node)
            kw = {"outputs": node.outputs} if getattr(fn, "wants_outputs", False) else {}
            self.steps.append((node, fn, [slot(v) for v in node.inputs], [slot(v) for v in node.outputs], kw))
        self.output_slots = [slots[v.name] for v in graph.outputs]
        self.num_slots = len(slots)
        # Random-key inputs are the last graph inputs (trace.py appends them).
        self.num_rng = len(graph.meta.get("rng_inputs", ()))
        self._run = mx.compile(self.run) if compile else self.run

    def run(self, *inputs: mx.array) -> List[mx.array]:
        """Interpret the steps eagerly (what ``mx.compile`` traces)."""
        env: list = [None] * self.num_slots
        env[: len(inputs)] = inputs
        for i, a in self.constants:
            env[i] = a
        for node, fn, ins, outs, kw in self.steps:
            results = fn([env[i] for i in ins], node.params, **kw)
            for i, r in zip(outs, results):
                env[i] = r
        return [env[i] for i in self.output_slots]

    def __call__(self, inputs: Sequence[mx.array]) -> List[mx.array]:
        """Run with the graph's non-random inputs; fresh random keys are drawn here.

        The key is MLX's global key, advanced once per call, so
        ``mx.random.seed`` makes replays reproducible and each call differs.
        """
        if self.num_rng:
            inputs = list(inputs)
            for _ in range(self.num_rng):
                # Feed the global key itself, as the unfused code would read it,
                # then advance it as one draw does (a size-0 draw costs nothing).
                inputs.append(mx.random.state[0])
                mx.random.uniform(shape=(0,))
        return self._run(*inputs)


def plan(graph: Graph, compile: bool = True) -> Replay:
    """Resolve every node of `graph`; raises `UnsupportedPrimitive` before running."""
    return Replay(graph, compile=compile)


def run_graph(graph: Graph, inputs: Sequence[mx.array]) -> List[mx.array]:
    """Run `graph` once, uncompiled, on its flat non-random inputs."""
    return Replay(graph, compile=False)(inputs)
