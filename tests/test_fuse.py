"""fuse(): fused functions and modules behave like the originals, or fall back with one warning."""

import functools
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

pytest.importorskip("mlx_fusion.graph.optimizer")  # the rewrite pass (graph/optimizer.py)
pytest.importorskip("mlx_fusion.ops")  # the fused primitives

from mlx_fusion.graph import interpreter  # noqa: E402
from mlx_fusion.config import FusionConfig  # noqa: E402
from mlx_fusion.fuse import FusionFallbackWarning, fuse, stats  # noqa: E402

ALL = FusionConfig(min_tensor_size=0)  # fuse at any size: tests use small tensors


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=1e-4)


class MLP(nn.Module):
    def __init__(self, p_drop=0.0):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.drop = nn.Dropout(p_drop)

    def __call__(self, x):
        return self.l3(self.drop(nn.gelu(self.l2(nn.relu(self.l1(x))))))


def twin(make):
    """Two models with identical weights: one stays unfused."""
    a, b = make(), make()
    b.update(a.parameters())
    return a, b


X = mx.random.normal((8, 16), key=mx.random.key(0))
Y = mx.random.normal((8, 4), key=mx.random.key(1))


# -- functions ---------------------------------------------------------------------------------
def test_fused_function_matches_and_fuses():
    w, b = mx.random.normal((32, 16)), mx.random.normal((32,))
    fn = lambda x, s: nn.relu(x @ w.T + b) * s + 1.0
    f = fuse(fn, ALL, compile=False)
    close(f(X, mx.array(2.0)), fn(X, mx.array(2.0)))
    assert f.stats.applied_count >= 1 and len(f.graphs) == 1
    assert "FusedLinear" in f.graphs[0].op_counts()


def test_compiled_replay_leaves_chains_into_elementwise_ops_to_mx_compile():
    """Under mx.compile the ReLU would merge into the `* s + 1` kernel: fusing
    linear+relu there would add a pass. A fusion whose output is returned, or read
    by a non-elementwise op, is still taken."""
    w, b = mx.random.normal((32, 16)), mx.random.normal((32,))
    into_mul = lambda x, s: nn.relu(x @ w.T + b) * s + 1.0  # noqa: E731
    returned = lambda x: nn.relu(x @ w.T + b)  # noqa: E731
    into_matmul = lambda x: nn.relu(x @ w.T + b) @ w  # noqa: E731
    for fn, args, fused in [(into_mul, (X, mx.array(2.0)), False), (returned, (X,), True),
                            (into_matmul, (X,), True)]:
        f = fuse(fn, ALL)
        close(f(*args), fn(*args))
        assert ("FusedLinear" in f.graphs[0].op_counts()) == fused, fn


def test_pytree_and_kwargs_calls():
    fn = lambda d, *, pair: {"y": nn.silu(d["x"] + pair[0]), "z": (pair[1] * 2,)}
    f = fuse(fn, ALL, compile=False)
    out, ref = f({"x": X}, pair=(X, X)), fn({"x": X}, pair=(X, X))
    assert isinstance(out["z"], tuple)
    close(out["y"], ref["y"])
    close(out["z"][0], ref["z"][0])


def test_retrace_on_shape_change_and_cache_hit():
    f = fuse(lambda x: nn.relu(x * 2.0), ALL)
    f(X), f(X), f(X[:3])
    assert len(f.graphs) == 2
    close(f(X[:3]), nn.relu(X[:3] * 2.0))


def test_grad_through_fused_function():
    w = mx.random.normal((16, 16))
    fn = lambda x, w: (nn.gelu(x @ w) * x).sum()
    f = fuse(fn, ALL)
    for got, want in zip(mx.grad(f, argnums=(0, 1))(X, w), mx.grad(fn, argnums=(0, 1))(X, w)):
        close(got, want, atol=1e-4)


def test_inside_and_around_mx_compile():
    fn = lambda x: nn.relu(x + 1.0) * 3.0
    f = fuse(fn, ALL)
    close(mx.compile(f)(X), fn(X))  # mx.compile around a fused function
    g = fuse(lambda x: mx.compile(fn)(x) - 1.0, ALL)  # compiled code inside
    close(g(X), fn(X) - 1.0)


def test_disabled_config_runs_the_original():
    f = fuse(lambda x: nn.relu(x), FusionConfig(enabled=False))
    close(f(X), nn.relu(X))
    assert f.graphs == []


@pytest.mark.parametrize("bad", [42, "relu", None])
def test_non_callables_are_type_errors(bad):
    with pytest.raises(TypeError, match="fuse"):
        fuse(bad)


def _item(x):
    return x * x.sum().item()


def _branch(x):
    return nn.relu(x) if x.sum() > 0 else -x


@pytest.mark.parametrize("fn", [_item, _branch])
def test_untraceable_falls_back_with_one_warning(fn):
    f = fuse(fn, ALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            close(f(X), fn(X))
    fallbacks = [w for w in caught if issubclass(w.category, FusionFallbackWarning)]
    assert len(fallbacks) == 1 and "could not trace" in str(fallbacks[0].message)
    assert list(f.fallbacks.values()) == [1]
    assert any(fb["name"] == fn.__qualname__ for fb in stats()["fallbacks"])


def test_unknown_primitive_falls_back(monkeypatch):
    monkeypatch.delitem(interpreter.PRIMITIVES, "Sin")
    w, b = mx.random.normal((32, 16)), mx.random.normal((32,))
    fn = lambda x: mx.sin(nn.relu(x @ w.T + b))  # noqa: E731
    f = fuse(fn, ALL, compile=False)
    with pytest.warns(FusionFallbackWarning, match="Sin"):
        close(f(X), fn(X))
    # With nothing to fuse the original runs as it is: no replay, no warning.
    g = fuse(lambda x: mx.sin(x) + 1, ALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(g(X), mx.sin(X) + 1)


# -- modules -----------------------------------------------------------------------------------
def test_fused_module_looks_like_the_original():
    model = MLP()
    fused = fuse(model, ALL)
    assert isinstance(fused, MLP) and fused.l1 is model.l1
    assert [k for k, _ in tree_flatten(fused.parameters())] == [k for k, _ in tree_flatten(model.parameters())]
    assert tree_flatten(fused.trainable_parameters()) and fused.training
    close(fused(X), model(X))
    assert fused.fusion_stats.applied_count >= 2
    fused.freeze(keys=["bias"])
    assert all("bias" not in k for k, _ in tree_flatten(fused.trainable_parameters()))


def test_module_sees_parameter_updates_and_weights_io(tmp_path):
    model = MLP()
    fused = fuse(model, ALL)
    fused(X)
    fused.update({"l3": {"bias": mx.full((4,), 5.0)}})
    close(fused(X), model(X))
    path = str(tmp_path / "w.safetensors")
    fused.save_weights(path)
    other = fuse(MLP(), ALL)
    other.load_weights(path)
    close(other(X), fused(X))
    assert len(fused.fusion_graphs) == 1  # new values, same signature: no retrace


def test_swapped_submodule_retraces():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    fused = fuse(model, ALL)
    fused(X)
    fused.layers[1] = nn.GELU()
    close(fused(X), nn.gelu(model.layers[0](X)))
    assert len(fused.fusion_graphs) == 2


def test_train_eval_retrace_and_dropout():
    fused = fuse(MLP(p_drop=0.5), ALL)
    fused.train()
    a, b = fused(X), fused(X)
    assert not mx.array_equal(a, b)  # dropout differs call to call
    fused.eval()
    c, d = fused(X), fused(X)
    assert mx.array_equal(c, d)
    assert len(fused.fusion_graphs) == 2


def test_value_and_grad_sgd_matches_unfused():
    ref, model = twin(MLP)
    fused = fuse(model, ALL)
    loss = lambda m, x, y: nn.losses.mse_loss(m(x), y)
    step_ref, step = nn.value_and_grad(ref, loss), nn.value_and_grad(fused, loss)
    opt_ref, opt = optim.SGD(learning_rate=0.1), optim.SGD(learning_rate=0.1)
    losses, losses_ref = [], []
    for _ in range(20):
        l, g = step(fused, X, Y)
        opt.update(fused, g)
        l_ref, g_ref = step_ref(ref, X, Y)
        opt_ref.update(ref, g_ref)
        mx.eval(fused.parameters(), ref.parameters(), l, l_ref)
        losses.append(l.item()), losses_ref.append(l_ref.item())
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-4)
    assert losses[-1] < losses[0]
    assert fused.fusion_stats.applied_count >= 2


def _sgd_step(model, opt, x, y):
    l, g = nn.value_and_grad(model, _mse)(model, x, y)
    opt.update(model, g)
    return l


def _mse(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def test_compiled_training_step_with_fused_module():
    ref, model = twin(MLP)
    fused = fuse(model, ALL)
    opt, opt_ref = optim.SGD(learning_rate=0.1), optim.SGD(learning_rate=0.1)
    state = [fused.state, opt.state]
    step = mx.compile(functools.partial(_sgd_step, fused, opt), inputs=state, outputs=state)
    for _ in range(5):
        l, l_ref = step(X, Y), _sgd_step(ref, opt_ref, X, Y)
        mx.eval(l, l_ref, ref.parameters())
        np.testing.assert_allclose(l.item(), l_ref.item(), rtol=1e-4)


def test_module_writing_its_state_falls_back():
    bn = nn.BatchNorm(16)
    ref = nn.BatchNorm(16)
    fused = fuse(bn, ALL)
    with pytest.warns(FusionFallbackWarning, match="writes Python state"):
        close(fused(X), ref(X))
    close(fused.running_mean, ref.running_mean)  # the state update happened


def test_process_stats_summary():
    fuse(MLP(), ALL)(X)
    s = stats()
    assert s["fused_objects"] >= 1 and s["applied_count"] >= 2 and s["memory_saved_bytes"] > 0
    assert any(k.startswith("linear") for k in s["by_pattern"])


# -- differential fuzzing ------------------------------------------------------------------------
W8 = mx.random.normal((8, 8), key=mx.random.key(5)) / 3
OPS = {
    "relu": lambda h, x, w, b: nn.relu(h),
    "gelu": lambda h, x, w, b: nn.gelu(h),
    "gelu_approx": lambda h, x, w, b: nn.gelu_approx(h),
    "silu": lambda h, x, w, b: nn.silu(h),
    "tanh": lambda h, x, w, b: mx.tanh(h),
    "sigmoid": lambda h, x, w, b: mx.sigmoid(h),
    "softmax": lambda h, x, w, b: mx.softmax(h, axis=-1),
    "add_x": lambda h, x, w, b: h + x,
    "mul_x_relu": lambda h, x, w, b: nn.relu(h * x),
    "sub_bias": lambda h, x, w, b: h - b,
    "div": lambda h, x, w, b: h / (1.0 + b * b),
    "affine": lambda h, x, w, b: h * 0.5 + 0.25,
    "matmul": lambda h, x, w, b: h @ w,
    "addmm": lambda h, x, w, b: mx.addmm(b, h, w),
    "linear_relu": lambda h, x, w, b: nn.relu(h @ w.T + b),
    "center": lambda h, x, w, b: h - h.mean(axis=-1, keepdims=True),
    "colsum": lambda h, x, w, b: h * h.sum(axis=0) / 8,
    "reshape_t": lambda h, x, w, b: mx.transpose(h.reshape(4, 2, 4), (0, 2, 1)).reshape(4, 8),
    "bcast_col": lambda h, x, w, b: h * x[:, :1],
}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=6))
def test_fused_matches_unfused_values_and_grads(names):
    def program(x, w, b):
        h = x
        for n in names:
            h = OPS[n](h, x, w, b)
        return h

    x = mx.random.normal((4, 8), key=mx.random.key(2))
    b = mx.random.normal((8,), key=mx.random.key(3))
    fused = fuse(program, ALL, compile=False)
    close(fused(x, W8, b), program(x, W8, b), atol=1e-4)
    loss = lambda f: (lambda x, w, b: (f(x, w, b) ** 2).sum())
    got = mx.grad(loss(fused), argnums=(0, 1, 2))(x, W8, b)
    want = mx.grad(loss(program), argnums=(0, 1, 2))(x, W8, b)
    for g, r in zip(got, want):
        close(g, r, atol=1e-3)
