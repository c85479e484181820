"""Which module each traced node came from (``Node.module``: ``"layers.0.mlp"``).

MLX's trace says nothing about Python: ``mx.export_function`` reports
primitives, not the module whose ``__call__`` made them. So while a trace
runs, the ``__call__`` of every class in the traced module trees is wrapped
(on the class, as Python looks it up there; restored afterwards). Each
submodule call records the arrays it received and returned; those become
extra outputs of the export, so the trace names them, and are dropped from
the graph again. A node belongs to the deepest call whose outputs depend on it
without going through that call's inputs.

Only speed and reporting read the paths (explain, ``fuse(exclude=...)``); a
value a module reads from an attribute rather than an argument (a mask its
parent computed) counts as made by that module.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

__all__ = ["CallRecorder", "assign_modules", "module_types"]

_LOCK = threading.RLock()  # patched classes are process-wide: one recording trace at a time


def _arrays(tree) -> List[mx.array]:
    return [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]


def _base(cls: type) -> type:
    if cls.__name__.startswith("Fused") and len(cls.__bases__) == 2:  # fuse()'s subclass: the user's class
        return cls.__bases__[1]
    return cls


def module_types(roots: Sequence[Tuple[str, nn.Module]]) -> Dict[str, type]:
    """path -> class of every module below `roots` (``(prefix, module)``); the first path of a shared module."""
    out, seen = {}, set()
    for prefix, m in roots:
        for p, sub in m.named_modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                out[".".join(x for x in (prefix, p) if x)] = _base(type(sub))
    return out


class CallRecorder:
    """Records the submodule calls of one trace: ``calls`` = [(path, input arrays, output arrays)]."""

    def __init__(self, roots: Sequence[Tuple[str, nn.Module]]):
        self.paths: Dict[int, str] = {}
        for prefix, m in roots:
            for p, sub in m.named_modules():
                self.paths.setdefault(id(sub), ".".join(x for x in (prefix, p) if x))
        self.classes = {type(m) for _, root in roots for _, m in root.named_modules()}
        self.calls: List[Tuple[str, List[mx.array], List[mx.array]]] = []
        self._stack: list = []
        self._thread = threading.get_ident()

    def boundary(self) -> List[mx.array]:
        """Every recorded input and output, call by call (the extra outputs of the export)."""
        return [a for _, ins, outs in self.calls for a in (*ins, *outs)]

    def _wrap(self, call):
        rec = self

        def __call__(self, *args, **kwargs):
            path = rec.paths.get(id(self))
            if (not path or threading.get_ident() != rec._thread
                    or (rec._stack and rec._stack[-1] is self)):  # super().__call__ of the same module
                return call(self, *args, **kwargs)
            rec._stack.append(self)
            try:
                out = call(self, *args, **kwargs)
            finally:
                rec._stack.pop()
            rec.calls.append((path, _arrays((args, kwargs)), _arrays(out)))
            return out

        return __call__

    @contextlib.contextmanager
    def recording(self):
        with _LOCK:
            resolved = {cls: cls.__call__ for cls in self.classes}  # before any patch: no double wrapping
            saved = []
            try:
                for cls, call in resolved.items():
                    old = cls.__dict__.get("__call__", _MISSING)
                    try:
                        cls.__call__ = self._wrap(call)
                    except (TypeError, AttributeError):  # a class that cannot be patched: its nodes go to the caller
                        continue
                    saved.append((cls, old))
                yield self
            finally:
                for cls, old in reversed(saved):
                    if old is _MISSING:
                        del cls.__call__
                    else:
                        cls.__call__ = old


_MISSING = object()


def assign_modules(graph, calls: Sequence[Tuple[str, List[str], List[str]]]) -> None:
    """Set ``node.module`` from named calls ``(path, input names, output names)``: the deepest call wins."""
    producer = graph.producers()
    depth: Dict[int, int] = {}
    for path, ins, outs in calls:
        d = path.count(".") + 1
        stop, todo, seen = set(ins), [n for n in outs if n not in ins], set()
        while todo:
            name = todo.pop()
            node = producer.get(name)
            if node is None or node.id in seen:
                continue
            seen.add(node.id)
            if d > depth.get(node.id, 0):
                depth[node.id] = d
                node.module = path
            todo += [v.name for v in node.inputs if v.name not in stop]
