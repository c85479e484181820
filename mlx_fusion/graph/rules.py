"""Fusion rules as data, matched on the IR the way MLX's exporter spells ops.

A `Rule` is (root op, name, match function); a `RuleSet` indexes rules by
root op, so one node only meets the rules that can end at it (tinygrad's
PatternMatcher). Activations are tiny pattern trees (`Pat`/`Any`/`Const`),
written as the expression `mx.export_function` shows for mlx.nn's function:

    relu  = Maximum(x, 0)            silu = Multiply(x, Sigmoid(x))
    gelu  = Divide(Multiply(x, Add(Erf(Divide(x, sqrt2)), 1)), 2)

Every rule is "body + activation": the activation is matched at the root, then
a body (linear, scalar, binary) is matched on the value the activation reads.
Adding an activation is one `ACTIVATIONS` entry; a new body is one function in
`BODIES`. A match never changes the graph; `legality` says whether it may.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from ..config import FusionConfig
from ..patterns import (Activation, BinaryActivation, BinaryOp, LinearLayer, ScalarActivation,
                        ScalarOp)
from .ir import Graph, Node, Value

__all__ = ["Pat", "Any", "Const", "Match", "MatchContext", "Rule", "RuleSet", "ACTIVATIONS",
           "RULES", "FUSIBLE_DTYPES", "VIEW_OPS", "ELEMENTWISE_OPS", "legality"]

FUSIBLE_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# Ops that make a view, not a kernel launch: looked through, or kept only when still used.
VIEW_OPS = frozenset({"Broadcast", "Transpose", "Reshape", "Flatten", "Unflatten"})
COMMUTATIVE = frozenset({"Add", "Multiply", "Maximum", "Minimum"})
# Elementwise primitives: what mx.compile merges into one kernel with its neighbours.
ELEMENTWISE_OPS = frozenset({
    "Abs", "Add", "ArcTan", "AsType", "Ceil", "Cos", "Divide", "Equal", "Erf", "ErfInv", "Exp",
    "Expm1", "Floor", "Greater", "GreaterEqual", "Less", "LessEqual", "Log", "Log1p", "LogicalAnd",
    "LogicalNot", "LogicalOr", "Maximum", "Minimum", "Multiply", "Negative", "NotEqual", "Power",
    "Remainder", "Round", "Rsqrt", "Select", "Sigmoid", "Sign", "Sin", "Sqrt", "Square",
    "Subtract", "Tan", "Tanh"})
_EPS = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}


# -- pattern trees ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Any:
    """Any value, bound to `name`; a second `Any` with the same name must be the same value."""
    name: str


@dataclass(frozen=True)
class Const:
    """A size-1 constant (directly or through Broadcast) equal to `value` up to its dtype's
    rounding; `value=None` accepts any and binds the float to `name`."""
    value: Optional[float] = None
    name: Optional[str] = None


@dataclass(frozen=True)
class Pat:
    """A node whose op is `op` (or one of a tuple) with inputs matching `srcs`; commutative
    ops also try the swapped order. `name` binds the node."""
    op: Union[str, Tuple[str, ...]]
    srcs: Tuple = ()
    name: Optional[str] = None

    def __init__(self, op, *srcs, name=None):
        object.__setattr__(self, "op", (op,) if isinstance(op, str) else tuple(op))
        object.__setattr__(self, "srcs", srcs)
        object.__setattr__(self, "name", name)


class MatchContext:
    """Read-only lookups over one graph, built once per detection pass."""

    def __init__(self, graph: Graph, config: FusionConfig):
        self.graph, self.config = graph, config
        self.producer = graph.producers()
        self.users = graph.users()
        self.outputs = {v.name for v in graph.outputs}
        self.pos = {n.id: i for i, n in enumerate(graph.nodes)}

    def prod(self, v: Value, ops: Iterable[str] = None) -> Optional[Node]:
        n = self.producer.get(v.name)
        return n if n is not None and (ops is None or n.op in ops) else None

    def scalar(self, v: Value) -> Optional[Tuple[float, List[Node]]]:
        """(value, [Broadcast node]) if `v` is a size-1 constant, possibly broadcast."""
        via = []
        b = self.prod(v, ("Broadcast",))
        if b is not None:
            via, v = [b], b.inputs[0]
        arr = self.graph.constants.get(v.name)
        if arr is None or arr.size != 1:
            return None
        return float(arr.reshape(()).item()), via

    def unbroadcast(self, v: Value) -> Tuple[Value, List[Node]]:
        b = self.prod(v, ("Broadcast",))
        return (b.inputs[0], [b]) if b is not None else (v, [])


def _close(got: float, want: float, dtype) -> bool:
    return abs(got - want) <= 2 * _EPS.get(dtype, 2.0**-23) * max(abs(want), 1e-30)


# Bindings are plain dicts; "_nodes" (matched Pat nodes) and "_via" (Broadcasts seen through
# by Const) are tuples so that backtracking never has to undo anything.
def match_pattern(ctx: MatchContext, pat, v: Value, b: dict = None) -> Iterator[dict]:
    b = {"_nodes": (), "_via": ()} if b is None else b
    if isinstance(pat, Any):
        bound = b.get(pat.name)
        if bound is None:
            yield {**b, pat.name: v}
        elif bound.name == v.name:
            yield b
        return
    if isinstance(pat, Const):
        got = ctx.scalar(v)
        if got is None or (pat.value is not None and not _close(got[0], pat.value, v.dtype)):
            return
        nb = {**b, "_via": b["_via"] + tuple(got[1])}
        if pat.name:
            nb[pat.name] = got[0]
        yield nb
        return
    node = ctx.prod(v, pat.op)
    if node is None or len(node.inputs) != len(pat.srcs):
        return
    nb = {**b, "_nodes": b["_nodes"] + (node,)}
    if pat.name:
        nb[pat.name] = node
    orders = [node.inputs]
    if node.op in COMMUTATIVE and len(node.inputs) == 2:
        orders.append(node.inputs[::-1])
    for ins in orders:
        yield from _match_all(ctx, pat.srcs, ins, nb)


def _match_all(ctx, pats: Sequence, values: Sequence[Value], b: dict) -> Iterator[dict]:
    if not pats:
        yield b
        return
    for nb in match_pattern(ctx, pats[0], values[0], b):
        yield from _match_all(ctx, pats[1:], values[1:], nb)


# -- activations as MLX exports them (mlx/nn/layers/activations.py) -----------------------------------
x_ = Any("x")
ACTIVATIONS: Dict[Activation, Pat] = {
    Activation.RELU: Pat("Maximum", x_, Const(0.0)),
    Activation.SILU: Pat("Multiply", x_, Pat("Sigmoid", x_)),
    # x * (1 + erf(x / sqrt(2))) / 2
    Activation.GELU: Pat("Divide", Pat("Multiply", x_, Pat("Add", Pat("Erf", Pat("Divide", x_,
                         Const(math.sqrt(2)))), Const(1.0))), Const(2.0)),
    # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))
    Activation.GELU_APPROX: Pat("Multiply", Pat("Multiply", x_, Const(0.5)), Pat("Add", Pat("Tanh",
        Pat("Multiply", Pat("Add", x_, Pat("Multiply", Pat("Power", x_, Const(3.0)), Const(0.044715))),
            Const(math.sqrt(2 / math.pi)))), Const(1.0))),
}


# -- matches ---------------------------------------------------------------------------------------
@dataclass
class Match:
    """One way to replace `nodes` (graph order, last = root) by a single fused node.
    `via`: view nodes the match looked through; deleted after the rewrite only if unused."""

    pattern: object
    op: str
    inputs: List[Value]
    params: dict
    output: Value
    nodes: List[Node]
    via: List[Node] = field(default_factory=list)

    @property
    def node_ids(self) -> List[int]:
        return [n.id for n in self.nodes]

    @property
    def size(self) -> int:
        return self.output.size


@dataclass
class _Act:
    """The activation part of a candidate: `x` is the value the activation reads."""
    activation: Optional[Activation]
    x: Value
    output: Value
    nodes: Tuple[Node, ...] = ()
    via: Tuple[Node, ...] = ()


def _build(ctx, act: _Act, pattern, op, inputs, params, nodes, via=()) -> Match:
    nodes = {n.id: n for n in (*nodes, *act.nodes)}  # dedupe, then graph order
    via = {n.id: n for n in (*via, *act.via)}
    return Match(pattern, op, list(inputs), {"pattern": pattern, **params}, act.output,
                 sorted(nodes.values(), key=lambda n: ctx.pos[n.id]), list(via.values()))


# -- bodies: what the activation reads ------------------------------------------------------------------
_BINARY = {"Add": BinaryOp.ADD, "Subtract": BinaryOp.SUB, "Multiply": BinaryOp.MUL,
           "Divide": BinaryOp.DIV}


def _broadcast_shape(a: tuple, b: tuple) -> Optional[tuple]:
    try:
        return tuple(mx.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        return None


def fuse_binary(ctx: MatchContext, act: _Act) -> Iterator[Match]:
    """act(a op b) -> FusedBinary(a, b); Broadcast operands are passed un-broadcast."""
    node = ctx.prod(act.x, _BINARY)
    if node is None or act.activation is None or len(node.inputs) != 2:
        return
    (a, b), out = node.inputs, node.outputs[0]
    (a0, via_a), (b0, via_b) = ctx.unbroadcast(a), ctx.unbroadcast(b)
    # Prefer the un-broadcast operands, as long as together they still give the output shape.
    for (ia, va), (ib, vb) in (((a0, via_a), (b0, via_b)), ((a0, via_a), (b, [])),
                               ((a, []), (b0, via_b)), ((a, []), (b, []))):
        if _broadcast_shape(ia.shape, ib.shape) == tuple(out.shape):
            op = _BINARY[node.op]
            yield _build(ctx, act, BinaryActivation(op, act.activation), "FusedBinary", [ia, ib],
                         {"op": op, "activation": act.activation}, [node], va + vb)
            return


_c, _t = Const(name="s"), Const(name="t")
_MUL, _ADD = ("Multiply", "Divide"), ("Add", "Subtract")
# Longest form first: x*s+t is worth more than the x*s or +t inside it.
_SCALAR_FORMS = (Pat(_ADD, Pat(_MUL, x_, _c, name="mul"), _t, name="add"),
                 Pat(_MUL, x_, _c, name="mul"),
                 Pat(_ADD, x_, _t, name="add"))


def _reciprocal(s: float, dtype) -> Optional[float]:
    """1/s when x*(1/s) rounds like x/s: exactly for powers of two; for 16-bit floats the float32
    reciprocal's error (2^-24) is far below the storage precision. Else None (stay unfused)."""
    if s == 0 or not math.isfinite(s):
        return None
    if math.frexp(s)[0] in (0.5, -0.5) or dtype in (mx.float16, mx.bfloat16):
        return 1.0 / s
    return None


def fuse_scalar(ctx: MatchContext, act: _Act) -> Iterator[Match]:
    """act(x * s + t) -> FusedScalar(x) for size-1 constants s, t (also x*s, x/s, x+t, x-t)."""
    if act.activation is None:
        return
    for form in _SCALAR_FORMS:
        for b in match_pattern(ctx, form, act.x):
            x, mul, add = b["x"], b.get("mul"), b.get("add")
            if ctx.scalar(x) is not None or tuple(x.shape) != tuple(act.x.shape):
                continue  # the tensor side must be a real full-size tensor
            scale, shift = b.get("s", 1.0), b.get("t", 0.0)
            if mul is not None and mul.op == "Divide":
                scale = _reciprocal(scale, x.dtype)
                if scale is None:
                    continue
            if add is not None and add.op == "Subtract":
                shift = -shift
            kind = ScalarOp.AFFINE if mul and add else (ScalarOp.MUL if mul else ScalarOp.ADD)
            yield _build(ctx, act, ScalarActivation(kind, act.activation), "FusedScalar", [x],
                         {"scale": float(scale), "shift": float(shift), "activation": act.activation},
                         b["_nodes"], b["_via"])


def _row_vector(v: Value, n: int) -> bool:
    """Broadcastable to one output row (N,): a bias, not a residual."""
    s = tuple(v.shape)
    return len(s) == 0 or (s[-1] in (1, n) and all(d == 1 for d in s[:-1]))


def _matmul(ctx: MatchContext, v: Value):
    """Find `v = [Unflatten|Reshape](Matmul|AddMM([Flatten|Reshape](x), rhs, ...))` with a 2-D
    rhs. Returns (matmul node, core nodes, x, via nodes) or None."""
    post = ctx.prod(v, ("Unflatten", "Reshape"))
    mm = ctx.prod(post.inputs[0] if post else v, ("Matmul", "AddMM"))
    if mm is None:
        return None
    lhs, rhs = mm.inputs[0], mm.inputs[1]
    if len(rhs.shape) != 2 or len(lhs.shape) < 2 or lhs.shape[-1] != rhs.shape[0]:
        return None
    if mm.op == "AddMM" and tuple(float(p) for p in mm.params) != (1.0, 1.0):
        return None
    if post is None:
        return mm, [mm], lhs, []
    pre = ctx.prod(lhs, ("Flatten", "Reshape"))
    x = pre.inputs[0] if pre else None
    # Rows are independent, so (..., K) -> (M, K) @ W -> (..., N) is x @ W on the original x.
    if x is None or x.shape[-1] != rhs.shape[0] or tuple(v.shape) != tuple(x.shape[:-1]) + (rhs.shape[1],):
        return None
    return mm, [mm, post], x, [pre]


def fuse_linear(ctx: MatchContext, act: _Act) -> Iterator[Match]:
    """act(x @ rhs + b): AddMM, Matmul + Add(bias), or Matmul alone (needs an activation)."""
    out_n = act.x.shape[-1] if act.x.shape else 0
    add = ctx.prod(act.x, ("Add",))
    if add is not None:  # Matmul + Add(bias)
        for y, c in (add.inputs, add.inputs[::-1]):
            bias, via = ctx.unbroadcast(c)
            found = _matmul(ctx, y)
            if found and found[0].op == "Matmul" and _row_vector(bias, out_n):
                mm, nodes, x, via_mm = found
                yield _linear(ctx, act, x, mm.inputs[1], bias, nodes + [add], via + via_mm)
                break
    found = _matmul(ctx, act.x)
    if found:
        mm, nodes, x, via = found
        bias = None
        if mm.op == "AddMM":
            bias, via_b = ctx.unbroadcast(mm.inputs[2])
            if not _row_vector(bias, out_n):
                return
            via = via + via_b
        if act.activation is not None:  # a bare AddMM/Matmul is already one kernel
            yield _linear(ctx, act, x, mm.inputs[1], bias, nodes, via)


def _linear(ctx, act, x, rhs, bias, nodes, via) -> Match:
    inputs = [x, rhs] + ([bias] if bias is not None else [])
    pattern = LinearLayer(bias is not None, act.activation)
    return _build(ctx, act, pattern, "FusedLinear", inputs,
                  {"activation": act.activation, "has_bias": bias is not None}, nodes, via)


BODIES: Tuple[Callable[[MatchContext, _Act], Iterator[Match]], ...] = (fuse_linear, fuse_scalar, fuse_binary)


# -- rules -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    root: str
    name: str
    match: Callable[[MatchContext, Node], Iterator[Match]]


class RuleSet:
    """Rules indexed by root op; `+` combines sets."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = list(rules)
        self.by_root: Dict[str, List[Rule]] = defaultdict(list)
        for r in self.rules:
            self.by_root[r.root].append(r)

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules)

    def __len__(self):
        return len(self.rules)

    def matches(self, ctx: MatchContext, node: Node) -> Iterator[Match]:
        """Per rule, the first legal match ending at `node`."""
        for rule in self.by_root.get(node.op, ()):
            for m in rule.match(ctx, node):
                if legality(ctx, m) is None:
                    yield m
                    break


def with_activation(activation: Activation, body) -> Rule:
    pat = ACTIVATIONS[activation]

    def match(ctx: MatchContext, root: Node) -> Iterator[Match]:
        out = root.outputs[0]
        for b in match_pattern(ctx, pat, out):
            x = b["x"]
            if tuple(x.shape) == tuple(out.shape) and x.dtype == out.dtype:
                yield from body(ctx, _Act(activation, x, out, b["_nodes"], b["_via"]))

    return Rule(pat.op[0], f"{body.__name__[5:]}+{activation.value}", match)


def _linear_bias_only(ctx: MatchContext, root: Node) -> Iterator[Match]:
    yield from fuse_linear(ctx, _Act(None, root.outputs[0], root.outputs[0]))


RULES = RuleSet([with_activation(a, body) for a in ACTIVATIONS for body in BODIES]
                + [Rule("Add", "linear+bias", _linear_bias_only)])


# -- legality ------------------------------------------------------------------------------------------
def legality(ctx: MatchContext, m: Match) -> Optional[str]:
    """None if `m` may be applied, else why not. Rules propose; this decides."""
    inside = {n.id for n in m.nodes}
    for n in m.nodes[:-1]:  # every intermediate disappears, so nobody else may read it
        for v in n.outputs:
            if v.name in ctx.outputs:
                return f"{v.name} is a graph output"
            if any(u.id not in inside for u in ctx.users.get(v.name, ())):
                return f"{v.name} has a user outside the match"
    made_inside = {v.name for n in m.nodes for v in n.outputs}
    if any(v.name in made_inside for v in m.inputs):  # e.g. relu(y + y), y = x @ W, read as a bias
        return "the fused node would read a value the fusion removes"
    if m.output.dtype not in FUSIBLE_DTYPES:
        return f"dtype {m.output.dtype} not fusible"
    if any(v.dtype != m.output.dtype for v in m.inputs):
        return "mixed dtypes"
    if m.size < ctx.config.min_tensor_size:
        return f"size {m.size} < min_tensor_size {ctx.config.min_tensor_size}"
    if not ctx.config.allows(m.pattern):
        return f"pattern {m.pattern.name} disabled"
    return None
