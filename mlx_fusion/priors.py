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
from .perfcache import cache_key, entry_speedup, pattern_name, size_bucket

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
    (binary/scalar/linear) there; None if nothing was shipped for it."""
    if os.environ.get("MLX_FUSION_NO_PRIORS"):
        return None
    kind = device_id(device).split(":")[0]
    entries = _priors(kind)
    if not entries:
        return None
    b = size_bucket(size)
    op_kind = _pattern_kind(pattern)  # None for a pattern no benchmark case measures: its own entries only
    for name in (pattern_name(pattern),) + (("*" + op_kind,) if op_kind else ()):
        for bucket in (b, b - 1, b + 1):
            hit = entries.get(cache_key(kind, name, dtype, bucket))
            if hit is not None:
                return entry_speedup(hit)
    return None
