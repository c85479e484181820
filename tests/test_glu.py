"""The gated linear unit act(g) * u (mlx_fusion/ops/glu.py): what the registry-driven tests
(test_ops.py, test_metal_sources.py, test_cuda_host.py) do not cover: the mlx-lm MLPs it is
for, the spellings it must and must not match, its memory-lean backward on the kernel path,
0-d / NaN / broadcast inputs, and its Core ML emitter."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_fusion import fuse, kernels
from mlx_fusion.config import fusion_config
from mlx_fusion.graph.trace import trace
from mlx_fusion.ops.glu import fused_glu, glu_reference
from tests._graphs import LlamaMLP, found, frozen, names, optimizer, run_graph, trace_graph
from tests.metal_shim import metal_shim  # noqa: F401  (a fixture)

ACTS = ["silu", "gelu", "gelu_approx"]
X = mx.ones((4, 8))


def _grads(fn, args):
    w = mx.cos(mx.arange(args[0].size, dtype=mx.float32)).reshape(args[0].shape)
    return mx.grad(lambda *a: (fn(*a).astype(mx.float32) * w).sum(), argnums=tuple(range(len(args))))(*args)


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), rtol=tol, atol=tol)


def _same_grads(act, args):
    fused = _grads(lambda *t: fused_glu(*t, act), args)
    for a, b in zip(fused, _grads(lambda *t: glu_reference(*t, act), args)):
        _close(a, b)


# -- the models it is for -----------------------------------------------------------------------------------
def _tiny_llama(layers=2):
    llama = pytest.importorskip("mlx_lm.models.llama")
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=layers, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50)
    mx.random.seed(0)
    return frozen(llama.Model(args)), args


def test_mlx_lm_llama_mlp_with_compiled_swiglu():
    """mlx_lm's llama MLP calls `swiglu`, an mx.compile(shapeless=True) function: the trace
    sees through it, and the gated unit (not linear+silu on the gate projection) is fused."""
    llama = pytest.importorskip("mlx_lm.models.llama")
    _, args = _tiny_llama()
    mlp = frozen(llama.MLP(args))
    x = mx.random.normal((2, 3, 32))
    graph = trace(mlp, x)
    assert names(graph) == ["glu+silu"]
    (name, ops), = found(graph)
    assert ops == ["Sigmoid", "Multiply", "Multiply"]


def test_fused_llama_finds_one_glu_per_block_and_matches():
    model, _ = _tiny_llama(layers=2)
    tokens = mx.array([[1, 4, 9, 16, 3, 7]])
    with fusion_config(min_tensor_size=0):
        fused = fuse(model)
        logits = fused(tokens)
        assert fused.fusion_stats.by_pattern.get("glu+silu") == 2  # one per transformer block
        assert "linear+silu" not in fused.fusion_stats.by_pattern
        _close(logits, model(tokens))

        def loss(m, t):
            return m(t).astype(mx.float32).square().mean()

        lf, gf = nn.value_and_grad(fused, loss)(fused, tokens)
        lr, gr = nn.value_and_grad(model, loss)(model, tokens)
    _close(lf, lr)
    for (kf, a), (kr, b) in zip(tree_flatten(gf), tree_flatten(gr)):
        assert kf == kr
        _close(a, b, 1e-4)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("spelling, expect", [
    (lambda g, u: nn.silu(g) * u, "glu+silu"),
    (lambda g, u: u * nn.silu(g), "glu+silu"),  # Multiply matches either operand order
    (lambda g, u: g * mx.sigmoid(g) * u, "glu+silu"),  # silu spelled out
    (lambda g, u: nn.gelu(g) * u, "glu+gelu"),  # gemma
    (lambda g, u: u * nn.gelu_approx(g), "glu+gelu_approx"),  # gemma 2 / 3
])
def test_spellings(spelling, expect, dtype):
    x = X.astype(dtype)
    assert names(trace_graph(spelling, x, x)) == [expect]


@pytest.mark.parametrize("spelling", [
    lambda g, u: nn.silu(g) * u[0],  # a broadcast row: left unfused
    lambda g, u: nn.silu(g) * 2.0,  # a constant is no gate
    lambda g, u: nn.relu(g) * u,  # ReGLU: not fused (rare; two ReLU tie conventions)
    lambda g, u: nn.silu(g) + u,
])
def test_what_is_not_a_glu(spelling):
    assert not [n for n in names(trace_graph(spelling, X, X)) if n.startswith("glu")]


def test_gemma_mlp_and_rewrite_computes_the_same():
    gemma = pytest.importorskip("mlx_lm.models.gemma")
    mlp = frozen(gemma.MLP(16, 32))
    x = mx.random.normal((2, 3, 16))
    graph = trace(mlp, x)
    assert names(graph) == ["glu+gelu"]
    optimizer().optimize(graph)
    assert graph.op_counts()["FusedGLU"] == 1


def test_rewritten_llama_mlp_graph_runs_the_reference():
    graph = trace_graph(frozen(LlamaMLP(8, 16)), mx.ones((2, 4, 8)))
    args = [mx.random.normal(v.shape, key=mx.random.key(i)) for i, v in enumerate(graph.inputs)]
    want = run_graph(graph, *args)
    optimizer().optimize(graph)
    assert graph.op_counts()["FusedGLU"] == 1
    _close(run_graph(graph, *args)[0], want[0])


# -- the op itself ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
def test_zero_d_and_mixed_dtypes(act):
    g, u = mx.array(0.7), mx.array(-1.5)
    _close(fused_glu(g, u, act), glu_reference(g, u, act))
    _same_grads(act, [g, u])
    h = mx.random.normal((3, 4)).astype(mx.float16)
    f = mx.random.normal((3, 4))
    assert fused_glu(h, f, act).dtype == glu_reference(h, f, act).dtype == mx.float32


@pytest.mark.parametrize("act", ACTS)
def test_broadcast_operands_run_the_reference(act):
    g, row = mx.random.normal((5, 7)), mx.random.normal((7,))
    for args in ([g, row], [row, g]):
        _close(fused_glu(*args, act), glu_reference(*args, act))
        grads = _grads(lambda *t: fused_glu(*t, act), args)
        assert [t.shape for t in grads] == [t.shape for t in args]


def test_bad_activation_and_shapes_are_errors():
    with pytest.raises(ValueError, match="unsupported GLU activation"):
        fused_glu(X, X, "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        fused_glu(X, X, "tanh")
    with pytest.raises(ValueError):
        fused_glu(mx.zeros((3, 2)), mx.zeros((4,)))


SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 3.0, -3.0]


def _check_specials(act, rtol=1e-5):
    vals = mx.array(SPECIALS)
    g = mx.broadcast_to(vals[:, None], (9, 9)) + 0
    u = mx.broadcast_to(vals[None, :], (9, 9)) + 0
    y, r = np.array(fused_glu(g, u, act)), np.array(glu_reference(g, u, act))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(r))
    np.testing.assert_array_equal(np.isinf(y) & (y > 0), np.isinf(r) & (r > 0))
    finite = np.isfinite(r)
    np.testing.assert_allclose(y[finite], r[finite], rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_nan_and_inf_like_the_reference(act):
    _check_specials(act)


@pytest.mark.parametrize("act", ACTS)
def test_kernel_path_nan_inf_and_zero_d(metal_shim, act):
    _check_specials(act, rtol=1e-4)  # gelu(-3): the kernels' erf is MLX's Metal one, not its CPU one
    g, u = mx.array(0.7), mx.array(-1.5)
    _close(fused_glu(g, u, act), glu_reference(g, u, act))
    _same_grads(act, [g, u])


def test_kernel_path_backward_is_one_kernel_reading_g_and_u(metal_shim):
    """Forward and backward are one kernel each; the backward gets g, u and the cotangent
    (act(g) is recomputed, not saved), and writes dg and du."""
    launched = []
    real = kernels.get_kernel

    def spy(name):
        k = real(name)
        return lambda **kw: launched.append((name, [tuple(a.shape) for a in kw["inputs"]])) or k(**kw)

    g, u = mx.random.normal((5, 13), key=mx.random.key(1)), mx.random.normal((5, 13), key=mx.random.key(2))
    kernels.clear_launches()  # cached launches hold their kernel: make them ask the spy
    kernels.get_kernel = spy
    try:
        got = _grads(lambda *t: fused_glu(*t, "silu"), [g, u])
        mx.eval(got)
    finally:
        kernels.get_kernel = real
        kernels.clear_launches()
    assert launched == [("glu", [(5, 13), (5, 13), (1,)]), ("glu_backward", [(5, 13), (5, 13), (5, 13), (1,)])]
    for a, b in zip(got, _grads(lambda *t: glu_reference(*t, "silu"), [g, u])):
        _close(a, b)


def test_core_ml_emitter_reruns_in_numpy(tmp_path):
    pytest.importorskip("coremltools")
    from mlx_fusion.coreml.convert import convert_block
    from mlx_fusion.coreml.eligibility import find_blocks
    from mlx_fusion.coreml.milnumpy import MilExecutor
    from mlx_fusion.coreml.options import OffloadOptions

    model = frozen(LlamaMLP(16, 32))
    x = mx.random.normal((4, 16))
    graph = trace(model, x)
    optimizer().optimize(graph)
    assert graph.op_counts()["FusedGLU"] == 1
    (block,) = find_blocks(graph, 0).blocks
    params = dict(zip([v.name for v in graph.inputs[: graph.meta["num_params"]]],
                      [a for _, a in tree_flatten(model.parameters())]))
    c = convert_block(graph, block, params, OffloadOptions(cache_dir=str(tmp_path)))
    ex = MilExecutor(c.path)
    assert {"silu", "mul"} <= set(ex.op_types())
    got = ex({"in0": np.array(x)})["out0"]
    np.testing.assert_allclose(got.astype(np.float32), np.array(model(x)), atol=2e-2, rtol=2e-2)
