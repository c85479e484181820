"""Fused primitives vs their unfused MLX references: values and gradients.

Runs on whatever backend MLX has by default: the CPU path here and in CI, the
CUDA kernels on an NVIDIA GPU, the Metal kernels on a Mac (docs/testing.md).
The Metal sources are also run on the CPU through the shim in
test_metal_sources.py.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_fusion import kernels, ops
from mlx_fusion.ops import FUSED_OPS, cases
from mlx_fusion.patterns import Activation, BinaryOp

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# (rtol, atol) for values and gradients per dtype: the fused kernels compute in
# float32 and round once, the reference rounds after every op.
TOL = {mx.float32: (1e-5, 1e-5), mx.float16: (1e-2, 1e-2), mx.bfloat16: (4e-2, 4e-2)}
GRAD_TOL = {mx.float32: (1e-4, 1e-4), mx.float16: (2e-2, 2e-2), mx.bfloat16: (6e-2, 6e-2)}

ids = lambda c: c.name  # noqa: E731


def assert_close(x, y, tol, what=""):
    assert x.shape == y.shape, f"{what}: shape {x.shape} != {y.shape}"
    assert x.dtype == y.dtype, f"{what}: dtype {x.dtype} != {y.dtype}"
    a = np.array(x.astype(mx.float32))
    b = np.array(y.astype(mx.float32))
    np.testing.assert_allclose(a, b, rtol=tol[0], atol=tol[1], err_msg=what)


def check_against_reference(fused, reference, args, dtype, grads_too=True, what=""):
    """Values (and gradients) of `fused` vs `reference` on `args`.

    float32: directly, to tight tolerances. float16/bfloat16: the unfused
    reference rounds after every op, so it is no ground truth either; both are
    compared with the float32 computation on the same (upcast) inputs, and the
    fused result may be off by at most the reference's own error plus the
    dtype's tolerance.
    """
    outs = [(fused(*args), reference(*args), "values", TOL)]
    if grads_too:
        outs += [(gf, gr, f"grad {i}", GRAD_TOL)
                 for i, (gf, gr) in enumerate(zip(grads(fused, args), grads(reference, args)))]
    if dtype == mx.float32:
        for f, r, name, tol in outs:
            assert_close(f, r, tol[dtype], f"{what} {name}")
        return
    up = [a.astype(mx.float32) for a in args]
    exact = [reference(*up)] + (list(grads(reference, up)) if grads_too else [])
    for (f, r, name, tol), e in zip(outs, exact):
        assert f.shape == r.shape and f.dtype == r.dtype, (what, name, f.dtype, r.dtype)
        f, r, e = (np.array(t.astype(mx.float32)) for t in (f, r, e))
        rtol, atol = tol[dtype]
        bound = np.abs(r - e) + atol + rtol * np.abs(e)
        bad = ~(np.abs(f - e) <= bound) & ~(np.isnan(e) & np.isnan(f))
        assert not bad.any(), f"{what} {name}: {bad.sum()} elements off, e.g. fused {f[bad][:3]} exact {e[bad][:3]} reference {r[bad][:3]}"


def weighted_sum(fn):
    """A scalar loss with a non-uniform cotangent, so wrong gradient routing shows."""

    def loss(*args):
        y = fn(*args)
        w = mx.cos(mx.arange(y.size, dtype=mx.float32).reshape(y.shape)).astype(y.dtype)
        return (y * w).astype(mx.float32).sum()

    return loss


def grads(fn, args):
    g = mx.grad(weighted_sum(fn), argnums=tuple(range(len(args))))(*args)
    return (g,) if isinstance(g, mx.array) else tuple(g)


def shape_for(case, size="small"):
    if case.kind == "linear":
        return (6, 12, 10) if size == "small" else (33, 64, 48)
    return (4, 9) if size == "small" else (3, 37, 41)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSED_OPS, ids=ids)
def test_values_and_grads_match_reference(case, dtype):
    args = case.make_inputs(shape_for(case, "large"), dtype, key=mx.random.key(1))
    check_against_reference(case.fused, case.reference, args, dtype, what=case.name)


@pytest.mark.parametrize("case", FUSED_OPS, ids=ids)
def test_grads_match_finite_differences(case):
    """Fused gradients (on the default device) vs central differences of the
    unfused expression in float64 on the CPU, so GPU matmul precision (TF32)
    does not blur the reference side."""
    args = [a.astype(mx.float32) for a in case.make_inputs(shape_for(case), key=mx.random.key(2))]
    analytic = grads(case.fused, args)
    eps = 1e-4
    rng = np.random.default_rng(0)
    for i, a in enumerate(args):
        base = np.array(a, dtype=np.float64)
        for idx in rng.choice(base.size, size=min(5, base.size), replace=False):
            pos = np.unravel_index(idx, base.shape)
            z = _pre_activation(case, args, i, pos)
            if z is not None and abs(z) < 1e-2:
                continue  # relu's kink: finite differences are meaningless there
            hi, lo = base.copy(), base.copy()
            hi[pos] += eps
            lo[pos] -= eps
            fd = (_loss64(case, args, i, hi) - _loss64(case, args, i, lo)) / (2 * eps)
            got = float(np.array(analytic[i])[pos])
            assert math.isclose(got, fd, rel_tol=1e-2, abs_tol=1e-2), (case.name, i, pos, got, fd)


def _loss64(case, args, i, value):
    with mx.stream(mx.cpu):
        new = [mx.array(np.array(a, dtype=np.float64)) for a in args]
        new[i] = mx.array(value)
        y = case.reference(*new)
        w = mx.cos(mx.arange(y.size, dtype=mx.float32).reshape(y.shape)).astype(mx.float64)
        return float((y * w).sum().item())


def _pre_activation(case, args, i, pos):
    """Only elementwise relu cases have a kink that a single input element controls."""
    act = getattr(case.pattern, "activation", None)
    if act is not Activation.RELU or case.kind == "linear":
        return None
    if case.kind == "scalar":
        return float(np.array(args[0])[pos]) * 1.5 - 0.25
    z = case.pattern.binary_op.reference(args[0], args[1])
    return float(np.array(z)[pos])


BROADCASTS = [
    ((5, 7), (7,)),  # bias row
    ((5, 7), (5, 1)),  # column
    ((5, 7), (1, 7)),
    ((5, 7), ()),  # 0-d
    ((5, 7), (1,)),  # one-element
    ((7,), (5, 7)),  # the small operand first
    ((3, 1, 7), (1, 4, 7)),  # both broadcast
    ((2, 3, 4, 5), (3, 1, 5)),
    ((), ()),  # 0-d result
    ((1,), ()),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("case", cases("binary"), ids=ids)
def test_binary_broadcasting(case, shapes, dtype):
    k1, k2 = mx.random.split(mx.random.key(3))
    a = mx.random.normal(shapes[0], key=k1).astype(dtype)
    b = (mx.random.uniform(0.5, 2.0, shapes[1], key=k2)).astype(dtype)
    check_against_reference(case.fused, case.reference, [a, b], dtype, what=case.name)


@pytest.mark.parametrize("case", FUSED_OPS, ids=ids)
def test_non_contiguous_inputs(case):
    """Transposed and strided views read the same elements as MLX does."""
    if case.kind == "linear":
        x, w, *b = case.make_inputs((9, 8, 6), key=mx.random.key(4))
        xt = mx.random.normal((8, 9), key=mx.random.key(5)).T  # (9, 8), transposed view
        wt = mx.random.normal((8, 6), key=mx.random.key(6)).T  # (6, 8) transposed weight
        for args in ([xt, w, *b], [x, wt, *b]):
            assert_close(case.fused(*args), case.reference(*args), TOL[mx.float32], "values")
            for gf, gr in zip(grads(case.fused, args), grads(case.reference, args)):
                assert_close(gf, gr, GRAD_TOL[mx.float32], "grads")
        return
    base = mx.random.normal((12, 10), key=mx.random.key(7))
    views = [base.T, base[::2, 1::3], base[:, ::-1][::3]]
    for v in views:
        other = mx.random.uniform(0.5, 2, v.shape[::-1], key=mx.random.key(8)).T  # non-contiguous too
        args = [v] if case.kind == "scalar" else [v, other]
        assert_close(case.fused(*args), case.reference(*args), TOL[mx.float32], "values")
        for gf, gr in zip(grads(case.fused, args), grads(case.reference, args)):
            assert_close(gf, gr, GRAD_TOL[mx.float32], "grads")


@pytest.mark.parametrize("case", FUSED_OPS, ids=ids)
def test_empty_arrays(case):
    if case.kind == "linear":
        # Compared with NumPy: MLX 0.32.4's own CUDA matmul segfaults on some empty
        # products, so the unfused reference cannot run there.
        for xs, ws in [((0, 8), (5, 8)), ((3, 0), (5, 0)), ((3, 8), (0, 8))]:
            args = [mx.zeros(xs), mx.ones(ws)] + ([mx.full((ws[0],), 0.5)] if case.pattern.has_bias else [])
            y = case.fused(*args)
            ref = np.zeros((xs[0], ws[0]), np.float32) + (0.5 if case.pattern.has_bias else 0.0)
            act = case.pattern.activation
            want = np.array(act.reference(mx.array(ref))) if act is not None else ref
            assert y.shape == ref.shape and y.dtype == mx.float32
            np.testing.assert_allclose(np.array(y), want, rtol=1e-6)
            g = grads(case.fused, args)
            assert [t.shape for t in g] == [t.shape for t in args]
        return
    if case.kind == "linear_cross_entropy":  # no tokens: MLX's logsumexp refuses an empty array, and so does the op
        args = [mx.zeros((0, 8)), mx.ones((5, 8))]
        with pytest.raises(ValueError, match="empty"):
            case.reference(*args)
        with pytest.raises(ValueError, match="empty"):
            case.fused(*args)
        return
    args = [mx.zeros((0, 4))] if case.kind == "scalar" else [mx.zeros((0, 4)), mx.ones((4,))]
    y = case.fused(*args)
    assert y.shape == (0, 4) and y.dtype == mx.float32
    g = grads(case.fused, args)
    assert [t.shape for t in g] == [t.shape for t in args]


def test_zero_d_scalar_op():
    x = mx.array(-0.7)
    y = ops.fused_scalar(x, 2.0, 1.0, "relu")
    assert y.shape == () and y.item() == 0.0
    assert mx.grad(lambda t: ops.fused_scalar(t, 2.0, 1.0, "silu"))(x).shape == ()


SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 3.0, -3.0]


@pytest.mark.parametrize("case", cases("binary") + cases("scalar"), ids=ids)
def test_nan_inf_propagate_like_reference(case):
    vals = mx.array(SPECIALS)
    a = mx.broadcast_to(vals[:, None], (len(SPECIALS), len(SPECIALS)))
    b = mx.broadcast_to(vals[None, :], a.shape)
    args = [a] if case.kind == "scalar" else [a, b]
    y, r = np.array(case.fused(*args)), np.array(case.reference(*args))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(r))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(r))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(r))
    finite = np.isfinite(r)
    np.testing.assert_allclose(y[finite], r[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", cases("binary") + cases("scalar"), ids=ids)
def test_nan_gradients_propagate(case):
    a = mx.array([float("nan"), 1.0, -2.0])
    b = mx.array([1.0, float("nan"), 0.5])
    args = [a] if case.kind == "scalar" else [a, b]
    for gf, gr in zip(grads(case.fused, args), grads(case.reference, args)):
        np.testing.assert_array_equal(np.isnan(np.array(gf)), np.isnan(np.array(gr)))


def kernel_launches(fn, args) -> list:
    """Names of the mlx-fusion GPU kernels fn(*args) runs. (Linear at large M uses MLX's
    own elementwise code on a GPU, see ops/linear.py; on the CPU nothing does.)"""
    launched = []
    real = kernels.get_kernel
    kernels.clear_launches()  # cached launches hold their kernel: make every launch ask again
    kernels.get_kernel = lambda name: launched.append(name) or real(name)
    try:
        mx.eval(fn(*args))
    finally:
        kernels.get_kernel = real
        kernels.clear_launches()
    return launched


@pytest.mark.parametrize("case", FUSED_OPS, ids=ids)
def test_jvp_and_vmap(case):
    args = case.make_inputs(shape_for(case), key=mx.random.key(9))
    tangents = [mx.ones_like(a) * 0.5 for a in args]
    (_,), (tf,) = mx.jvp(case.fused, args, tangents)
    (_,), (tr,) = mx.jvp(case.reference, args, tangents)
    assert_close(tf, tr, GRAD_TOL[mx.float32], "jvp")
    batched = [mx.stack([a, a * 0.5 + 0.1, -a]) for a in args]
    if kernel_launches(case.fused, args):
        # Known limitation (docs/ops.md): MLX 0.32's vmap walks into a custom_function's
        # forward graph, and a CustomKernel there has no vmap rule of its own.
        with pytest.raises(ValueError, match="vmap"):
            mx.eval(mx.vmap(case.fused)(*batched))
        return
    vf = mx.vmap(case.fused)(*batched)
    vr = mx.vmap(case.reference)(*batched)
    assert_close(vf, vr, TOL[mx.float32], "vmap")


@pytest.mark.parametrize("case", FUSED_OPS, ids=ids)
def test_inside_compile(case):
    args = case.make_inputs(shape_for(case), key=mx.random.key(10))
    f = mx.compile(lambda *a: case.fused(*a))
    g = mx.compile(lambda *a: grads(case.fused, a))
    assert_close(f(*args), case.reference(*args), TOL[mx.float32], "compiled values")
    for gf, gr in zip(g(*args), grads(case.reference, args)):
        assert_close(gf, gr, GRAD_TOL[mx.float32], "compiled grads")


def test_mixed_dtypes_promote_like_mlx():
    a = mx.random.normal((4, 5)).astype(mx.float16)
    b = mx.random.normal((5,))
    y = ops.fused_binary(a, b, "mul", "gelu")
    r = ops.binary_reference(a, b, "mul", "gelu")
    assert y.dtype == r.dtype == mx.float32
    assert_close(y, r, TOL[mx.float32])
    ga = mx.grad(lambda t: ops.fused_binary(t, b, "mul", "gelu").sum())(a)
    assert ga.dtype == mx.float16
    # Python numbers are weakly typed.
    assert ops.fused_binary(a, 2.0, "add", "relu").dtype == mx.float16
    assert ops.fused_scalar(a, 2.0, 1.0).dtype == mx.float16
    assert ops.fused_scalar(a, mx.array(2.0), 1.0).dtype == mx.float32


def test_scalar_array_params_get_gradients():
    x = mx.random.normal((6, 7))
    s, t = mx.array(1.3), mx.array(-0.2)
    gf = mx.grad(weighted_sum(lambda x, s, t: ops.fused_scalar(x, s, t, "gelu")), argnums=(0, 1, 2))(x, s, t)
    gr = mx.grad(weighted_sum(lambda x, s, t: ops.scalar_reference(x, s, t, "gelu")), argnums=(0, 1, 2))(x, s, t)
    for a, b in zip(gf, gr):
        assert_close(a, b, (1e-4, 1e-4))


@pytest.mark.parametrize("dtype", [mx.int32, mx.bool_, mx.complex64], ids=str)
def test_unsupported_dtypes_run_unfused(dtype):
    a = mx.array([[1, -2, 3]]).astype(dtype)
    b = mx.array([[2, 2, -5]]).astype(dtype)
    for op in ("add", "mul"):
        try:
            r = ops.binary_reference(a, b, op, "relu")
        except Exception as e:  # MLX itself refuses (e.g. maximum on complex): so must we
            with pytest.raises(type(e)):
                ops.fused_binary(a, b, op, "relu")
            continue
        y = ops.fused_binary(a, b, op, "relu")
        assert y.dtype == r.dtype and np.array_equal(np.array(y), np.array(r))


def test_float64_on_cpu_runs_unfused():
    a = mx.array([1.0, -2.0], dtype=mx.float64)
    with mx.stream(mx.cpu):
        y = ops.fused_binary(a, a, "add", "relu")
        assert y.dtype == mx.float64
        assert np.array(y).tolist() == [2.0, 0.0]


def test_shape_mismatch_raises_mlx_error():
    a, b = mx.zeros((3, 2)), mx.zeros((4,))
    with pytest.raises(ValueError) as mine:
        ops.fused_binary(a, b)
    with pytest.raises(ValueError) as theirs:
        mx.add(a, b)
    assert str(mine.value) == str(theirs.value)
    with pytest.raises(ValueError):
        ops.fused_linear(mx.zeros((3, 5)), mx.zeros((4, 6)), None, "relu")


def test_bad_arguments():
    x = mx.zeros((2, 2))
    with pytest.raises(ValueError, match="unknown activation"):
        ops.fused_binary(x, x, "add", "tanh-ish")
    with pytest.raises(ValueError, match="unknown binary op"):
        ops.fused_binary(x, x, "pow", "relu")
    with pytest.raises(ValueError, match="scalars"):
        ops.fused_scalar(x, mx.ones((2,)), 0.0)
    with pytest.raises(TypeError):
        ops.fused_scalar(x, "2", 0.0)
    with pytest.raises(TypeError):
        ops.fused_linear(x, [[1.0]])


def test_enums_and_strings_are_equivalent():
    x = mx.random.normal((3, 4))
    assert mx.array_equal(ops.fused_binary(x, x, BinaryOp.MUL, Activation.SILU), ops.fused_binary(x, x, "mul", "silu"))


def test_linear_leading_dims_and_1d():
    w, b = mx.random.normal((5, 4)), mx.random.normal((5,))
    for shape in [(4,), (2, 3, 4), (2, 1, 3, 4)]:
        x = mx.random.normal(shape)
        y = ops.fused_linear(x, w, b, "gelu")
        assert_close(y, ops.linear_reference(x, w, b, "gelu"), TOL[mx.float32])
        assert y.shape == shape[:-1] + (5,)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=4),
    drop=st.lists(st.booleans(), min_size=4, max_size=4),
    lead=st.integers(0, 2),
    op=st.sampled_from(list(BinaryOp)),
    act=st.sampled_from(list(Activation)),
    dtype=st.sampled_from(DTYPES),
    swap=st.booleans(),
)
def test_binary_property(shape, drop, lead, op, act, dtype, swap):
    """Random broadcast pairs: b drops leading dims and squeezes some to 1."""
    shape = tuple(shape)
    b_shape = tuple(1 if d else s for s, d in zip(shape, drop))[lead:]
    a_shape = shape
    if swap:
        a_shape, b_shape = b_shape, a_shape
    k1, k2 = mx.random.split(mx.random.key(len(shape) * 31 + lead))
    a = mx.random.normal(a_shape, key=k1).astype(dtype)
    b = mx.random.uniform(0.5, 2.0, b_shape, key=k2).astype(dtype)
    f = lambda a, b: ops.fused_binary(a, b, op, act)  # noqa: E731
    r = lambda a, b: ops.binary_reference(a, b, op, act)  # noqa: E731
    check_against_reference(f, r, [a, b], dtype)


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 17), k=st.integers(1, 33), n=st.integers(1, 17),
    act=st.sampled_from(list(Activation) + [None]), bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_linear_property(m, k, n, act, bias, dtype):
    keys = mx.random.split(mx.random.key(m * 1000 + k * 10 + n), 3)
    x = mx.random.normal((m, k), key=keys[0]).astype(dtype)
    w = (mx.random.normal((n, k), key=keys[1]) / math.sqrt(k)).astype(dtype)
    b = mx.random.normal((n,), key=keys[2]).astype(dtype) if bias else None
    f = lambda *a: ops.fused_linear(a[0], a[1], a[2] if bias else None, act)  # noqa: E731
    r = lambda *a: ops.linear_reference(a[0], a[1], a[2] if bias else None, act)  # noqa: E731
    args = [x, w] + ([b] if bias else [])
    check_against_reference(f, r, args, dtype)


# Shapes for the small-M kernel (linear_activation, on a GPU): M around the 16-row
# tiles, K a multiple of 8 with full and partial 256-wide chunks, N around the
# 16-column blocks. On the CPU they exercise the CPU path like any other shape.
SMALL_M_SHAPES = [(1, 8, 1), (1, 4096, 40), (5, 40, 13), (16, 64, 16), (17, 200, 33), (32, 512, 100),
                  (33, 24, 7), (64, 136, 24)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", list(Activation), ids=lambda a: a.value)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n", SMALL_M_SHAPES, ids=str)
def test_linear_small_m(m, k, n, dtype, act, bias):
    from mlx_fusion.ops import linear as linear_mod

    keys = mx.random.split(mx.random.key(m * 7 + k + n), 3)
    x = mx.random.normal((m, k), key=keys[0]).astype(dtype)
    w = (mx.random.normal((n, k), key=keys[1]) / math.sqrt(k)).astype(dtype)
    b = mx.random.normal((n,), key=keys[2]).astype(dtype) if bias else None
    f = lambda *a: ops.fused_linear(a[0], a[1], a[2] if bias else None, act)  # noqa: E731
    r = lambda *a: ops.linear_reference(a[0], a[1], a[2] if bias else None, act)  # noqa: E731
    args = [x, w] + ([b] if bias else [])
    check_against_reference(f, r, args, dtype)
    if kernels.kernel_backend() is not None:
        assert ("linear_activation" in kernel_launches(f, args)) == linear_mod.small_m_eligible(m, k, dtype)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_linear_small_m_unaligned_rows(dtype):
    """x and w starting one element into their buffers (not 16-byte aligned)."""
    x = mx.random.normal((3 * 24 + 1,), key=mx.random.key(1)).astype(dtype)[1:].reshape(3, 24)
    w = (mx.random.normal((10 * 24 + 1,), key=mx.random.key(2)) / 5).astype(dtype)[1:].reshape(10, 24)
    b = mx.random.normal((10,), key=mx.random.key(3)).astype(dtype)
    # Values only, reference on aligned copies: MLX 0.32.4's CUDA matmul (cuBLASLt)
    # fails on such views itself (status 15), in the reference and in any backward.
    check_against_reference(lambda *a: ops.fused_linear(*a, "silu"),
                            lambda *a: ops.linear_reference(*(t + 0 for t in a), "silu"), [x, w, b], dtype,
                            grads_too=False)


def test_small_m_eligibility():
    from mlx_fusion.ops.linear import SMALL_M_ROWS, small_m_eligible

    assert small_m_eligible(1, 4096, mx.bfloat16) == (SMALL_M_ROWS >= 1)
    assert not small_m_eligible(1, 4095, mx.bfloat16)  # rows must be whole 16-byte vectors
    assert not small_m_eligible(1, 4096, mx.float32)  # tensor-core tiles take 16-bit inputs
    assert not small_m_eligible(33, 4096, mx.float16)  # two 16-row tiles at most
    assert not small_m_eligible(0, 4096, mx.float16)


@pytest.mark.skipif(kernels.kernel_backend() is None, reason="GPU kernels only: 2^31 + 32 elements, ~25 GiB")
def test_indexing_beyond_2_31_elements():
    """64-bit indexing: an output of 2^31 + 32 bfloat16 elements with a row-broadcast
    operand (element i reads b[i % 16]); rows past 2^31 / 16 are checked exactly."""
    rows = 2**27 + 2  # x 16 columns = 2^31 + 32 elements
    a = ((mx.arange(rows, dtype=mx.int32) % 251)[:, None] + mx.arange(16, dtype=mx.int32)) % 251
    a = a.astype(mx.bfloat16)  # small integers: exact in bfloat16
    b = -(mx.arange(16, dtype=mx.int32) * 16).astype(mx.bfloat16)
    mx.eval(a, b)
    out = ops.fused_binary(a, b, "add", "relu")
    scaled = ops.fused_scalar(a, 2.0, -100.0, "relu")
    mx.eval(out, scaled)
    for lo in (0, 2**27 - 3, rows - 3):  # first rows, rows around element 2^31, last rows
        sl = slice(lo, lo + 3)
        assert mx.array_equal(out[sl], mx.maximum(a[sl] + b, 0)), lo
        assert mx.array_equal(scaled[sl], mx.maximum(a[sl] * 2 - 100, 0)), lo
