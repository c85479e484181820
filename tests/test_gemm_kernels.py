"""The small-M GEMM kernel `linear_activation` (metal_src/linear_activation.{metal,cu})
executed on the CPU, both sources, through the ops' own launches.

`fused_linear` runs with its kernel backend forced to a CPU shim (tests/_kernel_checks.py):
CUDA through the host shim, whose blocks run as fibers with `mma.sync` m16n8k16 executed
per the PTX fragment layout; Metal through the Metal shim, whose threadgroups run as fibers
with `simd_sum` across each simdgroup. Both outputs of the kernel, z = x @ w.T + b and
act(z), are compared with a float64 NumPy product of the same (rounded) inputs, allowing one
rounding to the output dtype plus float32 accumulation-order differences.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_fusion import kernels
from mlx_fusion.kernels import KERNEL_SPECS
from mlx_fusion.ops import fused_linear, linear_reference
from mlx_fusion.patterns import Activation
from tests import _kernel_checks as kc
from tests.cuda_shim.host import CXX, have_compiler

pytestmark = pytest.mark.skipif(not have_compiler(), reason=f"{CXX} is not on PATH")

SPEC = KERNEL_SPECS["linear_activation"]
DTYPES = tuple(SPEC.dtypes)  # what the ops instantiate (float16, bfloat16)
# (K, N): K a multiple of 8 (the small-M path's condition) but of no tile: 72 (< one 32-wide
# chunk per warp beyond the first), 264 (a partial chunk), 1064 (> 8 warps x 32 x U = 1024:
# the outer K loop iterates); N = 1 / 13 / 37 / 70: partial column tiles, several blocks.
SWEEP = (72, 13)
SOME_M = (1, 2, 8, 15, 16, 17, 24, 31, 32)
SHAPES = {(8, 1): SOME_M, (264, 37): SOME_M, (1064, 70): (1, 17, 32)}  # (K, N): M values


@pytest.fixture(scope="module", params=kc.BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("act", list(Activation), ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_activation_kernel(backend, dtype, act, bias):
    """M = 1..32 (one and two 16-row tiles, every partial tile), plus larger K and N."""
    fac = kc.factory(backend)
    failures = []
    for m in range(1, 33):
        failures += kc.check_linear(backend, fac, m, *SWEEP, dtype, act, bias)
    for (k, n), ms in SHAPES.items():
        for m in ms:
            failures += kc.check_linear(backend, fac, m, k, n, dtype, act, bias)
    assert not failures, "\n".join(failures[:12])


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_activation_misaligned_rows(backend, dtype):
    """x starting one element into its buffer: the CUDA kernel's element-load path."""
    fac = kc.factory(backend)
    failures = []
    for m, k, n in [(1, 264, 37), (5, 8, 13), (17, 1064, 70), (32, 72, 13)]:
        failures += kc.check_linear(backend, fac, m, k, n, dtype, Activation.GELU, True, misaligned=True)
    assert not failures, "\n".join(failures[:12])


def test_both_tilings_run(backend):
    """The op launches both (MT, NT) tilings, with and without bias, and only values the
    spec lists (so the source tests compiled what runs)."""
    fac = kc.factory(backend)
    launches = kc.launches(backend)
    before = len(launches)
    for m in (4, 20):
        for bias in (False, True):
            assert not kc.check_linear(backend, fac, m, 264, 37, "float16", Activation.RELU, bias)
    seen = {kc.launch_template(backend, rec) for rec in launches[before:]}
    assert {(t["MT"], t["HAS_BIAS"]) for t in map(dict, seen)} == {(1, False), (1, True), (2, False), (2, True)}
    allowed = dict(SPEC.templates)
    for t in seen:
        assert all(v in allowed[name] for name, v in t), t


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_gradients_through_the_kernel(backend, dtype):
    """Values and gradients of fused_linear whose forward is the small-M kernel, against the
    unfused expression (the backward is MLX's, from the kernel's z or, for ReLU, its output)."""
    dt = kc.MX_DTYPES[dtype]
    r = kc.rng("grads", dtype)
    x = mx.array(r.uniform(-1, 1, (6, 48)).astype("float32")).astype(dt)
    w = mx.array(r.uniform(-0.3, 0.3, (13, 48)).astype("float32")).astype(dt)
    b = mx.array(r.uniform(-1, 1, (13,)).astype("float32")).astype(dt)
    cot = mx.array(r.uniform(-1, 1, (6, 13)).astype("float32"))
    tol = 2 * kc.ELEMENTWISE_TOL[dtype]
    record = kc.launches(backend)
    for act in Activation:
        def loss(fn, *args):
            return (fn(*args, act).astype(mx.float32) * cot).sum()

        before = len(record)
        with kernels.use_backend(backend, kc.factory(backend)):
            got = mx.grad(lambda *a: loss(fused_linear, *a), argnums=(0, 1, 2))(x, w, b)
            y = fused_linear(x, w, b, act)
        assert any("linear_activation" in kc.launch_name(backend, rec) for rec in record[before:])
        want = mx.grad(lambda *a: loss(linear_reference, *a), argnums=(0, 1, 2))(x, w, b)
        ref = linear_reference(x, w, b, act)
        for g, wg, what in zip((y, *got), (ref, *want), ("value", "dx", "dw", "db")):
            g, wg = (t.astype(mx.float32) for t in (g, wg))
            scale = max(1.0, float(mx.abs(wg).max()))
            assert mx.allclose(g, wg, rtol=tol, atol=tol * scale).item(), (act, what)
