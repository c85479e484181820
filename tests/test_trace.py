"""trace(): capture functions and modules; replaying the graph reproduces them."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_fusion.graph.interpreter import run_graph
from mlx_fusion.graph.trace import TraceError, flatten_tree, trace
from mlx_fusion.graph.trace import unflatten_tree as unflatten


def replay(fn, *args, **kwargs):
    """Trace `fn`, run the graph uncompiled, rebuild the output tree."""
    g = trace(fn, *args, **kwargs).lint()
    params = [v for _, v in tree_flatten(fn.parameters())] if isinstance(fn, nn.Module) else []
    leaves, _ = flatten_tree((args, kwargs))
    return g, unflatten(g.meta["out_skeleton"], run_graph(g, params + leaves))


def assert_tree_close(a, b, atol=1e-5):
    la, sa = flatten_tree(a)
    lb, sb = flatten_tree(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(np.array(x), np.array(y), atol=atol, rtol=1e-5)


A = mx.random.normal((4, 6), key=mx.random.key(1))

FUNCTIONS = {
    "elementwise": lambda x: mx.tanh(x) * 2 + mx.erf(x) - mx.abs(x) / (1 + mx.exp(-x)),
    "reverse-slices": lambda x: x[::-1, 1::2] + x[-2::-2, ::-3].sum(),
    "split": lambda x: mx.split(x, [1, 4], axis=1),
    "passthrough-and-duplicates": lambda x: (x, x + 1, x),
    "reductions": lambda x: mx.argmax(x, axis=1) + mx.logsumexp(x, axis=1) + mx.var(x) + mx.max(x, axis=0)[:4],
    "setitem": lambda x: _setitem(x),
    "pad": lambda x: mx.pad(x, [(1, 2), (0, 1)], constant_values=3.0),
    "fancy-index": lambda x: x[mx.array([0, 2])][:, mx.array([[1, 1], [0, 5]])],
    "take-along-axis": lambda x: mx.take_along_axis(x, mx.array([[0], [1], [2], [3]]), 1),
    "misc": lambda x: (mx.full((4, 6), 2.0) + mx.arange(6) + mx.cumsum(x, axis=0) + mx.log2(x * x + 1)
                       + mx.rsqrt(x * x + 1) + mx.sort(x, axis=0) + (x == x) + mx.where(x > 0, x, -x)),
    "divmod-topk": lambda x: (mx.divmod(x, 0.7), mx.topk(x, 2, axis=1)),
    "matmul-addmm": lambda x: mx.addmm(x[:, :4], x, x.T[:, :4], alpha=0.5, beta=2.0) @ x[:4],
    "sdpa": lambda x: mx.fast.scaled_dot_product_attention(
        x.reshape(1, 2, 4, 3), x.reshape(1, 2, 4, 3), x.reshape(1, 2, 4, 3), scale=0.5, mask="causal"),
    "rms-layer-norm": lambda x: mx.fast.rms_norm(x, mx.ones(6), 1e-5) + mx.fast.layer_norm(x, None, None, 1e-5),
}


def _setitem(x):
    y = x * 2
    y[1:3] = 0
    return y + x


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_round_trip(name):
    fn = FUNCTIONS[name]
    _, out = replay(fn, A)
    assert_tree_close(out, fn(A))


def test_pytrees_kwargs_and_static_leaves():
    def fn(d, pair, *, scale, mode="sum", extra=None):
        out = {"a": d["x"] * scale, "b": [pair[0] + pair[1], None, mode]}
        if extra is not None:
            out["c"] = extra.T
        return out

    args = ({"x": A}, (A, A * 2))
    kwargs = dict(scale=3, extra=A)
    g, out = replay(fn, *args, **kwargs)
    assert_tree_close(out, fn(*args, **kwargs))
    assert isinstance(out["b"], list) and out["b"][1:] == [None, "sum"]
    assert g.meta["input_paths"] == ["0.0.x", "0.1.0", "0.1.1", "1.extra"]
    assert len(g.inputs) == 4


def test_multi_output_primitive_is_one_node():
    g = trace(lambda x: mx.split(x, 3, axis=1), A)
    (split,) = [n for n in g.nodes if n.op == "Split"]
    assert len(split.outputs) == 3 and split.params == ((2, 4), 1)
    assert [v.name for v in g.outputs] == [v.name for v in split.outputs]


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def __call__(self, x):
        return self.down(nn.gelu(self.up(x)))


class GatedMLP(nn.Module):  # Llama style: silu(gate(x)) * up(x), no biases
    def __init__(self, d=8, h=24):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def __call__(self, x):
        return self.down(nn.silu(self.gate(x)) * self.up(x))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, stride=2)

    def __call__(self, x):
        return self.c2(nn.relu(self.c1(x))).mean(axis=(1, 2))


class Attention(nn.Module):  # mlx-lm style: RMSNorm, RoPE, SDPA
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.norm, self.rope = heads, nn.RMSNorm(d), nn.RoPE(d // heads)
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)

    def __call__(self, x):
        B, L, D = x.shape
        q, k, v = mx.split(self.qkv(self.norm(x)), 3, axis=-1)
        q, k, v = (t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        o = mx.fast.scaled_dot_product_attention(self.rope(q), self.rope(k), v, scale=0.5, mask="causal")
        return x + self.out(o.transpose(0, 2, 1, 3).reshape(B, L, D))


X = mx.random.normal((2, 5, 8), key=mx.random.key(2))
X16 = mx.random.normal((2, 5, 16), key=mx.random.key(3))
MASK = nn.MultiHeadAttention.create_additive_causal_mask(5)


def _encoder():
    layer = nn.TransformerEncoderLayer(16, 4, 32)
    layer.eval()
    return layer


MODELS = {
    "mlp": (_mlp, (X,)),
    "gelu-mlp": (GeluMLP, (X,)),
    "gated-mlp": (GatedMLP, (X,)),
    "conv-net": (ConvNet, (mx.random.normal((2, 8, 8, 3), key=mx.random.key(4)),)),
    "layernorm": (lambda: nn.LayerNorm(16), (X16,)),
    "rmsnorm": (lambda: nn.RMSNorm(16), (X16,)),
    "embedding": (lambda: nn.Embedding(10, 16), (mx.array([[1, 2, 3], [9, 0, 0]]),)),
    "mha-mask": (lambda: nn.MultiHeadAttention(16, 4), (X16, X16, X16, MASK)),
    "transformer-encoder": (_encoder, (X16, MASK)),
    "attention-rope": (Attention, (X16,)),
    "conv1d-gelu-approx": (lambda: nn.Sequential(nn.Conv1d(8, 4, 3, padding=1), nn.GELU("precise")), (X,)),
    "activations": (lambda: nn.Sequential(nn.SiLU(), nn.Tanh(), nn.Sigmoid(), nn.Softmax(), nn.Mish()), (X,)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_module_round_trip(name):
    make, args = MODELS[name]
    model = make()
    _, out = replay(model, *args)
    assert_tree_close(out, model(*args), atol=1e-4)


def test_module_parameters_are_graph_inputs():
    model = GeluMLP()
    g = trace(model, X)
    flat = tree_flatten(model.parameters())
    assert g.meta["num_params"] == len(flat) == 4
    assert g.meta["param_paths"] == [k for k, _ in flat]
    assert [v.shape for v in g.inputs[:4]] == [tuple(p.shape) for _, p in flat]
    # Weights are not baked in: only scalars (like gelu's 0.5) are constants.
    assert all(a.size == 1 for a in g.constants.values())
    # And the module got its real parameters back after the trace.
    assert all(a is b for (_, a), (_, b) in zip(tree_flatten(model.parameters()), flat))


def test_replay_sees_new_parameters():
    model = _mlp()
    g = trace(model, X)
    new = [mx.ones_like(p) for _, p in tree_flatten(model.parameters())]
    model.update(tree_unflatten(list(zip(g.meta["param_paths"], new))))
    (out,) = run_graph(g, new + [X])
    np.testing.assert_allclose(np.array(out), np.array(model(X)), atol=1e-5)


def test_random_key_is_an_input_not_a_constant():
    g = trace(nn.Dropout(0.5), A)
    assert len(g.meta["rng_inputs"]) == 1
    key = g.meta["rng_inputs"][0]
    assert key == g.inputs[-1].name and key not in g.constants
    a, b = run_graph(g, [A])[0], run_graph(g, [A])[0]
    assert not mx.array_equal(a, b)  # fresh randomness per replay
    # Kept values are scaled by 1/(1-p): the replay is still dropout.
    kept = np.array(a)[np.array(a) != 0]
    np.testing.assert_allclose(kept, (np.array(A) * 2)[np.array(a) != 0], rtol=1e-6)


def test_explicit_keys_stay_deterministic():
    fn = lambda x, k: x + mx.random.normal(x.shape, key=k)
    g = trace(fn, A, mx.random.key(0))
    assert g.meta["rng_inputs"] == []
    (a,), (b,) = run_graph(g, [A, mx.random.key(7)]), run_graph(g, [A, mx.random.key(7)])
    assert mx.array_equal(a, b) and mx.allclose(a, fn(A, mx.random.key(7)))


def _data_dependent(x):
    return x if x.sum() > 0 else -x


@mx.custom_function
def _double(y):
    return y * 2


@_double.vjp
def _double_vjp(primals, cotangent, output):
    return cotangent * 2


def _custom(x):
    return _double(x) + 1


@pytest.mark.parametrize("fn, words", [
    (lambda x: x * x.sum().item(), "eval"),
    (_data_dependent, "eval"),
    (_custom, "CustomTransforms"),
    (lambda x: 3, "no arrays"),
])
def test_untraceable_raises_trace_error(fn, words):
    with pytest.raises(TraceError) as info:
        trace(fn, A)
    assert words in info.value.reason


def test_module_that_writes_its_state_is_refused():
    bn = nn.BatchNorm(16)  # training mode updates running_mean/var
    with pytest.raises(TraceError, match="writes Python state"):
        trace(bn, X16)
    assert mx.array_equal(bn.running_mean, mx.zeros(16))  # restored, nothing leaked


def test_trace_rejects_non_callables():
    with pytest.raises(TypeError):
        trace(42, A)
