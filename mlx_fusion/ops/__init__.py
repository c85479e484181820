"""Fused primitives: each is one `mx.custom_function` with its own vjp, a Metal
kernel, its CUDA twin and a CPU path (see docs/ops.md)."""

from .elementwise import binary_reference, fused_binary, fused_scalar, scalar_reference
from .linear import fused_linear, linear_reference
from .registry import FUSED_OPS, OpCase, cases

__all__ = [
    "fused_binary",
    "fused_scalar",
    "fused_linear",
    "binary_reference",
    "scalar_reference",
    "linear_reference",
    "FUSED_OPS",
    "OpCase",
    "cases",
]
