"""What a fused op is: one `FusedOp` object per op family (binary.py, scalar.py, linear.py).

A definition holds everything the rest of mlx-fusion needs to know about the op,
so no other module names a fused op by string:

- `spellings()`: the plain MLX code it replaces, as reference functions with
  example inputs. The graph rules trace them (`mlx_fusion.graph.rules`) to get
  their search patterns; `build` turns a match into the fused node's inputs and
  params.
- `call(inputs, params)`: what the interpreter runs for a fused node, and
  `reference_call`, the same node computed unfused (tests, Core ML checks).
- `cases()`: the configurations tests and benchmarks iterate (`OpCase`, with the family's
  `Workload`: how benchmarks shape its inputs); `case_for(pattern)` makes one for a pattern
  `cases()` does not list.
- `kernels`: its Metal/CUDA kernel specs (`mlx_fusion.kernels.KERNEL_SPECS`).
- `coreml`: its Core ML emitter, ``emit(ctx, node, inputs)``, or None; `flops(node)`
  its estimated work (Core ML block pricing), or None for one per output element.

Like torch.fx's ``register_replacement(search_fn, replace_fn, example_inputs)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import mlx.core as mx

__all__ = ["OpCase", "Spelling", "FusedOp", "Build", "Workload", "ELEMENTWISE"]

# (fused node inputs, fused node params, extra looked-through view nodes) or None (no match).
Build = Optional[Tuple[list, dict, list]]


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Workload:
    """How benchmarks and the tracker shape a family's inputs (so they need no kind switch).

    shape_for_size(n): the benchmark shape whose fused output has n elements;
    output_size(shape), copy_size(shape) (elements of the largest operand: the copy that
    bounds the op's memory traffic), flops(shape) (forward); default_shapes(gpu, quick).
    own_shapes: benchmark.py and perfcache.py shape the family by this workload; False: by
    their elementwise and linear tables (the families measured, and priors shipped, with those).
    """

    shape_for_size: Callable[[int], tuple]
    output_size: Callable[[tuple], int]
    copy_size: Callable[[tuple], int]
    flops: Callable[[tuple], float]
    default_shapes: Callable[[bool, bool], list]
    own_shapes: bool = False


def elementwise_shape(size: int) -> Tuple[int, int]:
    """`size` elements as rows of 4096 (what a hidden dimension looks like)."""
    return (max(1, size // 4096), min(size, 4096))


def _elementwise_defaults(gpu: bool, quick: bool = False) -> list:
    sizes = [2**16, 2**20] if quick else ([2**16, 2**20, 2**24, 2**26] if gpu else [2**16, 2**20, 2**22])
    return [elementwise_shape(s) for s in sizes]


# Elementwise families: shapes are the output's; 64K..64M elements in rows of 4096.
ELEMENTWISE = Workload(elementwise_shape, _prod, _prod, lambda shape: 0.0, _elementwise_defaults)


@dataclass(frozen=True)
class OpCase:
    """One fused op configuration.

    kind: the family ("binary", "scalar", "linear"); fused / reference: callables over
    the arrays from `make_inputs(shape, dtype, key)`, which the family defines
    (binary: [a, b] of `shape`; scalar: [x]; linear: shape (M, K, N) -> [x, weight(, bias)]).
    """

    name: str
    kind: str
    pattern: object
    fused: Callable
    reference: Callable
    inputs: Callable = None  # (case, shape, dtype, key) -> list of arrays; None: the family's
    workload: Workload = ELEMENTWISE

    def make_inputs(self, shape: Tuple[int, ...], dtype=mx.float32, key=None) -> List[mx.array]:
        make = self.inputs
        if make is None:  # a case made elsewhere (e.g. the tracker's scalar-mul cases)
            from .registry import cases

            make = next(c.inputs for c in cases(self.kind))
        return make(self, tuple(shape), dtype, key if key is not None else mx.random.key(0))


@dataclass(frozen=True)
class Spelling:
    """One way user code writes a fused op, as plain MLX code.

    pattern: the FusionPattern a match of it is (config, tracker and stats key).
    reference: the unfused function, e.g. ``lambda a, b: nn.relu(a + b)``; its trace
        is the search pattern. Its arguments are the pattern's inputs.
    example: ``example(dtype) -> tuple of arrays`` to trace it with (small shapes).
    scalars: positions of arguments that stand for any one-element constant; the
        match binds their value (a float) instead of a graph value.
    build: ``build(match) -> (inputs, params, extra_via) | None`` where `match` gives
        ``match.args`` (graph values or floats, by position), ``match.output`` (the root
        value), ``match.unbroadcast(v)`` and ``match.is_constant(v)``.
    rule: spellings with the same rule name are tried in order at a node, and the first
        legal match wins (longest spelling first).
    constants: values of constants (or float primitive arguments) in the reference's trace
        that stand for any value, bound as extra arguments after the reference's own
        (``match.args[len(inputs) + i]``): parameters the reference cannot take as arrays,
        e.g. ``mx.fast.rms_norm``'s eps, and the ``1/D`` of its mean on the CPU.
    graph: ``graph(dtype) -> Graph`` a hand-built trace standing in for the reference's,
        for a spelling the current device cannot export (a GPU primitive on the CPU);
        None: trace `reference`.
    """

    pattern: object
    reference: Callable
    example: Callable[[mx.Dtype], tuple]
    build: Callable
    rule: str
    scalars: Tuple[int, ...] = ()
    constants: Tuple[float, ...] = ()
    graph: Optional[Callable] = None


@dataclass(frozen=True)
class FusedOp:
    """A fused op family: see the module docstring.

    name: the family ("binary"); node_op: the IR op of its fused nodes ("FusedBinary").
    """

    name: str
    node_op: str
    spellings: Callable[[], Iterable[Spelling]]
    call: Callable[[list, dict], list]
    reference_call: Callable[[list, dict], list]
    cases: Callable[[], Iterable[OpCase]]
    kernels: Tuple = ()
    coreml: Optional[Callable] = None
    flops: Optional[Callable] = None  # flops(node) -> estimated work of a fused node; None: 1 per output
    case_for: Optional[Callable] = None  # pattern -> OpCase for patterns `cases()` does not list
    order: int = 100  # place in DEFINITIONS (and so in FUSED_OPS, benchmark tables), then by name
    doc: str = ""


def by_node_op(definitions: Iterable[FusedOp]) -> Dict[str, FusedOp]:
    return {d.node_op: d for d in definitions}
