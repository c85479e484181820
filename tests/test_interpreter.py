"""The replay table: planning, fused nodes, randomness, compiled vs eager."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_fusion.graph import interpreter
from mlx_fusion.graph.interpreter import PRIMITIVES, Replay, UnsupportedPrimitive, plan, register_primitive, run_graph
from mlx_fusion.graph.ir import Graph, Node, Value
from mlx_fusion.graph.trace import trace
from mlx_fusion.patterns import Activation, BinaryActivation, BinaryOp, LinearLayer, ScalarActivation, ScalarOp

F32 = mx.float32


def one_node_graph(op, inputs, out_shape, params):
    ins = [Value(f"in{i}", tuple(a.shape), a.dtype) for i, a in enumerate(inputs)]
    out = Value("out", out_shape, F32)
    return Graph(inputs=ins, outputs=[out], nodes=[Node(0, op, ins, [out], params)]).lint()


def test_unknown_primitive_fails_at_plan_time():
    g = one_node_graph("NoSuchPrimitive", [mx.ones(3)], (3,), ())
    with pytest.raises(UnsupportedPrimitive) as info:
        plan(g)  # nothing runs
    assert info.value.name == "NoSuchPrimitive"


def test_register_primitive_hook():
    g = one_node_graph("TimesK", [mx.arange(3.0)], (3,), {"k": 3.0})
    register_primitive("TimesK", lambda ins, p: [ins[0] * p["k"]])
    try:
        (out,) = run_graph(g, [mx.arange(3.0)])
        assert out.tolist() == [0.0, 3.0, 6.0]
    finally:
        del PRIMITIVES["TimesK"]


def test_wants_outputs_entries_see_output_values():
    seen = {}

    def fn(ins, p, outputs):
        seen["shape"] = outputs[0].shape
        return [mx.zeros(outputs[0].shape)]

    register_primitive("ZerosLike", fn, wants_outputs=True)
    try:
        run_graph(one_node_graph("ZerosLike", [mx.ones(2)], (2, 5), ()), [mx.ones(2)])
        assert seen["shape"] == (2, 5)
    finally:
        del PRIMITIVES["ZerosLike"]


def test_unsupported_variants_are_refused_at_plan_time():
    x = mx.ones((2, 3))
    g = one_node_graph("SliceUpdate", [x, mx.ones((1, 3))], (2, 3), (2, (0, 0), (1, 3), (1, 1)))  # Sum
    with pytest.raises(UnsupportedPrimitive, match="reduction"):
        plan(g)


def test_random_bits_match_mlx_bit_for_bit():
    for shape, fn in [((4, 6), mx.random.uniform), ((2, 3, 4), mx.random.normal)]:
        f = lambda k: fn(shape=shape, key=k)
        g = trace(f, mx.random.key(0))
        assert mx.array_equal(run_graph(g, [mx.random.key(9)])[0], f(mx.random.key(9)))


def test_random_bits_odd_size_with_explicit_key_is_refused():
    g = trace(lambda k: mx.random.uniform(shape=(3, 5), key=k), mx.random.key(0))
    with pytest.raises(UnsupportedPrimitive, match="odd"):
        plan(g)


@pytest.mark.parametrize("shape", [(4, 6), (3, 5)])
def test_dropout_replay_is_fresh_each_call_and_seedable(shape):
    drop, x = nn.Dropout(0.5), mx.ones(shape)
    r = plan(trace(drop, x), compile=True)
    a, b = r([x])[0], r([x])[0]
    assert not mx.array_equal(a, b)
    mx.random.seed(11)
    c = r([x])[0]
    mx.random.seed(11)
    assert mx.array_equal(c, r([x])[0])
    assert set(np.unique(np.array(c)).tolist()) <= {0.0, 2.0}


def test_compiled_and_eager_replay_agree():
    model = nn.TransformerEncoderLayer(16, 4, 32)
    model.eval()
    x = mx.random.normal((2, 5, 16))
    g = trace(model, x, None)
    from mlx.utils import tree_flatten

    inputs = [v for _, v in tree_flatten(model.parameters())] + [x]
    (a,), (b,) = Replay(g, compile=True)(inputs), Replay(g, compile=False)(inputs)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    np.testing.assert_allclose(np.array(a), np.array(model(x, None)), atol=1e-5)


# -- fused nodes (the contract with graph/rules.py) ------------------------------------------------
ops = pytest.importorskip("mlx_fusion.ops")


@pytest.mark.parametrize("act", list(Activation))
def test_fused_binary_node(act):
    a, b = mx.random.normal((4, 8)), mx.random.normal((4, 8))
    params = {"pattern": BinaryActivation(BinaryOp.SUB, act), "op": BinaryOp.SUB, "activation": act}
    (out,) = run_graph(one_node_graph("FusedBinary", [a, b], (4, 8), params), [a, b])
    np.testing.assert_allclose(np.array(out), np.array(act.reference(a - b)), atol=1e-5)


def test_fused_scalar_node():
    x = mx.random.normal((4, 8))
    act = Activation.SILU
    params = {"pattern": ScalarActivation(ScalarOp.AFFINE, act), "scale": 0.5, "shift": -1.0, "activation": act}
    (out,) = run_graph(one_node_graph("FusedScalar", [x], (4, 8), params), [x])
    np.testing.assert_allclose(np.array(out), np.array(act.reference(x * 0.5 - 1.0)), atol=1e-5)


@pytest.mark.parametrize("has_bias", [False, True])
def test_fused_linear_node_takes_the_transposed_weight(has_bias):
    x, w, b = mx.random.normal((3, 8)), mx.random.normal((5, 8)), mx.random.normal((5,))
    rhs = w.T  # what entered the Matmul: (K, N)
    ins = [x, rhs, b] if has_bias else [x, rhs]
    params = {"pattern": LinearLayer(has_bias, Activation.RELU), "activation": Activation.RELU, "has_bias": has_bias}
    (out,) = run_graph(one_node_graph("FusedLinear", ins, (3, 5), params), ins)
    expect = mx.maximum(x @ w.T + (b if has_bias else 0), 0)
    np.testing.assert_allclose(np.array(out), np.array(expect), atol=1e-5)


def test_fused_entry_checks_ops_at_plan_time(monkeypatch):
    def missing():
        raise ImportError("not built")

    monkeypatch.setattr(interpreter, "_ops", missing)
    x = mx.ones((2, 2))
    params = {"pattern": None, "op": BinaryOp.ADD, "activation": Activation.RELU}
    with pytest.raises(UnsupportedPrimitive, match="fused_binary"):
        plan(one_node_graph("FusedBinary", [x, x], (2, 2), params))
