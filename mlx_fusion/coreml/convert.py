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
from typing import Dict, List

import mlx.core as mx
import numpy as np

from ..graph.interpreter import PRIMITIVES
from ..graph.ir import Graph
from . import require_coremltools
from .eligibility import Block
from .emitters import EMITTERS, ConversionError, _Bcast, _Ctx
from .options import OffloadOptions, cache_dir, get_options

__all__ = ["ConversionError", "ConvertedBlock", "convert_block", "build_program", "block_key", "EMITTERS",
           "FORMAT_VERSION", "read_block_metadata"]

FORMAT_VERSION = "mlx-fusion-coreml-1"  # bump when the emitted programs change
_META_KEY = "mlx_fusion.block"


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


# -- static values (weights): broadcasts stay lazy (emitters._Bcast) ---------------------------
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
        c = _Ctx(mb)
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
