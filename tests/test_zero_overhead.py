"""A trace that fuses nothing runs the original callable; tracing leaves MLX's compile switch as it was."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytest.importorskip("mlx_fusion.graph.optimizer")

from mlx_fusion.config import FusionConfig  # noqa: E402
from mlx_fusion.fuse import fuse  # noqa: E402
from mlx_fusion.graph import interpreter  # noqa: E402
from mlx_fusion.graph.trace import _compile_enabled, trace  # noqa: E402

from tests._fuse_helpers import GPU_RELATIVE, on_gpu  # noqa: E402

ALL = FusionConfig(min_tensor_size=0)
NOTHING = FusionConfig(min_tensor_size=1 << 40)  # no match is ever big enough
X = mx.random.normal((4, 8), key=mx.random.key(0))


@pytest.fixture
def no_replay(monkeypatch):
    """Any replay of a graph fails the test: the original must run."""

    def refuse(self, inputs):
        raise AssertionError("a graph was replayed")

    monkeypatch.setattr(interpreter.Replay, "__call__", refuse)


@pytest.mark.parametrize("compile", [True, False])
def test_zero_fusion_function_and_module_run_the_original(no_replay, compile):
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    fm = fuse(mlp, NOTHING, compile=compile)
    ff = fuse(lambda x: mx.tanh(x) * 2, NOTHING, compile=compile)
    for _ in range(3):
        assert mx.allclose(fm(X), nn.Sequential.__call__(mlp, X)).item()
        assert mx.allclose(ff(X), mx.tanh(X) * 2).item()
    assert len(fm.fusion_graphs) == 1 and fm.fusion_stats.applied_count == 0
    assert all(e.direct for e in fm._fusion.cache.values())


def test_zero_fusion_module_sees_parameter_updates_under_compile():
    lin = nn.Linear(8, 8)
    f = fuse(lin, NOTHING)
    f(X)
    f.update({"weight": mx.zeros((8, 8))})
    assert mx.allclose(f(X), mx.broadcast_to(lin.bias, (4, 8))).item()
    loss = lambda m: m(X).sum()  # noqa: E731
    g = nn.value_and_grad(f, loss)(f)[1]
    rtol = 1e-5 if not on_gpu() else GPU_RELATIVE  # a GPU may run the float32 matmul of the gradient in TF32
    np.testing.assert_allclose(np.array(g["weight"]), np.array(mx.broadcast_to(X.sum(0), (8, 8))), rtol=rtol, atol=rtol)


def test_zero_fusion_dropout_draws_fresh_masks_under_compile():
    d = fuse(nn.Dropout(0.5), NOTHING)
    x = mx.ones((256,))
    masks = {np.array(d(x) != 0).tobytes() for _ in range(4)}
    assert len(masks) == 4


def test_tracing_restores_the_compile_switch():
    fn = lambda x: mx.compile(lambda y: nn.silu(y) * y)(x) + 1  # noqa: E731 (a Compiled primitive inside)
    assert _compile_enabled()
    g = trace(fn, X)
    assert "Compiled" not in g.op_counts() and _compile_enabled()
    mx.disable_compile()
    try:
        trace(fn, X)
        assert not _compile_enabled()  # the user's choice stays
    finally:
        mx.enable_compile()


def test_compiled_subfunction_is_traced_through_and_fused():
    w, b = mx.random.normal((8, 8)), mx.random.normal((8,))
    act = mx.compile(nn.relu)
    fn = lambda x: act(x @ w.T + b)  # noqa: E731
    f = fuse(fn, ALL, compile=False)
    assert mx.allclose(f(X), fn(X)).item()
    assert f.stats.applied_count >= 1 and not f.fallbacks


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.scale = 2.0

    def __call__(self, x):
        return self.inner(x) * self.scale


def test_eager_module_that_fused_nothing_skips_the_key_and_stays_right():
    """`fuse(m, compile=False)`: once a call ran the original forward, calls with the same inputs skip
    the layout check and the key (`direct_sig`), and still see every change, as the original does."""
    from mlx_fusion import _fused_module

    model = _Scaled()
    fused = fuse(model, NOTHING, compile=False)
    for _ in range(2):
        assert mx.allclose(fused(X), model(X)).item()
    assert fused._fusion.direct_sig is not None
    model.scale = 3.0  # a Python attribute read by the forward, on the original's top level: `pull`
    assert mx.allclose(fused(X), model(X)).item()
    model.inner.weight = model.inner.weight * 0 + 1  # a child's parameter
    assert mx.allclose(fused(X), model(X)).item()
    model.inner = nn.Linear(8, 8)  # the original's top level: taken over by `pull`
    assert mx.allclose(fused(X), model(X)).item()
    for _ in range(2 * _fused_module.RECHECK_EVERY):  # the periodic full check keeps it direct
        assert mx.allclose(fused(X), model(X)).item()
    assert all(e.direct for e in fused._fusion.cache.values())


def test_eager_skip_sees_a_new_config_at_once():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    mx.eval(model.parameters())
    from mlx_fusion.config import fusion_config

    fused = fuse(model, compile=False)
    with fusion_config(min_tensor_size=1 << 40):
        for _ in range(3):
            fused(X)
        assert fused.fusion_stats.applied_count == 0 and fused._fusion.traces == 1
    with fusion_config(min_tensor_size=0):
        fused(X)  # another config object: the full path, which traces again
        assert fused._fusion.traces == 2


TOL = GPU_RELATIVE if on_gpu() else 1e-5  # (the compiled original and the plain one: TF32 on a GPU)


class _Cfg:
    mult = 2.0


class _Deep(nn.Module):
    """A forward that reads attributes at every level: the top, a child, a list, a config object."""

    def __init__(self):
        super().__init__()
        self.cfg = _Cfg()
        self.blocks = [_Scaled(), _Scaled()]
        self.flip = False

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return (-x if self.flip else x) * self.cfg.mult


def _changes(model):
    """Each change a compiled 0-fusion call must see (the compiled original bakes attributes)."""
    yield lambda: setattr(model, "flip", True)  # the original's top level (`pull`)
    yield lambda: setattr(model.blocks[0], "scale", -1.5)  # a child's attribute
    yield lambda: setattr(model.blocks[1], "inner", nn.Linear(8, 8))  # a child swapped for one of its class
    yield lambda: setattr(model.cfg, "mult", 0.5)  # a config object changed in place
    yield lambda: model.blocks.append(_Scaled())  # a list grown in place
    yield lambda: model.blocks[0].inner.update({"weight": mx.ones((8, 8))})  # a parameter


@pytest.mark.parametrize("early", [True, False], ids=["evaluated early (a GPU)", "not (the CPU)"])
def test_compiled_call_checking_its_layout_during_the_evaluation_sees_every_change(early, monkeypatch):
    """`fuse(m)` that fused nothing runs the compiled original before its layout check and, on a
    GPU, starts the evaluation (`_overlapped`); a change still gives the new result, never the stale one."""
    from mlx_fusion import _fused_module

    monkeypatch.setattr(_fused_module, "_runs_apart", lambda: early)
    model = _Deep()
    fused = fuse(model, NOTHING)
    for change in _changes(model):
        for _ in range(3):  # the first call after a change takes the full path, the next ones overlap
            assert mx.allclose(fused(X), _Deep.__call__(model, X), atol=TOL, rtol=TOL).item()
        assert fused._fusion.fast is not None
        change()
    assert mx.allclose(fused(X), _Deep.__call__(model, X), atol=TOL, rtol=TOL).item()


def test_compiled_call_under_a_transformation_checks_first():
    """Under value_and_grad MLX refuses the early evaluation: the check runs, the gradient is right."""
    model = _Deep()
    fused = fuse(model, NOTHING)
    loss = lambda m, x: m(x).sum()  # noqa: E731
    for step in range(3):
        if step == 2:
            model.blocks[0].scale = 5.0
        got = nn.value_and_grad(fused, loss)(fused, X)
        want = nn.value_and_grad(model, loss)(model, X)
        assert mx.allclose(got[0], want[0], rtol=TOL).item()
        g, w = got[1]["blocks"][0]["inner"]["weight"], want[1]["blocks"][0]["inner"]["weight"]
        assert mx.allclose(g, w, rtol=TOL, atol=TOL).item()


def test_compiled_calls_back_to_back_see_a_change_between_them():
    """Several calls before one evaluation (not evaluated early: `BACK_TO_BACK_S`), a change between two."""
    model = _Deep()
    fused = fuse(model, NOTHING)
    mx.eval(fused(X), fused(X))
    first = fused(X)
    model.blocks[0].scale = -3.0
    second = fused(X)
    want_second = _Deep.__call__(model, X)
    model.blocks[0].scale = 2.0
    assert mx.allclose(first, _Deep.__call__(model, X), atol=TOL, rtol=TOL).item()
    assert mx.allclose(second, want_second, atol=TOL, rtol=TOL).item()


@pytest.mark.parametrize("compile", [False, True])
def test_training_a_fused_module_keeps_no_copy_of_the_last_parameters(compile):
    """Between two training steps a fused module holds no array the plain module would not
    (it kept the last call's parameters once: one more copy of the weights resident, and at
    the peak, as the optimizer could not reuse their buffers)."""
    import gc

    import mlx.optimizers as optim

    def resident_between_steps(model, target) -> int:
        opt = optim.AdamW(learning_rate=1e-3)
        grad = nn.value_and_grad(target, lambda m, x: (m(x) ** 2).mean())
        x = mx.ones((4, 256))
        for _ in range(3):
            loss, grads = grad(target, x)
            opt.update(target, grads)
            mx.eval(loss, model.parameters(), opt.state)
        gc.collect()
        mx.synchronize()
        mx.clear_cache()
        return mx.get_active_memory()

    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    mx.eval(model.parameters())
    weights = sum(p.nbytes for _, p in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    plain = resident_between_steps(model, model)
    fused = resident_between_steps(model, fuse(model, compile=compile))
    assert fused - plain < weights // 4
