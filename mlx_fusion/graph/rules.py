"""Fusion rules derived from the fused op definitions, matched on the IR as MLX exports it.

Every fused op (`mlx_fusion.ops.registry.DEFINITIONS`) lists its spellings: plain
MLX reference functions such as ``lambda a, b: nn.relu(a + b)``. Their traces are
the search patterns (graph/pattern.py), so nothing here names an op or spells an
activation. A `Rule` is one definition's spellings with one rule name
("binary+relu", "linear+bias"), tried longest first; the first legal match wins
at a node. A `RuleSet` indexes rules by the root op of their patterns per
(device, dtype), so one node only meets the rules that can end at it (tinygrad's
PatternMatcher). A match never changes the graph; `legality` says whether it may.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import mlx.core as mx

from ..config import FusionConfig
from ..ops.common import FUSED_DTYPES
from ..ops.registry import DEFINITIONS
from .ir import Graph, Node, Value
from .pattern import VIEW_OPS, Bound, derive, match, plausible, signature

__all__ = ["Match", "MatchContext", "Rule", "RuleSet", "RULES", "FUSIBLE_DTYPES", "VIEW_OPS",
           "ELEMENTWISE_OPS", "legality", "rules_from"]

FUSIBLE_DTYPES = FUSED_DTYPES
# Elementwise primitives: what mx.compile merges into one kernel with its neighbours.
ELEMENTWISE_OPS = frozenset({
    "Abs", "Add", "ArcTan", "AsType", "Ceil", "Cos", "Divide", "Equal", "Erf", "ErfInv", "Exp",
    "Expm1", "Floor", "Greater", "GreaterEqual", "Less", "LessEqual", "Log", "Log1p", "LogicalAnd",
    "LogicalNot", "LogicalOr", "Maximum", "Minimum", "Multiply", "Negative", "NotEqual", "Power",
    "Remainder", "Round", "Rsqrt", "Select", "Sigmoid", "Sign", "Sin", "Sqrt", "Square",
    "Subtract", "Tan", "Tanh"})


class MatchContext:
    """Read-only lookups over one graph, built once per detection pass."""

    def __init__(self, graph: Graph, config: FusionConfig):
        self.graph, self.config = graph, config
        self.producer = graph.producers()
        self.users = graph.users()
        self.outputs = {v.name for v in graph.outputs}
        self.pos = {n.id: i for i, n in enumerate(graph.nodes)}
        self.memo: dict = {}  # the matcher's, for this pass (graph/pattern.py)

    def prod(self, v: Value, ops: Iterable[str] = None) -> Optional[Node]:
        n = self.producer.get(v.name)
        return n if n is not None and (ops is None or n.op in ops) else None

    def constant(self, v: Value) -> Optional[Tuple[mx.array, List[Node]]]:
        """(array, [Broadcast node]) if `v` is a one-element constant, possibly broadcast."""
        via = []
        b = self.prod(v, ("Broadcast",))
        if b is not None:
            via, v = [b], b.inputs[0]
        arr = self.graph.constants.get(v.name)
        if arr is None or arr.size != 1:
            return None
        return arr, via

    def is_constant(self, v: Value) -> bool:
        return self.constant(v) is not None

    def unbroadcast(self, v: Value) -> Tuple[Value, List[Node]]:
        b = self.prod(v, ("Broadcast",))
        return (b.inputs[0], [b]) if b is not None else (v, [])


@dataclass
class Match:
    """One way to replace `nodes` (graph order, last = root) by a single fused node.
    `via`: view nodes the match looked through; deleted after the rewrite only if unused.
    `outputs`: every value the fused node defines, `output` (the root's) last; the others
    are intermediates that stay readable (a multi-output pattern)."""

    pattern: object
    op: str
    inputs: List[Value]
    params: dict
    output: Value
    nodes: List[Node]
    via: List[Node] = field(default_factory=list)
    outputs: List[Value] = None

    def __post_init__(self):
        if self.outputs is None:
            self.outputs = [self.output]

    @property
    def node_ids(self) -> List[int]:
        return [n.id for n in self.nodes]

    @property
    def size(self) -> int:
        """The elements the fusion is about: the output's, or what its build says (``params["size"]``:
        linear+cross_entropy's is its logits', rows x V, not its per-row loss)."""
        return self.params.get("size", self.output.size)


class _View:
    """What a spelling's `build` sees of a match (ops.base.Spelling)."""

    def __init__(self, ctx: MatchContext, bound: Bound):
        self.args, self.output, self.outputs = bound.args, bound.output, bound.outputs
        self.unbroadcast, self.is_constant = ctx.unbroadcast, ctx.is_constant


def _device() -> str:
    return str(mx.default_device().type)


@dataclass(frozen=True)
class Rule:
    """Spellings of one fused op tried in order at a node (longest first)."""

    name: str
    definition: object
    spellings: Tuple

    def patterns(self, dtype, device: str = None):
        return [derive(s, dtype, device or _device()) for s in self.spellings]

    def match(self, ctx: MatchContext, root: Node, patterns=None) -> Iterator[Match]:
        """Matches at `root`, trying `patterns` (default: all of this rule's, in root's dtype)."""
        if patterns is None:
            patterns = [p for p in self.patterns(root.outputs[0].dtype) if p.root.op == root.op]
        for pat in patterns:
            for bound in match(ctx, pat, root):
                built = pat.spelling.build(_View(ctx, bound))
                if built is None:
                    continue
                inputs, params, via = built
                yield Match(pat.spelling.pattern, self.definition.node_op, list(inputs),
                            {"pattern": pat.spelling.pattern, **params}, bound.output, bound.nodes,
                            list({n.id: n for n in (*bound.via, *via)}.values()), list(bound.outputs))


class RuleSet:
    """Rules indexed by the root op of their patterns (per device and dtype); `+` combines sets."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = list(rules)
        self._index: Dict[tuple, Dict[str, List[Rule]]] = {}

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules)

    def __len__(self):
        return len(self.rules)

    def by_root(self, dtype=mx.float32) -> Dict[str, List[Rule]]:
        """root op -> rules with a pattern ending there, in `dtype` on the current device."""
        return {op: [r for r, _ in entries] for op, entries in self._patterns(dtype).items()}

    def _patterns(self, dtype) -> Dict[str, List[tuple]]:
        """root op -> [(rule, its patterns ending there)], built once per (device, dtype)."""
        key = (_device(), dtype)
        index = self._index.get(key)
        if index is None:
            index = defaultdict(list)
            if dtype in FUSIBLE_DTYPES:
                for r in self.rules:
                    pats = r.patterns(dtype, key[0])
                    for op in dict.fromkeys(p.root.op for p in pats):
                        index[op].append((r, [p for p in pats if p.root.op == op]))
            self._index[key] = index = dict(index)
        return index

    def matches(self, ctx: MatchContext, node: Node) -> Iterator[Match]:
        """Per rule, the first legal match ending at `node`."""
        for m, reason in self.candidates(ctx, node):
            if reason is None:
                yield m

    def candidates(self, ctx: MatchContext, node: Node) -> Iterator[Tuple[Match, Optional[str]]]:
        """Per rule, ``(first legal match, None)`` at `node`, else ``(first match, why it is illegal)``.

        The reasons are kept for `mlx_fusion.explain`: a rule that matched but may not
        apply says why (not single-use, dtype, size, disabled by config).
        """
        if not node.outputs:
            return
        # The patterns whose first level fits, memoized per node signature (all the relus of
        # a model share one list): most nodes meet no pattern at all.
        key = (id(self), signature(ctx, node))
        candidates = ctx.memo.get(key)
        if candidates is None:
            candidates = [(r, [p for p in pats if plausible(ctx, p.root, node)])
                          for r, pats in self._patterns(node.outputs[0].dtype).get(node.op, ())]
            candidates = ctx.memo[key] = [(r, pats) for r, pats in candidates if pats]
        for rule, patterns in candidates:
            first = None
            for m in rule.match(ctx, node, patterns):
                reason = legality(ctx, m)
                if reason is None:
                    yield m, None
                    break
                first = first or (m, reason)
            else:
                if first is not None:
                    yield first


def rules_from(definitions) -> RuleSet:
    """One rule per (definition, rule name), in definition order."""
    rules = []
    for d in definitions:
        groups: Dict[str, list] = {}
        for s in d.spellings():
            groups.setdefault(s.rule, []).append(s)
        rules += [Rule(name, d, tuple(spellings)) for name, spellings in groups.items()]
    return RuleSet(rules)


RULES = rules_from(DEFINITIONS)


# -- legality ------------------------------------------------------------------------------------------
def legality(ctx: MatchContext, m: Match) -> Optional[str]:
    """None if `m` may be applied, else why not. Rules propose; this decides."""
    inside = {n.id for n in m.nodes}
    kept = {v.name for v in m.outputs[:-1]}  # outputs of a multi-output pattern stay readable
    root_pos = ctx.pos[m.nodes[-1].id]
    for n in m.nodes[:-1]:  # every other intermediate disappears, so nobody else may read it
        for v in n.outputs:
            users = [u for u in ctx.users.get(v.name, ()) if u.id not in inside]
            if v.name in kept:
                if any(ctx.pos[u.id] < root_pos for u in users):
                    return f"{v.name} is read before the fused node could define it"
                continue
            if v.name in ctx.outputs:
                return f"not single-use: intermediate {v.name} is a graph output"
            if users:
                return f"not single-use: intermediate {v.name} is also read by %{users[0].id} {users[0].op}"
    made_inside = {v.name for n in m.nodes for v in n.outputs}
    if any(v.name in made_inside for v in m.inputs):  # e.g. relu(y + y), y = x @ W, read as a bias
        return "the fused node would read a value the fusion removes"
    if m.output.dtype not in FUSIBLE_DTYPES:
        return f"dtype {str(m.output.dtype).replace('mlx.core.', '')} not fusible"
    # Integer inputs (class indices) are not data; the float inputs share one dtype, which is
    # the output's except where the pattern itself casts (a float32 loss of bf16 logits).
    floats = [v for v in m.inputs if mx.issubdtype(v.dtype, mx.floating)]
    if any(v.dtype != (floats[0].dtype if m.params.get("upcast") else m.output.dtype) for v in floats):
        return "dtype: mixed input dtypes"
    if m.size < ctx.config.min_tensor_size:
        return f"below min_tensor_size: {m.size} < {ctx.config.min_tensor_size} elements"
    if not ctx.config.allows(m.pattern):
        return f"disabled by config: {m.pattern.name} not in enabled_patterns"
    return None
