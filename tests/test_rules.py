"""Pattern tests: tiny traced graphs, asserting exactly which fusions are found."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_fusion.config import FusionConfig
from mlx_fusion.graph.rules import RULES, MatchContext
from mlx_fusion.ops.registry import DEFINITIONS
from mlx_fusion.patterns import (Activation, BinaryActivation, BinaryOp, LinearLayer, ScalarActivation,
                                 ScalarOp)
from tests._graphs import ALL, LlamaMLP, found, frozen, mlp, names, optimizer, trace_graph

ACT_FNS = {Activation.RELU: nn.relu, Activation.GELU: nn.gelu,
           Activation.GELU_APPROX: nn.gelu_approx, Activation.SILU: nn.silu}
# The node sequence each activation is exported as (what the rules trace from the references).
ACT_OPS = {Activation.RELU: ["Maximum"],
           Activation.GELU: ["Divide", "Erf", "Add", "Multiply", "Divide"],
           Activation.GELU_APPROX: ["Multiply", "Power", "Multiply", "Add", "Multiply", "Tanh", "Add",
                                    "Multiply"],
           Activation.SILU: ["Sigmoid", "Multiply"]}
BINARY = {"add": ("Add", mx.add), "sub": ("Subtract", mx.subtract),
          "mul": ("Multiply", mx.multiply), "div": ("Divide", mx.divide)}
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
X = mx.ones((4, 8))


def opps(graph, config=ALL):
    return optimizer(config).detect_opportunities(graph)


# -- activations and binary ops ------------------------------------------------------------------------
@pytest.mark.parametrize("act", list(Activation))
@pytest.mark.parametrize("op", list(BINARY))
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_activation_each_op_act_dtype(act, op, dtype):
    mlx_op, fn = BINARY[op]
    x = X.astype(dtype)
    g = trace_graph(lambda a, b: ACT_FNS[act](fn(a, b)), x, x)
    assert found(g) == [(f"{op}+{act.value}", [mlx_op] + ACT_OPS[act])]
    (o,) = opps(g)
    assert o.pattern == BinaryActivation(o.replacement.params["op"], act)
    assert [v.name for v in o.replacement.inputs] == [v.name for v in g.inputs]
    assert o.replacement.outputs == g.outputs


def test_relu_either_operand_order():
    assert names(trace_graph(lambda a, b: mx.maximum(0, a + b), X, X)) == ["add+relu"]
    assert names(trace_graph(lambda a, b: mx.maximum(a + b, 0.0), X, X)) == ["add+relu"]


def test_maximum_with_nonzero_is_not_relu():
    assert found(trace_graph(lambda a, b: mx.maximum(a + b, 1.0), X, X)) == []


def test_gelu_fast_approx_is_not_silu_or_gelu():
    assert found(trace_graph(lambda a, b: nn.gelu_fast_approx(a + b), X, X)) == []


def test_binary_looks_through_broadcast_operand():
    g = trace_graph(lambda a, b: nn.relu(a + b), X, mx.ones((8,)))
    (o,) = opps(g)
    assert [v.shape for v in o.replacement.inputs] == [(4, 8), (8,)]
    assert g.nodes[o.removable_ids[0]].op == "Broadcast"


def test_binary_keeps_broadcast_when_sources_do_not_give_output_shape():
    # both operands broadcast from (1, 8) and (4, 1): un-broadcast they still give (4, 8)
    g = trace_graph(lambda a, b: nn.relu(a * b), mx.ones((1, 8)), mx.ones((4, 1)))
    (o,) = opps(g)
    assert [v.shape for v in o.replacement.inputs] == [(1, 8), (4, 1)]
    # explicit broadcast_to of both to a bigger shape: the sources alone would give (8,)
    g = trace_graph(lambda a, b: nn.relu(mx.broadcast_to(a, (4, 8)) + mx.broadcast_to(b, (4, 8))),
                    mx.ones((8,)), mx.ones((8,)))
    (o,) = opps(g)
    assert any(v.shape == (4, 8) for v in o.replacement.inputs)


# -- scalar ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, kind, scale, shift", [
    (lambda a: a * 2.0, ScalarOp.MUL, 2.0, 0.0),
    (lambda a: 2.0 * a, ScalarOp.MUL, 2.0, 0.0),
    (lambda a: a / 4.0, ScalarOp.MUL, 0.25, 0.0),
    (lambda a: a + 1.5, ScalarOp.ADD, 1.0, 1.5),
    (lambda a: 1.5 + a, ScalarOp.ADD, 1.0, 1.5),
    (lambda a: a - 1.5, ScalarOp.ADD, 1.0, -1.5),
    (lambda a: a * 3.0 + 1.0, ScalarOp.AFFINE, 3.0, 1.0),
    (lambda a: 1.0 + 3.0 * a, ScalarOp.AFFINE, 3.0, 1.0),
    (lambda a: a / 2.0 - 0.5, ScalarOp.AFFINE, 0.5, -0.5),
    (lambda a: a * mx.array([2.0]), ScalarOp.MUL, 2.0, 0.0),  # size-1 array constant
])
@pytest.mark.parametrize("act", list(Activation))
def test_scalar_forms(fn, kind, scale, shift, act):
    g = trace_graph(lambda a: ACT_FNS[act](fn(a)), X)
    (o,) = opps(g)
    assert o.pattern == ScalarActivation(kind, act)
    p = o.replacement.params
    assert (p["scale"], p["shift"], p["activation"]) == (scale, shift, act)
    assert [v.name for v in o.replacement.inputs] == [g.inputs[0].name]


def test_divide_by_inexact_scalar_is_not_scalar_in_float32():
    # 1/3 is not exact in float32: x * (1/3) != x / 3 for some x, so no FusedScalar;
    # the divide still fuses exactly as a binary op with the constant as operand.
    assert names(trace_graph(lambda a: nn.relu(a / 3.0), X)) == ["div+relu"]


def test_divide_by_inexact_scalar_is_scalar_in_half_types():
    g = trace_graph(lambda a: nn.relu(a / 3.0), X.astype(mx.bfloat16))
    (o,) = opps(g)
    assert o.pattern.name == "scalar-mul+relu"
    assert abs(o.replacement.params["scale"] - 1 / 3) < 1e-2


def test_non_scalar_multiply_is_binary_not_scalar():
    w = mx.arange(8, dtype=mx.float32)  # a closed-over (8,) constant: not a scalar
    assert names(trace_graph(lambda a: nn.relu(a * w), X)) == ["mul+relu"]


def test_size_one_input_is_binary_not_scalar():
    # a scalar graph *input* has no value at rewrite time
    assert names(trace_graph(lambda a, s: nn.relu(a * s), X, mx.array(2.0))) == ["mul+relu"]


def test_scalar_chain_with_shared_multiply_falls_back_to_add_only():
    def as_output(a):
        m = a * 2.0
        return nn.relu(m + 1.0), m

    def second_user(a):
        m = a * 2.0
        return nn.relu(m + 1.0) * m

    for fn in (as_output, second_user):
        assert found(trace_graph(fn, X)) == [("scalar-add+relu", ["Add", "Maximum"])]


def test_scalar_disabled_falls_back_to_binary():
    cfg = FusionConfig(min_tensor_size=0, enabled_patterns={BinaryActivation})
    assert found(trace_graph(lambda a: nn.relu(a * 2.0 + 1.0), X), cfg) == [
        ("add+relu", ["Add", "Maximum"])]


def test_bf16_shared_scalar_broadcast():
    # in bf16 MLX reuses Broadcast(2) for `x * 2` and gelu's final `/ 2`
    g = trace_graph(lambda a: nn.gelu(a * 2.0), X.astype(mx.bfloat16))
    assert names(g) == ["scalar-mul+gelu"]
    stats = optimizer().optimize(g)
    assert stats.applied_count == 1 and g.op_counts() == {"FusedScalar": 1}


# -- linear ------------------------------------------------------------------------------------------
W = mx.ones((16, 8))
B16 = mx.ones((16,))


def test_linear_addmm_2d_and_3d():
    for x, ops in ((X, ["AddMM", "Maximum"]), (mx.ones((2, 4, 8)), ["AddMM", "Reshape", "Maximum"])):
        g = trace_graph(lambda a, w, b: nn.relu(mx.addmm(b, a, w.T)), x, W, B16)
        assert found(g) == [("linear+bias+relu", ops)]
        (o,) = opps(g)
        a, rhs, bias = o.replacement.inputs
        assert (a.name, a.shape, rhs.shape, bias.name, bias.shape) == ("A", x.shape, (8, 16), "C", (16,))
        assert o.replacement.params == {"pattern": LinearLayer(True, Activation.RELU),
                                        "activation": Activation.RELU, "has_bias": True}
        assert o.replacement.outputs[0].shape == x.shape[:-1] + (16,)


def test_linear_matmul_plus_bias_beats_add_relu():
    g = trace_graph(lambda a, w, b: nn.relu(a @ w.T + b), X, W, B16)
    assert found(g) == [("linear+bias+relu", ["Matmul", "Add", "Maximum"])]
    # all three candidates exist; the biggest wins
    ctx = MatchContext(g, ALL)
    cands = sorted(m.pattern.name for n in g.nodes for m in RULES.matches(ctx, n))
    assert cands == ["add+relu", "linear+bias+none", "linear+bias+relu"]


def test_linear_matmul_3d_bias_gelu_through_flatten():
    x = mx.ones((2, 4, 8))
    g = trace_graph(lambda a, w, b: nn.gelu(a @ w.T + b), x, W, B16)
    assert found(g) == [("linear+bias+gelu", ["Matmul", "Unflatten", "Add"] + ACT_OPS[Activation.GELU])]
    (o,) = opps(g)
    assert [v.shape for v in o.replacement.inputs] == [(2, 4, 8), (8, 16), (16,)]


def test_linear_without_activation_only_when_it_saves_a_kernel():
    assert found(trace_graph(lambda a, w, b: a @ w.T + b, X, W, B16)) == [
        ("linear+bias+none", ["Matmul", "Add"])]
    assert found(trace_graph(lambda a, w, b: mx.addmm(b, a, w.T), X, W, B16)) == []  # already one kernel
    assert found(trace_graph(lambda a, w: a @ w.T, X, W)) == []


def test_linear_no_bias_silu():
    for x in (X, mx.ones((2, 4, 8))):
        g = trace_graph(lambda a, w: nn.silu(a @ w.T), x, W)
        (o,) = opps(g)
        assert o.pattern == LinearLayer(False, Activation.SILU)
        assert len(o.replacement.inputs) == 2 and o.replacement.params["has_bias"] is False


def test_addmm_with_alpha_is_not_linear():
    g = trace_graph(lambda a, w, b: nn.relu(mx.addmm(b, a, w.T, alpha=2.0)), X, W, B16)
    assert found(g) == []


def test_residual_add_is_not_a_bias():
    g = trace_graph(lambda a, w, r: nn.relu(a @ w.T + r), X, W, mx.ones((4, 16)))
    assert names(g) == ["add+relu"]


def test_batched_matmul_is_not_linear():
    q = mx.ones((2, 3, 4, 8))
    assert names(trace_graph(lambda a, b: nn.relu(a @ b), q, q.swapaxes(-1, -2))) == []


# -- legality ------------------------------------------------------------------------------------------
def test_intermediate_with_second_user_not_fused():
    def f(a, b):
        y = a + b
        return nn.relu(y) * y
    assert found(trace_graph(f, X, X)) == []


def test_intermediate_graph_output_not_fused():
    def f(a, b):
        y = a + b
        return nn.relu(y), y
    assert found(trace_graph(f, X, X)) == []


def test_activation_internal_value_with_outside_user_not_fused():
    def f(a, b):
        y = a + b
        s = mx.sigmoid(y)
        return y * s, s  # the sigmoid is also an output
    assert found(trace_graph(f, X, X)) == []


def test_fused_node_never_reads_a_removed_value():
    # with one row, y = x @ W.T is a (1, N) "row vector", so y + y looks like matmul + bias(y)
    g = trace_graph(lambda a, w: nn.relu(a @ w.T + a @ w.T), mx.ones((1, 8)), W)
    assert names(g) == ["add+relu"]


def test_int32_not_fused():
    i = mx.ones((4, 8), dtype=mx.int32)
    assert found(trace_graph(lambda a, b: nn.relu(a + b), i, i)) == []


def test_min_tensor_size():
    g = trace_graph(lambda a, b: nn.relu(a + b), X, X)  # 32 elements
    assert names(g, FusionConfig(min_tensor_size=32)) == ["add+relu"]
    assert names(g, FusionConfig(min_tensor_size=33)) == []


@pytest.mark.parametrize("enabled, expect", [
    ({"add+relu"}, ["add+relu"]),
    ({"mul+relu"}, []),
    ({BinaryActivation}, ["add+relu"]),
    ({BinaryActivation(BinaryOp.ADD, Activation.RELU)}, ["add+relu"]),
    ({BinaryActivation(BinaryOp.ADD, Activation.GELU)}, []),
    ({"BinaryActivation"}, ["add+relu"]),
    ({LinearLayer, ScalarActivation}, []),
    (set(), []),
])
def test_enabled_patterns(enabled, expect):
    g = trace_graph(lambda a, b: nn.relu(a + b), X, X)
    assert names(g, FusionConfig(min_tensor_size=0, enabled_patterns=enabled)) == expect


def test_disabled_and_device_switch():
    g = trace_graph(lambda a, b: nn.relu(a + b), X, X)
    assert names(g, FusionConfig(min_tensor_size=0, enabled=False)) == []
    assert names(g, FusionConfig(min_tensor_size=0, cpu=False)) == []
    assert names(g, FusionConfig(min_tensor_size=0, cpu=False), device="cuda") == ["add+relu"]
    assert names(g, FusionConfig(min_tensor_size=0, cuda=False), device="cuda") == []
    assert names(g, FusionConfig(min_tensor_size=0, metal=False), device="metal") == []


# -- models from mlx.nn --------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("shape", [(4, 8), (2, 4, 8)])
def test_relu_mlp(k, shape):
    model = mlp([8] + [16] * k + [4])
    assert names(trace_graph(model, mx.ones(shape))) == ["linear+bias+relu"] * k


def test_gelu_mlp_with_biases():
    model = mlp([8, 32, 32, 8], act=nn.GELU)
    assert names(trace_graph(model, mx.ones((2, 4, 8)))) == ["linear+bias+gelu"] * 2
    model = mlp([8, 32, 8], act=lambda: nn.GELU(approx="precise"))
    assert names(trace_graph(model, mx.ones((4, 8)))) == ["linear+bias+gelu_approx"]


def test_llama_gated_mlp():
    g = trace_graph(frozen(LlamaMLP(8, 16)), mx.ones((2, 4, 8)))
    # glu+silu and linear+silu price the same: the one without a GEMM wins the tie
    assert found(g) == [("glu+silu", ["Sigmoid", "Multiply", "Multiply"])]


@pytest.mark.parametrize("act, expect", [(nn.relu, "linear+bias+relu"), (nn.gelu, "linear+bias+gelu")])
def test_transformer_encoder_layer(act, expect):
    layer = frozen(nn.TransformerEncoderLayer(8, 2, 16, activation=act))
    # norm_first: h = x + attn(ln1(x)) feeds ln2: one residual add + LayerNorm (ops/add_norm.py)
    assert names(trace_graph(lambda x: layer(x, None), mx.ones((2, 4, 8)))) == [expect]  # add+layer_norm: not searched (docs/add-norm.md)


def test_models_traced_with_parameters_as_inputs():
    trace = pytest.importorskip("mlx_fusion.graph.trace").trace
    assert names(trace(frozen(LlamaMLP(8, 16)), mx.ones((2, 4, 8)))) == ["glu+silu"]
    assert names(trace(mlp([8, 16, 16, 4]), mx.ones((4, 8)))) == ["linear+bias+relu"] * 2


# -- properties ----------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), n=st.integers(1, 6),
       act=st.sampled_from(list(Activation)), op=st.sampled_from(list(BINARY)),
       dtype=st.sampled_from(DTYPES), bcast=st.booleans())
def test_binary_any_shape(lead, n, act, op, dtype, bcast):
    shape = tuple(lead) + (n,)
    b = mx.ones((n,) if bcast else shape, dtype=dtype)
    g = trace_graph(lambda a, b: ACT_FNS[act](BINARY[op][1](a, b)), mx.ones(shape, dtype=dtype), b)
    assert names(g) == [f"{op}+{act.value}"]


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), k=st.integers(1, 5),
       n=st.integers(1, 5), act=st.sampled_from(list(Activation) + [None]), bias=st.booleans())
def test_linear_any_rank(lead, k, n, act, bias):
    x, w, b = mx.ones(tuple(lead) + (k,)), mx.ones((n, k)), mx.ones((n,))
    fn = ACT_FNS[act] if act else (lambda y: y)
    g = trace_graph(lambda x, w, b: fn(x @ w.T + b) if bias else fn(x @ w.T), x, w, b)
    expect = [LinearLayer(bias, act).name] if (act or bias) else []
    assert names(g) == expect


def test_rules_are_indexed_by_root_op():
    # one rule per (definition, rule name): per activation for binary, scalar and linear, plus
    # linear+bias, plus whatever other definitions add (glu: one per gate, rooted at Multiply)
    assert len(RULES) == len({(d.name, s.rule) for d in DEFINITIONS for s in d.spellings()})
    assert len(Activation) * 3 + 1 <= len(RULES)
    for dtype in DTYPES:
        by_root = RULES.by_root(dtype)
        assert {"Add", "Divide", "Maximum", "Multiply"} <= set(by_root)
        assert len(by_root["Maximum"]) == 3
        for op, rules in by_root.items():
            assert all(any(p.root.op == op for p in r.patterns(dtype)) for r in rules)
    assert RULES.by_root(mx.int32) == {}
