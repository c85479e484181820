"""Graphviz output for `mlx-fusion inspect --dot`: DOT text, or a PNG/SVG/PDF rendered by
Graphviz's ``dot`` when it is installed. A graph of more than `NODE_LIMIT` nodes is drawn
per module (one box per module path, collapsed), since node by node a 2-layer llama is
already a picture of thousands of pixels on each side."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Dict

__all__ = ["graphs_to_dot", "modules_to_dot", "NODE_LIMIT", "RENDERED", "render_check", "write_dot"]

NODE_LIMIT = 150
RENDERED = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def render_check(path) -> None:
    """UsageError now if `path` asks for a picture and Graphviz's ``dot`` is not installed."""
    from .common import UsageError

    fmt = RENDERED.get(Path(path).suffix.lower()) if path else None
    if fmt and shutil.which("dot") is None:
        raise UsageError(f"--dot {path}: rendering {fmt.upper()} needs Graphviz's `dot`, which is not on PATH "
                         "(install graphviz, e.g. `apt install graphviz` / `brew install graphviz`, "
                         "or give a .dot path to write DOT text)")


def write_dot(path: str, text: str, err) -> None:
    """Write DOT text, or render it when the suffix is .png/.svg/.pdf."""
    from .common import UsageError, write_text

    fmt = RENDERED.get(Path(path).suffix.lower())
    if fmt is None:
        write_text(path, text, "--dot", err)
        return
    r = subprocess.run(["dot", f"-T{fmt}", "-o", path], input=text, text=True, capture_output=True)
    if r.returncode != 0:
        raise UsageError(f"--dot {path}: dot failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    err.print(f"wrote {path}")


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def graphs_to_dot(graphs: dict, limit: int = NODE_LIMIT) -> str:
    """Graphviz DOT text with one cluster per graph (name -> Graph). Inputs are ellipses,
    constants small boxes, fused nodes filled; edges carry the value's shape and dtype.
    If any graph has more than `limit` nodes, every graph is drawn per module instead."""
    if any(len(g) > limit for g in graphs.values()):
        return modules_to_dot(graphs)
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


def modules_to_dot(graphs: Dict[str, object]) -> str:
    """One box per module path (``Node.module``) with its op and fused counts; an edge where
    a value made in one module is read in another."""
    lines = ["digraph mlx_fusion {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10, shape=box];']
    for g_idx, (title, g) in enumerate(graphs.items()):
        p = f"g{g_idx}_"
        fused = sum(n.op.startswith("Fused") for n in g.nodes)
        lines += [f"  subgraph cluster_{title} {{",
                  f"    label={_q(f'{title}: {len(g)} nodes, {fused} fused (collapsed per module)')};"]
        ids: Dict[str, str] = {}
        ops, fused_in = Counter(), Counter()
        for n in g.nodes:
            ops[n.module] += 1
            fused_in[n.module] += n.op.startswith("Fused")
        for k, module in enumerate(ops):
            ids[module] = f"{p}m{k}"
            style = ', style=filled, fillcolor="#9fd89f"' if fused_in[module] else ""
            label = f"{module or '(top)'}\\n{ops[module]} ops" + (f", {fused_in[module]} fused" if fused_in[module]
                                                                 else "")
            lines.append(f'    {p}m{k} [label="{label}"{style}];')
        made = {v.name: n.module for n in g.nodes for v in n.outputs}
        edges = []
        for n in g.nodes:
            for v in n.inputs:
                src = made.get(v.name)
                if src is not None and src != n.module and (src, n.module) not in edges:
                    edges.append((src, n.module))
        lines += [f"    {ids[a]} -> {ids[b]};" for a, b in edges]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
