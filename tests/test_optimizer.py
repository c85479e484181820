"""Rewrites: the graph after `apply_fusions` lints, keeps its outputs and computes the same values."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_fusion.config import FusionConfig, fusion_config
from mlx_fusion.graph.optimizer import FusionOptimizer, FusionStats
from mlx_fusion.patterns import BinaryActivation
from tests._graphs import ALL, LlamaMLP, frozen, mlp, optimizer, run_graph, trace_graph

ACTS = [nn.relu, nn.gelu, nn.gelu_approx, nn.silu]
X = mx.ones((4, 8))


def rand(*shape, dtype=mx.float32, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def assert_same(before, after, args, tol=1e-5):
    want, got = run_graph(before, *args), run_graph(after, *args)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32)),
                                   rtol=tol, atol=tol)


def rewrite(fn, *args, config=ALL, **kw):
    g = trace_graph(fn, *args)
    before = g.copy()
    stats = optimizer(config, **kw).optimize(g)
    assert g.outputs == before.outputs
    return before, g, stats


# -- stats ------------------------------------------------------------------------------------------
def test_stats_merge_and_dict():
    a = FusionStats(1, 0, 100, {"add+relu": 1})
    b = FusionStats(2, 1, 50, {"add+relu": 1, "linear+relu": 1})
    assert a.merge(b) is a
    assert a.as_dict() == {"applied_count": 3, "failed_count": 1, "memory_saved_bytes": 150,
                           "by_pattern": {"add+relu": 2, "linear+relu": 1}}
    assert FusionStats().as_dict()["by_pattern"] == {}


# -- rewriting ----------------------------------------------------------------------------------------
def test_add_relu_rewrite():
    before, g, stats = rewrite(lambda a, b: nn.relu(a + b), X, X)
    assert stats.as_dict() == {"applied_count": 1, "failed_count": 0, "memory_saved_bytes": 4 * 8 * 4,
                               "by_pattern": {"add+relu": 1}}
    (n,) = g.nodes  # the Broadcast of 0 died with the Maximum
    assert n.op == "FusedBinary" and n.id == before.next_id()
    assert [v.name for v in n.inputs] == ["A", "B"] and n.outputs == before.nodes[-1].outputs
    assert n.params == {"pattern": BinaryActivation("add", "relu"), "op": "add", "activation": "relu"}


def test_gelu_memory_savings_counts_every_intermediate():
    _, g, stats = rewrite(lambda a, b: nn.gelu(a + b), X, X)
    assert stats.memory_saved_bytes == 5 * 4 * 8 * 4  # Add, Divide, Erf, Add, Multiply outputs
    assert g.op_counts() == {"FusedBinary": 1}


def test_shared_broadcast_survives_until_unused():
    def f(a, b, c, d):
        return nn.relu(a + b), nn.relu(c * d)  # one Broadcast(0) feeds both Maximums
    args = [rand(4, 8, seed=i) for i in range(4)]
    g = trace_graph(f, *args)
    zero = [n for n in g.nodes if n.op == "Broadcast"]
    assert len(zero) == 1
    only_add = FusionConfig(min_tensor_size=0, enabled_patterns={"add+relu"})
    optimizer(only_add).optimize(g)
    assert g.op_counts() == {"FusedBinary": 1, "Broadcast": 1, "Multiply": 1, "Maximum": 1}
    optimizer().optimize(g)
    assert g.op_counts() == {"FusedBinary": 2}


def test_stale_opportunities_count_as_failed():
    g = trace_graph(mlp([8, 16, 16, 4]), X)
    opt = optimizer()
    opps = opt.detect_opportunities(g)
    assert opt.apply_fusions(g, opps).applied_count == 2
    again = opt.apply_fusions(g, opps)
    assert (again.applied_count, again.failed_count) == (0, 2)
    g.lint()


def test_detect_is_sorted_by_benefit_and_disjoint():
    g = trace_graph(lambda a, b, w, c: (nn.relu(a + b), nn.gelu(a @ w.T + c), nn.silu(b * 2.0)),
                    mx.ones((64, 64)), mx.ones((64, 64)), mx.ones((64, 64)), mx.ones((64,)))
    opps = optimizer().detect_opportunities(g)
    assert [o.benefit for o in opps] == sorted((o.benefit for o in opps), reverse=True)
    ids = [i for o in opps for i in o.node_ids]
    assert len(ids) == len(set(ids))
    assert {o.name for o in opps} == {"add+relu", "linear+bias+gelu", "scalar-mul+silu"}
    assert all(o.source == "model" and o.estimated_speedup > 1 for o in opps)


def test_detect_does_not_modify_graph():
    g = trace_graph(mlp([8, 16, 4]), X)
    text = str(g)
    optimizer().detect_opportunities(g)
    assert str(g) == text


def test_uses_process_config_when_none_given():
    g = trace_graph(lambda a, b: nn.relu(a + b), X, X)
    opt = FusionOptimizer(device="cpu")
    with fusion_config(min_tensor_size=0):
        assert len(opt.detect_opportunities(g)) == 1
    with fusion_config(min_tensor_size=0, enabled=False):
        assert opt.optimize(g).applied_count == 0


# -- price function (what fuse() passes: the tracker's lookup) ----------------------------------------------
class FakeTracker:
    def __init__(self, speedup):
        self.speedup, self.calls = speedup, []

    def lookup(self, pattern, dtype, size, device):
        self.calls.append((pattern, dtype, size, device))
        return self.speedup


def test_measured_price_overrides_model():
    g = trace_graph(lambda a, b: nn.relu(a + b), X, X)
    t = FakeTracker(3.0)
    (o,) = optimizer(price=t.lookup).detect_opportunities(g)
    assert (o.source, o.estimated_speedup) == ("measured", 3.0)
    assert t.calls == [(BinaryActivation("add", "relu"), mx.float32, 32, "cpu")]


def test_price_may_say_where_its_number_comes_from():
    g = trace_graph(lambda a, b: nn.relu(a + b), X, X)
    (o,) = optimizer(price=lambda *key: (2.5, "shipped")).detect_opportunities(g)
    assert (o.source, o.estimated_speedup) == ("shipped", 2.5)
    assert optimizer(price=lambda *key: (0.5, "shipped")).detect_opportunities(g) == []


def test_measured_slowdown_skips_and_none_falls_back():
    g = trace_graph(lambda a, b: nn.relu(a + b), X, X)
    assert optimizer(price=FakeTracker(0.8).lookup).detect_opportunities(g) == []
    (o,) = optimizer(price=FakeTracker(None).lookup).detect_opportunities(g)
    assert o.source == "model"


def test_graph_package_does_not_import_the_measurement_code():
    """graph/ is the compiler core: measurements reach it only as a price function."""
    import ast
    from pathlib import Path

    import mlx_fusion.graph

    for path in Path(mlx_fusion.graph.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names]
                assert not any(n.split(".")[-1] in ("tracker", "benchmark") for n in names), (path, names)


# -- numerics: the rewritten graph computes what the original did --------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fn", [
    lambda a, b, act: act(a + b), lambda a, b, act: act(a - b[:1]), lambda a, b, act: act(a * b),
    lambda a, b, act: act(a / (mx.abs(b) + 1)), lambda a, b, act: act(a * 3.0 - 0.5),
    lambda a, b, act: act(a / 4.0 + 1.0), lambda a, b, act: act(2.0 + a),
])
def test_elementwise_rewrites_compute_the_same(fn, act):
    args = [rand(4, 8), rand(4, 8, seed=1)]
    before, after, stats = rewrite(lambda a, b: fn(a, b, act), *args)
    assert stats.applied_count == 1
    assert_same(before, after, args)


@pytest.mark.parametrize("model, shape, expect", [
    (lambda: mlp([8, 16, 16, 4]), (4, 8), {"linear+bias+relu": 2}),
    (lambda: mlp([8, 32, 8], act=nn.GELU), (2, 3, 8), {"linear+bias+gelu": 1}),
    (lambda: frozen(LlamaMLP(8, 16)), (2, 3, 8), {"glu+silu": 1}),
])
def test_model_rewrites_compute_the_same(model, shape, expect):
    m = model()
    x = rand(*shape)
    before, after, stats = rewrite(m, x)
    assert stats.by_pattern == expect and stats.failed_count == 0
    assert_same(before, after, [x])


def test_transformer_rewrite_computes_the_same():
    layer = frozen(nn.TransformerEncoderLayer(8, 2, 16))
    x = rand(2, 4, 8)
    before, after, stats = rewrite(lambda y: layer(y, None), x)
    assert stats.by_pattern == {"linear+bias+relu": 1}  # add+layer_norm is not searched for (docs/add-norm.md)
    assert after.op_counts()["FusedLinear"] == 1 and "FusedAddNorm" not in after.op_counts()
    assert_same(before, after, [x])


def test_linear_bias_only_and_3d_matmul_bias():
    args = [rand(2, 3, 8), rand(16, 8, seed=1), rand(16, seed=2)]
    before, after, stats = rewrite(lambda a, w, b: (a @ w.T + b) * 2.0, *args)
    assert stats.by_pattern == {"linear+bias+none": 1}
    (lin,) = [n for n in after.nodes if n.op == "FusedLinear"]
    assert lin.inputs[0].shape == (2, 3, 8) and lin.outputs[0].shape == (2, 3, 16)
    assert "Flatten" not in after.op_counts()  # the look-through Flatten died
    assert_same(before, after, args)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 6), n=st.integers(1, 6), act=st.sampled_from(ACTS),
       dtype=st.sampled_from([mx.float32, mx.float16, mx.bfloat16]), bias=st.booleans(),
       scale=st.sampled_from([0.5, 2.0, -1.0]), shift=st.floats(-2, 2, width=16))
def test_chain_rewrites_compute_the_same(rows, k, n, act, dtype, bias, scale, shift):
    """linear -> act -> scalar affine -> act -> binary -> act, random sizes and dtypes."""
    args = [rand(rows, k, dtype=dtype), rand(n, k, dtype=dtype, seed=1), rand(n, dtype=dtype, seed=2),
            rand(rows, n, dtype=dtype, seed=3)]

    def f(x, w, b, r):
        y = act(x @ w.T + b) if bias else act(x @ w.T)
        return act(act(y * scale + shift) + r)

    before, after, stats = rewrite(f, *args)
    assert stats.applied_count == 3 and stats.failed_count == 0
    assert set(after.op_counts()) <= {"FusedLinear", "FusedScalar", "FusedBinary", "Transpose"}
    tol = 1e-5 if dtype == mx.float32 else 5e-2
    assert_same(before, after, args, tol=tol)


# -- end to end with the project's own tracer, interpreter and fused ops ----------------------------------
@pytest.mark.parametrize("make, shape", [
    (lambda: mlp([8, 16, 16, 4]), (4, 8)),
    (lambda: mlp([8, 32, 8], act=nn.GELU), (2, 3, 8)),
    (lambda: frozen(LlamaMLP(8, 16)), (2, 3, 8)),
])
def test_end_to_end_with_interpreter(make, shape):
    trace = pytest.importorskip("mlx_fusion.graph.trace")
    interpreter = pytest.importorskip("mlx_fusion.graph.interpreter")
    from mlx.utils import tree_flatten
    model, x = make(), rand(*shape)
    g = trace.trace(model, x)
    stats = optimizer().optimize(g)
    assert stats.applied_count >= 1 and stats.failed_count == 0
    inputs = [v for _, v in tree_flatten(model.parameters())] + [x]
    (got,) = interpreter.run_graph(g, inputs)
    np.testing.assert_allclose(np.array(got), np.array(model(x)), rtol=1e-5, atol=1e-5)
