"""The elementwise fused ops under their former module name (binary.py, scalar.py)."""

from .binary import binary_reference, fused_binary  # noqa: F401
from .scalar import fused_scalar, scalar_reference  # noqa: F401

__all__ = ["fused_binary", "fused_scalar", "binary_reference", "scalar_reference"]
