"""Measured fusion speedups, remembered per device and MLX version: the optimizer's price.

    tracker = default_tracker()                    # the process-wide one, loaded lazily
    res = tracker.benchmark_pattern("add+relu", 1 << 20, mx.float32)   # measures, records, saves
    tracker.lookup(pattern, mx.float32, 1 << 20, "cuda")               # -> res.speedup
    FusionOptimizer(price=price)                   # measured, else shipped, else the cost model

`price(pattern, dtype, size, device)` is what the optimizer asks for every match: this
machine's measurement (`lookup`), else the speedup shipped for this kind of device
(`mlx_fusion.priors`), as a `Speedup(speedup, source)`; else None (the optimizer's
bandwidth model decides). A measurement below 1.0 drops the fusion. The speedup stored is fused time
against the *better* of eager and `mx.compile`, because `fuse()` replays the unfused
remainder under `mx.compile`: beating eager alone proves nothing.

The file format, where it lives, and how it is read and written safely are
`mlx_fusion.perfcache`; this module only imports the benchmark code when it measures.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple, Union

import mlx.core as mx

from .device import device_id
from .patterns import ScalarActivation, ScalarOp
from .perfcache import (CACHE_FORMAT, CACHE_SCHEMA, TrackerCacheWarning, cache_key, default_cache_path,  # noqa: F401
                        entry_low, entry_speedup, output_size, read_entries, size_bucket, write_entries)
from .priors import prior_speedup

__all__ = ["PerformanceTracker", "Speedup", "TrackerCacheWarning", "default_tracker", "reset_default_tracker",
           "price", "prior_speedup", "default_cache_path", "size_bucket", "case_for_pattern", "CACHE_FORMAT",
           "CACHE_SCHEMA"]


class _Price(NamedTuple):
    speedup: float
    source: str


class Speedup(_Price):
    """A price: the speedup to decide by and where it came from, "measured" (this machine's
    cache) or "shipped" (the priors). A 2-tuple, so the optimizer can unpack ``speedup, source``;
    `median`, `low` and `high` (quartiles of the per-repeat speedups) say how noisy it is:
    ``noisy`` is a median win whose lower quartile does not beat 1.0 (priced at `low`)."""

    def __new__(cls, speedup: float, source: str, median: Optional[float] = None, low: Optional[float] = None,
                high: Optional[float] = None):
        self = super().__new__(cls, speedup, source)
        self.median = speedup if median is None else median
        self.low = self.median if low is None else low
        self.high = self.median if high is None else high
        return self

    @property
    def noisy(self) -> bool:
        return self.median > 1.0 >= self.low

    def __reduce__(self):
        return (Speedup, (self.speedup, self.source, self.median, self.low, self.high))


def case_for_pattern(pattern):
    """The registry case that benchmarks `pattern` (see `mlx_fusion.benchmark.case_for_pattern`)."""
    from .benchmark import case_for_pattern as find

    return find(pattern)


class PerformanceTracker:
    """Measured speedups keyed by (device, pattern, dtype, size bucket) for one MLX version.

    Args:
        path (str or Path, optional): the JSON cache; default `default_cache_path()`.
        autosave (bool): `benchmark_pattern` saves after each measurement. Default: ``True``.
    """

    def __init__(self, path: Union[str, Path, None] = None, autosave: bool = True):
        self.path = Path(path) if path is not None else default_cache_path()
        self.autosave = autosave
        self._entries: Optional[Dict[str, dict]] = None  # loaded on first use
        self._dirty: Dict[str, dict] = {}  # recorded here since the last save
        self._lock = threading.Lock()
        self._warned = set()  # each problem with the file is reported once per tracker

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, TrackerCacheWarning, stacklevel=3)

    # -- reading -------------------------------------------------------------------------------
    @property
    def entries(self) -> Dict[str, dict]:
        """key -> entry, loading the cache file on first access (malformed entries skipped)."""
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = {**read_entries(self.path, self._warn), **self._dirty}
        return self._entries

    def lookup(self, pattern, dtype, size: int, device: str) -> Optional[float]:
        """Measured (median) speedup of `pattern` (fused vs the best unfused) near `size` output
        elements on `device` ("metal"/"cuda"/"cpu"), or None if never measured. The exact
        size bucket wins; else the mean of its two neighbours (a factor of 4 either way)
        that were measured."""
        found = self.measurement(pattern, dtype, size, device)
        return None if found is None else found.median

    def measurement(self, pattern, dtype, size: int, device: str) -> Optional[Speedup]:
        """What `lookup` finds, with its noise: a `Speedup` priced by the rule in the module
        docstring (the median if the lower quartile beats 1.0, else the lower quartile)."""
        found = self._find(pattern, dtype, size, device)
        if found is None:
            return None
        median, low, high = found
        return Speedup(median if low > 1.0 else min(low, 1.0), "measured", median, low, high)

    def _find(self, pattern, dtype, size: int, device: str) -> Optional[Tuple[float, float, float]]:
        """(median, lower, upper quartile) of the entry (or mean of its neighbours) for `pattern`."""
        entries = self.entries
        if not entries:
            return None
        dev, b = device_id(device), size_bucket(size)
        names = [pattern]
        if isinstance(pattern, ScalarActivation) and pattern.scalar_op is not ScalarOp.AFFINE:
            # x*s and x+t run the same kernel as x*s+t; `bench` measures the affine form only.
            names.append(ScalarActivation(ScalarOp.AFFINE, pattern.activation))
        for name in names:
            hit = entries.get(cache_key(dev, name, dtype, b))
            near = [hit] if hit is not None else [
                entries[k] for k in (cache_key(dev, name, dtype, b - 1), cache_key(dev, name, dtype, b + 1))
                if k in entries]
            if near:
                mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
                return (mean([entry_speedup(e) for e in near]), mean([entry_low(e) for e in near]),
                        mean([_entry_high(e) for e in near]))
        return None

    def price(self, pattern, dtype, size: int, device: str) -> Optional[Speedup]:
        """What the optimizer prices a match with: `measurement(...)` (source "measured",
        noise-aware), else `Speedup(prior_speedup(...), "shipped")`, else None."""
        measured = self.measurement(pattern, dtype, size, device)
        if measured is not None:
            return measured
        shipped = prior_speedup(pattern, dtype, size, device)
        return None if shipped is None else Speedup(shipped, "shipped")

    def __len__(self) -> int:
        return len(self.entries)

    # -- measuring and recording ---------------------------------------------------------------
    def record(self, result, pattern=None, device: Optional[str] = None) -> str:
        """Remember a forward-pass `BenchResult` (fwd+bwd results are ignored: lookups price
        the forward graph; so is a result without a finite positive speedup). Returns the key,
        or "" if nothing was recorded.

        Args:
            pattern (optional): what was measured (a pattern or its name); default the registry
                case named `result.op`.
            device (str, optional): a `device_id`; default the current device's.
        """
        if result.pass_ != "fwd":
            return ""
        from .benchmark import case_for_pattern  # a result comes from the benchmark code: it is loaded

        case = case_for_pattern(pattern if pattern is not None else result.op)
        entry = {
            "speedup": result.speedup, "speedup_vs_eager": result.speedup_vs_eager,
            "speedup_vs_compiled": result.speedup_vs_compiled, "eager_us": result.eager_us,
            "compiled_us": result.compiled_us, "fused_us": result.fused_us,
            "size": output_size(case.kind, result.shape), "shape": list(result.shape),
            "fused_gbps": result.fused_gbps, "copy_gbps": result.copy_gbps, "timestamp": time.time(),
        }
        if result.speedups:  # the noise a decision from this entry must beat
            low, high = result.speedup_spread
            entry.update(speedup_low=low, speedup_high=high, speedups=[round(x, 4) for x in result.speedups])
        if entry_speedup(entry) is None:
            return ""
        key = cache_key(device or device_id(), case.pattern, result.dtype, size_bucket(entry["size"]))
        with self._lock:
            self._dirty[key] = entry
            if self._entries is not None:
                self._entries[key] = entry
        return key

    def benchmark_pattern(self, pattern, tensor_size: Union[int, Tuple[int, ...]], dtype=mx.float32,
                          backward: bool = False, **timing):
        """Time `pattern` eager, under `mx.compile` and fused on the default device, record
        the forward result (and save if `autosave`). Returns the `BenchResult`.

        Args:
            pattern: a FusionPattern or its name ("add+relu", "linear+bias+gelu").
            tensor_size (int or tuple): output elements, or an explicit shape ((M, K, N) for linears).
            dtype (mx.Dtype): Default: ``mx.float32``.
            backward (bool): time forward+backward instead (reported, not recorded).
            **timing: `time_call` settings; default `default_timing()`.
        """
        from .benchmark import bench_case, case_for_pattern, copy_bandwidth, copy_size, default_timing, shape_for_size

        case = case_for_pattern(pattern)
        shape = shape_for_size(case, tensor_size)
        timing = timing or default_timing()
        copy = copy_bandwidth(copy_size(case.kind, shape), dtype, **timing)
        result = bench_case(case, shape, dtype, backward=backward, copy_gbps=copy, **timing)
        self.record(result, pattern=case.pattern)
        if self.autosave:
            self.save()
        return result

    # -- writing -------------------------------------------------------------------------------
    def save(self) -> bool:
        """Merge what was recorded here into the file (see `perfcache.write_entries`). Returns
        False (with a warning) if the cache is unwritable; the entries stay in memory."""
        with self._lock:
            dirty = dict(self._dirty)
        if not dirty:
            return True
        try:
            merged = write_entries(self.path, dirty, self._warn)
        except OSError as e:
            self._warn(f"mlx_fusion: cannot write performance cache {self.path}: {e}")
            return False
        with self._lock:
            for k in dirty:
                self._dirty.pop(k, None)
            self._entries = {**merged, **self._dirty}
        return True

    def clear(self) -> None:
        """Forget everything in memory and delete the cache file."""
        with self._lock:
            self._entries, self._dirty = {}, {}
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _entry_high(entry) -> float:
    s, high = entry_speedup(entry), entry.get("speedup_high")
    ok = isinstance(high, (int, float)) and not isinstance(high, bool) and math.isfinite(high)
    return float(max(high, s)) if ok else s


_default: Optional[PerformanceTracker] = None
_default_lock = threading.Lock()


def default_tracker() -> PerformanceTracker:
    """The process-wide tracker `fuse()` prices with. Nothing is read until the first lookup;
    a changed `$MLX_FUSION_CACHE` (or XDG/HOME) yields a tracker for the new path."""
    global _default
    path = default_cache_path()
    with _default_lock:
        if _default is None or _default.path != path:
            _default = PerformanceTracker(path)
        return _default


def reset_default_tracker() -> None:
    """Drop the process-wide tracker; the next `default_tracker()` reloads the cache."""
    global _default
    with _default_lock:
        _default = None


def price(pattern, dtype, size: int, device: str) -> Optional[Speedup]:
    """`default_tracker().price(...)`: the price function `fuse()` hands `FusionOptimizer`.
    The tracker is looked up on every call, so a changed `$MLX_FUSION_CACHE` applies."""
    return default_tracker().price(pattern, dtype, size, device)
