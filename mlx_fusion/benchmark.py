"""Measuring what one fused op buys: unfused eager vs `mx.compile` vs fused.

    case = case_for_pattern("add+relu")                       # the registry case
    res = bench_case(case, (256, 4096), mx.float32)           # BenchResult: us, speedups, GB/s
    results = run_ops_benchmark(quick=True)                   # every case x dtype x shape

Bandwidth counts each input read once and each output written once; the
reference ceiling is a plain copy measured in the same run. Timing itself is
`mlx_fusion.timing` and device names `mlx_fusion.device` (both re-exported
here for older imports); the command-line selections (`--ops`, `--dtypes`,
`--sizes`) are `mlx_fusion.cli.options`.

Used by benchmarks/ops.py, the `mlx-fusion bench` command and the tracker.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .device import device_description, device_id, device_kind, on_gpu  # noqa: F401  (re-exported)
from .ops.elementwise import fused_scalar, scalar_reference
from .ops.registry import FUSED_OPS, OpCase, own_workload
from .perfcache import dtype_name
from .patterns import ScalarActivation, ScalarOp
from .timing import copy_bandwidth, default_timing, quartiles, time_call, time_samples  # noqa: F401  (re-exported)

__all__ = [
    "BenchResult",
    "BenchmarkResult",
    "device_description",
    "device_kind",
    "device_id",
    "time_call",
    "copy_bandwidth",
    "bench_case",
    "default_shapes",
    "default_timing",
    "bench_plan",
    "run_ops_benchmark",
    "case_for_pattern",
    "shape_for_size",
    "elementwise_shape",
    "copy_size",
]


@dataclass
class BenchResult:
    op: str
    kind: str
    pass_: str  # "fwd" or "fwd+bwd"
    shape: Tuple[int, ...]
    dtype: str
    eager_us: float
    compiled_us: float
    fused_us: float
    bytes_moved: int  # fused forward: inputs once + output once
    flops: float = 0.0
    copy_gbps: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)
    # Per-repeat speedups (fused vs the better unfused variant of the same repeat): the
    # noise the tracker weighs a decision against. Empty for results built by hand.
    speedups: List[float] = field(default_factory=list)

    @property
    def speedup_spread(self) -> Tuple[float, float]:
        """(lower, upper) quartile of the per-repeat speedups, widened to contain `speedup`
        (a ratio of medians, not the median of the ratios); both `speedup` without repeats."""
        if not self.speedups:
            return self.speedup, self.speedup
        q1, _, q3 = quartiles(self.speedups)
        return min(q1, self.speedup), max(q3, self.speedup)

    @property
    def verdict(self) -> str:
        """"faster" if even the lower quartile of the per-repeat speedups beats 1.0, "slower"
        if even the upper quartile loses, else "noise": the rule the tracker decides by."""
        low, high = self.speedup_spread
        return "faster" if low > 1.0 else ("slower" if high < 1.0 else "noise")

    @property
    def speedup_vs_eager(self) -> float:
        return self.eager_us / self.fused_us

    @property
    def speedup_vs_compiled(self) -> float:
        return self.compiled_us / self.fused_us

    @property
    def unfused_us(self) -> float:
        """What the unfused graph would really cost: fuse() replays under mx.compile by
        default, so the baseline is the better of eager and mx.compile."""
        return min(self.eager_us, self.compiled_us)

    @property
    def speedup(self) -> float:
        """Fused vs the best unfused variant; below 1.0 the fusion does not pay."""
        return self.unfused_us / self.fused_us

    @property
    def fused_gbps(self) -> float:
        return self.bytes_moved / (self.fused_us * 1e-6) / 1e9

    @property
    def pct_of_copy(self) -> float:
        return 100.0 * self.fused_gbps / self.copy_gbps if self.copy_gbps else float("nan")

    @property
    def fused_tflops(self) -> float:
        return self.flops / (self.fused_us * 1e-6) / 1e12 if self.flops else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["shape"] = list(self.shape)
        d.update(
            speedup_vs_eager=self.speedup_vs_eager,
            speedup_vs_compiled=self.speedup_vs_compiled,
            unfused_us=self.unfused_us,
            speedup=self.speedup,
            fused_gbps=self.fused_gbps,
            pct_of_copy=self.pct_of_copy,
            fused_tflops=self.fused_tflops,
            speedup_low=self.speedup_spread[0],
            speedup_high=self.speedup_spread[1],
            verdict=self.verdict,
        )
        return d


# BenchResult is what the tracker's `benchmark_pattern` returns; the issue calls it this.
BenchmarkResult = BenchResult


def _vjp_fn(fn: Callable):
    """fwd+bwd of fn with a fixed cotangent: what a training step asks of the op.
    The output is returned too: a training step needs it (the next layer reads it),
    and without it MLX drops the forward pass and times the backward alone."""

    def run(*args):
        outs, vjps = mx.vjp(fn, list(args[:-1]), [args[-1]])
        return outs + vjps

    return run


def bench_case(case: OpCase, shape: Tuple[int, ...], dtype=mx.float32, backward: bool = False,
               copy_gbps: float = 0.0, **timing) -> BenchResult:
    """Time one op configuration as eager (unfused), mx.compile and fused.

    "fused" is the op as `fuse()` runs it: inside a compiled replay, so MLX
    re-runs the recorded graph without re-entering Python. Calling the fused op
    directly in eager code also pays its Python/launch overhead on every call
    (10-30 us on a GPU); that time is reported as extra["fused_call_us"].
    """
    args = case.make_inputs(shape, dtype)
    out = case.reference(*args)
    nbytes = sum(a.nbytes for a in args) + out.nbytes
    flops = 0.0
    if case.kind == "linear":
        m, k, n = shape
        flops = 2.0 * m * k * n * (3 if backward else 1)
    elif own_workload(case.kind) is not None:
        flops = own_workload(case.kind).flops(tuple(shape)) * (3 if backward else 1)
    eager, fused_call = case.reference, case.fused
    if backward:
        cot = mx.ones_like(out)
        args = args + [cot]
        eager, fused_call = _vjp_fn(eager), _vjp_fn(fused_call)
    compiled, fused = mx.compile(eager), mx.compile(fused_call)
    t_eager, t_compiled, t_fused = (time_samples(f, args, **timing) for f in (eager, compiled, fused))
    med = statistics.median
    return BenchResult(
        op=case.name, kind=case.kind, pass_="fwd+bwd" if backward else "fwd", shape=tuple(shape),
        dtype=dtype_name(dtype),
        eager_us=med(t_eager) * 1e6, compiled_us=med(t_compiled) * 1e6, fused_us=med(t_fused) * 1e6,
        bytes_moved=nbytes, flops=flops, copy_gbps=copy_gbps,
        extra={"fused_call_us": time_call(fused_call, args, **timing) * 1e6},
        # repeat i of each variant paired by index: the ratios spread as much as the
        # three variants' repeats do, which is the noise a decision must beat
        speedups=[min(e, c) / f for e, c, f in zip(t_eager, t_compiled, t_fused)],
    )


def elementwise_shape(size: int) -> Tuple[int, int]:
    """Exactly `size` elements: rows of 4096 (what a hidden dimension looks like) when 4096
    divides it, else one row of `size`."""
    if size > 4096 and size % 4096 == 0:
        return (size // 4096, 4096)
    return (1, size)


def default_shapes(kind: str, gpu: bool, quick: bool = False) -> List[Tuple[int, ...]]:
    """Elementwise sizes 64K..64M elements (2-D, rows of 4096); linear at decode
    and large shapes (M, K, N); a family with its own workload (Workload.own_shapes), its shapes."""
    if own_workload(kind) is not None:
        return own_workload(kind).default_shapes(gpu, quick)
    if kind == "linear":
        if quick:
            # A CPU GEMM at 256x1024x1024 takes ~0.1 s a call: too slow for a quick run.
            return [(1, 1024, 1024), (256, 1024, 1024)] if gpu else [(1, 512, 512), (64, 512, 512)]
        if gpu:
            return [(1, 4096, 4096), (32, 4096, 4096), (4096, 4096, 4096), (8192, 4096, 11008)]
        return [(1, 2048, 2048), (32, 2048, 2048), (512, 2048, 2048)]
    sizes = [2**16, 2**20] if quick else ([2**16, 2**20, 2**24, 2**26] if gpu else [2**16, 2**20, 2**22])
    return [elementwise_shape(s) for s in sizes]


def copy_size(kind: str, shape: Tuple[int, ...]) -> int:
    """Elements of the largest operand: the copy that bounds this op's memory traffic."""
    if own_workload(kind) is not None:
        return own_workload(kind).copy_size(tuple(shape))
    if kind == "linear":
        m, k, n = shape
        return max(m * k, k * n, m * n)
    return math.prod(shape)


def bench_plan(ops: Optional[Iterable[OpCase]] = None, dtypes: Sequence = (mx.float32, mx.bfloat16),
               shapes: Optional[Dict[str, List[Tuple[int, ...]]]] = None,
               quick: bool = False) -> List[Tuple[OpCase, Tuple[int, ...], object]]:
    """The (case, shape, dtype) configurations `run_ops_benchmark` times, in order."""
    gpu = on_gpu()
    ops = list(ops if ops is not None else FUSED_OPS)
    return [(case, shape, dtype) for dtype in dtypes for case in ops
            for shape in (shapes or {}).get(case.kind) or default_shapes(case.kind, gpu, quick)]


def run_ops_benchmark(
    ops: Optional[Iterable[OpCase]] = None,
    dtypes: Sequence = (mx.float32, mx.bfloat16),
    shapes: Optional[Dict[str, List[Tuple[int, ...]]]] = None,
    backward: bool = False,
    quick: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    on_result: Optional[Callable[[BenchResult], None]] = None,
    **timing,
) -> List[BenchResult]:
    """Benchmark every op case x dtype x shape on the default device.

    Args:
        shapes (dict, optional): kind -> shapes; kinds left out use `default_shapes`.
        progress (callable, optional): called with a label before each configuration.
        on_result (callable, optional): called with each result as soon as it is measured.
        **timing: `time_call` settings; default `default_timing(quick)`.
    """
    timing = timing or default_timing(quick)
    results = []
    copy_cache: Dict[tuple, float] = {}
    for case, shape, dtype in bench_plan(ops, dtypes, shapes, quick):
        key = (copy_size(case.kind, shape), dtype)
        if key not in copy_cache:
            copy_cache[key] = copy_bandwidth(key[0], dtype, **timing)
        if progress:
            progress(f"{case.name} {shape} {dtype_name(dtype)}")
        for bwd in ((False, True) if backward else (False,)):
            res = bench_case(case, shape, dtype, backward=bwd, copy_gbps=copy_cache[key], **timing)
            results.append(res)
            if on_result:
                on_result(res)
    return results


# -- which case measures a pattern, at which shape ----------------------------------------------------
_SCALARS = {ScalarOp.MUL: (1.5, 0.0), ScalarOp.ADD: (1.0, -0.25), ScalarOp.AFFINE: (1.5, -0.25)}


def case_for_pattern(pattern) -> OpCase:
    """The registry case that benchmarks `pattern` (an instance or a name like "add+relu")."""
    for case in FUSED_OPS:
        if case.pattern == pattern or case.name == pattern or case.pattern.name == pattern:
            return case
    if isinstance(pattern, ScalarActivation):  # the registry lists affine only; mul/add are its cases
        scale, shift = _SCALARS[pattern.scalar_op]
        act = pattern.activation
        return OpCase(pattern.name, "scalar", pattern,
                      lambda x: fused_scalar(x, scale, shift, act),
                      lambda x: scalar_reference(x, scale, shift, act))
    raise ValueError(f"no benchmark for pattern {pattern!r}; known: {[c.name for c in FUSED_OPS]}")


def shape_for_size(case: OpCase, tensor_size: Union[int, Tuple[int, ...]]) -> Tuple[int, ...]:
    """An int is the fused output's element count (what the tracker is keyed by): rows of
    4096 elementwise; for a linear, M x 1024 with K = N = 1024. A tuple is used as given
    ((M, K, N) for linears)."""
    if not isinstance(tensor_size, int):
        return tuple(tensor_size)
    if own_workload(case.kind) is not None:
        return own_workload(case.kind).shape_for_size(tensor_size)
    if case.kind == "linear":
        n = min(1024, tensor_size)
        return (max(1, tensor_size // n), 1024, n)
    return elementwise_shape(tensor_size)
