"""Run offloaded blocks inside the replay as ``CoreMLBlock`` nodes.

`offload_graph` is the pass `fuse` runs (before the MLX fusion rules, see
docs/neural-engine.md) when ``FusionConfig(neural_engine=True)``: it finds
blocks, converts them (or reuses cached packages) and replaces each block's
nodes by one ``CoreMLBlock`` node whose params hold a `CoreMLBlockRunner`.

A runner copies its inputs to NumPy (fp16), calls Core ML and wraps the outputs
back into MLX arrays of the block's dtypes. Where arrays cannot be read
(inside ``mx.compile`` or ``mx.vmap``) it runs the block's own MLX nodes
instead. It is an ``mx.custom_function``: a gradient never goes through Core
ML; its vjp differentiates the MLX nodes (or, with ``force=True``, raises
`CoreMLTrainingError`).
"""

from __future__ import annotations

import heapq
import threading
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from ..graph.interpreter import Replay, register_primitive
from ..graph.ir import Graph, Node
from . import INSTALL_HINT, coremltools_available, prediction_available, require_coremltools
from .eligibility import Block, EligibilityReport, Rejection, find_blocks, static_values
from .options import OffloadOptions, get_options

__all__ = ["CoreMLTrainingError", "NeuralEngineWarning", "OffloadResult", "CoreMLBlockRunner",
           "offload_graph", "make_predictor"]

OP = "CoreMLBlock"


class CoreMLTrainingError(RuntimeError):
    """Offload was forced where gradients or training mode need MLX."""


class NeuralEngineWarning(UserWarning):
    """Neural Engine offload is unavailable here; the model runs on MLX."""


_warned: set = set()
_warn_lock = threading.Lock()


def _warn_once(message: str) -> None:
    with _warn_lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, NeuralEngineWarning, stacklevel=3)


@dataclass
class OffloadResult:
    """What `offload_graph` did: the eligibility report, the runners it installed and
    every reason a block or node stayed in MLX."""

    report: Optional[EligibilityReport] = None
    runners: List["CoreMLBlockRunner"] = field(default_factory=list)
    rejected: List[Rejection] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.runners)


# -- predictors --------------------------------------------------------------------------------------
class _CoreMLPredictor:
    def __init__(self, path: str, options: OffloadOptions):
        ct = require_coremltools()
        self.model = ct.models.MLModel(path, compute_units=getattr(ct.ComputeUnit, options.compute_units))

    def __call__(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self.model.predict(inputs)


def make_predictor(path: str, options: OffloadOptions):
    """``fn({in name: fp16 ndarray}) -> {out name: ndarray}`` for a saved package."""
    if options.predictor == "mil-numpy":
        from .milnumpy import MilExecutor

        return MilExecutor(path)
    return _CoreMLPredictor(path, options)


# -- the runner --------------------------------------------------------------------------------------
def _subgraph(graph: Graph, block: Block) -> Graph:
    """The block's nodes plus the static nodes its weights come from, as a graph of
    (block inputs + parameters) -> block outputs: the MLX version of the block."""
    producer = graph.producers()
    need, stack = set(), [v.name for v in block.static_inputs]
    while stack:
        p = producer.get(stack.pop())
        if p is not None and p.id not in need:
            need.add(p.id)
            stack.extend(v.name for v in p.inputs)
    ids = need | set(block.node_ids)
    nodes = [Node(n.id, n.op, list(n.inputs), list(n.outputs), n.params) for n in graph.nodes if n.id in ids]
    used = {v.name for n in nodes for v in n.inputs}
    consts = {k: a for k, a in graph.constants.items() if k in used}
    return Graph(list(block.inputs) + list(block.param_inputs), list(block.outputs), nodes, consts,
                 {k: graph.constant_values[k] for k in consts if k in graph.constant_values}).lint()


class CoreMLBlockRunner:
    """Calls one converted block. ``calls`` counts runs by path ("coreml", "mlx")."""

    def __init__(self, graph: Graph, block: Block, converted, param_values: Dict[str, mx.array],
                 options: OffloadOptions):
        # A copy: the pass rewrites `graph`, a reconversion needs the block's original nodes.
        self.graph, self.block, self.converted, self.options = graph.copy(), block, converted, options
        self.params = [param_values[v.name] for v in block.param_inputs]
        self.mlx_graph = _subgraph(graph, block)
        self._mlx = Replay(self.mlx_graph, compile=False)
        self.num_inputs = len(block.inputs)
        self.out_dtypes = [v.dtype for v in block.outputs]
        self.calls = {"coreml": 0, "mlx": 0}
        self._predictor = None
        self._fn = self._make_function()

    def __repr__(self) -> str:
        return f"CoreMLBlockRunner({self.converted.key[:12]}, {self.block.describe()})"

    @property
    def predictor(self):
        if self._predictor is None:
            self._predictor = make_predictor(self.converted.path, self.options)
        return self._predictor

    def mlx(self, inputs: List[mx.array]) -> List[mx.array]:
        """The block in MLX (its original nodes)."""
        return self._mlx.run(*inputs)

    def __call__(self, inputs: List[mx.array]) -> List[mx.array]:
        self._check_weights(inputs[self.num_inputs:])
        return list(self._fn(*inputs))

    def _check_weights(self, current: List[mx.array]) -> None:
        """The package holds the weights of conversion time; new ones mean a new package."""
        if all(a is b for a, b in zip(current, self.params)):
            return
        try:
            same = all(a.shape == b.shape and mx.array_equal(a, b).item() for a, b in zip(current, self.params))
        except Exception:  # tracers (compile/vmap): the MLX path reads the live values anyway
            return
        if same:
            self.params = list(current)
            return
        from .convert import convert_block

        values = {v.name: a for v, a in zip(self.block.param_inputs, current)}
        self.converted = convert_block(self.graph, self.block, values, self.options)
        self.params, self._predictor = list(current), None

    def _make_function(self):
        @mx.custom_function
        def block(*inputs):
            return self._forward(list(inputs))

        @block.vjp
        def block_vjp(primals, cotangents, outputs):
            if self.options.force:
                raise CoreMLTrainingError(
                    "a gradient reached an offloaded Core ML block (force=True): Core ML runs inference "
                    "only. Drop force, or call model.train() / FusionConfig(neural_engine=False) to train.")
            primals = list(primals) if isinstance(primals, (list, tuple)) else [primals]
            cotangents = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
            _, grads = mx.vjp(lambda *a: self.mlx(list(a)), primals, cotangents)
            return tuple(grads)

        return block

    def _forward(self, inputs: List[mx.array]) -> List[mx.array]:
        try:  # reading the values fails inside mx.compile / mx.vmap: run the MLX nodes there
            feed = {name: np.asarray(x.astype(mx.float16))
                    for name, x in zip(self.converted.input_names, inputs[: self.num_inputs])}
        except (RuntimeError, ValueError):
            self.calls["mlx"] += 1
            return self.mlx(inputs)
        got = self.predictor(feed)
        self.calls["coreml"] += 1
        return [mx.array(np.asarray(got[name], dtype=np.float16).reshape(v.shape)).astype(v.dtype)
                for name, v in zip(self.converted.output_names, self.block.outputs)]


def _run_node(inputs, params):
    return params["runner"](inputs)


register_primitive(OP, _run_node)


# -- the pass ----------------------------------------------------------------------------------------
def _topo_sort(graph: Graph) -> None:
    """Stable topological order (the block node sits where its nodes' producers allow)."""
    producer = {v.name: n.id for n in graph.nodes for v in n.outputs}
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    deps = {n.id: {producer[v.name] for v in n.inputs if v.name in producer} for n in graph.nodes}
    users: Dict[int, List[int]] = {}
    for nid, ds in deps.items():
        for d in ds:
            users.setdefault(d, []).append(nid)
    waiting = {nid: len(ds) for nid, ds in deps.items()}
    ready = [(pos[nid], nid) for nid, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    by_id = {n.id: n for n in graph.nodes}
    order = []
    while ready:
        _, nid = heapq.heappop(ready)
        order.append(by_id[nid])
        for u in users.get(nid, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (pos[u], u))
    if len(order) != len(graph.nodes):
        raise RuntimeError("offload made the graph cyclic (a block is not convex)")
    graph.nodes = order


def _drop_dead_statics(graph: Graph, static: set) -> None:
    while True:
        used = {v.name for n in graph.nodes for v in n.inputs} | {v.name for v in graph.outputs}
        dead = [n for n in graph.nodes if all(v.name in static and v.name not in used for v in n.outputs)]
        if not dead:
            for name in [k for k in graph.constants if k not in used]:
                del graph.constants[name]
                graph.constant_values.pop(name, None)
            return
        ids = {n.id for n in dead}
        graph.nodes = [n for n in graph.nodes if n.id not in ids]


def _replace(graph: Graph, block: Block, runner: CoreMLBlockRunner) -> None:
    ids = set(block.node_ids)
    first = min(i for i, n in enumerate(graph.nodes) if n.id in ids)
    node = Node(graph.next_id(), OP, list(block.inputs) + list(block.param_inputs), list(block.outputs),
                {"runner": runner, "key": runner.converted.key})
    kept = [n for n in graph.nodes if n.id not in ids]
    kept.insert(first - sum(1 for n in graph.nodes[:first] if n.id in ids), node)
    graph.nodes = kept


def offload_graph(graph: Graph, config=None, *, param_values: Dict[str, mx.array] = None,
                  training: bool = False, options: OffloadOptions = None) -> OffloadResult:
    """Replace eligible blocks of `graph` (in place) by ``CoreMLBlock`` nodes.

    Args:
        graph (Graph): a traced graph; its first ``meta["num_params"]`` inputs are parameters.
        config (FusionConfig, optional): unused except for ``neural_engine`` (callers check it).
        param_values (dict): parameter input name -> array at conversion time.
        training (bool): the module is in training mode: nothing is offloaded (with
            ``force``: raises `CoreMLTrainingError`).
        options (OffloadOptions, optional): default `get_options()`.

    Returns:
        OffloadResult; ``graph.meta["coreml"]`` holds it too.
    """
    options = options or get_options()
    result = OffloadResult()
    graph.meta["coreml"] = result
    if training:
        if options.force:
            raise CoreMLTrainingError(
                "Neural Engine offload is inference-only; the module is in training mode. "
                "Call model.eval() first, or drop force=True to run the blocks in MLX.")
        result.rejected.append(Rejection("training", [], "module in training mode: blocks run in MLX"))
        return result
    if options.predictor == "coreml" and not prediction_available():
        _warn_once("mlx_fusion: Core ML prediction requires macOS; neural_engine=True runs on MLX here "
                   "(`mlx-fusion coreml` can still export the blocks)")
        result.rejected.append(Rejection("not-macos", [], "Core ML prediction requires macOS"))
        return result
    if not coremltools_available():
        _warn_once(f"mlx_fusion: Neural Engine offload needs coremltools; running on MLX. Install it with: "
                   f"{INSTALL_HINT}")
        result.rejected.append(Rejection("no-coremltools", [], INSTALL_HINT))
        return result
    from .convert import ConversionError, convert_block

    report = find_blocks(graph, options.min_flops)
    result.report = report
    result.rejected.extend(report.rejected)
    params = dict(param_values or {})
    static = static_values(graph)
    for block in report.blocks:
        try:
            converted = convert_block(graph, block, params, options)
        except ConversionError as e:
            result.rejected.append(Rejection("conversion-failed", block.node_ids, str(e)))
            continue
        runner = CoreMLBlockRunner(graph, block, converted, params, options)
        result.runners.append(runner)
    for runner in result.runners:  # rewrite after converting: blocks refer to the original nodes
        _replace(graph, runner.block, runner)
    if result.runners:
        _topo_sort(graph)
        _drop_dead_statics(graph, static)
        graph.lint()
    return result
