"""The trace cache of one fused object, shared by fused functions and modules.

One `_Entry` per key (see docs/never-wrong.md for what a key covers). An entry
replays the fused graph, or runs the original callable directly when its
trace ended with no fusion (``direct``: nothing to gain, so no interpreter in
between), or holds the reason the call runs unfused.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from operator import is_
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx

from .config import _SETTINGS, get_config
from .control import ModuleFilter
from .log import logger
from ._merged_replay import MergedReplay, WeightCache, merge_sites, record_merges
from .graph.interpreter import UnsupportedPrimitive, plan
from .graph.merge import unmerged
from .graph.ir import Graph
from .graph.module_state import Hashed
from .graph.trace import TraceError, unflatten_tree

__all__ = ["FusionFallbackWarning", "FusionRetraceWarning", "REGISTRY", "optimizer_stats", "compile_like_mlx",
           "signature", "CACHE_SIZE", "RETRACE_WARN_AFTER"]

# Traces kept per fused object, least recently used dropped first. Each holds a
# rewritten graph and, replayed under mx.compile, a compiled function.
CACHE_SIZE = 64
# Candidate decisions kept per fused object (explain, `stats.decisions`), newest last.
MAX_DECISIONS = 4096
# A fused object traced this many times for new input shapes warns once (dynamic shapes).
RETRACE_WARN_AFTER = 8

_fusions, _fallbacks, _retraces = logger("fusions"), logger("fallbacks"), logger("retraces")


class FusionFallbackWarning(UserWarning):
    """A fused object runs its original, unfused code (see the message for why)."""


class FusionRetraceWarning(UserWarning):
    """A fused object keeps tracing for new input shapes (each trace costs milliseconds)."""


def _shape_change(before, after) -> str:
    """Which input changed between two signatures ``((shape, dtype), ...)``, in words."""
    if before is None or len(before) != len(after):
        return f"the inputs changed from {len(before or ())} to {len(after)} arrays"
    for i, (a, b) in enumerate(zip(before, after)):
        if a != b:
            what = "shape" if a[0] != b[0] else "dtype"
            x, y = (a[0], b[0]) if what == "shape" else (a[1], b[1])
            return f"input {i} changed {what} {x} -> {y}"
    return "a non-array part of the key changed (a Python scalar, the config, a module attribute)"


REGISTRY: "weakref.WeakSet[_FusionState]" = weakref.WeakSet()


_deref = weakref.ref.__call__


def _forget_plain_memos() -> None:
    """A config change: a decode step recognised as plain under the old one may fuse now."""
    for s in list(REGISTRY):
        s.plain_memo = None


_SETTINGS.watch(_forget_plain_memos)


def optimizer_stats():
    from .graph.optimizer import FusionStats

    return FusionStats()


def compile_like_mlx(fn: Callable, random: bool, args=(), kwargs=None) -> Callable:
    """``mx.compile(fn)``; one that draws from MLX's global key gets it as state, so each call differs.

    Arguments ``mx.compile`` refuses (NumPy scalars, modules) leave `fn` uncompiled.
    """
    from mlx.utils import tree_flatten

    if not all(type(v) in _COMPILE_LEAVES for _, v in tree_flatten((args, kwargs or {}))):
        return fn
    if random:
        state = [mx.random.state]
        return mx.compile(fn, inputs=state, outputs=state)
    return mx.compile(fn)


_COMPILE_LEAVES = (mx.array, int, float, str, bool, type(None))


def signature(leaves) -> tuple:
    return tuple([(a.shape, a.dtype) for a in leaves])


class _Entry:
    """One cached trace: its replay and output skeleton, the direct path, or the fallback reason."""

    __slots__ = ("replay", "out_skeleton", "fallback", "checked", "direct", "rng_out", "eager")

    def __init__(self, replay=None, out_skeleton=None, fallback: Optional[str] = None):
        self.replay, self.out_skeleton, self.fallback, self.checked = replay, out_skeleton, fallback, False
        self.direct = False  # the trace fused nothing: run the original callable
        self.rng_out = False  # the last replay output is the global key after the call
        self.eager = False  # direct, and run eagerly even when the state compiles (see `entry`)


_EAGER = _Entry()
_EAGER.direct = _EAGER.eager = True

# Counts traces, fused replays and merged projections (any thread): a split call under which it
# did not move ran exactly the original code, so its kind of call may skip the split next time.
FUSED_WORK = [0]


class _FusionState:
    """Cache, graphs and statistics of one fused object."""

    def __init__(self, name: str, config, compile: bool, split_reasons: tuple = ()):
        self.name, self._config, self.compile = name, config, compile
        self.split_reasons = split_reasons  # modules: fallbacks that still run fused children
        self.cache: "OrderedDict[Any, _Entry]" = OrderedDict()  # at most CACHE_SIZE, LRU
        self.loose: Dict[Any, _Entry] = {}  # first entry per loose key (see `entry`)
        self.graphs: List[Graph] = []  # the last CACHE_SIZE rewritten graphs
        self.traces = 0
        self.filter = ModuleFilter()  # fuse(exclude=..., include=...)
        self.trace_failures: Dict[str, Optional[str]] = {}  # fallback reason -> user source line
        self._last_inputs, self._retrace_warned = None, False
        self.stats = optimizer_stats()
        self.fallbacks: Dict[str, int] = {}  # reason -> number of traces that fell back
        self.split: Dict[str, int] = {}  # modules: reason -> calls run with fused children instead
        self.extra: Dict[str, Any] = {}  # functions: ModuleStates of module arguments
        self.writes: Optional[str] = None  # the code writes Python state: never trace again
        # Modules only: the original (`_origin.Origin`), the current ModuleState, the
        # children of split calls (id -> (child, class, fused class, state)).
        self.origin, self.module_state, self.kids = None, None, {}
        self.calls, self.fused, self.inert = 0, 0, False  # see _fused_module._inert
        self.direct_last = False  # the last call ran the original forward (FusedModule.__call__)
        self.direct_sig = None  # ...eagerly, for inputs of this signature: the next such call may skip the key
        self.fast = None  # ...compiled: (config, input signature, parameter signature, entry); see _overlapped
        self.returned = 0.0  # perf_counter() when such a compiled call last returned (_overlapped)
        self.plain_calls = set()  # argument types (and shapes) of split calls that run plain
        self.plain_cfg = None  # the config plain_calls were found under
        self.plain_memo = None  # the last call that ran plain: the next decode step repeats it (_plain_memo)
        self.split_calls: Dict[tuple, str] = {}  # argument types -> reason: split calls that merge (see merging)
        self._last = (None, None, None, None)  # (config, its key, weak refs to params, their signature)
        self.weights = WeightCache()  # merged projections' concatenated weights, shared by the traces
        self.sibling: Dict[tuple, Any] = {}  # split calls: groups of child projections (_sibling_merge)
        self.sibling_index = None  # (children, their classes, groups) of the last split call
        REGISTRY.add(self)

    def direct_hit(self, key) -> bool:
        """Whether `key`'s cached entry runs the original callable (a deferred probe may stay
        skipped); if not, the next call probes first (`direct_last` is cleared)."""
        hit = self.cache.get(key)
        if hit is not None and hit.direct and hit.fallback is None:
            return True
        self.direct_last, self.direct_sig, self.fast = False, None, None
        return False

    def config(self):
        return self._config if self._config is not None else get_config()

    def config_key(self, cfg) -> "Hashed":
        """`cfg` as a key part with its hash computed once (a dataclass hashes all its fields)."""
        last = self._last
        if cfg is last[0]:
            return last[1]
        key = Hashed(cfg)
        self._last = (cfg, key) + last[2:]
        return key

    def params_signature(self, params: List[mx.array]) -> "Hashed":
        """`signature(params)` with its hash computed once, reused while the very same arrays
        are passed (inference): a key holds it, and every cache lookup hashes the key.

        The arrays are kept as weak references: a strong one would keep the last call's
        parameters alive after the user replaced them (a training step's optimizer update
        could then not reuse their buffers, one more copy of the weights at its peak)."""
        last = self._last
        refs = last[2]
        if refs is not None and len(params) == len(refs) and all(map(is_, params, map(_deref, refs))):
            return last[3]
        sig = Hashed(signature(params))
        self._last = last[:2] + (tuple(map(weakref.ref, params)), sig)
        return sig

    def entry(self, key, make_graph: Callable[[], Graph], cfg, params=(), training=False, loose=None,
              inputs=None) -> _Entry:
        """The entry for `key`, tracing on a miss.

        `loose()` gives the key with numbers keyed by type only. A miss whose
        loose key belongs to an entry that fused nothing runs the original
        eagerly without a trace: a scalar that changes every call (RoPE's
        ``offset`` during decoding) would otherwise retrace, and recompile,
        each call for nothing.
        """
        entry = self.cache.get(key)
        if entry is None:
            loose = loose() if loose is not None else None
            if loose is not None:
                seen = self.loose.get(loose)
                if seen is not None and seen.direct:
                    return _EAGER
            FUSED_WORK[0] += 1
            self._retrace(inputs)
            entry = self.cache[key] = self._build(make_graph, cfg, params, training)
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
            if loose is not None:
                if len(self.loose) >= CACHE_SIZE:
                    self.loose.pop(next(iter(self.loose)))
                self.loose.setdefault(loose, entry)
        elif len(self.cache) > 1:
            self.cache.move_to_end(key)
        return entry

    def _retrace(self, inputs) -> None:
        """Count a trace; log what changed since the last one and warn once when it keeps happening."""
        self.traces += 1
        sig = signature(inputs) if inputs is not None else None
        if self.traces > 1:
            change = _shape_change(self._last_inputs, sig) if sig is not None else "the key changed"
            _retraces.info("%s: trace %d: %s", self.name, self.traces, change)
            if self.traces >= RETRACE_WARN_AFTER and not self._retrace_warned and sig != self._last_inputs:
                self._retrace_warned = True
                warnings.warn(f"mlx_fusion: {self.name} was traced {self.traces} times, {change} "
                              f"(dynamic shapes: each new shape traces again, and {CACHE_SIZE} traces are kept); "
                              "pad inputs to a few sizes or exclude the module", FusionRetraceWarning, stacklevel=4)
        self._last_inputs = sig

    def _build(self, make_graph, cfg, params=(), training=False) -> _Entry:
        from .graph.optimizer import FusionOptimizer
        from .tracker import price

        try:
            graph = make_graph()
        except TraceError as e:
            self.trace_failures[f"could not trace: {e.reason}"] = e.where
            return self.fall_back(f"could not trace: {e.reason}")
        except Exception as e:  # the user's own error (the original raises it again) or a bug here
            return self.fall_back(f"could not trace: {type(e).__name__}: {e}")
        # Neural Engine offload runs first, on the plain trace (docs/neural-engine.md).
        offloaded = _offload(graph, cfg, params, training) if cfg.neural_engine else 0
        try:
            graph.meta["traced_nodes"] = len(graph)
            scope = self.filter.for_graph(graph)
            # Before the rules, so a GLU reading the merged gate/up outputs is still matched.
            sites = merge_sites(graph, cfg, scope) if cfg.merge_projections and not offloaded else []
            opt = FusionOptimizer(cfg, price=price, compiled_replay=self.compile and not offloaded, scope=scope)
            stats = opt.optimize(graph)
            record_merges(stats, sites, graph)
            if opt.skipped:
                self.extra["skipped"] = opt.skipped
            graph.lint()
        except Exception as e:  # a bug in a rewrite must not break the user's model
            return self.fall_back(f"fusion pass failed: {type(e).__name__}: {e}")
        self.graphs.append(graph)
        if len(self.graphs) > CACHE_SIZE:
            del self.graphs[0]
        self.stats.merge(stats)
        del self.stats.decisions[:-MAX_DECISIONS]  # dynamic shapes: keep the recent traces' only
        _log_decisions(self.name, stats)
        if stats.applied_count == 0 and not offloaded:
            # Nothing fused: the original code is at least as fast as any replay of it.
            entry = _Entry(out_skeleton=graph.meta["out_skeleton"])
            entry.direct, entry.rng_out = True, bool(graph.meta.get("rng_outputs"))
            return entry
        try:
            # Core ML blocks read their inputs as NumPy, which mx.compile forbids.
            replay = plan(graph, compile=self.compile and not offloaded)
            if sites:
                replay = MergedReplay(replay, plan(unmerged(graph), compile=self.compile), sites, self.weights)
        except UnsupportedPrimitive as e:
            for d in stats.decisions:  # the same objects the merged stats hold: explain shows why
                if d.fused:
                    d.fused, d.reason = False, f"not applied: the call runs unfused ({e})"
            return self.fall_back(str(e))
        self.fused += 1
        entry = _Entry(replay, graph.meta["out_skeleton"])
        entry.rng_out = bool(graph.meta.get("rng_outputs"))
        return entry

    def run(self, entry: _Entry, inputs: List[mx.array]):
        """Replay; the first run of an entry is guarded so a replay bug falls back."""
        FUSED_WORK[0] += 1
        if entry.checked:
            out = entry.replay(inputs)
        else:
            try:
                out = entry.replay(inputs)
            except Exception as e:
                entry.fallback = f"replay failed: {type(e).__name__}: {e}"
                self.fall_back(entry.fallback)
                return None
            entry.checked = True
        if entry.rng_out:  # the key after the call's draws, as the unfused draws leave it
            mx.random.state[0][...] = out[-1]
        return unflatten_tree(entry.out_skeleton, out)

    def fall_back(self, reason: str, stacklevel: int = 5) -> _Entry:
        how = ("runs its own code unfused (its child modules still fused)" if reason.startswith(self.split_reasons)
               else "runs unfused")
        where = self.trace_failures.get(reason)
        at = f" (at {where})" if where else ""
        if reason not in self.fallbacks:
            warnings.warn(f"mlx_fusion: {self.name} {how}: {reason}{at}", FusionFallbackWarning, stacklevel=stacklevel)
        _fallbacks.info("%s %s: %s%s", self.name, how, reason, at)
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        return _Entry(fallback=reason)

    def summary(self) -> dict:
        return {"name": self.name, "traces": len(self.graphs), **self.stats.as_dict(),
                "fallbacks": dict(self.fallbacks), "split": dict(self.split)}


def _log_decisions(name: str, stats) -> None:
    if not _fusions.isEnabledFor(20):  # logging.INFO: skip the formatting
        return
    for d in stats.decisions:
        _fusions.info("%s: %s %s at %s: %s", name, "fused" if d.fused else "rejected", d.pattern,
                      d.module or "(top)", d.reason)


def _offload(graph: Graph, cfg, params, training: bool) -> int:
    """Run the Core ML offload pass; returns the number of blocks offloaded."""
    from .coreml.runtime import CoreMLTrainingError, offload_graph

    names = [v.name for v in graph.inputs[: graph.meta.get("num_params", 0)]]
    try:
        return offload_graph(graph, cfg, param_values=dict(zip(names, params)), training=training).count
    except CoreMLTrainingError:
        raise
    except Exception as e:  # offload is an optimization: a failure leaves the graph to MLX
        warnings.warn(f"mlx_fusion: Neural Engine offload failed, running on MLX: {type(e).__name__}: {e}",
                      FusionFallbackWarning, stacklevel=6)
        return 0
