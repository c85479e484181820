"""Residual add + RMSNorm (mlx_fusion/ops/add_norm.py): the op, its rules, a tiny mlx-lm llama,
and its kernels executed on the CPU through the block-level shims.

The registry tests (tests/test_ops.py -k norm) see the case's packed output ``y + h / 2``;
here both outputs are checked separately, with different cotangents.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_fusion import fuse, fusion_config, kernels
from mlx_fusion.graph.interpreter import run_graph
from mlx_fusion.graph.ir import Graph, Node, Value
from mlx_fusion.ops.add_norm import ADD_RMS_NORM, add_rms_norm_reference, fused_add_rms_norm
from tests._graphs import found, optimizer, trace_graph

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
TOL = {mx.float32: 2e-5, mx.float16: 2e-2, mx.bfloat16: 5e-2}


def _inputs(shape, dtype, seed=0, scale=1.0):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    x = (scale * mx.random.normal(shape, key=k1)).astype(dtype)
    r = (scale * mx.random.normal(shape, key=k2)).astype(dtype)
    w = (1.0 + 0.5 * mx.random.normal(shape[-1:], key=k3)).astype(dtype)
    return x, r, w


def _loss(fn, eps):
    """Sum of both outputs with different, non-uniform cotangents (a swapped dh/dy shows)."""

    def loss(x, r, *w):
        h, y = fn(x, r, w[0] if w else None, eps)
        dt = mx.float64 if h.dtype == mx.float64 else mx.float32  # float64: finite differences
        ch = mx.cos(mx.arange(h.size, dtype=dt)).reshape(h.shape)
        cy = mx.sin(1.0 + 0.7 * mx.arange(y.size, dtype=dt)).reshape(y.shape)
        return (h.astype(dt) * ch).sum() + (y.astype(dt) * cy).sum()

    return loss


def _close(got, want, tol, what):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype)
    g, w = (np.array(t.astype(mx.float32)) for t in (got, want))
    scale = max(1.0, float(np.abs(w[np.isfinite(w)]).max(initial=0.0)))
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale, err_msg=what)


def check_op(x, r, w, eps, tol):
    """Values of h and y and gradients of x, r, w against the unfused reference."""
    got = fused_add_rms_norm(x, r, w, eps)
    want = add_rms_norm_reference(x, r, w, eps)
    for g, ww, what in zip(got, want, ("h", "y")):
        _close(g, ww, tol, what)
    args = (x, r) + ((w,) if w is not None else ())
    argnums = tuple(range(len(args)))
    gf = mx.grad(_loss(fused_add_rms_norm, eps), argnums=argnums)(*args)
    gr = mx.grad(_loss(add_rms_norm_reference, eps), argnums=argnums)(*args)
    for g, ww, what in zip(gf, gr, ("dx", "dr", "dw")):
        _close(g, ww, 4 * tol, what)


# --- the op -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 8), (5, 13), (2, 3, 64), (3, 300)], ids=str)
def test_values_and_grads(shape, dtype):
    x, r, w = _inputs(shape, dtype)
    check_op(x, r, w, 1e-5, TOL[dtype])


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1, 2.0])
def test_eps_is_a_parameter(eps):
    x, r, w = _inputs((4, 16), mx.float32, scale=0.3)
    check_op(x, r, w, eps, TOL[mx.float32])
    # and it matters: another eps gives other values
    y = fused_add_rms_norm(x, r, w, eps)[1]
    assert not mx.allclose(y, add_rms_norm_reference(x, r, w, eps * 3)[1]).item()


def test_without_weight():
    x, r, _ = _inputs((3, 10), mx.float32)
    check_op(x, r, None, 1e-5, TOL[mx.float32])


def test_unfusable_inputs_run_the_reference():
    x, r, w = _inputs((3, 10), mx.float32)
    # a broadcast residual, a weight of another dtype, a float64 input on the CPU
    for args in [(x, r[0], w), (x, r, w.astype(mx.float16)), (x[0], r[0], w)]:
        for g, want in zip(fused_add_rms_norm(*args), add_rms_norm_reference(*args)):
            _close(g, want, 1e-6, "fallback")
    with mx.stream(mx.cpu):
        x64, r64, w64 = (t.astype(mx.float64) for t in (x, r, w))
        h, y = fused_add_rms_norm(x64, r64, w64)
        assert h.dtype == y.dtype == mx.float64
    # a weight of the wrong size: MLX's own error
    with pytest.raises(ValueError) as theirs:
        mx.fast.rms_norm(x, mx.ones((3,)), 1e-5)
    with pytest.raises(ValueError) as mine:
        fused_add_rms_norm(x, r, mx.ones((3,)))
    assert str(mine.value) == str(theirs.value)


def test_empty_rows():
    x = mx.zeros((0, 6))
    h, y = fused_add_rms_norm(x, x, mx.ones((6,)))
    assert h.shape == y.shape == (0, 6)
    g = mx.grad(_loss(fused_add_rms_norm, 1e-5), argnums=(0, 1, 2))(x, x, mx.ones((6,)))
    assert [t.shape for t in g] == [(0, 6), (0, 6), (6,)]


def test_nan_and_inf_propagate_like_the_reference():
    x = mx.array([[1.0, float("nan"), 2.0], [float("inf"), 1.0, 0.0], [0.0, 0.0, 0.0], [1e30, -1e30, 3.0]])
    r = mx.ones_like(x)
    w = mx.array([1.0, -2.0, 0.5])
    for g, want in zip(fused_add_rms_norm(x, r, w), add_rms_norm_reference(x, r, w)):
        g, want = np.array(g), np.array(want)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(g), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(g[finite], want[finite], rtol=1e-5, atol=1e-6)


def _loss_np(x, r, w, eps):
    """_loss of the reference in float64 NumPy (the finite-difference side)."""
    h = x + r
    y = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * w
    ch = np.cos(np.arange(h.size, dtype=np.float64)).reshape(h.shape)
    cy = np.sin(1.0 + 0.7 * np.arange(y.size, dtype=np.float64)).reshape(y.shape)
    return float((h * ch).sum() + (y * cy).sum())


def test_finite_differences():
    x, r, w = _inputs((3, 7), mx.float32)
    analytic = mx.grad(_loss(fused_add_rms_norm, 1e-3), argnums=(0, 1, 2))(x, r, w)
    base = [np.array(t, dtype=np.float64) for t in (x, r, w)]
    step = 1e-5
    for i in range(3):
        for idx in range(0, base[i].size, 2):
            pos = np.unravel_index(idx, base[i].shape)
            vals = []
            for sign in (1, -1):
                args = [b.copy() for b in base]
                args[i][pos] += sign * step
                vals.append(_loss_np(*args, 1e-3))
            fd = (vals[0] - vals[1]) / (2 * step)
            assert abs(float(np.array(analytic[i])[pos]) - fd) <= 1e-3 * max(1.0, abs(fd)), (i, pos)


def test_inside_compile_and_vmap():
    x, r, w = _inputs((2, 4, 16), mx.float32)
    f = mx.compile(lambda *a: fused_add_rms_norm(*a, 1e-5))
    for g, want in zip(f(x, r, w), add_rms_norm_reference(x, r, w, 1e-5)):
        _close(g, want, 1e-5, "compiled")
    g = mx.compile(mx.grad(_loss(fused_add_rms_norm, 1e-5), argnums=(0, 2)))(x, r, w)
    want = mx.grad(_loss(add_rms_norm_reference, 1e-5), argnums=(0, 2))(x, r, w)
    for a, b in zip(g, want):
        _close(a, b, 1e-4, "compiled grads")
    vf = mx.vmap(lambda x, r: fused_add_rms_norm(x, r, w, 1e-5))
    if kernels.kernel_backend() is not None:  # MLX cannot vmap a CustomKernel (as for every fused op)
        with pytest.raises(ValueError, match="vmap"):
            mx.eval(vf(x, r))
        return
    for a, b in zip(vf(x, r), add_rms_norm_reference(x, r, w, 1e-5)):
        _close(a, b, 1e-5, "vmap")


# --- rules ------------------------------------------------------------------------------

def _block(eps):
    def f(x, r, w):
        h = x + r
        return h, mx.fast.rms_norm(h, w, eps)
    return f


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 100), (1, 1, 3)], ids=str)
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.25])
def test_rule_finds_add_rms_norm_and_binds_eps(shape, dtype, eps):
    args = _inputs(shape, dtype)
    g = trace_graph(_block(eps), *args)
    opps = optimizer().detect_opportunities(g)
    assert [o.name for o in opps] == ["add+rms_norm"]
    node = opps[0].replacement
    assert node.op == "FusedAddNorm" and node.params["pattern"] == ADD_RMS_NORM
    assert node.params["eps"] == mx.array(eps, mx.float32).item()
    assert [v.name for v in node.inputs] == [v.name for v in g.inputs]
    assert [v.name for v in node.outputs] == [v.name for v in g.outputs]


def test_fused_function_equals_unfused():
    fn = _block(1e-6)
    args = _inputs((2, 5, 48), mx.bfloat16)
    with fusion_config(min_tensor_size=0):
        f = fuse(fn)
        got = f(*args)
    assert f.stats.by_pattern == {"add+rms_norm": 1}
    for a, b in zip(got, fn(*args)):
        assert mx.array_equal(a, b).item()


def test_rule_leaves_other_code_alone():
    x, r, w = _inputs((4, 8), mx.float32)
    assert found(trace_graph(lambda x, w: mx.fast.rms_norm(x, w, 1e-5), x, w)) == []
    # no weight: not a spelling (mlx-lm's norms always have one)
    assert found(trace_graph(lambda x, r: mx.fast.rms_norm(x + r, None, 1e-5), x, r)) == []
    # a hand-written norm whose mean divides by another D is another function
    wrong_d = lambda x, r, w: (x + r) * mx.rsqrt(mx.sum(mx.square(x + r), -1, keepdims=True) * 0.2 + 1e-5) * w
    assert found(trace_graph(wrong_d, x, r, w)) == []
    # h read before y: the fused node could not define it in time
    def early(x, r, w):
        h = x + r
        s = mx.exp(h)
        return s, mx.fast.rms_norm(h, w, 1e-5) + s
    assert "add+rms_norm" not in [n for n, _ in found(trace_graph(early, x, r, w))]


def _gpu_graph(dtype, eps, d=16, weight_shape=None):
    """What a GPU exports for _block(eps): Add, then RMSNorm(h, w) [eps] (hand-built: the CPU
    exports mx.fast.rms_norm decomposed)."""
    x, r = Value("x", (3, d), dtype), Value("r", (3, d), dtype)
    w = Value("w", weight_shape if weight_shape is not None else (d,), dtype)
    h, y = Value("h", (3, d), dtype), Value("y", (3, d), dtype)
    return Graph([x, r, w], [h, y], [Node(0, "Add", [x, r], [h]),
                                     Node(1, "RMSNorm", [h, w], [y], (float(mx.array(eps, mx.float32).item()),))])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
def test_gpu_spelling_on_a_hand_built_graph(dtype, eps):
    g = _gpu_graph(dtype, eps)
    args = _inputs((3, 16), dtype)
    want = run_graph(g, list(args))
    assert found(g) == [("add+rms_norm", ["Add", "RMSNorm"])]
    stats = optimizer().optimize(g)
    assert stats.by_pattern == {"add+rms_norm": 1}
    (node,) = g.nodes
    assert node.op == "FusedAddNorm" and node.params["eps"] == mx.array(eps, mx.float32).item()
    for a, b in zip(run_graph(g, list(args)), want):
        if kernels.kernel_backend() is None:  # the CPU runs MLX's own code: bit for bit
            assert mx.array_equal(a, b).item()
        else:  # our kernel against MLX's RMSNorm kernel: another summation order
            _close(a, b, TOL[dtype], "gpu spelling")


def test_gpu_spelling_without_weight_is_not_fused():
    # MLX records a missing weight as a 0-d placeholder input
    assert found(_gpu_graph(mx.float32, 1e-5, weight_shape=())) == []


# --- a tiny mlx-lm llama ----------------------------------------------------------------

def _llama():
    from mlx_lm.models.llama import Model, ModelArgs

    args = ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97)
    mx.random.seed(3)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def test_tiny_llama_logits_and_grads(monkeypatch):
    pytest.importorskip("mlx_lm")
    monkeypatch.setenv("MLX_FUSION_NO_PRIORS", "1")
    ref = _llama()
    model = _llama()
    tokens = mx.array([[1, 5, 9, 2, 7, 3, 8, 4], [2, 2, 6, 1, 0, 9, 5, 3]])
    targets = mx.roll(tokens, -1, axis=1)

    def loss(m, t, y):
        return nn.losses.cross_entropy(m(t), y).mean()

    with fusion_config(min_tensor_size=0):
        fused = fuse(model)
        logits = fused(tokens)
        # two per layer: attention residual -> post_attention_layernorm, MLP residual -> the
        # next layer's input_layernorm (the last one: the final norm)
        assert fused.fusion_stats.by_pattern.get("add+rms_norm") == 4
        l, g = nn.value_and_grad(fused, loss)(fused, tokens, targets)
    l_ref, g_ref = nn.value_and_grad(ref, loss)(ref, tokens, targets)
    np.testing.assert_allclose(np.array(logits), np.array(ref(tokens)), rtol=1e-5, atol=1e-5)
    assert abs(l.item() - l_ref.item()) < 1e-5
    flat, flat_ref = dict(nn.utils.tree_flatten(g)), dict(nn.utils.tree_flatten(g_ref))
    assert flat.keys() == flat_ref.keys()
    for k in flat:
        # a GPU's kernels sum rows in another order than MLX's (gradients through 2 layers: ~3e-5)
        atol = 1e-5 if kernels.kernel_backend() is None else 1e-4
        np.testing.assert_allclose(np.array(flat[k]), np.array(flat_ref[k]), rtol=1e-4, atol=atol, err_msg=k)


# --- the kernels, executed on the CPU through the block-level shims ------------------------------
# Both sources run through the ops' own launches (kernels.use_backend): CUDA through the host
# shim, Metal through the Metal shim, each block/threadgroup as fibers (barriers, shuffles,
# simd_sum). Written against the shim API of branch `shims` (tests/_kernel_checks.py).

try:
    from tests import _kernel_checks as kc
    from tests.cuda_shim.host import have_compiler

    BLOCK_SHIM = have_compiler()
except ImportError:
    kc, BLOCK_SHIM = None, False

needs_block_shim = pytest.mark.skipif(not BLOCK_SHIM, reason="needs the block-level shim (branch shims)")
BACKENDS = ("cuda", "metal")
SHIM_DTYPES = ("float32", "float16", "bfloat16")
# (shape, eps): one row shorter than a simdgroup; partial simdgroups; several simdgroups; rows
# longer than a threadgroup (256 threads: 2 and 5 passes of the row loop); a large eps that
# dominates the mean square (a dropped or wrong eps shows).
SHIM_SHAPES = [((1, 8), 1e-5), ((5, 13), 1e-6), ((2, 3, 64), 1e-5), ((3, 300), 0.5), ((2, 1030), 1e-5)]


def check_add_rms_norm(backend, fac, shape, dtype, eps, weight=True):
    """Run fused_add_rms_norm forward and backward through `fac`; failures as strings."""
    dt = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    x, r, w = _inputs(shape, dt, seed=len(shape) * 7 + shape[-1], scale=0.3 if eps >= 0.1 else 1.0)
    w = w if weight else None
    args = (x, r) + ((w,) if weight else ())
    argnums = tuple(range(len(args)))
    where = f"{backend} {dtype} {shape} eps={eps} weight={weight}"
    record = kc.launches(backend)
    before = len(record)
    with kernels.use_backend(backend, fac):
        h, y = fused_add_rms_norm(x, r, w, eps)
        grads = mx.grad(_loss(fused_add_rms_norm, eps), argnums=argnums)(*args)
        mx.eval(h, y, grads)
    names = [kc.launch_name(backend, rec) for rec in record[before:]]
    if not any(n.endswith("add_rms_norm") for n in names) or not any("backward" in n for n in names):
        return [f"{where}: kernels launched: {names}"]
    failures = []
    want_h, want_y = add_rms_norm_reference(x, r, w, eps)
    if not mx.array_equal(h, want_h).item():
        failures.append(f"{where}: h is not x + r rounded as MLX rounds it")
    fwd = next(kc._launch_outputs(backend, rec)[1] for rec in record[before:]
               if kc.launch_name(backend, rec).endswith("add_rms_norm"))
    h64 = np.array(want_h.astype(mx.float32)).astype(np.float64).reshape(-1, shape[-1])
    rstd = 1 / np.sqrt(np.mean(h64 * h64, axis=-1) + np.float32(eps))
    if not np.allclose(fwd[2], rstd, rtol=1e-5, atol=0):
        failures.append(f"{where}: rstd off by {np.abs(fwd[2] / rstd - 1).max():.3g} (relative)")
    want_g = mx.grad(_loss(add_rms_norm_reference, eps), argnums=argnums)(*args)
    tol = TOL[dt]
    for got, want, what in [(y, want_y, "y")] + list(zip(grads, want_g, ("dx", "dr", "dw"))):
        g, ww = (np.array(t.astype(mx.float32)) for t in (got, want))
        scale = max(1.0, float(np.abs(ww).max()))
        t = tol if what == "y" else 4 * tol
        bad = ~(np.abs(g - ww) <= t * np.abs(ww) + t * scale)
        if bad.any():
            i = tuple(np.argwhere(bad)[0])
            failures.append(f"{where} {what}: {int(bad.sum())}/{bad.size} off; at {i} got {g[i]} want {ww[i]}")
    return failures


@needs_block_shim
@pytest.mark.parametrize("dtype", SHIM_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_execute_on_the_shims(backend, dtype):
    fac = kc.factory(backend)
    failures = []
    for shape, eps in SHIM_SHAPES:
        failures += check_add_rms_norm(backend, fac, shape, dtype, eps)
    failures += check_add_rms_norm(backend, fac, (3, 40), dtype, 1e-5, weight=False)
    assert not failures, "\n".join(failures[:8])


# Source edits that must make the checks fail: (kernel, old, new).
MUTANTS = {
    "no eps": ("add_rms_norm", "+ float(e[0])", ""),
    "no residual": ("add_rms_norm", " + float(r[base + i])", ""),
    "first row chunk only": ("add_rms_norm", "i < D; i += int(nt)) {\n  const T hv",
                             "i < D && i < int(nt); i += int(nt)) {\n  const T hv"),
    "mean over nt": ("add_rms_norm", "partial[0] * (1.0f / float(D))", "partial[0] * (1.0f / float(nt))"),
    "one simdgroup": ("add_rms_norm", "lane < (nt + 31) / 32 ? partial[lane]", "lane < 1 ? partial[lane]"),
    "no dh": ("add_rms_norm_backward", "float(dh[base + i]) + ", ""),
    "no mean term": ("add_rms_norm_backward", "(g - float(h[base + i]) * c)", "g"),
}


@needs_block_shim
@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_kernels_fail_the_checks(backend, mutant):
    name, old, new = MUTANTS[mutant]

    def edit(kernel, header, body):
        if kernel.endswith(name):
            assert old in body, (mutant, kernel)
            body = body.replace(old, new)
        return header, body

    fac = kc.factory(backend, edit)
    failures = []
    for shape, eps in [((3, 300), 0.5), ((2, 3, 64), 1e-5)]:
        failures += check_add_rms_norm(backend, fac, shape, "float32", eps)
    assert failures, f"{backend} mutant {mutant!r} passed the checks"


@needs_block_shim
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_llama_through_the_kernels(backend, monkeypatch):
    """The GPU path end to end: the fused llama's add+rms_norm nodes run both kernels (on the
    shim, uncompiled: the shims evaluate eagerly); logits and gradients equal the unfused."""
    pytest.importorskip("mlx_lm")
    monkeypatch.setenv("MLX_FUSION_NO_PRIORS", "1")
    ref, model = _llama(), _llama()
    tokens = mx.array([[1, 5, 9, 2, 7, 3]])
    targets = mx.roll(tokens, -1, axis=1)

    def loss(m, t, y):
        return nn.losses.cross_entropy(m(t), y).mean()

    record = kc.launches(backend)
    before = len(record)
    with fusion_config(min_tensor_size=0, enabled_patterns={"add+rms_norm"}), \
            kernels.use_backend(backend, kc.factory(backend)):
        fused = fuse(model, compile=False)
        logits = fused(tokens)
        l, g = nn.value_and_grad(fused, loss)(fused, tokens, targets)
        mx.eval(logits, l, g)
    assert fused.fusion_stats.by_pattern == {"add+rms_norm": 4}
    names = [kc.launch_name(backend, rec) for rec in record[before:]]
    assert sum(n.endswith("add_rms_norm") for n in names) == 8  # 4 nodes, forward twice
    assert sum(n.endswith("add_rms_norm_backward") for n in names) == 4
    np.testing.assert_allclose(np.array(logits), np.array(ref(tokens)), rtol=1e-4, atol=1e-4)
    l_ref, g_ref = nn.value_and_grad(ref, loss)(ref, tokens, targets)
    assert abs(l.item() - l_ref.item()) < 1e-4
    flat, flat_ref = dict(nn.utils.tree_flatten(g)), dict(nn.utils.tree_flatten(g_ref))
    for k in flat_ref:
        np.testing.assert_allclose(np.array(flat[k]), np.array(flat_ref[k]), rtol=1e-3, atol=1e-4, err_msg=k)
