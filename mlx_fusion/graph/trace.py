"""Capture an MLX function or `nn.Module` call as a `Graph`.

The capture rides on `mx.export_function` with a Python callback: MLX traces
the function, simplifies (but does not fuse) the graph and reports it item by
item. `export_function` only accepts flat arrays, so pytrees of arguments and
outputs are flattened here and the recipe to rebuild them is kept in
`graph.meta`:

- ``in_skeleton``: the ``(args, kwargs)`` tree with every array replaced by a
  `Slot`; non-array leaves (ints, strings, None) stay and are part of the trace.
- ``input_paths``: the `mlx.utils.tree_flatten` path of each graph input.
- ``out_skeleton``: the output tree with arrays replaced by `Slot`s.
- ``param_paths`` / ``num_params``: for modules, graph inputs ``[:num_params]``
  are the module's parameters (`tree_flatten(module.parameters())` order).
- ``rng_inputs``: names of graph inputs that stand for MLX's global random key
  (see `trace`); a replay must feed a fresh key each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .ir import Graph, Node, Value

__all__ = [
    "TraceError",
    "Slot",
    "trace",
    "trace_module",
    "flatten_tree",
    "unflatten_tree",
    "structure_key",
    "module_parameters",
]


class TraceError(RuntimeError):
    """A function could not be captured as a graph; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Slot:
    """Placeholder for the i-th array leaf in a flattened pytree."""

    index: int


# -- pytrees -------------------------------------------------------------------
def flatten_tree(tree: Any) -> Tuple[List[mx.array], Any]:
    """Split a pytree into its array leaves and a skeleton holding `Slot`s.

    `tree_map` keeps list/tuple/dict types, so `unflatten_tree` rebuilds the
    exact containers (a plain path list would turn tuples into lists).
    """
    leaves: List[mx.array] = []

    def take(v):
        if isinstance(v, mx.array):
            leaves.append(v)
            return Slot(len(leaves) - 1)
        return v

    return leaves, tree_map(take, tree)


def unflatten_tree(skeleton: Any, leaves: List[mx.array]) -> Any:
    """Inverse of `flatten_tree`."""
    return tree_map(lambda v: leaves[v.index] if isinstance(v, Slot) else v, skeleton)


def structure_key(skeleton: Any) -> Any:
    """A hashable key for a skeleton: container types, dict keys and static leaves."""
    if isinstance(skeleton, (list, tuple)):
        return (type(skeleton).__name__,) + tuple(structure_key(v) for v in skeleton)
    if isinstance(skeleton, dict):
        return ("dict",) + tuple((k, structure_key(v)) for k, v in skeleton.items())
    try:
        hash(skeleton)
        return skeleton
    except TypeError:
        return ("unhashable", repr(skeleton))


def module_parameters(module: nn.Module) -> Tuple[List[str], List[mx.array]]:
    """`tree_flatten(module.parameters())` as (paths, arrays)."""
    flat = tree_flatten(module.parameters())
    return [k for k, _ in flat], [v for _, v in flat]


# -- capture -------------------------------------------------------------------
def _export(flat_fn: Callable, flat_inputs: List[mx.array]) -> List[dict]:
    items: List[dict] = []
    try:
        mx.export_function(items.append, flat_fn, *flat_inputs)
    except TraceError:
        raise
    except Exception as e:  # export reports every failure as a plain exception
        raise TraceError(f"{type(e).__name__}: {e}") from e
    return items


def _to_graph(items: List[dict], rng_key: mx.array) -> Graph:
    values: Dict[str, Value] = {}

    def val(t) -> Value:
        name, shape, dtype = t
        v = values.get(name)
        if v is None:
            v = values[name] = Value(name, tuple(shape), dtype)
        return v

    g = Graph(inputs=[], outputs=[], nodes=[])
    for item in items:
        kind = item["type"]
        if kind == "inputs":
            g.inputs = [val(t) for t in item["inputs"]]
        elif kind == "outputs":
            g.outputs = [val(t) for t in item["outputs"]]
        elif kind == "constants":
            for name, arr in item["constants"]:
                g.constants[name] = arr
                g.constant_values[name] = val((name, arr.shape, arr.dtype))
        elif kind == "primitive":
            g.nodes.append(
                Node(
                    id=len(g.nodes),
                    op=item["name"],
                    inputs=[val(t) for t in item["inputs"]],
                    outputs=[val(t) for t in item["outputs"]],
                    params=tuple(item["arguments"]),
                )
            )
    # MLX's global random key enters the trace as a constant (the key at trace
    # time). Baked in, every replay would draw the same "random" numbers, so it
    # becomes an input that the replay feeds with a fresh key per call.
    rng_inputs = []
    for name, arr in list(g.constants.items()) if rng_key is not None else []:
        if arr.dtype == rng_key.dtype and arr.shape == rng_key.shape and mx.array_equal(arr, rng_key).item():
            del g.constants[name]
            g.inputs.append(g.constant_values.pop(name))
            rng_inputs.append(name)
    g.meta["rng_inputs"] = rng_inputs
    return g


def _trace_flat(fn: Callable, params: List[mx.array], args: tuple, kwargs: dict, install=None) -> Graph:
    """Trace `fn(*args, **kwargs)` with `params` as the first graph inputs.

    `install(tracers)` puts the parameter tracers where `fn` reads them.
    """
    leaves, in_skeleton = flatten_tree((args, kwargs))
    n = len(params)
    out_info: Dict[str, Any] = {}

    def flat_fn(*flat):
        if install is not None:
            install(list(flat[:n]))
        a, k = unflatten_tree(in_skeleton, list(flat[n:]))
        outs, out_info["skeleton"] = flatten_tree(fn(*a, **k))
        if not outs:
            raise TraceError("the function returns no arrays")
        return outs

    # Evaluate the global key so that it is a leaf of the trace (a constant we
    # can recognise by value) rather than a pending split from an earlier call.
    try:
        rng_key = mx.random.state[0]
        mx.eval(rng_key)
    except Exception:  # the key is itself a tracer (mx.compile with inputs=mx.random.state)
        rng_key = None
    g = _to_graph(_export(flat_fn, list(params) + leaves), rng_key)
    g.meta.update(
        in_skeleton=in_skeleton,
        out_skeleton=out_info["skeleton"],
        input_paths=[p for p, v in tree_flatten((args, kwargs)) if isinstance(v, mx.array)],
        num_params=n,
        param_paths=[],
        source=getattr(fn, "__qualname__", type(fn).__name__),
    )
    return g


def trace(fn: Callable, *example_args, **example_kwargs) -> Graph:
    """Capture one call of `fn` as a `Graph`.

    Args:
        fn (Callable or nn.Module): the function to capture. For an
          ``nn.Module`` the parameters (``module.parameters()``, flattened) are
          the first graph inputs, so a replay sees optimizer updates.
        *example_args, **example_kwargs: pytrees of arrays (and static Python
          values) to trace with; shapes and dtypes are fixed by the trace.

    Returns:
        Graph: inputs are the array leaves of ``(params, args, kwargs)`` in
        order, then any random-key inputs (``graph.meta["rng_inputs"]``).

    Raises:
        TraceError: ``export_function`` failed (``.item()``, data-dependent
          control flow, a ``custom_function`` inside, ...), the function returns
          no arrays, or a module changed its own parameters while running.
    """
    if isinstance(fn, nn.Module):
        return trace_module(fn, type(fn).__call__, *example_args, **example_kwargs)
    if not callable(fn):
        raise TypeError(f"trace() needs a callable or nn.Module, got {type(fn).__name__}")
    return _trace_flat(fn, [], example_args, example_kwargs)


def trace_module(module: nn.Module, forward: Callable, *args, **kwargs) -> Graph:
    """Trace ``forward(module, *args, **kwargs)`` with the parameters as inputs.

    Args:
        module (nn.Module): supplies the parameters; they are swapped for
          tracers during the trace and restored afterwards.
        forward (Callable): the unbound forward, usually ``type(module).__call__``.
    """
    paths, params = module_parameters(module)
    installed: List[mx.array] = []

    def install(tracers):
        installed[:] = tracers
        module.update(tree_unflatten(list(zip(paths, tracers))))

    def call(*a, **k):
        out = forward(module, *a, **k)
        now = module_parameters(module)[1]
        # A module that writes its own state (BatchNorm running stats) would
        # lose those writes in a replay: refuse rather than be silently wrong.
        if len(now) != len(installed) or any(x is not y for x, y in zip(now, installed)):
            raise TraceError(f"{type(module).__name__} changes its own parameters/state while running")
        return out

    try:
        g = _trace_flat(call, params, args, kwargs, install)
    finally:
        module.update(tree_unflatten(list(zip(paths, params))))
    g.meta["param_paths"] = paths
    g.meta["input_paths"] = [f"params.{p}" for p in paths] + g.meta["input_paths"]
    g.meta["source"] = type(module).__name__
    return g
