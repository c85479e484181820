"""`fuse(module)`: a module of a subclass of the original class with a fused ``__call__``.

The fused module is a copy of the original's top level that shares its
children and arrays, so ``isinstance``, attributes, ``parameters()``,
``update()``, ``freeze()``, ``train()``/``eval()`` and save/load_weights behave
as before. Each call first takes over what was changed on the *original*'s
top level since the last call (``model.weight = w2`` on the module passed to
`fuse`), so both objects run the same parameters (an array replaced by an equal
copy is no change: see `_origin.Origin`).

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
from operator import is_
from time import perf_counter
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn

from ._fusion_state import FUSED_WORK, _FusionState, compile_like_mlx, signature
from ._origin import Origin
from ._shapeless import KNOWN_OUTSIDE, NOT_KNOWN, in_shapeless_trace, known_outside_now
from ._sibling_merge import enter, leave, member_class, merging, sibling_groups
from ._tracing import _local as _trace_local
from .config import get_config
from .graph.module_state import ModuleState
from .graph.trace import call_key, flatten_call, flatten_tree, trace_module_with
from .graph.module_state import Unsafe

__all__ = ["FusedModule", "fuse_module", "fused_class"]

_local = threading.local()  # id(child) -> its _FusionState while a split call runs
_SPLIT_REASONS = ("could not trace", "writes Python state")
RECHECK_EVERY = 16  # an eager module that fused nothing checks its layout at least this often
PLAIN_SHAPES = 64  # at most this many (kinds, shapes) of split calls remembered as plain
# A compiled call this soon after the last one returned was made back to back (no evaluation
# between): `_overlapped` then leaves its evaluation to the user's, as MLX would.
BACK_TO_BACK_S = 100e-6


def _child_states() -> dict:
    d = getattr(_local, "states", None)
    if d is None:
        d = _local.states = {}
    return d


class FusedModule:
    """Mixin put in front of a module's class by `fuse`: only ``__call__`` changes."""

    fusion_stats = property(lambda self: self._fusion.stats)
    fusion_graphs = property(lambda self: self._fusion.graphs)
    fusion_fallbacks = property(lambda self: self._fusion.fallbacks)

    def __call__(self, *args, **kwargs):
        # Every call (one per decoded token) runs these first lines right after the device's
        # work, with the host's caches cold: each operation costs several times its warm cost
        # there, so the common paths read attributes and call C functions only
        # (docs/performance.md, "Decode steps: the wrapper").
        forward = self._fusion_forward
        state = self.__dict__.get("_fusion") or _child_states().get(id(self))
        if state is None:
            return forward(self, *args, **kwargs)  # a child seen from another thread
        memo = state.plain_memo
        if (memo is not None and args and type(args[0]) is _array and args[0].shape == memo[0]
                and len(args) == memo[1] and kwargs.keys() == memo[2]):
            # The next decode step: the last call ran plain (below), with a first array (the
            # tokens) of this shape and these argument names (see `_plain_memo`). The original's
            # top level is checked here as `Origin.pull` first does (its frame costs more).
            o = state.origin
            if o is not None:
                items, attrs = o.views
                if not (o.module.__dict__ is o.attr_dict and len(items) == o.sizes[0] and len(attrs) == o.sizes[1]
                        and all(map(is_, items, o.values)) and all(map(is_, attrs, o.attr_values))):
                    o.pull(self)
            return forward(self, *args, **kwargs)
        if _trace_local.__dict__.get("depth", 0):  # tracing(), inlined
            return forward(self, *args, **kwargs)  # inside a trace
        state.calls += 1
        cfg = state._config or get_config()
        if not cfg.enabled:
            return forward(self, *args, **kwargs)
        arrays_only = not kwargs and all(type(a) is _array for a in args)
        if (state.direct_sig is not None and cfg is state._last[0] and state.calls % RECHECK_EVERY
                and arrays_only and signature(args) == state.direct_sig):
            # Eager, and the last call with these inputs ran the original forward: so does this
            # one, without the layout check and key (`direct_sig`). The original forward is right
            # whatever changed in the module; a change that would let a new trace fuse something
            # is seen at the next full check (every RECHECK_EVERY calls, or other inputs).
            if state.origin is not None:
                state.origin.pull(self)
            return forward(self, *args, **kwargs)
        fast = state.fast
        if (fast is not None and arrays_only and cfg is fast[0] and state.direct_last
                and signature(args) == fast[1]):
            out = _overlapped(self, state, fast, args)
            if out is not None:
                return out
        kinds = None if arrays_only else _arg_kinds(args, kwargs)
        if kinds is not None and state.plain_calls:
            if cfg is not state.plain_cfg:
                state.plain_calls.clear()
                state.plain_memo = None
            elif kinds in state.plain_calls or (kinds, _array_shapes(args, kwargs)) in state.plain_calls:
                # A decode step: everything below runs plain (see _split). The original forward
                # is right in any trace, so neither the shapeless probe nor a check is needed.
                state.plain_memo = _plain_memo(args, kwargs)
                if state.origin is not None:
                    state.origin.pull(self)
                return forward(self, *args, **kwargs)
        # An outer mx.compile(shapeless=True) traces this call: a replay bakes the traced shapes
        # (reshapes) and fused primitives have no shape rule (docs/never-wrong.md), so such a call
        # runs the module's own forward. The probe costs an eval on MLX's CPU stream; a state
        # whose last call ran its original forward (nothing fused) defers it to the key lookup
        # below, as the original forward is right in any trace: most calls then skip it.
        late = state.direct_last and not known_outside_now()
        if not late and in_shapeless_trace():
            return forward(self, *args, **kwargs)
        with (NOT_KNOWN if late else KNOWN_OUTSIDE):  # children and replays below skip the probe
            if state.origin is not None:
                state.origin.pull(self)
            if arrays_only:
                leaves, structure = args, len(args)
            else:
                reason = state.split_calls.get(kinds)
                if reason is not None:  # a decode step of an attention that merges its q/k/v
                    return _split(self, state, forward, reason, args, kwargs)
                try:
                    leaves, structure, modules = flatten_call(args, kwargs)
                except Unsafe as e:  # a cache object: attention and cache stay plain MLX
                    work = FUSED_WORK[0]
                    out = _split(self, state, forward, str(e), args, kwargs)
                    if merging(state):  # it splits again for these kinds of arguments: skip the walk
                        state.split_calls[kinds] = str(e)
                    elif state.kids and all(_inert(k[3]) for k in state.kids.values()):
                        state.plain_calls.add(kinds)
                        state.plain_cfg = cfg
                    elif FUSED_WORK[0] == work and len(state.plain_calls) < PLAIN_SHAPES:
                        # Nothing below traced or replayed a fusion: these inputs (a decode step's
                        # shapes) run the original code. A prefill that fused keeps its shapes' split.
                        state.plain_calls.add((kinds, _array_shapes(args, kwargs)))
                        state.plain_cfg = cfg
                    return out
                if modules:
                    return _split(self, state, forward, "a module is passed as an argument", args, kwargs)
            if state.writes:  # code that writes its own state: each call would retrace
                return _split(self, state, forward, state.writes, args, kwargs)
            ms = state.module_state
            if ms is None or not ms.valid():
                ms = state.module_state = ModuleState(self)
            if ms.unsafe:  # an attribute that cannot be keyed
                return _split(self, state, forward, ms.unsafe, args, kwargs)
            params, flags = ms.read()  # Dropout & co. read their own flag: all are in the key
            key = (state.config_key(cfg), ms.hflags, ms.hkey, structure, state.params_signature(params),
                   signature(leaves))
            loose = None if type(structure) is int else (lambda: key[:3] + (_loose(args, kwargs),) + key[4:])
            if late and not state.direct_hit(key):  # a trace or a replay next: again, probing first
                state.calls -= 1
                return self(*args, **kwargs)
            entry = state.entry(key, lambda: trace_module_with(ms, forward, args, kwargs), cfg, params, any(flags), loose,
                                leaves)
            state.direct_last = entry.fallback is None and entry.direct
            # (compiled, the direct path bakes the module's attributes: it always checks them)
            state.direct_sig = (signature(leaves) if state.direct_last and type(structure) is int
                                and (not state.compile or entry.eager) else None)
            if entry.fallback is None:
                if entry.direct:
                    # compiled, with arrays only and no random draws: the next such call may check
                    # the layout while the GPU runs it (`_overlapped`)
                    state.fast = ((cfg, key[5], key[4], entry) if state.compile and not entry.eager
                                  and not entry.rng_out and arrays_only else None)
                    out = _direct(self, state, forward, entry, params, args, kwargs)
                    state.returned = perf_counter()
                    return out
                out = state.run(entry, params + list(leaves))
                if entry.fallback is None:
                    return out
            if entry.fallback.startswith(_SPLIT_REASONS):
                if "writes Python state" in entry.fallback:
                    state.writes = entry.fallback
                return _split(self, state, forward, entry.fallback, args, kwargs)
            return forward(self, *args, **kwargs)

    def fusion_states(self) -> List[Tuple[str, _FusionState]]:
        """(name, state) of this module and of every child fused by a split call, recursively."""
        out, todo = [], [self._fusion]
        while todo:
            s = todo.pop()
            out.append((s.name, s))
            todo += [kid[3] for kid in s.kids.values()]
        return out

    def clear_fusion_cache(self) -> None:
        """Forget all traces (e.g. after replacing a submodule's code) and merged weights (after
        writing a weight in place, which keeps its identity: docs/merged-projections.md)."""
        for _, s in self.fusion_states():
            s.cache.clear()
            s.loose.clear()
            s.weights.records.clear()
            s.sibling, s.sibling_index = {}, None
            s.writes, s.inert, s.calls, s.fused, s.direct_last, s.direct_sig = None, False, 0, 0, False, None
            s.plain_calls.clear()
            s.plain_memo = None
            s.split_calls.clear()
            s.fast = None

    def __reduce_ex__(self, protocol):
        # copy.deepcopy and pickle: the same module with a fresh (empty) trace cache.
        base = type(self).__bases__[1]
        f = self._fusion
        attrs = {k: v for k, v in self.__dict__.items() if k != "_fusion"}
        return _rebuild, (base, f.name, f._config, f.compile, f.filter), attrs, None, iter(dict.items(self))


def _loose(args, kwargs):
    return call_key(flatten_tree((args, kwargs))[1], loose=True)


def _direct(module, state, forward, entry, params, args, kwargs):
    """The original forward; under ``mx.compile`` with the parameters as inputs if the state compiles."""
    if not state.compile or entry.eager:
        return forward(module, *args, **kwargs)
    if entry.replay is None:  # one compiled function per entry: its key covers what compile's does not

        def call(params, *a, **k):
            ms = state.module_state
            saved = ms.read()[0]
            ms.install(params)
            try:
                return forward(module, *a, **k)
            finally:
                ms.install(saved)

        entry.replay = compile_like_mlx(call, entry.rng_out, args, kwargs)
    return entry.replay(params, *args, **kwargs)


def _overlapped(module, state, fast, args):
    """A compiled call like the last one (config, input signature, parameter signature) that ran the
    compiled original: run it again *before* the layout check, start its evaluation, and check the
    layout while the device computes. Returns None when the check fails (or the parameters
    changed shape, or the original's top level changed): the caller then takes the full path,
    and what was started is dropped unread, so a stale layout still never reaches the user.

    The check touches ~700 objects (`ModuleState.valid`) that an evaluation has evicted from the
    host's caches; overlapped, it costs no device time. Inside a graph transformation (grad,
    vmap, an outer compile) MLX refuses the early evaluation: the check then runs before the
    call returns, as on the full path. Entries that draw random numbers are left out (a dropped
    run would still advance the key). Calls made back to back (several per evaluation) are not
    evaluated early: the device has the earlier calls' work queued then, and separate early
    evaluations measured slower than one (docs/performance.md). Nor are calls on the CPU, whose
    evaluation runs on the host's cores: there is nothing to overlap with.
    """
    ms = state.module_state
    params = ms.read()[0]
    if state.params_signature(params) != fast[2]:
        return None
    idle = perf_counter() - state.returned > BACK_TO_BACK_S and _runs_apart()
    out = fast[3].replay(params, *args)
    if idle:
        try:
            mx.async_eval(out)
        except Exception:  # a graph transformation: it is evaluated later, as unfused
            pass
    # Changes on the original's top level (taken over now) or anywhere in the tree: start again.
    if (state.origin is None or not state.origin.pull(module)) and ms.valid():
        state.returned = perf_counter()
        return out
    state.fast = None
    return None


def _runs_apart() -> bool:
    """Whether MLX evaluates on a device apart from the host (a GPU), where an early start overlaps."""
    return mx.default_device() == mx.gpu


def _arg_kinds(args, kwargs) -> tuple:
    """The types of a call's arguments (and of a list's first item): cheap to compute.

    A split call whose children have all become inert runs exactly the module's
    own forward; later calls with the same kinds of arguments skip the checks
    that would arrive there again (one per decoded token). Kinds can only
    confuse calls that differ deeper down, and then a fusion is missed, never a
    result changed. (Plain loops: this runs once per decoded token.)
    """
    out = []
    for v in args:
        t = type(v)
        out.append((t, type(v[0])) if (t is list or t is tuple) and v else t)
    for k, v in kwargs.items():
        t = type(v)
        out.append((k, (t, type(v[0])) if (t is list or t is tuple) and v else t))
    return tuple(out)


def _plain_memo(args, kwargs):
    """What the next call repeats to run plain at once, a decode step (`FusedModule.__call__`):
    the shape of its first array (the tokens: new values, the same shape every step), the
    number of its positional arguments and the names of the others (the cache).

    Each check costs microseconds right after the device's work, so no more is compared: a
    call that repeats these but differs elsewhere (a one-token prompt with a new cache, the
    same shape without a cache) runs the plain forward too. That misses a fusion at most: the
    plain forward is right whatever the arguments, and the original's top level is still
    taken over. A config change forgets the memo (`_fusion_state._forget_plain_memos`).
    """
    if not args or type(args[0]) is not _array:
        return None
    return args[0].shape, len(args), frozenset(kwargs)


def _array_shapes(args, kwargs) -> tuple:
    """Shapes and dtypes of a call's array arguments: with `_arg_kinds`, what tells a decode
    step (one token) from a prefill of the same model."""
    return tuple((a.shape, a.dtype) for a in args if type(a) is _array) + tuple(
        (k, v.shape, v.dtype) for k, v in kwargs.items() if type(v) is _array)


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


def _inert(s: _FusionState) -> bool:
    """A child not worth swapping in any more: called twice or more, and nothing in it fused.

    Each fused call costs a key check; a split model (decoding with a cache)
    makes one per child per token. Children whose traces fused nothing (a
    projection, a norm, RoPE) and split children whose own children are all
    inert then run as plain MLX. Only speed depends on this: a fusion a later
    shape would have found is missed, never a result changed.
    """
    if (not s.inert and s.calls >= 2 and s.fused == 0 and all(_inert(k[3]) for k in s.kids.values())
            and not merging(s)):
        s.inert = True
    return s.inert


def _split(module, state: _FusionState, forward, reason: str, args, kwargs):
    """Run the module's own forward with its direct children fused (module docstring)."""
    state.split[reason] = state.split.get(reason, 0) + 1
    registry = _child_states()
    swapped, children = [], _children(module)
    # q/k/v of an attention called with a cache: merged here, as they are never traced together
    groups = sibling_groups(state, children) if state.config().merge_projections else {}
    saved = enter(groups)
    try:
        for path, child in children:
            cls = type(child)
            slot = groups.get(id(child))
            if slot is not None and (not slot[0].learned or slot[1] in slot[0].learned):
                try:  # (object's __setattr__: nn.Module's costs 5x more for the same effect)
                    object.__setattr__(child, "__class__", member_class(cls))
                except TypeError:
                    continue
                swapped.append((child, cls, registry.get(id(child))))
                continue
            if isinstance(child, FusedModule):
                continue  # fused by the user, or swapped by an enclosing call
            kid = state.kids.get(id(child))
            if kid is None or kid[0] is not child or kid[1] is not cls:
                cs = _FusionState(f"{state.name}.{path}", state._config, state.compile, split_reasons=_SPLIT_REASONS)
                cs.filter = state.filter.child(path)
                kid = state.kids[id(child)] = (child, cls, fused_class(cls), cs)
            elif _inert(kid[3]):
                continue
            try:
                child.__class__ = kid[2]
            except TypeError:  # a class whose layout forbids the swap stays unfused
                continue
            swapped.append((child, cls, registry.get(id(child))))
            registry[id(child)] = kid[3]
        return forward(module, *args, **kwargs)
    finally:
        leave(groups, saved)
        for child, cls, previous in swapped:
            object.__setattr__(child, "__class__", cls)
            if previous is None:
                registry.pop(id(child), None)
            else:
                registry[id(child)] = previous


def _rebuild(base: type, name: str, config, compile: bool, filter=None) -> nn.Module:
    obj = fused_class(base).__new__(fused_class(base))
    state = _FusionState(name, config, compile, split_reasons=_SPLIT_REASONS)
    if filter is not None:
        state.filter = filter
    object.__setattr__(obj, "_fusion", state)
    return obj


@functools.lru_cache(maxsize=None)
def fused_class(cls: type) -> type:
    # `_fusion_forward`: the original class's __call__ (what `super()` would find), read as an attribute
    return type(f"Fused{cls.__name__}", (FusedModule, cls),
                {"__module__": cls.__module__, "_fusion_forward": staticmethod(cls.__call__)})


def fuse_module(module: nn.Module, config, compile: bool, filter=None) -> nn.Module:
    cls = fused_class(type(module))
    fused = cls.__new__(cls)  # no __init__: the state is copied below
    fused.__dict__.update(module.__dict__)
    fused.__dict__["_no_grad"] = set(module.__dict__.get("_no_grad", ()))
    dict.update(fused, module)
    state = _FusionState(type(module).__name__, config, compile, split_reasons=_SPLIT_REASONS)
    state.origin = Origin(module)
    if filter is not None:
        state.filter = filter
    object.__setattr__(fused, "_fusion", state)
    return fused


from mlx.core import array as _array  # noqa: E402
