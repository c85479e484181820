"""The fusion vocabulary: activations, binary ops and fusion patterns.

These names are shared by every part of mlx-fusion: the fused primitives
(`mlx_fusion.ops`), the graph walker's rules, the performance tracker and the
CLI. Each activation and op carries its *unfused* MLX reference, which is the
numerical ground truth for tests and the fallback for unsupported dtypes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import mlx.core as mx

__all__ = [
    "Activation",
    "BinaryOp",
    "ScalarOp",
    "FusionPattern",
    "BinaryActivation",
    "LinearLayer",
    "ScalarActivation",
    "as_activation",
    "as_binary_op",
]


def _relu(x):
    return mx.maximum(x, 0)


def _gelu(x):
    # Same expression as mlx.nn.gelu (erf form).
    return x * (1 + mx.erf(x / math.sqrt(2))) / 2


def _gelu_approx(x):
    # Same expression as mlx.nn.gelu_approx (tanh form).
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x * mx.sigmoid(x)


class Activation(str, enum.Enum):
    """Activations the fused kernels implement. The integer `code` is the
    compile-time constant the Metal/CUDA kernels switch on (ACT)."""

    RELU = "relu"
    GELU = "gelu"
    GELU_APPROX = "gelu_approx"
    SILU = "silu"

    @property
    def code(self) -> int:
        return _ACT_CODES[self]

    def reference(self, x: mx.array) -> mx.array:
        """The unfused MLX expression (what mlx.nn computes)."""
        return _ACT_REFS[self](x)

    def __str__(self) -> str:
        return self.value


_ACT_CODES = {Activation.RELU: 0, Activation.GELU: 1, Activation.GELU_APPROX: 2, Activation.SILU: 3}
_ACT_REFS = {
    Activation.RELU: _relu,
    Activation.GELU: _gelu,
    Activation.GELU_APPROX: _gelu_approx,
    Activation.SILU: _silu,
}


class BinaryOp(str, enum.Enum):
    """Binary elementwise ops the fused kernels implement (OP constant)."""

    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"

    @property
    def code(self) -> int:
        return _OP_CODES[self]

    def reference(self, a, b) -> mx.array:
        return _OP_REFS[self](a, b)

    def __str__(self) -> str:
        return self.value


_OP_CODES = {BinaryOp.ADD: 0, BinaryOp.SUB: 1, BinaryOp.MUL: 2, BinaryOp.DIV: 3}
_OP_REFS = {
    BinaryOp.ADD: mx.add,
    BinaryOp.SUB: mx.subtract,
    BinaryOp.MUL: mx.multiply,
    BinaryOp.DIV: mx.divide,
}


class ScalarOp(str, enum.Enum):
    """The design's scalar ops. All are expressed by the one affine form
    `x * scale + shift` that `fused_scalar` implements."""

    MUL = "mul"  # x * s        -> scale=s, shift=0
    ADD = "add"  # x + s        -> scale=1, shift=s
    AFFINE = "affine"  # x * s + t

    def __str__(self) -> str:
        return self.value


def as_activation(act: Union[str, Activation, None], allow_none: bool = False) -> Optional[Activation]:
    """Normalize an activation given as a string or enum; raise ValueError on unknown names."""
    if act is None:
        if allow_none:
            return None
        raise ValueError("activation must be one of %s, not None" % [a.value for a in Activation])
    if isinstance(act, Activation):
        return act
    try:
        return Activation(str(act).lower())
    except ValueError:
        raise ValueError(
            f"unknown activation {act!r}; expected one of {[a.value for a in Activation]}"
        ) from None


def as_binary_op(op: Union[str, BinaryOp]) -> BinaryOp:
    if isinstance(op, BinaryOp):
        return op
    aliases = {"+": "add", "-": "sub", "*": "mul", "/": "div", "subtract": "sub",
               "multiply": "mul", "divide": "div"}
    name = aliases.get(str(op).lower(), str(op).lower())
    try:
        return BinaryOp(name)
    except ValueError:
        raise ValueError(f"unknown binary op {op!r}; expected one of {[o.value for o in BinaryOp]}") from None


@dataclass(frozen=True)
class BinaryActivation:
    """act(a op b): one elementwise kernel instead of two."""

    binary_op: BinaryOp
    activation: Activation

    @property
    def name(self) -> str:
        return f"{self.binary_op.value}+{self.activation.value}"


@dataclass(frozen=True)
class LinearLayer:
    """act(x @ W.T + b): the GEMM plus a fused bias/activation epilogue."""

    has_bias: bool
    activation: Optional[Activation]

    @property
    def name(self) -> str:
        act = self.activation.value if self.activation else "none"
        return f"linear{'+bias' if self.has_bias else ''}+{act}"


@dataclass(frozen=True)
class ScalarActivation:
    """act(x * scale + shift) with scalar scale/shift."""

    scalar_op: ScalarOp
    activation: Activation

    @property
    def name(self) -> str:
        return f"scalar-{self.scalar_op.value}+{self.activation.value}"


FusionPattern = Union[BinaryActivation, LinearLayer, ScalarActivation]

# A callable that computes the unfused reference for a pattern; used by tests and benchmarks.
ReferenceFn = Callable[..., mx.array]
