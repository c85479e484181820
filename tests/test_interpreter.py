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


# -- primitives language models produce (mlx_fusion/graph/model_primitives.py) ----------------------
# Nodes are built by hand with MLX 0.32's exported param layouts, so entries for primitives that
# only a GPU trace contains (RoPE, ScaledDotProductAttention, CrossEntropy) are checked on the CPU.
def node_graph(op, inputs, outputs, params):
    """A one-node graph; `outputs` are (shape, dtype) pairs."""
    ins = [Value(f"in{i}", tuple(a.shape), a.dtype) for i, a in enumerate(inputs)]
    outs = [Value(f"out{i}", tuple(s), d) for i, (s, d) in enumerate(outputs)]
    return Graph(inputs=ins, outputs=outs, nodes=[Node(0, op, ins, outs, params)]).lint()


def replay_node(op, inputs, outputs, params, compile=False):
    return Replay(node_graph(op, inputs, outputs, params), compile=compile)(inputs)


def assert_close(a, b, atol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_allclose(np.array(a.astype(F32)), np.array(b.astype(F32)), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("with_freqs", [False, True])
def test_rope_forward_and_inverse_nodes(traditional, with_freqs):
    x, ct, offset = mx.random.normal((2, 3, 5, 16)), mx.random.normal((2, 3, 5, 16)), mx.array(3)
    freqs = mx.random.uniform(1, 100, (4,)) if with_freqs else None
    kw = dict(traditional=traditional, base=None if with_freqs else 10000.0, scale=0.5, freqs=freqs)
    fwd = lambda a: mx.fast.rope(a, 8, offset=offset, **kw)
    ins = [x, offset] + ([freqs] if with_freqs else [])
    params = (8, traditional, 10000.0, 0.5, True)  # dims, traditional, base, scale, forward
    (out,) = replay_node("RoPE", ins, [(x.shape, F32)], params)
    assert_close(out, fwd(x))
    # The inverse rotation is what RoPE's VJP applies to the cotangent.
    _, (expect,) = mx.vjp(fwd, [x], [ct])
    (inv,) = replay_node("RoPE", [ct] + ins[1:], [(x.shape, F32)], params[:4] + (False,))
    assert_close(inv, expect)


def reference_logsumexp(q, k, scale, mask):
    reps = q.shape[1] // k.shape[1]
    k = mx.repeat(k, reps, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    return mx.logsumexp(scores, axis=-1, keepdims=True)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("logsumexp", [False, True])
def test_attention_node_with_and_without_logsumexp(mask_kind, logsumexp):
    b, hq, hk, lq, lk, d = 2, 4, 2, 3, 5, 8
    q, k, v = mx.random.normal((b, hq, lq, d)), mx.random.normal((b, hk, lk, d)), mx.random.normal((b, hk, lk, d))
    scale = d ** -0.5
    causal_mask = mx.arange(lk - lq, lk)[:, None] >= mx.arange(lk)[None]
    mask = {"none": None, "causal": None, "bool": mx.broadcast_to(causal_mask, (b, hq, lq, lk)),
            "additive": mx.random.normal((b, hq, lq, lk))}[mask_kind]
    ins = [q, k, v] + ([mask] if mask is not None else [])
    outputs = [((b, hq, lq, d), F32)] + ([((b, hq, lq, 1), F32)] if logsumexp else [])
    params = (scale, mask_kind == "causal", False, logsumexp, False)  # + force_fused
    outs = replay_node("ScaledDotProductAttention", ins, outputs, params, compile=True)
    mlx_mask = "causal" if mask_kind == "causal" else mask
    assert_close(outs[0], mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mlx_mask))
    assert len(outs) == len(outputs)
    if logsumexp:
        ref_mask = causal_mask if mask_kind == "causal" else mask
        assert_close(outs[1], reference_logsumexp(q, k, scale, ref_mask))


def test_attention_node_with_sinks_and_logsumexp():
    b, h, l, d = 1, 2, 4, 8
    q, k, v = (mx.random.normal((b, h, l, d)) for _ in range(3))
    sinks = mx.array([0.5, -1.0])
    params = (0.3, True, True, True, False)
    outs = replay_node("ScaledDotProductAttention", [q, k, v, sinks],
                       [((b, h, l, d), F32), ((b, h, l, 1), F32)], params)
    assert_close(outs[0], mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal", sinks=sinks))
    scores = (q * 0.3) @ k.swapaxes(-1, -2)
    scores = mx.where(mx.tril(mx.ones((l, l), mx.bool_)), scores, -mx.inf)
    scores = mx.concatenate([mx.broadcast_to(sinks.reshape(1, h, 1, 1), (b, h, l, 1)), scores], axis=-1)
    assert_close(outs[1], mx.logsumexp(scores, axis=-1, keepdims=True))


def test_cross_entropy_node():
    logits, targets = mx.random.normal((3, 5, 11)), mx.random.randint(0, 11, (3, 5))
    (out,) = replay_node("CrossEntropy", [logits, targets], [((3, 5), F32)], ())
    assert_close(out, nn.losses.cross_entropy(logits, targets))


def traced_nodes(fn, *args):
    """(graph, {op: params}) of a real trace, to check the exported layout too."""
    g = trace(fn, *args)
    return g, {n.op: n.params for n in g.nodes}


@pytest.mark.parametrize("indices", ["rhs", "rhs_sorted", "lhs_sorted", "both"])
def test_gather_mm_replays_every_index_form(indices):
    a, w = mx.random.normal((6, 1, 8)), mx.random.normal((4, 8, 16))
    rhs = mx.array([3, 0, 1, 3, 2, 0], dtype=mx.uint32)
    if indices == "rhs":
        fn = lambda a, w, i: mx.gather_mm(a, w, rhs_indices=i)
    elif indices == "rhs_sorted":
        rhs = mx.sort(rhs)
        fn = lambda a, w, i: mx.gather_mm(a, w, rhs_indices=i, sorted_indices=True)
    elif indices == "lhs_sorted":
        a, w, rhs = mx.random.normal((3, 2, 8)), mx.random.normal((6, 8, 16)), mx.array([0, 0, 1, 1, 2, 2], mx.uint32)
        fn = lambda a, w, i: mx.gather_mm(a, w, lhs_indices=i, sorted_indices=True)
    else:
        fn = lambda a, w, i: mx.gather_mm(a, w, i[::-1] % 6, i)
    g, ops_seen = traced_nodes(fn, a, w, rhs)
    assert ops_seen["GatherMM"] == {"rhs_sorted": (False, True), "lhs_sorted": (True, False)}.get(
        indices, (False, False))
    for compile in (False, True):
        (out,) = Replay(g, compile=compile)([a, w, rhs])
        assert mx.array_equal(out, fn(a, w, rhs))
    if indices == "lhs_sorted":
        return  # MLX 0.32.4's own CPU VJP here reads uninitialised memory (garbage in the reference)
    # Gradients through the replay are MLX's own (including the sorted VJP).
    loss = lambda a, w: Replay(g, compile=False)([a, w, rhs])[0].sum()
    ga, gw = mx.grad(loss, argnums=(0, 1))(a, w)
    ea, ew = mx.grad(lambda a, w: fn(a, w, rhs).sum(), argnums=(0, 1))(a, w)
    assert_close(ga, ea)
    assert_close(gw, ew)


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 32), ("affine", 8, 64), ("mxfp4", 4, 32), ("mxfp8", 8, 32),
                                             ("nvfp4", 4, 16)])
@pytest.mark.parametrize("sorted_indices", [False, True])
def test_gather_qmm_and_quantized_matmul_nodes(mode, bits, group, sorted_indices):
    wq, *sb = mx.quantize(mx.random.normal((4, 16, 64)), group_size=group, bits=bits, mode=mode)
    mx.eval(wq, sb)  # else the trace would contain the (unexportable) fp8 conversion of the scales
    x, idx = mx.random.normal((6, 1, 64)), mx.array([0, 0, 1, 2, 3, 3], dtype=mx.uint32)
    qkw = dict(transpose=True, group_size=group, bits=bits, mode=mode)
    biases = sb[1] if len(sb) > 1 else None

    def fn(x, i):
        return mx.gather_qmm(x, wq, sb[0], biases, rhs_indices=i, sorted_indices=sorted_indices, **qkw)

    g, ops_seen = traced_nodes(fn, x, idx)
    assert ops_seen["GatherQMM"][:4] == (group, bits, interpreter._QMODES.index(mode), True)
    assert mx.array_equal(Replay(g, compile=True)([x, idx])[0], fn(x, idx))
    # QuantizedMatmul: the same weights without the expert gather.
    w2 = wq[0]
    s2 = [s[0] for s in sb]
    mm = lambda x: mx.quantized_matmul(x, w2, s2[0], s2[1] if len(s2) > 1 else None, **qkw)
    g2, ops2 = traced_nodes(mm, x[:, 0])
    assert "QuantizedMatmul" in ops2
    assert mx.array_equal(Replay(g2, compile=False)([x[:, 0]])[0], mm(x[:, 0]))


@pytest.mark.parametrize("kind", ["assign", "add", "prod", "max", "min", "ellipsis"])
def test_scatter_replays_indexed_updates(kind):
    x, i, j = mx.random.normal((6, 4, 3)), mx.array([0, 2, 5]), mx.array([1, 1, 3])
    u = mx.random.normal((3, 3))

    def fn(x, i, j, u):
        if kind == "ellipsis":  # what phi3small's `out[..., ids] = -inf` traces to
            out = mx.array(x)
            out[..., mx.array([0, 2])] = -1.0
            return out
        at = x.at[i, j]
        if kind == "assign":
            out = mx.array(x)
            out[i, j] = u
            return out
        return {"add": at.add, "prod": at.multiply, "max": at.maximum, "min": at.minimum}[kind](u)

    g, ops_seen = traced_nodes(fn, x, i, j, u)
    assert "Scatter" in ops_seen
    for compile in (False, True):
        assert mx.array_equal(Replay(g, compile=compile)([x, i, j, u])[0], fn(x, i, j, u))


def test_moe_routing_gradient_through_replay():
    """Routing indices come from the scores themselves; the trace has lost their stop_gradient."""

    def route(x):
        inds = mx.stop_gradient(mx.argpartition(-x, kth=1, axis=-1)[..., :2])
        return (mx.take_along_axis(x, inds, axis=-1) ** 2).sum()

    x = mx.random.normal((3, 5))
    g = trace(route, x)
    got = mx.grad(lambda x: Replay(g, compile=True)([x])[0])(x)
    assert mx.array_equal(got, mx.grad(route)(x))


def test_masked_scatter_and_floor_divide_replay():
    def fn(x, m, v, a, b):
        out = mx.array(x)
        out[m] = v
        return out, a // b, (a.astype(F32) + 0.5) // b.astype(F32)

    args = [mx.zeros((4, 3)), mx.array([True, False, True, False]), mx.random.normal((2, 3)),
            mx.array([-7, -1, 0, 5, 9]), mx.array([2, 3, 4, -2, 4])]
    g, ops_seen = traced_nodes(fn, *args)
    assert {"MaskedScatter", "FloorDivide"} <= set(ops_seen)
    for got, expect in zip(Replay(g, compile=True)(args), fn(*args)):
        assert mx.array_equal(got, expect) and got.dtype == expect.dtype


@pytest.mark.parametrize("with_weight", [True, False])
def test_norm_vjp_nodes(with_weight):
    x, g = mx.random.normal((3, 5, 16)), mx.random.normal((3, 5, 16))
    w, b = mx.random.normal((16,)), mx.random.normal((16,))
    none = mx.array(0.0)  # MLX's placeholder for an absent weight or bias
    rms_w = w if with_weight else none
    outs = replay_node("RMSNormVJP", [x, rms_w, g], [(x.shape, F32), (rms_w.shape, F32)], (1e-5,))
    prim = [x, w] if with_weight else [x]
    fn = (lambda x, w: mx.fast.rms_norm(x, w, 1e-5)) if with_weight else (lambda x: mx.fast.rms_norm(x, None, 1e-5))
    _, expect = mx.vjp(fn, prim, [g])
    for got, e in zip(outs, expect):
        assert_close(got, e)
    ln = [x, w, b] if with_weight else [x, none, none]
    outs = replay_node("LayerNormVJP", ln + [g], [(a.shape, F32) for a in ln], (1e-5,))
    if with_weight:
        _, expect = mx.vjp(lambda x, w, b: mx.fast.layer_norm(x, w, b, 1e-5), [x, w, b], [g])
    else:
        _, (dx,) = mx.vjp(lambda x: mx.fast.layer_norm(x, None, None, 1e-5), [x], [g])
        expect = [dx, mx.zeros(()), mx.zeros(())]
    for got, e in zip(outs, expect):
        assert_close(got, e)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_vjp_node(causal):
    q, k, v = mx.random.normal((1, 4, 3, 8)), mx.random.normal((1, 2, 5, 8)), mx.random.normal((1, 2, 5, 8))
    g = mx.random.normal((1, 4, 3, 8))
    mask = "causal" if causal else None
    attend = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)
    out, (dq, dk, dv) = mx.vjp(attend, [q, k, v], [g])
    lse = reference_logsumexp(q, k, 0.35, mx.arange(2, 5)[:, None] >= mx.arange(5)[None] if causal else None)
    ins = [q, k, v, out[0], lse, g]
    outs = replay_node("ScaledDotProductAttentionVJP", ins, [(a.shape, F32) for a in (q, k, v)], (0.35, causal, False))
    for got, e in zip(outs, (dq, dk, dv)):
        assert_close(got, e)


@pytest.mark.parametrize("with_weight", [True, False])
def test_norm_nodes(with_weight):
    x, w, b, none = mx.random.normal((3, 16)), mx.random.normal((16,)), mx.random.normal((16,)), mx.array(0.0)
    ws, bs = (w, b) if with_weight else (none, none)
    (out,) = replay_node("RMSNorm", [x, ws], [(x.shape, F32)], (1e-5,))
    assert_close(out, mx.fast.rms_norm(x, w if with_weight else None, 1e-5))
    (out,) = replay_node("LayerNorm", [x, ws, bs], [(x.shape, F32)], (1e-5,))
    assert_close(out, mx.fast.layer_norm(x, w if with_weight else None, b if with_weight else None, 1e-5))
