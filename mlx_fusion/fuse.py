"""`fuse`: trace a function or module, rewrite the graph with fused ops, replay it.

    fast_fn = fuse(fn)           # a callable; traced once per input signature
    model = fuse(model)          # same class, same parameters, fused __call__

Like ``mx.compile``, a fused callable caches one trace per structure, shapes
and dtypes of its arguments (and, for modules, of the parameters and the
train/eval flags), and bakes in arrays it closes over. It is never wrong: when
a trace, the fusion pass or the replay plan fails, it runs the original code
and warns once per object and cause.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .graph.interpreter import UnsupportedPrimitive, plan
from .graph.ir import Graph
from .graph.trace import TraceError, _trace_flat, flatten_tree, structure_key, trace_module, unflatten_tree

__all__ = ["fuse", "stats", "reset_stats", "FusedFunction", "FusionFallbackWarning"]


class FusionFallbackWarning(UserWarning):
    """A fused object runs its original, unfused code (see the message for why)."""


_REGISTRY: "weakref.WeakSet[_FusionState]" = weakref.WeakSet()


def _optimizer_stats():
    from .graph.optimizer import FusionStats

    return FusionStats()


class _Entry:
    """One cached trace: its replay and output skeleton, or the fallback reason."""

    __slots__ = ("replay", "out_skeleton", "fallback", "checked")

    def __init__(self, replay=None, out_skeleton=None, fallback: Optional[str] = None):
        self.replay, self.out_skeleton, self.fallback, self.checked = replay, out_skeleton, fallback, False


class _FusionState:
    """Cache, graphs and statistics of one fused object (shared by functions and modules)."""

    def __init__(self, name: str, config, compile: bool):
        self.name, self._config, self.compile = name, config, compile
        self.cache: Dict[Any, _Entry] = {}
        self.graphs: List[Graph] = []
        self.stats = _optimizer_stats()
        self.fallbacks: Dict[str, int] = {}  # reason -> number of traces that fell back
        self.reader = None  # modules: a _ModuleReader
        _REGISTRY.add(self)

    def config(self):
        if self._config is not None:
            return self._config
        from .config import get_config

        return get_config()

    def entry(self, key, make_graph: Callable[[], Graph], cfg, params=(), training=False) -> _Entry:
        entry = self.cache.get(key)
        if entry is None:
            entry = self.cache[key] = self._build(make_graph, cfg, params, training)
        return entry

    def _build(self, make_graph, cfg, params=(), training=False) -> _Entry:
        from .graph.optimizer import FusionOptimizer
        from .tracker import price

        try:
            graph = make_graph()
        except TraceError as e:
            return self.fall_back(f"could not trace: {e.reason}")
        # Neural Engine offload runs first, on the plain trace (docs/neural-engine.md).
        offloaded = _offload(graph, cfg, params, training) if cfg.neural_engine else 0
        try:
            stats = FusionOptimizer(cfg, price=price, compiled_replay=self.compile and not offloaded).optimize(graph)
            graph.lint()
        except Exception as e:  # a bug in a rewrite must not break the user's model
            return self.fall_back(f"fusion pass failed: {type(e).__name__}: {e}")
        try:
            # Core ML blocks read their inputs as NumPy, which mx.compile forbids.
            replay = plan(graph, compile=self.compile and not offloaded)
        except UnsupportedPrimitive as e:
            return self.fall_back(str(e))
        self.graphs.append(graph)
        self.stats.merge(stats)
        return _Entry(replay, graph.meta["out_skeleton"])

    def run(self, entry: _Entry, inputs: List[mx.array]):
        """Replay; the first run of an entry is guarded so a replay bug falls back."""
        if entry.checked:
            return unflatten_tree(entry.out_skeleton, entry.replay(inputs))
        try:
            out = entry.replay(inputs)
        except Exception as e:
            entry.fallback = f"replay failed: {type(e).__name__}: {e}"
            self.fall_back(entry.fallback)
            return None
        entry.checked = True
        return unflatten_tree(entry.out_skeleton, out)

    def fall_back(self, reason: str) -> _Entry:
        if reason not in self.fallbacks:
            warnings.warn(f"mlx_fusion: {self.name} runs unfused: {reason}", FusionFallbackWarning, stacklevel=4)
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        return _Entry(fallback=reason)

    def summary(self) -> dict:
        return {"name": self.name, "traces": len(self.graphs), **self.stats.as_dict(),
                "fallbacks": dict(self.fallbacks)}


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
                      FusionFallbackWarning, stacklevel=5)
        return 0


def _signature(leaves: List[mx.array]) -> tuple:
    return tuple((a.shape, a.dtype) for a in leaves)


def _flatten_call(args: tuple, kwargs: dict):
    """(array leaves, hashable structure key) of a call's arguments."""
    if not kwargs and all(type(a) is mx.array for a in args):
        return list(args), len(args)  # the common case, without a tree walk
    leaves, skeleton = flatten_tree((args, kwargs))
    return leaves, structure_key(skeleton)


class _ModuleReader:
    """Reads a module's current parameters and train flags without walking it.

    `tree_flatten(module.parameters())` plus `module.modules()` cost tens of
    microseconds per call, comparable to a small model's forward. The reader
    remembers where each parameter lives and checks, per call, only that the
    containers on the way are unchanged (same children, same sizes); any
    change (a replaced submodule, a new attribute) rebuilds it.
    """

    def __init__(self, module: nn.Module):
        flat = tree_flatten(module.parameters())
        self.paths = tuple(k for k, _ in flat)
        self.slots, self.edges, self.sizes, self.modules = [], [], [], []
        seen = set()

        def visit(c):
            if id(c) in seen:
                return
            seen.add(id(c))
            if isinstance(c, nn.Module):
                self.modules.append(c)
            items = enumerate(c) if isinstance(c, list) else c.items()
            self.sizes.append((c, len(c)))
            for k, v in items:
                if isinstance(v, (nn.Module, dict, list)):
                    self.edges.append((c, k, v))
                    visit(v)

        visit(module)
        # Classes are part of the cache key: a swapped-in submodule with the same
        # parameter shapes runs different code and needs a new trace.
        self.types = tuple(type(m) for m in self.modules)
        for path in self.paths:
            c = module
            *parents, leaf = path.split(".")
            for part in parents:
                c = c[int(part)] if isinstance(c, list) else c[part]
            self.slots.append((c, int(leaf) if isinstance(c, list) else leaf))

    def valid(self) -> bool:
        return all(c[k] is v for c, k, v in self.edges) and all(len(c) == n for c, n in self.sizes)

    def read(self):
        """(parameters in `tree_flatten(parameters())` order, train flags)."""
        return [c[k] for c, k in self.slots], tuple(m._training for m in self.modules)


class FusedFunction:
    """A fused callable: traces `fn` per input signature and replays the fused graph.

    Attributes:
        stats (FusionStats): merged statistics of all traces.
        graphs (list[Graph]): the traced and rewritten graphs, in trace order.
        fallbacks (dict[str, int]): reasons for running unfused, with counts.
    """

    def __init__(self, fn: Callable, config=None, compile: bool = True):
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._fusion = _FusionState(getattr(fn, "__qualname__", repr(fn)), config, compile)

    stats = property(lambda self: self._fusion.stats)
    graphs = property(lambda self: self._fusion.graphs)
    fallbacks = property(lambda self: self._fusion.fallbacks)

    def __call__(self, *args, **kwargs):
        state = self._fusion
        cfg = state.config()
        if not cfg.enabled:
            return self._fn(*args, **kwargs)
        leaves, structure = _flatten_call(args, kwargs)
        key = (cfg, structure, _signature(leaves))
        entry = state.entry(key, lambda: _trace_flat(self._fn, [], args, kwargs), cfg)
        if entry.fallback is None:
            out = state.run(entry, leaves)
            if entry.fallback is None:
                return out
        return self._fn(*args, **kwargs)

    def __get__(self, obj, objtype=None):  # fused methods bind like functions
        return self if obj is None else functools.partial(self, obj)


class _FusedModule:
    """Mixin put in front of a module's class by `fuse`: only `__call__` changes."""

    fusion_stats = property(lambda self: self._fusion.stats)
    fusion_graphs = property(lambda self: self._fusion.graphs)
    fusion_fallbacks = property(lambda self: self._fusion.fallbacks)

    def __call__(self, *args, **kwargs):
        state = self._fusion
        original = super().__call__
        cfg = state.config()
        if not cfg.enabled:
            return original(*args, **kwargs)
        reader = self._fusion.reader
        if reader is None or not reader.valid():
            reader = self._fusion.reader = _ModuleReader(self)
        params, flags = reader.read()  # Dropout & co. read their own flag: all are in the key
        leaves, structure = _flatten_call(args, kwargs)
        key = (cfg, flags, reader.types, reader.paths, structure, _signature(params + leaves))
        forward = super(_FusedModule, type(self)).__call__
        entry = state.entry(key, lambda: trace_module(self, forward, *args, **kwargs), cfg, params, any(flags))
        if entry.fallback is None:
            out = state.run(entry, params + leaves)
            if entry.fallback is None:
                return out
        return original(*args, **kwargs)

    def clear_fusion_cache(self) -> None:
        """Forget all traces (e.g. after replacing a submodule's code)."""
        self._fusion.cache.clear()


@functools.lru_cache(maxsize=None)
def _fused_class(cls: type) -> type:
    return type(f"Fused{cls.__name__}", (_FusedModule, cls), {"__module__": cls.__module__})


def _fuse_module(module: nn.Module, config, compile: bool) -> nn.Module:
    # An instance of a subclass of the module's own class that shares its
    # children and arrays: isinstance, attributes, parameters(), update(),
    # freeze(), train()/eval(), save/load_weights all behave as before.
    cls = _fused_class(type(module))
    fused = cls.__new__(cls)  # no __init__: the state is copied below
    fused.__dict__.update(module.__dict__)
    fused.__dict__["_no_grad"] = set(module.__dict__.get("_no_grad", ()))
    dict.update(fused, module)
    object.__setattr__(fused, "_fusion", _FusionState(type(module).__name__, config, compile))
    return fused


def fuse(fn_or_module, config=None, *, compile: bool = True):
    """Return a fused version of a function or ``nn.Module``.

    Args:
        fn_or_module (Callable or nn.Module): what to fuse. A module is returned
          as an instance of a subclass of its class sharing the parameters (like
          ``torch.compile``'s wrapper); its ``__call__`` passes the *current*
          parameters into the replay, so gradients and optimizers work.
        config (FusionConfig, optional): default: ``mlx_fusion.config.get_config()``
          at each call. ``enabled=False`` runs the original.
        compile (bool): replay under ``mx.compile``. Default: ``True``.

    Returns:
        A `FusedFunction` (``.stats``, ``.graphs``, ``.fallbacks``) or the fused
        module (``.fusion_stats``, ``.fusion_graphs``, ``.fusion_fallbacks``).

    Raises:
        TypeError: `fn_or_module` is not callable.
    """
    if isinstance(fn_or_module, _FusedModule) or isinstance(fn_or_module, FusedFunction):
        return fn_or_module
    if isinstance(fn_or_module, nn.Module):
        return _fuse_module(fn_or_module, config, compile)
    if not callable(fn_or_module):
        raise TypeError(f"fuse() needs a function or nn.Module, got {type(fn_or_module).__name__}: {fn_or_module!r}")
    return FusedFunction(fn_or_module, config, compile)


def stats() -> dict:
    """Summary over every live fused object in the process.

    Returns:
        dict: ``fused_objects``, ``traces``, ``applied_count``, ``failed_count``,
        ``memory_saved_bytes``, ``by_pattern`` (name -> count), ``fallbacks``
        (list of ``{"name", "reason", "count"}``) and ``objects`` (one summary each).
    """
    total = _optimizer_stats()
    objects, fallbacks = [], []
    for s in list(_REGISTRY):
        total.merge(s.stats)
        objects.append(s.summary())
        fallbacks += [{"name": s.name, "reason": r, "count": n} for r, n in s.fallbacks.items()]
    return {"fused_objects": len(objects), "traces": sum(o["traces"] for o in objects),
            **total.as_dict(), "fallbacks": fallbacks, "objects": objects}


def reset_stats() -> None:
    """Zero the statistics of every live fused object (caches are kept)."""
    for s in list(_REGISTRY):
        s.stats, s.fallbacks = _optimizer_stats(), {}
        s.graphs.clear()
