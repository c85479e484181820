"""The intermediate representation: a flat, single-assignment list of nodes.

Like JAX's jaxprs (Autodidax) and torch.fx graphs, a `Graph` is a list of
`Node`s in topological order. Every value is named once (by its producer, or
as a graph input or constant), carries a shape and dtype, and is referred to
by name. Node `op` is either an MLX primitive name exactly as
`mx.export_function` reports it ("Add", "Matmul", "AddMM", ...) or the name of
a fused op that a rewrite put there ("FusedBinary", "FusedScalar",
"FusedLinear", "CoreMLBlock"); `params` holds the primitive's arguments (a
tuple, as exported) or the fused op's settings (a dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Tuple

import mlx.core as mx

__all__ = ["Value", "Node", "Graph", "GraphError"]


class GraphError(ValueError):
    """A graph failed its consistency check (lint)."""


@dataclass(frozen=True)
class Value:
    name: str
    shape: Tuple[int, ...]
    dtype: mx.Dtype

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.size

    def __str__(self) -> str:
        dt = str(self.dtype).replace("mlx.core.", "")
        return f"{self.name}:{dt}{list(self.shape)}"


@dataclass
class Node:
    id: int
    op: str
    inputs: List[Value]
    outputs: List[Value]
    params: Any = ()
    module: str = ""  # path of the submodule whose call made it ("layers.0.mlp"), "" for the top (graph/scopes.py)

    def __str__(self) -> str:
        outs = ", ".join(str(v) for v in self.outputs)
        ins = ", ".join(v.name for v in self.inputs)
        p = f" {self.params}" if self.params not in ((), {}, None, []) else ""
        return f"  %{self.id:<3} {outs} = {self.op}({ins}){p}"


@dataclass
class Graph:
    """inputs: positional graph inputs in call order (flattened);
    constants: name -> array baked into the graph;
    outputs: graph outputs in order (flattened)."""

    inputs: List[Value]
    outputs: List[Value]
    nodes: List[Node]
    constants: Dict[str, mx.array] = field(default_factory=dict)
    constant_values: Dict[str, Value] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    # -- queries ---------------------------------------------------------------
    def producers(self) -> Dict[str, Node]:
        return {v.name: n for n in self.nodes for v in n.outputs}

    def users(self) -> Dict[str, List[Node]]:
        """value name -> nodes that read it (graph outputs are not nodes; see `is_output`)."""
        out: Dict[str, List[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v.name, []).append(n)
        return out

    def is_output(self, name: str) -> bool:
        return any(v.name == name for v in self.outputs)

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def op_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def next_id(self) -> int:
        return max((n.id for n in self.nodes), default=-1) + 1

    # -- checking --------------------------------------------------------------
    def lint(self) -> "Graph":
        """Check single assignment, defined-before-use and known outputs. Returns self."""
        defined: Dict[str, Value] = {}
        for v in self.inputs:
            if v.name in defined:
                raise GraphError(f"input {v.name} defined twice")
            defined[v.name] = v
        for name in self.constants:
            if name in defined:
                raise GraphError(f"constant {name} shadows another value")
            defined[name] = self.constant_values.get(name) or Value(
                name, tuple(self.constants[name].shape), self.constants[name].dtype
            )
        ids = set()
        for n in self.nodes:
            if n.id in ids:
                raise GraphError(f"node id {n.id} used twice")
            ids.add(n.id)
            for v in n.inputs:
                if v.name not in defined:
                    raise GraphError(f"node %{n.id} ({n.op}) reads {v.name} before it is defined")
            for v in n.outputs:
                if v.name in defined:
                    raise GraphError(f"node %{n.id} ({n.op}) redefines {v.name}")
                defined[v.name] = v
        for v in self.outputs:
            if v.name not in defined:
                raise GraphError(f"graph output {v.name} is never defined")
        return self

    # -- printing --------------------------------------------------------------
    def __str__(self) -> str:
        lines = ["graph(" + ", ".join(str(v) for v in self.inputs) + ") {"]
        for name, arr in self.constants.items():
            dt = str(arr.dtype).replace("mlx.core.", "")
            lines.append(f"  const {name}:{dt}{list(arr.shape)}")
        lines.extend(str(n) for n in self.nodes)
        lines.append("  return " + ", ".join(v.name for v in self.outputs))
        lines.append("}")
        return "\n".join(lines)

    def copy(self) -> "Graph":
        return Graph(
            inputs=list(self.inputs),
            outputs=list(self.outputs),
            nodes=[Node(n.id, n.op, list(n.inputs), list(n.outputs), n.params, n.module) for n in self.nodes],
            constants=dict(self.constants),
            constant_values=dict(self.constant_values),
            meta=dict(self.meta),
        )
