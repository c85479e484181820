"""linear_cross_entropy (mlx_fusion/ops/linear_cross_entropy.py): values, gradients, dtypes and
errors as the unfused ``nn.losses.cross_entropy(h @ W.T, t)``; memory; the graph rule under
``nn.value_and_grad(model, fuse(loss_fn))``. The kernels run on the CPU shims in
tests/test_linear_cross_entropy_kernels.py."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_fusion import fuse, fusion_config, kernels
from mlx_fusion.ops import lce_chunks
from mlx_fusion.ops.linear_cross_entropy import (linear_cross_entropy, linear_cross_entropy_reference,
                                                 traceable_cross_entropy)

# On a GPU the op runs MLX's own cross-entropy unless chunk_size is given (lce_chunks), and the
# reference is mx.fast.cross_entropy, whose rounding and out-of-range targets differ from the CPU
# code these tests pin down: on the H200 they failed for those reasons (docs/testing.md, fourth
# session). The kernels are executed by tests/test_linear_cross_entropy_kernels.py everywhere.
pytestmark = pytest.mark.skipif(mx.default_device() == mx.gpu, reason="pins the CPU semantics; see the comment")

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
cpu_only = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU path's own promise (MLX's code per chunk)")
TOL = {mx.float32: 2e-5, mx.float16: 2e-2, mx.bfloat16: 6e-2}


def _inputs(shape, vocab, dtype, seed=0):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    h = mx.random.normal(shape, key=k1).astype(dtype)
    w = (mx.random.normal((vocab, shape[-1]), key=k2) * shape[-1] ** -0.5 * 2).astype(dtype)
    t = mx.random.randint(0, vocab, shape[:-1], key=k3)
    return h, w, t


def _loss(fn, t, **kw):
    """A scalar with a non-uniform cotangent per row (wrong routing of g shows)."""

    def loss(h, w):
        y = fn(h, w, t, **kw)
        c = mx.cos(mx.arange(y.size, dtype=mx.float32)).reshape(y.shape) if y.ndim else 1.0
        return (y.astype(mx.float32) * c).sum()

    return loss


def _close(got, want, tol, what):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    g, w = (np.array(t.astype(mx.float32)) for t in (got, want))
    scale = max(1.0, float(np.abs(w[np.isfinite(w)]).max(initial=0.0)))
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale, err_msg=what)


def check(h, w, t, chunk, reduction="none", upcast=False, grads=True):
    kw = dict(reduction=reduction, upcast=upcast)
    tol = TOL[mx.float32 if upcast else h.dtype]
    _close(linear_cross_entropy(h, w, t, chunk_size=chunk, **kw), linear_cross_entropy_reference(h, w, t, **kw),
           tol, "loss")
    if grads:
        gf = mx.grad(_loss(linear_cross_entropy, t, chunk_size=chunk, **kw), argnums=(0, 1))(h, w)
        gr = mx.grad(_loss(linear_cross_entropy_reference, t, **kw), argnums=(0, 1))(h, w)
        for g, r, what in zip(gf, gr, ("dh", "dW")):
            _close(g, r, 4 * TOL[h.dtype], what)


# --- the op -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,chunk", [((23, 16), 5), ((23, 16), 7), ((2, 11, 24), 4), ((9, 8), 1)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_values_and_grads(shape, chunk, dtype, reduction):
    h, w, t = _inputs(shape, 37, dtype, seed=shape[0])
    check(h, w, t, chunk, reduction)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_upcast_spelling(dtype):
    """cross_entropy((h @ W.T).astype(float32), t): a float32 loss of 16-bit logits."""
    h, w, t = _inputs((2, 7, 16), 41, dtype, seed=3)
    assert linear_cross_entropy(h, w, t, chunk_size=3, upcast=True).dtype == mx.float32
    for reduction in ("none", "mean"):
        check(h, w, t, 3, reduction, upcast=True)


def test_dtypes_are_mlx_own():
    """bf16 logits: a bf16 loss (MLX reduces in the logits' dtype on the CPU); every reduction."""
    for dtype in DTYPES:
        h, w, t = _inputs((10, 8), 19, dtype)
        for reduction in ("none", "mean", "sum"):
            got = linear_cross_entropy(h, w, t, reduction, chunk_size=3)
            want = nn.losses.cross_entropy(h @ w.T, t, reduction=reduction)
            assert got.dtype == want.dtype and got.shape == want.shape


@cpu_only
def test_cpu_forward_is_exactly_the_reference():
    """On the CPU each chunk runs MLX's own expression: the per-row loss is bit for bit the unfused one."""
    h, w, t = _inputs((31, 16), 53, mx.float32, seed=5)
    assert mx.array_equal(linear_cross_entropy(h, w, t, chunk_size=4), linear_cross_entropy_reference(h, w, t))


def test_single_row_and_one_chunk():
    h, w, t = _inputs((1, 16), 29, mx.float32)
    check(h, w, t, 1)
    check(h, w, t, None)
    h, w, t = _inputs((7, 16), 29, mx.float32)
    check(h, w, t, 100)  # one chunk: on the CPU, MLX's own code


def test_empty_and_unfusable_inputs_are_mlx_own():
    h, w, t = _inputs((0, 8), 5, mx.float32)
    for fn in (linear_cross_entropy, linear_cross_entropy_reference):
        with pytest.raises(ValueError):
            fn(h, w, t)
    h, w, t = _inputs((4, 8), 5, mx.float32)
    with pytest.raises(ValueError, match="Targets shape"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, t, chunk_size=0)
    # mixed dtypes and probability targets: MLX's promotion and code path
    _close(linear_cross_entropy(h, w.astype(mx.bfloat16), t), linear_cross_entropy_reference(h, w.astype(mx.bfloat16), t),
           1e-6, "mixed")
    probs = mx.softmax(mx.random.normal((4, 5)), axis=-1)
    _close(linear_cross_entropy(h, w, probs), linear_cross_entropy_reference(h, w, probs), 1e-6, "probs")


def test_nan_and_inf_rows_like_the_reference():
    h, w, t = _inputs((9, 8), 13, mx.float32)
    h = h.at[2, 3].add(float("nan")).at[5, 0].add(float("inf")).at[6, 1].add(-float("inf"))
    got = np.array(linear_cross_entropy(h, w, t, chunk_size=2))
    want = np.array(linear_cross_entropy_reference(h, w, t))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5)


def test_targets_out_of_range():
    """MLX wraps an index in [-V, 0) to index + V; beyond [-V, V) it reads outside the row: NaN here."""
    h, w, _ = _inputs((6, 8), 11, mx.float32)
    t = mx.array([0, -1, -11, 10, 3, -2])
    check(h, w, t, 4)
    bad = mx.array([0, 11, -12, 1 << 20, 3, 2])
    got = np.array(linear_cross_entropy(h, w, bad, chunk_size=4))
    assert np.isnan(got[[1, 2, 3]]).all() and np.isfinite(got[[0, 4, 5]]).all()
    want = np.array(linear_cross_entropy_reference(h, w, mx.array([0, 0, 0, 0, 3, 2])))
    np.testing.assert_allclose(got[[0, 4, 5]], want[[0, 4, 5]], rtol=1e-6)
    for ty in (mx.uint32, mx.int64, mx.int16):
        check(h, w, t.astype(mx.int64).astype(ty) if ty != mx.uint32 else mx.array([0, 1, 2, 10, 3, 4], ty), 4,
              grads=True)


def test_finite_differences():
    h, w, t = _inputs((5, 4), 7, mx.float32, seed=9)
    f = _loss(linear_cross_entropy, t, chunk_size=2)
    dh, dw = mx.grad(f, argnums=(0, 1))(h, w)
    h64, w64 = np.array(h, np.float64), np.array(w, np.float64)
    tt = np.array(t)
    c = np.cos(np.arange(5))

    def loss64(hh, ww):
        z = hh @ ww.T
        m = z.max(-1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(-1)) + m[:, 0]
        return ((lse - z[np.arange(5), tt]) * c).sum()

    eps = 1e-6
    for arr, grad, which in ((h64, dh, 0), (w64, dw, 1)):
        for idx in [(0, 0), (2, 3), (4, 1)]:
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus, w64) if which == 0 else (h64, plus)
            args_m = (minus, w64) if which == 0 else (h64, minus)
            fd = (loss64(*args_p) - loss64(*args_m)) / (2 * eps)
            assert abs(float(np.array(grad)[idx]) - fd) < 1e-4 * max(1.0, abs(fd)), (which, idx)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), d=st.integers(1, 24), vocab=st.integers(1, 70), chunk=st.integers(1, 45),
       rank3=st.booleans())
def test_hypothesis_shapes(rows, d, vocab, chunk, rank3):
    shape = (2, rows, d) if rank3 else (rows, d)
    h, w, t = _inputs(shape, vocab, mx.float32, seed=rows * 31 + d)
    check(h, w, t, chunk, "mean")


def test_inside_compile():
    h, w, t = _inputs((12, 8), 17, mx.float32)
    f = mx.compile(mx.value_and_grad(lambda h, w: linear_cross_entropy(h, w, t, "mean", chunk_size=5), argnums=(0, 1)))
    r = mx.value_and_grad(lambda h, w: linear_cross_entropy_reference(h, w, t, "mean"), argnums=(0, 1))
    (l, g), (l0, g0) = f(h, w), r(h, w)
    _close(l, l0, 1e-6, "loss")
    for a, b in zip(g, g0):
        _close(a, b, 1e-5, "grad")


def test_chunked_path_peak_memory_is_well_below_unfused():
    """The point of the op: fwd+bwd of tokens 512 x vocab 32000 (float32 logits 62.5 MiB) with the
    default chunks (the CPU takes the chunked path at this size)."""
    h, w, t = _inputs((512, 64), 32000, mx.float32)
    mx.eval(h, w, t)
    peaks = {}
    for name, fn in (("unfused", linear_cross_entropy_reference), ("fused", linear_cross_entropy)):
        f = mx.value_and_grad(lambda h, w: fn(h, w, t, "mean"), argnums=(0, 1))
        mx.eval(f(h, w))
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(f(h, w))
        peaks[name] = mx.get_peak_memory() - base
    logits = 512 * 32000 * 4
    assert peaks["unfused"] > 2 * logits  # logits dominate the unfused step
    assert peaks["fused"] < 0.5 * peaks["unfused"], peaks
    assert peaks["fused"] < logits, peaks  # never the whole logits at once


# --- the graph rule --------------------------------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Make the CPU take the chunked path at test sizes (it runs MLX's code below 32 MiB of logits)."""
    monkeypatch.setattr(lce_chunks, "CPU_MIN_LOGITS_BYTES", 0)
    monkeypatch.setattr(lce_chunks, "CHUNK_BYTES", {"gpu": 1 << 14, "cpu": 1 << 14})
    monkeypatch.setattr(lce_chunks, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setenv("MLX_FUSION_NO_PRIORS", "1")


def _llama(tie: bool, dtype=mx.float32):
    from mlx_lm.models.llama import Model, ModelArgs

    args = ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                     num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=512, num_key_value_heads=2,
                     tie_word_embeddings=tie)
    mx.random.seed(0)
    m = Model(args)
    m.set_dtype(dtype)
    return m


def _mean_loss(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def _upcast_loss(model, x, y):
    return nn.losses.cross_entropy(model(x).astype(mx.float32), y).mean()


def _grads_close(g, g0, tol):
    flat, flat0 = dict(nn.utils.tree_flatten(g)), dict(nn.utils.tree_flatten(g0))
    assert flat.keys() == flat0.keys()
    for k in flat0:
        np.testing.assert_allclose(np.array(flat[k].astype(mx.float32)), np.array(flat0[k].astype(mx.float32)),
                                   rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("loss_fn", [_mean_loss, _upcast_loss], ids=["mean", "upcast"])
def test_fused_loss_of_a_llama(small_chunks, tie, dtype, loss_fn):
    pytest.importorskip("mlx_lm")
    model = _llama(tie, dtype)
    x = mx.array([[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3]])
    y = mx.roll(x, -1, axis=1)
    with fusion_config(min_tensor_size=0, enabled_patterns={"linear+cross_entropy"}):
        fused = fuse(loss_fn)
        l, g = nn.value_and_grad(model, fused)(model, x, y)
    l0, g0 = nn.value_and_grad(model, loss_fn)(model, x, y)
    assert fused.stats.by_pattern == {"linear+cross_entropy": 1}
    assert l.dtype == l0.dtype
    tol = 1e-5 if dtype == mx.float32 else 3e-2
    np.testing.assert_allclose(np.array(l.astype(mx.float32)), np.array(l0.astype(mx.float32)), rtol=tol)
    _grads_close(g, g0, tol if dtype == mx.float32 else 6e-2)


def test_mlx_lm_tuner_loss(small_chunks):
    """mlx_lm.tuner.trainer.default_loss: ``cross_entropy(logits, targets) * mask``, summed in float32."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.trainer import default_loss

    import mlx_fusion

    model = _llama(False)
    batch = mx.array([[1, 2, 3, 4, 5, 6, 7, 8], [7, 8, 9, 10, 11, 12, 13, 14]])
    lengths = mx.array([[0, 7], [1, 5]])
    with fusion_config(min_tensor_size=0):
        fused = fuse(default_loss)
        (l, n), g = nn.value_and_grad(model, fused)(model, batch, lengths)
    (l0, n0), g0 = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    assert fused.stats.by_pattern.get("linear+cross_entropy") == 1
    assert "linear+cross_entropy" in str(mlx_fusion.explain(fused))
    assert n.item() == n0.item()
    np.testing.assert_allclose(l.item(), l0.item(), rtol=1e-5)
    _grads_close(g, g0, 1e-5)


def test_per_row_loss_and_gpu_spelling(small_chunks):
    """reduction "none" (the op's own output), and the GPU's spelling (mx.fast.cross_entropy as
    graph/trace.py writes it there), here written out so a CPU trace has it."""
    h, w, t = _inputs((3, 5, 16), 64, mx.bfloat16)
    for fn in (lambda h, w, t: nn.losses.cross_entropy(h @ w.T, t),
               lambda h, w, t: traceable_cross_entropy(h @ w.T, t).astype(h.dtype),
               lambda h, w, t: traceable_cross_entropy(h @ w.T, t)):
        with fusion_config(min_tensor_size=0):
            fused = fuse(fn)
            got = fused(h, w, t)
        assert fused.stats.by_pattern == {"linear+cross_entropy": 1}
        want = fn(h, w, t)
        _close(got, want, TOL[mx.bfloat16], "loss")


@cpu_only
def test_rule_leaves_small_cpu_logits_alone():
    """Without the fixture: below 32 MiB of logits the CPU runs MLX's code, so nothing is fused."""
    h, w, t = _inputs((4, 16), 64, mx.float32)
    with fusion_config(min_tensor_size=0):
        fused = fuse(lambda h, w, t: nn.losses.cross_entropy(h @ w.T, t).mean())
        mx.eval(fused(h, w, t))
    assert "linear+cross_entropy" not in fused.stats.by_pattern


@pytest.mark.parametrize("chunked", [False, True], ids=["gpu-default", "MLX_FUSION_LCE_GPU"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("upcast", [False, True])
def test_gpu_trace_of_nn_cross_entropy_is_matched(monkeypatch, small_chunks, dtype, upcast, chunked):
    """On a GPU nn.losses.cross_entropy calls mx.fast.cross_entropy, which export cannot write;
    graph/trace.py spells it as exportable ops there. Simulated here by making mlx.nn (and the
    trace) see a GPU default device during the trace only; the rewritten graph runs on the CPU."""
    from mlx_fusion.graph.interpreter import run_graph
    from mlx_fusion.graph.optimizer import FusionOptimizer
    from mlx_fusion.graph.trace import trace

    h, w, t = _inputs((2, 5, 16), 64, dtype)
    cast = (lambda z: z.astype(mx.float32)) if upcast else (lambda z: z)

    def loss(h, w, t):
        return nn.losses.cross_entropy(cast(h @ w.T), t).mean()

    gpu = mx.Device(mx.gpu)
    with monkeypatch.context() as m:
        m.setattr(mx, "default_device", lambda: gpu)
        graph = trace(loss, h, w, t)
    ops = [n.op for n in graph.nodes]
    assert "LogSumExp" in ops and "Reduce" in ops and ops.index("LogSumExp") < ops.index("Reduce")  # no max shift
    with fusion_config(min_tensor_size=0), monkeypatch.context() as m:
        m.setattr(kernels, "kernel_backend", lambda: "cuda")  # the rules decide as on a GPU
        m.setattr(lce_chunks, "GPU_CHUNKS_BY_DEFAULT", chunked)
        stats = FusionOptimizer().optimize(graph)
    # By default a GPU keeps MLX's own (fast) cross-entropy: the replay calls mx.fast.cross_entropy
    # rather than its traced decomposition; chunked, the larger linear+cross_entropy match wins.
    assert stats.by_pattern == ({"linear+cross_entropy": 1} if chunked else {"cross_entropy": 1})
    (got,) = run_graph(graph, [h, w, t])
    z = (h @ w.T).astype(mx.float32)  # mx.fast.cross_entropy's semantics: float32 math
    want = mx.fast.cross_entropy(z, t).astype(mx.float32 if upcast else dtype).mean()
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got.astype(mx.float32).item(), want.astype(mx.float32).item(), rtol=TOL[dtype])


def test_gpu_cross_entropy_of_other_logits_replays_the_fast_op(monkeypatch):
    """Soft-capped logits (not h @ W.T): on a GPU the traced fast op is replayed as
    mx.fast.cross_entropy (the `cross_entropy` spelling), not as its slower decomposition."""
    from mlx_fusion.graph.interpreter import run_graph
    from mlx_fusion.graph.optimizer import FusionOptimizer
    from mlx_fusion.graph.trace import trace

    h, w, t = _inputs((2, 5, 16), 64, mx.bfloat16)

    def loss(h, w, t):
        return nn.losses.cross_entropy(mx.tanh((h @ w.T) / 30) * 30, t).mean()

    gpu = mx.Device(mx.gpu)
    with monkeypatch.context() as m:
        m.setattr(mx, "default_device", lambda: gpu)
        graph = trace(loss, h, w, t)
    with fusion_config(min_tensor_size=0, enabled_patterns={"cross_entropy", "linear+cross_entropy"}), \
            monkeypatch.context() as m:
        m.setattr(kernels, "kernel_backend", lambda: "cuda")
        stats = FusionOptimizer().optimize(graph)
    assert stats.by_pattern == {"cross_entropy": 1}
    (got,) = run_graph(graph, [h, w, t])
    z = mx.tanh((h @ w.T) / 30) * 30
    want = traceable_cross_entropy(z, t).astype(mx.bfloat16).mean()
    np.testing.assert_allclose(got.astype(mx.float32).item(), want.astype(mx.float32).item(), rtol=2e-2)
