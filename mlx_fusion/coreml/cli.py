"""``mlx-fusion coreml SPEC --out DIR``: export a model's offloadable blocks as .mlpackage files.

Works on any OS (conversion does not need Core ML itself). Prints one row per
block (ops, input/output shapes, weight size, estimated work) and the reasons
other nodes stay in MLX, and writes the same as ``DIR/blocks.json``.

    def register(subparsers): ...   # called by mlx_fusion/cli.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

from .options import COMPUTE_UNITS, DEFAULT_MIN_FLOPS, OffloadOptions

__all__ = ["register", "run", "export"]

EXIT_NO_COREMLTOOLS = 5


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``coreml`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "coreml", help="export Neural Engine blocks as Core ML packages (any OS)",
        description="Trace SPEC, find the blocks Core ML can run, convert them to fp16 ML Programs "
                    "(.mlpackage) under --out and print a table of them.")
    p.add_argument("spec", metavar="SPEC", help="a demo model (mlp, gelu-mlp, transformer, ...) or path/file.py:factory")
    p.add_argument("--out", required=True, help="directory for the .mlpackage files and blocks.json")
    p.add_argument("--min-flops", type=float, default=DEFAULT_MIN_FLOPS,
                   help=f"smallest block worth offloading, in estimated FLOPs (default {DEFAULT_MIN_FLOPS:g})")
    p.add_argument("--compute-units", choices=COMPUTE_UNITS, default="CPU_AND_NE",
                   help="stored for the runtime; Core ML packages do not record it (default CPU_AND_NE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print blocks.json instead of a table")
    p.set_defaults(func=run)
    return p


def _resolve(spec: str, seed: int):
    """(model, inputs) via mlx_fusion.models; a tiny fallback if that module is absent."""
    try:
        from ..models import load_spec
    except ImportError:
        load_spec = None
    if load_spec is not None:
        return load_spec(spec, seed=seed)
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(seed)
    demos = {
        "mlp": lambda: (nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512)), (16, 512)),
        "gelu-mlp": lambda: (nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)), (16, 512)),
    }
    if spec not in demos:
        raise ValueError(f"unknown model {spec!r} (mlx_fusion.models is not installed; demos: {sorted(demos)})")
    model, shape = demos[spec]()
    return model, (mx.random.normal(shape),)


def export(model, inputs, out_dir, options: OffloadOptions) -> dict:
    """Trace `model(*inputs)` in eval mode, convert every eligible block into `out_dir`.

    Returns:
        dict: ``blocks`` (one dict per block: key, path, ops, mil_ops, inputs, outputs,
        weight_bytes, flops, reused) and ``rejected`` (reason, node ids, detail).
    """
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from ..graph.trace import trace
    from .convert import ConversionError, convert_block
    from .eligibility import find_blocks

    if isinstance(model, nn.Module):
        model.eval()
    graph = trace(model, *inputs)
    names = [v.name for v in graph.inputs[: graph.meta.get("num_params", 0)]]
    params = dict(zip(names, [a for _, a in tree_flatten(model.parameters())])) if names else {}
    report = find_blocks(graph, options.min_flops)
    rows, rejected = [], [dict(reason=r.reason, nodes=r.node_ids, detail=r.detail) for r in report.rejected]
    for block in report.blocks:
        try:
            c = convert_block(graph, block, params, options, out_dir=out_dir)
        except ConversionError as e:
            rejected.append(dict(reason="conversion-failed", nodes=block.node_ids, detail=str(e)))
            continue
        weight_bytes = sum(2 * v.size for v in block.static_inputs)  # fp16; broadcasts counted in full
        rows.append(dict(block=block.id, key=c.key, path=c.path, ops=c.ops, mil_ops=c.mil_ops,
                         inputs=[list(s) for s in c.input_shapes], outputs=[list(s) for s in c.output_shapes],
                         weight_bytes=weight_bytes, flops=c.flops, reused=c.reused))
    return {"source": graph.meta.get("source"), "min_flops": options.min_flops, "blocks": rows,
            "rejected": rejected}


def _ops_text(ops: dict) -> str:
    return ", ".join(f"{k}x{v}" if v > 1 else k for k, v in sorted(ops.items()))


def _print_table(result: dict, out_dir: Path) -> None:
    headers = ["block", "MIL ops", "inputs", "outputs", "weights", "est. FLOPs", "package"]
    rows = [[str(b["block"]), _ops_text(b["mil_ops"] or b["ops"]), " ".join(map(str, b["inputs"])),
             " ".join(map(str, b["outputs"])), f"{b['weight_bytes'] / 1024:.1f} KiB", f"{b['flops']:.3g}",
             Path(b["path"]).name + (" (cached)" if b["reused"] else "")] for b in result["blocks"]]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Core ML blocks of {result['source']} -> {out_dir}")
        for h in headers:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        Console().print(table)
    except ImportError:
        print("\t".join(headers))
        for r in rows:
            print("\t".join(r))
    reasons: dict = {}
    for r in result["rejected"]:
        reasons.setdefault(r["reason"], []).append(r["detail"])
    for reason, details in sorted(reasons.items()):
        shown = ", ".join(sorted(set(details))[:6])
        print(f"stays in MLX ({reason}): {len(details)} x {shown}")
    if not result["blocks"]:
        print("no block was offloaded (see the reasons above; --min-flops 0 exports every candidate)")


def run(args: argparse.Namespace) -> int:
    """The ``coreml`` handler; returns the exit status."""
    from . import CoreMLUnavailable, require_coremltools

    try:
        require_coremltools()
    except CoreMLUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_COREMLTOOLS
    try:
        model, inputs = _resolve(args.spec, args.seed)
    except ValueError as e:  # models.SpecError is a ValueError with an exit_code
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 3)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = OffloadOptions(min_flops=args.min_flops, compute_units=args.compute_units, cache_dir=str(out_dir))
    result = export(model, inputs, out_dir, options)
    (out_dir / "blocks.json").write_text(json.dumps(result, indent=2, default=str))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_table(result, out_dir)
    return 0


def main(argv: List[str] = None) -> int:  # `python -m mlx_fusion.coreml.cli` without the main CLI
    parser = argparse.ArgumentParser(prog="mlx-fusion")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
