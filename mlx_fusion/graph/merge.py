"""Merged projections: several matmuls of one input against parameters as one matmul.

``q, k, v = x @ Wq.T, x @ Wk.T, x @ Wv.T`` is ``x @ concat([Wq, Wk, Wv]).T`` split
along the last axis: each output element is the same dot product over K, so the
results are those of the separate matmuls (docs/merged-projections.md). At
decode (M = 1) each projection is a pass over its weights plus a launch; one
matmul against the concatenation pays one launch for all of them.

This is a dedicated pass rather than a rule: a rule replaces a single-rooted
subgraph by a fused node, while a merge has several roots tied only by a shared
input and needs an extra graph input (the concatenated weights) that the
caller supplies. `merge_projections(graph)` rewrites the graph in place:

- sites: Matmul(x, Transpose(W)), AddMM(x, Transpose(W), Broadcast(b)) with
  alpha = beta = 1 (nn.Linear with a bias) or QuantizedMatmul(x, w, scales[,
  biases]) with transpose and one (group size, bits, mode), every weight a
  module parameter (graph input below ``meta["num_params"]``); a site is two or
  more such nodes of one kind reading the same x;
- each site becomes one ``MergedProjection`` node, placed where its first
  matmul was, reading x, every member's tensors and the concatenated tensors
  (new graph inputs, after the call's own inputs and before random keys); it
  defines the members' outputs under their own names, so nothing downstream
  changes (a GLU reading the gate and up outputs is still matched by its rule);
- `unmerged(graph)` is the same graph computing each member separately
  (without the extra inputs): the call that has no concatenation runs it.

The concatenations are built by `WeightCache` (the caller's side, see
`_merged_replay.py`), never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

from .ir import Graph, Node, Value

__all__ = ["MergeSite", "merge_projections", "unmerged", "merged_primitive", "NODE_OP"]

NODE_OP = "MergedProjection"
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class MergeSite:
    """One merged node: which graph inputs (positions) hold each member's tensors.

    kind: the members' op ("Matmul", "AddMM", "QuantizedMatmul"); members: per member,
    the input positions of its tensors (weight[, bias] or w, scales[, biases]);
    module: the innermost module containing every member (explain)."""

    kind: str
    members: Tuple[Tuple[int, ...], ...]
    module: str = ""
    node_id: int = -1  # the MergedProjection node

    @property
    def key(self) -> tuple:
        return (self.kind, self.members)


def _param_index(graph: Graph) -> Dict[str, int]:
    return {v.name: i for i, v in enumerate(graph.inputs[: graph.meta.get("num_params", 0)])}


def _member(node: Node, producer: Dict[str, Node], params: Dict[str, int]):
    """(group key, tensor values, looked-through views) of a mergeable matmul, or None."""
    op, ins = node.op, node.inputs
    if op not in ("Matmul", "AddMM", "QuantizedMatmul") or len(node.outputs) != 1 or len(ins) < 2:
        return None
    x = ins[0]
    if op in ("Matmul", "AddMM"):
        if op == "AddMM" and (len(ins) != 3 or tuple(node.params) != (1.0, 1.0)):
            return None
        t = producer.get(ins[1].name)
        if t is None or t.op != "Transpose" or list(t.params[0]) != [1, 0] or t.inputs[0].name not in params:
            return None
        w, via = t.inputs[0], [t]
        if len(w.shape) != 2 or w.dtype not in _FLOATS or w.dtype != x.dtype or len(x.shape) < 1:
            return None
        tensors = [w]
        if op == "AddMM":
            c = producer.get(ins[2].name)
            b = c.inputs[0] if c is not None and c.op == "Broadcast" else ins[2]
            if b.name not in params or tuple(b.shape) != (w.shape[0],) or b.dtype != w.dtype:
                return None
            tensors.append(b)
            via += [c] if c is not None and c.op == "Broadcast" else []
        key = (op, x.name, tuple(node.params), w.dtype, w.shape[1], len(tensors))
    elif op == "QuantizedMatmul":
        if len(ins) not in (3, 4) or not node.params[3] or any(v.name not in params for v in ins[1:]):
            return None
        tensors, via = list(ins[1:]), []
        key = (op, x.name, tuple(node.params), tuple((v.dtype, v.shape[1:]) for v in tensors))
    else:
        return None
    out = node.outputs[0]
    if tuple(out.shape[:-1]) != tuple(x.shape[:-1]):  # a batched weight would not split by columns
        return None
    return key, tensors, via


def merge_projections(graph: Graph, scope: Optional[Callable[[List[str]], Optional[str]]] = None
                      ) -> List[MergeSite]:
    """Rewrite every site of `graph` in place (module docstring); returns the sites, in graph order.

    `scope(module_paths) -> reason or None`: a site is merged only where no member is excluded."""
    params = _param_index(graph)
    if not params:
        return []
    producer = graph.producers()
    groups: Dict[tuple, List[Tuple[Node, list, list]]] = {}
    for node in graph.nodes:
        m = _member(node, producer, params)
        if m is not None and (scope is None or scope([node.module]) is None):
            groups.setdefault(m[0], []).append((node, m[1], m[2]))
    sites, removed, placed, extra = [], set(), {}, []
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0][0]
        cats = [Value(f"{first.outputs[0].name}__merged{j}", (sum(t[j].shape[0] for _, t, _ in members),
                                                               *members[0][1][j].shape[1:]), members[0][1][j].dtype)
                for j in range(len(members[0][1]))]
        node = Node(-1, NODE_OP, [first.inputs[0], *(v for _, t, _ in members for v in t), *cats],
                    [n.outputs[0] for n, _, _ in members],
                    {"kind": first.op, "op_params": tuple(first.params), "count": len(members),
                     "slots": len(cats), "splits": tuple(n.outputs[0].shape[-1] for n, _, _ in members),
                     "merged": True}, _common_module([n.module for n, _, _ in members]))
        node.id = graph.next_id() + len(sites)
        placed[first.id] = node
        removed.update(n.id for n, _, _ in members)
        extra += cats
        sites.append(MergeSite(first.op, tuple(tuple(params[v.name] for v in t) for _, t, _ in members),
                               node.module, node.id))
    if not sites:
        return []
    nodes = []
    for n in graph.nodes:
        if n.id in placed:
            nodes.append(placed[n.id])
        elif n.id not in removed:
            nodes.append(n)
    graph.nodes = _drop_unread_views(graph, nodes)
    num_rng = len(graph.meta.get("rng_inputs", ()))
    cut = len(graph.inputs) - num_rng
    graph.inputs = graph.inputs[:cut] + extra + graph.inputs[cut:]
    graph.meta["merge_sites"] = graph.meta.get("merge_sites", []) + sites
    graph.meta["merged_inputs"] = graph.meta.get("merged_inputs", 0) + len(extra)
    return sites


def _common_module(paths: List[str]) -> str:
    """The innermost module containing every member ("layers.0.mlp" for its gate_proj and up_proj)."""
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _drop_unread_views(graph: Graph, nodes: List[Node]) -> List[Node]:
    """Delete the Transpose/Broadcast nodes the merged matmuls read, once nothing else reads them."""
    outputs = {v.name for v in graph.outputs}
    while True:
        read = {v.name for n in nodes for v in n.inputs}
        keep = [n for n in nodes if n.op not in ("Transpose", "Broadcast")
                or any(v.name in read or v.name in outputs for v in n.outputs)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def unmerged(graph: Graph) -> Graph:
    """A copy of a merged `graph` whose MergedProjection nodes compute each member separately."""
    g = graph.copy()
    n_extra = g.meta.get("merged_inputs", 0)
    if not n_extra:
        return g
    extra = set()
    for n in g.nodes:
        if n.op == NODE_OP:
            p = n.params
            keep = 1 + p["count"] * p["slots"]
            extra.update(v.name for v in n.inputs[keep:])
            n.inputs, n.params = n.inputs[:keep], {**p, "merged": False}
    g.inputs = [v for v in g.inputs if v.name not in extra]
    g.meta["merged_inputs"], g.meta["merge_sites"] = 0, []
    return g


def concatenate(site: MergeSite, arrays: List[mx.array]) -> List[mx.array]:
    """The concatenated tensors of `site` from the call's inputs (rows = output features)."""
    slots = len(site.members[0])
    return [mx.concatenate([arrays[m[j]] for m in site.members], axis=0) for j in range(slots)]


def merged_primitive(lookup: Callable[[str], Callable]) -> Callable:
    """The interpreter entry for MergedProjection; `lookup(op)` gives a member op's own entry."""

    def project(kind, op_params, x, tensors):
        if kind == "QuantizedMatmul":
            ins = [x, *tensors]
        else:  # the members read Transpose(W) (and the bias, which AddMM broadcasts itself)
            ins = [x, mx.transpose(tensors[0], (1, 0)), *tensors[1:]]
        return lookup(kind)(ins, op_params)[0]

    def run(ins, p):
        kind, op_params, k, slots = p["kind"], p["op_params"], p["count"], p["slots"]
        x = ins[0]
        if not p["merged"]:
            return [project(kind, op_params, x, ins[1 + i * slots: 1 + (i + 1) * slots]) for i in range(k)]
        y = project(kind, op_params, x, ins[1 + k * slots:])
        bounds, total = [], 0
        for n in p["splits"][:-1]:
            total += n
            bounds.append(total)
        return mx.split(y, bounds, axis=-1)

    return run
