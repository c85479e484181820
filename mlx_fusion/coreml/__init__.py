"""Neural Engine offload: run eligible blocks of a traced graph as Core ML programs.

    report = find_blocks(graph, min_flops=0)          # eligibility (no coremltools needed)
    converted = convert_block(graph, block, params)   # .mlpackage in the cache (coremltools)
    offload_graph(graph, config)                      # what fuse() calls with neural_engine=True

coremltools is an optional extra (``pip install 'mlx-fusion[coreml]'``) and is
imported only when a conversion or prediction needs it. Core ML prediction
needs macOS; elsewhere packages can still be written (``mlx-fusion coreml``).
See docs/neural-engine.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys

__all__ = ["INSTALL_HINT", "CoreMLUnavailable", "coremltools_available", "require_coremltools",
           "prediction_available", "find_blocks", "convert_block", "offload_graph", "OffloadOptions",
           "offload_options", "set_options", "get_options", "CoreMLTrainingError"]

INSTALL_HINT = "pip install 'mlx-fusion[coreml]'"


class CoreMLUnavailable(ImportError):
    """coremltools is missing (or Core ML cannot run here)."""


def coremltools_available() -> bool:
    if "coremltools" in sys.modules:
        return True
    return importlib.util.find_spec("coremltools") is not None


@contextlib.contextmanager
def _quiet_import():
    """Silence what importing coremltools logs but never matters to us: off macOS, one
    "Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'" line per
    Core ML proxy (prediction needs macOS; we say so ourselves), and transformers' "PyTorch
    was not found" advice when coremltools probes its optional dependencies."""
    if "coremltools" in sys.modules:
        yield
        return
    quiet = sys.platform != "darwin"
    log = logging.getLogger("coremltools")
    level = log.level
    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY")
    had_transformers = "transformers" in sys.modules
    if quiet:
        log.setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    try:
        yield
    finally:
        log.setLevel(level)
        if verbosity is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
            if not had_transformers and "transformers" in sys.modules:  # first imported here: back to its default
                with contextlib.suppress(Exception):
                    sys.modules["transformers"].logging.set_verbosity_warning()


def require_coremltools():
    """Import and return coremltools, or raise `CoreMLUnavailable` saying how to install it."""
    try:
        with _quiet_import():
            return importlib.import_module("coremltools")
    except ImportError as e:
        raise CoreMLUnavailable(
            f"Neural Engine offload and `mlx-fusion coreml` need coremltools ({e}). "
            f"Install it with: {INSTALL_HINT}") from e


def prediction_available() -> bool:
    """Core ML prediction runs only on macOS."""
    return sys.platform == "darwin"


_LAZY = {
    "find_blocks": "eligibility", "convert_block": "convert", "offload_graph": "runtime",
    "CoreMLTrainingError": "runtime", "OffloadOptions": "options", "offload_options": "options",
    "set_options": "options", "get_options": "options",
}


def __getattr__(name):  # keep `import mlx_fusion.coreml` free of coremltools and cheap
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
