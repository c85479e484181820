"""Option values of the `mlx-fusion` command: `--ops`, `--dtypes`, `--sizes` and the
argparse types for counts, each failing with a message that names the option.

Importable without the CLI: `select_ops("mul+*")`, `parse_sizes("64K,1x512x512")`.
"""

from __future__ import annotations

import argparse
import fnmatch

from ..benchmark import elementwise_shape
from ..models.spec import DTYPES
from ..ops.registry import FUSED_OPS

__all__ = ["parse_dtypes", "select_ops", "parse_sizes", "non_negative_int", "non_negative_float", "DTYPES"]


def parse_dtypes(text: str, quick: bool = False) -> list:
    """"float32,bfloat16" -> dtypes; empty: float32 and bfloat16 (float32 only if `quick`,
    since bfloat16 is emulated and slow on a CPU). Raises ValueError naming the option."""
    names = [d.strip() for d in text.split(",") if d.strip()] or (["float32"] if quick else ["float32", "bfloat16"])
    bad = [d for d in names if d not in DTYPES]
    if bad:
        raise ValueError(f"--dtypes: unknown {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    return [DTYPES[d] for d in names]


def select_ops(text: str) -> list:
    """Registry cases named by comma-separated names, globs ("mul+*") or kinds ("linear");
    empty: all. Raises ValueError if an entry matches nothing."""
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    if not wanted:
        return list(FUSED_OPS)
    chosen, unmatched = [], []
    for w in wanted:
        hits = [c for c in FUSED_OPS if c.kind == w or fnmatch.fnmatchcase(c.name, w)]
        if not hits:
            unmatched.append(w)
        chosen += [c for c in hits if c not in chosen]
    if unmatched:
        kinds = ", ".join(sorted({c.kind for c in FUSED_OPS}))
        raise ValueError(f"--ops: nothing matches {', '.join(unmatched)}; ops are "
                         f"{', '.join(c.name for c in FUSED_OPS)} (kinds: {kinds})")
    return chosen


def _parse_count(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    n = int(text[:-1] if mult > 1 else text) * mult
    if n < 1:
        raise ValueError
    return n


def parse_sizes(text: str) -> dict:
    """"4096,64K,10000,1x512x512" -> {kind: shapes} for `run_ops_benchmark`: a count is an
    elementwise size, measured at exactly that many elements (`elementwise_shape`: rows of
    4096 when it divides, else one row); MxKxN is a linear shape. Kinds given no size keep
    their defaults."""
    shapes: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            if "x" in item.lower():
                dims = tuple(_parse_count(d) for d in item.lower().split("x"))
                if len(dims) != 3:
                    raise ValueError
                shapes.setdefault("linear", []).append(dims)
            else:
                shape = elementwise_shape(_parse_count(item))
                shapes.setdefault("binary", []).append(shape)
                shapes.setdefault("scalar", []).append(shape)
        except ValueError:
            raise ValueError(f"--sizes: bad size {item!r}; use element counts (4096, 64K, 1M) "
                             "or MxKxN for linear ops") from None
    return shapes


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (argparse reports the option and exits 2 otherwise)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (x >= 0 and x != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return x
