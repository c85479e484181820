"""State a fused call reads and writes: split modules (fused children), closures."""

import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx_fusion.ops
import numpy as np
import pytest

pytest.importorskip("mlx_fusion.graph.optimizer")

from mlx_fusion.fuse import FusionFallbackWarning, fuse  # noqa: E402

from tests._fuse_helpers import ALL, X, close, fallback_warnings  # noqa: E402


# -- split: a module that cannot be traced whole runs its forward with fused children -----------
class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.steps = 0

    def __call__(self, x):
        self.steps += 1  # writes its own state: cannot be traced whole
        return self.mlp(self.bn(x))


def test_split_module_matches_values_grads_and_state():
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    ref = WithNorm()
    model = WithNorm()
    model.update(ref.parameters())
    fused = fuse(model, ALL, compile=False)
    loss = lambda m, x: (m(x) ** 2).mean()  # noqa: E731
    opt, opt_ref = optim.SGD(learning_rate=0.1), optim.SGD(learning_rate=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            l, g = nn.value_and_grad(fused, loss)(fused, X)
            opt.update(fused, g)
            l_ref, g_ref = nn.value_and_grad(ref, loss)(ref, X)
            opt_ref.update(ref, g_ref)
            np.testing.assert_allclose(l.item(), l_ref.item(), rtol=1e-5)
    msgs = fallback_warnings(caught)  # once each: WithNorm (steps) and its BatchNorm child (running stats)
    assert len(msgs) == 2 and "WithNorm.steps" in msgs[0] and "BatchNorm.running_mean" in msgs[1], msgs
    for (k, a), (_, b) in zip(tree_flatten(fused.parameters()), tree_flatten(ref.parameters())):
        close(a, b, atol=1e-5)
    close(fused.bn.running_mean, ref.bn.running_mean)
    assert fused.steps == 3
    kids = dict(fused.fusion_states())
    assert kids["WithNorm.mlp"].stats.applied_count >= 1  # the MLP child was traced and fused


# -- closures -----------------------------------------------------------------------------------
@pytest.mark.parametrize("compile", [True, False])
def test_closure_array_rebound_and_closure_model_updated(compile):
    w = mx.ones((8, 8))
    lin = nn.Linear(8, 8)

    def fn(x):
        return nn.relu(lin(x @ w))

    f = fuse(fn, ALL, compile=compile)
    close(f(X), fn(X))
    w = mx.full((8, 8), 0.5)  # noqa: F841 (rebinding the closure cell)
    close(f(X), fn(X))
    lin.weight = mx.zeros((8, 8))  # the model the function closes over, updated
    close(f(X), fn(X))
    lin.update({"bias": mx.full((8,), 2.0)})
    close(f(X), fn(X))
    assert len(f.graphs) == 1  # new values, same shapes: no retrace

    scale = 2.0

    def g(x):
        return nn.relu(x) * scale

    fg = fuse(g, ALL, compile=compile)
    close(fg(X), g(X))
    scale = 3.0  # noqa: F841 (a closure scalar rebound: keyed)
    close(fg(X), g(X))


def test_fused_objects_called_inside_a_trace_run_plain():
    inner_fn = fuse(lambda x: nn.relu(x) * 2.0, ALL)
    inner_mod = fuse(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), ALL)
    outer = fuse(lambda x: inner_mod(inner_fn(x)) + 1.0, ALL, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionFallbackWarning)
        got = outer(X)
    want = nn.Sequential.__call__(inner_mod, nn.relu(X) * 2.0) + 1.0
    close(got, want)
    assert outer.stats.applied_count >= 1  # the outer trace saw plain ops it could fuse
    assert not inner_fn.graphs and not inner_mod.fusion_graphs  # nothing traced inside the trace


def test_tracing_flag_lets_a_custom_function_trace_as_its_reference():
    """What mlx_fusion.ops can do: a custom_function cannot be exported; the flag says when to step aside."""
    from mlx_fusion._tracing import tracing

    @mx.custom_function
    def _double_relu(x):
        return nn.relu(x) * 2

    def op(x):  # an op in the style of mlx_fusion.ops, reading the flag
        return nn.relu(x) * 2 if tracing() else _double_relu(x)

    fn = lambda x: op(x) + 1.0  # noqa: E731
    f = fuse(fn, ALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionFallbackWarning)
        close(f(X), nn.relu(X) * 2 + 1.0)
    assert len(f.graphs) == 1 and "CustomTransforms" not in f.graphs[0].op_counts()
    assert not tracing()


@pytest.mark.parametrize("call", [
    lambda x, w: mlx_fusion.ops.fused_binary(x, 1.0, op="sub", activation="relu"),
    lambda x, w: mlx_fusion.ops.fused_scalar(x, 2.0, 0.5, activation="gelu"),
    lambda x, w: mlx_fusion.ops.fused_linear(x, w, None, activation="silu"),
], ids=["binary", "scalar", "linear"])
def test_fused_ops_inside_a_fused_function_trace_as_their_reference(call):
    """mlx_fusion.ops called by user code that is itself fused: traced as plain MLX, re-matched, no fallback."""
    w = mx.random.normal((8, X.shape[-1]), key=mx.random.key(3))
    f = fuse(lambda x, w: call(x, w) * 3.0, ALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionFallbackWarning)
        close(f(X, w), call(X, w) * 3.0)
    assert "CustomTransforms" not in f.graphs[0].op_counts()
