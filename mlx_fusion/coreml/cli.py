"""``mlx-fusion coreml SPEC --out DIR``: export a model's offloadable blocks as .mlpackage files.

Works on any OS (conversion does not need Core ML itself). Prints one row per
block (ops, input/output shapes, weight size, estimated work) and the reasons
other nodes stay in MLX, and writes the same as ``DIR/blocks.json``.

    def register(subparsers): ...   # called by mlx_fusion/cli (SUBCOMMANDS)

Exit codes as the main command (docs/cli.md): 2 for a bad ``--min-flops`` or an
``--out`` that is not a usable directory (checked before any work), 3/4 for a bad
SPEC, 5 without coremltools, 6 for a model that cannot be traced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..cli.common import EXIT_NO_COREMLTOOLS, EXIT_TRACE, EXIT_USAGE, SPEC_HELP
from ..cli.options import non_negative_float, non_negative_int
from .options import COMPUTE_UNITS, DEFAULT_MIN_FLOPS, OffloadOptions

__all__ = ["register", "run", "export", "EXIT_NO_COREMLTOOLS"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``coreml`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "coreml", help="export Neural Engine blocks as Core ML packages (any OS)",
        description="Trace SPEC, find the blocks Core ML can run, convert them to fp16 ML Programs "
                    "(.mlpackage) under --out and print a table of them.")
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--out", required=True, help="directory for the .mlpackage files and blocks.json (created)")
    p.add_argument("--min-flops", type=non_negative_float, default=DEFAULT_MIN_FLOPS,
                   help=f"smallest block worth offloading, in estimated FLOPs (default {DEFAULT_MIN_FLOPS:g})")
    p.add_argument("--compute-units", choices=COMPUTE_UNITS, default="CPU_AND_NE",
                   help="stored for the runtime; Core ML packages do not record it (default CPU_AND_NE)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random weights of demo models (default 0)")
    p.add_argument("--json", action="store_true", help="print blocks.json instead of a table")
    p.set_defaults(func=run)
    return p


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


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _out_dir(text: str) -> Path:
    """`--out` as a directory that exists now; ValueError (one line) if it cannot be."""
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {text}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {text}: cannot create the directory ({e.strerror or e})") from None
    return out


def run(args: argparse.Namespace) -> int:
    """The ``coreml`` handler; returns the exit status."""
    from ..graph.trace import TraceError
    from ..models import SpecError, load_spec
    from . import CoreMLUnavailable, require_coremltools

    try:
        require_coremltools()
    except CoreMLUnavailable as e:
        _error(str(e))
        return EXIT_NO_COREMLTOOLS
    if Path(args.out).exists() and not Path(args.out).is_dir():
        _error(f"--out {args.out}: exists and is not a directory")
        return EXIT_USAGE
    try:
        model, inputs = load_spec(args.spec, seed=args.seed)
    except SpecError as e:
        _error(str(e))
        return e.exit_code
    try:
        out_dir = _out_dir(args.out)  # created only once the SPEC is known to be good
    except ValueError as e:
        _error(str(e))
        return EXIT_USAGE
    options = OffloadOptions(min_flops=args.min_flops, compute_units=args.compute_units, cache_dir=str(out_dir))
    try:
        result = export(model, inputs, out_dir, options)
    except TraceError as e:
        _error(f"cannot trace {args.spec}: {e}")
        return EXIT_TRACE
    try:
        (out_dir / "blocks.json").write_text(json.dumps(result, indent=2, default=str))
    except OSError as e:
        _error(f"--out {args.out}: cannot write blocks.json ({e.strerror or e})")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_table(result, out_dir)
    return 0


def main(argv: Optional[List[str]] = None) -> int:  # `python -m mlx_fusion.coreml.cli ARGS` = `mlx-fusion coreml ARGS`
    from ..cli import main as cli_main

    return cli_main(["coreml", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
