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
- ``rng_outputs``: 1 when the last graph output is the global key after the
  call's draws (a replay stores it back, as the unfused draws would), else 0.

What a trace bakes in and what it refuses is in docs/never-wrong.md.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .._tracing import trace_scope
from .guard import Snapshot
from .ir import Graph, Node, Value
from .module_state import CellState, ModuleState, Unsafe, _name
from .scopes import CallRecorder, assign_modules, module_types
from .pytree import Slot, _is_module, call_key, flatten_call, flatten_tree, structure_key, unflatten_tree

__all__ = [
    "TraceError",
    "Slot",
    "trace",
    "trace_module",
    "flatten_tree",
    "unflatten_tree",
    "structure_key",
    "call_key",
    "flatten_call",
    "CellState",
    "module_parameters",
]


class TraceError(RuntimeError):
    """A function could not be captured as a graph; `reason` says why, `where` (or None) the
    user's source line that failed (``"model.py:12: n = x.sum().item()"``)."""

    def __init__(self, reason: str, where: Optional[str] = None):
        super().__init__(reason)
        self.reason, self.where = reason, where


def _user_line(tb) -> Optional[str]:
    """The innermost frame of `tb` outside mlx_fusion and MLX itself, as ``file:line: code``."""
    import os
    import traceback

    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mlx_dir = os.path.dirname(os.path.dirname(os.path.abspath(nn.__file__)))
    for f in reversed(traceback.extract_tb(tb)):
        name = os.path.abspath(f.filename)
        if not name.startswith((ours + os.sep, mlx_dir + os.sep)):
            return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"
    return None


def module_parameters(module: nn.Module) -> Tuple[List[str], List[mx.array]]:
    """`tree_flatten(module.parameters())` as (paths, arrays)."""
    flat = tree_flatten(module.parameters())
    return [k for k, _ in flat], [v for _, v in flat]


def _modules_in(skeleton: Any) -> List[nn.Module]:
    """Modules among the leaves (and the modules of bound methods), in `flatten_call`'s order."""
    found: List[nn.Module] = []

    def take(v):
        if isinstance(v, types.MethodType) and isinstance(v.__self__, nn.Module):
            v = v.__self__
        if isinstance(v, nn.Module) and all(v is not m for m in found):
            found.append(v)

    tree_map(take, skeleton, is_leaf=_is_module)
    return found


# -- capture -------------------------------------------------------------------
def _compile_enabled() -> bool:
    """MLX has no getter: a compiled function that runs its Python twice is disabled."""
    calls = []

    def probe(x):
        calls.append(1)
        return x + 1

    f = mx.compile(probe)
    f(mx.array(0)), f(mx.array(0))
    return len(calls) <= 1  # enabled: traced once (or never, if MLX found a cached trace)


def _export(flat_fn: Callable, flat_inputs: List[mx.array]) -> List[dict]:
    # `mx.compile`d code inside (mlx-lm's swiglu, nn.gelu, ...) would be one
    # Compiled primitive, which export cannot write: trace through it instead.
    enabled = _compile_enabled()
    items: List[dict] = []
    stopped: List[str] = []
    try:
        mx.disable_compile()
        with trace_scope(), _watch_stop_gradient(stopped):
            mx.export_function(items.append, flat_fn, *flat_inputs)
    except TraceError:
        raise
    except Exception as e:  # export reports every failure as a plain exception
        hint = ""
        if "CustomTransforms" in str(e):
            hint = (" (an mx.custom_function or mx.checkpoint inside: nn.utils.checkpoint, an mlx_fusion op,"
                    " a custom vjp)")
        raise TraceError(f"{type(e).__name__}: {e}{hint}", _user_line(e.__traceback__)) from e
    finally:
        if enabled:
            mx.enable_compile()
    if stopped:
        raise TraceError(f"mx.stop_gradient of a {stopped[0]} array: mx.export_function drops StopGradient, so a "
                         "replay would differentiate through it")
    return items


_real_stop_gradient = mx.stop_gradient
_watching = threading.local()


def _stop_gradient(x, *args, **kwargs):
    # Dropping the node changes no gradient for integer arrays (MoE routing indices) nor in
    # mlx.nn's own uses: the max shift of log_softmax / cross_entropy, which cancels out.
    seen = getattr(_watching, "seen", None)
    if (seen is not None and isinstance(x, mx.array) and mx.issubdtype(x.dtype, mx.inexact)
            and not sys._getframe(1).f_globals.get("__name__", "").startswith("mlx.nn.")):
        seen.append(str(x.dtype).replace("mlx.core.", ""))
    return _real_stop_gradient(x, *args, **kwargs)


_real_fast_cross_entropy = mx.fast.cross_entropy


def _fast_cross_entropy(logits, targets, **kwargs):
    # On a GPU nn.losses.cross_entropy calls mx.fast.cross_entropy, whose CrossEntropy primitive
    # mx.export_function cannot write: traced, it is spelled as exportable ops with its semantics
    # (ops/linear_cross_entropy.traceable_cross_entropy), which the linear+cross_entropy rule matches.
    if getattr(_watching, "seen", None) is None or mx.default_device() == mx.cpu:
        return _real_fast_cross_entropy(logits, targets, **kwargs)  # on the CPU it exports as it is
    from ..ops.linear_cross_entropy import traceable_cross_entropy

    return traceable_cross_entropy(logits, targets)


@contextlib.contextmanager
def _watch_stop_gradient(seen: List[str]):
    """Record, in this thread, every floating-point `mx.stop_gradient` the traced code calls (and
    spell `mx.fast.cross_entropy` as exportable ops while tracing: `traceable_cross_entropy`)."""
    _watching.seen = seen
    mx.stop_gradient = _stop_gradient  # stays installed: outside a watch it only forwards (threads may trace)
    mx.fast.cross_entropy = _fast_cross_entropy  # likewise
    try:
        yield
    finally:
        _watching.seen = None


# The global key a trace runs with: a constant we recognise by value (a seed
# no user key is likely to equal), never the caller's key, which may be a
# compile tracer or an array of another thread.
_MARK_SEED = 0x6D6C786675736521


def _to_graph(items: List[dict], rng_key: Optional[mx.array]) -> Graph:
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
    # The global key enters the trace as a constant. Baked in, every replay
    # would draw the same "random" numbers, so it becomes an input that the
    # replay feeds with the caller's key each call.
    rng_inputs = []
    for name, arr in list(g.constants.items()) if rng_key is not None else []:
        if arr.dtype == rng_key.dtype and arr.shape == rng_key.shape and mx.array_equal(arr, rng_key).item():
            del g.constants[name]
            g.inputs.append(g.constant_values.pop(name))
            rng_inputs.append(name)
    g.meta["rng_inputs"] = rng_inputs
    return g


def _trace_flat(fn: Callable, states: Sequence[ModuleState], args: tuple, kwargs: dict,
                roots: Sequence[Tuple[str, Any]] = ()) -> Graph:
    """Trace `fn(*args, **kwargs)` with the parameters of `states` as the first graph inputs.

    Every module in `states` gets tracers in its parameter slots during the
    trace and its own arrays back afterwards. Python state reachable from
    `roots`, the arguments and the modules is checked: a write raises
    `TraceError` (after undoing it).
    """
    leaves, in_skeleton = flatten_tree((args, kwargs))
    states = list(states)
    params = [p for s in states for p in s.read()[0]]
    n = len(params)
    out_info: Dict[str, Any] = {}
    walked = [(s.label, s.modules[0]) for s in states if s.modules] + list(roots)
    walked += [(f"args[{i}]", a) for i, a in enumerate(args)] + [(k, v) for k, v in kwargs.items()]
    snapshot = Snapshot(walked, params_of=[m for s in states for m in s.modules])
    per_state = [s.read()[0] for s in states]
    paths = [f"{s.label}.{p}" for s in states for p in s.paths]
    # Module paths: the first module is the top (""), others are named by their class.
    scope_roots = [("" if i == 0 else s.label, s.modules[0]) for i, s in enumerate(states)
                   if s.modules and isinstance(s.modules[0], nn.Module)]
    recorder = CallRecorder(scope_roots)

    def flat_fn(*flat):
        i = 0
        for s in states:
            s.install(flat[i: i + len(s.slots)])
            i += len(s.slots)
        a, k = unflatten_tree(in_skeleton, list(flat[n:]))
        rebuilt = Snapshot([(f"args[{j}]", x) for j, x in enumerate(a)] + list(k.items()), arrays=False)
        outs, out_info["skeleton"] = flatten_tree(fn(*a, **k))
        if not outs:
            raise TraceError("the function returns no arrays")
        try:  # an output object holding arrays would be returned as traced, tracers and all
            call_key(out_info["skeleton"], "the output")
        except Unsafe as e:
            raise TraceError(f"{e}, not an array or a list/tuple/dict of arrays") from None
        # A module that replaced its own arrays (BatchNorm's running stats), or
        # code that appends to an argument, would lose those writes in a replay.
        now = [p for s in states for p in s.read()[0]]
        out_info["wrote"] = [p for p, x, y in zip(paths, now, flat[:n]) if x is not y] + rebuilt.changes()
        out_info["n_out"] = len(outs)
        boundary = recorder.boundary()  # extra outputs, so the trace names them (graph/scopes.py)
        out_info["n_boundary"] = len(boundary)
        outs = outs + boundary
        key = mx.random.state[0]
        if key is not out_info["key"]:  # draws from the global key: return where it ended
            outs.append(key)
            out_info["rng_out"] = True
        return outs

    pre_key = mx.random.state[0]
    mx.random.seed(_MARK_SEED)
    out_info["key"], out_info["rng_out"] = mx.random.state[0], False
    failure = None
    try:
        with recorder.recording():
            items = _export(flat_fn, params + leaves)
    except TraceError as e:
        failure = e
    finally:
        for s, p in zip(states, per_state):
            s.install(p)
        mx.random.seed(0)
        mx.random.state[0][...] = pre_key  # the caller's key, untouched by the trace
    wrote = out_info.get("wrote", []) + snapshot.changes()
    snapshot.restore()
    if failure is not None:
        raise failure
    if wrote:
        raise TraceError(f"writes Python state while running ({', '.join(dict.fromkeys(wrote))}): traced, the "
                         "write would hold tracer arrays, and a replay would not repeat it")
    g = _to_graph(items, mx.random.key(_MARK_SEED) if out_info["rng_out"] else None)
    _name_modules(g, recorder, out_info["n_out"], out_info["n_boundary"])
    g.meta["module_types"] = module_types(scope_roots)
    if out_info["rng_out"] and not g.meta["rng_inputs"]:
        raise TraceError("draws from the global random key in a way the trace cannot thread through")
    g.meta.update(
        in_skeleton=in_skeleton,
        out_skeleton=out_info["skeleton"],
        input_paths=paths + [p for p, v in tree_flatten((args, kwargs)) if isinstance(v, mx.array)],
        num_params=n,
        param_paths=[p for s in states[:1] for p in s.paths],
        rng_outputs=int(out_info["rng_out"]),
        source=getattr(fn, "__qualname__", type(fn).__name__),
    )
    return g


def _name_modules(g: Graph, recorder: CallRecorder, n_out: int, n_boundary: int) -> None:
    """Drop the boundary outputs from `g` and set each node's module path from them."""
    names = [v.name for v in g.outputs[n_out: n_out + n_boundary]]
    g.outputs = g.outputs[:n_out] + g.outputs[n_out + n_boundary:]
    calls, i = [], 0
    for path, ins, outs in recorder.calls:
        calls.append((path, names[i: i + len(ins)], names[i + len(ins): i + len(ins) + len(outs)]))
        i += len(ins) + len(outs)
    assign_modules(g, calls)


def function_roots(fn: Callable) -> List[Tuple[str, Any]]:
    """What a function can reach besides its arguments: closure cells, a bound ``self``, named globals."""
    roots = []
    self_ = getattr(fn, "__self__", None)
    if self_ is not None and not isinstance(self_, types.ModuleType):
        roots.append(("self", self_))
    code = getattr(fn, "__code__", None)
    for name, cell in zip(code.co_freevars if code else (), getattr(fn, "__closure__", None) or ()):
        try:
            roots.append((name, cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    env = getattr(fn, "__globals__", None) or {}
    for name in code.co_names if code else ():  # globals its own code names (a module-level list)
        if name in env and not isinstance(env[name], (types.ModuleType, type, types.FunctionType)):
            roots.append((name, env[name]))
    return roots


def trace(fn: Callable, *example_args, **example_kwargs) -> Graph:
    """Capture one call of `fn` as a `Graph`.

    Args:
        fn (Callable or nn.Module): the function to capture. For an
          ``nn.Module`` the parameters (``module.parameters()``, flattened,
          each array once) are the first graph inputs, so a replay sees
          optimizer updates; so are those of modules passed as arguments.
        *example_args, **example_kwargs: pytrees of arrays (and static Python
          values) to trace with; shapes and dtypes are fixed by the trace.

    Returns:
        Graph: inputs are the array leaves of ``(params, args, kwargs)`` in
        order, then any random-key inputs (``graph.meta["rng_inputs"]``).

    Raises:
        TraceError: ``export_function`` failed (``.item()``, data-dependent
          control flow, a ``custom_function`` inside, ...), the function returns
          no arrays, or it writes Python state it can reach (its module's
          parameters or attributes, an argument, a closure variable).
    """
    if isinstance(fn, nn.Module):
        return trace_module(fn, type(fn).__call__, *example_args, **example_kwargs)
    if not callable(fn):
        raise TypeError(f"trace() needs a callable or nn.Module, got {type(fn).__name__}")
    states = [ModuleState(m) for m in _modules_in((example_args, example_kwargs))]
    return _trace_flat(fn, states, example_args, example_kwargs, function_roots(fn))


def trace_module(module: nn.Module, forward: Callable, *args, **kwargs) -> Graph:
    """Trace ``forward(module, *args, **kwargs)`` with the parameters as inputs.

    Args:
        module (nn.Module): supplies the parameters; they are swapped for
          tracers during the trace and restored afterwards.
        forward (Callable): the unbound forward, usually ``type(module).__call__``.
    """
    return trace_module_with(ModuleState(module), forward, args, kwargs)


def trace_module_with(state: ModuleState, forward: Callable, args: tuple, kwargs: dict) -> Graph:
    """`trace_module` for a caller that has the module's `ModuleState` (and more modules in `args`)."""
    module = state.modules[0]
    more = [ModuleState(m) for m in _modules_in((args, kwargs)) if m is not module]
    g = _trace_flat(lambda *a, **k: forward(module, *a, **k), [state] + more, args, kwargs)
    g.meta["input_paths"][: len(state.paths)] = [f"params.{p}" for p in state.paths]
    g.meta["source"] = _name(module)
    return g
