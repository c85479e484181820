"""Speedups shipped with the package, for a device kind with nothing measured locally.

`mlx_fusion/data/priors-<kind>.json` ("cuda", "cpu"), built by tools/make_priors.py
from benchmark runs: each entry is the smaller of the forward and forward+backward
speedups, so a fusion is taken by default only if it pays in training too.
`MLX_FUSION_NO_PRIORS=1` turns them off (to measure what fusion does without them).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Dict, Optional

from .device import device_id
from .perfcache import cache_key, dtype_name, entry_speedup, pattern_name, size_bucket

__all__ = ["prior_speedup"]

_DATA = Path(__file__).resolve().parent / "data"


@functools.lru_cache(maxsize=None)
def _priors(kind: str) -> Dict[str, dict]:
    try:
        entries = json.loads((_DATA / f"priors-{kind}.json").read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if entry_speedup(v) is not None}


def _pattern_kind(pattern) -> Optional[str]:
    """"binary" / "scalar" / "linear": the registry case's kind, None if no case measures it."""
    from .benchmark import case_for_pattern  # lazy: the benchmark code pulls in every fused op

    try:
        return case_for_pattern(pattern).kind
    except ValueError:
        return None


def prior_speedup(pattern, dtype, size: int, device: str) -> Optional[float]:
    """Shipped measurement for this device kind ("cuda", ...): the pattern's own entry at
    this size bucket (or a neighbour, x4 either way), else the median of its kind
    (binary/scalar/linear) there, else the line between the nearest measured sizes
    (the nearest one outside them); None if nothing was shipped for it."""
    if os.environ.get("MLX_FUSION_NO_PRIORS"):
        return None
    kind = device_id(device).split(":")[0]
    entries = _priors(kind)
    if not entries:
        return None
    b = size_bucket(size)
    op_kind = _pattern_kind(pattern)  # None for a pattern no benchmark case measures: its own entries only
    names = (pattern_name(pattern),) + (("*" + op_kind,) if op_kind else ())
    for name in names:
        for bucket in (b, b - 1, b + 1):
            hit = entries.get(cache_key(kind, name, dtype, bucket))
            if hit is not None:
                return entry_speedup(hit)
    # Nothing within x4: a size between two measured ones (the op tables measure a few sizes)
    # takes the straight line between them, a size outside them the nearest. A gap in the
    # table must not hand the decision to the cost model where every measured size lost.
    for name in names:
        curve = _buckets(kind).get((name, dtype_name(dtype)))
        if curve:
            below = [(k, v) for k, v in curve if k < b]
            above = [(k, v) for k, v in curve if k > b]
            if below and above:
                (k0, v0), (k1, v1) = below[-1], above[0]
                return v0 + (v1 - v0) * (b - k0) / (k1 - k0)
            return below[-1][1] if below else above[0][1]
    return None


@functools.lru_cache(maxsize=None)
def _buckets(kind: str) -> Dict[tuple, list]:
    """(name, dtype) -> [(bucket, speedup)] sorted by bucket, from the shipped entries of `kind`."""
    curves: Dict[tuple, list] = {}
    for key, entry in _priors(kind).items():
        _, name, dtype, bucket = key.rsplit("|", 3)
        curves.setdefault((name, dtype), []).append((int(bucket), entry_speedup(entry)))
    return {k: sorted(v) for k, v in curves.items()}
