"""The `mlx-fusion` command (also `python -m mlx_fusion`).

    mlx-fusion bench [--quick] [--ops add+*,linear] [--dtypes float32] [--json out.json]
    mlx-fusion bench --model mlp:width=1024,depth=4,batch=64
    mlx-fusion inspect transformer:dim=256 --dot graph.dot

Exit codes: 0 success; 1 unexpected failure; 2 bad command line (argparse, a negative
count, unknown op, dtype, size or device, a bench option of the other mode, an output
path that cannot be written);
3 bad model SPEC (syntax, unknown demo model, option or value); 4 model file or factory
that cannot be loaded (missing file, import error, missing factory, wrong return type);
5 coremltools missing (coreml); 6 model that cannot be traced (inspect, coreml);
130 interrupted (bench keeps and writes what it measured).
See docs/cli.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

import mlx.core as mx

from ..models.spec import SpecError
from . import bench, inspect_cmd
from .common import (BENCH_SCHEMA, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_TRACE, EXIT_USAGE,  # noqa: F401
                     UsageError, _clean, consoles, error)
from .inspect_cmd import graphs_to_dot  # noqa: F401  (public: tests and tools draw graphs with it)

__all__ = ["main", "build_parser", "SUBCOMMANDS", "UsageError", "graphs_to_dot", "EXIT_OK", "EXIT_ERROR",
           "EXIT_USAGE", "EXIT_TRACE", "BENCH_SCHEMA"]


def _add_coreml_parser(sub) -> None:
    try:  # the Core ML subcommand lives with the Core ML code
        from ..coreml import cli as coreml_cli
    except ImportError:
        return
    coreml_cli.register(sub)


def _add_run_parser(sub) -> None:
    from ..lm.run import add_run_parser  # `mlx-fusion run mlx_lm.generate ...`: the mlx-lm drop-in

    add_run_parser(sub)


# One function per subcommand: add_parser(subparsers) adds its parser and sets `func`, a
# handler(args) -> exit code that may raise UsageError (2) or SpecError (its exit_code).
# A new subcommand appends its function here.
SUBCOMMANDS: List[Callable] = [bench.add_parser, inspect_cmd.add_parser, _add_coreml_parser, _add_run_parser]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    ap = argparse.ArgumentParser(
        prog="mlx-fusion", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure and inspect what operator fusion buys MLX models on this machine.",
        epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--version", action="version", version=f"mlx-fusion {__version__} (mlx {mx.__version__})")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return ap


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
    _, err = consoles()
    args.argv = argv  # for the JSON reports' "command"
    try:
        code = args.func(args)
    except UsageError as e:
        error(err, str(e))
        return EXIT_USAGE
    except SpecError as e:
        error(err, str(e))
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
