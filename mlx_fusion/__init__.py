"""mlx-fusion: automatic operator fusion for MLX.

    import mlx_fusion
    model = mlx_fusion.fuse(model)      # runs fused from now on
    mlx_fusion.stats()                  # what was fused, memory saved

The pipeline: trace (mx.export_function) -> IR -> match rules -> rewrite with
fused primitives (mlx_fusion.ops) -> replay. See docs/architecture.md.
"""

from ._compat import check_mlx_version as _check_mlx_version

_check_mlx_version()

from . import ops  # noqa: E402
from .config import FusionConfig, configure, fusion_config, get_config, reset_config  # noqa: E402
from .fuse import FusedFunction, FusionFallbackWarning, fuse, reset_stats, stats  # noqa: E402
from ._fusion_state import FusionRetraceWarning  # noqa: E402
from .control import disable  # noqa: E402
from .explain import ExplainReport, explain  # noqa: E402
from .log import from_environment as _log_from_environment  # noqa: E402
from .graph.ir import Graph, Node, Value  # noqa: E402
from .graph.optimizer import FusionOpportunity, FusionOptimizer, FusionStats  # noqa: E402
from .graph.trace import TraceError, trace  # noqa: E402
from .patterns import (  # noqa: E402
    Activation,
    BinaryActivation,
    BinaryOp,
    FusionPattern,
    LinearLayer,
    ScalarActivation,
    ScalarOp,
)

__version__ = "0.1.0"

_log_from_environment()  # MLX_FUSION_LOG=fusions,fallbacks,retraces (mlx_fusion/log.py)

__all__ = [
    "fuse", "trace", "stats", "reset_stats", "ops", "explain", "ExplainReport", "disable", "FusionRetraceWarning",
    "FusionConfig", "configure", "fusion_config", "get_config", "reset_config",
    "FusionOptimizer", "FusionOpportunity", "FusionStats", "FusedFunction", "FusionFallbackWarning",
    "Graph", "Node", "Value", "TraceError",
    "Activation", "BinaryOp", "ScalarOp", "FusionPattern", "BinaryActivation", "LinearLayer", "ScalarActivation",
]
