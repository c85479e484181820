"""The performance cache file: where it lives, its keys, reading it safely, saving it atomically.

One JSON file per MLX version (a new MLX changes the kernels fusion is compared
against), under `$MLX_FUSION_CACHE` if set, else the user cache directory:

    {"format": "mlx-fusion-performance", "schema": 1, "mlx_version": "0.32.4",
     "entries": {"<device>|<pattern>|<dtype>|<size bucket>":
                 {"speedup": 1.7, "speedup_low": 1.5, "speedup_high": 1.8, "speedups": [...], ...}}}

`speedup` is the median; `speedups` the per-repeat speedups and `speedup_low`/`_high`
their quartiles (entries written before these existed have `speedup` only and read as
noiseless: low = high = speedup).

Reading never raises: an unreadable or foreign file is ignored and one malformed
entry is dropped, each with a `TrackerCacheWarning`. Writers merge under an
exclusive `flock` on `<file>.lock` and replace the file atomically, so concurrent
`mlx-fusion bench` runs never lose each other's entries. The temp file has one
fixed name, written only under the lock, so a writer killed mid-save leaves at most
that one file, which the next save replaces; files are created with the umask's mode.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import mlx.core as mx

try:  # POSIX; elsewhere writes are still atomic, only the merge is unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["CACHE_FORMAT", "CACHE_SCHEMA", "TrackerCacheWarning", "default_cache_path", "size_bucket",
           "cache_key", "output_size", "dtype_name", "pattern_name", "entry_speedup", "entry_low", "read_entries",
           "write_entries"]

CACHE_FORMAT = "mlx-fusion-performance"
CACHE_SCHEMA = 1

Warn = Callable[[str], None]


class TrackerCacheWarning(UserWarning):
    """The performance cache could not be used (corrupt, foreign or unwritable), or some of
    its entries were malformed; fusion decisions fall back to the priors and the bandwidth model."""


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


# -- keys ---------------------------------------------------------------------------------------
def size_bucket(size: int) -> int:
    """Powers of 4: sizes within a factor of ~2 of 4**k share bucket k. Elementwise time is
    linear in size above launch latency, so a speedup measured at 1M holds near 1M."""
    return 0 if size <= 1 else int(round(math.log(size, 4)))


def dtype_name(dtype) -> str:
    """"float32" for mx.float32 (or the string itself)."""
    return str(dtype).replace("mlx.core.", "")


def pattern_name(pattern) -> str:
    return pattern if isinstance(pattern, str) else pattern.name


def cache_key(device: str, pattern, dtype, bucket: int) -> str:
    return f"{device}|{pattern_name(pattern)}|{dtype_name(dtype)}|{bucket}"


def output_size(kind: str, shape: Tuple[int, ...]) -> int:
    """Elements of the fused output of a benchmark shape ((M, K, N) for "linear"; a family's own
    workload's, e.g. linear_cross_entropy's logits for (tokens, D, V))."""
    if kind == "linear":
        return shape[0] * shape[2]
    from .ops.registry import own_workload  # lazy: the registry imports every fused op

    wl = own_workload(kind)
    return wl.output_size(tuple(shape)) if wl is not None else math.prod(shape)


def entry_speedup(entry) -> Optional[float]:
    """The entry's speedup if it is a finite positive number, else None (malformed)."""
    s = entry.get("speedup") if isinstance(entry, dict) else None
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        return None
    return float(s)


def entry_low(entry) -> Optional[float]:
    """The lower quartile of the entry's per-repeat speedups (`speedup_low`); the speedup
    itself for an entry without one (older caches, the shipped priors); None if malformed."""
    s = entry_speedup(entry)
    if s is None:
        return None
    low = entry.get("speedup_low")
    if isinstance(low, bool) or not isinstance(low, (int, float)) or not math.isfinite(low) or low <= 0:
        return s
    return float(min(low, s))


# -- reading ------------------------------------------------------------------------------------
def read_entries(path: Path, warn: Warn) -> Dict[str, dict]:
    """The file's well-formed entries; {} when missing, unreadable, corrupt or written for
    another MLX version or schema. Everything dropped is reported through `warn`."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):  # nothing measured yet
        return {}
    except (OSError, UnicodeDecodeError) as e:
        warn(f"mlx_fusion: cannot read performance cache {path}: {e}")
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError("not an mlx-fusion performance cache")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("malformed entries")
    except (ValueError, KeyError, TypeError) as e:
        warn(f"mlx_fusion: ignoring corrupt performance cache {path} ({e}); it will be replaced on the next save")
        return {}
    if data.get("schema") != CACHE_SCHEMA or data.get("mlx_version") != mx.__version__:
        warn(f"mlx_fusion: ignoring performance cache {path} written for MLX {data.get('mlx_version')} "
             f"(schema {data.get('schema')}); this is MLX {mx.__version__}: re-run `mlx-fusion bench`")
        return {}
    good = {k: v for k, v in entries.items() if _well_formed(k) and entry_speedup(v) is not None}
    bad = sorted(set(entries) - set(good))
    if bad:
        warn(f"mlx_fusion: skipping {len(bad)} malformed entr{'y' if len(bad) == 1 else 'ies'} of performance "
             f"cache {path} (first: {bad[0]!r}: {entries[bad[0]]!r:.80}); the next save drops them")
    return good


def _well_formed(key) -> bool:
    parts = key.split("|") if isinstance(key, str) else ()
    return len(parts) == 4 and parts[3].lstrip("-").isdigit()


# -- writing ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _tmp_path(path: Path) -> Path:
    # Under the lock one name is enough (and a killed writer leaves only it behind); unlocked
    # (no fcntl) writers could meet, so each gets its own.
    return path.with_name(path.name + (".tmp" if fcntl is not None else f".{os.getpid()}.tmp"))


def _remove_stale_tmps(path: Path) -> None:
    """Temp files of writers killed mid-save (older versions named them `<file><random>.tmp`).
    Only called under the lock, when no other writer can be writing one."""
    for stale in path.parent.glob(path.name + "*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def write_entries(path: Path, new: Dict[str, dict], warn: Warn) -> Dict[str, dict]:
    """Merge `new` into the file at `path` (re-read under the lock: another process may have
    written since we loaded) and replace it atomically. Returns the merged entries.
    Raises OSError if the cache cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        merged = {**read_entries(path, warn), **new}
        data = {"format": CACHE_FORMAT, "schema": CACHE_SCHEMA, "mlx_version": mx.__version__,
                "entries": dict(sorted(merged.items()))}
        if fcntl is not None:
            _remove_stale_tmps(path)
        tmp = _tmp_path(path)
        # 0o666 & ~umask, like any file the user's tools create (mkstemp would force 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return merged
