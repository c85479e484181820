"""Convert one eligible `Block` into a Core ML ML Program with coremltools' MIL builder.

    converted = convert_block(graph, block, param_values)   # saves or reuses an .mlpackage
    converted.path, converted.input_names, converted.output_names

Weights: the block's static inputs (parameters, closed-over constants and
values computed only from them, e.g. ``Transpose(W)``) are evaluated at
conversion time and baked in as fp16 constants. Broadcasts are kept lazy
(MIL ops broadcast like NumPy), so a bias is stored as a vector, not a matrix.
Everything runs in fp16: inputs and outputs are fp16 tensors named ``in{i}``
/ ``out{i}`` in the layout MLX uses (row-major, channels last; see
docs/neural-engine.md for why not (B, C, 1, S)).

Packages are cached under `options.cache_dir()` as ``<key>.mlpackage``; the key
hashes the block's structure, shapes and dtypes, the conversion settings and
the weights, so a rerun with the same model reuses the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from ..graph.interpreter import PRIMITIVES
from ..graph.ir import Graph, Node
from ..ops.registry import DEFINITIONS
from . import require_coremltools
from .eligibility import Block
from .options import OffloadOptions, cache_dir, get_options

__all__ = ["ConversionError", "ConvertedBlock", "convert_block", "build_program", "block_key", "EMITTERS",
           "FORMAT_VERSION", "read_block_metadata"]

FORMAT_VERSION = "mlx-fusion-coreml-1"  # bump when the emitted programs change
_META_KEY = "mlx_fusion.block"


class ConversionError(RuntimeError):
    """A block could not be expressed as a Core ML program."""


@dataclass
class ConvertedBlock:
    """A saved package and how to call it. Shapes are the block's; dtypes in MLX terms."""

    path: str
    key: str
    input_names: List[str]
    output_names: List[str]
    input_shapes: List[tuple]
    output_shapes: List[tuple]
    output_dtypes: List[str]
    ops: Dict[str, int]
    flops: float
    weights_hash: str
    reused: bool = False
    mil_ops: Dict[str, int] = field(default_factory=dict)


# -- static values (weights) ---------------------------------------------------------------------
@dataclass
class _Bcast:
    """A broadcast not yet materialized: `src` (ndarray or Var) stands for `shape`."""

    src: object
    shape: tuple


class _Statics:
    """Evaluates static values on demand with the MLX interpreter (memoized)."""

    def __init__(self, graph: Graph, param_values: Dict[str, mx.array]):
        self.graph, self.params = graph, param_values
        self.producer = graph.producers()
        self.memo: Dict[str, object] = {}
        self.leaves: Dict[str, np.ndarray] = {}  # what ends up in the program: hashed

    def entry(self, name: str):
        """ndarray (fp16) or _Bcast of one, for a static value."""
        if name not in self.memo:
            node = self.producer.get(name)
            if node is not None and node.op == "Broadcast":
                self.memo[name] = _Bcast(self.entry(node.inputs[0].name), tuple(node.outputs[0].shape))
            else:
                arr = _to_numpy(self.array(name))
                self.leaves[name] = arr
                self.memo[name] = arr
        return self.memo[name]

    def array(self, name: str) -> mx.array:
        if name in self.graph.constants:
            return self.graph.constants[name]
        if name in self.params:
            return self.params[name]
        node = self.producer[name]
        fn = PRIMITIVES[node.op]
        kw = {"outputs": node.outputs} if getattr(fn, "wants_outputs", False) else {}
        outs = fn([self.array(v.name) for v in node.inputs], node.params, **kw)
        for v, a in zip(node.outputs, outs):
            self.params[v.name] = a  # memo for siblings and repeats
        return self.params[name]


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype in (mx.float32, mx.bfloat16, mx.float16, mx.float64):
        a = a.astype(mx.float16)
    return np.array(a)


# -- emitters: one per supported op ----------------------------------------------------------------
class _Ctx:
    def __init__(self, mb, block_outputs):
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


# -- program ---------------------------------------------------------------------------------------
def build_program(graph: Graph, block: Block, statics: "_Statics"):
    """The MIL program of `block` (fp16 I/O ``in{i}`` -> ``out{i}``)."""
    ct = require_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    for v in [*block.inputs, *block.outputs]:
        if len(v.shape) == 0:
            raise ConversionError(f"rank-0 block input/output {v} (Core ML needs rank >= 1)")
    placeholders = {f"in{i}": mb.placeholder(shape=list(v.shape), dtype=types.fp16)
                    for i, v in enumerate(block.inputs)}
    with Function(placeholders, opset_version=ct.target.iOS17) as func:
        c = _Ctx(mb, block.outputs)
        env: Dict[str, object] = {v.name: func.inputs[f"in{i}"] for i, v in enumerate(block.inputs)}
        static_names = {v.name for v in block.static_inputs}
        for nid in block.node_ids:
            node = graph.node(nid)
            ins = [statics.entry(v.name) if v.name in static_names else env[v.name] for v in node.inputs]
            emit = EMITTERS.get(node.op)
            if emit is None:
                raise ConversionError(f"no emitter for {node.op}")
            outs = emit(c, node, ins)
            for v, o in zip(node.outputs, outs):
                env[v.name] = o
        results = []
        for i, v in enumerate(block.outputs):
            x = c.var(env[v.name])
            if tuple(x.shape) != tuple(v.shape):
                raise ConversionError(f"{v}: the program computes shape {tuple(x.shape)}")
            results.append(mb.identity(x=x, name=f"out{i}"))
        func.set_outputs(results)
    prog = Program()
    prog.add_function("main", func)
    return prog


# -- keys and cache --------------------------------------------------------------------------------
def _dt(d) -> str:
    return str(d).replace("mlx.core.", "")


def block_key(graph: Graph, block: Block, weights_hash: str) -> str:
    """Structure + shapes + dtypes + settings + weights, as a hex digest."""
    names = {v.name: f"i{i}" for i, v in enumerate(block.inputs)}
    names.update({v.name: f"s{i}" for i, v in enumerate(block.static_inputs)})
    rows = []
    for nid in block.node_ids:
        node = graph.node(nid)
        for v in node.outputs:
            names.setdefault(v.name, f"v{len(names)}")
        params = node.params if not isinstance(node.params, dict) else sorted(
            (k, str(getattr(v, "value", v))) for k, v in node.params.items() if k != "pattern")
        rows.append([node.op, repr(params), [[names[v.name], list(v.shape), _dt(v.dtype)] for v in node.inputs],
                     [[names[v.name], list(v.shape), _dt(v.dtype)] for v in node.outputs]])
    doc = {"format": FORMAT_VERSION, "nodes": rows, "outputs": [names[v.name] for v in block.outputs],
           "target": "iOS17", "precision": "fp16", "weights": weights_hash}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _weights_hash(statics: _Statics, block: Block) -> str:
    for v in block.static_inputs:
        statics.entry(v.name)
    h = hashlib.sha256()
    for name in sorted(statics.leaves):
        a = statics.leaves[name]
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def read_block_metadata(path) -> dict:
    """The block description stored in a package's user-defined metadata."""
    ct = require_coremltools()
    spec = ct.utils.load_spec(str(path))
    return json.loads(spec.description.metadata.userDefined[_META_KEY])


def convert_block(graph: Graph, block: Block, param_values: Dict[str, mx.array],
                  options: OffloadOptions = None, out_dir=None) -> ConvertedBlock:
    """Convert `block` and save it as ``<key>.mlpackage`` (reused if already there).

    Args:
        graph (Graph): the traced graph holding the block.
        block (Block): from `find_blocks`.
        param_values (dict): graph input name -> array, for the parameters the block reads.
        options (OffloadOptions, optional): default `get_options()`.
        out_dir (path, optional): default `cache_dir(options)`.
    """
    ct = require_coremltools()
    options = options or get_options()
    out_dir = Path(out_dir) if out_dir is not None else cache_dir(options)
    statics = _Statics(graph, dict(param_values))
    weights = _weights_hash(statics, block)
    key = block_key(graph, block, weights)
    path = out_dir / f"{key}.mlpackage"
    meta = ConvertedBlock(
        str(path), key, [f"in{i}" for i in range(len(block.inputs))],
        [f"out{i}" for i in range(len(block.outputs))], [tuple(v.shape) for v in block.inputs],
        [tuple(v.shape) for v in block.outputs], [_dt(v.dtype) for v in block.outputs],
        dict(block.ops), float(block.flops), weights)
    if path.exists():
        try:
            stored = read_block_metadata(path)
            meta.reused, meta.mil_ops = True, stored.get("mil_ops", {})
            return meta
        except Exception:  # a damaged entry: convert again
            shutil.rmtree(path, ignore_errors=True)
    try:
        prog = build_program(graph, block, statics)
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                           compute_precision=ct.precision.FLOAT16,
                           compute_units=getattr(ct.ComputeUnit, options.compute_units),
                           skip_model_load=True)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"coremltools could not convert {block.describe()}: {type(e).__name__}: {e}") from e
    mil_ops: Dict[str, int] = {}
    for op in model._mil_program.functions["main"].operations:
        if op.op_type != "const":
            mil_ops[op.op_type] = mil_ops.get(op.op_type, 0) + 1
    meta.mil_ops = mil_ops
    model.user_defined_metadata[_META_KEY] = json.dumps({**asdict(meta), "path": None})
    model.short_description = f"mlx-fusion {block.describe()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Save next to the target and rename: another process may be converting the same block.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=out_dir))
    try:
        model.save(str(tmp / "m.mlpackage"))
        try:
            os.rename(tmp / "m.mlpackage", path)
        except OSError:
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
