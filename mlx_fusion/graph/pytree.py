"""Pytrees of call arguments and outputs: array leaves, skeletons and cache keys.

`flatten_tree` / `unflatten_tree` split a tree into its arrays and a skeleton
(what `trace` records); `call_key` and `flatten_call` turn a call's arguments
into a hashable key, keying Python scalars by type and value and refusing
(`Unsafe`) what a trace would bake in but cannot key (docs/never-wrong.md).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from .module_state import Identity, Unsafe, static_key

__all__ = ["Slot", "flatten_tree", "unflatten_tree", "call_key", "flatten_call", "structure_key"]


@dataclass(frozen=True)
class Slot:
    """Placeholder for the i-th array leaf in a flattened pytree."""

    index: int


def _is_module(v) -> bool:
    return isinstance(v, nn.Module)


def flatten_tree(tree: Any) -> Tuple[List[mx.array], Any]:
    """Split a pytree into its array leaves and a skeleton holding `Slot`s.

    `tree_map` keeps list/tuple/dict types, so `unflatten_tree` rebuilds the
    exact containers (a plain path list would turn tuples into lists). An
    ``nn.Module`` is a leaf: it stays in the skeleton as the object itself.
    """
    leaves: List[mx.array] = []

    def take(v):
        if isinstance(v, mx.array):
            leaves.append(v)
            return Slot(len(leaves) - 1)
        return v

    return leaves, tree_map(take, tree, is_leaf=_is_module)


def unflatten_tree(skeleton: Any, leaves: List[mx.array]) -> Any:
    """Inverse of `flatten_tree`."""
    return tree_map(lambda v: leaves[v.index] if isinstance(v, Slot) else v, skeleton, is_leaf=_is_module)


def call_key(skeleton: Any, where: str = "", loose: bool = False) -> Any:
    """A hashable key for a skeleton: container types, dict keys and static leaves.

    Static leaves are keyed by type and value (`static_key`; with `loose`,
    numbers by type only); modules by position (their own key comes from `ModuleState`).
    Raises `Unsafe` naming the first leaf that a trace would bake in but cannot
    key (a NumPy array, a cache object): such a call must not be replayed. A
    skeleton of ``(args, kwargs)`` names leaves ``args[i]`` / ``kwargs['k']``.
    """
    t = type(skeleton)
    if not where and t is tuple and len(skeleton) == 2 and type(skeleton[1]) is dict:
        args, kwargs = skeleton
        return ((tuple,) + tuple(call_key(v, f"args[{i}]", loose) for i, v in enumerate(args)),
                (dict,) + tuple((k, call_key(v, f"kwargs[{k!r}]", loose)) for k, v in kwargs.items()))
    if t is list or t is tuple:
        return (t,) + tuple(call_key(v, f"{where}[{i}]", loose) for i, v in enumerate(skeleton))
    if t is dict:
        return (dict,) + tuple((static_key(k), call_key(v, f"{where}[{k!r}]", loose)) for k, v in skeleton.items())
    if t is Slot:
        return skeleton
    if isinstance(skeleton, nn.Module):
        return ("module",)
    try:
        key = static_key(skeleton)
    except Unsafe as e:
        raise Unsafe(f"{where or 'the argument'} is {e}") from None
    return (t,) if loose and (t is int or t is float or isinstance(skeleton, np.number)) else key


def flatten_call(args: tuple, kwargs: dict) -> Tuple[List[mx.array], Any, List[nn.Module]]:
    """(array leaves, key, modules) of a call's arguments in one walk: the per-call path.

    The key is `call_key`'s (arrays stand for themselves by position, modules
    by ``("module",)``); raises `Unsafe` naming the first unkeyable leaf.
    """
    leaves: List[mx.array] = []
    modules: List[nn.Module] = []
    key = None

    def walk(v):
        t = type(v)
        if t is mx.array:
            leaves.append(v)
            return 0
        if t is list or t is tuple:
            return (t,) + tuple(_at(walk, x, i) for i, x in enumerate(v))
        if t is dict:
            return (dict,) + tuple((static_key(k), _at(walk, x, repr(k))) for k, x in v.items())
        if isinstance(v, nn.Module):
            if all(v is not m for m in modules):
                modules.append(v)
            return ("module",)
        if t is types.MethodType and isinstance(v.__self__, nn.Module):  # `act=model.mlp.__call__`
            walk(v.__self__)  # its parameters are threaded like a module argument's
            return ("method", Identity(v.__func__))
        return static_key(v)

    try:
        key = (tuple(_at(walk, a, i) for i, a in enumerate(args)), None)
        key = (key[0], tuple((k, _at(walk, v, repr(k))) for k, v in kwargs.items()))
    except Unsafe as e:
        where, what = str(e).split("\0", 1)
        raise Unsafe(f"{'args' if key is None else 'kwargs'}{where} is {what}") from None
    return leaves, key, modules


def _at(walk, v, index):
    """`walk(v)`; an `Unsafe` raised below gets ``[index]`` prepended to its location."""
    try:
        return walk(v)
    except Unsafe as e:
        where, what = str(e).split("\0", 1) if "\0" in str(e) else ("", str(e))
        raise Unsafe(f"[{index}]{where}\0{what}") from None


def structure_key(skeleton: Any) -> Any:
    """`call_key`, with unkeyable leaves keyed by identity (for inspection tools)."""
    try:
        return call_key(skeleton)
    except Unsafe:
        return ("unsafe", id(skeleton))


