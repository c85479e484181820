"""Residual add + LayerNorm (mlx_fusion/ops/add_layer_norm.py, part of the add_norm definition):
the op, its rules, and its kernels executed on the CPU through the block-level shims. Helpers and
the shim guard are shared with tests/test_add_norm.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_fusion import kernels
from mlx_fusion.graph.ir import Graph, Node, Value
from mlx_fusion.ops.add_norm import add_layer_norm_reference, fused_add_layer_norm
from tests._graphs import optimizer, trace_graph
from tests.test_add_norm import (BACKENDS, DTYPES, SHIM_DTYPES, SHIM_SHAPES, TOL, _close, _inputs, _loss, kc,
                                 needs_block_shim)

def _layer_inputs(shape, dtype, seed=0, scale=1.0):
    x, r, w = _inputs(shape, dtype, seed, scale)
    b = (0.5 * mx.random.normal(shape[-1:], key=mx.random.key(seed + 100))).astype(dtype)
    return x, r, w, b


def _layer_loss(fn, eps, has_w=True, has_b=True):
    """_loss for fn(x, r, w, b, eps) over the arrays present: (x, r[, w][, b])."""

    def loss(x, r, *vs):
        vs = list(vs)
        w = vs.pop(0) if has_w else None
        b = vs.pop(0) if has_b else None
        return _loss(lambda x, r, _, eps: fn(x, r, w, b, eps), eps)(x, r)

    return loss


def check_layer_op(x, r, w, b, eps, tol):
    for g, want, what in zip(fused_add_layer_norm(x, r, w, b, eps), add_layer_norm_reference(x, r, w, b, eps), "hy"):
        _close(g, want, tol, what)
    args = (x, r) + tuple(t for t in (w, b) if t is not None)
    argnums = tuple(range(len(args)))
    gf = mx.grad(_layer_loss(fused_add_layer_norm, eps, w is not None, b is not None), argnums=argnums)(*args)
    gr = mx.grad(_layer_loss(add_layer_norm_reference, eps, w is not None, b is not None), argnums=argnums)(*args)
    for g, want in zip(gf, gr):
        _close(g, want, 4 * tol, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 13), (2, 3, 64)], ids=str)
def test_layer_norm_values_and_grads(shape, dtype):
    x, r, w, b = _layer_inputs(shape, dtype)
    check_layer_op(x, r, w, b, 1e-5, TOL[dtype])
    check_layer_op(x, r, None, b, 0.1, TOL[dtype])
    check_layer_op(x, r, w, None, 1e-6, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 100)], ids=str)
def test_add_layer_norm_is_not_searched_for_until_verified_on_a_gpu(shape, dtype):
    """Its kernels gave wrong gradients and a faulting launch on an H200 (docs/add-norm.md):
    fuse() leaves the CPU and GPU spellings of add + layer_norm alone, and the op itself runs
    MLX's code on a real device (the shims below still execute the kernels)."""
    args = _layer_inputs(shape, dtype)
    fn = lambda x, r, w, b: (x + r, mx.fast.layer_norm(x + r, w, b, 1e-5))  # noqa: E731
    assert optimizer().detect_opportunities(trace_graph(fn, *args)) == []
    x, r, w, b = Value("x", (3, 16), dtype), Value("r", (3, 16), dtype), Value("w", (16,), dtype), Value("b", (16,), dtype)
    h, y = Value("h", (3, 16), dtype), Value("y", (3, 16), dtype)
    g = Graph([x, r, w, b], [h, y], [Node(0, "Add", [x, r], [h]), Node(1, "LayerNorm", [h, w, b], [y], (1e-5,))])
    assert optimizer().optimize(g).by_pattern == {}
    for got, want in zip(fused_add_layer_norm(*args, eps=1e-5), add_layer_norm_reference(*args, eps=1e-5)):
        assert mx.array_equal(got, want).item()


def check_add_layer_norm(backend, fac, shape, dtype, eps, has_w=True, has_b=True):
    """check_add_rms_norm for add + LayerNorm (mean and rstd checked against NumPy)."""
    dt = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    x, r, w, b = _layer_inputs(shape, dt, seed=shape[-1], scale=0.3 if eps >= 0.1 else 1.0)
    w, b = (w if has_w else None), (b if has_b else None)
    args = (x, r) + tuple(t for t in (w, b) if t is not None)
    argnums = tuple(range(len(args)))
    where = f"{backend} {dtype} {shape} eps={eps} layer_norm w={has_w} b={has_b}"
    record = kc.launches(backend)
    before = len(record)
    with kernels.use_backend(backend, fac):
        h, y = fused_add_layer_norm(x, r, w, b, eps)
        grads = mx.grad(_layer_loss(fused_add_layer_norm, eps, has_w, has_b), argnums=argnums)(*args)
        mx.eval(h, y, grads)
    names = [kc.launch_name(backend, rec) for rec in record[before:]]
    if not any(n.endswith("add_layer_norm") for n in names) or not any("layer_norm_backward" in n for n in names):
        return [f"{where}: kernels launched: {names}"]
    failures = []
    want_h, want_y = add_layer_norm_reference(x, r, w, b, eps)
    if not mx.array_equal(h, want_h).item():
        failures.append(f"{where}: h is not x + r rounded as MLX rounds it")
    fwd = next(kc._launch_outputs(backend, rec)[1] for rec in record[before:]
               if kc.launch_name(backend, rec).endswith("add_layer_norm"))
    h64 = np.array(want_h.astype(mx.float32)).astype(np.float64).reshape(-1, shape[-1])
    mean = h64.mean(axis=-1)
    rstd = 1 / np.sqrt(((h64 - mean[:, None]) ** 2).mean(axis=-1) + np.float32(eps))
    if not np.allclose(fwd[2], mean, rtol=1e-5, atol=1e-6) or not np.allclose(fwd[3], rstd, rtol=1e-5, atol=0):
        failures.append(f"{where}: mean or rstd off")
    want_g = mx.grad(_layer_loss(add_layer_norm_reference, eps, has_w, has_b), argnums=argnums)(*args)
    tol = TOL[dt]
    for got, want, what in [(y, want_y, "y")] + list(zip(grads, want_g, ("dx", "dr", "dv0", "dv1"))):
        g, ww = (np.array(t.astype(mx.float32)) for t in (got, want))
        t = tol if what == "y" else 4 * tol
        bad = ~(np.abs(g - ww) <= t * np.abs(ww) + t * max(1.0, float(np.abs(ww).max())))
        if bad.any():
            failures.append(f"{where} {what}: {int(bad.sum())}/{bad.size} off")
    return failures


@needs_block_shim
@pytest.mark.parametrize("dtype", SHIM_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_kernels_execute_on_the_shims(backend, dtype):
    fac = kc.factory(backend)
    failures = []
    for shape, eps in SHIM_SHAPES:
        failures += check_add_layer_norm(backend, fac, shape, dtype, eps)
    failures += check_add_layer_norm(backend, fac, (3, 40), dtype, 1e-5, has_w=False)
    failures += check_add_layer_norm(backend, fac, (3, 40), dtype, 1e-5, has_b=False)
    assert not failures, "\n".join(failures[:8])


LAYER_MUTANTS = {
    "no eps": ("add_layer_norm", "+ float(e[0])", ""),
    "no residual": ("add_layer_norm", " + float(r[base + i])", ""),
    "variance about zero": ("add_layer_norm", "const float c = float(h[base + i]) - mu;",
                            "const float c = float(h[base + i]);"),
    "no bias": ("add_layer_norm", "HAS_BIAS ? ", "false ? "),
    "no mean(g) term": ("add_layer_norm_backward", "(g - mean_g - n * mean_gn)", "(g - n * mean_gn)"),
}


@needs_block_shim
@pytest.mark.parametrize("mutant", list(LAYER_MUTANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_layer_norm_kernels_fail_the_checks(backend, mutant):
    name, old, new = LAYER_MUTANTS[mutant]

    def edit(kernel, header, body):
        if kernel.endswith(name):
            assert old in body, (mutant, kernel)
            body = body.replace(old, new)
        return header, body

    fac = kc.factory(backend, edit)
    assert check_add_layer_norm(backend, fac, (3, 300), "float32", 0.5), f"{backend} mutant {mutant!r} passed"
