"""The `mlx-fusion` command (also `python -m mlx_fusion`).

    mlx-fusion bench [--quick] [--ops add+*,linear] [--dtypes float32] [--json out.json]
    mlx-fusion bench --model mlp:width=1024,depth=4,batch=64
    mlx-fusion inspect transformer:dim=256 --dot graph.dot

Exit codes: 0 success; 1 unexpected failure; 2 bad command line (argparse, unknown op,
dtype, size or device); 3 bad model SPEC (syntax, unknown demo model, option or
value); 4 model file or factory that cannot be loaded (missing file, import error,
missing factory, wrong return type); 5 coremltools missing (coreml); 6 model that cannot
be traced (inspect); 130 interrupted.
See docs/cli.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from typing import List, Optional

import mlx.core as mx

from .models import SpecError, describe_demos

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_TRACE", "BENCH_SCHEMA"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TRACE, EXIT_INTERRUPTED = 0, 1, 2, 6, 130
BENCH_SCHEMA = "mlx-fusion-bench/1"


class UsageError(Exception):
    """A bad option value found after argparse (exit 2)."""


def _consoles():
    from rich.console import Console

    out = Console(highlight=False)
    if not out.is_terminal:  # piped or captured: don't squeeze tables into 80 columns
        out = Console(highlight=False, width=200)
    return out, Console(stderr=True, highlight=False)


# -- argument parsing ---------------------------------------------------------------------------
SPEC_HELP = ("model SPEC: a demo model NAME[:key=value,...] or path/to/file.py:factory where "
             "factory() returns (model, example_inputs). Demo models: " + "; ".join(describe_demos()))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="mlx-fusion", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure and inspect what operator fusion buys MLX models on this machine.",
        epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--version", action="version", version=f"mlx-fusion {__version__} (mlx {mx.__version__})")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

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
                   "(65536, 64K, 1M) and MxKxN shapes for linear ops (1x1024x1024)")
    b.add_argument("--backward", action="store_true", help="also time forward+backward (ops; models always do)")
    b.add_argument("--json", metavar="PATH", help="also write machine-readable results here (schema: docs/cli.md)")
    b.add_argument("--no-cache", action="store_true", help="do not update the performance cache")
    b.add_argument("--min-size", type=int, metavar="N",
                   help="with --model: fuse outputs of at least N elements (default: the config's, 4096)")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="list the fusion opportunities in a model; --dot writes the graphs",
                       description="Trace a model, list the fusions the optimizer would apply (pattern, "
                       "nodes, estimated speedup and whether it was measured or modelled, memory saved).")
    i.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    i.add_argument("--dot", metavar="PATH", help="write the graph before and after rewriting as Graphviz DOT")
    i.add_argument("--json", metavar="PATH", help="also write the opportunities as JSON")
    i.add_argument("--device", choices=("cpu", "gpu"), help="trace for this device (default: MLX's default)")
    i.add_argument("--min-size", type=int, metavar="N",
                   help="fuse outputs of at least N elements (default: the config's, 4096)")
    i.set_defaults(func=cmd_inspect)

    try:  # the Core ML subcommand lives with the Core ML code and needs coremltools
        from .coreml import cli as coreml_cli
    except ImportError:
        coreml_cli = None
    if coreml_cli is not None and hasattr(coreml_cli, "register"):
        coreml_cli.register(sub)
    return ap


def _set_device(name: Optional[str]) -> None:
    if name == "gpu" and not mx.is_available(mx.gpu):
        raise UsageError("--device gpu: this MLX build has no GPU backend (Metal or CUDA) available")
    if name:
        mx.set_default_device(mx.gpu if name == "gpu" else mx.cpu)


# -- reporting helpers ------------------------------------------------------------------------------
def _env(argv: List[str]) -> dict:
    from . import __version__
    from .benchmark import device_description, device_id, device_kind

    return {"schema": BENCH_SCHEMA, "command": "mlx-fusion " + " ".join(argv), "argv": list(argv),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_description(), "device_kind": device_kind(), "device_id": device_id(),
            "mlx_version": mx.__version__, "mlx_fusion_version": __version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _clean(x):
    """JSON has no NaN/inf: write null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _write_json(path: str, data: dict, err) -> None:
    with open(path, "w") as f:
        json.dump(_clean(data), f, indent=1)
        f.write("\n")
    err.print(f"wrote {path}")


def _print_table(out, table) -> None:
    """Print without truncating numbers: a terminal narrower than the table wraps its lines
    rather than rich eliding cells."""
    from rich.measure import Measurement

    need = Measurement.get(out, out.options.update(max_width=10_000), table).maximum
    if need > out.width:
        out.width = need
    out.print(table)


def _speedup(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    color = "green" if x >= 1.05 else ("red" if x <= 0.95 else "")
    return f"[{color}]{x:.2f}x[/]" if color else f"{x:.2f}x"


def _progress(err):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


# -- bench ----------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    _set_device(args.device)
    if args.model is not None:
        return _bench_model(args)
    from rich import box
    from rich.table import Table

    from .benchmark import (_copy_size, bench_plan, default_timing, parse_dtypes, parse_sizes, run_ops_benchmark,
                            select_ops)
    from .tracker import PerformanceTracker

    out, err = _consoles()
    try:
        ops, dtypes, shapes = select_ops(args.ops), parse_dtypes(args.dtypes, args.quick), parse_sizes(args.sizes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    timing = default_timing(args.quick)
    plan = bench_plan(ops, dtypes, shapes, args.quick)
    env = _env(args.argv)
    tracker = None if args.no_cache else PerformanceTracker(autosave=False)
    out.print(f"device: {env['device']}   mlx {env['mlx_version']}   {len(plan)} configurations", markup=False)
    with _progress(err) as bar:
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
                      _speedup(r.speedup_vs_eager),
                      _speedup(r.speedup_vs_compiled), f"{r.fused_gbps:.1f}" if fwd else "-",
                      f"{r.pct_of_copy:.0f}" if fwd and math.isfinite(r.pct_of_copy) else "-",
                      f"{r.fused_tflops:.3g}" if r.flops else "-")
        if tracker is not None:
            tracker.record(r)
    _print_table(out, table)
    copies = sorted({(_copy_size(r.kind, r.shape), r.dtype, r.copy_gbps) for r in results})
    out.print("copy bandwidth (mx.negative, this run): "
              + "; ".join(f"{n} x {dt}: {g:.1f} GB/s" for n, dt, g in copies))
    if tracker is not None and results:
        if tracker.save():
            out.print(f"performance cache updated: {tracker.path}")
    if args.json:
        _write_json(args.json, {**env, "kind": "ops",
                                "settings": {"quick": args.quick, "backward": args.backward,
                                             "dtypes": [str(d).replace("mlx.core.", "") for d in dtypes],
                                             "timing": timing},
                                "copy_bandwidth": [{"elements": n, "dtype": dt, "gbps": g} for n, dt, g in copies],
                                "cache": str(tracker.path) if tracker is not None else None,
                                "results": [r.as_dict() for r in results]}, err)
    return EXIT_OK


def _bench_model(args) -> int:
    from rich.table import Table
    from rich.text import Text

    from .benchmark import default_timing
    from .config import fusion_config
    from .models import bench_model, load_spec, parameter_count

    out, err = _consoles()
    model, inputs = load_spec(args.model)
    env = _env(args.argv)
    timing = default_timing(args.quick)
    overrides = {} if args.min_size is None else {"min_tensor_size": args.min_size}
    shapes = ", ".join(f"{dt}{list(a.shape)}".replace("mlx.core.", "") for a, dt in ((a, a.dtype) for a in inputs))
    out.print(f"device: {env['device']}   mlx {env['mlx_version']}   model {args.model}: "
              f"{parameter_count(model):,} parameters, inputs {shapes}", markup=False)
    with _progress(err) as bar, fusion_config(**overrides):
        task = bar.add_task("starting", total=8)
        results = bench_model(model, inputs, progress=lambda s: (bar.update(task, description=s), bar.advance(task)),
                              **timing)
    table = Table(title=Text(f"{args.model}: median time per call; peak memory of one call"))
    for col in ("pass", "variant", "time (ms)", "vs eager", "vs mx.compile", "peak MiB", "over resident MiB",
                "fusions", "max |diff|"):
        table.add_column(col, justify="left" if col in ("pass", "variant") else "right")
    for r in results:
        table.add_row(r["pass"], r["variant"], f"{r['time_ms']:.3f}", _speedup(r["speedup_vs_eager"]),
                      _speedup(r["speedup_vs_compiled"]), f"{r['peak_memory_bytes'] / 2**20:.1f}",
                      f"{r['activation_memory_bytes'] / 2**20:.1f}",
                      "-" if r["fusions"] is None else str(r["fusions"]),
                      "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}")
    _print_table(out, table)
    out.print("fused = fuse(model, compile=False); fused+compile = fuse(model), the default "
              "(the fused graph replayed under mx.compile); for fwd+bwd, mx.compile and fused+compile "
              "compile the whole training step")
    if args.json:
        _write_json(args.json, {**env, "kind": "model",
                                "model": {"spec": args.model, "parameters": parameter_count(model),
                                          "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype).replace(
                                              "mlx.core.", "")} for a in inputs]},
                                "settings": {"quick": args.quick, "timing": timing, **overrides},
                                "results": results}, err)
    return EXIT_OK


# -- inspect ----------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from rich.table import Table
    from rich.text import Text

    from .config import fusion_config
    from .graph.optimizer import FusionOptimizer
    from .graph.trace import TraceError, trace
    from .models import load_spec

    _set_device(args.device)
    out, err = _consoles()
    model, inputs = load_spec(args.spec)
    try:
        before = trace(model, *inputs)
    except TraceError as e:
        _error(err, f"cannot trace {args.spec}: {e}")
        return EXIT_TRACE
    overrides = {} if args.min_size is None else {"min_tensor_size": args.min_size}
    with fusion_config(**overrides):
        opt = FusionOptimizer(compiled_replay=True)  # as fuse() does by default
        opps = opt.detect_opportunities(before)
        after = before.copy()
        stats = opt.apply_fusions(after, opps)
    ops = {n.id: n.op for n in before.nodes}
    table = Table(title=Text(f"{args.spec}: {len(opps)} fusion opportunities ({len(before)} nodes -> {len(after)})"))
    for col in ("#", "pattern", "nodes", "output", "est. speedup", "source", "memory saved"):
        table.add_column(col, justify="right" if col in ("#", "est. speedup", "memory saved") else "left")
    for k, o in enumerate(opps):
        out_v = o.replacement.outputs[0]
        table.add_row(str(k), o.name, Text(" ".join(f"%{i}:{ops[i]}" for i in o.node_ids)), Text(str(out_v)),
                      f"{o.estimated_speedup:.2f}x", o.source, _bytes(o.memory_savings))
    _print_table(out, table)
    out.print(f"applied {stats.applied_count}, failed {stats.failed_count}, "
              f"memory saved per call {_bytes(stats.memory_saved_bytes)}; sources: model = bandwidth model, "
              "measured = performance cache (mlx-fusion bench)")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(graphs_to_dot({"before": before, "after": after}))
        err.print(f"wrote {args.dot}")
    if args.json:
        _write_json(args.json, {**_env(args.argv), "kind": "inspect", "spec": args.spec,
                                "nodes_before": len(before), "nodes_after": len(after),
                                "stats": stats.as_dict(),
                                "opportunities": [{"pattern": o.name, "node_ids": o.node_ids,
                                                   "ops": [ops[i] for i in o.node_ids],
                                                   "output": str(o.replacement.outputs[0]),
                                                   "estimated_speedup": o.estimated_speedup, "source": o.source,
                                                   "memory_savings": o.memory_savings} for o in opps]}, err)
    return EXIT_OK


def _error(err, message: str) -> None:
    from rich.text import Text

    err.print(Text.assemble(("error: ", "bold red"), message))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def graphs_to_dot(graphs: dict) -> str:
    """Graphviz DOT text with one cluster per graph (name -> Graph). Inputs are ellipses,
    constants small boxes, fused nodes filled; edges carry the value's shape and dtype."""
    lines = ["digraph mlx_fusion {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8];']
    for g_idx, (title, g) in enumerate(graphs.items()):
        p = f"g{g_idx}_"
        fused = sum(n.op.startswith("Fused") for n in g.nodes)
        lines += [f"  subgraph cluster_{title} {{", f"    label={_q(f'{title}: {len(g)} nodes, {fused} fused')};"]
        src = {}
        paths = g.meta.get("input_paths") or []  # "params.layers.0.weight", "args.0", ...
        for k, v in enumerate(g.inputs):
            src[v.name] = f"{p}in{k}"
            label = paths[k] if k < len(paths) else v.name
            lines.append(f"    {p}in{k} [shape=ellipse, label={_q(label)}];")
        for k, name in enumerate(g.constants):
            src[name] = f"{p}c{k}"
            arr = g.constants[name]
            lines.append(f"    {p}c{k} [shape=box, style=dotted, label={_q(f'const {list(arr.shape)}')}];")
        for n in g.nodes:
            style = ', style=filled, fillcolor="#9fd89f"' if n.op.startswith("Fused") else ""
            label = n.op + (f"\\n{n.params['pattern'].name}" if isinstance(n.params, dict) and "pattern" in n.params
                            else "")
            lines.append(f'    {p}n{n.id} [shape=box{style}, label="{label}"];')
            for v in n.inputs:
                if v.name in src:
                    lines.append(f"    {src[v.name]} -> {p}n{n.id} [label={_q(_short(v))}];")
            for v in n.outputs:
                src[v.name] = f"{p}n{n.id}"
        for k, v in enumerate(g.outputs):
            lines.append(f"    {p}out{k} [shape=doublecircle, label={_q('out')}];")
            if v.name in src:
                lines.append(f"    {src[v.name]} -> {p}out{k} [label={_q(_short(v))}];")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _short(v) -> str:
    return f"{str(v.dtype).replace('mlx.core.', '')}{list(v.shape)}"


# -- entry point ------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _, err = _consoles()
    args.argv = argv  # for the JSON reports' "command"
    try:
        code = args.func(args)  # one-argument handlers: the coreml subcommand registers its own
    except UsageError as e:
        _error(err, str(e))
        return EXIT_USAGE
    except SpecError as e:
        _error(err, str(e))
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
