"""`fuse(module)`: a module of a subclass of the original class with a fused ``__call__``.

The fused module is a copy of the original's top level that shares its
children and arrays, so ``isinstance``, attributes, ``parameters()``,
``update()``, ``freeze()``, ``train()``/``eval()`` and save/load_weights behave
as before. Each call first takes over what was changed on the *original*'s
top level since the last call (``model.weight = w2`` on the module passed to
`fuse`), so both objects run the same parameters.

A call that cannot be traced safely as a whole (an argument is a stateful
object such as a KV cache, the code writes its own state, a trace fails)
runs the module's own forward with its direct children fused ("split"): while
it runs, each child module's class is swapped for its fused class, so a child
called with arrays only (a transformer block's MLP) is traced once and
replayed, and a child called with the cache splits again. The classes are
restored when the call returns.
"""

from __future__ import annotations

import functools
import threading
from typing import List, Tuple

import mlx.nn as nn

from ._fusion_state import _FusionState, compile_like_mlx, signature
from ._tracing import tracing
from .graph.module_state import ModuleState
from .graph.trace import call_key, flatten_tree, trace_module_with
from .graph.module_state import Unsafe

__all__ = ["FusedModule", "fuse_module", "fused_class"]

_local = threading.local()  # id(child) -> its _FusionState while a split call runs


def _child_states() -> dict:
    d = getattr(_local, "states", None)
    if d is None:
        d = _local.states = {}
    return d


def _state_of(m) -> "_FusionState | None":
    return m.__dict__.get("_fusion") or _child_states().get(id(m))


class FusedModule:
    """Mixin put in front of a module's class by `fuse`: only ``__call__`` changes."""

    fusion_stats = property(lambda self: self._fusion.stats)
    fusion_graphs = property(lambda self: self._fusion.graphs)
    fusion_fallbacks = property(lambda self: self._fusion.fallbacks)

    def __call__(self, *args, **kwargs):
        forward = super(FusedModule, type(self)).__call__
        state = _state_of(self)
        if state is None or tracing():  # inside a trace (or a child seen from another thread): plain MLX
            return forward(self, *args, **kwargs)
        cfg = state.config()
        if not cfg.enabled:
            return forward(self, *args, **kwargs)
        origin = state.extra.get("origin")
        if origin is not None:
            origin.pull(self)
        ms = state.extra.get("module_state")
        if ms is None or not ms.valid():
            ms = state.extra["module_state"] = ModuleState(self)
        if ms.unsafe or state.extra.get("writes"):  # keyless, or each call would retrace
            return _split(self, state, ms, forward, ms.unsafe or state.extra["writes"], args, kwargs)
        skeleton = None
        if not kwargs and all(type(a) is _array for a in args):
            leaves, structure = list(args), len(args)
        else:
            leaves, skeleton = flatten_tree((args, kwargs))
            try:
                structure = call_key(skeleton)
            except Unsafe as e:
                return _split(self, state, ms, forward, str(e), args, kwargs)
            if ("module",) in _modules_marks(structure):
                return _split(self, state, ms, forward, "a module is passed as an argument", args, kwargs)
        params, flags = ms.read()  # Dropout & co. read their own flag: all are in the key
        key = (cfg, flags, ms.key, structure, signature(params + leaves))
        loose = None if skeleton is None else key[:3] + (call_key(skeleton, loose=True), key[4])
        entry = state.entry(key, lambda: trace_module_with(ms, forward, args, kwargs), cfg, params, any(flags), loose)
        if entry.fallback is None:
            if entry.direct:
                return _direct(self, state, forward, entry, args, kwargs)
            out = state.run(entry, params + leaves)
            if entry.fallback is None:
                return out
        if entry.fallback.startswith(_SPLIT_REASONS):
            if "writes Python state" in entry.fallback:
                state.extra["writes"] = entry.fallback
            return _split(self, state, ms, forward, entry.fallback, args, kwargs)
        return forward(self, *args, **kwargs)

    def fusion_states(self) -> List[Tuple[str, _FusionState]]:
        """(name, state) of this module and of every child fused by a split call, recursively."""
        out, todo = [], [self._fusion]
        while todo:
            s = todo.pop()
            out.append((s.name, s))
            todo += [cs for _, _, _, cs in s.extra.get("children", (None, []))[1]]
        return out

    def clear_fusion_cache(self) -> None:
        """Forget all traces (e.g. after replacing a submodule's code)."""
        self._fusion.cache.clear()
        self._fusion.extra.pop("children", None)

    def __reduce_ex__(self, protocol):
        # copy.deepcopy and pickle: the same module with a fresh (empty) trace cache.
        base = type(self).__bases__[1]
        f = self._fusion
        attrs = {k: v for k, v in self.__dict__.items() if k != "_fusion"}
        return _rebuild, (base, f.name, f._config, f.compile), attrs, None, iter(dict.items(self))


def _modules_marks(structure) -> List:
    out = []

    def walk(s):
        if isinstance(s, tuple):
            if s == ("module",):
                out.append(s)
            else:
                for x in s:
                    walk(x)

    walk(structure)
    return out


def _direct(module, state, forward, entry, args, kwargs):
    """The original forward; under ``mx.compile`` with the parameters as inputs if the state compiles."""
    if not state.compile or entry.eager:
        return forward(module, *args, **kwargs)
    if entry.replay is None:  # one compiled function per entry: its key covers what compile's does not

        def call(params, *a, **k):
            ms = state.extra["module_state"]
            saved = ms.read()[0]
            ms.install(params)
            try:
                return forward(module, *a, **k)
            finally:
                ms.install(saved)

        entry.replay = compile_like_mlx(call, entry.rng_out, args, kwargs)
    return entry.replay(state.extra["module_state"].read()[0], *args, **kwargs)


def _children(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The modules directly below `module` (through dicts and lists, not through other modules)."""
    found, seen = [], set()

    def visit(c, where):
        for k, v in (enumerate(c) if isinstance(c, list) else c.items()):
            if isinstance(v, nn.Module):
                if id(v) not in seen:
                    seen.add(id(v))
                    found.append((f"{where}{k}", v))
            elif isinstance(v, (dict, list)):
                visit(v, f"{where}{k}.")

    visit(module, "")
    return found


_SPLIT_REASONS = ("could not trace", "writes Python state")


def _split(module, state: _FusionState, ms: ModuleState, forward, reason: str, args, kwargs):
    """Run the module's own forward with its direct children fused (module docstring)."""
    state.split[reason] = state.split.get(reason, 0) + 1
    kids = state.extra.get("children")
    if kids is None or kids[0] is not ms:
        kids = []
        for path, child in _children(module):
            if isinstance(child, FusedModule):
                continue
            cs = _FusionState(f"{state.name}.{path}", state._config, state.compile, split_reasons=_SPLIT_REASONS)
            kids.append((child, type(child), fused_class(type(child)), cs))
        kids = state.extra["children"] = (ms, kids)
    registry = _child_states()
    swapped = []
    try:
        for child, cls, fused, cs in kids[1]:
            if type(child) is not cls:
                continue  # already swapped by an enclosing call, or changed: leave it
            try:
                child.__class__ = fused
            except TypeError:  # a class whose layout forbids the swap stays unfused
                continue
            swapped.append((child, cls, registry.get(id(child))))
            registry[id(child)] = cs
        return forward(module, *args, **kwargs)
    finally:
        for child, cls, previous in swapped:
            child.__class__ = cls
            if previous is None:
                registry.pop(id(child), None)
            else:
                registry[id(child)] = previous


class _Origin:
    """The module passed to `fuse`: what changed on its top level since the last call."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._snap()

    def _snap(self):
        m = self.module
        self.items, self.attrs = dict(dict.items(m)), dict(m.__dict__)

    def pull(self, fused: nn.Module) -> None:
        m = self.module
        if (len(m) == len(self.items) and all(m[k] is v for k, v in self.items.items())
                and len(m.__dict__) == len(self.attrs) and all(m.__dict__.get(k, self) is v
                                                               for k, v in self.attrs.items())):
            return
        for k in self.items:
            if k not in m:
                dict.pop(fused, k, None)
        for k, v in dict.items(m):
            if self.items.get(k, self) is not v:
                dict.__setitem__(fused, k, v)
        for k, v in m.__dict__.items():
            if k not in ("_fusion", "_no_grad") and self.attrs.get(k, self) is not v:
                fused.__dict__[k] = v
        self._snap()


def _rebuild(base: type, name: str, config, compile: bool) -> nn.Module:
    obj = fused_class(base).__new__(fused_class(base))
    object.__setattr__(obj, "_fusion", _FusionState(name, config, compile, split_reasons=_SPLIT_REASONS))
    return obj


@functools.lru_cache(maxsize=None)
def fused_class(cls: type) -> type:
    return type(f"Fused{cls.__name__}", (FusedModule, cls), {"__module__": cls.__module__})


def fuse_module(module: nn.Module, config, compile: bool) -> nn.Module:
    cls = fused_class(type(module))
    fused = cls.__new__(cls)  # no __init__: the state is copied below
    fused.__dict__.update(module.__dict__)
    fused.__dict__["_no_grad"] = set(module.__dict__.get("_no_grad", ()))
    dict.update(fused, module)
    state = _FusionState(type(module).__name__, config, compile, split_reasons=_SPLIT_REASONS)
    state.extra["origin"] = _Origin(module)
    object.__setattr__(fused, "_fusion", state)
    return fused


from mlx.core import array as _array  # noqa: E402
