"""Benchmark every fused op against unfused eager MLX and mx.compile.

    python benchmarks/ops.py                 # default device, all ops, f32 + bf16
    python benchmarks/ops.py --quick --json out.json
    python benchmarks/ops.py --ops add+relu,linear+bias+relu --backward

Prints one table per pass: median time per call (us) of eager / mx.compile /
fused, the fused speedups, achieved GB/s (or TFLOP/s for linear) and percent
of the copy bandwidth measured in the same run. Results are ratios from one
run on one machine: see docs/performance.md.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mlx_fusion.benchmark import device_description, run_ops_benchmark  # noqa: E402
from mlx_fusion.ops.registry import FUSED_OPS  # noqa: E402

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--kinds", default="", help="comma-separated kinds: binary,scalar,linear")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward (mx.vjp)")
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--json", help="write results to this JSON file")
    args = ap.parse_args(argv)
    names = set(filter(None, args.ops.split(",")))
    kinds = set(filter(None, args.kinds.split(",")))
    ops = [c for c in FUSED_OPS if (not names or c.name in names) and (not kinds or c.kind in kinds)]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    print(f"device: {device_description()}  mlx {mx.__version__}", flush=True)
    results = run_ops_benchmark(ops, dtypes, backward=args.backward, quick=args.quick,
                                progress=lambda s: print("  ..", s, file=sys.stderr, flush=True))
    hdr = f"{'op':<22}{'pass':<8}{'shape':<20}{'dtype':<9}{'eager':>9}{'compile':>9}{'fused':>9}{'call':>9}{'x eager':>8}{'x comp':>8}{'GB/s':>8}{'%copy':>7}{'TFLOP/s':>8}"
    print(hdr)
    for r in results:
        print(f"{r.op:<22}{r.pass_:<8}{str(r.shape):<20}{r.dtype:<9}{r.eager_us:>9.1f}{r.compiled_us:>9.1f}"
              f"{r.fused_us:>9.1f}{r.extra.get('fused_call_us', float('nan')):>9.1f}{r.speedup_vs_eager:>8.2f}{r.speedup_vs_compiled:>8.2f}{r.fused_gbps:>8.1f}"
              f"{r.pct_of_copy:>7.1f}{r.fused_tflops:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_description(), "mlx": mx.__version__,
                                               "results": [r.as_dict() for r in results]}, indent=1))
    return results


if __name__ == "__main__":
    main()
