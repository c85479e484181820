"""Every fused op with its unfused reference: what tests and benchmarks iterate.

Adding a pattern adds cases here (one line in `_build`), and every test that
loops over `FUSED_OPS` picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import mlx.core as mx

from ..patterns import Activation, BinaryActivation, BinaryOp, LinearLayer, ScalarActivation, ScalarOp
from .elementwise import binary_reference, fused_binary, fused_scalar, scalar_reference
from .linear import fused_linear, linear_reference

__all__ = ["OpCase", "FUSED_OPS", "cases"]


@dataclass(frozen=True)
class OpCase:
    """One fused op configuration.

    kind: "binary" (inputs a, b), "scalar" (input x), "linear" (x, weight[, bias]).
    fused / reference: callables over the arrays from `make_inputs`.
    """

    name: str
    kind: str
    pattern: object
    fused: Callable
    reference: Callable

    def make_inputs(self, shape: Tuple[int, ...], dtype=mx.float32, key=None) -> List[mx.array]:
        """Random inputs: binary -> [a, b], both of `shape`;
        scalar -> [x]; linear -> shape is (M, K, N): [x (M, K), weight (N, K)(, bias (N,))]."""
        key = key if key is not None else mx.random.key(0)
        k1, k2, k3 = mx.random.split(key, 3)
        if self.kind == "linear":
            m, k, n = shape
            x = mx.random.normal((m, k), key=k1).astype(dtype)
            w = (mx.random.normal((n, k), key=k2) / k**0.5).astype(dtype)
            arrays = [x, w]
            if self.pattern.has_bias:
                arrays.append(mx.random.normal((n,), key=k3).astype(dtype))
            return arrays
        a = mx.random.normal(shape, key=k1).astype(dtype)
        if self.kind == "scalar":
            return [a]
        b = mx.random.normal(shape, key=k2).astype(dtype)
        if self.pattern.binary_op is BinaryOp.DIV:
            b = mx.where(mx.abs(b) < 0.25, 0.25, b).astype(dtype)  # keep the division well conditioned
        return [a, b]


def _build() -> List[OpCase]:
    out = []
    for op in BinaryOp:
        for act in Activation:
            out.append(OpCase(
                f"{op.value}+{act.value}", "binary", BinaryActivation(op, act),
                lambda a, b, op=op, act=act: fused_binary(a, b, op, act),
                lambda a, b, op=op, act=act: binary_reference(a, b, op, act),
            ))
    for act in Activation:
        out.append(OpCase(
            f"affine+{act.value}", "scalar", ScalarActivation(ScalarOp.AFFINE, act),
            lambda x, act=act: fused_scalar(x, 1.5, -0.25, act),
            lambda x, act=act: scalar_reference(x, 1.5, -0.25, act),
        ))
    for has_bias in (True, False):
        for act in list(Activation) + [None]:
            pat = LinearLayer(has_bias, act)
            out.append(OpCase(
                pat.name, "linear", pat,
                lambda x, w, *b, act=act: fused_linear(x, w, b[0] if b else None, act),
                lambda x, w, *b, act=act: linear_reference(x, w, b[0] if b else None, act),
            ))
    return out


FUSED_OPS: List[OpCase] = _build()


def cases(kind: str = None) -> List[OpCase]:
    return [c for c in FUSED_OPS if kind is None or c.kind == kind]
