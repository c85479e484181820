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

import fnmatch
import functools
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx

from .ops.registry import FUSED_OPS, OpCase

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
    "select_ops",
    "parse_dtypes",
    "parse_sizes",
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
        )
        return d


# BenchResult is what the tracker's `benchmark_pattern` returns; the issue calls it this.
BenchmarkResult = BenchResult


def device_kind() -> str:
    """"metal", "cuda" or "cpu": where MLX's default device runs (as the optimizer names it)."""
    from .config import current_device_kind

    return current_device_kind()


def _device_name() -> str:
    return _device_name_of(str(mx.default_device()))


@functools.lru_cache(maxsize=None)  # the tracker asks once per fusion candidate
def _device_name_of(_device: str) -> str:
    dev = mx.default_device()
    try:
        info = mx.device_info(dev)
    except Exception:  # older MLX takes no argument (and reports the GPU); not every backend has it
        try:
            info = mx.device_info() if dev.type == mx.DeviceType.gpu else {}
        except Exception:
            info = {}
    name = info.get("device_name") or info.get("architecture") or ""
    return str(name) or (platform.processor() or platform.machine() if dev.type == mx.DeviceType.cpu else "")


def device_description() -> str:
    """e.g. "gpu (cuda: NVIDIA H100 80GB HBM3)", "gpu (metal: Apple M2)", "cpu (x86_64: Intel Xeon)"."""
    name = _device_name()
    if mx.default_device().type == mx.DeviceType.gpu:
        return f"gpu ({device_kind()}{': ' + name if name else ''})"
    return f"cpu ({platform.machine()}{': ' + name if name and name != platform.machine() else ''})"


def device_id(kind: Optional[str] = None) -> str:
    """The key measurements are stored under: "<kind>:<device name>", e.g. "cuda:NVIDIA H100".
    For a `kind` other than the current device's, just the kind (its name is unknown here)."""
    current = device_kind()
    if kind is not None and kind != current:
        return kind
    name = _device_name()
    return f"{current}:{name}" if name else current


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


def default_timing(quick: bool = False) -> dict:
    """`time_call` settings: a GPU needs several calls per eval to hide the sync; a CPU is
    synchronous, so fewer calls and a time budget per measurement keep runs short."""
    gpu = mx.default_device().type == mx.DeviceType.gpu
    if gpu:
        return dict(calls_per_eval=10, repeats=7 if quick else 15, min_time_s=0.5 if quick else 0.0)
    return dict(calls_per_eval=2 if quick else 3, repeats=5, warmup=1 if quick else 2,
                min_time_s=0.05 if quick else 0.5)


def copy_bandwidth(n: int, dtype=mx.float32, **timing) -> float:
    """GB/s of MLX's own unary elementwise kernel (read n, write n), the ceiling a
    fused elementwise kernel is measured against."""
    x = mx.random.normal((n,)).astype(dtype)
    t = time_call(mx.negative, [x], **timing)
    return 2 * n * dtype.size / t / 1e9


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
    eager, fused_call = case.reference, case.fused
    if backward:
        cot = mx.ones_like(out)
        args = args + [cot]
        eager, fused_call = _vjp_fn(eager), _vjp_fn(fused_call)
    compiled, fused = mx.compile(eager), mx.compile(fused_call)
    res = BenchResult(
        op=case.name, kind=case.kind, pass_="fwd+bwd" if backward else "fwd", shape=tuple(shape),
        dtype=str(dtype).replace("mlx.core.", ""),
        eager_us=time_call(eager, args, **timing) * 1e6,
        compiled_us=time_call(compiled, args, **timing) * 1e6,
        fused_us=time_call(fused, args, **timing) * 1e6,
        bytes_moved=nbytes, flops=flops, copy_gbps=copy_gbps,
        extra={"fused_call_us": time_call(fused_call, args, **timing) * 1e6},
    )
    return res


def elementwise_shape(size: int) -> Tuple[int, int]:
    """`size` elements as rows of 4096 (what a hidden dimension looks like)."""
    return (max(1, size // 4096), min(size, 4096))


def default_shapes(kind: str, gpu: bool, quick: bool = False) -> List[Tuple[int, ...]]:
    """Elementwise sizes 64K..64M elements (2-D, rows of 4096); linear at decode
    and large shapes (M, K, N)."""
    if kind == "linear":
        if quick:
            # A CPU GEMM at 256x1024x1024 takes ~0.1 s a call: too slow for a quick run.
            return [(1, 1024, 1024), (256, 1024, 1024)] if gpu else [(1, 512, 512), (64, 512, 512)]
        if gpu:
            return [(1, 4096, 4096), (32, 4096, 4096), (4096, 4096, 4096), (8192, 4096, 11008)]
        return [(1, 2048, 2048), (32, 2048, 2048), (512, 2048, 2048)]
    sizes = [2**16, 2**20] if quick else ([2**16, 2**20, 2**24, 2**26] if gpu else [2**16, 2**20, 2**22])
    return [elementwise_shape(s) for s in sizes]


def _copy_size(kind: str, shape: Tuple[int, ...]) -> int:
    """Elements of the largest operand: the copy that bounds this op's memory traffic."""
    if kind == "linear":
        m, k, n = shape
        return max(m * k, k * n, m * n)
    size = 1
    for d in shape:
        size *= d
    return size


def bench_plan(ops: Optional[Iterable[OpCase]] = None, dtypes: Sequence = (mx.float32, mx.bfloat16),
               shapes: Optional[Dict[str, List[Tuple[int, ...]]]] = None,
               quick: bool = False) -> List[Tuple[OpCase, Tuple[int, ...], object]]:
    """The (case, shape, dtype) configurations `run_ops_benchmark` times, in order."""
    gpu = mx.default_device().type == mx.DeviceType.gpu
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
        key = (_copy_size(case.kind, shape), dtype)
        if key not in copy_cache:
            copy_cache[key] = copy_bandwidth(key[0], dtype, **timing)
        if progress:
            progress(f"{case.name} {shape} {str(dtype).replace('mlx.core.', '')}")
        for bwd in ((False, True) if backward else (False,)):
            res = bench_case(case, shape, dtype, backward=bwd, copy_gbps=copy_cache[key], **timing)
            results.append(res)
            if on_result:
                on_result(res)
    return results


# -- command-line selections (mlx-fusion bench, benchmarks/ops.py) ---------------------------
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtypes(text: str, quick: bool = False) -> list:
    """"float32,bfloat16" -> dtypes; empty: float32 and bfloat16 (float32 only if `quick`,
    since bfloat16 is emulated and slow on a CPU). Raises ValueError naming the option."""
    names = [d.strip() for d in text.split(",") if d.strip()] or (["float32"] if quick else ["float32", "bfloat16"])
    bad = [d for d in names if d not in DTYPES]
    if bad:
        raise ValueError(f"--dtypes: unknown {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    return [DTYPES[d] for d in names]


def select_ops(text: str) -> list:
    """Registry cases named by comma-separated names, globs ("mul+*") or kinds ("linear");
    empty: all. Raises ValueError if an entry matches nothing."""
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    if not wanted:
        return list(FUSED_OPS)
    chosen, unmatched = [], []
    for w in wanted:
        hits = [c for c in FUSED_OPS if c.kind == w or fnmatch.fnmatchcase(c.name, w)]
        if not hits:
            unmatched.append(w)
        chosen += [c for c in hits if c not in chosen]
    if unmatched:
        raise ValueError(f"--ops: nothing matches {', '.join(unmatched)}; ops are "
                         f"{', '.join(c.name for c in FUSED_OPS)} (kinds: binary, scalar, linear)")
    return chosen


def _parse_count(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    n = int(text[:-1] if mult > 1 else text) * mult
    if n < 1:
        raise ValueError
    return n


def parse_sizes(text: str) -> dict:
    """"4096,64K,1x512x512" -> {kind: shapes} for `run_ops_benchmark`: counts are elementwise
    sizes (rows of 4096), MxKxN are linear shapes; kinds given no size keep their defaults."""
    shapes: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            if "x" in item.lower():
                dims = tuple(_parse_count(d) for d in item.lower().split("x"))
                if len(dims) != 3:
                    raise ValueError
                shapes.setdefault("linear", []).append(dims)
            else:
                shape = elementwise_shape(_parse_count(item))
                shapes.setdefault("binary", []).append(shape)
                shapes.setdefault("scalar", []).append(shape)
        except ValueError:
            raise ValueError(f"--sizes: bad size {item!r}; use element counts (4096, 64K, 1M) "
                             "or MxKxN for linear ops") from None
    return shapes
