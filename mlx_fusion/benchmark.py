"""Measuring what fusion buys: unfused eager vs `mx.compile` vs fused.

Timing the way MLX needs it: MLX is lazy and a GPU runs asynchronously, so
each measurement builds `calls_per_eval` independent calls and evaluates them
together (one synchronizing eval per call would add 10-25 us on a GPU and hide
the kernel), after a warm-up that pays for JIT compilation, and reports the
median over repeats. Bandwidth counts each input read once and each output
written once; the reference ceiling is a plain copy measured in the same run.

Used by benchmarks/ops.py, the `mlx-fusion bench` command and the tracker.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx

from .ops.registry import FUSED_OPS, OpCase

__all__ = [
    "BenchResult",
    "device_description",
    "time_call",
    "copy_bandwidth",
    "bench_case",
    "default_shapes",
    "run_ops_benchmark",
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

    @property
    def speedup_vs_eager(self) -> float:
        return self.eager_us / self.fused_us

    @property
    def speedup_vs_compiled(self) -> float:
        return self.compiled_us / self.fused_us

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
            fused_gbps=self.fused_gbps,
            pct_of_copy=self.pct_of_copy,
            fused_tflops=self.fused_tflops,
        )
        return d


def device_description() -> str:
    """e.g. "gpu (cuda)", "gpu (metal: Apple M2)", "cpu (x86_64)"."""
    dev = mx.default_device()
    if dev.type == mx.DeviceType.gpu:
        try:
            info = mx.device_info()
            name = info.get("device_name") or info.get("architecture") or ""
        except Exception:  # device_info is not on every backend
            name = ""
        backend = "metal" if mx.metal.is_available() else ("cuda" if mx.cuda.is_available() else "gpu")
        return f"gpu ({backend}{': ' + str(name) if name else ''})"
    return f"cpu ({platform.machine()})"


def time_call(fn: Callable, args: Sequence, calls_per_eval: int = 10, repeats: int = 15,
              warmup: int = 2, min_time_s: float = 0.0) -> float:
    """Median seconds per call of fn(*args), evaluating `calls_per_eval` calls at once."""
    mx.eval(*[a for a in args if isinstance(a, mx.array)])
    for _ in range(warmup):
        mx.eval(fn(*args))
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval([fn(*args) for _ in range(calls_per_eval)])
        times.append((time.perf_counter() - t0) / calls_per_eval)
        if min_time_s and time.perf_counter() - start > min_time_s and len(times) >= 3:
            break
    return statistics.median(times)


def copy_bandwidth(n: int, dtype=mx.float32, **timing) -> float:
    """GB/s of MLX's own unary elementwise kernel (read n, write n), the ceiling a
    fused elementwise kernel is measured against."""
    x = mx.random.normal((n,)).astype(dtype)
    t = time_call(mx.negative, [x], **timing)
    return 2 * n * dtype.size / t / 1e9


def _vjp_fn(fn: Callable):
    """fwd+bwd of fn with a fixed cotangent: what a training step asks of the op."""

    def run(*args):
        out = fn(*args[:-1])
        _, vjps = mx.vjp(fn, list(args[:-1]), [args[-1]])
        return vjps

    return run


def bench_case(case: OpCase, shape: Tuple[int, ...], dtype=mx.float32, backward: bool = False,
               copy_gbps: float = 0.0, **timing) -> BenchResult:
    """Time one op configuration as eager (unfused), mx.compile and fused."""
    args = case.make_inputs(shape, dtype)
    out = case.reference(*args)
    nbytes = sum(a.nbytes for a in args) + out.nbytes
    flops = 0.0
    if case.kind == "linear":
        m, k, n = shape
        flops = 2.0 * m * k * n * (3 if backward else 1)
    eager, compiled, fused = case.reference, mx.compile(case.reference), case.fused
    if backward:
        cot = mx.ones_like(out)
        args = args + [cot]
        eager, compiled, fused = _vjp_fn(eager), mx.compile(_vjp_fn(case.reference)), _vjp_fn(fused)
    res = BenchResult(
        op=case.name, kind=case.kind, pass_="fwd+bwd" if backward else "fwd", shape=tuple(shape),
        dtype=str(dtype).replace("mlx.core.", ""),
        eager_us=time_call(eager, args, **timing) * 1e6,
        compiled_us=time_call(compiled, args, **timing) * 1e6,
        fused_us=time_call(fused, args, **timing) * 1e6,
        bytes_moved=nbytes, flops=flops, copy_gbps=copy_gbps,
    )
    return res


def default_shapes(kind: str, gpu: bool, quick: bool = False) -> List[Tuple[int, ...]]:
    """Elementwise sizes 64K..64M elements (2-D, rows of 4096); linear at decode
    and large shapes (M, K, N)."""
    if kind == "linear":
        if quick:
            return [(1, 1024, 1024), (256, 1024, 1024)]
        if gpu:
            return [(1, 4096, 4096), (32, 4096, 4096), (4096, 4096, 4096), (8192, 4096, 11008)]
        return [(1, 2048, 2048), (32, 2048, 2048), (512, 2048, 2048)]
    sizes = [2**16, 2**20] if quick else ([2**16, 2**20, 2**24, 2**26] if gpu else [2**16, 2**20, 2**22])
    return [(max(1, s // 4096), min(s, 4096)) for s in sizes]


def run_ops_benchmark(
    ops: Optional[Iterable[OpCase]] = None,
    dtypes: Sequence = (mx.float32, mx.bfloat16),
    shapes: Optional[Dict[str, List[Tuple[int, ...]]]] = None,
    backward: bool = False,
    quick: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    **timing,
) -> List[BenchResult]:
    """Benchmark every op case × dtype × shape on the default device."""
    gpu = mx.default_device().type == mx.DeviceType.gpu
    ops = list(ops if ops is not None else FUSED_OPS)
    if not timing:
        timing = dict(calls_per_eval=10 if gpu else 3, repeats=15 if gpu else 5)
    results = []
    copy_cache: Dict[tuple, float] = {}
    for dtype in dtypes:
        for case in ops:
            for shape in (shapes or {}).get(case.kind) or default_shapes(case.kind, gpu, quick):
                n = shape[0] * shape[1] if case.kind != "linear" else shape[0] * shape[2]
                key = (n, dtype)
                if key not in copy_cache:
                    copy_cache[key] = copy_bandwidth(n, dtype, **timing)
                if progress:
                    progress(f"{case.name} {shape} {dtype}")
                for bwd in ((False, True) if backward else (False,)):
                    results.append(bench_case(case, shape, dtype, backward=bwd, copy_gbps=copy_cache[key], **timing))
    return results
