"""MLX version gate: mlx-fusion is tested against one MLX minor series."""

from __future__ import annotations

import mlx.core as mx

SUPPORTED_MLX = ((0, 32), (0, 33))  # [low, high): 0.32.x
SUPPORTED_MLX_TEXT = ">=0.32,<0.33"


def _parse(version: str):
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_mlx_version(version: str = None) -> str:
    """Raise ImportError naming the supported range if MLX is outside it."""
    version = version or mx.__version__
    v = _parse(version)[:2]
    low, high = SUPPORTED_MLX
    if not (low <= v < high):
        raise ImportError(
            f"mlx-fusion supports MLX {SUPPORTED_MLX_TEXT} (tested with 0.32.x); found MLX {version}. "
            f"Install a supported version: pip install 'mlx{SUPPORTED_MLX_TEXT}'"
        )
    return version
