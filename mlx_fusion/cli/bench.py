"""`mlx-fusion bench`: time fused ops (or a whole model) against eager MLX and mx.compile."""

from __future__ import annotations

import argparse
import math

from ..perfcache import dtype_name
from .common import (EXIT_OK, SPEC_HELP, UsageError, check_writable, consoles, env, print_table, progress,
                     set_device, speedup_text, write_json)
from .options import non_negative_int

__all__ = ["add_parser", "cmd_bench"]


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="time fused ops (or a whole model) against eager MLX and mx.compile",
                       description="Time every fused op (pattern x activation x dtype x size) as eager MLX, "
                       "mx.compile and fused, or with --model a whole model forward and forward+backward. "
                       "Op results update the performance cache the optimizer decides from.")
    b.add_argument("--model", metavar="SPEC", help="benchmark a model end to end instead of single ops; " + SPEC_HELP)
    b.add_argument("--device", choices=("cpu", "gpu"), help="run on this device (default: MLX's default device)")
    b.add_argument("--quick", action="store_true",
                   help="small sizes, float32 only unless --dtypes, shorter timing: about 30 s on a 2-core CPU")
    b.add_argument("--ops", default="", metavar="LIST",
                   help="comma-separated op names, globs or kinds, e.g. 'add+relu,mul+*,linear' (default: all)")
    b.add_argument("--dtypes", default="", metavar="LIST",
                   help="comma-separated dtypes from float32,float16,bfloat16 (default: float32,bfloat16; "
                   "--quick: float32)")
    b.add_argument("--sizes", default="", metavar="LIST",
                   help="comma-separated sizes replacing the defaults: element counts for elementwise ops "
                   "(65536, 64K, 1M; measured at exactly that count) and MxKxN shapes for linear ops (1x1024x1024)")
    b.add_argument("--backward", action="store_true", help="also time forward+backward (ops; models always do)")
    b.add_argument("--json", metavar="PATH", help="also write machine-readable results here (schema: docs/cli.md)")
    b.add_argument("--no-cache", action="store_true", help="do not update the performance cache")
    b.add_argument("--min-size", type=non_negative_int, metavar="N",
                   help="with --model: fuse outputs of at least N elements (default: the config's, 4096)")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args) -> int:
    check_writable(args.json, "--json")
    set_device(args.device)
    if args.model is not None:
        return _bench_model(args)
    from rich import box
    from rich.table import Table

    from ..benchmark import bench_plan, copy_size, default_timing, run_ops_benchmark
    from ..tracker import PerformanceTracker
    from .options import parse_dtypes, parse_sizes, select_ops

    out, err = consoles()
    try:
        ops, dtypes, shapes = select_ops(args.ops), parse_dtypes(args.dtypes, args.quick), parse_sizes(args.sizes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    timing = default_timing(args.quick)
    plan = bench_plan(ops, dtypes, shapes, args.quick)
    report = env(args.argv)
    tracker = None if args.no_cache else PerformanceTracker(autosave=False)
    out.print(f"device: {report['device']}   mlx {report['mlx_version']}   {len(plan)} configurations", markup=False)
    with progress(err) as bar:
        task = bar.add_task("starting", total=len(plan) * (2 if args.backward else 1))
        results = run_ops_benchmark(ops, dtypes, shapes, backward=args.backward, quick=args.quick,
                                    progress=lambda label: bar.update(task, description=label),
                                    on_result=lambda r: bar.advance(task), **timing)
    table = Table(title="fused ops: median time per call (us); fused = as fuse() runs it (compiled replay), "
                        "fused call = the op called eagerly; speedups and GB/s of fused",
                  box=box.SIMPLE_HEAD)  # light borders: 12 columns should fit a 140-column terminal
    for col in ("op", "pass", "shape", "dtype", "eager", "mx.compile", "fused", "fused call", "vs eager",
                "vs compile", "GB/s", "% copy", "TFLOP/s"):
        table.add_column(col, justify="left" if col in ("op", "pass", "shape", "dtype") else "right")
    for r in results:
        fwd = r.pass_ == "fwd"  # bytes_moved counts the forward pass only: no GB/s for fwd+bwd
        table.add_row(r.op, r.pass_, "x".join(map(str, r.shape)), r.dtype, f"{r.eager_us:.1f}",
                      f"{r.compiled_us:.1f}", f"{r.fused_us:.1f}",
                      f"{r.extra['fused_call_us']:.1f}" if "fused_call_us" in r.extra else "-",
                      speedup_text(r.speedup_vs_eager),
                      speedup_text(r.speedup_vs_compiled), f"{r.fused_gbps:.1f}" if fwd else "-",
                      f"{r.pct_of_copy:.0f}" if fwd and math.isfinite(r.pct_of_copy) else "-",
                      f"{r.fused_tflops:.3g}" if r.flops else "-")
        if tracker is not None:
            tracker.record(r)
    print_table(out, table)
    copies = sorted({(copy_size(r.kind, r.shape), r.dtype, r.copy_gbps) for r in results})
    out.print("copy bandwidth (mx.negative, this run): "
              + "; ".join(f"{n} x {dt}: {g:.1f} GB/s" for n, dt, g in copies))
    if tracker is not None and results:
        if tracker.save():
            out.print(f"performance cache updated: {tracker.path}")
    if args.json:
        write_json(args.json, {**report, "kind": "ops",
                               "settings": {"quick": args.quick, "backward": args.backward,
                                            "dtypes": [dtype_name(d) for d in dtypes], "timing": timing},
                               "copy_bandwidth": [{"elements": n, "dtype": dt, "gbps": g} for n, dt, g in copies],
                               "cache": str(tracker.path) if tracker is not None else None,
                               "results": [r.as_dict() for r in results]}, err)
    return EXIT_OK


def _mib(nbytes) -> str:
    return f"{nbytes / 2**20:.1f}" if nbytes is not None and math.isfinite(nbytes) else "-"


def _bench_model(args) -> int:
    from rich.table import Table
    from rich.text import Text

    from ..config import fusion_config
    from ..lm import bench_lm, is_lm_spec
    from ..models import bench_model, load_spec, parameter_count
    from ..timing import default_timing

    out, err = consoles()
    model, inputs = load_spec(args.model)
    report = env(args.argv)
    timing = default_timing(args.quick)
    overrides = {} if args.min_size is None else {"min_tensor_size": args.min_size}
    shapes = ", ".join(f"{dtype_name(a.dtype)}{list(a.shape)}" for a in inputs)
    out.print(f"device: {report['device']}   mlx {report['mlx_version']}   model {args.model}: "
              f"{parameter_count(model):,} parameters, inputs {shapes}", markup=False, emoji=False)
    lm = is_lm_spec(args.model)  # mlx-lm models: prefill, decode (KV cache) and a training step
    with progress(err) as bar, fusion_config(**overrides):
        task = bar.add_task("starting", total=12 if lm else 8)
        step = lambda s: (bar.update(task, description=s), bar.advance(task))  # noqa: E731
        if lm:
            results = bench_lm(model, inputs[0], progress=step, **timing)
        else:
            results = bench_model(model, inputs, progress=step, **timing)
    table = Table(title=Text(f"{args.model}: median time per call; peak memory of one call"))
    columns = ["pass", "variant", "time (ms)"] + (["tokens/s"] if lm else []) + [
        "vs eager", "vs mx.compile", "peak MiB", "over resident MiB", "fusions", "max |diff|"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("pass", "variant") else "right")
    for r in results:
        tps = r.get("tokens_per_s")
        rate = ([f"{tps:.1f}" if tps is not None and math.isfinite(tps) else "-"]) if lm else []
        table.add_row(r["pass"], r["variant"], f"{r['time_ms']:.3f}" if math.isfinite(r["time_ms"]) else "-", *rate, speedup_text(r["speedup_vs_eager"]),
                      speedup_text(r["speedup_vs_compiled"]), _mib(r["peak_memory_bytes"]), _mib(r["activation_memory_bytes"]),
                      "-" if r["fusions"] is None else str(r["fusions"]),
                      "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}")
    print_table(out, table)
    out.print("fused = fuse(model, compile=False); fused+compile = fuse(model), the default "
              "(the fused graph replayed under mx.compile); for fwd+bwd, mx.compile and fused+compile "
              "compile the whole training step")
    if args.json:
        write_json(args.json, {**report, "kind": "model",
                               "model": {"spec": args.model, "parameters": parameter_count(model),
                                         "inputs": [{"shape": list(a.shape), "dtype": dtype_name(a.dtype)}
                                                    for a in inputs]},
                               "settings": {"quick": args.quick, "timing": timing, **overrides},
                               "results": results}, err)
    return EXIT_OK
