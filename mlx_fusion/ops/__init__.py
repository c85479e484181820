"""Fused primitives: each is one `mx.custom_function` with its own vjp, a Metal
kernel, its CUDA twin and a CPU path (see docs/ops.md). Each op family is one
definition (`registry.DEFINITIONS`, ops/base.py)."""

from .binary import binary_reference, fused_binary
from .linear import fused_linear, linear_reference
from .registry import DEFINITIONS, FUSED_OPS, OpCase, cases
from .scalar import fused_scalar, scalar_reference

__all__ = [
    "fused_binary",
    "fused_scalar",
    "fused_linear",
    "binary_reference",
    "scalar_reference",
    "linear_reference",
    "DEFINITIONS",
    "FUSED_OPS",
    "OpCase",
    "cases",
]
