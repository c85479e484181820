"""mlx-fusion: automatic operator fusion for MLX."""

from ._compat import check_mlx_version as _check_mlx_version

_check_mlx_version()

from .patterns import (  # noqa: E402
    Activation,
    BinaryActivation,
    BinaryOp,
    LinearLayer,
    ScalarActivation,
    ScalarOp,
)
from . import ops  # noqa: E402

__version__ = "0.1.0"
