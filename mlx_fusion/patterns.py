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
from typing import Callable, Optional, Tuple, Union

import mlx.core as mx

__all__ = [
    "Activation",
    "BinaryOp",
    "ScalarOp",
    "FusionPattern",
    "BinaryActivation",
    "LinearLayer",
    "ScalarActivation",
    "GatedActivation",
    "as_activation",
    "as_activation_code",
    "as_binary_op",
    "activation_reference",
    "activation_spellings",
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


def _relu_zero_first(x):
    # MLX gives a tie of mx.maximum to its second operand: d/dx maximum(0, x) is 1 at x == 0,
    # where nn.relu's maximum(x, 0) gives 0. Same values, another gradient convention.
    return mx.maximum(0, x)


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


_ACT_BY_CODE = {code: act for act, code in _ACT_CODES.items()}


def as_activation_code(code: int) -> Activation:
    """The activation a kernel code stands for; ValueError for an unknown code."""
    try:
        return _ACT_BY_CODE[int(code)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unknown activation code {code!r}; expected one of {sorted(_ACT_BY_CODE)}") from None


def activation_spellings() -> Tuple[Tuple[Activation, Callable, float], ...]:
    """Every way user code writes an activation that the fused ops reproduce exactly:
    (activation, the plain MLX function, ReLU's derivative at exactly 0 under it).

    Fused ops take the third item as ``relu_at_zero`` so that gradients follow the
    spelling that was replaced (MLX's tie convention, see `_relu_zero_first`)."""
    out = [(act, _ACT_REFS[act], 0.0) for act in Activation]
    out.insert(1, (Activation.RELU, _relu_zero_first, 1.0))
    return tuple(out)


def activation_reference(act: Activation, relu_at_zero: float = 0.0) -> Callable:
    """The plain MLX function of `act` whose gradient at 0 is `relu_at_zero` (ReLU only)."""
    if act is Activation.RELU and relu_at_zero:
        return _relu_zero_first
    return _ACT_REFS[act]


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


@dataclass(frozen=True)
class GatedActivation:
    """act(g) * u: a gated linear unit (SwiGLU with silu, GeGLU with gelu / gelu_approx)."""

    activation: Activation

    @property
    def name(self) -> str:
        return f"glu+{self.activation.value}"


FusionPattern = Union[BinaryActivation, LinearLayer, ScalarActivation, GatedActivation]
