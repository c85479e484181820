"""The list of fused op definitions, and the registry tables derived from it.

`DEFINITIONS` is every module of this package that has a `DEFINITION` (a
`FusedOp`, see ops/base.py), in (`FusedOp.order`, name) order: a new fused op is
one definition file here, nothing to register. Tests and benchmarks iterate
`FUSED_OPS` (or `cases(kind)`); the graph rules trace each definition's
spellings; the interpreter, `kernels.KERNEL_SPECS` and the Core ML tables read
it too.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Optional

from .base import FusedOp, OpCase

__all__ = ["DEFINITIONS", "OpCase", "FUSED_OPS", "cases", "definition", "case_for", "own_workload"]


def _discover() -> tuple:
    found = []
    for info in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        module = importlib.import_module(f"{__package__}.{info.name}")
        d = getattr(module, "DEFINITION", None)
        if isinstance(d, FusedOp):
            found.append(d)
    found.sort(key=lambda d: (d.order, d.name))
    names = [d.node_op for d in found]
    if len(set(names)) != len(names):
        raise ValueError(f"two fused op definitions share a node op: {names}")
    return tuple(found)


DEFINITIONS: tuple = _discover()

FUSED_OPS: List[OpCase] = [c for d in DEFINITIONS for c in d.cases()]

_BY_NODE_OP: Dict[str, FusedOp] = {d.node_op: d for d in DEFINITIONS}


def cases(kind: Optional[str] = None) -> List[OpCase]:
    """The registry cases of one family ("binary", "scalar", "linear"), or all."""
    return [c for c in FUSED_OPS if kind is None or c.kind == kind]


def own_workload(kind: str):
    """The Workload benchmarks shape family `kind` by, if it has its own (`Workload.own_shapes`:
    linear_cross_entropy's (tokens, D, V)); None: the elementwise / linear tables."""
    for c in FUSED_OPS:
        if c.kind == kind and c.inputs is not None:
            return c.workload if c.workload.own_shapes else None
    return None


def definition(node_op: str) -> FusedOp:
    """The definition whose fused nodes have op `node_op` ("FusedBinary"); KeyError if none."""
    return _BY_NODE_OP[node_op]


def case_for(pattern) -> OpCase:
    """The case that benchmarks `pattern` (an instance or a name like "add+relu"): a registry
    case, else one its definition makes (`FusedOp.case_for`); ValueError if none."""
    for case in FUSED_OPS:
        if case.pattern == pattern or case.name == pattern or case.pattern.name == pattern:
            return case
    for d in DEFINITIONS:
        case = d.case_for(pattern) if d.case_for is not None else None
        if case is not None:
            return case
    raise ValueError(f"no benchmark for pattern {pattern!r}; known: {[c.name for c in FUSED_OPS]}")
