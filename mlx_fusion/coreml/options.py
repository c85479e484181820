"""Offload settings: one frozen `OffloadOptions`, a process-wide default and a
thread-local override (`offload_options(...)`): the same `mlx_fusion.settings.Settings`
mechanism as `mlx_fusion.config`.

`FusionConfig.neural_engine` switches offload on; these say *how*. They are
not part of `fuse`'s trace cache key: change them before the first call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..settings import Settings

__all__ = ["OffloadOptions", "DEFAULT_MIN_FLOPS", "COMPUTE_UNITS", "get_options", "set_options",
           "offload_options", "cache_dir"]

# Not measured (we have no Mac here): a Core ML prediction costs a NumPy copy of
# every block input and output plus a request dispatch, on the order of 0.1 ms.
# Below ~10 MFLOP an MLX kernel sequence is done before that, so smaller blocks
# stay in MLX. Tests set 0.
DEFAULT_MIN_FLOPS = 10_000_000

COMPUTE_UNITS = ("CPU_AND_NE", "ALL", "CPU_ONLY", "CPU_AND_GPU")
PREDICTORS = ("coreml", "mil-numpy")


@dataclass(frozen=True)
class OffloadOptions:
    """How eligible blocks are offloaded.

    Args:
        min_flops (float): a block needs at least this much estimated work. Default: 1e7.
        compute_units (str): ``ct.ComputeUnit`` name used to load the model. Default: ``"CPU_AND_NE"``.
        cache_dir (str or None): where ``.mlpackage`` files live; ``None``: `cache_dir()`.
        force (bool): offload even when training; raises `CoreMLTrainingError` instead of
            quietly running MLX. Default: ``False``.
        predictor (str): ``"coreml"`` (``MLModel.predict``, macOS only) or ``"mil-numpy"``
            (re-runs the saved program in NumPy, any OS; for tests, slow). Default: ``"coreml"``.
    """

    min_flops: float = DEFAULT_MIN_FLOPS
    compute_units: str = "CPU_AND_NE"
    cache_dir: Optional[str] = None
    force: bool = False
    predictor: str = "coreml"

    def __post_init__(self):
        if self.compute_units not in COMPUTE_UNITS:
            raise ValueError(f"compute_units must be one of {COMPUTE_UNITS}, got {self.compute_units!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if not (isinstance(self.min_flops, (int, float)) and self.min_flops >= 0):
            raise ValueError(f"min_flops must be a number >= 0, got {self.min_flops!r}")


_SETTINGS: Settings[OffloadOptions] = Settings(OffloadOptions)


def get_options() -> OffloadOptions:
    """The options in effect for this thread: its innermost `offload_options`, else the global ones."""
    return _SETTINGS.get()


def set_options(**changes) -> OffloadOptions:
    """Change the process-wide options; returns the new ones."""
    return _SETTINGS.set(**changes)


def offload_options(**changes) -> Iterator[OffloadOptions]:
    """Temporarily change the options for this thread; nests."""
    return _SETTINGS.override(**changes)


def cache_dir(options: Optional[OffloadOptions] = None) -> Path:
    """The package cache: ``options.cache_dir``, else ``$MLX_FUSION_COREML_CACHE``, else
    ``$MLX_FUSION_CACHE/coreml``, else ``$XDG_CACHE_HOME/mlx-fusion/coreml`` (``~/.cache``)."""
    options = options or get_options()
    if options.cache_dir:
        return Path(options.cache_dir).expanduser()
    if os.environ.get("MLX_FUSION_COREML_CACHE"):
        return Path(os.environ["MLX_FUSION_COREML_CACHE"]).expanduser()
    if os.environ.get("MLX_FUSION_CACHE"):
        return Path(os.environ["MLX_FUSION_CACHE"]).expanduser() / "coreml"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "mlx-fusion" / "coreml"
