"""Search patterns traced from the fused ops' reference spellings (graph/pattern.py): constants
in their dtype, MLX's tie convention, roots that are not activations, several outputs."""

import math

import mlx.core as mx
import mlx.nn as nn
import pytest

from tests._graphs import LlamaMLP, frozen, names, optimizer, run_graph, trace_graph

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
X = mx.ones((4, 8))


def opps(graph):
    return optimizer().detect_opportunities(graph)


# -- derived patterns: constants, tie conventions, other roots, several outputs ------------------------------
def _gelu_with(divisor):
    return lambda a, b: (lambda z: z * (1 + mx.erf(z / math.sqrt(2))) / divisor)(a + b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constants_match_only_the_value_the_reference_has_in_that_dtype(dtype):
    x = X.astype(dtype)
    assert names(trace_graph(_gelu_with(2), x, x)) == ["add+gelu"]
    # 2.015625 = 2 (1 + 2^-7) is a bf16 number: close to GELU's 2, but another function
    assert names(trace_graph(_gelu_with(2.015625), x, x)) == []


def test_relu_spelling_sets_the_gradient_convention():
    (o,) = opps(trace_graph(lambda a, b: mx.maximum(0.0, a + b), X, X))
    assert o.replacement.params["relu_at_zero"] == 1.0
    (o,) = opps(trace_graph(lambda a, b: mx.maximum(a + b, 0.0), X, X))
    assert "relu_at_zero" not in o.replacement.params


@pytest.mark.parametrize("fn", [
    lambda a, b, w: mx.maximum(0.0, a + b),
    lambda a, b, w: mx.maximum(0.0, a * 2.0 + 1.0),
    lambda a, b, w: mx.maximum(0.0, a @ w.T + b[0]),
    lambda a, b, w: mx.maximum(a @ w.T, 0.0),
], ids=["binary", "scalar", "linear-bias", "linear"])
def test_fused_graph_has_mlx_gradient_at_exactly_zero(fn):
    """MLX gives a tie of maximum to its second operand; the rewrite keeps that convention."""
    from mlx_fusion.graph.interpreter import run_graph as replay

    a = mx.array([[0.0, -1.0, 2.0, 0.0]] * 4)  # zeros where the pre-activation is exactly 0
    b, w = mx.zeros((4, 4)), mx.eye(4)
    args = (a, b, w)
    g = trace_graph(fn, *args)
    stats = optimizer().optimize(g)
    assert stats.applied_count == 1

    def loss(*xs):
        return replay(g, list(xs))[0].sum()

    got = mx.grad(loss, argnums=(0, 1))(*args)
    want = mx.grad(lambda *xs: fn(*xs).sum(), argnums=(0, 1))(*args)
    for x, y in zip(got, want):
        assert mx.array_equal(x, y), (x, y)


def _toy(name, reference, example, outputs=1):
    """A fused op definition that ships no kernel: its fused node runs the reference."""
    from mlx_fusion.ops.base import FusedOp, Spelling

    def build(m):
        return list(m.args), {}, []

    pattern = type("ToyPattern", (), {"name": name})()
    spelling = Spelling(pattern=pattern, reference=reference, example=example, build=build, rule=name)
    call = lambda ins, p: list(reference(*ins)) if outputs > 1 else [reference(*ins)]  # noqa: E731
    return FusedOp(name=name, node_op="Toy" + name, spellings=lambda: [spelling], call=call,
                   reference_call=call, cases=lambda: [])


def _toy_optimizer(toy):
    from mlx_fusion.graph.rules import rules_from

    return optimizer(rules=rules_from([toy]))


def test_pattern_with_a_multiply_root():
    """silu(g) * u: the root is the Multiply, not the activation."""
    toy = _toy("silu_mul", lambda g, u: nn.silu(g) * u, lambda dt: (mx.zeros((4, 8), dt),) * 2)
    g = trace_graph(frozen(LlamaMLP(8, 16)), mx.ones((2, 4, 8)))
    graph = trace_graph(lambda a, b: nn.silu(a) * b + 1.0, X, X)
    for graph_ in (graph, g):
        (o,) = _toy_optimizer(toy).detect_opportunities(graph_)
        ops = [n.op for n in graph_.nodes if n.id in o.node_ids]
        assert ops == ["Sigmoid", "Multiply", "Multiply"] and o.replacement.op == "Toysilu_mul"
    args = (mx.random.normal((4, 8)), mx.random.normal((4, 8)))
    want = run_graph(graph, *args)
    _toy_optimizer(toy).optimize(graph)
    assert [n.op for n in graph.nodes] == ["Toysilu_mul", "Broadcast", "Add"]
    assert mx.allclose(run_graph(graph, *args, definitions=[toy])[0], want[0])


def test_pattern_with_two_outputs():
    """h = x + r feeds the activation and is used again later: both come out of the fused node."""
    toy = _toy("add_relu2", lambda x, r: (lambda h: (h, nn.relu(h)))(x + r),
               lambda dt: (mx.zeros((4, 8), dt),) * 2, outputs=2)
    graph = trace_graph(lambda x, r: (lambda h: nn.relu(h) * 3.0 + h)(x + r), X, X)
    args = (mx.random.normal((4, 8)), mx.random.normal((4, 8)))
    want = run_graph(graph, *args)
    (o,) = _toy_optimizer(toy).detect_opportunities(graph)
    assert [v.shape for v in o.replacement.outputs] == [(4, 8), (4, 8)]
    assert _toy_optimizer(toy).optimize(graph).applied_count == 1
    assert graph.nodes[0].op == "Toyadd_relu2" and len(graph.nodes[0].outputs) == 2
    assert mx.allclose(run_graph(graph, *args, definitions=[toy])[0], want[0])


def test_an_extra_output_read_before_the_root_is_not_fused():
    """The fused node stands where the root was: an extra output must not be read earlier."""
    from mlx_fusion.graph.ir import Graph, Node, Value

    toy = _toy("add_relu2", lambda x, r: (lambda h: (h, nn.relu(h)))(x + r),
               lambda dt: (mx.zeros((4, 8), dt),) * 2, outputs=2)
    v = {n: Value(n, (4, 8), mx.float32) for n in "xrheyzo"}
    zero = Value("c", (), mx.float32)

    def graph(exp_first):
        nodes = [Node(0, "Add", [v["x"], v["r"]], [v["h"]]),
                 Node(1, "Exp", [v["h"]], [v["e"]]),
                 Node(2, "Broadcast", [zero], [v["z"]], ((4, 8),)),
                 Node(3, "Maximum", [v["h"], v["z"]], [v["y"]]),
                 Node(4, "Add", [v["y"], v["e"]], [v["o"]])]
        if not exp_first:
            nodes = [nodes[0], nodes[2], nodes[3], nodes[1], nodes[4]]
        return Graph([v["x"], v["r"]], [v["o"]], nodes, {"c": mx.array(0.0)}, {"c": zero}).lint()

    assert _toy_optimizer(toy).detect_opportunities(graph(exp_first=True)) == []
    (o,) = _toy_optimizer(toy).detect_opportunities(graph(exp_first=False))
    assert [x.name for x in o.replacement.outputs] == ["h", "y"]
