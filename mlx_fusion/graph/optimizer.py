"""Detect fusion opportunities in a `Graph` and rewrite it in place.

    opt = FusionOptimizer()
    stats = opt.optimize(graph)        # = apply_fusions(graph, detect_opportunities(graph))

Detection runs the rule set (`rules.RULES`) over every node, prices each legal
match, and keeps a non-overlapping set, best first. Without measurements the
price is a roofline-style model (bytes moved and kernel launches, plus GEMM
FLOPs), marked `source="model"`; a price function with measured speedups
(`price(pattern, dtype, size, device) -> speedup | None`, e.g. the tracker's
`lookup`, which `fuse()` passes) overrides it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from ..config import FusionConfig, current_device_kind, get_config
from .ir import Graph, GraphError, Node, Value
from .rules import ELEMENTWISE_OPS, RULES, VIEW_OPS, Match, MatchContext, RuleSet

__all__ = ["FusionOpportunity", "FusionStats", "FusionOptimizer", "CostModel", "Decision", "SOURCE_LABELS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CostModel:
    """A deliberately simple device: every non-view node is one kernel that reads its inputs
    and writes its output once; GEMMs also pay FLOPs. Numbers are order-of-magnitude for an
    Apple/NVIDIA GPU; only ratios and rankings matter."""

    bandwidth: float = 400e9  # bytes/s
    launch: float = 5e-6  # s per kernel
    flops: float = 20e12  # FLOP/s for matmuls

    def kernel(self, reads: List[Value], writes: Value, flops: float = 0.0) -> float:
        nbytes = sum(v.nbytes for v in reads) + writes.nbytes
        return self.launch + nbytes / self.bandwidth + flops / self.flops


def _gemm_flops(node: Node) -> float:
    if node.op not in ("Matmul", "AddMM"):
        return 0.0
    lhs, rhs = node.inputs[0], node.inputs[1]
    return 2.0 * lhs.size * rhs.shape[-1]  # 2*M*K*N


@dataclass
class FusionOpportunity:
    """A match the optimizer would apply.

    pattern: the FusionPattern; node_ids: the nodes replaced (graph order, last = root);
    estimated_speedup: unfused time / fused time of those nodes; memory_savings: bytes of
    intermediates no longer written; replacement: the fused Node (id assigned on apply);
    source: "model" or "measured"; benefit: estimated seconds saved (the sort key)."""

    pattern: object
    node_ids: List[int]
    estimated_speedup: float
    memory_savings: int
    replacement: Node
    removable_ids: List[int] = field(default_factory=list)
    source: str = "model"
    benefit: float = 0.0
    dtype: object = None
    size: int = 0
    match: Optional[Match] = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.pattern.name


# Where a speedup came from, in words (explain, inspect).
SOURCE_LABELS = {"measured": "own measurement", "shipped": "shipped prior", "model": "model estimate"}


@dataclass
class Decision:
    """What the optimizer decided about one candidate match (`FusionOptimizer.decisions`).

    pattern: its name; node_ids / ops: the nodes it would replace (last = root); module:
    the deepest module path among them ("layers.0.mlp.gate_proj", "" for the top); fused:
    applied or not; reason: why, in words; speedup / source: the price it was given
    ("measured", "shipped" or "model"), None when it was rejected before pricing."""

    pattern: str
    node_ids: List[int]
    ops: List[str]
    module: str
    fused: bool
    reason: str
    speedup: Optional[float] = None
    source: Optional[str] = None
    output: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "decision": "fused" if self.fused else "rejected"}


def _match_module(nodes: List[Node]) -> str:
    """The deepest module among a match's nodes: linear+relu is reported where its matmul ran
    (``layers.0``), not where the activation was applied (the parent)."""
    return max((n.module for n in nodes), key=lambda p: p.count(".") + bool(p), default="")


@dataclass
class FusionStats:
    """Counts over traces; `decisions` (not in `as_dict`) lists every candidate and why it was (not) fused."""

    applied_count: int = 0
    failed_count: int = 0
    memory_saved_bytes: int = 0
    by_pattern: Dict[str, int] = field(default_factory=dict)
    decisions: List[Decision] = field(default_factory=list, compare=False, repr=False)

    def record(self, opp: FusionOpportunity) -> None:
        self.applied_count += 1
        self.memory_saved_bytes += opp.memory_savings
        self.by_pattern[opp.name] = self.by_pattern.get(opp.name, 0) + 1

    def merge(self, other: "FusionStats") -> "FusionStats":
        """Add `other` into self; returns self."""
        self.applied_count += other.applied_count
        self.failed_count += other.failed_count
        self.memory_saved_bytes += other.memory_saved_bytes
        for k, v in other.by_pattern.items():
            self.by_pattern[k] = self.by_pattern.get(k, 0) + v
        self.decisions += other.decisions
        return self

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("applied_count", "failed_count", "memory_saved_bytes")}
        d["by_pattern"] = dict(sorted(self.by_pattern.items()))
        return d


Price = Callable[[object, object, int, str], Optional[float]]
Scope = Callable[[List[str]], Optional[str]]  # module paths of a match's nodes -> why excluded, or None


class FusionOptimizer:
    """Args:
        config (FusionConfig, optional): default: `get_config()` at each call, so
            `fusion_config(...)` blocks apply.
        price (Callable, optional): ``price(pattern, dtype, size, device) -> Optional[float]``,
            a measured speedup (``source="measured"``); opportunities measured below 1.0 are
            skipped, and ``None`` leaves the cost model to decide. It may also return
            ``(speedup, source)`` to label where the number came from (``"shipped"`` priors).
            Default (``None``): the model only.
        rules (RuleSet, optional): default `rules.RULES`.
        cost (CostModel, optional): the model used when nothing is measured.
        device (str, optional): "metal" / "cuda" / "cpu"; default: MLX's current device.
        scope (Callable, optional): ``scope(module_paths) -> Optional[str]``: why a match whose
            nodes come from these modules may not be fused (``fuse(exclude=...)``), or None.
        compiled_replay (bool): the rewritten graph will run under `mx.compile` (what `fuse()`
            does by default). Then a match whose output is read only by elementwise ops is
            left alone: compiled, its last step would merge into the readers' kernel, and the
            fused op would add a pass (gated MLP on an H100: 0.94x forward with
            silu(gate(x)) fused, docs/performance.md). Default: ``False``.
    """

    def __init__(self, config: Optional[FusionConfig] = None, *, price: Optional[Price] = None,
                 compiled_replay: bool = False, rules: RuleSet = RULES, cost: CostModel = CostModel(),
                 device: Optional[str] = None, scope: Optional[Scope] = None):
        self._config, self.price, self.rules, self.cost, self._device = config, price, rules, cost, device
        self.compiled_replay, self.scope = compiled_replay, scope
        self.decisions: List[Decision] = []  # of the last detection: every candidate, fused or not
        self.skipped: Optional[str] = None  # of the last detection: why nothing was even matched

    @property
    def config(self) -> FusionConfig:
        return self._config if self._config is not None else get_config()

    @property
    def device(self) -> str:
        return self._device or current_device_kind()

    # -- detection --------------------------------------------------------------------------------
    def detect_opportunities(self, graph: Graph) -> List[FusionOpportunity]:
        """Legal, worthwhile, non-overlapping opportunities, best (largest benefit) first.

        Every candidate and why it was taken or not is left in `self.decisions`."""
        config, device = self.config, self.device
        self.decisions, self.skipped = [], None
        if not config.enabled or not config.device_allowed(device):
            self.skipped = ("disabled by config (enabled=False)" if not config.enabled
                            else f"disabled by config on this device ({device}={False})")
            return []
        ctx = MatchContext(graph, config)
        found, rejected = [], []
        for node in graph.nodes:
            for m, reason in self.rules.candidates(ctx, node):
                if reason is None and self.scope is not None:
                    reason = self.scope([n.module for n in m.nodes])
                opp = None
                if reason is None:
                    opp, reason = self._price(ctx, m, device)
                if opp is not None:
                    opp.match = m
                    found.append(opp)
                else:
                    rejected.append((m, reason))
        # Greedy by benefit; the stable sort leaves ties to graph order, then to the rule
        # listed first (linear, scalar, binary). A node belongs to at most one fusion.
        # Equal benefits (to 9 digits: the model prices silu(x @ W) * u the same fused as
        # linear+silu or as glu+silu) go to the match with fewer GEMMs: at large M a GEMM
        # "epilogue" is a second pass anyway (ops/linear.py), and an elementwise fusion
        # keeps no hidden pre-activation for its backward.
        gemms = {n.id for n in graph.nodes if n.op in ("Matmul", "AddMM")}
        found.sort(key=lambda o: (-float(f"{o.benefit:.9g}"), len(gemms.intersection(o.node_ids))))
        taken, chosen, owner = set(), [], {}
        for opp in found:
            if taken.isdisjoint(opp.node_ids):
                taken.update(opp.node_ids)
                owner.update({i: opp for i in opp.node_ids})
                chosen.append(opp)
        decisions, won_ids = [], {id(o) for o in chosen}
        for opp in found:
            won = id(opp) in won_ids
            if won:
                why = f"{opp.estimated_speedup:.2f}x ({SOURCE_LABELS.get(opp.source, opp.source)})"
            else:
                other = next(owner[i] for i in opp.node_ids if i in owner)
                why = f"overlaps a better fusion: {other.name} ({other.estimated_speedup:.2f}x)"
            decisions.append(self._decision(opp.match, won, why, opp.estimated_speedup, opp.source))
        for m, reason in rejected:
            decisions.append(self._decision(m, False, *reason) if isinstance(reason, tuple)
                             else self._decision(m, False, reason))
        pos = {n.id: i for i, n in enumerate(graph.nodes)}
        self.decisions = sorted(decisions, key=lambda d: (pos.get(d.node_ids[-1], 0), not d.fused))
        return chosen

    @staticmethod
    def _decision(m: Match, fused: bool, reason: str, speedup=None, source=None) -> Decision:
        return Decision(m.pattern.name, m.node_ids, [n.op for n in m.nodes], _match_module(m.nodes), fused, reason,
                        speedup, source, str(m.output))

    def _feeds_only_elementwise(self, ctx: MatchContext, m: Match) -> bool:
        users = ctx.users.get(m.output.name, ())
        return bool(users) and m.output.name not in ctx.outputs and all(u.op in ELEMENTWISE_OPS for u in users)

    def _price(self, ctx: MatchContext, m: Match, device: str):
        """(opportunity, None), or (None, why not: a reason or ``(reason, speedup, source)``)."""
        # mx.compile does better, unless the fusion is about more than its output (linear+cross_entropy's
        # match size is its logits', rows x V; merging its per-row loss into a `* mask` saves nothing of that).
        if self.compiled_replay and m.size <= m.output.size and self._feeds_only_elementwise(ctx, m):
            return None, "left to mx.compile: compiled, its output merges into the elementwise ops reading it"
        producer = ctx.producer

        def source_of(v: Value) -> Value:  # a broadcast reads its (small) source
            p = producer.get(v.name)
            return p.inputs[0] if p is not None and p.op == "Broadcast" else v

        unfused = sum(self.cost.kernel([source_of(v) for v in n.inputs], n.outputs[0], _gemm_flops(n))
                      for n in m.nodes if n.op not in VIEW_OPS)
        gemm = sum(_gemm_flops(n) for n in m.nodes)
        fused = self.cost.kernel(m.inputs, m.output, gemm) + sum(
            v.nbytes for v in m.outputs[:-1]) / self.cost.bandwidth
        kept = {v.name for v in m.outputs}
        saved = sum(v.nbytes for n in m.nodes[:-1] if n.op not in VIEW_OPS for v in n.outputs
                    if v.name not in kept)
        speedup, source = unfused / fused, "model"
        measured = self.price(m.pattern, m.output.dtype, m.size, device) if self.price is not None else None
        if isinstance(measured, tuple):  # (speedup, source), e.g. the shipped priors: "shipped"
            measured, source = measured
        if measured is not None:
            source = source if source != "model" else "measured"
            if measured < 1.0:  # measured slower than unfused: leave it alone
                return None, (f"measured slower: {measured:.2f}x ({SOURCE_LABELS.get(source, source)})",
                              float(measured), source)
            speedup = float(measured)
        if speedup <= 1.0:
            return None, (f"not faster: {speedup:.2f}x ({SOURCE_LABELS.get(source, source)})", speedup, source)
        replacement = Node(-1, m.op, list(m.inputs), list(m.outputs), dict(m.params))
        return FusionOpportunity(m.pattern, m.node_ids, speedup, saved, replacement,
                                 [n.id for n in m.via], source, unfused * (1 - 1 / speedup),
                                 m.output.dtype, m.size), None

    # -- rewriting --------------------------------------------------------------------------------
    def apply_fusions(self, graph: Graph, opportunities: List[FusionOpportunity]) -> FusionStats:
        """Rewrite `graph` in place, one opportunity at a time; a stale one counts as failed."""
        stats, self._failed = FusionStats(), {}
        for opp in opportunities:
            try:
                self._apply(graph, opp)
            except GraphError as e:
                stats.failed_count += 1
                self._failed[opp.node_ids[-1]] = str(e)
                log.warning("fusion %s on nodes %s not applied: %s", opp.name, opp.node_ids, e)
            else:
                stats.record(opp)
        graph.lint()
        return stats

    def optimize(self, graph: Graph) -> FusionStats:
        """Detect and apply; the stats carry `decisions` (a stale opportunity is marked not fused)."""
        stats = self.apply_fusions(graph, self.detect_opportunities(graph))
        stats.decisions = list(self.decisions)
        for d in stats.decisions:
            if d.fused and d.node_ids[-1] in self._failed:
                d.fused, d.reason = False, f"not applied: {self._failed[d.node_ids[-1]]}"
        return stats

    def _apply(self, graph: Graph, opp: FusionOpportunity) -> None:
        index = {n.id: i for i, n in enumerate(graph.nodes)}
        missing = [i for i in opp.node_ids if i not in index]
        if missing:
            raise GraphError(f"nodes {missing} no longer in the graph")
        doomed = set(opp.node_ids)
        root = max(opp.node_ids, key=index.__getitem__)
        users = graph.users()
        outs = list(opp.replacement.outputs)
        kept = {v.name for v in outs}
        for i in opp.node_ids:  # re-check legality: the graph may have changed since detection
            for v in graph.nodes[index[i]].outputs:
                if i != root and v.name not in kept and (
                        graph.is_output(v.name) or any(u.id not in doomed for u in users.get(v.name, ()))):
                    raise GraphError(f"{v.name} is now used outside the fusion")
        if graph.nodes[index[root]].outputs[0].name != outs[-1].name:
            raise GraphError("root node no longer produces the fused output")
        fused = Node(graph.next_id(), opp.replacement.op, list(opp.replacement.inputs), outs,
                     dict(opp.replacement.params), graph.nodes[index[root]].module)
        # The fused node takes the root's place: its inputs are all defined before the root
        # and the root's users all come after it, so topological order holds.
        graph.nodes = [fused if n.id == root else n for n in graph.nodes if n.id == root or n.id not in doomed]
        self._remove_dead(graph, opp.removable_ids)

    @staticmethod
    def _remove_dead(graph: Graph, candidates: List[int]) -> None:
        """Drop looked-through view nodes (Broadcast, Transpose, Flatten...) nobody reads now."""
        pending = set(candidates)
        while pending:
            users = graph.users()
            dead = {n.id for n in graph.nodes if n.id in pending and n.op in VIEW_OPS
                    and not any(users.get(v.name) or graph.is_output(v.name) for v in n.outputs)}
            if not dead:
                return
            # A dead view may have made its own producer (another view) dead.
            producers = graph.producers()
            for n in graph.nodes:
                if n.id in dead:
                    for v in n.inputs:
                        p = producers.get(v.name)
                        if p is not None and p.op in VIEW_OPS:
                            pending.add(p.id)
            graph.nodes = [n for n in graph.nodes if n.id not in dead]
            pending -= dead
