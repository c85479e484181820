"""`mlx-fusion bench`: time fused ops (or a whole model) against eager MLX and mx.compile.

Never loses work: one progress line per finished configuration on stderr (a terminal or
not), the `--json` file rewritten atomically after every row (valid JSON at every point,
``"complete": false`` until the end), the performance cache saved after every row, and on
Ctrl-C (SIGINT) or SIGTERM the rows measured so far are printed and written, then the
command exits with 130. ``--json -`` prints the JSON on standard output (once, at the end or on Ctrl-C);
the table and everything else then go to stderr.
"""

from __future__ import annotations

import argparse
import math

from ..perfcache import dtype_name
from .common import (EXIT_INTERRUPTED, EXIT_OK, SPEC_HELP, ProgressLines, UsageError, check_writable, consoles, env,
                     print_table, progress, set_device, sigterm_interrupts, speedup_text, spread_text, write_json)
from .options import non_negative_int

__all__ = ["add_parser", "cmd_bench", "OPS_DROP_ORDER", "MODEL_DROP_ORDER"]

# Columns left out, in this order, while a table is wider than the terminal (docs/cli.md).
OPS_DROP_ORDER = ("TFLOP/s", "% copy", "fused call", "GB/s", "vs eager", "vs compile", "eager", "mx.compile",
                  "pass", "dtype", "fused")
MODEL_DROP_ORDER = ("over resident MiB", "peak MiB", "max |diff|", "fusions", "tokens/s", "vs eager",
                    "quartiles (ms)")

# Options of one mode only: giving one in the other mode is a usage error (exit 2).
_OPS_ONLY = {"ops": "--ops", "dtypes": "--dtypes", "sizes": "--sizes", "backward": "--backward",
             "no_cache": "--no-cache"}
_MODEL_ONLY = {"min_size": "--min-size", "merge_projections": "--merge-projections"}


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="time fused ops (or a whole model) against eager MLX and mx.compile",
                       description="Time every fused op (pattern x activation x dtype x size) as eager MLX, "
                       "mx.compile and fused, or with --model a whole model forward and forward+backward. "
                       "Op results update the performance cache the optimizer decides from. One progress line "
                       "per finished configuration goes to stderr; --json is rewritten after every row; "
                       "Ctrl-C keeps what was measured and exits 130.")
    b.add_argument("--model", metavar="SPEC", help="benchmark a model end to end instead of single ops; " + SPEC_HELP)
    b.add_argument("--device", choices=("cpu", "gpu"), help="run on this device (default: MLX's default device)")
    b.add_argument("--quick", action="store_true",
                   help="small sizes, float32 only unless --dtypes, shorter timing: about 30 s on a 2-core CPU")
    b.add_argument("--ops", metavar="LIST",
                   help="ops only: comma-separated op names, globs or kinds, e.g. 'add+relu,mul+*,linear' "
                   "(default: all)")
    b.add_argument("--dtypes", metavar="LIST",
                   help="ops only: comma-separated dtypes from float32,float16,bfloat16 (default: "
                   "float32,bfloat16; --quick: float32)")
    b.add_argument("--sizes", metavar="LIST",
                   help="ops only: comma-separated sizes replacing the defaults: element counts for elementwise "
                   "ops (65536, 64K, 1M; measured at exactly that count) and MxKxN shapes for linear ops "
                   "(1x1024x1024)")
    b.add_argument("--backward", action="store_true",
                   help="ops only: also time forward+backward (models always do)")
    b.add_argument("--json", metavar="PATH",
                   help="also write machine-readable results here, rewritten after every row; '-' = standard "
                   "output (the table then goes to stderr); schema: docs/cli.md")
    b.add_argument("--no-cache", action="store_true", help="ops only: do not update the performance cache")
    b.add_argument("--min-size", type=non_negative_int, metavar="N",
                   help="--model only: fuse outputs of at least N elements (default: the config's, 4096)")
    b.add_argument("--merge-projections", action="store_true",
                   help="--model only: FusionConfig(merge_projections=True): q/k/v and gate/up projections as "
                   "one matmul against concatenated weights (a second copy of those weights; "
                   "docs/merged-projections.md)")
    b.set_defaults(func=cmd_bench)
    return b


def _check_mode_options(args) -> None:
    """Options of the other mode are an error, not silently ignored."""
    model = args.model is not None
    wrong = _OPS_ONLY if model else _MODEL_ONLY
    given = [flag for dest, flag in wrong.items() if getattr(args, dest) is not None and getattr(args, dest) is not False]
    if given:
        mode = "--model (a whole model)" if model else "op benchmarks (no --model)"
        raise UsageError(f"{', '.join(given)}: not used with {mode}; see `mlx-fusion bench --help`")


def cmd_bench(args) -> int:
    _check_mode_options(args)
    check_writable(args.json, "--json")
    set_device(args.device)
    if args.model is not None:
        return _bench_model(args)
    from ..benchmark import bench_plan, copy_size, default_timing, run_ops_benchmark
    from ..tracker import PerformanceTracker
    from .options import parse_dtypes, parse_sizes, select_ops

    out, err = consoles()
    if args.json == "-":
        out = err  # standard output carries the JSON alone
    try:
        ops, dtypes = select_ops(args.ops or ""), parse_dtypes(args.dtypes or "", args.quick)
        shapes = parse_sizes(args.sizes or "")
    except ValueError as e:
        raise UsageError(str(e)) from None
    timing = default_timing(args.quick)
    plan = bench_plan(ops, dtypes, shapes, args.quick)
    total = len(plan) * (2 if args.backward else 1)
    report = env(args.argv)
    tracker = None if args.no_cache else PerformanceTracker(autosave=False)
    out.print(f"device: {report['device']}   mlx {report['mlx_version']}   {total} configurations", markup=False)
    results = []

    def document(complete: bool, interrupted: bool = False) -> dict:
        copies = sorted({(copy_size(r.kind, r.shape), r.dtype, r.copy_gbps) for r in results})
        return {**report, "kind": "ops", "complete": complete, "interrupted": interrupted,
                "planned": total, "measured": len(results),
                "settings": {"quick": args.quick, "backward": args.backward,
                             "dtypes": [dtype_name(d) for d in dtypes], "timing": timing},
                "copy_bandwidth": [{"elements": n, "dtype": dt, "gbps": g} for n, dt, g in copies],
                "cache": str(tracker.path) if tracker is not None else None,
                "results": [r.as_dict() for r in results]}

    lines = ProgressLines(err, total)

    def finished(r) -> None:
        results.append(r)
        if tracker is not None and tracker.record(r):
            tracker.save()  # a crash later keeps this row in the cache too
        if args.json and args.json != "-":
            write_json(args.json, document(complete=False), err, quiet=True)
        low, high = r.speedup_spread
        lines.finished(f"{r.op} {r.pass_} {'x'.join(map(str, r.shape))} {r.dtype}: fused {r.fused_us:.1f} us, "
                       f"{r.speedup:.2f}x vs best unfused (quartiles {spread_text(low, high)}: {r.verdict})")

    interrupted = False
    try:
        with sigterm_interrupts(), progress(err) as bar:
            task = bar.add_task("starting", total=total)
            run_ops_benchmark(ops, dtypes, shapes, backward=args.backward, quick=args.quick,
                              progress=lambda label: bar.update(task, description=label),
                              on_result=lambda r: (finished(r), bar.advance(task)), **timing)
    except KeyboardInterrupt:
        interrupted = True
    _print_ops_table(out, results)
    copies = sorted({(copy_size(r.kind, r.shape), r.dtype, r.copy_gbps) for r in results})
    if copies:
        out.print("copy bandwidth (mx.negative, this run): "
                  + "; ".join(f"{n} x {dt}: {g:.1f} GB/s" for n, dt, g in copies))
    if tracker is not None and results and tracker.save():
        out.print(f"performance cache updated: {tracker.path}")
    if args.json:
        write_json(args.json, document(complete=not interrupted, interrupted=interrupted), err)
    if interrupted:
        err.print(f"interrupted: {len(results)} of {total} configurations measured and kept", markup=False)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _print_ops_table(out, results) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title="fused ops: median us per call; fused = as fuse() runs it, fused call = called eagerly; "
                        "speedup = fused vs the better of eager and mx.compile (quartiles over repeats); "
                        "verdict faster = lower quartile > 1",
                  box=box.SIMPLE_HEAD)
    for col in ("op", "pass", "shape", "dtype", "eager", "mx.compile", "fused", "fused call", "speedup",
                "quartiles", "verdict", "vs eager", "vs compile", "GB/s", "% copy", "TFLOP/s"):
        table.add_column(col, justify="left" if col in ("op", "pass", "shape", "dtype", "verdict") else "right",
                         overflow="fold" if col == "op" else "ellipsis")  # an op name wraps, never hides
    for r in results:
        fwd = r.pass_ == "fwd"  # bytes_moved counts the forward pass only: no GB/s for fwd+bwd
        low, high = r.speedup_spread
        table.add_row(r.op, r.pass_, "x".join(map(str, r.shape)), r.dtype, f"{r.eager_us:.1f}",
                      f"{r.compiled_us:.1f}", f"{r.fused_us:.1f}",
                      f"{r.extra['fused_call_us']:.1f}" if "fused_call_us" in r.extra else "-",
                      speedup_text(r.speedup), spread_text(low, high), r.verdict,
                      speedup_text(r.speedup_vs_eager), speedup_text(r.speedup_vs_compiled),
                      f"{r.fused_gbps:.1f}" if fwd else "-",
                      f"{r.pct_of_copy:.0f}" if fwd and math.isfinite(r.pct_of_copy) else "-",
                      f"{r.fused_tflops:.3g}" if r.flops else "-")
    print_table(out, table, drop=OPS_DROP_ORDER)


def _mib(nbytes) -> str:
    return f"{nbytes / 2**20:.1f}" if nbytes is not None and math.isfinite(nbytes) else "-"


def _bench_model(args) -> int:
    from ..config import fusion_config
    from ..lm import bench_lm, is_lm_spec
    from ..models import bench_model, load_spec, parameter_count
    from ..timing import default_timing

    out, err = consoles()
    if args.json == "-":
        out = err
    model, inputs = load_spec(args.model)
    report = env(args.argv)
    timing = default_timing(args.quick)
    overrides = {} if args.min_size is None else {"min_tensor_size": args.min_size}
    if args.merge_projections:
        overrides["merge_projections"] = True
    shapes = ", ".join(f"{dtype_name(a.dtype)}{list(a.shape)}" for a in inputs)
    out.print(f"device: {report['device']}   mlx {report['mlx_version']}   model {args.model}: "
              f"{parameter_count(model):,} parameters, inputs {shapes}", markup=False, emoji=False)
    lm = is_lm_spec(args.model)  # mlx-lm models: prefill, decode (KV cache) and a training step
    total = 12 if lm else 8
    results, lines, running = [], ProgressLines(err, total), []

    def document(complete: bool, interrupted: bool = False) -> dict:
        return {**report, "kind": "model", "complete": complete, "interrupted": interrupted,
                "planned": total, "measured": len(results),
                "model": {"spec": args.model, "parameters": parameter_count(model),
                          "inputs": [{"shape": list(a.shape), "dtype": dtype_name(a.dtype)} for a in inputs]},
                "settings": {"quick": args.quick, "timing": timing, **overrides}, "results": results}

    def row_done(r: dict) -> None:
        results.append(r)
        if args.json and args.json != "-":
            write_json(args.json, document(complete=False), err, quiet=True)
        lines.finished(f"{r['pass']} {r['variant']}: {r['time_ms']:.3f} ms, {r['speedup_vs_eager']:.2f}x vs eager")

    def step(label: str) -> None:  # mlx-lm timing reports a step as it starts: the previous one is done
        if running:
            lines.finished(running.pop())
        running.append(label)
        bar.update(task, description=label)
        bar.advance(task)

    interrupted = False
    try:
        with sigterm_interrupts(), progress(err) as bar, fusion_config(**overrides):
            task = bar.add_task("starting", total=total)
            if lm:
                bench_lm(model, inputs[0], progress=step, on_result=row_done, **timing)
                if running:
                    lines.finished(running.pop())
            else:
                bench_model(model, inputs, progress=lambda s: bar.update(task, description=s),
                            on_result=lambda r: (row_done(r), bar.advance(task)), **timing)
    except KeyboardInterrupt:
        interrupted = True
    _print_model_table(out, args.model, results, lm)
    out.print("fused = fuse(model, compile=False); fused+compile = fuse(model), the default "
              "(the fused graph replayed under mx.compile); for fwd+bwd, mx.compile and fused+compile "
              "compile the whole training step")
    note = cuda_memory_note()
    if note:
        out.print(note)
    if args.json:
        write_json(args.json, document(complete=not interrupted, interrupted=interrupted), err)
    if interrupted:
        err.print(f"interrupted: {len(results)} of {total} rows measured and kept", markup=False)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _print_model_table(out, spec: str, results, lm: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"{spec}: median time per call (quartiles over repeats); peak memory of one call"))
    columns = ["pass", "variant", "time (ms)", "quartiles (ms)"] + (["tokens/s"] if lm else []) + [
        "vs eager", "vs mx.compile", "peak MiB", "over resident MiB", "fusions", "max |diff|"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("pass", "variant") else "right")
    for r in results:
        tps = r.get("tokens_per_s")
        rate = ([f"{tps:.1f}" if tps is not None and math.isfinite(tps) else "-"]) if lm else []
        t = r["time_ms"]
        table.add_row(r["pass"], r["variant"], f"{t:.3f}" if t is not None and math.isfinite(t) else "-",
                      spread_text(r.get("time_ms_low"), r.get("time_ms_high"), 3), *rate,  # mlx-lm rows: "-"
                      speedup_text(r.get("speedup_vs_eager")), speedup_text(r.get("speedup_vs_compiled")),
                      _mib(r["peak_memory_bytes"]), _mib(r["activation_memory_bytes"]),
                      "-" if r["fusions"] is None else str(r["fusions"]),
                      "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}")
    print_table(out, table, drop=MODEL_DROP_ORDER)


def cuda_memory_note() -> str:
    """On CUDA, what MLX's graph size does to the peak-memory column (docs/mlx-lm.md), unless set."""
    import os

    from ..device import current_device_kind

    if current_device_kind() != "cuda" or "MLX_MAX_MB_PER_BUFFER" in os.environ:
        return ""
    return ("peak memory on CUDA: mostly MLX's buffers in flight (MLX_MAX_MB_PER_BUFFER unset: 1000 MB per "
            "graph on Hopper, Metal uses 40-50); compare at e.g. MLX_MAX_MB_PER_BUFFER=64 (docs/mlx-lm.md)")
