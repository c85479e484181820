"""The list of fused op definitions, and every table derived from it.

`DEFINITIONS` is the one list: a new fused op is one definition file in this
package (see ops/base.py) added here. Tests and benchmarks iterate `FUSED_OPS`
(or `cases(kind)`), the graph rules trace each definition's spellings, the
interpreter, `kernels.KERNEL_SPECS` and the Core ML tables read it too.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from . import binary, linear, scalar
from .base import FusedOp, OpCase

__all__ = ["DEFINITIONS", "OpCase", "FUSED_OPS", "cases", "definition"]

DEFINITIONS: tuple = (binary.DEFINITION, scalar.DEFINITION, linear.DEFINITION)

FUSED_OPS: List[OpCase] = [c for d in DEFINITIONS for c in d.cases()]

_BY_NODE_OP: Dict[str, FusedOp] = {d.node_op: d for d in DEFINITIONS}


def cases(kind: Optional[str] = None) -> List[OpCase]:
    """The registry cases of one family ("binary", "scalar", "linear"), or all."""
    return [c for c in FUSED_OPS if kind is None or c.kind == kind]


def definition(node_op: str) -> FusedOp:
    """The definition whose fused nodes have op `node_op` ("FusedBinary"); KeyError if none."""
    return _BY_NODE_OP[node_op]
