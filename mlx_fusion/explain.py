"""`explain`: what `fuse` does with a function or module, and why.

    report = mlx_fusion.explain(model, x)
    print(report)                 # one row per candidate: pattern, module, decision, reason
    report.to_dict()              # the same as JSON-ready data

It runs the call once through a fresh `fuse` wrapper (so it reports exactly what
`fuse` would do, split calls and fallbacks included) and reads the decisions
the optimizer kept (`FusionStats.decisions`). Called with a fused object and no
arguments, it reports what that object decided so far.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .graph.optimizer import Decision

__all__ = ["explain", "ExplainReport", "Fallback"]


@dataclass
class Fallback:
    """A whole call that ran unfused (or split into its children): why, and where in the user's code."""

    object: str
    reason: str
    count: int
    where: Optional[str] = None  # "model.py:12: n = x.sum().item()" for a trace failure
    split: bool = False  # ran its own code with its child modules fused

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ExplainReport:
    """Every candidate match and whole-call fallback of one fused object.

    Attributes:
        name: the fused object ("Model", a function's qualified name).
        candidates: `Decision`s, with `module` as a path from the top module.
        fallbacks: `Fallback`s.
        traces: graphs traced; nodes_traced / nodes_after: their node counts before and after rewriting.
        skipped: why nothing was even matched (fusion disabled by config), else None.
    """

    name: str
    candidates: List[Decision] = field(default_factory=list)
    fallbacks: List[Fallback] = field(default_factory=list)
    traces: int = 0
    nodes_traced: int = 0
    nodes_after: int = 0
    skipped: Optional[str] = None

    @property
    def fused(self) -> List[Decision]:
        return [d for d in self.candidates if d.fused]

    @property
    def rejected(self) -> List[Decision]:
        return [d for d in self.candidates if not d.fused]

    @property
    def by_pattern(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for d in self.fused:
            out[d.pattern] = out.get(d.pattern, 0) + 1
        return dict(sorted(out.items()))

    def headline(self) -> str:
        text = (f"{self.name}: {len(self.fused)} of {len(self.candidates)} candidates fused, "
                f"{self.traces} trace{'s' * (self.traces != 1)} ({self.nodes_traced} -> {self.nodes_after} nodes)")
        return text + (f"; {self.skipped}" if self.skipped else "")

    def rows(self) -> List[List[str]]:
        return [[d.pattern, d.module or "(top)", "fused" if d.fused else "rejected", d.reason]
                for d in self.candidates]

    def fallback_lines(self) -> List[str]:
        lines = []
        for f in self.fallbacks:
            how = "split (children fused)" if f.split else "unfused"
            lines.append(f"{f.object} ran {how} x{f.count}: {f.reason}" + (f"\n    at {f.where}" if f.where else ""))
        return lines

    def to_dict(self) -> dict:
        return {"name": self.name, "traces": self.traces, "nodes_traced": self.nodes_traced,
                "nodes_after": self.nodes_after, "skipped": self.skipped, "by_pattern": self.by_pattern,
                "candidates": [d.to_dict() for d in self.candidates],
                "fallbacks": [f.to_dict() for f in self.fallbacks]}

    def __str__(self) -> str:
        head = ["pattern", "module", "decision", "reason"]
        rows = self.rows()
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head[:3])]
        lines = [self.headline()]
        if rows:
            fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
            lines += [fmt.format(*head)] + [fmt.format(*r) for r in rows]
        lines += ["fallbacks:"] + ["  " + x for x in self.fallback_lines()] if self.fallbacks else []
        return "\n".join(lines)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(self.headline()), title_justify="left")
        for col in ("pattern", "module", "decision", "reason"):
            table.add_column(col, overflow="fold")
        for r in self.rows():
            table.add_row(*[Text(x, style="green" if x == "fused" else "") for x in r])
        parts = [table] + [Text(x, style="yellow") for x in self.fallback_lines()]
        return Group(*parts)


def _join(prefix: str, path: str) -> str:
    return ".".join(x for x in (prefix, path) if x)


def report_of(fused) -> ExplainReport:
    """The report of a fused object (what it traced and decided so far)."""
    from .fuse import FusedFunction

    if isinstance(fused, FusedFunction):
        states = [(fused._fusion.name, fused._fusion)]
        name = fused._fusion.name
    else:
        states = fused.fusion_states()
        name = fused._fusion.name
    report = ExplainReport(name)
    for _, s in sorted(states, key=lambda x: x[0]):
        prefix = s.filter.prefix
        for d in s.stats.decisions:
            report.candidates.append(Decision(d.pattern, d.node_ids, d.ops, _join(prefix, d.module), d.fused,
                                              d.reason, d.speedup, d.source, d.output))
        report.traces += len(s.graphs)
        report.nodes_traced += sum(g.meta.get("traced_nodes", len(g)) for g in s.graphs)
        report.nodes_after += sum(len(g) for g in s.graphs)
        report.skipped = report.skipped or s.extra.get("skipped")
        for reason, n in s.fallbacks.items():
            report.fallbacks.append(Fallback(s.name, reason, n, s.trace_failures.get(reason)))
        for reason, n in s.split.items():
            report.fallbacks.append(Fallback(s.name, reason, n, s.trace_failures.get(reason), split=True))
    return report


def report_of_graph(name: str, before, after, optimizer) -> ExplainReport:
    """The report of one optimizer pass (`optimizer.decisions`) over `before`, rewritten as `after`."""
    return ExplainReport(name, list(optimizer.decisions), [], 1, len(before), len(after), optimizer.skipped)


def explain(fn_or_module, *example_args, config=None, compile: bool = True, exclude=(), include=None,
            **example_kwargs) -> ExplainReport:
    """Why `fuse` fuses (or does not fuse) each candidate in `fn_or_module`.

    Args:
        fn_or_module (Callable or nn.Module): what `fuse` would get; a fused object
          with no example arguments reports what it decided so far.
        *example_args, **example_kwargs: one call's arguments (it runs once).
        config, compile, exclude, include: as for `fuse`.

    Returns:
        ExplainReport: per candidate match its pattern, module path, decision and
        reason; whole-call fallbacks with the user source line of a trace failure.
    """
    from .fuse import FusedFunction, fuse
    from ._fused_module import FusedModule
    from ._fusion_state import FusionFallbackWarning

    if isinstance(fn_or_module, (FusedModule, FusedFunction)) and not example_args and not example_kwargs:
        return report_of(fn_or_module)
    if isinstance(fn_or_module, FusedModule):
        fn_or_module = fn_or_module._fusion.origin.module
    elif isinstance(fn_or_module, FusedFunction):
        fn_or_module = fn_or_module._fn
    from .config import get_config

    fused = fuse(fn_or_module, config, compile=compile, exclude=exclude, include=include)
    with warnings.catch_warnings():  # the report carries them
        warnings.simplefilter("ignore", FusionFallbackWarning)
        fused(*example_args, **example_kwargs)
    report = report_of(fused)
    if not (config or get_config()).enabled:
        report.skipped = "disabled by config (enabled=False, or inside mlx_fusion.disable())"
    return report
