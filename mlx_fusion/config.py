"""Fusion settings: one immutable `FusionConfig`, a process-wide default and
thread-local temporary overrides (the mechanism is `mlx_fusion.settings.Settings`).

    configure(min_tensor_size=0)            # process-wide, every thread
    with fusion_config(enabled=False): ...  # this thread only, restored on exit

`FusionConfig` is frozen, so a config handed to another thread can never
change under it; "changing" the default swaps in a new object under a lock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from .device import current_device_kind  # noqa: F401  (re-exported: graph/ imports it from here)
from .settings import Settings, check_fields

__all__ = [
    "FusionConfig",
    "DEFAULT_MIN_TENSOR_SIZE",
    "get_config",
    "configure",
    "reset_config",
    "fusion_config",
    "current_device_kind",
    "pattern_names",
]

# Below ~4K elements an elementwise op is launch-latency bound either way, so a
# fused kernel saves at most one launch, while every distinct size costs one
# JIT compile of the kernel (sizes are template constants, see FACTS.md).
# Set 0 to fuse everything (tests do).
DEFAULT_MIN_TENSOR_SIZE = 4096

_DEVICE_FIELDS = {"metal": "metal", "cuda": "cuda", "cpu": "cpu",
                  "neural_engine": "neural_engine", "ane": "neural_engine"}


@dataclass(frozen=True)
class FusionConfig:
    """What the fusion pass may do.

    Args:
        enabled (bool): master switch. Default: ``True``.
        min_tensor_size (int): fuse only when the fused output has at least this
            many elements. Default: ``4096``.
        metal, cuda, cpu (bool): allow fusion when MLX runs on that device.
        neural_engine (bool): allow Core ML / Neural Engine offload. Default: ``False``.
        enabled_patterns (frozenset or None): ``None`` allows every pattern; else
            entries are pattern classes (``BinaryActivation``), pattern instances
            (``BinaryActivation(BinaryOp.ADD, Activation.RELU)``) or pattern
            names (``"add+relu"``, ``"linear+bias+relu"``). An unknown name raises
            ``ValueError`` listing the valid ones (`pattern_names()`).
        merge_projections (bool): run projections of one input (q/k/v, gate/up) as one
            matmul against their concatenated weights, built once per set of weight arrays
            and reused while the same arrays come back (inference). The concatenation is a
            second copy of those weights in memory, hence opt-in
            (docs/merged-projections.md). Default: ``False``.
    """

    enabled: bool = True
    min_tensor_size: int = DEFAULT_MIN_TENSOR_SIZE
    metal: bool = True
    cuda: bool = True
    cpu: bool = True
    neural_engine: bool = False
    enabled_patterns: Optional[frozenset] = None
    merge_projections: bool = False

    def __post_init__(self):
        if isinstance(self.min_tensor_size, bool) or not isinstance(self.min_tensor_size, int) \
                or self.min_tensor_size < 0:
            raise ValueError(f"min_tensor_size must be an int >= 0, got {self.min_tensor_size!r}")
        for name in ("enabled", "metal", "cuda", "cpu", "neural_engine", "merge_projections"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        pats = self.enabled_patterns
        if pats is not None:
            if isinstance(pats, (str, type)) or not isinstance(pats, Iterable):
                pats = [pats]  # a single entry is a common slip; accept it
            pats = frozenset(pats)
            for p in pats:
                if not (isinstance(p, (str, type)) or hasattr(p, "name")):
                    raise TypeError(f"enabled_patterns entry {p!r} is not a pattern, class or name")
            unknown = sorted(p for p in pats if isinstance(p, str) and p not in pattern_names())
            if unknown:  # a typo would otherwise disable every fusion without a word
                raise ValueError(f"unknown pattern name(s) {', '.join(map(repr, unknown))} in enabled_patterns; "
                                 f"valid names: {', '.join(sorted(pattern_names()))}")
            object.__setattr__(self, "enabled_patterns", pats)

    def allows(self, pattern: Any) -> bool:
        """True if `pattern` (an instance) is enabled: by class, by value or by name."""
        if self.enabled_patterns is None:
            return True
        pats = self.enabled_patterns
        cls = type(pattern)
        return (cls in pats or pattern in pats or cls.__name__ in pats
                or getattr(pattern, "name", None) in pats)

    def device_allowed(self, device_kind: str) -> bool:
        """`device_kind`: "metal", "cuda", "cpu" or "neural_engine" (alias "ane")."""
        field = _DEVICE_FIELDS.get(str(device_kind).lower())
        if field is None:
            raise ValueError(f"unknown device kind {device_kind!r}; expected one of {sorted(_DEVICE_FIELDS)}")
        return getattr(self, field)

    def replace(self, **changes) -> "FusionConfig":
        check_fields(FusionConfig, changes)
        return dataclasses.replace(self, **changes)


def pattern_names() -> frozenset:
    """Every name `enabled_patterns` accepts: the patterns of the fused op definitions and their classes."""
    global _PATTERN_NAMES
    if _PATTERN_NAMES is None:
        from .ops.registry import DEFINITIONS, FUSED_OPS  # ops import this module: late

        pats = [s.pattern for d in DEFINITIONS for s in d.spellings()] + [c.pattern for c in FUSED_OPS]
        _PATTERN_NAMES = frozenset({p.name for p in pats} | {type(p).__name__ for p in pats})
    return _PATTERN_NAMES


_PATTERN_NAMES = None
_SETTINGS: Settings[FusionConfig] = Settings(FusionConfig)


# The config in effect for this thread: its innermost `fusion_config`, else the global one.
# (Settings.get itself: every fused call reads it, and a wrapper function would double the cost.)
get_config = _SETTINGS.get


def configure(**changes) -> FusionConfig:
    """Change the process-wide default (all threads without an override). Returns the new config."""
    return _SETTINGS.set(**changes)


def reset_config() -> FusionConfig:
    """Restore the process-wide default to `FusionConfig()`."""
    return _SETTINGS.reset()


def fusion_config(**changes) -> Iterator[FusionConfig]:
    """Temporarily change the config for the current thread only; nests.

        with fusion_config(min_tensor_size=0) as config: ...
    """
    return _SETTINGS.override(**changes)
