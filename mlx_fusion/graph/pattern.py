"""Search patterns traced from reference functions, and the matcher that finds them.

A fused op's spelling (`ops.base.Spelling`) is plain MLX code. `derive` traces it
with `trace`, the capture the graph walker itself uses, so a pattern is exactly
what MLX exports for that code on the current device and in that dtype:

- an argument becomes a `PInput` (any value; a repeated argument must be the same
  value). Read through a `Broadcast`, it binds the broadcast's source;
- an argument listed in `Spelling.scalars` becomes a `PScalar`: any one-element
  constant, directly or through a `Broadcast`; its value is bound;
- a constant, or a float primitive argument, whose value is listed in
  `Spelling.constants` (rms_norm's `eps`, a mean's `1/D`: values the reference
  function cannot take as arguments) is bound too, as the extra argument
  `len(inputs) + i`: a `PScalar` for a constant, a `PParam` inside a node's params
  (`RMSNorm [eps]` on a GPU);
- a constant becomes a `PConst`, which matches only a one-element constant of the
  same dtype and the same value (in bf16, GELU's `/ 2` is not `/ 2.015625`);
- a primitive becomes a `PNode`: same op, same arguments (except for the shape ops,
  whose arguments are the example's shapes: the op's `build` checks shapes), same
  output dtype. `Add` and `Multiply` also match with swapped operands; `Maximum` does
  not (MLX gives a tie to its second operand, so `maximum(x, 0)` and `maximum(0, x)`
  differ in gradient and are separate spellings).

A pattern may have several outputs (an intermediate that is also used later); the
last is the root, where matching starts, and the others must feed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx

from .trace import trace

__all__ = ["PInput", "PScalar", "PParam", "PConst", "PNode", "Pattern", "Bound", "derive", "match", "plausible",
           "signature", "VIEW_OPS"]

# Ops that make a view, not a kernel launch: looked through, or kept only when still used.
VIEW_OPS = frozenset({"Broadcast", "Transpose", "Reshape", "Flatten", "Unflatten"})
# Their arguments are shapes of the example inputs, not part of what the code computes.
_SHAPE_OPS = frozenset({"Broadcast", "Reshape", "Flatten", "Unflatten"})
# A row-major reshape, however MLX spells it (nn.Linear: Reshape; x @ w.T: Flatten/Unflatten).
_RESHAPES = frozenset({"Reshape", "Flatten", "Unflatten"})
COMMUTATIVE = frozenset({"Add", "Multiply"})


@dataclass(frozen=True)
class PInput:
    index: int
    broadcast: bool = False


@dataclass(frozen=True)
class PScalar:
    index: int


@dataclass(frozen=True)
class PParam:
    """A primitive argument bound as argument `index` (any value), e.g. RMSNorm's eps."""

    index: int


@dataclass(frozen=True)
class PConst:
    value: float
    dtype: mx.Dtype


@dataclass(frozen=True, eq=False)
class PNode:
    key: int
    op: str
    srcs: tuple
    params: tuple
    dtype: mx.Dtype
    leaf_view: bool  # a view of pattern inputs only: looked through, not removed


PTerm = Union[PInput, PScalar, PConst, PNode]


@dataclass(frozen=True)
class Pattern:
    spelling: object
    dtype: mx.Dtype
    outputs: Tuple[PNode, ...]  # the root last
    num_args: int

    @property
    def root(self) -> PNode:
        return self.outputs[-1]


@lru_cache(maxsize=None)
def derive(spelling, dtype: mx.Dtype, device: str) -> Pattern:
    """The pattern of `spelling` in `dtype`, traced on the current device (`device` keys the cache)."""
    hand_built = getattr(spelling, "graph", None)
    graph = hand_built(dtype) if hand_built is not None else trace(spelling.reference, *spelling.example(dtype))
    env: Dict[str, PTerm] = {}
    for i, v in enumerate(graph.inputs):
        env[v.name] = PScalar(i) if i in spelling.scalars else PInput(i)
    bound = _bound_constant(spelling, len(graph.inputs))
    for name, arr in graph.constants.items():
        if arr.size != 1:
            raise ValueError(f"{spelling.pattern}: the reference closes over a {arr.shape} array")
        value = float(arr.reshape(()).item())
        env[name] = PScalar(bound[value]) if value in bound else PConst(value, arr.dtype)
    keys = 0
    for n in graph.nodes:
        srcs = tuple(env[v.name] for v in n.inputs)
        if len(n.outputs) != 1:
            raise ValueError(f"{spelling.pattern}: multi-output primitive {n.op} in a pattern")
        out = n.outputs[0].name
        if n.op == "Broadcast" and isinstance(srcs[0], (PConst, PScalar)):
            env[out] = srcs[0]  # constants match directly or through a Broadcast
        elif n.op == "Broadcast" and isinstance(srcs[0], PInput):
            env[out] = PInput(srcs[0].index, broadcast=True)
        else:
            leaf = n.op in VIEW_OPS and not any(isinstance(s, PNode) for s in srcs)
            params = tuple(PParam(bound[p]) if isinstance(p, float) and p in bound else p for p in n.params)
            env[out] = PNode(keys, n.op, srcs, params, n.outputs[0].dtype, leaf)
            keys += 1
    outputs = tuple(env[v.name] for v in graph.outputs)
    if not all(isinstance(o, PNode) and not o.leaf_view for o in outputs):
        raise ValueError(f"{spelling.pattern}: every output of a pattern must be computed")
    reach, stack = set(), [outputs[-1]]
    while stack:
        p = stack.pop()
        reach.add(p.key)
        stack.extend(s for s in p.srcs if isinstance(s, PNode))
    if any(o.key not in reach for o in outputs):
        raise ValueError(f"{spelling.pattern}: every output must feed the last one (the root)")
    return Pattern(spelling, dtype, outputs, len(graph.inputs) + len(getattr(spelling, "constants", ())))


def _bound_constant(spelling, first: int) -> Dict[float, int]:
    """value -> argument index of the `Spelling.constants` (compared in float32, as MLX stores them)."""
    values = getattr(spelling, "constants", ())
    return {float(mx.array(v, mx.float32).item()): first + i for i, v in enumerate(values)}


@dataclass
class Bound:
    """One match of a pattern: `nodes` replaced (graph order), `via` views looked through,
    `args` by argument position (a graph Value, or a float for a scalar), `outputs` the
    graph values of the pattern's outputs (root last)."""

    pattern: Pattern
    nodes: List
    via: List
    args: List
    outputs: List

    @property
    def output(self):
        return self.outputs[-1]


_State = Tuple[Dict[int, object], Dict[int, object], tuple]  # pattern node -> Node, args, via


def match(ctx, pattern: Pattern, root) -> Iterator[Bound]:
    """Every way `pattern` matches with its root at graph node `root`."""
    start: _State = ({}, {}, ())
    for nodes, args, via in _match(ctx, pattern.root, root.outputs[0], start):
        if len({n.id for n in nodes.values()}) != len(nodes):
            continue  # one graph node bound to two pattern nodes
        graph_nodes = [n for k, n in nodes.items() if not _leaf(pattern, k)]
        leaves = [n for k, n in nodes.items() if _leaf(pattern, k)]
        graph_nodes.sort(key=lambda n: ctx.pos[n.id])
        yield Bound(pattern, graph_nodes, list({n.id: n for n in (*via, *leaves)}.values()),
                    [args.get(i) for i in range(pattern.num_args)],
                    [nodes[o.key].outputs[0] for o in pattern.outputs])


def _leaf(pattern: Pattern, key: int) -> bool:
    return _node_by_key(pattern)[key].leaf_view


@lru_cache(maxsize=None)
def _node_by_key(pattern: Pattern) -> Dict[int, PNode]:
    out, stack = {}, list(pattern.outputs)
    while stack:
        p = stack.pop()
        out[p.key] = p
        stack.extend(s for s in p.srcs if isinstance(s, PNode))
    return out


def _bind(args: dict, i: int, value, same) -> Optional[dict]:
    bound = args.get(i)
    if bound is None:
        return {**args, i: value}
    return args if same(bound, value) else None


def _match(ctx, p: PTerm, v, st: _State) -> Iterator[_State]:
    nodes, args, via = st
    if isinstance(p, PInput):
        extra = ()
        if p.broadcast:
            b = ctx.prod(v, ("Broadcast",))
            if b is not None:
                v, extra = b.inputs[0], (b,)
        new = _bind(args, p.index, v, lambda a, b: a.name == b.name)
        if new is not None:
            yield nodes, new, via + extra
        return
    if isinstance(p, (PScalar, PConst)):
        got = ctx.constant(v)
        if got is None:
            return
        arr, extra = got
        value = float(arr.reshape(()).item())
        if isinstance(p, PConst):
            if arr.dtype == p.dtype and value == p.value:
                yield nodes, args, via + tuple(extra)
            return
        new = _bind(args, p.index, value, lambda a, b: a == b)
        if new is not None:
            yield nodes, new, via + tuple(extra)
        return
    node = ctx.prod(v)
    if node is None or not _same_op(p, node):
        return
    if p.key in nodes:
        if nodes[p.key].id == node.id:
            yield st
        return
    for j, pp in enumerate(p.params):
        if isinstance(pp, PParam):
            args = _bind(args, pp.index, node.params[j], lambda a, b: a == b)
            if args is None:
                return
    st = ({**nodes, p.key: node}, args, via)
    orders = [node.inputs]
    if node.op in COMMUTATIVE and len(node.inputs) == 2:
        orders.append(node.inputs[::-1])
    for ins in orders:
        yield from _match_all(ctx, p.srcs, ins, st)


def _signature(node) -> tuple:
    """What `_same_op` reads of a node."""
    params = () if node.op in _SHAPE_OPS else repr(tuple(node.params))  # hashable
    return ("Reshape" if node.op in _RESHAPES else node.op, params, len(node.inputs), len(node.outputs),
            node.outputs[0].dtype if node.outputs else None)


def signature(ctx, node) -> tuple:
    """What `plausible` reads of a node and its inputs' producers (hashable): nodes with the
    same signature get the same answer, so callers memoize on it."""
    return (_signature(node),) + tuple(
        _signature(n) if (n := ctx.prod(v)) is not None else None for v in node.inputs)


def plausible(ctx, p: PNode, node) -> bool:
    """A cheap first look: the root and the producers of its inputs have the pattern's ops."""
    if not _same_op(p, node):
        return False
    orders = [node.inputs] if node.op not in COMMUTATIVE else [node.inputs, node.inputs[::-1]]
    for ins in orders:
        if all(not isinstance(s, PNode) or ((n := ctx.prod(v)) is not None and _same_op(s, n))
               for s, v in zip(p.srcs, ins)):
            return True
    return False


def _same_op(p: PNode, node) -> bool:
    if node.op != p.op and not (node.op in _RESHAPES and p.op in _RESHAPES):
        return False
    if len(node.inputs) != len(p.srcs) or len(node.outputs) != 1 or node.outputs[0].dtype != p.dtype:
        return False
    if p.op in _SHAPE_OPS:
        return True
    params = tuple(node.params)
    return len(params) == len(p.params) and all(
        isinstance(want, PParam) or got == want for got, want in zip(params, p.params))


def _match_all(ctx, pats, values, st: _State) -> Iterator[_State]:
    if not pats:
        yield st
        return
    for nst in _match(ctx, pats[0], values[0], st):
        yield from _match_all(ctx, pats[1:], values[1:], nst)
