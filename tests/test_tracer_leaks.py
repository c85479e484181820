"""Never wrong: traced code leaves no tracer arrays in the caller's objects.

Code that writes a list, an object, its own attributes or an output object holding arrays runs
unfused (one FusionFallbackWarning naming the cause) or has its state threaded through; either
way every array the caller sees afterwards is a real one. (Split from test_stale_traces.py.)
"""

import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest

pytest.importorskip("mlx_fusion.graph.optimizer")

from mlx_fusion.fuse import FusionFallbackWarning, fuse  # noqa: E402

from tests._fuse_helpers import ALL, X, close, fallback_warnings  # noqa: E402


def test_function_appending_to_a_closure_list_runs_unfused():
    seen = []

    def fn(x):
        y = nn.relu(x) * 2
        seen.append(y)
        return y

    f = fuse(fn, ALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = f(X)
    mx.eval(seen)  # no tracer left behind
    assert len(seen) == 1 and mx.array_equal(seen[0], out)
    msgs = fallback_warnings(caught)
    assert len(msgs) == 1 and "seen" in msgs[0]


def test_function_appending_to_an_argument_list_runs_unfused():
    def fn(x, acc):
        acc.append(x * 2)
        return nn.relu(x)

    f = fuse(fn, ALL)
    acc = []
    with pytest.warns(FusionFallbackWarning, match="args"):
        f(X, acc)
    f(X, acc)
    mx.eval(acc)
    assert len(acc) == 2


def test_module_setting_an_attribute_runs_unfused_and_is_restored():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls, self.last = nn.Linear(8, 8), 0, None

        def __call__(self, x):
            self.calls += 1
            y = nn.relu(self.lin(x))
            self.last = y
            return y

    m = Counter()
    f = fuse(m, ALL)
    with pytest.warns(FusionFallbackWarning, match="calls"):
        f(X)
    f(X)
    mx.eval(f.last)
    assert f.calls == 2


class Cache:
    def __init__(self):
        self.keys, self.offset = mx.zeros((1, 8)), 0


def test_function_writing_an_object_in_place_runs_unfused():
    cache = Cache()

    def fn(x):
        cache.keys[0:1] = x[:1]
        cache.offset += 1
        return nn.relu(x)

    f = fuse(fn, ALL)
    with pytest.warns(FusionFallbackWarning):
        f(X)
    mx.eval(cache.keys)
    close(cache.keys, X[:1])
    assert cache.offset == 1


def test_cache_object_argument_is_not_baked_in():
    def fn(x, cache):
        cache.keys = x + cache.keys
        cache.offset += 1
        return nn.relu(cache.keys)

    f, c1, c2 = fuse(fn, ALL), Cache(), Cache()
    with pytest.warns(FusionFallbackWarning, match="Cache"):
        for _ in range(3):
            f(mx.ones((1, 8)), c1)
    for _ in range(3):
        fn(mx.ones((1, 8)), c2)
    close(c1.keys, c2.keys)
    assert c1.offset == c2.offset == 3


def test_output_object_holding_arrays():
    class Out:
        pass

    def fn(x):
        o = Out()
        o.y = nn.relu(x)
        return o

    f = fuse(fn, ALL)
    with pytest.warns(FusionFallbackWarning):
        out = f(X)
    close(out.y, nn.relu(X))
    g = fuse(lambda x: (nn.relu(x), fn(x)), ALL)
    with pytest.warns(FusionFallbackWarning, match="the output"):
        a, o = g(X)
    close(o.y, a)
