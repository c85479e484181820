"""Timing and peak memory of MLX calls, the way MLX needs them measured.

MLX is lazy and a GPU runs asynchronously, so `time_call` builds `calls_per_eval`
independent calls and evaluates them together (one synchronizing eval per call
would add 10-25 us on a GPU and hide the kernel), after a warm-up that pays for
JIT compilation, and reports the median over repeats.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence, Tuple

import mlx.core as mx

from .device import on_gpu

__all__ = ["time_call", "time_samples", "default_timing", "copy_bandwidth", "peak_memory", "quartiles"]


def time_call(fn: Callable, args: Sequence, calls_per_eval: int = 10, repeats: int = 15,
              warmup: int = 2, min_time_s: float = 0.0) -> float:
    """Median seconds per call of fn(*args), evaluating `calls_per_eval` calls at once."""
    return statistics.median(time_samples(fn, args, calls_per_eval, repeats, warmup, min_time_s))


def time_samples(fn: Callable, args: Sequence, calls_per_eval: int = 10, repeats: int = 15,
                 warmup: int = 2, min_time_s: float = 0.0) -> List[float]:
    """Seconds per call of fn(*args) for each repeat (at least 3 unless `repeats` is smaller;
    `min_time_s` stops early once spent): what `time_call` takes the median of."""
    mx.eval(*[a for a in args if isinstance(a, mx.array)])
    for _ in range(warmup):
        mx.eval(fn(*args))
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval([fn(*args) for _ in range(calls_per_eval)])
        times.append((time.perf_counter() - t0) / calls_per_eval)
        if min_time_s and time.perf_counter() - start > min_time_s and len(times) >= 3:
            break
    return times


def quartiles(samples: Sequence[float]) -> Tuple[float, float, float]:
    """(lower quartile, median, upper quartile) of `samples` (inclusive method: with one
    sample all three are that sample)."""
    xs = sorted(samples)
    if len(xs) < 2:
        return (xs[0],) * 3
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def default_timing(quick: bool = False) -> dict:
    """`time_call` settings: a GPU needs several calls per eval to hide the sync; a CPU is
    synchronous, so fewer calls and a time budget per measurement keep runs short."""
    if on_gpu():
        return dict(calls_per_eval=10, repeats=7 if quick else 15, min_time_s=0.5 if quick else 0.0)
    return dict(calls_per_eval=2 if quick else 3, repeats=5, warmup=1 if quick else 2,
                min_time_s=0.05 if quick else 0.5)


def copy_bandwidth(n: int, dtype=mx.float32, **timing) -> float:
    """GB/s of MLX's own unary elementwise kernel (read n, write n), the ceiling a
    fused elementwise kernel is measured against."""
    x = mx.random.normal((n,)).astype(dtype)
    t = time_call(mx.negative, [x], **timing)
    return 2 * n * dtype.size / t / 1e9


def peak_memory(fn: Callable, args: Sequence) -> Tuple[int, int]:
    """(peak bytes, peak minus what was resident before) for one evaluated call of fn(*args)."""
    mx.eval(fn(*args))  # compiled/fused variants build their caches outside the measurement
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn(*args))
    mx.synchronize()
    peak = mx.get_peak_memory()
    return peak, max(0, peak - before)
