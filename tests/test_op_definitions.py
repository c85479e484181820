"""The fused op definitions (mlx_fusion/ops/binary.py, scalar.py, linear.py): what each
promises beyond values and gradients (tests/test_ops.py): MLX's conventions and errors."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_fusion import ops
from mlx_fusion.ops import FUSED_OPS
from mlx_fusion.patterns import Activation
from tests.metal_shim import metal_shim  # noqa: F401  (a fixture)


def grads(fn, args):
    g = mx.grad(lambda *a: (fn(*a) * mx.cos(mx.arange(fn(*a).size).reshape(fn(*a).shape))).sum(),
                argnums=tuple(range(len(args))))(*args)
    return (g,) if isinstance(g, mx.array) else tuple(g)


# -- ReLU's gradient at exactly 0 follows the spelling that was fused -----------------------------------------
@pytest.mark.parametrize("tie", [0.0, 1.0])
@pytest.mark.parametrize("family", ["binary", "scalar", "linear"])
def test_relu_at_zero_matches_mlx_spelling(family, tie):
    """MLX's maximum gives a tie to its second operand: maximum(z, 0) has gradient 0 at z == 0,
    maximum(0, z) has 1. `relu_at_zero` reproduces either, forward and backward."""
    relu = (lambda z: mx.maximum(0.0, z)) if tie else (lambda z: mx.maximum(z, 0.0))
    a = mx.array([[0.0, -1.0, 2.0, 0.0], [0.0, 0.5, -0.5, 0.0]])
    if family == "binary":
        b = mx.zeros_like(a)
        fused = lambda a, b: ops.fused_binary(a, b, "add", "relu", relu_at_zero=tie)  # noqa: E731
        ref = lambda a, b: relu(a + b)  # noqa: E731
        args = (a, b)
    elif family == "scalar":
        fused = lambda a: ops.fused_scalar(a, 2.0, 0.0, "relu", relu_at_zero=tie)  # noqa: E731
        ref = lambda a: relu(a * 2.0)  # noqa: E731
        args = (a,)
    else:
        w, b = mx.eye(4), mx.zeros((4,))
        fused = lambda a, w, b: ops.fused_linear(a, w, b, "relu", relu_at_zero=tie)  # noqa: E731
        ref = lambda a, w, b: relu(a @ w.T + b)  # noqa: E731
        args = (a, w, b)
    assert mx.array_equal(fused(*args), ref(*args))
    for gf, gr in zip(grads(fused, args), grads(ref, args)):
        assert mx.array_equal(gf, gr), (gf, gr)


def test_unknown_activation_codes_and_names_are_errors():
    from mlx_fusion.ops.common import activation_grad
    from mlx_fusion.patterns import as_activation, as_activation_code

    assert [as_activation_code(a.code) for a in Activation] == list(Activation)
    with pytest.raises(ValueError, match="unknown activation code"):
        as_activation_code(len(Activation))
    with pytest.raises(ValueError, match="unknown activation"):
        as_activation("tanh")
    with pytest.raises(ValueError):
        activation_grad("tanh", mx.zeros(3))


def test_every_registry_case_comes_from_a_definition():
    from mlx_fusion.ops.registry import DEFINITIONS

    assert {c.kind for c in FUSED_OPS} == {d.name for d in DEFINITIONS}
    assert len({c.name for c in FUSED_OPS}) == len(FUSED_OPS)
    for d in DEFINITIONS:
        assert d.kernels and all(k.name for k in d.kernels)


def test_case_for_covers_every_pattern_the_rules_can_propose():
    from mlx_fusion.graph.rules import RULES
    from mlx_fusion.ops.registry import case_for

    for rule in RULES.rules:
        for s in rule.spellings:
            case = case_for(s.pattern)
            assert case.pattern == s.pattern or case.name == s.pattern.name
            args = case.make_inputs(case.workload.shape_for_size(64), mx.float32)
            assert mx.allclose(case.fused(*args), case.reference(*args), atol=1e-5)


# -- bad input gets what MLX gives (issue 11, item 7) -----------------------------------------------------------
def _same_as_mlx(fused, reference):
    """Both raise the same exception type, or both return equal arrays of one dtype."""
    try:
        want = reference()
    except Exception as e:  # noqa: BLE001 - whatever MLX raises
        with pytest.raises(type(e)):
            fused()
        return
    got = fused()
    assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
    assert mx.array_equal(got, want, equal_nan=True) or mx.allclose(got, want), (got, want)


@pytest.mark.parametrize("a, b", [
    (mx.array([250, 255], mx.uint8), 10),           # MLX: uint8 [4, 9] (weak Python int)
    (mx.array([1, 2], mx.uint32), -1),             # MLX raises (overflow)
    (mx.array([True, False]), True),
    (mx.array([True, False]), 1.5),
    (mx.array([1, 2], mx.int8), mx.array([3, 4], mx.int16)),
    (mx.ones((2, 3)), True),
    (mx.ones((2, 3), mx.float16), np.float32(2.5)),  # NumPy scalars are weak, as Python's
    (np.float32(2.5), mx.ones((2, 3), mx.bfloat16)),
    (mx.ones((2, 3)), np.array([1.0, 2.0, 3.0], np.float32)),
    (mx.ones((2, 3), mx.float16), 2**40),
    (2, 3.5),
], ids=str)
@pytest.mark.parametrize("op", ["add", "mul"])
def test_fused_binary_promotes_and_raises_like_mlx(a, b, op):
    _same_as_mlx(lambda: ops.fused_binary(a, b, op, "relu"), lambda: ops.binary_reference(a, b, op, "relu"))


@pytest.mark.parametrize("x, scale, shift", [
    (mx.array([250, 255], mx.uint8), 2, 10),
    (mx.array([1, 2], mx.int32), 1.5, 0.0),
    (mx.ones((2, 3), mx.bfloat16), np.float32(1.5), np.float64(-0.25)),
    (mx.ones((2, 3)), True, 0.0),
    (mx.ones((2, 3), mx.float16), mx.array(2.0), np.float32(1.0)),
    (mx.ones((2, 3)), np.array(2.0, np.float32), 0.0),
], ids=str)
def test_fused_scalar_promotes_like_mlx(x, scale, shift):
    _same_as_mlx(lambda: ops.fused_scalar(x, scale, shift, "gelu"),
                 lambda: ops.scalar_reference(x, scale, shift, "gelu"))
    if x.dtype in (mx.float32, mx.float16, mx.bfloat16) and not isinstance(scale, (bool, np.ndarray)):
        assert ops.fused_scalar(x, scale, shift, "gelu").dtype == ops.scalar_reference(x, scale, shift, "gelu").dtype


@pytest.mark.parametrize("family", ["binary", "scalar", "linear"])
def test_relu_at_zero_on_the_metal_kernel_path(metal_shim, family, monkeypatch):
    """On a GPU the forward runs the kernels (executed here through the Metal shim); with
    relu_at_zero=1 the backward must not use the kernels' derivative (0 at 0)."""
    monkeypatch.setenv("MLX_FUSION_LINEAR_EPILOGUE", "kernel")
    relu = lambda z: mx.maximum(0.0, z)  # noqa: E731
    a = mx.array([[0.0, -1.0, 2.0, 0.0, 0.0, 1.0, -2.0, 0.0, 0.0, 3.0, 0.5, 0.0]] * 3)
    if family == "binary":
        args, fused, ref = (a, mx.zeros_like(a)), (lambda a, b: ops.fused_binary(a, b, relu_at_zero=1.0)), \
            (lambda a, b: relu(a + b))
    elif family == "scalar":
        args, fused, ref = (a,), (lambda a: ops.fused_scalar(a, 2.0, 0.0, relu_at_zero=1.0)), (lambda a: relu(a * 2))
    else:  # K = 12 is not a multiple of 8: addmm + the activation kernel
        args = (a, mx.eye(12), mx.zeros((12,)))
        fused, ref = (lambda a, w, b: ops.fused_linear(a, w, b, "relu", relu_at_zero=1.0)), \
            (lambda a, w, b: relu(a @ w.T + b))
    before = metal_shim.launches
    assert mx.array_equal(fused(*args), ref(*args))
    assert metal_shim.launches > before  # the kernel ran the forward
    for gf, gr in zip(grads(fused, args), grads(ref, args)):
        assert mx.array_equal(gf, gr), (gf, gr)
