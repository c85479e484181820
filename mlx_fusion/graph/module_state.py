"""What a traced `nn.Module` call depends on, read cheaply per call.

A trace bakes in everything about a module that is not an array: its classes,
its Python attributes (a scale, a flag, Dropout's probability), the layout of
its children. `ModuleState` records all of that once as a hashable `key`, and
per call checks only identities (`valid`): the containers on the way to each
parameter are the same objects with the same sizes, and every module's
attribute dict holds the same objects. Any change rebuilds the state and so
the key; a new key means a new trace.

Parameters are read and written through *slots* (container, key): a module
reachable through two attributes (``s.b = s.a``) has its arrays once, so a
trace installs one tracer per array, not two that overwrite each other.
"""

from __future__ import annotations

import types
from itertools import chain
from operator import getitem, is_
from typing import Any, Callable, List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

__all__ = ["ModuleState", "CellState", "static_key", "Unsafe", "Hashed", "Identity"]

# Attributes the key leaves out: fuse's own bookkeeping, and the set of frozen
# names (it changes gradients, which `value_and_grad` handles, not the forward).
_IGNORED = frozenset({"_fusion", "_no_grad", "_training"})
_VALUE_TYPES = (type(None), bool, int, str, bytes, type(Ellipsis), mx.Dtype, mx.Device, mx.Stream)
_CODE_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.BuiltinMethodType, type)


class Identity:
    """Keys an object by identity (and keeps it alive, so the id stays unique)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return type(other) is Identity and other.obj is self.obj


class Unsafe(Exception):
    """A value a trace cannot key: it could change without the key changing."""


def static_key(v: Any) -> Any:
    """A key for a non-array Python value that a trace bakes in.

    Scalars are keyed by type *and* value (``1``, ``1.0`` and ``True`` are
    equal in Python but trace differently); floats by their bits (``nan`` and
    ``-0.0`` too); code (functions, classes) by identity; tuples and frozen
    containers item by item. Anything mutable raises `Unsafe`.
    """
    t = type(v)
    if t is float:
        return ("float", v.hex())
    if t is complex:
        return ("complex", repr(v))
    if t in _VALUE_TYPES:
        return (t, v)
    if isinstance(v, np.generic):  # NumPy scalars are immutable values
        return (t, v.tobytes())
    if t is tuple or t is frozenset:
        return (t,) + tuple(static_key(x) for x in (sorted(v, key=repr) if t is frozenset else v))
    if t is types.MethodType:  # `m.f` is a new object per access: key what it binds
        return ("method", Identity(v.__self__), Identity(v.__func__))
    if isinstance(v, _CODE_TYPES) or t.__name__ in ("nb_func", "nb_method", "partial"):
        return ("code", Identity(v))
    name = f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__name__
    raise Unsafe(f"{'an' if name[0] in 'aeiou' else 'a'} {name}")


def _attr_key(v: Any, depth: int = 0) -> Any:
    """Like `static_key`, but plain objects (a config dataclass) by their attributes."""
    try:
        return static_key(v)
    except Unsafe:
        if depth == 0 and hasattr(v, "__dict__") and not isinstance(v, (nn.Module, types.ModuleType)):
            return (type(v), tuple((k, _attr_key(x, 1)) for k, x in vars(v).items()))
        if isinstance(v, np.ndarray):
            return ("ndarray", v.shape, str(v.dtype), v.tobytes())
        if isinstance(v, (list, dict, set)) and depth <= 1:  # e.g. a config's rope_scaling dict
            return (type(v), repr(v))
        raise


class ModuleState:
    """A module's parameter slots, train flags and trace key.

    Args:
        module (nn.Module): the module (its tree is walked once, here).

    Attributes:
        paths (tuple[str]): unique parameter paths, in ``tree_flatten(parameters())`` order.
        key (tuple): hashable; changes whenever the traced code could.
        unsafe (str or None): why the module cannot be keyed (an attribute
          holding a mutable object), else None.
    """

    def __init__(self, module: nn.Module):
        self.edges: List[Tuple[Any, Any, Any]] = []
        self.sizes: List[Tuple[Any, int]] = []
        self.modules: List[nn.Module] = []
        self.attrs: List[Tuple[dict, tuple]] = []  # (an attribute dict, its values): identity-checked
        self._attr_dicts = set()  # ids of the attribute objects' dicts in `attrs`: each checked once
        self.unsafe = None
        static: list = []
        seen = set()

        def visit(c, where):
            if id(c) in seen:
                static.append(("alias", where))
                return
            seen.add(id(c))
            if isinstance(c, nn.Module):
                self.modules.append(c)
                self._attributes(c, where, static)
            self.sizes.append((c, len(c)))
            for k, v in (enumerate(c) if isinstance(c, list) else c.items()):
                if isinstance(v, (nn.Module, dict, list)):
                    self.edges.append((c, k, v))
                    visit(v, f"{where}.{k}")
                elif not isinstance(v, mx.array):
                    static.append((f"{where}.{k}", self._key(v, f"{where}.{k}")))

        self.label = _name(module)
        visit(module, self.label)
        slots, self.paths, self.slots = {}, [], []
        for path, _ in tree_flatten(module.parameters()):
            c = module
            *parents, leaf = path.split(".")
            for part in parents:
                c = c[int(part)] if isinstance(c, list) else c[part]
            slot = (c, int(leaf) if isinstance(c, list) else leaf)
            if (id(c), slot[1]) not in slots:  # the same array reached twice is one input
                slots[(id(c), slot[1])] = len(self.slots)
                self.slots.append(slot)
                self.paths.append(path)
        self.paths = tuple(self.paths)
        self.key = (tuple(type(m) for m in self.modules), self.paths, tuple(static))
        self.hkey = Hashed(self.key)
        # train()/eval() changes an attribute dict, so `valid` fails and the state is rebuilt.
        self.flags = tuple(m._training for m in self.modules)
        self.hflags = Hashed(self.flags)  # in the trace key: hashed once, not on every lookup
        # `valid` in a few C-level loops: parents and keys of the edges, all sizes, all attribute values.
        self._parents = tuple(c for c, _, _ in self.edges)
        self._keys = tuple(k for _, k, _ in self.edges)
        self._kids = tuple(v for _, _, v in self.edges)
        self._sized = tuple(c for c, _ in self.sizes)
        self._lens = tuple(n for _, n in self.sizes) + tuple(n for _, _, n in self.attrs)
        self._dicts = tuple(d for d, _, _ in self.attrs)
        self._sized += self._dicts
        self._values = tuple(v for _, vals, _ in self.attrs for v in vals)
        self._slot_parents = tuple(c for c, _ in self.slots)
        self._slot_keys = tuple(k for _, k in self.slots)

    def _attributes(self, m: nn.Module, where: str, static: list) -> None:
        d = m.__dict__
        keys = tuple(k for k in d if k not in _IGNORED)
        self.attrs.append((d, tuple(d.values()), len(d)))  # train()/eval() rebuilds: cheap, rare
        for k in keys:
            v = d[k]
            static.append((f"{where}.{k}", self._key(v, f"{where}.{k}")))
            if (hasattr(v, "__dict__") and not isinstance(v, (nn.Module, type, types.FunctionType, types.ModuleType))
                    and id(v.__dict__) not in self._attr_dicts):  # (mlx-lm's layers share one `args`)
                self._attr_dicts.add(id(v.__dict__))
                self.attrs.append((v.__dict__, tuple(v.__dict__.values()), len(v.__dict__)))

    def _key(self, v, where):
        try:
            return _attr_key(v)
        except Unsafe as e:
            self.unsafe = self.unsafe or f"attribute {where} is {e} (its changes would not be seen)"
            return ("unsafe", Identity(v))

    def valid(self) -> bool:
        """Whether the tree still has the layout and attributes this state was built from."""
        return (tuple(map(len, self._sized)) == self._lens
                and all(map(is_, map(getitem, self._parents, self._keys), self._kids))
                and all(map(is_, chain.from_iterable(map(dict.values, self._dicts)), self._values)))

    def read(self) -> Tuple[List[mx.array], tuple]:
        """(unique parameters in `paths` order, train flags of every module)."""
        return list(map(getitem, self._slot_parents, self._slot_keys)), self.flags

    def install(self, arrays) -> None:
        """Put `arrays` into the parameter slots (a trace's tracers, or the originals back)."""
        for (c, k), a in zip(self.slots, arrays):
            if isinstance(c, nn.Module):
                dict.__setitem__(c, k, a)
            else:
                c[k] = a


def _name(m) -> str:
    cls = type(m)
    if cls.__name__.startswith("Fused") and len(cls.__bases__) == 2:  # fuse's subclass: the user's name
        cls = cls.__bases__[1]
    return cls.__name__


class Hashed:
    """The key with its hash computed once (it can be large: one entry per attribute)."""

    __slots__ = ("value", "hash")

    def __init__(self, value):
        self.value, self.hash = value, hash(value)

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return self is other or (type(other) is Hashed and self.hash == other.hash and self.value == other.value)


class CellState:
    """The closure cells of a function that hold arrays: threaded like parameters.

    ``w = ...; f = fuse(lambda x: x @ w)``: the trace reads `w` through a
    tracer put in the cell, and each call passes the cell's current array, so
    rebinding `w` (``nonlocal``) or writing it in place is seen, as unfused.
    """

    label = "closure"
    modules: List[nn.Module] = []
    flags = ()

    def __init__(self, fn: Callable):
        code = getattr(fn, "__code__", None)
        pairs = zip(code.co_freevars if code else (), getattr(fn, "__closure__", None) or ())
        self.slots = [c for _, c in pairs if _holds(c, mx.array)]
        self.paths = tuple(n for n, c in zip(code.co_freevars if code else (), fn.__closure__ or ())
                           if _holds(c, mx.array))

    def read(self):
        return [c.cell_contents for c in self.slots], ()

    def install(self, arrays) -> None:
        for c, a in zip(self.slots, arrays):
            c.cell_contents = a


def _holds(cell, t) -> bool:
    try:
        return type(cell.cell_contents) is t
    except ValueError:  # an empty cell
        return False
