"""Per-call cost of the fused ops against the MLX code they replace (issue 12 item 5).

For add+relu (fused_binary), affine+gelu (fused_scalar), glu+silu (fused_glu) and
add+rms_norm (fused_add_rms_norm, rows of 2048), at 64K and 1M elements, bf16 and f32,
the median microseconds per call of:

  mlx        the unfused MLX code, eager
  mlx_comp   mx.compile of it
  fused      our fused op, eager, called directly (it probes for a shapeless trace each call)
  fused_known the same inside `known_outside` (as a fused module's replay runs it: no probe)
  fused_comp our fused op inside mx.compile
  raw        the bare `mx.fast.cuda_kernel` / `metal_kernel` call with the same kernel (no wrapper)

each as device time (`--calls` calls per mx.eval, after a warm-up, median of repeats) and as
host time (the graph built `--host-calls` times without eval). On the CPU the kernel rows
report n/a. With --stub the CUDA path runs against a kernel object that returns mx.zeros at
once (no GPU needed): the host rows then measure our Python per call.

    PYTHONPATH=$PWD python tools/percall_profile.py --json out.json        # on the GPU
    PYTHONPATH=$PWD python tools/percall_profile.py --quick [--stub]        # a short check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_fusion import kernels
from mlx_fusion.device import device_description
from mlx_fusion.ops import fused_binary, fused_scalar
from mlx_fusion.ops.add_norm import fused_add_rms_norm
from mlx_fusion.ops.common import launch_geometry
from mlx_fusion.ops.glu import fused_glu
from mlx_fusion.patterns import Activation, BinaryOp
from mlx_fusion.timing import time_samples

VARIANTS = ("mlx", "mlx_comp", "fused", "fused_known", "fused_comp", "raw")
EPS = 1e-5
ROW = 2048


class StubKernel:
    """`mx.fast.cuda_kernel`'s signature; a call returns zeros of the output shapes at once."""

    def __init__(self, **spec):
        self.spec = spec

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **kw):
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]


def _const(values, dtype) -> mx.array:
    a = mx.array(values, dtype=dtype)
    mx.eval(a)
    return a


def _raw_elementwise(name, extra: mx.array, n_inputs: int):
    """The bare kernel call of an elementwise op: inputs, then the op's constant array."""

    def make(*xs):
        kernel = kernels.get_kernel(name)
        x = xs[0]
        grid, group = launch_geometry(x.size, x.dtype)
        shape, dt = [x.shape], [x.dtype]
        tmpl = [("T", x.dtype)]
        return lambda *ys: kernel(inputs=[*ys[:n_inputs], extra], output_shapes=shape, output_dtypes=dt,
                                  grid=grid, threadgroup=group, template=tmpl)[0]

    return make


def _raw_add_rms(x, r, w):
    kernel = kernels.get_kernel("add_rms_norm")
    rows, d = x.shape
    tg = min(256, max(32, -(-d // 32) * 32))
    e = _const([EPS], mx.float32)
    shapes, dts = [(rows, d), (rows, d), (rows,)], [x.dtype, x.dtype, mx.float32]
    tmpl = [("T", x.dtype), ("HAS_WEIGHT", True)]
    return lambda x, r, w: kernel(inputs=[x, r, w, e], output_shapes=shapes, output_dtypes=dts,
                                  grid=(rows * tg, 1, 1), threadgroup=(tg, 1, 1), template=tmpl)[:2]


@dataclass
class Op:
    name: str
    n_inputs: int
    mlx: Callable
    fused: Callable
    raw: Optional[Callable]  # (*inputs) -> the bare kernel call over arrays like them
    rows: bool = False  # inputs (rows, 2048) [+ weight (2048,)]


def _ops():
    relu, gelu, silu = Activation.RELU, Activation.GELU, Activation.SILU
    return [
        Op("add+relu", 2, lambda a, b: nn.relu(a + b), lambda a, b: fused_binary(a, b, "add", "relu"),
           _raw_elementwise("binary_activation", _const([BinaryOp.ADD.code, relu.code], mx.int32), 2)),
        Op("affine+gelu", 1, lambda x: nn.gelu(x * 1.5 - 0.25), lambda x: fused_scalar(x, 1.5, -0.25, "gelu"),
           _raw_elementwise("scalar_activation", _const([1.5, -0.25, gelu.code], mx.float32), 1)),
        Op("glu+silu", 2, lambda g, u: nn.silu(g) * u, lambda g, u: fused_glu(g, u, "silu"),
           _raw_elementwise("glu", _const([silu.code], mx.int32), 2)),
        Op("add+rms_norm", 3, lambda x, r, w: (lambda h: (h, mx.fast.rms_norm(h, w, EPS)))(x + r),
           lambda x, r, w: fused_add_rms_norm(x, r, w, EPS), _raw_add_rms, rows=True),
    ]


def _inputs(op: Op, size: int, dtype):
    shape = (max(1, size // ROW), ROW) if op.rows else (max(1, size // 4096), min(size, 4096))
    keys = mx.random.split(mx.random.key(0), op.n_inputs)
    xs = [mx.random.normal(shape, key=k).astype(dtype) for k in keys]
    if op.rows:
        xs[2] = (1 + 0.1 * mx.random.normal((ROW,), key=keys[2])).astype(dtype)
    mx.eval(xs)
    return xs


def device_us(fn, args, calls, repeats) -> float:
    return statistics.median(time_samples(fn, args, calls_per_eval=calls, repeats=repeats, warmup=3)) * 1e6


def host_us(fn, args, calls, repeats) -> float:
    """Microseconds to build one call's graph (no eval: MLX's and our Python, no device work)."""
    for _ in range(min(calls, 100)):
        fn(*args)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def _known_outside(fn):
    """fn as a fused module's replay runs it: known to be outside a shapeless trace, so the ops
    skip their shapeless probe (mlx_fusion/_shapeless.py; None on trees without it)."""
    try:
        from mlx_fusion._shapeless import KNOWN_OUTSIDE
    except ImportError:
        return None

    def run(*args):
        with KNOWN_OUTSIDE:
            return fn(*args)

    return run


def _variants(op: Op, args, kernel: bool):
    out = {"mlx": op.mlx, "mlx_comp": mx.compile(op.mlx), "fused": op.fused, "fused_known": _known_outside(op.fused),
           "fused_comp": mx.compile(op.fused)}
    out["raw"] = op.raw(*args) if kernel and op.raw is not None else None
    return out


def measure(ops, sizes, dtypes, calls, host_calls, repeats, stub: bool, device: bool):
    kernel = kernels.kernel_backend() is not None
    rows = []
    for op in ops:
        for dtype in dtypes:
            for size in sizes:
                args = _inputs(op, size, dtype)
                for variant, fn in _variants(op, args, kernel).items():
                    row = {"op": op.name, "dtype": str(dtype).split(".")[-1], "size": size,
                           "shape": list(args[0].shape), "variant": variant, "device_us": None, "host_us": None}
                    if fn is not None and not (stub and variant == "fused_comp"):
                        row["host_us"] = host_us(fn, args, host_calls, repeats)
                        if device and not stub:
                            row["device_us"] = device_us(fn, args, calls, repeats)
                    rows.append(row)
                    print(_line(row), flush=True)
    return rows


def _fmt(v) -> str:
    return f"{v:9.2f}" if v is not None else "      n/a"


def _line(row) -> str:
    return (f"{row['op']:<13} {row['dtype']:<9} {row['size']:>8}  {row['variant']:<10}"
            f" device {_fmt(row['device_us'])} us   host {_fmt(row['host_us'])} us")


def summary(rows) -> str:
    """One line per (op, dtype, size): every variant's device (host) us, and fused/mlx ratios."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["dtype"], r["size"]), {})[r["variant"]] = r
    head = f"{'op':<13} {'dtype':<9} {'size':>8} | " + " | ".join(f"{v:>18}" for v in VARIANTS)
    lines = [head + " | fused/mlx  comp/comp (device; host)", "-" * (len(head) + 40)]
    for (op, dt, size), g in groups.items():
        cells = []
        for v in VARIANTS:
            r = g.get(v, {})
            d, h = r.get("device_us"), r.get("host_us")
            cells.append(f"{(f'{d:.1f}' if d is not None else 'n/a'):>8} ({(f'{h:.1f}' if h is not None else 'n/a'):>7})")

        def ratio(a, b, key):
            x, y = g.get(a, {}).get(key), g.get(b, {}).get(key)
            return f"{x / y:.2f}" if x is not None and y else "n/a"

        lines.append(f"{op:<13} {dt:<9} {size:>8} | " + " | ".join(cells)
                     + f" | {ratio('fused', 'mlx', 'device_us')} ; {ratio('fused', 'mlx', 'host_us')}"
                     + f"  {ratio('fused_comp', 'mlx_comp', 'device_us')} ; {ratio('fused_comp', 'mlx_comp', 'host_us')}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64K only, bf16 only, fewer repeats")
    p.add_argument("--stub", action="store_true", help="CUDA path with a kernel that returns zeros (host rows only)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--calls", type=int, default=50, help="calls per mx.eval")
    p.add_argument("--host-calls", type=int, default=2000, help="graph builds per host sample")
    p.add_argument("--repeats", type=int, default=0, help="samples per measurement (default 15, quick 5)")
    a = p.parse_args(argv)
    ops = [o for o in _ops() if not a.ops or o.name in a.ops.split(",")]
    sizes = [2**16] if a.quick else [2**16, 2**20]
    dtypes = [mx.bfloat16] if a.quick else [mx.bfloat16, mx.float32]
    repeats = a.repeats or (5 if a.quick else 15)
    host_calls = min(a.host_calls, 500) if a.quick else a.host_calls
    if not a.quick and mx.default_device().type == mx.DeviceType.cpu and not a.stub:
        mx.set_cache_limit(4 << 30)  # FACTS.md: CPU timings need the buffer cache raised
    print(f"# {device_description()}, MLX {mx.__version__}" + (" (stub kernels: host time only)" if a.stub else ""))
    if a.stub:
        with kernels.use_backend("cuda", StubKernel):
            rows = measure(ops, sizes, dtypes, a.calls, host_calls, repeats, stub=True, device=False)
    else:
        rows = measure(ops, sizes, dtypes, a.calls, host_calls, repeats, stub=False, device=True)
    print()
    print(summary(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device_description(), "mlx": mx.__version__, "stub": a.stub,
                       "calls_per_eval": a.calls, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
