"""Running a graph with merged projections (graph/merge.py): the concatenated weights.

The concatenation is a second copy of the weights, so it is built only where it
is reused: inference, where a call sees the very same weight arrays as the call
before. `WeightCache` keys each site by the identity of its weight arrays
(weak references: an id cannot be reused while the reference is alive, and a
dead one matches nothing) and builds the concatenation on the second
consecutive call with the same arrays. Training makes new weight arrays every
step (an optimizer update), and under ``mx.grad`` / ``nn.value_and_grad`` the
parameters are fresh tracers each call, so neither ever builds one. A call
without every site's concatenation runs the unmerged graph: the separate
matmuls, the unfused computation. When a site's weights change its entry is
replaced (first call: unmerged; second: rebuilt), so the cache never grows.

A concatenation is evaluated when built; one that cannot be (its weights are
placeholders of an enclosing ``mx.compile`` or ``mx.vmap``) is not kept, and
that call runs unmerged.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence

import mlx.core as mx

from .config import current_device_kind
from .graph.merge import MergeSite, concatenate, merge_projections

__all__ = ["WeightCache", "MergedReplay", "BUILDS", "PATTERN", "merge_sites", "record_merges"]

# The name merged sites are counted under in FusionStats.by_pattern and explain.
PATTERN = "merged-projections"


def merge_sites(graph, cfg, scope=None) -> List[MergeSite]:
    """`merge_projections` on `graph` where `cfg` lets fusion run on this device."""
    if not cfg.enabled or not cfg.device_allowed(current_device_kind()):
        return []
    return merge_projections(graph, scope)


def record_merges(stats, sites: List[MergeSite], graph) -> None:
    """Count merged sites in `stats` (applied, by_pattern) and add one decision per site, in graph order."""
    from .graph.optimizer import Decision

    if not sites:
        return
    for site in sites:
        stats.applied_count += 1
        stats.by_pattern[PATTERN] = stats.by_pattern.get(PATTERN, 0) + 1
        n = len(site.members)
        stats.decisions.append(Decision(
            PATTERN, [site.node_id], [site.kind] * n, site.module, True,
            f"{n} projections of one input as one {site.kind} (concatenated weights, built on reuse)"))
    pos = {node.id: i for i, node in enumerate(graph.nodes)}
    stats.decisions.sort(key=lambda d: (pos.get(d.node_ids[-1], 0) if d.node_ids else 0, not d.fused))


class _Builds:
    """How many concatenations were built (tests spy on it); `count` only grows."""

    count = 0


BUILDS = _Builds()


class _Record:
    __slots__ = ("refs", "cats")

    def __init__(self, arrays: Sequence[mx.array]):
        self.refs = tuple(weakref.ref(a) for a in arrays)
        self.cats: Optional[List[mx.array]] = None

    def holds(self, arrays: Sequence[mx.array]) -> bool:
        return len(arrays) == len(self.refs) and all(r() is a for r, a in zip(self.refs, arrays))


class WeightCache:
    """Concatenated weights per merge site of one fused object (shared by its traces)."""

    def __init__(self):
        self.records: Dict[tuple, _Record] = {}

    def get(self, site: MergeSite, inputs: Sequence[mx.array]) -> Optional[List[mx.array]]:
        """The site's concatenations for these weights, or None (the call runs unmerged)."""
        arrays = [inputs[i] for member in site.members for i in member]
        rec = self.records.get(site.key)
        if rec is None or not rec.holds(arrays):
            self.records[site.key] = _Record(arrays)  # the old concatenation, if any, is dropped
            return None
        if rec.cats is None:
            rec.cats = self._build(site, inputs)
        return rec.cats

    @staticmethod
    def _build(site: MergeSite, inputs) -> Optional[List[mx.array]]:
        try:
            cats = concatenate(site, inputs)  # raises if a member's layout changed: run unmerged
            mx.eval(cats)
        except ValueError:  # or placeholders of an enclosing compile / vmap: nothing to keep
            return None
        BUILDS.count += 1
        return cats

    def nbytes(self) -> int:
        return sum(a.nbytes for r in self.records.values() if r.cats for a in r.cats)


class MergedReplay:
    """A Replay-like callable: the merged replay when every site has its concatenation, else the unmerged one.

    Args:
        merged, unmerged: `Replay`s of the merged graph and of `graph.merge.unmerged(graph)`.
        sites: the graph's `MergeSite`s, in the order of its extra inputs.
        cache: the fused object's `WeightCache`.
    """

    def __init__(self, merged, unmerged, sites: List[MergeSite], cache: WeightCache):
        self.merged, self.unmerged, self.sites, self.cache = merged, unmerged, sites, cache
        self.checked = False
        self.failed: Optional[str] = None  # the merged replay failed once: unmerged from then on

    def __call__(self, inputs: Sequence[mx.array]) -> List[mx.array]:
        if self.failed is None:
            # Every site is looked up (each records its weights), then all or none are used.
            found = [self.cache.get(site, inputs) for site in self.sites]
            if all(cats is not None for cats in found):
                return self._merged(inputs, [a for cats in found for a in cats])
        return self.unmerged(inputs)

    def _merged(self, inputs, extra):
        if self.checked:
            return self.merged(list(inputs) + extra)
        try:  # a bug in the merged replay must not break the call: the unmerged one is exact
            out = self.merged(list(inputs) + extra)
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            return self.unmerged(inputs)
        self.checked = True
        return out
