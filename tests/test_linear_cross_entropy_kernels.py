"""The cross_entropy_rows kernels (metal_src/cross_entropy_rows*.{metal,cu}) executed on the CPU:
CUDA through the host shim, Metal through the Metal shim, each block/threadgroup as cooperative
threads (shuffles, barriers), driven by linear_cross_entropy's own launches
(kernels.use_backend), forward and backward, against the float32 MLX reference."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_fusion import kernels
from mlx_fusion.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

try:
    from tests import _kernel_checks as kc
    from tests.cuda_shim.host import have_compiler

    BLOCK_SHIM = have_compiler()
except ImportError:
    kc, BLOCK_SHIM = None, False

pytestmark = pytest.mark.skipif(not BLOCK_SHIM, reason="needs the block-level shims and a C++ compiler")


@pytest.fixture(autouse=True)
def _references_on_the_cpu():
    """The shims run the kernels on the host, against MLX's CPU code (on a GPU machine the
    default device would make the reference mx.fast.cross_entropy: other rounding, other
    handling of targets outside [0, V))."""
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(prev)

BACKENDS = ("cuda", "metal")
MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOL = {"float32": 2e-5, "float16": 2e-2, "bfloat16": 6e-2}
# (rows, D, V, chunk): V below one warp, partial warps, several warps, V longer than the 256-thread
# block (several passes of the row loop); chunks that do not divide the rows.
SHAPES = [(3, 8, 7, 2), (5, 16, 45, 3), (4, 8, 300, 3), (2, 8, 700, 1)]


def _inputs(rows, d, v, dtype, seed):
    r = kc.rng("lce", rows, d, v, dtype, seed)
    dt = MX[dtype]
    h = mx.array(r.uniform(-2, 2, (rows, d)).astype(np.float32)).astype(dt)
    w = mx.array(r.uniform(-1, 1, (v, d)).astype(np.float32)).astype(dt)
    t = mx.array(r.integers(-v, v, (rows,)).astype(np.int32))  # negative indices wrap, as in MLX
    g = mx.array(r.uniform(-1, 1, (rows,)).astype(np.float32))
    return h, w, t, g


def check_lce(backend, fac, rows, d, v, chunk, dtype, upcast=False, seed=0):
    h, w, t, g = _inputs(rows, d, v, dtype, seed)
    where = f"{backend} {dtype} rows={rows} D={d} V={v} chunk={chunk} upcast={upcast}"

    def loss(fn, **kw):
        return lambda h, w: (fn(h, w, t, upcast=upcast, **kw).astype(mx.float32) * g).sum()

    record = kc.launches(backend)
    before = len(record)
    with kernels.use_backend(backend, fac):
        y = linear_cross_entropy(h, w, t, chunk_size=chunk, upcast=upcast)
        dh, dw = mx.grad(loss(linear_cross_entropy, chunk_size=chunk), argnums=(0, 1))(h, w)
        mx.eval(y, dh, dw)
    names = [kc.launch_name(backend, rec) for rec in record[before:]]
    n_chunks = -(-rows // chunk)
    if (sum(n.endswith("cross_entropy_rows") for n in names) != 2 * n_chunks
            or sum(n.endswith("cross_entropy_rows_backward") for n in names) != n_chunks):
        return [f"{where}: kernels launched: {names}"]
    # The exact side: float32 MLX on the same (rounded) inputs.
    h32, w32 = h.astype(mx.float32), w.astype(mx.float32)
    want = linear_cross_entropy_reference(h32, w32, t)
    wdh, wdw = mx.grad(loss(linear_cross_entropy_reference), argnums=(0, 1))(h32, w32)
    failures = []
    tol = TOL[dtype]  # upcast or not, the logits are a 16-bit GEMM
    for got, ref, what, k in ((y, want, "loss", 1), (dh, wdh, "dh", 4), (dw, wdw, "dW", 4)):
        a, b = (np.array(x.astype(mx.float32)) for x in (got, ref))
        scale = max(1.0, float(np.abs(b).max()))
        bad = ~(np.abs(a - b) <= k * tol * (np.abs(b) + scale))
        if bad.any():
            i = tuple(np.argwhere(bad)[0])
            failures.append(f"{where} {what}: {int(bad.sum())}/{bad.size} off; at {i} got {a[i]} want {b[i]}")
    return failures


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_execute_on_the_shims(backend, dtype):
    fac = kc.factory(backend)
    failures = []
    for rows, d, v, chunk in SHAPES:
        failures += check_lce(backend, fac, rows, d, v, chunk, dtype)
    if dtype != "float32":
        failures += check_lce(backend, fac, 5, 16, 45, 2, dtype, upcast=True)
    assert not failures, "\n".join(failures[:8])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_and_bad_targets_on_the_shims(backend):
    """A NaN logit, an infinite max and a target outside [-V, V) each make their row NaN (loss and
    gradient), as the unfused code's NaN (or, out of range, where MLX reads outside the row)."""
    fac = kc.factory(backend)
    h, w, _, _ = _inputs(4, 8, 40, "float32", 1)
    h = h.at[1, 2].add(float("nan")).at[2, 0].add(float("inf"))
    t = mx.array([3, 4, 5, 40])
    with kernels.use_backend(backend, fac):
        y = linear_cross_entropy(h, w, t, chunk_size=3)
        dh = mx.grad(lambda h: linear_cross_entropy(h, w, t, chunk_size=3).sum())(h)
        mx.eval(y, dh)
    y, dh = np.array(y), np.array(dh)
    assert np.isfinite(y[0]) and np.isnan(y[1:]).all(), y
    assert np.isfinite(dh[0]).all() and np.isnan(dh[3]).all()
    np.testing.assert_allclose(y[0], np.array(linear_cross_entropy_reference(h[:1], w, t[:1]))[0], rtol=1e-5)


# Source edits that must make the checks fail: (kernel, old, new).
MUTANTS = {
    "no rescale on a new max": ("cross_entropy_rows", "s = s * metal::exp(m - x) + 1.0f;", "s = s + 1.0f;"),
    "one warp only": ("cross_entropy_rows", "lane < (nt + 31) / 32;", "lane < 1;"),
    "no target logit": ("cross_entropy_rows", "loss[row] = l - picked;", "loss[row] = l;"),
    "first pass only": ("cross_entropy_rows", "j < V; j += int(nt)) {\n  const float x",
                        "j < V && j < int(nt); j += int(nt)) {\n  const float x"),
    "no one-hot": ("cross_entropy_rows_backward", "(j == target ? p - 1.0f : p)", "p"),
    "no cotangent": ("cross_entropy_rows_backward", "* gr)", ")"),
}
CUDA_SPELLING = {"metal::exp": "expf", "int(nt)) {\n  const float x": "int(nt)) {\n  const float x"}


@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_kernels_fail_the_checks(backend, mutant):
    name, old, new = MUTANTS[mutant]
    if backend == "cuda":
        for a, b in CUDA_SPELLING.items():
            old, new = old.replace(a, b), new.replace(a, b)

    def edit(kernel, header, body):
        if kernel.endswith(name):
            assert old in body, (mutant, backend, kernel)
            body = body.replace(old, new)
        return header, body

    fac = kc.factory(backend, edit)
    failures = []
    for rows, d, v, chunk in [(5, 16, 45, 3), (2, 8, 700, 1)]:
        failures += check_lce(backend, fac, rows, d, v, chunk, "float32", seed=2)
    assert failures, f"{backend} mutant {mutant!r} passed the checks"
