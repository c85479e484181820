"""Never wrong: whatever changes between calls changes the result as it would unfused.

Each test changes one thing a trace could bake in, then compares the fused call
with the plain one (or checks for exactly one FusionFallbackWarning naming the cause).
"""

import copy
import pickle
import threading
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytest.importorskip("mlx_fusion.graph.optimizer")

from mlx_fusion.fuse import FusionFallbackWarning, fuse  # noqa: E402

from tests._fuse_helpers import ALL, X, close, fallback_warnings  # noqa: E402


class Scaled(nn.Module):
    def __init__(self, scale=2.0, flag=False, p=0.0):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale, self.flag = scale, flag
        self.drop = nn.Dropout(p)

    def __call__(self, x):
        h = nn.relu(self.lin(x)) * self.scale
        return self.drop(-h if self.flag else h)


# -- Python scalars ---------------------------------------------------------------------------
@pytest.mark.parametrize("values", [(1, 1.0), (True, 1), (1.0, True), (0.0, -0.0), (2, 2.5)])
def test_python_scalars_are_keyed_by_type_and_value(values):
    fn = lambda x, s: nn.relu(x) * s  # noqa: E731
    f = fuse(fn, ALL)
    ints = mx.array([1, 2, 3], mx.int32)
    for v in values:
        close(f(ints, v), fn(ints, v))
        close(f(X, v), fn(X, v))


def test_numpy_scalars_are_values():
    fn = lambda x, s: nn.relu(x) * s  # noqa: E731
    f = fuse(fn, ALL)
    for v in (np.float32(2.0), np.float32(3.0), np.float16(3.0)):
        close(f(X, v), fn(X, v))


# -- non-MLX arrays ---------------------------------------------------------------------------
def test_numpy_array_argument_runs_unfused_with_one_warning():
    fn = lambda x, a: nn.relu(x) + a  # noqa: E731
    f = fuse(fn, ALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            a = np.full((8,), float(k), np.float32)
            close(f(X, a), fn(X, a))
    msgs = fallback_warnings(caught)
    assert len(msgs) == 1 and "numpy.ndarray" in msgs[0], msgs


# -- modules: the original, attributes, submodules ---------------------------------------------
def test_parameter_set_on_the_original_module_is_seen():
    lin = nn.Linear(8, 8)
    f = fuse(lin, ALL)
    close(f(X), lin(X))
    lin.weight = mx.ones((8, 8))
    close(f(X), X @ mx.ones((8, 8)).T + lin.bias)
    lin.bias = mx.zeros((8,))
    close(f(X), X @ mx.ones((8, 8)).T)


@pytest.mark.parametrize("attr, value", [("scale", 3.0), ("scale", 3), ("flag", True)])
def test_changed_python_attribute_retraces(attr, value):
    ref = Scaled()
    m = fuse(ref, ALL)
    close(m(X), ref.__class__.__call__(ref, X))
    setattr(m, attr, value)
    setattr(ref, attr, value)
    close(m(X), Scaled.__call__(ref, X))
    assert len(m.fusion_graphs) == 2


def test_attribute_set_on_a_child_retraces():
    outer = nn.Sequential(Scaled(), nn.ReLU())
    f = fuse(outer, ALL)
    f(X)
    outer.layers[0].scale = -1.0
    want = nn.relu(Scaled.__call__(outer.layers[0], X))
    close(f(X), want)


def test_dropout_swapped_for_one_with_other_p():
    m = Scaled(p=0.1)
    f = fuse(m, ALL)
    f.train()
    f(X)
    m.drop = nn.Dropout(0.9)  # same class, other hyperparameter, on the original
    mx.random.seed(3)
    got = f(mx.ones((64, 8)))
    mx.random.seed(3)
    want = Scaled.__call__(m, mx.ones((64, 8)))
    close(got, want)


def test_config_object_attribute_changed_in_place():
    class Args:
        def __init__(self):
            self.mult = 2.0

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.args, self.lin = Args(), nn.Linear(8, 8)

        def __call__(self, x):
            return nn.relu(self.lin(x)) * self.args.mult

    m = M()
    f = fuse(m, ALL)
    f(X)
    m.args.mult = 5.0
    close(f(X), M.__call__(m, X))


# -- RNG -------------------------------------------------------------------------------------
class TwoDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.d1, self.d2 = nn.Linear(8, 8), nn.Dropout(0.5), nn.Dropout(0.5)

    def __call__(self, x):
        h = self.lin(x)
        return self.d1(h), self.d2(h)


def test_random_draws_match_unfused_bit_for_bit():
    m = TwoDrop()
    f = fuse(m, ALL)
    x = mx.ones((16, 8))
    mx.random.seed(11)
    got = [f(x) for _ in range(3)] + [mx.random.uniform(shape=(4,))]
    mx.random.seed(11)
    want = [TwoDrop.__call__(m, x) for _ in range(3)] + [mx.random.uniform(shape=(4,))]
    for g, w in zip(got, want):
        for a, b in zip(g if isinstance(g, tuple) else (g,), w if isinstance(w, tuple) else (w,)):
            assert mx.array_equal(a, b)
    masks = [a != 0 for pair in got[:3] for a in pair]
    assert len({tuple(np.array(k).ravel()) for k in masks}) == 6  # no two draws share a mask


def test_two_fused_dropout_models_do_not_share_masks():
    a, b = fuse(nn.Dropout(0.5), ALL), fuse(nn.Dropout(0.5), ALL)
    x = mx.ones((256,))
    masks = [np.array(f(x) != 0) for _ in range(3) for f in (a, b)]
    assert len({m.tobytes() for m in masks}) == len(masks)


def test_compiled_train_step_with_dropout_and_random_state():
    import mlx.optimizers as optim

    def make():
        mx.random.seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    ref, model = make(), make()
    model = fuse(model, ALL)
    y = mx.ones((4, 1))

    def step(m, opt):
        loss, g = nn.value_and_grad(m, lambda m: ((m(X) - y) ** 2).mean())(m)
        opt.update(m, g)
        return loss

    losses = {}
    for name, m in (("ref", ref), ("fused", model)):
        opt = optim.SGD(learning_rate=0.1)
        state = [m.state, opt.state, mx.random.state]
        c = mx.compile(lambda: step(m, opt), inputs=state, outputs=state)
        mx.random.seed(5)
        losses[name] = [c().item() for _ in range(4)]
    np.testing.assert_allclose(losses["fused"], losses["ref"], rtol=1e-5)
    assert len(set(losses["fused"])) > 1


# -- aliasing, checkpoint, methods --------------------------------------------------------------
def test_module_reachable_through_two_attributes():
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a

        def __call__(self, x):
            return nn.relu(self.b(nn.relu(self.a(x))))

    s = S()
    f = fuse(s, ALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(f(X), S.__call__(s, X))
    gf = nn.value_and_grad(f, lambda m, x: m(x).sum())(f, X)
    gs = nn.value_and_grad(s, lambda m, x: S.__call__(m, x).sum())(s, X)
    close(gf[0], gs[0], atol=1e-4)


def test_checkpointed_module_names_the_real_cause_or_works():
    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(8, 8)
            self.ck = nn.utils.checkpoint(self.inner)

        def __call__(self, x):
            return nn.relu(self.ck(x))

    m = C()
    ref = nn.relu(m.inner(X))
    f = fuse(m, ALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        close(f(X), ref)
    for msg in fallback_warnings(caught):
        assert "writes Python state" not in msg and "changes its own" not in msg, msg


def test_fuse_on_a_module_method():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        @fuse
        def __call__(self, x):
            return nn.relu(self.lin(x)) * 2

    m = M()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = m(X)
    close(out, nn.relu(m.lin(X)) * 2)
    m.lin.weight = mx.zeros((8, 8))
    close(m(X), nn.relu(m.lin(X)) * 2)
    g = nn.value_and_grad(m, lambda m, x: m(x).sum())(m, X)[1]
    assert g["lin"]["weight"].shape == (8, 8)


# -- threads, deepcopy, pickle -------------------------------------------------------------------
def test_first_call_from_a_worker_thread():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    mx.eval(m.parameters())
    f = fuse(m, ALL)
    out = {}

    def work():
        x = mx.ones((2, 8))
        out["y"] = f(x)
        mx.eval(out["y"])

    t = threading.Thread(target=work)
    t.start(), t.join()
    close(out["y"], m(mx.ones((2, 8))))


def test_deepcopy_and_pickle_after_first_call():
    m = Scaled()
    f = fuse(m, ALL)
    f(X)
    c = copy.deepcopy(f)
    close(c(X), f(X))
    c.lin.weight = mx.zeros((8, 8))  # the copy is independent
    assert not mx.array_equal(f(X), c(X))
    p = pickle.loads(pickle.dumps(f))
    close(p(X), f(X))
    assert type(p).__name__ == type(f).__name__ and isinstance(p, Scaled)


def test_code_arguments_are_keyed_by_what_they_run():
    fn = lambda x, act: act(x) * 2.0  # noqa: E731
    f = fuse(fn, ALL)
    lin = nn.Linear(8, 8)
    for act in (nn.relu, nn.relu, nn.gelu, lin.__call__, lin.__call__):  # a new bound method each access
        close(f(X, act), fn(X, act))
    assert len(f.graphs) == 3
    lin.weight = mx.zeros((8, 8))  # the bound method's module is threaded like an argument
    close(f(X, lin.__call__), fn(X, lin.__call__))
    assert len(f.graphs) == 3


def test_fused_bound_method_of_a_module_sees_updates():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def features(self, x):
            return nn.relu(self.lin(x)) * 2

    m = M()
    f = fuse(m.features, ALL)
    close(f(X), m.features(X))
    m.lin.weight = mx.zeros((8, 8))
    close(f(X), m.features(X))
    assert len(f.graphs) == 1


G_W = mx.ones((8, 8))
G_LIN = nn.Linear(8, 8)


def _reads_globals(x):
    return nn.relu(G_LIN(x @ G_W))


def test_globals_the_function_reads():
    global G_W
    f = fuse(_reads_globals, ALL)
    close(f(X), _reads_globals(X))
    G_LIN.weight = mx.zeros((8, 8))  # a global model updated: threaded
    close(f(X), _reads_globals(X))
    G_W = mx.full((8, 8), 0.25)  # a global array rebound: keyed
    close(f(X), _reads_globals(X))


G_SEEN = []


def _appends_to_a_global(x):
    y = nn.relu(x)
    G_SEEN.append(y)
    return y


def test_function_appending_to_a_global_list_runs_unfused():
    f = fuse(_appends_to_a_global, ALL)
    with pytest.warns(FusionFallbackWarning, match="G_SEEN"):
        f(X)
    f(X)
    mx.eval(G_SEEN)
    assert len(G_SEEN) == 2


def test_grad_of_a_top_level_parameter_after_the_original_was_differentiated():
    """value_and_grad(model) leaves new arrays on the original; value_and_grad(fused) must still
    differentiate the fused object's own (tracer) parameter, not take the original's back."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = mx.random.normal((3, 4), key=mx.random.key(5))

        def __call__(self, x):
            return self.body(x) @ self.head.T

    model, x = Head(), mx.random.normal((2, 4), key=mx.random.key(6))
    loss = lambda m, x: (m(x) ** 2).sum()  # noqa: E731
    fused = fuse(model)
    fused(x)
    _, want = nn.value_and_grad(model, loss)(model, x)
    _, got = nn.value_and_grad(fused, loss)(fused, x)
    assert mx.allclose(got["head"], want["head"]).item() and mx.abs(want["head"]).max().item() > 0
    model.head = mx.zeros((3, 4))  # a real change on the original is still taken over
    assert mx.array_equal(fused(x), model(x)).item()


@pytest.mark.parametrize("compile", [True, False])
def test_attribute_deleted_on_the_original_is_seen(compile):
    class Flagged(Scaled):
        def __call__(self, x):
            h = nn.relu(self.lin(x)) * getattr(self, "extra", 1.0)
            return h

    ref = Flagged()
    ref.extra = 3.0
    f = fuse(ref, ALL, compile=compile)
    for _ in range(2):
        close(f(X), Flagged.__call__(ref, X))
    del ref.extra
    close(f(X), Flagged.__call__(ref, X))
