"""One frozen settings object with a process-wide default and per-thread overrides.

    FUSION = Settings(FusionConfig)
    FUSION.get()                           # this thread's innermost override, else the default
    FUSION.set(min_tensor_size=0)          # the process-wide default, every thread
    with FUSION.override(enabled=False):   # this thread only, restored on exit; nests
        ...

`mlx_fusion.config` (FusionConfig) and `mlx_fusion.coreml.options` (OffloadOptions)
are both built on this. The settings class must be a frozen dataclass: an object
handed to another thread can never change under it, so "changing" the default
swaps in a new object under a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["Settings", "check_fields"]

T = TypeVar("T")


def check_fields(cls, changes) -> None:
    """TypeError naming the valid fields if `changes` has a key `cls` does not."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(changes) - valid)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(valid)}")


class Settings(Generic[T]):
    """A process-wide `cls()` plus a per-thread stack of temporary replacements.

    Args:
        cls: a frozen dataclass; its ``__post_init__`` validates every new value, and
            a change naming a field it does not have is a TypeError listing the valid ones.
    """

    def __init__(self, cls: Callable[[], T]):
        self.cls = cls
        self._lock = threading.Lock()
        self._default = cls()
        self._local = threading.local()  # .stack: this thread's overrides, innermost last
        self._watchers = []  # called after every change of any thread's value (`watch`)

    def watch(self, fn: Callable[[], None]) -> None:
        """Call `fn()` after every change: `set`, `reset`, entering and leaving an `override` in
        any thread. For decisions cached where reading the value would cost too much."""
        self._watchers.append(fn)

    def _changed(self) -> None:
        for fn in self._watchers:
            fn()

    def _replace(self, obj: T, **changes) -> T:
        check_fields(self.cls, changes)
        return dataclasses.replace(obj, **changes)

    @property
    def default(self) -> T:
        """The process-wide value (ignoring this thread's overrides). Read without the lock: an
        attribute read is atomic, and every fused call reads it (writers take the lock)."""
        return self._default

    def get(self) -> T:
        """The value in effect for this thread (every fused call reads it: no property, no getattr)."""
        stack = self._local.__dict__.get("stack")
        return stack[-1] if stack else self._default

    def set(self, **changes) -> T:
        """Change the process-wide default (threads without an override see it). Returns it."""
        with self._lock:
            self._default = self._replace(self._default, **changes)
        self._changed()
        return self._default

    def reset(self) -> T:
        """Restore the process-wide default to ``cls()``."""
        with self._lock:
            self._default = self.cls()
        self._changed()
        return self._default

    @contextlib.contextmanager
    def override(self, **changes) -> Iterator[T]:
        """Temporarily change the value for the current thread only; nests."""
        new = self._replace(self.get(), **changes)
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(new)
        self._changed()
        try:
            yield new
        finally:
            stack.pop()
            self._changed()
