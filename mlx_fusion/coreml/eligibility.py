"""Which parts of a traced `Graph` can run as Core ML programs.

A *block* is a maximal connected, convex set of nodes that the converter
supports (linear algebra, elementwise ops and activations, reductions,
softmax, cheap reshapes/transposes) on float tensors of rank <= 5. Values that
depend only on parameters and constants ("static" values: ``Transpose(W)``,
``Broadcast(bias)``) are folded into the block as weights, so a block's inputs
are only activations. Blocks below ``min_flops`` of estimated work stay in MLX.

    report = find_blocks(graph, min_flops=0)
    report.blocks      # [Block]: node ids, inputs, outputs, flops
    report.rejected    # [Rejection]: reason code, node ids, detail

Nothing here imports coremltools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

import mlx.core as mx

from ..graph.ir import Graph, Node, Value
from ..ops.registry import DEFINITIONS

__all__ = ["SUPPORTED_OPS", "Block", "Rejection", "EligibilityReport", "find_blocks", "static_values",
           "node_flops", "MAX_RANK"]

MAX_RANK = 5  # Core ML tensors; the Neural Engine prefers <= 4 (see docs/neural-engine.md)
FLOAT_DTYPES = (mx.float16, mx.float32, mx.bfloat16)
_FLOAT_CODES = {"float16", "float32", "bfloat16"}


def _any(node: Node) -> Optional[str]:
    return None


def _reduce(node: Node) -> Optional[str]:  # Reduce::ReduceType {And, Or, Sum, Prod, Min, Max}
    return None if node.params[0] in (2, 3, 4, 5) else "logical reduction (all/any)"


def _log(node: Node) -> Optional[str]:
    return None if node.params[0] == 2 else "log2/log10"


def _astype(node: Node) -> Optional[str]:
    return None if node.params[0] in FLOAT_DTYPES else f"cast to {node.params[0]}"


# op -> check(node) returning None or why the node cannot convert. The
# converter (convert.py) has one emitter per key; a test keeps them in sync.
SUPPORTED_OPS: Dict[str, Callable[[Node], Optional[str]]] = {
    **{op: _any for op in (
        "Matmul", "AddMM",
        "Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum", "Power",
        "Exp", "Erf", "Tanh", "Sigmoid", "Abs", "Square", "Sqrt", "Negative", "Sin", "Cos",
        "Copy", "Softmax", "LogSumExp",
        "Reshape", "Flatten", "Unflatten", "Squeeze", "ExpandDims", "Transpose", "Broadcast")},
    # the fused ops whose definition has a Core ML emitter
    **{d.node_op: _any for d in DEFINITIONS if d.coreml is not None},
    "Log": _log,
    "Reduce": _reduce,
    "AsType": _astype,
}
_FUSED_FLOPS = {d.node_op: d.flops for d in DEFINITIONS if d.flops is not None}
_VIEWS = frozenset({"Reshape", "Flatten", "Unflatten", "Squeeze", "ExpandDims", "Transpose", "Broadcast",
                    "Copy", "AsType"})
_RANDOM = frozenset({"RandomBits"})


@dataclass
class Block:
    """One offload candidate. `node_ids` are the dynamic nodes (graph order); `inputs` are
    the activations it reads, `outputs` the values used after it; `static_inputs` the
    parameter/constant-derived values it folds in as weights; `param_inputs` the graph
    inputs (parameters) those depend on."""

    id: int
    node_ids: List[int]
    inputs: List[Value]
    outputs: List[Value]
    static_inputs: List[Value]
    param_inputs: List[Value]
    flops: float
    ops: Dict[str, int]

    def describe(self) -> str:
        ops = ", ".join(f"{k}x{v}" if v > 1 else k for k, v in sorted(self.ops.items()))
        return f"block {self.id}: {len(self.node_ids)} nodes ({ops}), {self.flops:.3g} FLOPs"


@dataclass
class Rejection:
    """Why nodes stay in MLX. `reason` is a code: ``unsupported-op``, ``unsupported-params``,
    ``dtype``, ``rank``, ``empty``, ``too-small``, ``training``, ``no-work``."""

    reason: str
    node_ids: List[int]
    detail: str = ""


@dataclass
class EligibilityReport:
    blocks: List[Block] = field(default_factory=list)
    rejected: List[Rejection] = field(default_factory=list)

    def reasons(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for r in self.rejected:
            out[r.reason] = out.get(r.reason, 0) + 1
        return out


def node_flops(node: Node) -> float:
    """Estimated work: 2*M*K*N per GEMM, ~1 per output element elsewhere, 0 for views."""
    fused = _FUSED_FLOPS.get(node.op)
    if fused is not None:
        return float(fused(node))
    if node.op in ("Matmul", "AddMM"):
        return 2.0 * node.inputs[0].size * node.inputs[1].shape[-1] + (
            node.outputs[0].size if node.op != "Matmul" else 0)
    if node.op in _VIEWS:
        return 0.0
    if node.op in ("Reduce", "Softmax", "LogSumExp"):
        return float(node.inputs[0].size) * (4 if node.op != "Reduce" else 1)
    return float(sum(v.size for v in node.outputs))


def static_values(graph: Graph) -> Set[str]:
    """Names of values that depend only on parameters and constants (not on activations)."""
    n_params = graph.meta.get("num_params", 0)
    static = set(graph.constants) | {v.name for v in graph.inputs[:n_params]}
    for node in graph.nodes:
        if node.op not in _RANDOM and node.inputs and all(v.name in static for v in node.inputs):
            static.update(v.name for v in node.outputs)
    return static


def _node_problem(node: Node, static: Set[str]) -> Optional[Rejection]:
    check = SUPPORTED_OPS.get(node.op)
    if check is None:
        return Rejection("unsupported-op", [node.id], node.op)
    why = check(node)
    if why:
        return Rejection("unsupported-params", [node.id], f"{node.op}: {why}")
    for v in [*node.outputs, *(v for v in node.inputs if v.name not in static)]:
        if v.dtype not in FLOAT_DTYPES:
            return Rejection("dtype", [node.id], f"{node.op}: {v}")
        if len(v.shape) > MAX_RANK:
            return Rejection("rank", [node.id], f"{node.op}: {v} has rank > {MAX_RANK}")
        if v.size == 0:
            return Rejection("empty", [node.id], f"{node.op}: {v}")
    return None


class _Sets:
    """Union-find over block ids."""

    def __init__(self):
        self.parent: Dict[int, int] = {}

    def new(self) -> int:
        i = len(self.parent)
        self.parent[i] = i
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i


def find_blocks(graph: Graph, min_flops: float = 0.0) -> EligibilityReport:
    """Group supported dynamic nodes into convex blocks and price them.

    Args:
        graph (Graph): a traced graph (parameters are its first ``meta["num_params"]`` inputs).
        min_flops (float): blocks with less estimated work are rejected (``too-small``).
    """
    report = EligibilityReport()
    static = static_values(graph)
    producer = graph.producers()
    sets = _Sets()
    block_of: Dict[int, int] = {}  # node id -> block id (before find)
    # taint[v] = blocks that v depends on through a node outside them: a node reading v
    # must not join those blocks, or the block would feed itself through MLX (a cycle).
    taint: Dict[str, Set[int]] = {}
    block_taint: Dict[int, Set[int]] = {}
    for node in graph.nodes:
        if all(v.name in static for v in node.outputs) and node.inputs:
            continue  # folded into whichever block reads it
        dyn_inputs = [v for v in node.inputs if v.name not in static]
        in_taint = set().union(*(taint.get(v.name, set()) for v in dyn_inputs)) if dyn_inputs else set()
        in_taint = {sets.find(b) for b in in_taint}
        problem = _node_problem(node, static)
        if problem is not None:
            report.rejected.append(problem)
            out_taint = set(in_taint)
            for v in dyn_inputs:
                p = producer.get(v.name)
                if p is not None and p.id in block_of:
                    out_taint.add(sets.find(block_of[p.id]))
            for v in node.outputs:
                taint[v.name] = out_taint
            continue
        candidates = []
        for v in dyn_inputs:
            p = producer.get(v.name)
            if p is not None and p.id in block_of:
                b = sets.find(block_of[p.id])
                if b not in in_taint and b not in candidates:
                    candidates.append(b)
        merged: List[int] = []
        for b in candidates:  # merge blocks that do not reach each other through MLX
            if all(b not in {sets.find(t) for t in block_taint[m]} and
                   m not in {sets.find(t) for t in block_taint[b]} for m in merged):
                merged.append(b)
        if merged:
            root = merged[0]
            for b in merged[1:]:
                sets.parent[b] = root
                block_taint[root] = block_taint[root] | block_taint.pop(b)
        else:
            root = sets.new()
            block_taint[root] = set()
        block_taint[root] |= in_taint
        block_of[node.id] = root
        for v in node.outputs:
            taint[v.name] = in_taint
    groups: Dict[int, List[Node]] = {}
    for node in graph.nodes:
        if node.id in block_of:
            groups.setdefault(sets.find(block_of[node.id]), []).append(node)
    for nodes in groups.values():
        block = _describe(graph, nodes, static, producer, len(report.blocks))
        if block.flops == 0 or all(graph.node(i).op in _VIEWS for i in block.node_ids):
            report.rejected.append(Rejection("no-work", block.node_ids, "only views/copies"))
        elif block.flops < min_flops:
            report.rejected.append(Rejection("too-small", block.node_ids,
                                             f"{block.flops:.3g} FLOPs < min_flops {min_flops:.3g}"))
        else:
            report.blocks.append(block)
    for i, b in enumerate(report.blocks):
        b.id = i
    return report


def _describe(graph: Graph, nodes: List[Node], static: Set[str], producer, bid: int) -> Block:
    ids = {n.id for n in nodes}
    made = {v.name for n in nodes for v in n.outputs}
    users = graph.users()
    inputs, statics, seen = [], [], set()
    for n in nodes:
        for v in n.inputs:
            if v.name in made or v.name in seen:
                continue
            seen.add(v.name)
            (statics if v.name in static else inputs).append(v)
    outputs = [v for n in nodes for v in n.outputs
               if graph.is_output(v.name) or any(u.id not in ids for u in users.get(v.name, ()))]
    # The parameters behind the static inputs (so the runtime can notice new weights).
    params = {v.name: v for v in graph.inputs[: graph.meta.get("num_params", 0)]}
    need, stack, found = set(), [v.name for v in statics], []
    while stack:
        name = stack.pop()
        if name in need:
            continue
        need.add(name)
        if name in params:
            found.append(name)
        p = producer.get(name)
        if p is not None:
            stack.extend(v.name for v in p.inputs)
    order = [v for v in graph.inputs if v.name in found]
    ops: Dict[str, int] = {}
    for n in nodes:
        ops[n.op] = ops.get(n.op, 0) + 1
    return Block(bid, [n.id for n in nodes], inputs, outputs, statics, order,
                 sum(node_flops(n) for n in nodes), ops)
