"""Opt-in logging under the ``mlx_fusion`` logger.

Three channels, each a child logger: ``mlx_fusion.fusions`` (what a trace fused
and rejected), ``mlx_fusion.fallbacks`` (a call runs unfused, and why) and
``mlx_fusion.retraces`` (a new trace for a new input signature, naming what
changed). They log at INFO; configure them like any Python logger, or set

    MLX_FUSION_LOG=fusions,fallbacks,retraces     # or "all"

before importing mlx_fusion to print them on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["CHANNELS", "logger", "enable_stderr"]

CHANNELS = ("fusions", "fallbacks", "retraces")
ENV = "MLX_FUSION_LOG"
_handler = None


def logger(channel: str) -> logging.Logger:
    return logging.getLogger(f"mlx_fusion.{channel}")


def enable_stderr(channels) -> None:
    """Print the given channels (names from `CHANNELS`, or "all") on stderr at INFO."""
    global _handler
    if isinstance(channels, str):
        channels = [c.strip() for c in channels.split(",") if c.strip()]
    if "all" in channels:
        channels = CHANNELS
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown:
        warnings.warn(f"{ENV}: unknown channel(s) {', '.join(unknown)}; valid: {', '.join(CHANNELS)}, all",
                      stacklevel=2)
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter("mlx_fusion.%(channel)s: %(message)s"))
        _handler.addFilter(_channel_name)
    for c in channels:
        if c in CHANNELS:
            log = logger(c)
            log.setLevel(logging.INFO)
            if _handler not in log.handlers:
                log.addHandler(_handler)


def _channel_name(record: logging.LogRecord) -> bool:
    record.channel = record.name.rsplit(".", 1)[-1]
    return True


def from_environment() -> None:
    value = os.environ.get(ENV, "").strip()
    if value:
        enable_stderr(value)
