"""Timing a whole model: forward and forward+backward as eager, `mx.compile`, fused and
fused+compile, with peak memory and the fused outputs' difference from eager.

    rows = bench_model(model, inputs)   # one dict per (pass, variant)
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..timing import default_timing, peak_memory, quartiles, time_samples

__all__ = ["bench_model", "model_variants"]


def _loss_and_grad(model: Callable, n_inputs: int) -> Callable:
    """value_and_grad of sum(model(*inputs)): w.r.t. the parameters of a Module, else the inputs."""

    def loss(*inputs):
        return sum(mx.sum(o.astype(mx.float32)) for o in _leaves(model(*inputs)))

    if isinstance(model, nn.Module):
        return nn.value_and_grad(model, loss)
    return mx.value_and_grad(loss, argnums=tuple(range(n_inputs)))


def _leaves(tree) -> List[mx.array]:
    return [tree] if isinstance(tree, mx.array) else [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]


def model_variants(model: Callable) -> Dict[str, Callable]:
    """The forward variants compared by `bench_model`. `fused` replays the fused graph
    eagerly, `fused+compile` under `mx.compile` (what `fuse()` does by default); for
    fwd+bwd, `mx.compile` and `fused+compile` compile the whole training step."""
    from ..fuse import fuse  # lazy: the measurement layer sits above fuse()

    compiled = mx.compile(model, inputs=model.state) if isinstance(model, nn.Module) else mx.compile(model)
    return {"eager": model, "mx.compile": compiled, "fused": fuse(model, compile=False),
            "fused+compile": fuse(model)}


def bench_model(model: Callable, inputs: Sequence[mx.array], backward: bool = True,
                progress: Optional[Callable[[str], None]] = None,
                on_result: Optional[Callable[[dict], None]] = None, **timing) -> List[dict]:
    """Forward (and forward+backward) of a model: eager vs mx.compile vs fused vs fused+compile.

    Returns one dict per (pass, variant): ``pass``, ``variant``, ``time_ms`` (median over repeats;
    ``time_ms_low``/``time_ms_high``: the quartiles), ``speedup_vs_eager``,
    ``speedup_vs_compiled``, ``peak_memory_bytes``, ``activation_memory_bytes`` (peak minus the
    resident parameters and inputs), ``max_abs_diff`` (forward outputs vs eager; ``None`` for
    fwd+bwd), ``fusions`` (fused ops applied, fused variants only).

    `progress` is called with a label before each row, `on_result` with each row as soon as
    it is measured (eager is timed first in each pass, mx.compile second: a row's
    ``speedup_vs_compiled`` is None until the pass's mx.compile row exists, then filled in
    place).
    """
    timing = timing or default_timing()
    inputs = list(inputs)
    forward = model_variants(model)
    want = _leaves(model(*inputs))
    passes = [("fwd", forward)]
    if backward:
        grad_fns = {}
        for name, fn in forward.items():
            if name in ("mx.compile", "fused+compile"):  # compile the whole step, as a training loop would
                target = model if name == "mx.compile" else fn
                vg = _loss_and_grad(target, len(inputs))
                # value_and_grad writes tracers into the module: they must be outputs too.
                grad_fns[name] = (mx.compile(vg, inputs=target.state, outputs=target.state)
                                  if isinstance(target, nn.Module) else mx.compile(vg))
            else:
                grad_fns[name] = _loss_and_grad(fn, len(inputs))
        passes.append(("fwd+bwd", grad_fns))
    results = []
    for pass_, fns in passes:
        rows = []
        for name, fn in fns.items():
            if progress:
                progress(f"{pass_} {name}")
            low, t, high = quartiles(time_samples(fn, inputs, **timing))
            peak, extra = peak_memory(fn, inputs)
            diff = None
            if pass_ == "fwd":
                got = _leaves(fn(*inputs))
                diff = max((mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item()
                            for g, w in zip(got, want)), default=0.0)
            stats = getattr(forward[name], "fusion_stats", None) or getattr(forward[name], "stats", None)
            rows.append({"pass": pass_, "variant": name, "time_ms": t * 1e3,
                         "time_ms_low": low * 1e3, "time_ms_high": high * 1e3,
                         "peak_memory_bytes": peak, "activation_memory_bytes": extra, "max_abs_diff": diff,
                         "fusions": stats.applied_count if stats is not None and name.startswith("fused") else None})
            eager = rows[0]["time_ms"]
            compiled = rows[1]["time_ms"] if len(rows) > 1 else None
            for r in rows:
                r["speedup_vs_eager"] = eager / r["time_ms"]
                r["speedup_vs_compiled"] = None if compiled is None else compiled / r["time_ms"]
            results.append(rows[-1])
            if on_result:
                on_result(rows[-1])
    return results
