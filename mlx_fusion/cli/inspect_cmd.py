"""`mlx-fusion inspect SPEC`: the fusions the optimizer would apply to a model, and the
graphs before and after as Graphviz DOT."""

from __future__ import annotations

import argparse

from .common import (EXIT_OK, EXIT_TRACE, SPEC_HELP, bytes_text, check_writable, consoles, env, error, print_table,
                     set_device, write_json, write_text)
from .options import non_negative_int

__all__ = ["add_parser", "cmd_inspect", "graphs_to_dot"]


def add_parser(sub) -> argparse.ArgumentParser:
    i = sub.add_parser("inspect", help="list the fusion opportunities in a model; --dot writes the graphs",
                       description="Trace a model, list the fusions the optimizer would apply (pattern, "
                       "nodes, estimated speedup and whether it was measured or modelled, memory saved).")
    i.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    i.add_argument("--dot", metavar="PATH", help="write the graph before and after rewriting as Graphviz DOT")
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
    from ..graph.trace import TraceError, trace
    from ..models import load_spec

    check_writable(args.dot, "--dot")
    check_writable(args.json, "--json")
    set_device(args.device)
    out, err = consoles()
    model, inputs = load_spec(args.spec)
    try:
        before = trace(model, *inputs)
    except TraceError as e:
        error(err, f"cannot trace {args.spec}: {e}")
        return EXIT_TRACE
    overrides = {} if args.min_size is None else {"min_tensor_size": args.min_size}
    with fusion_config(**overrides):
        opt = _optimizer()
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
                      f"{o.estimated_speedup:.2f}x", o.source, bytes_text(o.memory_savings))
    print_table(out, table)
    out.print(f"applied {stats.applied_count}, failed {stats.failed_count}, "
              f"memory saved per call {bytes_text(stats.memory_saved_bytes)}; sources: model = bandwidth model, "
              "measured = performance cache (mlx-fusion bench)")
    if args.dot:
        write_text(args.dot, graphs_to_dot({"before": before, "after": after}), "--dot", err)
    if args.json:
        write_json(args.json, {**env(args.argv), "kind": "inspect", "spec": args.spec,
                               "nodes_before": len(before), "nodes_after": len(after),
                               "stats": stats.as_dict(),
                               "opportunities": [{"pattern": o.name, "node_ids": o.node_ids,
                                                  "ops": [ops[i] for i in o.node_ids],
                                                  "output": str(o.replacement.outputs[0]),
                                                  "estimated_speedup": o.estimated_speedup, "source": o.source,
                                                  "memory_savings": o.memory_savings} for o in opps]}, err)
    return EXIT_OK


def _optimizer():
    """The optimizer as `fuse()` runs it by default: compiled replay, priced by the tracker."""
    from ..graph.optimizer import FusionOptimizer
    from ..tracker import price

    return FusionOptimizer(price=price, compiled_replay=True)


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
