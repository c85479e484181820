"""Find (and undo) what a traced function changed in the Python objects it can reach.

A trace runs the user's code once with tracer arrays. Whatever that code
writes into Python objects (a KV cache's arrays and offset, a list it appends
to, ``self.count += 1``) holds tracers afterwards, and a replay would not
repeat the write. `Snapshot` records, before the trace, every container and
attribute dict reachable from the roots (arguments, closure cells, the bound
``self``, the modules being traced); after it, `changes` names what differs
and `restore` puts the recorded contents back. Arrays written *in place*
(``cache.keys[..., i, :] = k``) keep their identity, so they are found by
evaluating them: an array that depends on a tracer cannot be evaluated.
"""

from __future__ import annotations

import types
from typing import Any, List, Tuple

import mlx.core as mx
import mlx.nn as nn

__all__ = ["Snapshot"]

_ATOMS = (type(None), bool, int, float, complex, str, bytes, type, types.FunctionType, types.BuiltinFunctionType,
          types.ModuleType, types.MethodType, mx.Dtype)
_LIMIT = 20000  # objects walked per trace; beyond that the rest is not checked (docs/never-wrong.md)


class Snapshot:
    """The contents of every mutable object reachable from `roots`, by identity.

    Args:
        roots (list[tuple[str, Any]]): (label, object) pairs to walk from.
        params_of (Sequence[nn.Module]): modules whose parameter arrays the
          trace installs and restores itself (not evaluated here).
        arrays (bool): check arrays for in-place writes. Default: ``True``.
    """

    def __init__(self, roots: List[Tuple[str, Any]], params_of=(), arrays: bool = True):
        self.records: List[tuple] = []  # (label, obj, kind, saved contents)
        self.arrays: List[tuple] = []  # (label, holder, key, kind, array, handle)
        self._seen = set()
        self._skip_arrays = {id(m) for m in params_of}
        self._arrays = arrays
        for label, obj in roots:
            self._walk(label, obj, holder=None)

    def _walk(self, label, obj, holder):
        if isinstance(obj, _ATOMS) or id(obj) in self._seen or len(self._seen) > _LIMIT:
            return
        if type(obj).__module__.startswith("mlx_fusion.") or (type(obj) is dict and "__builtins__" in obj):
            return  # fuse's own objects (traces, states) and module namespaces are not user state
        self._seen.add(id(obj))
        if isinstance(obj, mx.array):
            if self._arrays and holder is not None and id(holder[0]) not in self._skip_arrays:
                self.arrays.append((label, holder[0], holder[1], holder[2], obj, mx.array(obj)))
            return
        if isinstance(obj, list):
            self.records.append((label, obj, "list", list(obj)))
            for i, v in enumerate(obj):
                self._walk(f"{label}[{i}]", v, (obj, i, "item"))
        elif isinstance(obj, set):
            self.records.append((label, obj, "set", set(obj)))
        elif isinstance(obj, tuple):
            for i, v in enumerate(obj):
                self._walk(f"{label}[{i}]", v, None)
        elif isinstance(obj, dict):  # nn.Module too: its children and arrays are items
            self.records.append((label, obj, "dict", dict(obj)))
            dot = isinstance(obj, nn.Module)
            for k, v in list(obj.items()):
                self._walk(f"{label}.{k}" if dot else f"{label}[{k!r}]", v, (obj, k, "item"))
        try:
            attrs = None if isinstance(obj, type) else getattr(obj, "__dict__", None)
        except Exception:  # an object whose attribute lookup raises: not walked
            attrs = None
        if type(attrs) is dict:
            self.records.append((label, attrs, "attrs", dict(attrs)))
            for k, v in list(attrs.items()):
                if k != "_fusion":
                    self._walk(f"{label}.{k}", v, (obj, k, "attr"))

    def changes(self) -> List[str]:
        """Labels of the objects whose contents differ from the snapshot."""
        out = []
        for label, obj, kind, saved in self.records:
            keys = _changed(obj, kind, saved)
            if keys is not None:
                out.append(f"{label}.{keys[0]}" if keys and kind == "attrs" else label)
        for label, holder, key, kind, arr, _ in self.arrays:
            if not _evaluates(arr):  # written in place with a tracer
                out.append(label)
        return out

    def restore(self) -> None:
        """Put back what changed (arrays written in place: their pre-trace value)."""
        for label, obj, kind, saved in self.records:
            keys = _changed(obj, kind, saved)
            if keys is None:
                continue
            if kind == "list":
                obj[:] = saved
            elif kind == "set":
                obj.clear()
                obj.update(saved)
            else:  # only the changed keys: a dict may be shared far beyond the traced code
                setitem, delitem = (dict.__setitem__, dict.__delitem__) if kind == "dict" else (
                    type(obj).__setitem__, type(obj).__delitem__)
                for k in keys:
                    if k in saved:
                        setitem(obj, k, saved[k])
                    else:
                        delitem(obj, k)
        for label, holder, key, kind, arr, handle in self.arrays:
            if not _evaluates(arr):
                if kind == "attr":
                    holder.__dict__[key] = handle
                elif isinstance(holder, dict):
                    dict.__setitem__(holder, key, handle)
                else:
                    holder[key] = handle


def _changed(obj, kind: str, saved):
    """None if `obj` holds what `saved` recorded; else the changed keys (lists and sets: [])."""
    if kind == "set":
        return None if obj == saved else []
    if kind == "list":
        return None if len(obj) == len(saved) and all(a is b for a, b in zip(obj, saved)) else []
    now = dict.items(obj) if kind == "dict" else obj.items()
    keys = [k for k, v in now if saved.get(k, _MISSING) is not v]
    keys += [k for k in saved if k not in obj]
    return keys or None


def _evaluates(arr: mx.array) -> bool:
    try:
        mx.eval(arr)
        return True
    except Exception:
        return False


_MISSING = object()
