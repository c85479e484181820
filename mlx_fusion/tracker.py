"""Measured fusion speedups, remembered per device and MLX version.

    tracker = default_tracker()                    # the process-wide one, loaded lazily
    res = tracker.benchmark_pattern("add+relu", 1 << 20, mx.float32)   # measures, records, saves
    tracker.lookup(pattern, mx.float32, 1 << 20, "cuda")               # -> res.speedup

The optimizer asks `lookup` for every match it prices; a measured speedup
replaces its bandwidth model (`FusionOpportunity.source == "measured"`) and a
measurement below 1.0 drops the fusion. The speedup stored is fused time
against the *better* of eager and `mx.compile`, because `fuse()` replays the
unfused remainder under `mx.compile`: beating eager alone proves nothing.

The cache is one JSON file per MLX version (a new MLX changes the kernels it
is compared against), under `$MLX_FUSION_CACHE` if set, else the user cache
directory. Writers merge under an exclusive `flock` and replace the file
atomically, so concurrent `mlx-fusion bench` runs never lose each other's
entries; an unreadable or foreign file is ignored with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import mlx.core as mx

from .benchmark import (BenchmarkResult, _copy_size, bench_case, copy_bandwidth, default_timing, device_id,
                        elementwise_shape)
from .ops.registry import FUSED_OPS, OpCase
from .ops.elementwise import fused_scalar, scalar_reference
from .patterns import ScalarActivation, ScalarOp

try:  # POSIX; elsewhere writes are still atomic, only the merge is unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["PerformanceTracker", "TrackerCacheWarning", "default_tracker", "reset_default_tracker",
           "default_cache_path", "size_bucket", "case_for_pattern", "CACHE_FORMAT", "CACHE_SCHEMA"]

CACHE_FORMAT = "mlx-fusion-performance"
CACHE_SCHEMA = 1


class TrackerCacheWarning(UserWarning):
    """The performance cache could not be used (corrupt, foreign or unwritable); fusion
    decisions fall back to the bandwidth model."""


def default_cache_path() -> Path:
    """`$MLX_FUSION_CACHE` (a file, or a directory to put the default file in), else
    `~/Library/Caches/mlx-fusion/` on macOS, `$XDG_CACHE_HOME/mlx-fusion/` or
    `~/.cache/mlx-fusion/` elsewhere; the file is `performance-mlx-<version>.json`."""
    name = f"performance-mlx-{mx.__version__}.json"
    override = os.environ.get("MLX_FUSION_CACHE")
    if override:
        p = Path(override).expanduser()
        return p / name if p.is_dir() or override.endswith(os.sep) else p
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mlx-fusion" / name


def size_bucket(size: int) -> int:
    """Powers of 4: sizes within a factor of ~2 of 4**k share bucket k. Elementwise time is
    linear in size above launch latency, so a speedup measured at 1M holds near 1M."""
    return 0 if size <= 1 else int(round(math.log(size, 4)))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def _pattern_name(pattern) -> str:
    return pattern if isinstance(pattern, str) else pattern.name


def _key(device: str, pattern, dtype, bucket: int) -> str:
    return f"{device}|{_pattern_name(pattern)}|{_dtype_name(dtype)}|{bucket}"


_SCALARS = {ScalarOp.MUL: (1.5, 0.0), ScalarOp.ADD: (1.0, -0.25), ScalarOp.AFFINE: (1.5, -0.25)}


def case_for_pattern(pattern) -> OpCase:
    """The registry case that benchmarks `pattern` (an instance or a name like "add+relu")."""
    for case in FUSED_OPS:
        if case.pattern == pattern or case.name == pattern or case.pattern.name == pattern:
            return case
    if isinstance(pattern, ScalarActivation):  # the registry lists affine only; mul/add are its cases
        scale, shift = _SCALARS[pattern.scalar_op]
        act = pattern.activation
        return OpCase(pattern.name, "scalar", pattern,
                      lambda x: fused_scalar(x, scale, shift, act),
                      lambda x: scalar_reference(x, scale, shift, act))
    raise ValueError(f"no benchmark for pattern {pattern!r}; known: {[c.name for c in FUSED_OPS]}")


def _shape_for(case: OpCase, tensor_size: Union[int, Tuple[int, ...]]) -> Tuple[int, ...]:
    """An int is the fused output's element count (what `lookup` is keyed by): rows of 4096
    elementwise; for a linear, M x 1024 with K = N = 1024. A tuple is used as given
    ((M, K, N) for linears)."""
    if not isinstance(tensor_size, int):
        return tuple(tensor_size)
    if case.kind == "linear":
        n = min(1024, tensor_size)
        return (max(1, tensor_size // n), 1024, n)
    return elementwise_shape(tensor_size)


def _output_size(case: OpCase, shape: Tuple[int, ...]) -> int:
    if case.kind == "linear":
        return shape[0] * shape[2]
    return math.prod(shape)


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

    # -- reading -------------------------------------------------------------------------------
    @property
    def entries(self) -> Dict[str, dict]:
        """key -> entry, loading the cache file on first access."""
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = {**self._read(), **self._dirty}
        return self._entries

    def _read(self) -> Dict[str, dict]:
        """The file's entries; {} (with a warning) when missing-but-broken or foreign."""
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):  # nothing measured yet
            return {}
        except OSError as e:
            warnings.warn(f"mlx_fusion: cannot read performance cache {self.path}: {e}", TrackerCacheWarning)
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError("not an mlx-fusion performance cache")
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
                raise ValueError("malformed entries")
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"mlx_fusion: ignoring corrupt performance cache {self.path} ({e}); "
                          "it will be replaced on the next save", TrackerCacheWarning)
            return {}
        if data.get("schema") != CACHE_SCHEMA or data.get("mlx_version") != mx.__version__:
            warnings.warn(f"mlx_fusion: ignoring performance cache {self.path} written for MLX "
                          f"{data.get('mlx_version')} (schema {data.get('schema')}); this is MLX "
                          f"{mx.__version__}: re-run `mlx-fusion bench`", TrackerCacheWarning)
            return {}
        return entries

    def lookup(self, pattern, dtype, size: int, device: str) -> Optional[float]:
        """Measured speedup of `pattern` (fused vs the best unfused) near `size` output
        elements, or None if never measured. The exact size bucket wins; else the mean
        of its two neighbours (a factor of 4 either way) that were measured."""
        entries = self.entries
        if not entries:
            return None
        dev, b = device_id(device), size_bucket(size)
        names = [pattern]
        if isinstance(pattern, ScalarActivation) and pattern.scalar_op is not ScalarOp.AFFINE:
            # x*s and x+t run the same kernel as x*s+t; `bench` measures the affine form only.
            names.append(ScalarActivation(ScalarOp.AFFINE, pattern.activation))
        for name in names:
            hit = entries.get(_key(dev, name, dtype, b))
            if hit is not None:
                return float(hit["speedup"])
            near = [entries[k]["speedup"] for k in (_key(dev, name, dtype, b - 1), _key(dev, name, dtype, b + 1))
                    if k in entries]
            if near:
                return float(sum(near) / len(near))
        return None

    def __len__(self) -> int:
        return len(self.entries)

    # -- measuring and recording ---------------------------------------------------------------
    def record(self, result: BenchmarkResult, pattern=None, device: Optional[str] = None) -> str:
        """Remember a forward-pass result (fwd+bwd results are ignored: lookups price the
        forward graph). Returns the key.

        Args:
            pattern (optional): what was measured; default the registry case named `result.op`.
            device (str, optional): a `device_id`; default the current device's.
        """
        if result.pass_ != "fwd":
            return ""
        case = case_for_pattern(pattern if pattern is not None else result.op)
        size = _output_size(case, result.shape)
        key = _key(device or device_id(), case.pattern, result.dtype, size_bucket(size))
        entry = {
            "speedup": result.speedup, "speedup_vs_eager": result.speedup_vs_eager,
            "speedup_vs_compiled": result.speedup_vs_compiled, "eager_us": result.eager_us,
            "compiled_us": result.compiled_us, "fused_us": result.fused_us, "size": size,
            "shape": list(result.shape), "fused_gbps": result.fused_gbps, "copy_gbps": result.copy_gbps,
            "timestamp": time.time(),
        }
        with self._lock:
            self._dirty[key] = entry
            if self._entries is not None:
                self._entries[key] = entry
        return key

    def benchmark_pattern(self, pattern, tensor_size: Union[int, Tuple[int, ...]], dtype=mx.float32,
                          backward: bool = False, **timing) -> BenchmarkResult:
        """Time `pattern` eager, under `mx.compile` and fused on the default device, record
        the forward result (and save if `autosave`).

        Args:
            pattern: a FusionPattern or its name ("add+relu", "linear+bias+gelu").
            tensor_size (int or tuple): output elements, or an explicit shape ((M, K, N) for linears).
            dtype (mx.Dtype): Default: ``mx.float32``.
            backward (bool): time forward+backward instead (reported, not recorded).
            **timing: `time_call` settings; default `default_timing()`.
        """
        case = case_for_pattern(pattern)
        shape = _shape_for(case, tensor_size)
        timing = timing or default_timing()
        copy = copy_bandwidth(_copy_size(case.kind, shape), dtype, **timing)
        result = bench_case(case, shape, dtype, backward=backward, copy_gbps=copy, **timing)
        self.record(result, pattern=case.pattern)
        if self.autosave:
            self.save()
        return result

    # -- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            yield

    def save(self) -> bool:
        """Merge what was recorded here into the file: re-read it under the lock (another
        process may have written since we loaded), overlay our entries, write a temp file
        and `os.replace` it. Returns False (with a warning) if the cache is unwritable."""
        with self._lock:
            dirty = dict(self._dirty)
        if not dirty:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._file_lock():
                merged = {**self._read(), **dirty}
                data = {"format": CACHE_FORMAT, "schema": CACHE_SCHEMA, "mlx_version": mx.__version__,
                        "entries": dict(sorted(merged.items()))}
                fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as e:
            warnings.warn(f"mlx_fusion: cannot write performance cache {self.path}: {e}", TrackerCacheWarning)
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
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@functools.lru_cache(maxsize=None)
def _priors(kind: str) -> Dict[str, dict]:
    path = Path(__file__).resolve().parent / "data" / f"priors-{kind}.json"
    try:
        return json.loads(path.read_text())["entries"]
    except (OSError, ValueError, KeyError):
        return {}


def prior_speedup(pattern, dtype, size: int, device: str) -> Optional[float]:
    """Shipped measurement for this device kind ("cuda", ...): the pattern's own entry at
    this size bucket, else the median of its kind (binary/scalar/linear) there."""
    if os.environ.get("MLX_FUSION_NO_PRIORS"):  # measure what fusion does without them
        return None
    kind = device_id(device).split(":")[0]
    entries = _priors(kind)
    if not entries:
        return None
    b = size_bucket(size)
    try:
        case = case_for_pattern(pattern)
    except ValueError:
        return None
    for name in (_pattern_name(case.pattern), "*" + case.kind):
        for bucket in (b, b - 1, b + 1):
            hit = entries.get(_key(kind, name, dtype, bucket))
            if hit is not None:
                return float(hit["speedup"])
    return None


_default: Optional[PerformanceTracker] = None
_default_lock = threading.Lock()


def default_tracker() -> PerformanceTracker:
    """The process-wide tracker the optimizer uses when given none. Nothing is read until the
    first lookup; a changed `$MLX_FUSION_CACHE` (or XDG/HOME) yields a tracker for the new path."""
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
