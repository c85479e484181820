"""Switches: which modules may be fused, and a way to turn fusion off for a while.

    model = fuse(model, exclude=["lm_head", nn.Embedding])   # by path (glob) or type
    model = fuse(model, include=["layers.*.mlp"])            # only there
    with mlx_fusion.disable(): model(x)                      # this thread runs unfused
    @mlx_fusion.disable()
    def evaluate(model, x): ...

`disable` is a context manager and a decorator, scoped to the current thread
(``mx.disable_compile`` is process-wide and has no scope; `disable` sets
``FusionConfig(enabled=False)`` for the block, like `fusion_config`).
"""

from __future__ import annotations

import contextlib
from fnmatch import fnmatchcase
from typing import Callable, Iterable, List, Optional, Sequence

import mlx.nn as nn

from .config import fusion_config

__all__ = ["ModuleFilter", "disable"]


class disable(contextlib.ContextDecorator):
    """Run every fused object unfused in this thread while the block (or decorated function) runs."""

    def __enter__(self):
        self._cm = fusion_config(enabled=False)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def _recreate_cm(self):  # a decorated function may recurse or run on several threads
        return disable()


def _entries(entries, what: str) -> tuple:
    if entries is None:
        return None
    if isinstance(entries, (str, type)):
        entries = [entries]
    out = tuple(entries)
    for e in out:
        if not (isinstance(e, str) or (isinstance(e, type) and issubclass(e, nn.Module))):
            raise TypeError(f"{what} entries are module paths (globs allowed) or nn.Module classes, got {e!r}")
    return out


def _join(*parts: str) -> str:
    return ".".join(x for x in parts if x)


def _ancestors(path: str) -> List[str]:
    """"layers.0.mlp" -> ["layers", "layers.0", "layers.0.mlp"]."""
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class ModuleFilter:
    """`fuse(exclude=..., include=...)`: entries are module paths as ``named_modules()`` spells
    them, with ``fnmatch`` globs (``"layers.*.mlp"``), or ``nn.Module`` subclasses. A path
    entry covers the module and everything below it. A match is excluded when any of its
    nodes comes from an excluded module, or (with `include`) when none of its nodes comes
    from an included one.
    """

    def __init__(self, exclude: Optional[Iterable] = (), include: Optional[Iterable] = None, prefix: str = ""):
        self.exclude = _entries(exclude or (), "exclude")
        self.include = _entries(include, "include")
        self.prefix = prefix  # the path of the traced module inside the fused one (a split call's child)

    def child(self, path: str) -> "ModuleFilter":
        """The filter for a child module at `path` (its traces name paths from itself)."""
        return ModuleFilter(self.exclude, self.include, ".".join(x for x in (self.prefix, path) if x))

    def __bool__(self):
        return bool(self.exclude) or self.include is not None

    def for_graph(self, graph) -> Callable[[Sequence[str]], Optional[str]]:
        """The optimizer's ``scope``: module paths of a match's nodes -> why excluded, or None."""
        types = graph.meta.get("module_types", {})

        def hits(entry, chain):
            if isinstance(entry, str):
                return next((a for a in chain if fnmatchcase(a, entry)), None)
            hit = next((a for a in chain if a in types and issubclass(types[a], entry)), None)
            return None if hit is None else ".".join(x for x in (self.prefix, hit) if x)

        def scope(paths: Sequence[str]) -> Optional[str]:
            included = self.include is None
            for path in dict.fromkeys(paths):
                chain = _ancestors(".".join(x for x in (self.prefix, path) if x))
                chain_t = [""] + _ancestors(path)  # types are looked up in the trace's own (relative) paths
                for e in self.exclude:
                    hit = hits(e, chain if isinstance(e, str) else chain_t)
                    if hit is not None:
                        name = e if isinstance(e, str) else e.__name__
                        return f"excluded by module: {hit or '(top)'} matches exclude {name!r}"
                included = included or any(hits(e, chain if isinstance(e, str) else chain_t) is not None
                                           for e in self.include)
            if not included:
                where = max(paths, key=lambda p: p.count(".") + bool(p), default="")
                return f"excluded by module: {_join(self.prefix, where) or '(top)'} is not in include"
            return None

        return scope
