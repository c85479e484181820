"""`fuse`: trace a function or module, rewrite the graph with fused ops, replay it.

    fast_fn = fuse(fn)           # a callable; traced once per input signature
    model = fuse(model)          # same class, same parameters, fused __call__

Like ``mx.compile``, a fused callable caches one trace per key: the structure,
shapes and dtypes of its arguments, Python scalars by type and value, and for
modules the parameters' shapes, the train/eval flags, the classes, the
non-array attributes and the layout of every submodule (docs/never-wrong.md).
It is never wrong: an argument it cannot key (a NumPy array, a cache object),
code that writes Python state while traced, a failed trace, fusion pass or
replay plan make it run the original code, warning once per object and cause
(a module instead runs its own forward with its children fused). A trace that
fuses nothing runs the original callable from then on (compiled as
``mx.compile`` would if ``compile=True``).
"""

from __future__ import annotations

import functools
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ._fused_module import FusedModule, fuse_module
from ._fusion_state import REGISTRY, FusionFallbackWarning, _FusionState, compile_like_mlx, optimizer_stats, signature
from ._shapeless import KNOWN_OUTSIDE, NOT_KNOWN, in_shapeless_trace, known_outside_now
from ._tracing import tracing
from .control import ModuleFilter
from .graph.module_state import Identity, ModuleState, Unsafe, static_key
from .graph.trace import CellState, _trace_flat, call_key, flatten_call, flatten_tree, function_roots

__all__ = ["fuse", "stats", "reset_stats", "FusedFunction", "FusionFallbackWarning"]

_FusedModule = FusedModule  # the name earlier versions exported


class FusedFunction:
    """A fused callable: traces `fn` per key and replays the fused graph.

    Modules among the arguments (a loss function's ``model``, the ``self`` of
    a fused method) are traced with their parameters as inputs, like a fused
    module.

    Attributes:
        stats (FusionStats): merged statistics of all traces.
        graphs (list[Graph]): the traced and rewritten graphs, in trace order.
        fallbacks (dict[str, int]): reasons for running unfused, with counts.
    """

    def __init__(self, fn: Callable, config=None, compile: bool = True, filter=None):
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._cells = getattr(fn, "__closure__", None) or ()
        bound = getattr(fn, "__self__", None)
        self._bound = bound if isinstance(bound, nn.Module) else None
        code = getattr(fn, "__code__", None)
        self._names = code.co_names if code is not None else ()
        self._globals = getattr(fn, "__globals__", None) or {}
        self._fusion = _FusionState(getattr(fn, "__qualname__", repr(fn)), config, compile)
        if filter is not None:
            self._fusion.filter = filter

    stats = property(lambda self: self._fusion.stats)
    graphs = property(lambda self: self._fusion.graphs)
    fallbacks = property(lambda self: self._fusion.fallbacks)

    def __call__(self, *args, **kwargs):
        state = self._fusion
        if tracing():  # called by code another fused object traces: plain MLX ops
            return self._fn(*args, **kwargs)
        cfg = state.config()
        if not cfg.enabled or state.writes:  # code that writes state would retrace every call
            return self._fn(*args, **kwargs)
        late = state.direct_last and not known_outside_now()  # the probe deferred: see FusedModule.__call__
        if not late and in_shapeless_trace():  # an outer shapeless mx.compile: see FusedModule.__call__
            return self._fn(*args, **kwargs)
        with (NOT_KNOWN if late else KNOWN_OUTSIDE):  # the replay's fused ops and fused modules skip the probe
            states, modules = [], ()
            if not kwargs and all(type(a) is mx.array for a in args):
                leaves, structure = args, len(args)  # the common case, without a tree walk
            else:
                try:
                    leaves, structure, modules = flatten_call(args, kwargs)
                except Unsafe as e:
                    state.fall_back(f"{e}: a trace would bake it in", stacklevel=3)
                    return self._fn(*args, **kwargs)
                states = [self._module_state(m) for m in modules]
            closure_key = ()
            if self._cells or self._names or self._bound is not None:
                closure_key, more = self._closure()
                states += [s for s in more if all(s is not t for t in states)]
            if states:
                for s in states:
                    if getattr(s, "unsafe", None):
                        state.fall_back(s.unsafe, stacklevel=3)
                        return self._fn(*args, **kwargs)
            params, modules_key = [], []
            for s in states:
                p, flags = s.read()
                params += p
                modules_key.append((getattr(s, "hkey", None), flags))
            key = (state.config_key(cfg), structure, tuple(modules_key), signature(params), signature(leaves),
                   closure_key)
            loose = None if type(structure) is int else (
                lambda: (key[0], call_key(flatten_tree((args, kwargs))[1], loose=True)) + key[2:])
            if late and not state.direct_hit(key):  # a trace or a replay next: again, probing first
                return self(*args, **kwargs)
            entry = state.entry(key, lambda: _trace_flat(self._fn, states, args, kwargs, function_roots(self._fn)),
                                cfg, params, loose=loose, inputs=leaves)
            state.direct_last = entry.fallback is None and entry.direct
            if entry.fallback is None:
                if entry.direct:
                    if not state.compile or entry.eager or type(structure) is not int and modules:
                        return self._fn(*args, **kwargs)  # mx.compile takes no module arguments
                    if entry.replay is None:
                        entry.replay = compile_like_mlx(_threading(self._fn, states), entry.rng_out, args, kwargs)
                    return entry.replay(params, *args, **kwargs)
                out = state.run(entry, params + list(leaves))
                if entry.fallback is None:
                    return out
            elif "writes Python state" in entry.fallback:
                state.writes = entry.fallback
            return self._fn(*args, **kwargs)

    def _closure(self):
        """(key of what the code reads besides its arguments, states to thread).

        Closure cells: arrays threaded (`CellState`), modules threaded, scalars
        keyed. The bound module of a method: threaded. Globals the function's own
        code names: modules threaded, arrays keyed by identity (rebinding retraces).
        """
        kinds, states = [], []
        for cell in self._cells:
            try:
                v = cell.cell_contents
            except ValueError:  # not bound yet
                kinds.append(None)
                continue
            if type(v) is mx.array:
                kinds.append("array")
            elif isinstance(v, nn.Module):
                kinds.append("module")
                states.append(self._module_state(v))
            else:
                try:
                    kinds.append(static_key(v))
                except Unsafe:  # an object: baked in, like mx.compile (docs/never-wrong.md)
                    kinds.append(("object", Identity(v)))
        if self._bound is not None:  # fuse(model.method): the model's parameters are threaded
            states.append(self._module_state(self._bound))
        for name in self._names:  # globals the code reads: a module threaded, an array keyed by identity
            v = self._globals.get(name)
            if type(v) is mx.array:
                kinds.append(("global", name, Identity(v)))
            elif isinstance(v, nn.Module):
                kinds.append(("global", name))
                states.append(self._module_state(v))
        kinds = tuple(kinds)
        cells = self._fusion.extra.get("cells")
        if cells is None or cells[0] != kinds:
            cells = self._fusion.extra["cells"] = (kinds, CellState(self._fn))
        return kinds, states + ([cells[1]] if cells[1].slots else [])

    def _module_state(self, m: nn.Module) -> ModuleState:
        cache = self._fusion.extra.setdefault("modules", {})
        s = cache.get(id(m))
        if s is None or s.modules[0] is not m or not s.valid():
            if len(cache) > 64:  # modules passed once: do not keep them alive forever
                cache.clear()
            s = cache[id(m)] = ModuleState(m)
        return s

    def __get__(self, obj, objtype=None):  # fused methods bind like functions
        return self if obj is None else functools.partial(self, obj)


def _threading(fn: Callable, states) -> Callable:
    """`fn` taking the arrays of `states` (closure modules and cells) first, for ``mx.compile``.

    Compiled as it is, `fn` would bake them in: an optimizer update of a model
    the function closes over would not be seen.
    """

    def call(params, *args, **kwargs):
        saved = [s.read()[0] for s in states]
        i = 0
        for s in states:
            s.install(params[i: i + len(s.slots)])
            i += len(s.slots)
        try:
            return fn(*args, **kwargs)
        finally:
            for s, p in zip(states, saved):
                s.install(p)

    return call


def fuse(fn_or_module, config=None, *, compile: bool = True, exclude=(), include=None):
    """Return a fused version of a function or ``nn.Module``.

    Args:
        fn_or_module (Callable or nn.Module): what to fuse. A module is returned
          as an instance of a subclass of its class sharing the children and
          arrays (like ``torch.compile``'s wrapper); its ``__call__`` passes the
          *current* parameters into the replay, so gradients and optimizers
          work, and takes over top-level attributes set on the original.
        config (FusionConfig, optional): default: ``mlx_fusion.config.get_config()``
          at each call. ``enabled=False`` runs the original.
        compile (bool): replay under ``mx.compile``. Default: ``True``.
        exclude (list, optional): modules never fused, by path as ``named_modules()``
          spells it (``"lm_head"``, globs like ``"layers.*.mlp"``) or by class
          (``nn.Embedding``); a path covers everything below it.
        include (list, optional): if given, only these modules (same spelling) are fused.

    Returns:
        A `FusedFunction` (``.stats``, ``.graphs``, ``.fallbacks``) or the fused
        module (``.fusion_stats``, ``.fusion_graphs``, ``.fusion_fallbacks``).

    Raises:
        TypeError: `fn_or_module` is not callable, or an `exclude`/`include` entry
          is neither a string nor an ``nn.Module`` class.
    """
    scope = ModuleFilter(exclude, include)
    if isinstance(fn_or_module, (FusedModule, FusedFunction)):
        return fn_or_module
    if isinstance(fn_or_module, nn.Module):
        return fuse_module(fn_or_module, config, compile, scope)
    if not callable(fn_or_module):
        raise TypeError(f"fuse() needs a function or nn.Module, got {type(fn_or_module).__name__}: {fn_or_module!r}")
    return FusedFunction(fn_or_module, config, compile, scope)


def stats() -> dict:
    """Summary over every live fused object in the process.

    Returns:
        dict: ``fused_objects``, ``traces``, ``applied_count``, ``failed_count``,
        ``memory_saved_bytes``, ``by_pattern`` (name -> count), ``fallbacks``
        (list of ``{"name", "reason", "count"}``) and ``objects`` (one summary each).
    """
    total = optimizer_stats()
    objects, fallbacks = [], []
    for s in list(REGISTRY):
        total.merge(s.stats)
        objects.append(s.summary())
        fallbacks += [{"name": s.name, "reason": r, "count": n} for r, n in s.fallbacks.items()]
    return {"fused_objects": len(objects), "traces": sum(o["traces"] for o in objects),
            **total.as_dict(), "fallbacks": fallbacks, "objects": objects}


def reset_stats() -> None:
    """Zero the statistics of every live fused object (caches are kept)."""
    for s in list(REGISTRY):
        s.stats, s.fallbacks, s.split = optimizer_stats(), {}, {}
        s.graphs.clear()
