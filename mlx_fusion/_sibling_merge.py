"""Merged projections in a split call: q/k/v of an attention that decodes with a KV cache.

An attention called with a cache is never traced as a whole (the cache is a
stateful argument, `_fused_module._split`): its forward runs as written and calls
``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one by one. With
``FusionConfig(merge_projections=True)`` the direct children of such a call that
are plain ``nn.Linear`` / ``nn.QuantizedLinear`` with the same input size and
layout form a group. While the call runs, the first member called with an
array x computes every member's output as one matmul against the concatenated
weights (`_merged_replay.WeightCache`: built on the second consecutive call with
the same weight arrays, dropped when they change), returns its own slice and
keeps the others; a sibling then called with the very same x object (and still
the same weight arrays) gets its slice. Anything else (another x, other
weights, no concatenation yet, extra arguments) runs the member's own code. The
kept slices are dropped when the split call returns.

The one case this cannot see is x written in place (``x[...] = y``) between two
sibling calls of one forward; no attention does that (docs/merged-projections.md).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ._fusion_state import FUSED_WORK
from ._merged_replay import PATTERN
from ._tracing import tracing
from .graph.merge import MergeSite

__all__ = ["sibling_groups", "SiblingGroup", "member_class", "merging"]

_local = threading.local()  # id(member) -> (group, index) while a split call runs
# A split call costs host time per token that merging must win back (docs/merged-projections.md):
# MLX_FUSION_MERGE_SPLIT=0 leaves split calls alone and merges traced calls only (measuring).
ENABLED = os.environ.get("MLX_FUSION_MERGE_SPLIT", "1") != "0"
_TYPES = (nn.Linear, nn.QuantizedLinear)


def _active() -> dict:
    d = getattr(_local, "members", None)
    if d is None:
        d = _local.members = {}
    return d


def _tensor_names(m: nn.Module, cls: type) -> Tuple[str, ...]:
    names = ("weight",) if cls is nn.Linear else ("weight", "scales") + (("biases",) if "biases" in m else ())
    return names + (("bias",) if "bias" in m else ())


def _layout(m: nn.Module, cls: type) -> tuple:
    """What members of one group share: the class (`cls`: a member's own, also while it is swapped
    during a call), tensor layout, input size, dtype, quantization."""
    w = m["weight"]
    quant = (m.group_size, m.bits, m.mode) if cls is nn.QuantizedLinear else ()
    return (cls, _tensor_names(m, cls), w.shape[1:], w.dtype, m["scales"].shape[1:] if quant else (), quant)


class SiblingGroup:
    """Projections of one parent module that may share an input (module docstring).

    Which members do share one is learned from the calls: the members a split call
    called with the same x object are merged from the next call on (an o_proj of the
    same shape, called with another input, stays on its own)."""

    def __init__(self, members: List[Tuple[str, nn.Module]], state):
        self.paths, self.members = [p for p, _ in members], [m for _, m in members]
        self.cls, self.state = type(self.members[0]), state  # the parent's: its WeightCache and stats
        self.layout = _layout(self.members[0], self.cls)
        self.names = _tensor_names(self.members[0], self.cls)
        self.learned: Dict[int, Tuple[int, ...]] = {}  # member -> the members sharing its input last call
        self.sites: Dict[Tuple[int, ...], MergeSite] = {}
        self.seen: List[tuple] = []  # this call: [x, [members called with it]]
        self.pending: Optional[tuple] = None  # (x, members, {member: its weights}, {member: output}) of this call
        self.tried: set = set()  # this call: subsets looked up in the cache (once per call: see `call`)

    def weights(self, subset) -> List[mx.array]:
        return [self.members[i][n] for i in subset for n in self.names]

    def call(self, index: int, x):
        member = self.members[index]
        for entry in self.seen:
            if entry[0] is x:
                entry[1].append(index)
                break
        else:
            self.seen.append((x, [index]))
        if self.pending is not None:
            px, subset, pw, outs = self.pending
            # A member's slice depends on x and its own rows of the concatenation only.
            if px is x and index in outs and all(member[n] is w for n, w in zip(self.names, pw[index])):
                return outs.pop(index)  # computed with this x and these very weights
        subset = self.learned.get(index)
        if (subset is None or subset in self.tried or type(x) is not mx.array or x.ndim < 1
                or x.shape[-1] != _in_features(member)):
            return _own(self.cls, member, x)
        # One lookup per call and subset: the cache counts calls, and a second member of the
        # same forward must not count as the "second call" that builds the concatenation.
        self.tried.add(subset)
        if any(_layout(self.members[i], self.cls) != self.layout for i in subset):  # reshaped, requantized
            return _own(self.cls, member, x)
        weights = self.weights(subset)
        cats = self.state.weights.get(self._site(subset), weights)
        if cats is None:
            return _own(self.cls, member, x)
        FUSED_WORK[0] += 1
        y = _project(self.cls, member, x, dict(zip(self.names, cats)))
        outs = mx.split(y, self._bounds(subset), axis=-1)
        t = len(self.names)
        own = {i: weights[j * t:(j + 1) * t] for j, i in enumerate(subset)}
        self.pending = (x, subset, own, {i: o for i, o in zip(subset, outs) if i != index})
        return outs[subset.index(index)]

    def _site(self, subset) -> MergeSite:
        site = self.sites.get(subset)
        if site is None:
            t = len(self.names)
            kind = f"{self.cls.__name__}:" + ",".join(self.paths[i] for i in subset)
            site = self.sites[subset] = MergeSite(kind, tuple(tuple(range(j * t, (j + 1) * t))
                                                              for j in range(len(subset))))
        return site

    def _bounds(self, subset) -> List[int]:
        out, total = [], 0
        for i in subset[:-1]:
            total += self.members[i]["weight"].shape[0]
            out.append(total)
        return out

    def finish(self) -> None:
        """End of the split call: learn who shared an input, drop this call's arrays."""
        learned = {}
        for _, called in self.seen:
            shared = tuple(sorted(set(called)))
            if len(shared) >= 2:
                learned.update({i: shared for i in shared})
                if shared not in self.sites:
                    self._site(shared)
                    _record(self.state.stats, [self.paths[i] for i in shared], self.cls.__name__)
        self.learned, self.seen, self.pending = learned, [], None
        self.tried.clear()


def _in_features(m: nn.Module) -> int:
    w = m["weight"]  # quantized: 32-bit words of `bits`-bit values
    return w.shape[-1] * 32 // m.bits if isinstance(m, nn.QuantizedLinear) else w.shape[-1]


def _own(cls: type, member: nn.Module, x):
    return cls.__call__(member, x)


def _project(cls: type, m: nn.Module, x, t: Dict[str, mx.array]):
    """The member's own computation with the concatenated tensors (nn.Linear / nn.QuantizedLinear.__call__)."""
    if cls is nn.Linear:
        return mx.addmm(t["bias"], x, t["weight"].T) if "bias" in t else x @ t["weight"].T
    y = mx.quantized_matmul(x, t["weight"], scales=t["scales"], biases=t.get("biases"), transpose=True,
                            group_size=m.group_size, bits=m.bits, mode=m.mode)
    return y + t["bias"] if "bias" in t else y


class _Member:
    """Put in front of a grouped member's class while a split call runs."""

    def __call__(self, x, *args, **kwargs):
        slot = _active().get(id(self))
        if slot is None or args or kwargs or tracing():
            return type(self).__bases__[1].__call__(self, x, *args, **kwargs)
        # (the group runs this member's own class code, or the same code on the concatenation)
        group, index = slot
        return group.call(index, x)


@functools.lru_cache(maxsize=None)
def member_class(cls: type) -> type:
    return type(f"Merged{cls.__name__}", (_Member, cls), {"__module__": cls.__module__})


def sibling_groups(state, children: List[Tuple[str, nn.Module]]) -> Dict[int, Tuple[SiblingGroup, int]]:
    """id(child) -> (its group, its index) for the children of a split call that form groups.

    Computed again only when the children are other objects or classes (kept in
    ``state.sibling_index``; a member's changed layout is checked where it merges). The groups
    are kept on the parent's `state` (``state.sibling``), which holds the current ones only."""
    if not ENABLED:
        return {}
    index = state.sibling_index
    if (index is not None and len(index[0]) == len(children)
            and all(a is c and t is type(c) for a, t, (_, c) in zip(index[0], index[1], children))):
        return index[2]
    scope = state.filter.for_graph(_Types(children)) if state.filter else None
    by_layout: Dict[tuple, List[Tuple[str, nn.Module]]] = {}
    for path, child in children:
        if type(child) in _TYPES and (scope is None or scope([path]) is None):
            by_layout.setdefault(_layout(child, type(child)), []).append((path, child))
    out, groups = {}, {}
    for members in by_layout.values():
        if len(members) < 2:
            continue
        key = tuple(id(m) for _, m in members)
        group = state.sibling.get(key)
        if group is None or any(a is not b for a, (_, b) in zip(group.members, members)):
            group = SiblingGroup(members, state)
        groups[key] = group
        out.update({id(m): (group, i) for i, (_, m) in enumerate(members)})
    state.sibling = groups
    state.sibling_index = (tuple(c for _, c in children), tuple(type(c) for _, c in children), out)
    return out


def merging(state) -> bool:
    """Whether a split call of `state` merges sibling projections (so it must keep running split)."""
    return any(g.learned for g in state.sibling.values())


def _record(stats, paths: List[str], kind: str) -> None:
    """Count one merged set of sibling projections in the parent's stats, with an explain decision."""
    from .graph.optimizer import Decision

    stats.applied_count += 1
    stats.by_pattern[PATTERN] = stats.by_pattern.get(PATTERN, 0) + 1
    stats.decisions.append(Decision(
        PATTERN, [], [kind] * len(paths), "", True,
        f"{', '.join(paths)} read the same input: one matmul (concatenated weights, built on reuse)"))


class _Types:
    """What `ModuleFilter.for_graph` reads of a graph: the module types by path."""

    def __init__(self, children):
        self.meta = {"module_types": {path: type(c) for path, c in children}}


def enter(groups: Dict[int, Tuple[SiblingGroup, int]]) -> list:
    """Register the grouped members for this thread; returns what `leave` restores."""
    active, saved = _active(), []
    for key, slot in groups.items():
        saved.append((key, active.get(key)))
        active[key] = slot
    return saved


def leave(groups: Dict[int, Tuple[SiblingGroup, int]], saved: list) -> None:
    active = _active()
    for key, previous in saved:
        if previous is None:
            active.pop(key, None)
        else:
            active[key] = previous
    for group in {id(g): g for g, _ in groups.values()}.values():
        group.finish()
