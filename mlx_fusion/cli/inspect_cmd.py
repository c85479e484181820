"""`mlx-fusion inspect SPEC`: every candidate fusion in a model with its module path,
decision and reason (`mlx_fusion.explain`'s report), and the graphs before and after as
Graphviz DOT (or a rendered picture, cli/dot.py)."""

from __future__ import annotations

import argparse

from .common import (EXIT_OK, EXIT_TRACE, SPEC_HELP, bytes_text, check_writable, consoles, env, error, print_table,
                     set_device, write_json)
from .options import non_negative_int

from .dot import graphs_to_dot, render_check, write_dot

__all__ = ["add_parser", "cmd_inspect", "graphs_to_dot"]


def add_parser(sub) -> argparse.ArgumentParser:
    i = sub.add_parser("inspect", help="list the fusion opportunities in a model; --dot writes the graphs",
                       description="Trace a model and list every candidate fusion: pattern, module path, "
                       "decision (fused / rejected) and why, estimated speedup and where it came from.")
    i.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    i.add_argument("--dot", metavar="PATH", help="write the graph before and after rewriting as Graphviz DOT "
                   "(.png/.svg/.pdf: rendered with Graphviz's dot; large graphs are drawn per module)")
    i.add_argument("--json", metavar="PATH", help="also write the opportunities as JSON")
    i.add_argument("--device", choices=("cpu", "gpu"), help="trace for this device (default: MLX's default)")
    i.add_argument("--min-size", type=non_negative_int, metavar="N",
                   help="fuse outputs of at least N elements (default: the config's, 4096)")
    i.set_defaults(func=cmd_inspect)
    return i


def cmd_inspect(args) -> int:
    from rich.table import Table
    from rich.text import Text

    from ..config import fusion_config
    from ..explain import report_of_graph
    from ..graph.trace import TraceError, trace
    from ..models import load_spec

    check_writable(args.dot, "--dot")
    render_check(args.dot)
    check_writable(args.json, "--json")
    set_device(args.device)
    out, err = consoles()
    model, inputs = load_spec(args.spec)
    try:
        before = trace(model, *inputs)
    except TraceError as e:
        error(err, f"cannot trace {args.spec}: {e}" + (f" (at {e.where})" if e.where else ""))
        return EXIT_TRACE
    overrides = {} if args.min_size is None else {"min_tensor_size": args.min_size}
    with fusion_config(**overrides):
        opt = _optimizer()
        opps = opt.detect_opportunities(before)
        after = before.copy()
        stats = opt.apply_fusions(after, opps)
    report = report_of_graph(args.spec, before, after, opt)
    table = Table(title=Text(report.headline()), title_justify="left")
    for col in ("pattern", "module", "nodes", "decision", "est. speedup", "source", "reason"):
        table.add_column(col, justify="right" if col == "est. speedup" else "left")
    for d in report.candidates:
        table.add_row(d.pattern, d.module or "(top)", Text(" ".join(d.ops)),
                      Text("fused", style="green") if d.fused else "rejected",
                      "-" if d.speedup is None else f"{d.speedup:.2f}x", d.source or "-", Text(d.reason))
    print_table(out, table)
    out.print(f"applied {stats.applied_count}, failed {stats.failed_count}, "
              f"memory saved per call {bytes_text(stats.memory_saved_bytes)}; sources: model = bandwidth model "
              "estimate, measured = performance cache (mlx-fusion bench), shipped = shipped priors")
    if args.dot:
        write_dot(args.dot, graphs_to_dot({"before": before, "after": after}), err)
    if args.json:
        ops = {n.id: n.op for n in before.nodes}
        write_json(args.json, {**env(args.argv), "kind": "inspect", "spec": args.spec,
                               "nodes_before": len(before), "nodes_after": len(after),
                               "stats": stats.as_dict(), "explain": report.to_dict(),
                               "opportunities": [{"pattern": o.name, "node_ids": o.node_ids,
                                                  "ops": [ops[i] for i in o.node_ids],
                                                  "module": _module(before, o.node_ids),
                                                  "output": str(o.replacement.outputs[0]),
                                                  "estimated_speedup": o.estimated_speedup, "source": o.source,
                                                  "memory_savings": o.memory_savings} for o in opps]}, err)
    return EXIT_OK


def _module(graph, node_ids) -> str:
    paths = [n.module for n in graph.nodes if n.id in set(node_ids)]
    return max(paths, key=lambda p: p.count(".") + bool(p), default="")


def _optimizer():
    """The optimizer as `fuse()` runs it by default: compiled replay, priced by the tracker."""
    from ..graph.optimizer import FusionOptimizer
    from ..tracker import price

    return FusionOptimizer(price=price, compiled_replay=True)


