"""Tiny traced graphs for rule and optimizer tests.

`trace_graph` builds a `Graph` straight from `mx.export_function`'s callback
(the format in FACTS.md), so these tests do not depend on graph/trace.py.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_fusion.config import FusionConfig
from mlx_fusion.graph.ir import Graph, Node, Value
from mlx_fusion.graph.optimizer import FusionOptimizer
from mlx_fusion.ops.registry import DEFINITIONS

# Everything allowed, any size: what most pattern tests want.
ALL = FusionConfig(min_tensor_size=0)


def trace_graph(fn, *args) -> Graph:
    g = Graph(inputs=[], outputs=[], nodes=[])

    def val(t):
        return Value(t[0], tuple(t[1]), t[2])

    def on_item(d):
        kind = d["type"]
        if kind == "inputs":
            g.inputs = [val(t) for t in d["inputs"]]
        elif kind == "outputs":
            g.outputs = [val(t) for t in d["outputs"]]
        elif kind == "constants":
            for name, arr in d["constants"]:
                g.constants[name] = arr
                g.constant_values[name] = Value(name, tuple(arr.shape), arr.dtype)
        elif kind == "primitive":
            g.nodes.append(Node(len(g.nodes), d["name"], [val(t) for t in d["inputs"]],
                                [val(t) for t in d["outputs"]], tuple(d.get("arguments", ()))))

    mx.export_function(on_item, fn, *args)
    return g.lint()


# -- a tiny reference evaluator: enough ops for these tests, fused ops via their references --------
_EVAL = {
    "Add": mx.add, "Subtract": mx.subtract, "Multiply": mx.multiply, "Divide": mx.divide,
    "Maximum": mx.maximum, "Minimum": mx.minimum, "Power": mx.power, "Erf": mx.erf,
    "Sigmoid": mx.sigmoid, "Abs": mx.abs, "Tanh": mx.tanh, "Square": mx.square, "Matmul": mx.matmul,
    "Broadcast": lambda x, p: mx.broadcast_to(x, p[0]),
    "Transpose": lambda x, p: mx.transpose(x, p[0]),
    "Reshape": lambda x, p: mx.reshape(x, p[0]),
    "Flatten": lambda x, p: mx.flatten(x, p[0], p[1]),
    "Unflatten": lambda x, p: mx.unflatten(x, p[0], p[1]),
    "AsType": lambda x, p: x.astype(p[0]),
    "Slice": lambda x, p: x[tuple(slice(a, b, c) for a, b, c in zip(*p))],
    "AddMM": lambda a, b, c, p: mx.addmm(c, a, b, alpha=p[0], beta=p[1]),
    "Reduce": lambda x, p: {2: mx.sum, 5: mx.max}[p[0]](x, axis=p[1], keepdims=True),
    "Sqrt": lambda x, p: mx.rsqrt(x) if p and p[0] else mx.sqrt(x),
    "Softmax": lambda x, p: mx.softmax(x, axis=-1, precise=bool(p and p[0])),
}
_WITH_PARAMS = {"Slice", "Broadcast", "Transpose", "Reshape", "Flatten", "Unflatten", "AsType", "AddMM",
                "Reduce", "Sqrt", "Softmax"}
# Fused nodes run unfused: each definition's reference_call (mlx_fusion.ops.registry).
_FUSED = {d.node_op: d for d in DEFINITIONS}


def run_graph(graph: Graph, *args, definitions=()):
    """Evaluate `graph` op by op; fused nodes (of DEFINITIONS or `definitions`) by their references."""
    fused = {**_FUSED, **{d.node_op: d for d in definitions}}
    env = dict(graph.constants)
    env.update({v.name: a for v, a in zip(graph.inputs, args)})
    for n in graph.nodes:
        ins = [env[v.name] for v in n.inputs]
        if n.op in fused:
            outs = fused[n.op].reference_call(ins, n.params)
        elif n.op in _WITH_PARAMS:
            outs = [_EVAL[n.op](*ins, n.params)]
        else:
            outs = [_EVAL[n.op](*ins)]
        env.update({v.name: o for v, o in zip(n.outputs, outs)})
    return [env[v.name] for v in graph.outputs]


def optimizer(config: FusionConfig = ALL, **kw) -> FusionOptimizer:
    return FusionOptimizer(config=config, device=kw.pop("device", "cpu"), **kw)


def found(graph: Graph, config: FusionConfig = ALL, **kw):
    """[(pattern name, [op of each replaced node])] in graph order of the root."""
    opps = optimizer(config, **kw).detect_opportunities(graph)
    ops = {n.id: n.op for n in graph.nodes}
    opps = sorted(opps, key=lambda o: o.node_ids[-1])
    return [(o.name, [ops[i] for i in o.node_ids]) for o in opps]


def names(graph: Graph, config: FusionConfig = ALL, **kw):
    return sorted(name for name, _ in found(graph, config, **kw))


# -- models ---------------------------------------------------------------------------------------
def frozen(module: nn.Module) -> nn.Module:
    mx.eval(module.parameters())  # else the lazy initializers (RandomBits...) end up in the trace
    return module


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def mlp(sizes, act=nn.ReLU, bias=True) -> nn.Module:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return frozen(nn.Sequential(*layers))
